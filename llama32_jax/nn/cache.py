"""The self-attention KV cache: a pytree that generation threads through jitted calls (and donates).

Layout: sequences are **left-padded** into one buffer of ``max_len`` slots. ``start[b]`` is the first real slot of
sequence ``b`` (its padding lies before it and is never visible), and ``index`` is the next slot to write, shared
by the batch. A token in slot ``s`` of sequence ``b`` has RoPE position ``s - start[b]``, so the amount of padding
never changes a result. Keys and values keep ``K`` kv heads (grouped-query attention is computed without repeats).

``k``/``v`` are one stacked ``[L, B, K, S, H]`` array each in the scanned layout, or a tuple of ``L`` arrays
``[B, K, S, H]`` in the unrolled layout (per-layer buffers avoid slice copies on XLA:CPU). Slots are the
second-to-last axis so that each kv head's ``[S, H]`` block is contiguous: the attention contractions then read
the cache in place instead of transposing a copy of it every step. A self-attention layer sees the cache through
a :class:`LayerCache` (:meth:`KVCache.layer`; inside a layer scan, built on the carried stacked buffers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama32_jax import dims
from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import InvalidInputError

# Logical axes of one layer's K or V buffer, and of the stacked form.
LAYER_AXES = (dims.BATCH, dims.KV_HEADS, dims.CACHE_SEQ, dims.HEAD_DIM)
STACKED_AXES = (dims.LAYERS, *LAYER_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    start: jax.Array  # [B] int32: first valid slot per sequence
    # [] int32: next slot to write (tokens already in the cache, padding included), shared by the batch; or [B]
    # int32: one per sequence (a slot cache, llama32_jax.inference.engine: each row decodes on its own, one token a
    # call).
    index: jax.Array

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def batch_size(self) -> int:
        return int(self.start.shape[0])

    @property
    def per_slot(self) -> bool:
        """True when every sequence has its own write index (``index [B]``; calls then take one token)."""
        return self.index.ndim == 1

    @property
    def max_len(self) -> int:
        return int((self.k if self.stacked else self.k[0]).shape[-2])

    @classmethod
    def init(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        start: jax.Array | None = None,
        per_slot: bool = False,
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` slots, in ``config``'s layer layout.

        ``per_slot``: one write index per sequence (:attr:`per_slot`) instead of one for the batch."""
        t = config.text
        if batch_size <= 0 or max_len <= 0:
            raise InvalidInputError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
        if max_len > t.max_position_embeddings:
            raise InvalidInputError(
                f"KVCache max_len={max_len} exceeds the model context ({t.max_position_embeddings} positions)"
            )
        shape = (batch_size, t.n_kv_heads, max_len, t.head_dim)
        if config.scan_layers:
            k = jnp.zeros((t.n_layers, *shape), dtype)
            v = jnp.zeros((t.n_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(t.n_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(t.n_layers))
        if start is None:
            start = jnp.zeros((batch_size,), jnp.int32)
        start = jnp.asarray(start, jnp.int32)
        if start.shape != (batch_size,):
            raise InvalidInputError(f"KVCache start must have shape ({batch_size},), got {start.shape}")
        index = jnp.zeros((batch_size,) if per_slot else (), jnp.int32)
        return cls(k=k, v=v, start=start, index=index)

    def layer(self, i: int) -> LayerCache:
        """Layer ``i``'s view: its own buffers (unrolled layout) or the stacked ones and the index ``i``."""
        if self.stacked:
            return LayerCache(self.k, self.v, jnp.asarray(i, jnp.int32))
        return LayerCache(self.k[i], self.v[i])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One self-attention layer's view of a :class:`KVCache`.

    Unrolled layout: ``k``/``v`` are this layer's buffers ``[B, K, S, H]`` and ``layer`` is None. Scanned layout:
    ``k``/``v`` are the whole stacked buffers ``[L, B, K, S, H]`` (carried through the layer scan, so that they stay
    one buffer updated in place) and ``layer`` is this layer's index into them.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array | None = None  # [] int32

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> tuple[LayerCache, jax.Array, jax.Array]:
        """Write the new tokens' ``k, v [B, K, T, H]`` at slot ``index`` (``[]``, or ``[B]``: each row at its own
        slot); returns ``(updated view, this layer's keys, values [B, K, S, H])`` (in the cache dtype)."""
        zero = jnp.zeros((), jnp.int32)
        if index.ndim == 1:
            return self._write_rows(k, v, index)
        if self.layer is None:
            at = (zero, zero, index, zero)
            cache_k = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at)
            cache_v = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at)
            return LayerCache(cache_k, cache_v), cache_k, cache_v
        at = (self.layer, zero, zero, index, zero)
        all_k = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at)
        all_v = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at)
        keys = jax.lax.dynamic_index_in_dim(all_k, self.layer, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(all_v, self.layer, keepdims=False)
        return LayerCache(all_k, all_v, self.layer), keys, values

    def _write_rows(self, k: jax.Array, v: jax.Array, index: jax.Array) -> tuple[LayerCache, jax.Array, jax.Array]:
        """:meth:`write` with one slot per row (``index [B]``): a scatter of each row's ``T`` tokens."""
        rows = jnp.arange(k.shape[0])
        t = k.shape[2]
        slots = index[:, None] + jnp.arange(t, dtype=index.dtype)[None, :]  # [B, T]
        new_k = k.transpose(0, 2, 1, 3).astype(self.k.dtype)  # [B, T, K, H]: the scatter's update layout
        new_v = v.transpose(0, 2, 1, 3).astype(self.v.dtype)
        if self.layer is None:
            cache_k = self.k.at[rows[:, None], :, slots].set(new_k, mode="drop")
            cache_v = self.v.at[rows[:, None], :, slots].set(new_v, mode="drop")
            return LayerCache(cache_k, cache_v), cache_k, cache_v
        all_k = self.k.at[self.layer, rows[:, None], :, slots].set(new_k, mode="drop")
        all_v = self.v.at[self.layer, rows[:, None], :, slots].set(new_v, mode="drop")
        keys = jax.lax.dynamic_index_in_dim(all_k, self.layer, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(all_v, self.layer, keepdims=False)
        return LayerCache(all_k, all_v, self.layer), keys, values
