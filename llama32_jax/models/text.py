"""The Llama 3.2 text decoder: self-attention blocks (GQA, llama3 RoPE, SwiGLU) and the causal-LM head.

Layers run either as a ``lax.scan`` over one stacked copy of the block parameters (``config.scan_layers=True``;
compile time flat in depth) or as a Python-unrolled loop over per-layer parameters (``False``; the fastest decode
on XLA:CPU). :func:`stack_layers` / :func:`unstack_layers` convert a parameter tree between the two layouts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax import dims
from llama32_jax.configs.base import ModelConfig, TextConfig
from llama32_jax.errors import InvalidInputError
from llama32_jax.nn.attend import self_attend
from llama32_jax.nn.cache import KVCache, LayerCache
from llama32_jax.nn.layers import Einsum, Embed, HeadsProjection, MergeHeadsProjection, RMSNorm, make_param
from llama32_jax.nn.rope import apply_rope, inv_frequencies, rope_angles
from llama32_jax.quant.arrays import qlinear
from llama32_jax.sharding.placement import constrain_activation, constrain_cache


class SlotSpan(NamedTuple):
    """The self-attention span, structurally (:func:`llama32_jax.nn.attention.self_attention`): query ``t`` sits in
    slot ``q_offset + t`` and sees the causal keys in ``kv_start[b] <= s < kv_end[b]``."""

    q_offset: jax.Array  # [] int32
    kv_start: jax.Array  # [B] int32
    kv_end: jax.Array  # [B] int32
    segments: jax.Array | None = None  # [B, T] int32: packed sequences (no cache); keys of other segments hidden


class StepInputs(NamedTuple):
    """What every self-attention layer of one call reads (:func:`token_positions`)."""

    positions: jax.Array  # [B, T] int32: the tokens' RoPE positions
    cos: jax.Array  # [B, T, H/2] fp32: RoPE tables at those positions
    sin: jax.Array  # [B, T, H/2] fp32
    span: SlotSpan  # the key slots each query sees
    index: jax.Array  # [] int32: the cache slot the first token is written to (0 without a cache); [B] per-slot cache


# Activation checkpointing of each decoder / cross-attention block in training (``model.remat``).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls' outputs
}


def call_block(block: nnx.Module, remat: str, *args):
    """``block(*args)``, rematerialised in the backward pass by ``remat`` (:data:`REMAT_POLICIES`)."""
    if remat == "none":
        return block(*args)
    if remat not in REMAT_POLICIES:
        raise InvalidInputError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    graphdef, state = nnx.split(block)  # blocks change no state when called: nothing to write back

    def pure(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(pure, policy=REMAT_POLICIES[remat])(state, *args)


class SelfAttention(nnx.Module):
    """GQA self-attention: Wq ``[N, H, D]``, Wk/Wv ``[K, H, D]``, Wo ``[D, N, H]`` ((out, in) order); no biases."""

    def __init__(self, cfg: TextConfig, *, dtype, stack: int | None, rngs: nnx.Rngs):
        d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, stack=stack, rngs=rngs)
        self.wq = HeadsProjection((n, h, d), (dims.Q_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wk = HeadsProjection((k, h, d), (dims.KV_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wv = HeadsProjection((k, h, d), (dims.KV_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wo = MergeHeadsProjection((d, n, h), (dims.EMBED, dims.Q_HEADS, dims.HEAD_DIM), **kw)
        # Static choices (llama32_jax.nn.attend.set_attention_impl, sharding.shard_model).
        self.attention_impl = "auto"
        self.placement = None

    def __call__(self, x: jax.Array, step: StepInputs, kv: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
        """``step``: RoPE tables, the visible key slots and the cache slot to write (:func:`token_positions`).
        ``kv``: None (no cache) or this layer's view of the cache, which comes back with the tokens written."""
        span = step.span
        q = apply_rope(self.wq(x), step.cos, step.sin)  # [B, T, N, H]
        k = apply_rope(self.wk(x), step.cos, step.sin).transpose(0, 2, 1, 3)  # [B, K, T, H]
        v = self.wv(x).transpose(0, 2, 1, 3)  # [B, K, T, H]
        if kv is None:
            keys, values = k, v
        else:
            kv, keys, values = kv.write(k, v, step.index)
        out = self_attend(  # [B, T, N, H]
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            q_offset=span.q_offset,
            kv_start=span.kv_start,
            kv_end=span.kv_end,
            segment_ids=span.segments,
            impl=self.attention_impl,
            placement=self.placement,
            cached=kv is not None,
        )
        return self.wo(out), kv


