"""The Llama 3.2 Vision text decoder (Mllama): self-attention layers with cross-attention blocks interleaved.

Layer order (docs/model-facts.md §4.2, Meta's ``CrossAttentionTransformerText``): for each self-attention layer ``i`` in
the fusion schedule (``config.text.meta_fusion_schedule``), cross-attention block ``j`` runs first, then layer ``i``.
A call without images (``cross=None``) skips every cross-attention block, as both references do.

Two parameter layouts, as for the text model (``config.scan_layers``):

- unrolled: ``layers.{i}`` and ``cross_layers.{j}``, a Python loop (fastest decode on XLA:CPU);
- scanned: ``layers`` stacked ``[L, ...]`` and ``cross_layers`` stacked ``[C, ...]``, run as a ``lax.scan`` over
  ``C`` uniform groups ``[self x (k-1), cross, self]`` with ``k = L / C`` (``[self, self, self, cross, self]`` for
  11B and 90B: HF's merged 40/100-layer list cut into fives). Compile time stays flat in depth. Group ``g`` holds
  self layers ``k*g .. k*g+k-1`` and cross block ``g``, which is exactly Meta's fusion schedule (cross block ``j``
  before self layer ``k*j + k-1``; ``TextConfig`` requires ``L`` to be a multiple of ``C``).

Token ids ``>= vocab_size`` (the image token, 128256 in HF checkpoints) embed through the 8-row
``learnable_embedding`` (docs/model-facts.md §4.5); the output head stays ``vocab_size`` wide.

Images reach the decoder as :class:`CrossInputs`: each cross-attention block's keys and values over the vision
tokens (computed once, reused by every decode step) and a per-position tile mask for the whole sequence, prompt and
generated tokens (:mod:`llama32_jax.models.cross_mask`). Rows of the mask are looked up by each token's position,
so left padding and decoding need nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama32_jax import dims
from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import InvalidInputError
from llama32_jax.models.cross_attention import CrossAttentionBlock, VisionKV
from llama32_jax.models.text import (
    DecoderBlock,
    StepInputs,
    call_block,
    decoder_output,
    head_logits,
    run_unrolled,
    token_positions,
)
from llama32_jax.models.vision import VisionTower
from llama32_jax.nn.cache import KVCache, LayerCache
from llama32_jax.nn.layers import Embed, RMSNorm, make_param
from llama32_jax.sharding.placement import constrain_activation, constrain_cross


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CrossInputs:
    """What the cross-attention blocks need: ``kv[j]`` = block j's ``(k, v)`` ``[B, K, N_v, H]`` (scanned layout:
    one ``(k, v)`` pair stacked ``[C, B, K, N_v, H]``), and ``tile_mask [B, S_total, I, R]`` bool (by token
    position; :func:`cross_mask.dense_cross_attention_mask`)."""

    kv: tuple[VisionKV, ...] | VisionKV
    tile_mask: jax.Array
    tokens_per_tile: int = dataclasses.field(metadata=dict(static=True))


class CrossStep(NamedTuple):
    """One call's cross-attention inputs: every block's vision K/V (as in :class:`CrossInputs`), the tokens' rows
    of the tile mask ``tiles [B, T, I, R]``, and ``row_mask [B, T]`` (the tokens that see any tile)."""

    kv: tuple[VisionKV, ...] | VisionKV
    tiles: jax.Array
    row_mask: jax.Array


class MllamaText(nnx.Module):
    """The vision models' language model; ``model(tokens, cache, cross=...)`` -> ``(logits fp32, cache)``."""

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        if not config.is_vision:
            raise InvalidInputError(f"{config.name} is a text model; use llama32_jax.models.text.Transformer")
        t = config.text
        self.config = config
        self.embed = Embed(t.vocab_size, t.dim, dtype=param_dtype, rngs=rngs)
        self.learnable_embedding = make_param(
            rngs, (t.n_image_embeddings, t.dim), (dims.VOCAB, dims.EMBED), param_dtype
        )
        if config.scan_layers:
            self.layers = DecoderBlock(t, dtype=param_dtype, stack=t.n_layers, rngs=rngs)
            self.cross_layers = CrossAttentionBlock(t, dtype=param_dtype, stack=t.n_cross_attention_layers, rngs=rngs)
        else:
            self.layers = nnx.List([DecoderBlock(t, dtype=param_dtype, rngs=rngs) for _ in range(t.n_layers)])
            self.cross_layers = nnx.List(
                [CrossAttentionBlock(t, dtype=param_dtype, rngs=rngs) for _ in range(t.n_cross_attention_layers)]
            )
        self.norm = RMSNorm(t.dim, t.norm_eps, dtype=param_dtype, rngs=rngs)
        self.lm_head = make_param(rngs, (t.vocab_size, t.dim), (dims.VOCAB, dims.EMBED), param_dtype)
        self.quant_config = None  # weight-only quantization (llama32_jax.models.quantize)
        self.head_quant = None
        self.lm_head_scale = nnx.data(None)
        self.placement = None  # set by llama32_jax.sharding.shard_model
        self.remat = "none"  # activation checkpointing per block in training (text.REMAT_POLICIES)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Ids below ``vocab_size`` use the text table, the rest ``learnable_embedding[id - vocab_size]``."""
        v = self.config.text.vocab_size
        text = self.embed(jnp.minimum(tokens, v - 1))
        image = jnp.take(self.learnable_embedding[...], jnp.clip(tokens - v, 0, None), axis=0)
        return jnp.where((tokens >= v)[..., None], image.astype(text.dtype), text)

    def vision_kv(self, vision_tokens: jax.Array) -> tuple[VisionKV, ...] | VisionKV:
        """``[B, N_v, D]`` projected vision tokens -> every cross-attention block's keys and values (scanned
        layout: one stacked ``(k [C, ...], v [C, ...])`` pair)."""
        if self.config.scan_layers:
            graphdef, state = nnx.split(self.cross_layers)
            return jax.vmap(lambda s: nnx.merge(graphdef, s).vision_kv(vision_tokens))(state)
        return tuple(block.vision_kv(vision_tokens) for block in self.cross_layers)

    def __call__(
        self,
        tokens: jax.Array,
        cache: KVCache | None = None,
        *,
        cross: CrossInputs | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        step = token_positions(self.config, tokens, cache)
        b, length = tokens.shape
        positions = step.positions

        cross_args = None
        if cross is not None:
            rows = jnp.clip(positions, 0, cross.tile_mask.shape[1] - 1)  # left padding: any row (never read)
            tiles = jnp.take_along_axis(cross.tile_mask, rows[:, :, None, None], axis=1)  # [B, T, I, R]
            row_mask = tiles.reshape(b, length, -1).any(axis=-1) & (positions >= 0)
            cross_args = CrossStep(cross.kv, tiles, row_mask)

        h = constrain_activation(self.placement, self.embed_tokens(tokens))
        if self.config.scan_layers:
            h, new_kv = self._run_groups(h, step, cache, cross_args)
        else:
            h, new_kv = self._run_unrolled(h, step, cache, cross_args)
        head = lambda h: head_logits(h, self.lm_head, self.lm_head_scale, self.head_quant)  # noqa: E731
        return decoder_output(self, head, h, cache, new_kv, step.index + length, last_only=last_only)

    def _run_unrolled(self, h, step: StepInputs, cache, cross_args: CrossStep | None):
        schedule = self.config.text.meta_fusion_schedule

        def cross_block(i, h):  # cross-attention block j runs right before self-attention layer schedule[j]
            if cross_args is None or i not in schedule:
                return h
            j = schedule.index(i)
            h = call_block(self.cross_layers[j], self.remat, h, cross_args.kv[j], cross_args.tiles, cross_args.row_mask)
            return constrain_activation(self.placement, h)

        return run_unrolled(self.layers, h, step, cache, self.placement, cross_block, remat=self.remat)

    def _run_groups(self, h, step: StepInputs, cache, cross_args: CrossStep | None):
        """``lax.scan`` over the ``C`` groups ``[self x (k-1), cross, self]`` (stacked parameters; the stacked
        cache is carried and updated in place, as in :func:`llama32_jax.models.text.scan_with_cache`)."""
        t = self.config.text
        groups, k = t.n_cross_attention_layers, t.n_layers // t.n_cross_attention_layers
        self_def, self_state = nnx.split(self.layers)
        cross_def, cross_state = nnx.split(self.cross_layers)
        # Self layers are picked from the stacked [L, ...] weights by index: reshaping them to [C, k, ...] as scan
        # inputs made XLA copy every weight (+22 GB per device for 90B-Vision over 8 devices).
        xs = {"cross": None if cross_args is None else (cross_state, cross_args.kv), "group": jnp.arange(groups)}

        def body(carry, x):
            h, k_all, v_all = carry
            for i in range(k):
                if i == k - 1 and x["cross"] is not None:
                    block_state, vision_kv = x["cross"]
                    cross_block = nnx.merge(cross_def, block_state)
                    h = call_block(cross_block, self.remat, h, vision_kv, cross_args.tiles, cross_args.row_mask)
                    h = constrain_activation(self.placement, h)
                layer = x["group"] * k + i
                pick = lambda a, layer=layer: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)  # noqa: E731
                block = nnx.merge(self_def, jax.tree.map(pick, self_state))
                kv = None if k_all is None else LayerCache(k_all, v_all, layer)
                h, kv = call_block(block, self.remat, h, step, kv)
                h = constrain_activation(self.placement, h)
                if kv is not None:
                    k_all, v_all = kv.k, kv.v
            return (h, k_all, v_all), None

        carry = (h, None, None) if cache is None else (h, cache.k, cache.v)
        (h, k_all, v_all), _ = jax.lax.scan(body, carry, xs)
        return h, None if cache is None else (k_all, v_all)


