"""The Mllama cross-attention block: text queries over projected vision tokens (docs/model-facts.md §4.1, §4.3).

``a = attention_norm(x)``; ``q = q_norm(Wq a)`` per head; ``k = k_norm(Wk V)``, ``v = Wv V`` from the vision tokens
``V`` (computed once per image set: :meth:`CrossAttentionBlock.vision_kv`, then reused by every decode step);
``o = softmax(q k^T / sqrt(H) + mask) v``; ``h = x + tanh(gate_attn) * row * Wo o``;
``out = h + tanh(gate_ffwd) * row * FFN(ffn_norm(h))``. ``row`` is the text-row mask: rows that see no image tile
take nothing from the block (Meta zeroes both branches; HF only the FFN, docs/model-facts.md §4.3 — Meta is followed).
No RoPE.

Parameters (our layout, as the checkpoint converter writes them under ``cross_layers.{j}``): ``attention_norm``,
``attention.{wq [N, H, D], wk/wv [K, H, D], wo [D, N, H]}.kernel``, ``attention.{q_norm, k_norm}.weight [H]``,
``ffn_norm``, ``feed_forward.{w1, w3 [F, D], w2 [D, F]}.kernel``, ``gate_attn [1]``, ``gate_ffwd [1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama32_jax import dims
from llama32_jax.configs.base import TextConfig
from llama32_jax.models.text import FeedForward
from llama32_jax.nn.attend import cross_attend
from llama32_jax.nn.layers import HeadsProjection, MergeHeadsProjection, RMSNorm, make_param

VisionKV = tuple[jax.Array, jax.Array]  # k, v: [B, K, N_v, H] each


class CrossAttention(nnx.Module):
    """GQA cross-attention with per-head RMSNorm on queries and keys (not values)."""

    def __init__(self, cfg: TextConfig, *, dtype, stack: int | None = None, rngs: nnx.Rngs):
        d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, stack=stack, rngs=rngs)
        self.wq = HeadsProjection((n, h, d), (dims.Q_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wk = HeadsProjection((k, h, d), (dims.KV_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wv = HeadsProjection((k, h, d), (dims.KV_HEADS, dims.HEAD_DIM, dims.EMBED), **kw)
        self.wo = MergeHeadsProjection((d, n, h), (dims.EMBED, dims.Q_HEADS, dims.HEAD_DIM), **kw)
        self.q_norm = RMSNorm(h, cfg.norm_eps, axis_name=dims.HEAD_DIM, **kw)
        self.k_norm = RMSNorm(h, cfg.norm_eps, axis_name=dims.HEAD_DIM, **kw)
        # Static choices (llama32_jax.nn.attend.set_attention_impl, sharding.shard_model).
        self.attention_impl = "auto"
        self.placement = None

    def vision_kv(self, vision_tokens: jax.Array) -> VisionKV:
        """``[B, N_v, D]`` projected vision tokens -> normed keys and values ``[B, K, N_v, H]``."""
        k = self.k_norm(self.wk(vision_tokens)).transpose(0, 2, 1, 3)
        v = self.wv(vision_tokens).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x: jax.Array, kv: VisionKV, tiles: jax.Array) -> jax.Array:
        """``x [B, T, D]`` (already normed), ``tiles [B, T, I, R]`` bool (which image tiles each row sees) ->
        ``[B, T, D]`` (before the row mask)."""
        q = self.q_norm(self.wq(x))  # [B, T, N, H]
        k, v = kv
        out = cross_attend(
            q, k.astype(q.dtype), v.astype(q.dtype), tiles, impl=self.attention_impl, placement=self.placement
        )
        return self.wo(out)


class CrossAttentionBlock(nnx.Module):
    """One tanh-gated cross-attention block (Meta ``CrossAttentionTransformerBlock``)."""

    def __init__(self, cfg: TextConfig, *, dtype, stack: int | None = None, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype, stack=stack, rngs=rngs)
        self.attention = CrossAttention(cfg, dtype=dtype, stack=stack, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype, stack=stack, rngs=rngs)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, dtype=dtype, stack=stack, rngs=rngs)
        # Gates start at zero (a block that adds nothing) as in both references; checkpoints replace them.
        self.gate_attn = make_param(rngs, (1,), (dims.GATE,), dtype, stack=stack, init="zeros")
        self.gate_ffwd = make_param(rngs, (1,), (dims.GATE,), dtype, stack=stack, init="zeros")

    def vision_kv(self, vision_tokens: jax.Array) -> VisionKV:
        return self.attention.vision_kv(vision_tokens)

    def __call__(self, x: jax.Array, kv: VisionKV, tiles: jax.Array, row_mask: jax.Array) -> jax.Array:
        """``x [B, T, D]``, ``kv`` from :meth:`vision_kv`, ``tiles [B, T, I, R]`` bool (the tile mask rows of these
        tokens; ``N_v = I * R * P``), ``row_mask [B, T]`` bool."""
        row = row_mask[..., None].astype(x.dtype)
        attn = self.attention(self.attention_norm(x), kv, tiles) * row
        h = x + jnp.tanh(self.gate_attn[...]).astype(x.dtype) * attn
        ffn = self.feed_forward(self.ffn_norm(h)) * row
        return h + jnp.tanh(self.gate_ffwd[...]).astype(x.dtype) * ffn
