"""Converting Llama 3.2 Vision state dicts with the key tables of :mod:`keymap_vision`: one tensor at a time
(:class:`VisionTensorMapper`, used by the streaming converter) or a whole dict, and back to HF / Meta names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from llama32_jax.checkpoint.convert import TensorMapper, map_state_dict, to_numpy
from llama32_jax.checkpoint.keymap_vision import (
    IGNORED,
    INDEX_SPACES,
    INVERSE_TRANSFORMS,
    TABLES,
    TRANSFORMS,
    Array,
    expected_source_keys,
    fill_path,
    hf_merged_layers,
    hf_stored_key,
    index_counts,
    source_shape,
    target_shapes,
)
from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import CheckpointError

__all__ = ["VisionTensorMapper", "vision_params_from_state_dict", "vision_state_dict_from_params"]


def _why_unexpected(config: ModelConfig, fmt: str, key: str, stored: str) -> str:
    """The message for a key no rule of ``config`` uses: a layer index out of range, of the wrong kind, or unknown."""
    shown = repr(key) if key == stored else f"{key!r} (stored name {stored!r})"
    for rule in TABLES[fmt]:
        if rule.index is None:
            continue
        pattern = "^" + re.escape(rule.source).replace(r"\{i\}", r"(\d+)") + "$"
        m = re.match(pattern, stored)
        if m is None:
            continue
        index = int(m.group(1))
        if fmt == "hf" and rule.index in ("layer", "cross"):
            merged = hf_merged_layers(config)
            total = len(merged["layer"]) + len(merged["cross"])
            if index < total:
                continue  # a valid position of the other kind; another rule may name it
            return f"key {shown}: layer {index} is out of range for {total} HF decoder layers"
        count = index_counts(config)[rule.index]
        return f"key {shown}: layer {index} is out of range for {count} {INDEX_SPACES[rule.index]}s"
    if fmt == "hf":
        m = re.match(r"^language_model\.model\.layers\.(\d+)\.", stored)
        if m and int(m.group(1)) in config.text.hf_cross_attention_layers:
            return (
                f"unexpected key {shown}: HF layer {m.group(1)} is a cross-attention layer "
                f"(cross_attention_layers={list(config.text.hf_cross_attention_layers)}), and it has no such tensor"
            )
        if m:
            return f"unexpected key {shown}: HF layer {m.group(1)} is a self-attention layer, and it has no such tensor"
    return f"unexpected key {shown} in the {fmt} checkpoint: no parameter of {config.name} uses it"


class VisionTensorMapper:
    """Maps Llama 3.2 Vision source tensors one at a time onto our parameter paths (the streaming converter's
    counterpart of :func:`vision_params_from_state_dict`, with the same strictness).

    ``map(key, value)`` returns a list of ``(path, array)`` (two for HF's merged ``embed_tokens``, none for an
    ignored key); ``finish()`` names the first expected key that never came.
    """

    tied_head_key = None  # the vision models' output layer is never tied
    embed_key = None

    def __init__(self, config: ModelConfig, fmt: str):
        self.config, self.fmt = config, fmt
        self.expected = expected_source_keys(config, fmt)
        self._found: dict[str, str] = {}

    def map(self, key: str, value: Any) -> list[tuple[tuple, Array]]:
        config, fmt = self.config, self.fmt
        stored = hf_stored_key(key) if fmt == "hf" else key
        ignored = IGNORED[fmt]
        if ignored is not None and ignored.search(stored):
            return []
        if stored not in self.expected:
            raise CheckpointError(_why_unexpected(config, fmt, key, stored))
        if stored in self._found:
            raise CheckpointError(f"keys {self._found[stored]!r} and {key!r} are the same HF tensor {stored!r}")
        self._found[stored] = key
        rule, layer = self.expected[stored]
        array = to_numpy(value)
        want = source_shape(rule, config)
        if tuple(array.shape) != want:
            raise CheckpointError(f"key {key!r}: shape {tuple(array.shape)}, but {config.name} needs {want}")
        out = TRANSFORMS[rule.transform](array, config)
        outs = out if len(rule.targets) > 1 else (out,)
        return [(fill_path(path, layer), v) for path, v in zip(rule.targets, outs, strict=True)]

    def finish(self) -> None:
        missing = [k for k in self.expected if k not in self._found]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"the {self.fmt} checkpoint has no {missing[0]!r}{more}")


def vision_params_from_state_dict(config: ModelConfig, state_dict: Mapping[str, Any], fmt: str) -> dict:
    """Convert a Llama 3.2 Vision state dict (``fmt`` "meta" or "hf") into our parameter tree.

    Our tree: ``embed.embedding`` (V, D), ``learnable_embedding`` (8, D), ``layers.{i}`` (the text model's
    self-attention layers, Meta's numbering), ``cross_layers.{j}`` (attention_norm, attention.{wq, wk, wv, wo,
    q_norm, k_norm}, ffn_norm, feed_forward.{w1, w2, w3}, gate_attn, gate_ffwd), ``norm.weight``, ``lm_head``,
    ``vision.*`` (patch_embed.kernel (W, C*p*p), class_embedding, positional_embedding (P, W),
    gated_positional_embedding.{tile_embedding (R+1, T, P, W), gate}, {pre,post}_tile_pos_embed.{embedding
    (R+1, T, W), gate}, ln_pre / ln_post.{scale, bias}, transformer.layers.{n}, global_transformer.layers.{n}
    (+ gate_attn, gate_ffn)) and ``projector.{kernel (D, O), bias}``.

    Values may be numpy arrays or torch tensors. HF keys may use the hub's stored names or transformers-5's
    in-memory names. Strict: an unknown key, a missing key, a layer index out of range or a tensor whose shape
    does not fit ``config`` raises :class:`CheckpointError` naming the key. Meta's ``rope.freqs`` is ignored.
    """
    return map_state_dict(VisionTensorMapper(config, fmt), state_dict)


def _get(params: Mapping, path: tuple) -> Any:
    node: Any = params
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise CheckpointError(f"the parameters have no {'.'.join(map(str, path))!r}")
        node = node[part]
    return node


def _leaf_paths(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def vision_state_dict_from_params(config: ModelConfig, params: Mapping, fmt: str = "hf") -> dict[str, np.ndarray]:
    """Our parameter tree -> a state dict with ``fmt`` names as stored on disk (torch ``(out, in)`` layouts).

    "hf" gives the hub's safetensors names (``embed_tokens`` with V + 8 rows, precomputed tile embeddings).
    "meta" rebuilds Meta's 4x4 tile grids (cells no supported aspect ratio reads are zeros); a tile table that no
    grid produces is a :class:`CheckpointError`. A missing parameter, one of the wrong shape, or a parameter no key
    holds is a :class:`CheckpointError` naming it.
    """
    out: dict[str, np.ndarray] = {}
    used: set[tuple] = set()
    for key, (rule, layer) in expected_source_keys(config, fmt).items():
        paths = [fill_path(p, layer) for p in rule.targets]
        values = [to_numpy(_get(params, p)) for p in paths]
        used.update(paths)
        wants = target_shapes(rule.transform, config, source_shape(rule, config))
        for path, value, want in zip(paths, values, wants, strict=True):
            if tuple(value.shape) != want:
                raise CheckpointError(
                    f"parameter {'.'.join(map(str, path))!r}: shape {tuple(value.shape)}, but {config.name} needs "
                    f"{want} (for key {key!r})"
                )
        try:
            out[key] = INVERSE_TRANSFORMS[rule.transform](values[0] if len(values) == 1 else tuple(values), config)
        except CheckpointError as e:
            names = " + ".join(repr(".".join(map(str, p))) for p in paths)
            raise CheckpointError(f"parameter {names} (for key {key!r}): {e}") from e
    unused = [p for p in _leaf_paths(params) if p not in used]
    if unused:
        raise CheckpointError(f"parameter {'.'.join(map(str, unused[0]))!r} has no key in the {fmt} checkpoint")
    return out


def tensor_mapper(config: ModelConfig, fmt: str):
    """The streaming key mapper for ``config``: text tables, or the vision tables for a vision model."""
    if config.is_vision:
        return VisionTensorMapper(config, fmt)
    return TensorMapper(config, fmt)
