"""The self-attention KV cache: a pytree that generation threads through jitted calls (and donates).

Layout: sequences are **left-padded** into one buffer of ``max_len`` slots. ``start[b]`` is the first real slot of
sequence ``b`` (its padding lies before it and is never visible), and ``index`` is the next slot to write, shared
by the batch. A token in slot ``s`` of sequence ``b`` has RoPE position ``s - start[b]``, so the amount of padding
never changes a result. Keys and values keep ``K`` kv heads (grouped-query attention is computed without repeats).

``k``/``v`` are one stacked ``[L, B, K, S, H]`` array each in the scanned layout, or a tuple of ``L`` arrays
``[B, K, S, H]`` in the unrolled layout (per-layer buffers avoid slice copies on XLA:CPU). Slots are the
second-to-last axis so that each kv head's ``[S, H]`` block is contiguous: the attention contractions then read
the cache in place instead of transposing a copy of it every step.
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
    index: jax.Array  # [] int32: next slot to write (tokens already in the cache, padding included)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def batch_size(self) -> int:
        return int(self.start.shape[0])

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
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` slots, in ``config``'s layer layout."""
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
        return cls(k=k, v=v, start=start, index=jnp.zeros((), jnp.int32))
