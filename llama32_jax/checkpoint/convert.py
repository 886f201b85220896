"""Map a whole in-memory state dict (Meta or HF names) to our per-layer parameter tree, and back.

Strict both ways: a source key no rule uses, a parameter no key fills, a layer index out of range or a shape
mismatch raises :class:`~llama32_jax.errors.CheckpointError` naming the key. (The streaming converter that never
holds a whole checkpoint in memory is built on the same rules, see ``keymap.py``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from llama32_jax.checkpoint import keymap
from llama32_jax.configs import ModelConfig
from llama32_jax.errors import CheckpointError


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy / jax / torch tensor (torch bf16 goes through ml_dtypes without a float copy)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        import ml_dtypes
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _set(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-1] in node:
        raise CheckpointError(f"two source tensors map to parameter {'.'.join(map(str, path))}")
    node[path[-1]] = value


def params_from_state_dict(config: ModelConfig, state_dict: Mapping[str, Any], fmt: str) -> dict:
    """Convert a text-model state dict in format ``"meta"`` or ``"hf"`` into our per-layer parameter tree."""
    if fmt not in keymap.TABLES:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {sorted(keymap.TABLES)}")
    if config.is_vision:
        raise CheckpointError("vision checkpoints are converted by the vision key tables (not yet available)")
    text = config.text
    tied = text.tie_embeddings
    tree: dict = {}
    for key, value in state_dict.items():
        if key in keymap.IGNORED[fmt]:
            continue
        if tied and key == keymap.TIED_HEAD_KEY[fmt]:
            embed = state_dict.get(keymap.EMBED_KEY[fmt])
            if embed is None or not np.array_equal(to_numpy(value), to_numpy(embed)):
                raise CheckpointError(
                    f"{key!r} differs from {keymap.EMBED_KEY[fmt]!r} but the config ties the output head to the "
                    "embedding; load with tie_embeddings=False"
                )
            continue
        found = keymap.match(fmt, key)
        if found is None or (found[0].only_if == "untied" and tied):
            raise CheckpointError(
                f"unexpected key {key!r} in the {fmt} checkpoint: no parameter of {config.name} uses it"
            )
        rule, layer = found
        if layer is not None and not 0 <= layer < text.n_layers:
            raise CheckpointError(f"key {key!r}: layer {layer} is out of range for {text.n_layers} layers")
        array = to_numpy(value)
        try:
            converted = keymap.TRANSFORMS[rule.transform](array, text)
        except ValueError as e:
            raise CheckpointError(f"key {key!r}: shape {array.shape} does not fit {config.name}: {e}") from e
        _set(tree, keymap.target_path(rule, layer), converted)
    _check_complete(config, tree, fmt)
    return tree


def _check_complete(config: ModelConfig, tree: dict, fmt: str) -> None:
    text = config.text
    for rule in keymap.TABLES[fmt]:
        if rule.only_if == "untied" and text.tie_embeddings:
            continue
        for layer in range(text.n_layers) if "{i}" in rule.source else [None]:
            node: Any = tree
            for part in keymap.target_path(rule, layer):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise CheckpointError(f"the {fmt} checkpoint has no {keymap.source_key(rule, layer)!r}")


def state_dict_from_params(config: ModelConfig, params: Mapping, fmt: str) -> dict[str, np.ndarray]:
    """Our per-layer parameter tree -> a state dict with ``fmt`` names (torch ``(out, in)`` layouts)."""
    text = config.text
    out: dict[str, np.ndarray] = {}
    for rule in keymap.TABLES[fmt]:
        if rule.only_if == "untied" and text.tie_embeddings:
            continue
        for layer in range(text.n_layers) if "{i}" in rule.source else [None]:
            node: Any = params
            for part in keymap.target_path(rule, layer):
                node = node[part]
            out[keymap.source_key(rule, layer)] = keymap.INVERSE_TRANSFORMS[rule.transform](to_numpy(node), text)
    return out
