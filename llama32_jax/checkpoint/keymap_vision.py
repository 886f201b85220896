"""Key tables for the Llama 3.2 Vision (Mllama) checkpoints: Meta and HF names -> our parameter paths, and back.

Like the text tables in ``keymap.py`` these are data. A :class:`VisionRule` names one source tensor, the parameter
path(s) of ours it fills, the shape the source tensor must have (in the symbols of :func:`dims`), and a named
transform. ``"{i}"`` in a source key and in a target path stands for a layer index; ``index`` says which layer list
it counts. In Meta keys it is our index. In HF keys the text decoder is one merged list in which the
cross-attention layers sit at ``text.hf_cross_attention_layers`` and the self-attention layers fill the remaining
positions in order (docs/model-facts.md §1.3), so an HF text-layer key carries the merged position.

Our layout (nested dicts, int layer indices) is documented on
:func:`~llama32_jax.checkpoint.convert_vision.vision_params_from_state_dict`. Conventions
are the text model's: linear kernels keep torch's ``(out, in)`` orientation with the heads split out, and only
Meta's self-attention ``wq``/``wk`` get the RoPE row permutation: cross-attention and vision attention use no RoPE
(docs/model-facts.md §8.5). The tile position embeddings are precomputed per aspect-ratio id as HF stores them (row
0 zeros, row r the grid cells of ``supported_aspect_ratios[r-1]`` in row-major tile order, zero-padded to
max_num_tiles).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama32_jax.checkpoint import keymap
from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import CheckpointError

__all__ = [
    "HF_IN_MEMORY_PREFIXES",
    "HF_VISION",
    "META_VISION",
    "VisionRule",
    "dims",
    "expected_source_keys",
    "hf_stored_key",
]

Array = np.ndarray
Path = tuple[str, ...]


@dataclass(frozen=True)
class VisionRule:
    source: str
    targets: tuple[Path, ...]  # one path, or several for a source tensor that holds several of our parameters
    transform: str
    shape: tuple[str, ...]  # the source tensor's shape, in the symbols of dims()
    index: str | None = None  # the layer list "{i}" counts: one of INDEX_SPACES


# The layer lists a "{i}" can count, and how to name them in messages.
INDEX_SPACES = {
    "layer": "self-attention layer",
    "cross": "cross-attention layer",
    "vision": "local vision layer",
    "global": "global vision layer",
}


def dims(config: ModelConfig) -> dict[str, int]:
    """The size each shape symbol of the tables stands for, for ``config``."""
    t, v = config.text, config.vision
    n_tiles, width = v.max_num_tiles, v.width
    return {
        "1": 1,
        "V": t.vocab_size,
        "E": t.n_image_embeddings,
        "V+E": t.vocab_size + t.n_image_embeddings,
        "D": t.dim,
        "Q": t.n_heads * t.head_dim,
        "KV": t.n_kv_heads * t.head_dim,
        "H": t.head_dim,
        "F": t.ffn_dim,
        "W": width,
        "M": v.mlp_dim,
        "C": v.num_channels,
        "p": v.patch_size,
        "C*p*p": v.num_channels * v.patch_size**2,
        "P": v.tokens_per_tile,
        "T": n_tiles,
        "R+1": len(v.supported_aspect_ratios) + 1,
        "T*W": n_tiles * width,
        "T*P*W": n_tiles * v.tokens_per_tile * width,
        "O": v.output_dim,
    }


# --------------------------------------------------------------------------------------------------------------
# Transforms: pure functions (array, ModelConfig) -> array (a tuple for a multi-target rule), each with an inverse.


def _text(name: str) -> Callable[[Array, ModelConfig], Array]:
    fwd = keymap.TRANSFORMS[name]
    return lambda w, c: fwd(w, c.text)


def _text_inverse(name: str) -> Callable[[Array, ModelConfig], Array]:
    inv = keymap.INVERSE_TRANSFORMS[name]
    return lambda w, c: inv(w, c.text)


def _vision_heads(c: ModelConfig) -> tuple[int, int, int]:
    v = c.vision
    return v.n_heads, v.width // v.n_heads, v.width


def _precompute(grid: Array, c: ModelConfig) -> Array:
    """Meta's (G, G, *rest) tile grid -> HF's per-aspect-ratio table (R+1, max_tiles, *rest).

    Row 0 (padding images) is zeros; row r holds ``grid[:h, :w]`` for ``supported_aspect_ratios[r-1] = (h, w)``
    flattened in row-major tile order (Meta ``TilePositionEmbedding.forward``, ``apply_positional_embedding``),
    zero-padded to max_num_tiles.
    """
    v = c.vision
    table = np.zeros((len(v.supported_aspect_ratios) + 1, v.max_num_tiles, *grid.shape[2:]), dtype=grid.dtype)
    for r, (h, w) in enumerate(v.supported_aspect_ratios, start=1):
        table[r, : h * w] = grid[:h, :w].reshape(h * w, *grid.shape[2:])
    return table


def _unprecompute(table: Array, c: ModelConfig) -> Array:
    """Inverse of :func:`_precompute`: grid cells no supported aspect ratio reads are zeros.

    A table that is not the precomputation of any grid (rows that disagree on a shared cell, nonzero row 0 or
    padding tiles) has no Meta form; that is a :class:`CheckpointError`, never a silent choice.
    """
    v = c.vision
    grid = np.zeros((v.max_num_tiles, v.max_num_tiles, *table.shape[2:]), dtype=table.dtype)
    for r, (h, w) in enumerate(v.supported_aspect_ratios, start=1):
        grid[:h, :w] = table[r, : h * w].reshape(h, w, *table.shape[2:])
    if not np.array_equal(_precompute(grid, c), table):
        raise CheckpointError(
            "the per-aspect-ratio tile embedding table is not the precomputation of one Meta tile grid (rows "
            "disagree on a shared tile, or row 0 / padding tiles are nonzero), so it has no Meta form"
        )
    return grid


def _split_embedding(w: Array, c: ModelConfig) -> tuple[Array, Array]:
    """HF's (V+8, D) embed_tokens -> (our text embedding (V, D), our learnable_embedding (8, D))."""
    return w[: c.text.vocab_size], w[c.text.vocab_size :]