class FeedForward(nnx.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1 = HF gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, dim: int, hidden: int, *, dtype, stack: int | None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, stack=stack, rngs=rngs)
        self.w1 = Einsum("btd,fd->btf", (hidden, dim), (dims.MLP, dims.EMBED), **kw)
        self.w3 = Einsum("btd,fd->btf", (hidden, dim), (dims.MLP, dims.EMBED), **kw)
        self.w2 = Einsum("btf,df->btd", (dim, hidden), (dims.EMBED, dims.MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, cfg: TextConfig, *, dtype, stack: int | None = None, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype, stack=stack, rngs=rngs)
        self.attention = SelfAttention(cfg, dtype=dtype, stack=stack, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype, stack=stack, rngs=rngs)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, dtype=dtype, stack=stack, rngs=rngs)

    def __call__(self, x, step: StepInputs, kv: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
        attn_out, new_kv = self.attention(self.attention_norm(x), step, kv)
        h = x + attn_out
        return h + self.feed_forward(self.ffn_norm(h)), new_kv


class Transformer(nnx.Module):
    """The Llama 3.2 causal language model (1B / 3B, Llama Guard 3 1B, and any HF ``llama`` config).

    ``model(tokens)`` returns fp32 logits ``[B, T, V]``; ``model(tokens, cache)`` also writes the tokens' keys and
    values at ``cache.index`` (prefill of ``T`` tokens, or ``T = 1`` decode) and returns the advanced cache.
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        if config.is_vision:
            raise InvalidInputError(f"{config.name} is a vision model; Transformer is the text-only model")
        t = config.text
        self.config = config
        self.embed = Embed(t.vocab_size, t.dim, dtype=param_dtype, rngs=rngs)
        if config.scan_layers:
            self.layers = DecoderBlock(t, dtype=param_dtype, stack=t.n_layers, rngs=rngs)
        else:
            self.layers = nnx.List([DecoderBlock(t, dtype=param_dtype, rngs=rngs) for _ in range(t.n_layers)])
        self.norm = RMSNorm(t.dim, t.norm_eps, dtype=param_dtype, rngs=rngs)
        if not t.tie_embeddings:
            self.lm_head = make_param(rngs, (t.vocab_size, t.dim), (dims.VOCAB, dims.EMBED), param_dtype)
        # Weight-only quantization (llama32_jax.models.quantize): what was quantized, and the head's own state.
        self.quant_config = None
        self.head_quant = None
        self.lm_head_scale = nnx.data(None)
        # Set by llama32_jax.sharding.shard_model: the plan + mesh that activations and caches are constrained to.
        self.placement = None
        self.remat = "none"  # activation checkpointing per block in training (REMAT_POLICIES)

    def __call__(
        self,
        tokens: jax.Array,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Args: ``tokens [B, T]`` int. Returns ``(logits [B, T, V] fp32, new cache or None)``.

        ``last_only=True`` computes the head for the last position only (``[B, 1, V]``): generation needs no more,
        and with left padding the last slot holds every sequence's last prompt token. Packed training rows (no
        cache) pass ``positions [B, T]`` (RoPE positions, restarting in each packed sequence) and ``segment_ids [B,
        T]`` (tokens attend only within their segment; :mod:`llama32_jax.training.data`).
        """
        step = token_positions(self.config, tokens, cache, positions, segment_ids)
        h = constrain_activation(self.placement, self.embed(tokens))  # [B, T, D]
        h, new_kv = self._run_layers(h, step, cache)
        if self.config.text.tie_embeddings:
            head = self.embed.attend
        else:
            head = lambda h: head_logits(h, self.lm_head, self.lm_head_scale, self.head_quant)  # noqa: E731
        return decoder_output(self, head, h, cache, new_kv, step.index + tokens.shape[1], last_only=last_only)

    def _run_layers(self, h, step: StepInputs, cache: KVCache | None):
        if self.config.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def block(h, layer_state, kv):
                h, new_kv = call_block(nnx.merge(graphdef, layer_state), self.remat, h, step, kv)
                return constrain_activation(self.placement, h), new_kv

            if cache is None:
                h, _ = jax.lax.scan(lambda h, layer_state: block(h, layer_state, None), h, state)
                return h, None
            return scan_with_cache(block, h, state, cache)
        return run_unrolled(self.layers, h, step, cache, self.placement, remat=self.remat)


def head_logits(h: jax.Array, lm_head: nnx.Param, scale: nnx.Param | None = None, quant=None) -> jax.Array:
    """The untied output head: ``h [B, T, D]`` times ``lm_head [V, D]`` -> fp32 logits ``[B, T, V]``.

    ``quant``: ``(mode, group)`` when ``lm_head`` holds quantized values and ``scale`` their scales
    (:mod:`llama32_jax.models.quantize`)."""
    if quant is not None:
        mode, group = quant
        v = lm_head.shape[0]
        s2 = scale[...].reshape((v,) if mode == "int8" else (v, -1))
        return qlinear(h, lm_head[...], s2, mode, group, out_dtype=jnp.float32)
    return jnp.einsum("btd,vd->btv", h, lm_head[...], preferred_element_type=jnp.float32)


def decoder_output(model: nnx.Module, head, h, cache: KVCache | None, new_kv, next_index, *, last_only: bool):
    """The text and vision decoders' common tail: the final norm and output ``head`` -> fp32 logits, and the cache
    with the layers' new buffers ``new_kv = (k, v)`` and ``index = next_index`` (``(logits, None)`` without one)."""
    if last_only:
        h = h[:, -1:]
    logits = head(model.norm(h))
    if cache is None:
        return logits, None
    new_cache = dataclasses.replace(cache, k=new_kv[0], v=new_kv[1], index=next_index)
    return logits, constrain_cache(model.placement, new_cache)


def run_unrolled(layers, h, step: StepInputs, cache: KVCache | None, placement, before_layer=None, remat="none"):
    """The unrolled layout: a Python loop over per-layer blocks and cache buffers; returns ``(h, new (k, v))``
    (``(h, None)`` without a cache).

    ``before_layer(i, h) -> h`` runs ahead of layer ``i`` (the vision decoder's cross-attention blocks)."""
    new_k, new_v = [], []
    for i, block in enumerate(layers):
        if before_layer is not None:
            h = before_layer(i, h)
        h, kv = call_block(block, remat, h, step, None if cache is None else cache.layer(i))
        h = constrain_activation(placement, h)
        if kv is not None:
            new_k.append(kv.k)
            new_v.append(kv.v)
    return h, None if cache is None else (tuple(new_k), tuple(new_v))


def scan_with_cache(block, h, stacked_state, cache: KVCache):
    """``lax.scan`` of ``block(h, layer_state, LayerCache) -> (h, LayerCache)`` over stacked layers, with the
    stacked ``[L, ...]`` cache carried: each layer writes its new tokens into it in place and reads its own slice.
    Returns ``(h, new (k, v))``.

    Feeding the cache as scan inputs and collecting the new one as outputs made XLA hold several full copies of it
    (measured: 3.5x the cache in temporaries for a 1B decode step at 128K slots); carried, it stays one buffer.
    """
    n = jax.tree.leaves(stacked_state)[0].shape[0]

    def body(carry, xs):
        h, k_all, v_all = carry
        layer_state, i = xs
        h, kv = block(h, layer_state, LayerCache(k_all, v_all, i))
        return (h, kv.k, kv.v), None

    (h, k, v), _ = jax.lax.scan(body, (h, cache.k, cache.v), (stacked_state, jnp.arange(n)))
    return h, (k, v)


def token_positions(
    config: ModelConfig,
    tokens: jax.Array,
    cache: KVCache | None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> StepInputs:
    """Where ``tokens [B, T]`` go: the :class:`StepInputs` every layer reads.

    Without a cache the tokens are a whole (unpadded) sequence, or packed sequences when ``positions`` /
    ``segment_ids`` are given; with a cache they are written at ``cache.index`` and each sequence's positions
    count from its first valid slot ``cache.start`` (left padding).
    """
    t = config.text
    if tokens.ndim != 2:
        raise InvalidInputError(f"tokens must be [batch, length], got shape {tokens.shape}")
    b, length = tokens.shape
    if cache is None:
        start = jnp.zeros((b,), jnp.int32)
        index = jnp.zeros((), jnp.int32)
    else:
        check_cache(cache, config, b, length)
        start, index = cache.start, cache.index
    if cache is not None and (positions is not None or segment_ids is not None):
        raise InvalidInputError("positions / segment_ids are for packed training rows, which use no cache")
    for name, x in (("positions", positions), ("segment_ids", segment_ids)):
        if x is not None and (x.shape != (b, length) or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise InvalidInputError(
                f"{name} must be an integer array of the tokens' shape {(b, length)}, got {x.shape}"
            )
    if index.ndim == 1:  # a slot cache: every row at its own slot, one token per call (check_cache)
        q_offset = jnp.max(index)  # the kv_end bound below is each row's causal limit; this one hides nothing more
        q_slots = index[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]  # [B, T]
    else:
        q_offset = index
        q_slots = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (b, length))
    if positions is None:
        positions = q_slots - start[:, None]  # [B, T]
    cos, sin = rope_angles(positions, inv_frequencies(t.head_dim, t.rope_theta, t.rope_scaling))
    # Keys past this call's last token are not written yet (causality hides them too; the bound lets kernels stop).
    end = jnp.broadcast_to(index + length, (b,)).astype(jnp.int32)
    segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return StepInputs(positions, cos, sin, SlotSpan(q_offset, start, end, segments), index)


def check_cache(cache: KVCache, config: ModelConfig, batch: int, length: int) -> None:
    """Raise :class:`InvalidInputError` if ``length`` new tokens of ``batch`` sequences cannot go into ``cache``."""
    if cache.stacked != config.scan_layers:
        layout = "stacked" if cache.stacked else "per-layer"
        raise InvalidInputError(
            f"cache layout is {layout} but config.scan_layers={config.scan_layers}; "
            "build it with KVCache.init(config, ...)"
        )
    if cache.batch_size != batch:
        raise InvalidInputError(f"tokens have batch {batch} but the cache was built for batch {cache.batch_size}")
    if cache.per_slot and length != 1:
        raise InvalidInputError(
            f"a cache with one write index per sequence takes one token per call, got {length}; prefill into a "
            "cache with a shared index and insert it (llama32_jax.inference.engine)"
        )
    try:
        used = int(jnp.max(cache.index))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        used = None  # traced (inside jit): the caller validated it before tracing
    if used is not None:
        if used + length > cache.max_len:
            raise InvalidInputError(
                f"{length} new tokens do not fit the cache: {used} of {cache.max_len} slots are used"
            )


# --------------------------------------------------------------------------------------------------------------
# Parameter layouts.


# The decoder's layer lists: self-attention layers, and the vision models' cross-attention blocks.
LAYER_LISTS = ("layers", "cross_layers")


def stack_layers(params: dict) -> dict:
    """Per-layer tree ``{"layers": {0: {...}, 1: {...}}}`` -> stacked ``{"layers": {...}}`` (leading ``L`` axis).

    The vision models' ``cross_layers`` are stacked the same way (leading ``C`` axis)."""
    out = dict(params)
    for name in LAYER_LISTS:
        if name not in params:
            continue
        layers = params[name]
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise InvalidInputError(f"per-layer {name} parameters must be indexed 0..{n - 1}, got {sorted(layers)}")
        out[name] = jax.tree.map(_stack, *[layers[i] for i in range(n)])
    return out


def _stack(*xs):
    """Device arrays (possibly sharded, e.g. restored into a plan) stack on device; host arrays on the host."""
    if all(isinstance(x, jax.Array) for x in xs):
        return jnp.stack(xs)
    return np.stack([np.asarray(x) for x in xs])


def unstack_layers(params: dict) -> dict:
    """Stacked tree -> per-layer tree; the inverse of :func:`stack_layers`."""
    out = dict(params)
    for name in LAYER_LISTS:
        if name not in params:
            continue
        layers = params[name]
        n = {int(np.shape(x)[0]) for x in jax.tree.leaves(layers)}
        if len(n) != 1:
            raise InvalidInputError(f"stacked {name} parameters disagree on the layer count: {sorted(n)}")
        (n,) = n
        out[name] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
    return out
