"""The Mllama vision encoder (a ViT-H/14 over up to 4 tiles per image, with tile embeddings) and its projector.

The forward pass follows docs/model-facts.md §5 step by step; the semantics are Meta's (``llama_models``
``VisionEncoder`` and ``CrossAttentionTransformerVision``), with HF's precomputed per-aspect-ratio tile tables as the
parameter layout (the layout the checkpoint converter produces, see
:func:`~llama32_jax.checkpoint.convert_vision.vision_params_from_state_dict`).

Aspect ratios enter as HF ``aspect_ratio_ids``: ``1 + index`` into ``config.vision.supported_aspect_ratios``, and
``0`` for a padding image slot. Row 0 of the tile tables is zeros, and a padding slot keeps tile 0 unmasked in the
encoder's attention, exactly as HF's processor + model do. (Meta instead runs padding slots as ``(1, 1)`` images.
Either way those tokens are masked out of the text's cross-attention, so the choice never reaches the logits.)

Shapes (dimension letters of :mod:`llama32_jax.dims`): B batch, I images per sample, R tiles per image
(``max_num_tiles``), P tokens per tile (patches + CLS), W vision width, D text width. Inside the encoder the
``B * I`` images are one axis ``M``, and ``S = R * Pp`` is an image's whole token sequence, where ``Pp`` is ``P``
rounded up to a multiple of 8 (Meta: ``P + 8 - P % 8``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax import dims
from llama32_jax.configs.base import ModelConfig, VisionConfig

# Logical axis names of the vision parameters: defined in dims.py with the text model's (a sharding plan maps them
# onto mesh axes); the projector's output axis is the text width, ``dims.EMBED``.
from llama32_jax.dims import (
    ASPECT_RATIOS,
    PATCH,
    TILE_TOKENS,
    TILES,
    VISION_EMBED,
    VISION_FEATURES,
    VISION_HEAD_DIM,
    VISION_HEADS,
    VISION_MLP,
)
from llama32_jax.dims import VISION_GATE as GATE
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.nn.attention import attention
from llama32_jax.nn.layers import HeadsProjection, MergeHeadsProjection, flatten_tree, make_param, quantized_matmul

# --------------------------------------------------------------------------------------------------------------
# Pure functions.


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch ``F.layer_norm`` over the last axis, computed in fp32 and cast back to ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def num_pad_tokens(tokens_per_tile: int) -> int:
    """Zero tokens appended to each tile after ln_pre (docs/model-facts.md §5 step 5).

    Meta's ``expand_num_tokens_to_mult8`` pads ``8 - n % 8``: 7 for 1601, but a full 8 when ``n`` is already a
    multiple of 8, where HF pads 0. Pad tokens are visible to valid queries (step 6), so the count matters; we
    follow Meta. The two agree for every tile size of the published models.
    """
    return 8 - tokens_per_tile % 8


def unfold_patches(pixels: jax.Array, patch: int) -> jax.Array:
    """``[M, R, C, H, W] -> [M, R, (H/p)*(W/p), C*p*p]``: torch ``Unfold(p, stride=p)`` order.

    Patches are row-major over the grid; each patch's values are ordered ``(c, kh, kw)``, so a conv kernel
    ``(W, C, p, p)`` reshaped to ``(W, C*p*p)`` is the matching linear map (docs/model-facts.md §5 step 1).
    """
    m, r, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(m, r, c, gh, patch, gw, patch)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6)  # [M, R, gh, gw, C, p, p]
    return x.reshape(m, r, gh * gw, c * patch * patch)


def encoder_mask(valid_tiles: jax.Array, n_tiles: int, tokens: int, padded: int) -> jax.Array:
    """Which keys each query may see in an image's ``S = n_tiles * padded`` sequence: ``[M, S, S]`` bool.

    A token is *invalid* if it is one of a tile's pad tokens (index ``>= tokens``) or lies in a tile ``>=
    valid_tiles[m]``. Meta and HF add ``(m m^T) * finfo.min`` to the scores, which masks only invalid->invalid
    pairs: valid queries see everything, invalid queries see the valid keys (docs/model-facts.md §5 step 6).
    """
    tile = jnp.arange(n_tiles)[:, None]  # [R, 1]
    pos = jnp.arange(padded)[None, :]  # [1, Pp]
    valid = (tile[None] < valid_tiles[:, None, None]) & (pos[None] < tokens)  # [M, R, Pp]
    valid = valid.reshape(valid.shape[0], n_tiles * padded)  # [M, S]
    return valid[:, :, None] | valid[:, None, :]


# --------------------------------------------------------------------------------------------------------------
# Modules.


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with ``scale`` (ones) and ``bias`` (zeros), fp32 math (torch/HF default eps)."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), (VISION_EMBED,), dtype, init="ones")
        self.bias = make_param(rngs, (dim,), (VISION_EMBED,), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """``y = x @ kernel^T + bias`` over the last axis; kernel ``[out, in]`` (torch orientation)."""

    def __init__(self, n_out: int, n_in: int, axes: tuple[str, str], *, dtype, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, (n_out, n_in), axes, dtype)
        self.bias = make_param(rngs, (n_out,), axes[:1], dtype, init="zeros")
        self.quant = None  # weight-only quantization (llama32_jax.models.quantize); the bias stays float
        self.kernel_scale = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quant is not None:
            return quantized_matmul(x, self, self.kernel.shape[0]) + self.bias[...].astype(x.dtype)
        return jnp.einsum("...i,oi->...o", x, self.kernel[...]) + self.bias[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Meta's ``conv1`` (``Unfold`` + a bias-free Linear): unfolded patches ``[..., C*p*p]`` -> ``[..., W]``."""

    def __init__(self, width: int, n_in: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, (width, n_in), (VISION_EMBED, PATCH), dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return jnp.einsum("...c,wc->...w", patches, self.kernel[...])


class VisionAttention(nnx.Module):
    """Full multi-head attention, no biases: Wq/Wk/Wv ``[heads, H, W]``, Wo ``[W, heads, H]``, scale ``H**-0.5``."""

    def __init__(self, v: VisionConfig, *, dtype, rngs: nnx.Rngs):
        n, h, w = v.n_heads, v.width // v.n_heads, v.width
        kw = dict(dtype=dtype, rngs=rngs)
        self.wq = HeadsProjection((n, h, w), (VISION_HEADS, VISION_HEAD_DIM, VISION_EMBED), **kw)
        self.wk = HeadsProjection((n, h, w), (VISION_HEADS, VISION_HEAD_DIM, VISION_EMBED), **kw)
        self.wv = HeadsProjection((n, h, w), (VISION_HEADS, VISION_HEAD_DIM, VISION_EMBED), **kw)
        self.wo = MergeHeadsProjection((w, n, h), (VISION_EMBED, VISION_HEADS, VISION_HEAD_DIM), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [M, S, W]``, ``mask [M, S, S]`` bool -> ``[M, S, W]``; scores and softmax in fp32."""
        q = self.wq(x)  # [M, S, heads, H]
        k = self.wk(x).transpose(0, 2, 1, 3)  # [M, heads, S, H]
        v = self.wv(x).transpose(0, 2, 1, 3)  # [M, heads, S, H]
        return self.wo(attention(q, k, v, mask))


class VisionMLP(nnx.Module):
    """``fc2(gelu(fc1(x)))`` with biases; exact (erf) GELU."""

    def __init__(self, v: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(v.mlp_dim, v.width, (VISION_MLP, VISION_EMBED), dtype=dtype, rngs=rngs)
        self.fc2 = Linear(v.width, v.mlp_dim, (VISION_EMBED, VISION_MLP), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionBlock(nnx.Module):
    """Pre-norm block ``x += g_a * attn(ln_1(x)); x += g_f * mlp(ln_2(x))``; ``g = tanh(gate)`` if gated, else 1."""

    def __init__(self, v: VisionConfig, *, gated: bool, dtype, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(v.width, v.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = VisionAttention(v, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(v.width, v.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(v, dtype=dtype, rngs=rngs)
        self.gated = gated
        if gated:  # Meta initialises both gates to 0 (the block starts as the identity)
            self.gate_attn = make_param(rngs, (1,), (GATE,), dtype, init="zeros")
            self.gate_ffn = make_param(rngs, (1,), (GATE,), dtype, init="zeros")

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attn = self.attention(self.ln_1(x), mask)
        if self.gated:
            attn = jnp.tanh(self.gate_attn[...]).astype(x.dtype) * attn
        x = x + attn
        ffn = self.mlp(self.ln_2(x))
        if self.gated:
            ffn = jnp.tanh(self.gate_ffn[...]).astype(x.dtype) * ffn
        return x + ffn


class VisionStack(nnx.Module):
    """``layers.{n}``: a Python-unrolled stack of :class:`VisionBlock` (per-layer parameters, as converted)."""

    def __init__(self, v: VisionConfig, n_layers: int, *, gated: bool, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionBlock(v, gated=gated, dtype=dtype, rngs=rngs) for _ in range(n_layers)])

    def __call__(
        self, x: jax.Array, mask: jax.Array, capture: tuple[int, ...] = ()
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Run every block; also return the *input* of each block whose index is in ``capture``, in layer order
        (Meta ``ImageTransformer.forward``: the residual stream after ``idx`` blocks)."""
        captured = []
        for idx, block in enumerate(self.layers):
            if idx in capture:
                captured.append(x)
            x = block(x, mask)
        return x, captured


class TileEmbedding(nnx.Module):
    """A gated per-tile embedding, precomputed per aspect-ratio id: ``embedding [R+1, R, W]``, ``gate [1]``.

    Adds ``tanh(gate) * embedding[id, tile]`` to every token of each tile (Meta ``TilePositionEmbedding`` with
    ``gated=True``; rows hold ``grid[:h, :w]`` in row-major tile order, zeros elsewhere and in row 0).
    """

    def __init__(self, v: VisionConfig, *, dtype, rngs: nnx.Rngs):
        rows = len(v.supported_aspect_ratios) + 1
        self.embedding = make_param(rngs, (rows, v.max_num_tiles, v.width), (ASPECT_RATIOS, TILES, VISION_EMBED), dtype)
        self.gate = make_param(rngs, (1,), (GATE,), dtype, init="zeros")

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """``x [M, R, tokens, W]``, ``aspect_ratio_ids [M]`` -> same shape."""
        embed = jnp.take(self.embedding[...], aspect_ratio_ids, axis=0)  # [M, R, W]
        return x + (embed * jnp.tanh(self.gate[...])).astype(x.dtype)[:, :, None, :]


class GatedPositionalEmbedding(nnx.Module):
    """The gated tile-position part of docs/model-facts.md §5 step 4: ``tile_embedding [R+1, R, P, W]`` and
    ``gate [1]``.

    (The plain ``positional_embedding [P, W]``, weighted by ``1 - tanh(gate)``, is the encoder's own parameter, as in
    Meta's module tree and our checkpoint layout.)
    """

    def __init__(self, v: VisionConfig, *, dtype, rngs: nnx.Rngs):
        rows = len(v.supported_aspect_ratios) + 1
        shape = (rows, v.max_num_tiles, v.tokens_per_tile, v.width)
        self.tile_embedding = make_param(rngs, shape, (ASPECT_RATIOS, TILES, TILE_TOKENS, VISION_EMBED), dtype)
        self.gate = make_param(rngs, (1,), (GATE,), dtype, init="zeros")


class VisionEncoder(nnx.Module):
    """The vision encoder (our tree's ``vision.*``): pixels -> features ``[B, I, R, P, W * (K + 1)]``.

    ``K = len(intermediate_layers)``. Features are ``concat([final (W), interleaved intermediates (W*K)])`` with
    ``intermediates[..., c * K + k]`` = channel ``c`` of the ``k``-th captured layer (docs/model-facts.md §5 step 11).
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        if config.vision is None:
            raise InvalidInputError(f"{config.name} is a text model; it has no vision encoder")
        v = self.vcfg = config.vision
        kw = dict(dtype=param_dtype, rngs=rngs)
        n_in = v.num_channels * v.patch_size**2
        self.patch_embed = PatchEmbed(v.width, n_in, dtype=param_dtype, rngs=rngs)
        self.class_embedding = make_param(rngs, (v.width,), (VISION_EMBED,), param_dtype)
        self.positional_embedding = make_param(
            rngs, (v.tokens_per_tile, v.width), (TILE_TOKENS, VISION_EMBED), param_dtype
        )
        self.gated_positional_embedding = GatedPositionalEmbedding(v, **kw)
        self.pre_tile_pos_embed = TileEmbedding(v, **kw)
        self.post_tile_pos_embed = TileEmbedding(v, **kw)
        self.ln_pre = LayerNorm(v.width, v.norm_eps, **kw)
        self.ln_post = LayerNorm(v.width, v.norm_eps, **kw)
        self.transformer = VisionStack(v, v.n_layers, gated=False, **kw)
        self.global_transformer = VisionStack(v, v.n_global_layers, gated=True, **kw)

    def __call__(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """Args: ``pixel_values [B, I, R, C, H, W]`` (normalised tiles, zeros for missing tiles / images),
        ``aspect_ratio_ids [B, I]`` int (``1 + index`` into ``supported_aspect_ratios``, 0 = padding image).

        Returns ``[B, I, R, P, W * (K + 1)]`` in the parameter dtype.
        """
        v = self.vcfg
        check_vision_inputs(v, pixel_values, aspect_ratio_ids)
        b, n_img, n_tiles = pixel_values.shape[:3]
        dtype = self.class_embedding.dtype
        ids = aspect_ratio_ids.reshape(b * n_img).astype(jnp.int32)  # [M]
        m = b * n_img

        # 1. Patch embedding: [M, R, patches, C*p*p] @ [W, C*p*p]^T.
        patches = unfold_patches(pixel_values.reshape(m, *pixel_values.shape[2:]).astype(dtype), v.patch_size)
        x = self.patch_embed(patches)  # [M, R, patches, W]
        # 2. Pre-tile embedding on the patch tokens.
        x = self.pre_tile_pos_embed(x, ids)
        # 3. CLS first.
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (m, n_tiles, 1, v.width))
        x = jnp.concatenate([cls, x], axis=2)  # [M, R, P, W]
        # 4. Positional embedding, (1 - tanh g) on every tile, plus tanh(g) * the aspect ratio's tile table.
        gpe = self.gated_positional_embedding
        g = jnp.tanh(gpe.gate[...])
        x = x + (self.positional_embedding[...] * (1 - g)).astype(dtype)
        x = x + (jnp.take(gpe.tile_embedding[...], ids, axis=0) * g).astype(dtype)  # [M, R, P, W]
        # 5. ln_pre, then pad each tile with zero tokens to Pp.
        x = self.ln_pre(x)
        tokens, npad = v.tokens_per_tile, num_pad_tokens(v.tokens_per_tile)
        padded = tokens + npad
        x = jnp.pad(x, ((0, 0), (0, 0), (0, npad), (0, 0)))  # [M, R, Pp, W]
        # 6. Mask over each image's whole sequence. A padding image keeps tile 0 (HF's aspect_ratio_mask).
        mask = encoder_mask(jnp.asarray(valid_tiles_table(v))[ids], n_tiles, tokens, padded)  # [M, S, S]
        # 7. Local layers, all tiles of an image jointly; capture the inputs of the intermediate layers.
        x = x.reshape(m, n_tiles * padded, v.width)  # [M, S, W]
        x, captured = self.transformer(x, mask, capture=tuple(v.intermediate_layers))
        # 8. ln_post, post-tile embedding on every token of the tile (CLS and pads included).
        x = self.ln_post(x).reshape(m, n_tiles, padded, v.width)
        x = self.post_tile_pos_embed(x, ids).reshape(m, n_tiles * padded, v.width)
        # 9. Gated global layers, same mask; no final norm.
        x, _ = self.global_transformer(x, mask)
        # 10. Drop the pad tokens.
        x = x.reshape(m, n_tiles, padded, v.width)[:, :, :tokens]  # [M, R, P, W]
        inter = jnp.stack(captured, axis=-1)  # [M, S, W, K]: stacked on a new last axis, so channels interleave
        inter = inter.reshape(m, n_tiles, padded, v.width * len(captured))[:, :, :tokens]  # [M, R, P, W*K]
        # 11. Final features first, then the interleaved intermediates.
        out = jnp.concatenate([x, inter], axis=-1)  # [M, R, P, W*(K+1)]
        return out.reshape(b, n_img, n_tiles, tokens, out.shape[-1])


class VisionTower(nnx.Module):
    """Vision encoder + projector: our tree's ``vision.*`` and ``projector.{kernel [D, O], bias [D]}``.

    ``tower(pixel_values [B, I, R, C, H, W], aspect_ratio_ids [B, I])`` returns the vision tokens the text model's
    cross-attention reads, ``[B, I, R, P, D]`` (Meta ``CrossAttentionTransformerVision.forward``;
    docs/model-facts.md §4.4).
    """

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.vision = VisionEncoder(config, param_dtype=param_dtype, rngs=rngs)
        v = config.vision
        self.projector = Linear(
            config.text.dim, v.output_dim, (dims.EMBED, VISION_FEATURES), dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        return self.projector(self.vision(pixel_values, aspect_ratio_ids))


# --------------------------------------------------------------------------------------------------------------
# Inputs.


def valid_tiles_table(v: VisionConfig) -> np.ndarray:
    """Unmasked tiles per aspect-ratio id: ``[1, h*w for (h, w) in supported_aspect_ratios]`` (id 0 keeps tile 0)."""
    return np.array([1] + [h * w for h, w in v.supported_aspect_ratios], dtype=np.int32)


def aspect_ratio_ids(v: VisionConfig, ratios) -> np.ndarray:
    """``(tiles_h, tiles_w)`` pairs ``[..., 2]`` (Meta's ``aspect_ratios``) -> HF ids ``[...]``; ``(0, 0)`` -> 0."""
    ratios = np.asarray(ratios, dtype=np.int64)
    if ratios.shape[-1:] != (2,):
        raise InvalidInputError(f"aspect ratios must be (tiles_h, tiles_w) pairs [..., 2], got shape {ratios.shape}")
    lookup = {tuple(r): i for i, r in enumerate(v.supported_aspect_ratios, start=1)} | {(0, 0): 0}
    flat = [tuple(int(x) for x in r) for r in ratios.reshape(-1, 2)]
    bad = sorted({r for r in flat if r not in lookup})
    if bad:
        raise InvalidInputError(f"aspect ratios {bad} are not supported; valid: {list(v.supported_aspect_ratios)}")
    return np.array([lookup[r] for r in flat], dtype=np.int32).reshape(ratios.shape[:-1])


def check_vision_inputs(v: VisionConfig, pixel_values: Any, ids: Any) -> None:
    """Raise :class:`InvalidInputError` unless the shapes (and, when concrete, the ids) fit ``v``."""
    want = (v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
    if np.ndim(pixel_values) != 6 or tuple(np.shape(pixel_values)[2:]) != want:
        raise InvalidInputError(
            f"pixel_values must be [batch, images, {', '.join(map(str, want))}], got shape {np.shape(pixel_values)}"
        )
    if tuple(np.shape(ids)) != tuple(np.shape(pixel_values)[:2]):
        raise InvalidInputError(
            f"aspect_ratio_ids must be [batch, images] = {list(np.shape(pixel_values)[:2])}, got {np.shape(ids)}"
        )
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise InvalidInputError(f"aspect_ratio_ids must be integers, got {jnp.result_type(ids)}")
    try:
        concrete = np.asarray(ids)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced: the caller validated it before tracing
    n = len(v.supported_aspect_ratios)
    if concrete.size and (concrete.min() < 0 or concrete.max() > n):
        raise InvalidInputError(f"aspect_ratio_ids must be in [0, {n}] (0 = padding image), got {concrete.tolist()}")


# --------------------------------------------------------------------------------------------------------------
# Building and loading.


def abstract_vision_tower(config: ModelConfig, *, param_dtype=jnp.bfloat16) -> VisionTower:
    """The tower with ``jax.ShapeDtypeStruct`` leaves (shapes, dtypes, axes; nothing allocated)."""
    return nnx.eval_shape(lambda: VisionTower(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _names(paths) -> str:
    shown = sorted(".".join(map(str, p)) for p in paths)
    return f"{shown[:8]}{' ...' if len(shown) > 8 else ''}"


def load_vision_params(config: ModelConfig, params: Mapping, *, param_dtype=jnp.bfloat16) -> VisionTower:
    """Build a :class:`VisionTower` from ``{"vision": ..., "projector": ...}`` (our converted tree), strictly.

    Every parameter must be present with the right shape and nothing else may be given (pass only these two
    subtrees of a whole-model tree), else :class:`~llama32_jax.errors.CheckpointError` names the path(s).
    """
    others = sorted(str(k) for k in params if k not in ("vision", "projector"))
    if others:
        raise CheckpointError(
            f"unexpected vision parameters for {config.name}: top-level entries {others[:8]}; pass only the "
            "'vision' and 'projector' subtrees of a whole-model tree"
        )
    graphdef, state = nnx.split(abstract_vision_tower(config, param_dtype=param_dtype))
    target = flatten_tree(nnx.to_pure_dict(state))
    given = flatten_tree(params)
    missing, unused = target.keys() - given.keys(), given.keys() - target.keys()
    if missing:
        raise CheckpointError(f"vision parameters missing for {config.name}: {_names(missing)}")
    if unused:
        raise CheckpointError(f"unexpected vision parameters for {config.name}: {_names(unused)}")
    nested: dict = {}
    for path, spec in target.items():
        value = given[path]
        if tuple(np.shape(value)) != tuple(spec.shape):
            raise CheckpointError(
                f"parameter {'.'.join(map(str, path))}: shape {tuple(np.shape(value))} does not match the model's "
                f"{tuple(spec.shape)}"
            )
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=spec.dtype)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _tower_forward(graphdef, state, pixel_values, ids):
    return nnx.merge(graphdef, state)(pixel_values, ids)


def vision_tokens(tower: VisionTower, pixel_values: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
    """Jitted ``tower(pixel_values, aspect_ratio_ids)`` -> ``[B, I, R, P, D]``, validated before tracing."""
    check_vision_inputs(tower.vision.vcfg, pixel_values, aspect_ratio_ids)
    graphdef, state = nnx.split(tower)
    return _tower_forward(graphdef, state, jnp.asarray(pixel_values), jnp.asarray(aspect_ratio_ids))