TRANSFORMS: dict[str, Callable[[Array, ModelConfig], Any]] = {
    **{name: _text(name) for name in ("identity", "q", "kv", "meta_q", "meta_k", "o")},
    # vision attention (no RoPE, no GQA): (W, W) -> (n_heads, head_dim, W) / wo (W, W) -> (W, n_heads, head_dim)
    "vision_qkv": lambda w, c: w.reshape(_vision_heads(c)),
    "vision_o": lambda w, c: w.reshape(c.vision.width, c.vision.n_heads, c.vision.width // c.vision.n_heads),
    # HF conv kernel (W, C, p, p) -> our (W, C*p*p); Meta's Unfold orders its C*p*p inputs (c, kh, kw) the same way
    "hf_patch": lambda w, c: w.reshape(w.shape[0], -1),
    # tile position embeddings: Meta grids are precomputed per aspect ratio; HF's tables are flat rows
    "meta_tile": lambda w, c: _precompute(w[:, :, 0, :], c),
    "meta_tile_pos": _precompute,
    "hf_tile": lambda w, c: w.reshape(w.shape[0], c.vision.max_num_tiles, c.vision.width),
    "hf_tile_pos": lambda w, c: w.reshape(w.shape[0], c.vision.max_num_tiles, c.vision.tokens_per_tile, c.vision.width),
    "hf_embed": _split_embedding,
}

INVERSE_TRANSFORMS: dict[str, Callable[[Any, ModelConfig], Array]] = {
    **{name: _text_inverse(name) for name in ("identity", "q", "kv", "meta_q", "meta_k", "o")},
    "vision_qkv": lambda w, c: w.reshape(c.vision.width, c.vision.width),
    "vision_o": lambda w, c: w.reshape(c.vision.width, c.vision.width),
    "hf_patch": lambda w, c: w.reshape(w.shape[0], c.vision.num_channels, c.vision.patch_size, c.vision.patch_size),
    "meta_tile": lambda w, c: _unprecompute(w, c)[:, :, None, :],
    "meta_tile_pos": _unprecompute,
    "hf_tile": lambda w, c: w.reshape(w.shape[0], -1),
    "hf_tile_pos": lambda w, c: w.reshape(w.shape[0], -1),
    "hf_embed": lambda ws, c: np.concatenate(ws, axis=0),
}


def target_shapes(transform: str, config: ModelConfig, source: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The shape of each of our parameters that ``transform`` makes from a source tensor of shape ``source``."""
    t, v = config.text, config.vision
    ratios, n_tiles = len(v.supported_aspect_ratios) + 1, v.max_num_tiles
    hv = v.width // v.n_heads
    shapes = {
        "identity": source,
        "q": (t.n_heads, t.head_dim, t.dim),
        "meta_q": (t.n_heads, t.head_dim, t.dim),
        "kv": (t.n_kv_heads, t.head_dim, t.dim),
        "meta_k": (t.n_kv_heads, t.head_dim, t.dim),
        "o": (t.dim, t.n_heads, t.head_dim),
        "vision_qkv": (v.n_heads, hv, v.width),
        "vision_o": (v.width, v.n_heads, hv),
        "hf_patch": (v.width, v.num_channels * v.patch_size**2),
        "meta_tile": (ratios, n_tiles, v.width),
        "hf_tile": (ratios, n_tiles, v.width),
        "meta_tile_pos": (ratios, n_tiles, v.tokens_per_tile, v.width),
        "hf_tile_pos": (ratios, n_tiles, v.tokens_per_tile, v.width),
    }
    if transform == "hf_embed":
        return (t.vocab_size, t.dim), (t.n_image_embeddings, t.dim)
    return (shapes[transform],)


# --------------------------------------------------------------------------------------------------------------
# The tables.


# The layer list a "{i}" counts, from where its target lives in our tree.
_INDEX_OF_TARGET = {
    ("layers",): "layer",
    ("cross_layers",): "cross",
    ("vision", "transformer"): "vision",
    ("vision", "global_transformer"): "global",
}


def _rule(source: str, target: Path, shape: tuple[str, ...], transform: str = "identity") -> VisionRule:
    index = None
    if "{i}" in source:
        (index,) = [space for prefix, space in _INDEX_OF_TARGET.items() if target[: len(prefix)] == prefix]
    return VisionRule(source, (target,), transform, shape, index)


_SELF = ("layers", "{i}")
_CROSS = ("cross_layers", "{i}")
_VIS = ("vision",)
_LOCAL = ("vision", "transformer", "layers", "{i}")
_GLOBAL = ("vision", "global_transformer", "layers", "{i}")


def _self_layer(prefix: str, names: dict[str, str], q: str, k: str) -> tuple[VisionRule, ...]:
    n = names
    return (
        _rule(prefix + n["attention_norm"], (*_SELF, "attention_norm", "weight"), ("D",)),
        _rule(prefix + n["wq"], (*_SELF, "attention", "wq", "kernel"), ("Q", "D"), q),
        _rule(prefix + n["wk"], (*_SELF, "attention", "wk", "kernel"), ("KV", "D"), k),
        _rule(prefix + n["wv"], (*_SELF, "attention", "wv", "kernel"), ("KV", "D"), "kv"),
        _rule(prefix + n["wo"], (*_SELF, "attention", "wo", "kernel"), ("D", "Q"), "o"),
        _rule(prefix + n["ffn_norm"], (*_SELF, "ffn_norm", "weight"), ("D",)),
        _rule(prefix + n["w1"], (*_SELF, "feed_forward", "w1", "kernel"), ("F", "D")),
        _rule(prefix + n["w3"], (*_SELF, "feed_forward", "w3", "kernel"), ("F", "D")),
        _rule(prefix + n["w2"], (*_SELF, "feed_forward", "w2", "kernel"), ("D", "F")),
    )


def _cross_layer(prefix: str, n: dict[str, str]) -> tuple[VisionRule, ...]:
    return (
        _rule(prefix + n["attention_norm"], (*_CROSS, "attention_norm", "weight"), ("D",)),
        _rule(prefix + n["wq"], (*_CROSS, "attention", "wq", "kernel"), ("Q", "D"), "q"),
        _rule(prefix + n["wk"], (*_CROSS, "attention", "wk", "kernel"), ("KV", "D"), "kv"),
        _rule(prefix + n["wv"], (*_CROSS, "attention", "wv", "kernel"), ("KV", "D"), "kv"),
        _rule(prefix + n["wo"], (*_CROSS, "attention", "wo", "kernel"), ("D", "Q"), "o"),
        _rule(prefix + n["q_norm"], (*_CROSS, "attention", "q_norm", "weight"), ("H",)),
        _rule(prefix + n["k_norm"], (*_CROSS, "attention", "k_norm", "weight"), ("H",)),
        _rule(prefix + n["ffn_norm"], (*_CROSS, "ffn_norm", "weight"), ("D",)),
        _rule(prefix + n["w1"], (*_CROSS, "feed_forward", "w1", "kernel"), ("F", "D")),
        _rule(prefix + n["w3"], (*_CROSS, "feed_forward", "w3", "kernel"), ("F", "D")),
        _rule(prefix + n["w2"], (*_CROSS, "feed_forward", "w2", "kernel"), ("D", "F")),
        _rule(prefix + n["gate_attn"], (*_CROSS, "gate_attn"), ("1",)),
        _rule(prefix + n["gate_ffwd"], (*_CROSS, "gate_ffwd"), ("1",)),
    )


def _vision_layer(prefix: str, n: dict[str, str], layer: Path, gated: bool) -> tuple[VisionRule, ...]:
    rules = (
        _rule(prefix + n["ln_1.weight"], (*layer, "ln_1", "scale"), ("W",)),
        _rule(prefix + n["ln_1.bias"], (*layer, "ln_1", "bias"), ("W",)),
        _rule(prefix + n["wq"], (*layer, "attention", "wq", "kernel"), ("W", "W"), "vision_qkv"),
        _rule(prefix + n["wk"], (*layer, "attention", "wk", "kernel"), ("W", "W"), "vision_qkv"),
        _rule(prefix + n["wv"], (*layer, "attention", "wv", "kernel"), ("W", "W"), "vision_qkv"),
        _rule(prefix + n["wo"], (*layer, "attention", "wo", "kernel"), ("W", "W"), "vision_o"),
        _rule(prefix + n["ln_2.weight"], (*layer, "ln_2", "scale"), ("W",)),
        _rule(prefix + n["ln_2.bias"], (*layer, "ln_2", "bias"), ("W",)),
        _rule(prefix + n["fc1.weight"], (*layer, "mlp", "fc1", "kernel"), ("M", "W")),
        _rule(prefix + n["fc1.bias"], (*layer, "mlp", "fc1", "bias"), ("M",)),
        _rule(prefix + n["fc2.weight"], (*layer, "mlp", "fc2", "kernel"), ("W", "M")),
        _rule(prefix + n["fc2.bias"], (*layer, "mlp", "fc2", "bias"), ("W",)),
    )
    if gated:
        rules += (
            _rule(prefix + n["gate_attn"], (*layer, "gate_attn"), ("1",)),
            _rule(prefix + n["gate_ffn"], (*layer, "gate_ffn"), ("1",)),
        )
    return rules


# Meta consolidated checkpoint (LM multimodal/model.py module tree; docs/model-facts.md §8.3).
_META_SELF = {
    "attention_norm": "attention_norm.weight",
    "wq": "attention.wq.weight",
    "wk": "attention.wk.weight",
    "wv": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "ffn_norm": "ffn_norm.weight",
    "w1": "feed_forward.w1.weight",
    "w3": "feed_forward.w3.weight",
    "w2": "feed_forward.w2.weight",
}
_META_CROSS = {
    **_META_SELF,
    "q_norm": "attention.q_norm.weight",
    "k_norm": "attention.k_norm.weight",
    "gate_attn": "gate_attn",
    "gate_ffwd": "gate_ffwd",
}
_META_VISION_LAYER = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "wq": "attn.wq.weight",
    "wk": "attn.wk.weight",
    "wv": "attn.wv.weight",
    "wo": "attn.wo.weight",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "fc1.weight": "mlp.c_fc.weight",
    "fc1.bias": "mlp.c_fc.bias",
    "fc2.weight": "mlp.c_proj.weight",
    "fc2.bias": "mlp.c_proj.bias",
    "gate_attn": "gate_attn",
    "gate_ffn": "gate_ffn",
}
_ME = "vision_model.vision_encoder."

META_VISION: tuple[VisionRule, ...] = (
    _rule("text_model.tok_embeddings.weight", ("embed", "embedding"), ("V", "D")),
    _rule("text_model.learnable_embedding.weight", ("learnable_embedding",), ("E", "D")),
    *_self_layer("text_model.layers.{i}.", _META_SELF, q="meta_q", k="meta_k"),
    *_cross_layer("text_model.cross_attention_layers.{i}.", _META_CROSS),
    _rule("text_model.norm.weight", ("norm", "weight"), ("D",)),
    _rule("text_model.output.weight", ("lm_head",), ("V", "D")),
    _rule(_ME + "conv1._linear.weight", (*_VIS, "patch_embed", "kernel"), ("W", "C*p*p")),
    _rule(_ME + "class_embedding", (*_VIS, "class_embedding"), ("W",)),
    _rule(_ME + "positional_embedding", (*_VIS, "positional_embedding"), ("P", "W")),
    _rule(
        _ME + "gated_positional_embedding",
        (*_VIS, "gated_positional_embedding", "tile_embedding"),
        ("T", "T", "P", "W"),
        "meta_tile_pos",
    ),
    _rule(_ME + "gated_positional_embedding_gate", (*_VIS, "gated_positional_embedding", "gate"), ("1",)),
    _rule(
        _ME + "pre_tile_pos_embed.embedding",
        (*_VIS, "pre_tile_pos_embed", "embedding"),
        ("T", "T", "1", "W"),
        "meta_tile",
    ),
    _rule(_ME + "pre_tile_pos_embed.gate", (*_VIS, "pre_tile_pos_embed", "gate"), ("1",)),
    _rule(
        _ME + "post_tile_pos_embed.embedding",
        (*_VIS, "post_tile_pos_embed", "embedding"),
        ("T", "T", "1", "W"),
        "meta_tile",
    ),
    _rule(_ME + "post_tile_pos_embed.gate", (*_VIS, "post_tile_pos_embed", "gate"), ("1",)),
    _rule(_ME + "ln_pre.weight", (*_VIS, "ln_pre", "scale"), ("W",)),
    _rule(_ME + "ln_pre.bias", (*_VIS, "ln_pre", "bias"), ("W",)),
    _rule(_ME + "ln_post.weight", (*_VIS, "ln_post", "scale"), ("W",)),
    _rule(_ME + "ln_post.bias", (*_VIS, "ln_post", "bias"), ("W",)),
    *_vision_layer(_ME + "transformer.resblocks.{i}.", _META_VISION_LAYER, _LOCAL, gated=False),
    *_vision_layer(_ME + "global_transformer.resblocks.{i}.", _META_VISION_LAYER, _GLOBAL, gated=True),
    _rule("vision_model.vision_projection.weight", ("projector", "kernel"), ("D", "O")),
    _rule("vision_model.vision_projection.bias", ("projector", "bias"), ("D",)),
)

# HF safetensors as stored on the hub (HF mllama converter; docs/model-facts.md §8.5). "{i}" of a text layer is its
# position in HF's merged decoder list.
_HF_SELF = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w3": "mlp.up_proj.weight",
    "w2": "mlp.down_proj.weight",
}
_HF_CROSS = {
    **_HF_SELF,
    "wq": "cross_attn.q_proj.weight",
    "wk": "cross_attn.k_proj.weight",
    "wv": "cross_attn.v_proj.weight",
    "wo": "cross_attn.o_proj.weight",
    "q_norm": "cross_attn.q_norm.weight",
    "k_norm": "cross_attn.k_norm.weight",
    "gate_attn": "cross_attn_attn_gate",
    "gate_ffwd": "cross_attn_mlp_gate",
}
_HF_VISION_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "fc1.weight": "mlp.fc1.weight",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.weight": "mlp.fc2.weight",
    "fc2.bias": "mlp.fc2.bias",
    "gate_attn": "gate_attn",
    "gate_ffn": "gate_ffn",
}
_HV = "vision_model."

HF_VISION: tuple[VisionRule, ...] = (
    VisionRule(
        "language_model.model.embed_tokens.weight",
        (("embed", "embedding"), ("learnable_embedding",)),
        "hf_embed",
        ("V+E", "D"),
    ),
    # Meta's wq/wk rows are already in HF's half-split RoPE order here (the HF converter permuted them).
    *_self_layer("language_model.model.layers.{i}.", _HF_SELF, q="q", k="kv"),
    *_cross_layer("language_model.model.layers.{i}.", _HF_CROSS),
    _rule("language_model.model.norm.weight", ("norm", "weight"), ("D",)),
    _rule("language_model.lm_head.weight", ("lm_head",), ("V", "D")),
    _rule(_HV + "patch_embedding.weight", (*_VIS, "patch_embed", "kernel"), ("W", "C", "p", "p"), "hf_patch"),
    _rule(_HV + "class_embedding", (*_VIS, "class_embedding"), ("W",)),
    _rule(_HV + "gated_positional_embedding.embedding", (*_VIS, "positional_embedding"), ("P", "W")),
    _rule(
        _HV + "gated_positional_embedding.tile_embedding.weight",
        (*_VIS, "gated_positional_embedding", "tile_embedding"),
        ("R+1", "T*P*W"),
        "hf_tile_pos",
    ),
    _rule(_HV + "gated_positional_embedding.gate", (*_VIS, "gated_positional_embedding", "gate"), ("1",)),
    _rule(
        _HV + "pre_tile_positional_embedding.embedding.weight",
        (*_VIS, "pre_tile_pos_embed", "embedding"),
        ("R+1", "T*W"),
        "hf_tile",
    ),
    _rule(_HV + "pre_tile_positional_embedding.gate", (*_VIS, "pre_tile_pos_embed", "gate"), ("1",)),
    _rule(
        _HV + "post_tile_positional_embedding.embedding.weight",
        (*_VIS, "post_tile_pos_embed", "embedding"),
        ("R+1", "T*W"),
        "hf_tile",
    ),
    _rule(_HV + "post_tile_positional_embedding.gate", (*_VIS, "post_tile_pos_embed", "gate"), ("1",)),
    _rule(_HV + "layernorm_pre.weight", (*_VIS, "ln_pre", "scale"), ("W",)),
    _rule(_HV + "layernorm_pre.bias", (*_VIS, "ln_pre", "bias"), ("W",)),
    _rule(_HV + "layernorm_post.weight", (*_VIS, "ln_post", "scale"), ("W",)),
    _rule(_HV + "layernorm_post.bias", (*_VIS, "ln_post", "bias"), ("W",)),
    *_vision_layer(_HV + "transformer.layers.{i}.", _HF_VISION_LAYER, _LOCAL, gated=False),
    *_vision_layer(_HV + "global_transformer.layers.{i}.", _HF_VISION_LAYER, _GLOBAL, gated=True),
    _rule("multi_modal_projector.weight", ("projector", "kernel"), ("D", "O")),
    _rule("multi_modal_projector.bias", ("projector", "bias"), ("D",)),
)

TABLES = {"meta": META_VISION, "hf": HF_VISION}

# Source keys that carry no parameter of ours, dropped on purpose: Meta's derivable RoPE buffer.
IGNORED = {"meta": re.compile(r"(^|\.)rope\.freqs$"), "hf": None}

# transformers >= 5 names modules differently in memory (``MllamaForConditionalGeneration.state_dict()``) and
# renames the hub keys on load (its conversion mapping for "mllama"); we normalise to the stored names.
HF_IN_MEMORY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


# --------------------------------------------------------------------------------------------------------------
# Index spaces and the expected key set.


def index_counts(config: ModelConfig) -> dict[str, int]:
    t, v = config.text, config.vision
    return {"layer": t.n_layers, "cross": t.n_cross_attention_layers, "vision": v.n_layers, "global": v.n_global_layers}


def hf_merged_layers(config: ModelConfig) -> dict[str, list[int]]:
    """HF merged decoder positions of our self-attention layers and cross-attention layers, in our order."""
    t = config.text
    cross = list(t.hf_cross_attention_layers)
    total = t.n_layers + t.n_cross_attention_layers
    return {"layer": sorted(set(range(total)) - set(cross)), "cross": cross}


def _source_indices(config: ModelConfig, fmt: str, space: str) -> list[int]:
    """Source-key index of each of our layers of ``space``, in our order."""
    if fmt == "hf" and space in ("layer", "cross"):
        return hf_merged_layers(config)[space]
    return list(range(index_counts(config)[space]))


def _fill(template: str, index: int | None) -> str:
    return template if index is None else template.replace("{i}", str(index))


def fill_path(path: Path, index: int | None) -> tuple:
    return tuple(index if part == "{i}" else part for part in path)


def expected_source_keys(config: ModelConfig, fmt: str) -> dict[str, tuple[VisionRule, int | None]]:
    """Every key a ``fmt`` checkpoint of ``config`` must hold (stored names), with its rule and our layer index."""
    _check(config, fmt)
    out: dict[str, tuple[VisionRule, int | None]] = {}
    for rule in TABLES[fmt]:
        if rule.index is None:
            out[rule.source] = (rule, None)
            continue
        for ours, src in enumerate(_source_indices(config, fmt, rule.index)):
            out[_fill(rule.source, src)] = (rule, ours)
    return out


def source_shape(rule: VisionRule, config: ModelConfig) -> tuple[int, ...]:
    d = dims(config)
    return tuple(d[s] for s in rule.shape)


def _check(config: ModelConfig, fmt: str) -> None:
    if fmt not in TABLES:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {sorted(TABLES)}")
    if not config.is_vision:
        raise CheckpointError(f"{config.name} is a text model; convert it with params_from_state_dict")
    if config.text.tie_embeddings:
        raise CheckpointError(f"{config.name}: the vision models have an untied output layer (tie_embeddings=False)")


def hf_stored_key(key: str) -> str:
    """The hub (safetensors) name of an HF Mllama key; transformers-5 in-memory names are renamed, others kept."""
    for memory, hub in HF_IN_MEMORY_PREFIXES:
        if key.startswith(memory):
            return hub + key[len(memory) :]
    return key