class Mllama(MllamaText):
    """Llama 3.2 Vision: :class:`MllamaText` plus the vision tower (``vision.*``, ``projector``; vision.py).

    ``model.cross_inputs(pixel_values, aspect_ratio_ids, tile_mask)`` encodes a batch's images once and returns the
    :class:`CrossInputs` every later call (prefill and each decode step) reads; ``model(tokens, cache,
    cross=...)`` as in :class:`MllamaText`. Without images (``cross=None``) the cross-attention blocks are skipped.
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        super().__init__(config, param_dtype=param_dtype, rngs=rngs)
        tower = VisionTower(config, param_dtype=param_dtype, rngs=rngs)
        self.vision = tower.vision
        self.projector = tower.projector

    def encode_images(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """``[B, I, R, C, H, W]`` tiles + ``[B, I]`` aspect-ratio ids -> vision tokens ``[B, I, R, P, D]``."""
        return self.projector(self.vision(pixel_values, aspect_ratio_ids))

    def cross_inputs(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array, tile_mask: jax.Array) -> CrossInputs:
        """Encode the images and compute every cross-attention block's K/V (once per image set)."""
        tokens = self.encode_images(pixel_values, aspect_ratio_ids)
        b, _, _, p, d = tokens.shape
        cross = CrossInputs(self.vision_kv(tokens.reshape(b, -1, d)), jnp.asarray(tile_mask, bool), p)
        return constrain_cross(self.placement, cross)
