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
from llama32_jax.configs.base import ModelConfig
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


class TensorMapper:
    """Maps source tensors one at a time onto our per-layer parameter paths, strictly (used when streaming).

    ``map(key, value)`` checks the key against the ``fmt`` key table and the tensor's shape against the config,
    applies the table's transform, and returns ``[(path, array)]``, or ``[]`` for a key dropped on purpose (derived
    buffers such as ``rope.freqs``, and the output head of a tied model: its equality with the embedding is the
    caller's to check, see :attr:`tied_head_key`). A key that names no parameter, a second tensor for a filled
    parameter, a layer index out of range and a shape mismatch are :class:`CheckpointError` naming the key;
    ``finish()`` names the first parameter no tensor filled.
    """

    def __init__(self, config: ModelConfig, fmt: str):
        if fmt not in keymap.TABLES:
            raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {sorted(keymap.TABLES)}")
        if config.is_vision:
            raise CheckpointError(f"{config.name} is a vision model: use convert_vision.VisionTensorMapper")
        self.config, self.fmt = config, fmt
        self.tied = config.text.tie_embeddings
        self.tied_head_key = keymap.TIED_HEAD_KEY[fmt] if self.tied else None
        self.embed_key = keymap.EMBED_KEY[fmt]
        self._filled: set[tuple] = set()

    def map(self, key: str, value: Any) -> list[tuple[tuple, np.ndarray]]:
        text = self.config.text
        if key in keymap.IGNORED[self.fmt] or key == self.tied_head_key:
            return []
        found = keymap.match(self.fmt, key)
        if found is None or (found[0].only_if == "untied" and self.tied):
            raise CheckpointError(
                f"unexpected key {key!r} in the {self.fmt} checkpoint: no parameter of {self.config.name} uses it"
            )
        rule, layer = found
        if layer is not None and not 0 <= layer < text.n_layers:
            raise CheckpointError(f"key {key!r}: layer {layer} is out of range for {text.n_layers} layers")
        array = to_numpy(value)
        expected = keymap.source_shape(rule, text)
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"key {key!r}: shape {tuple(array.shape)} does not match {self.config.name}, which needs {expected}"
            )
        path = keymap.target_path(rule, layer)
        if path in self._filled:
            raise CheckpointError(f"two source tensors map to parameter {'.'.join(map(str, path))} (last: {key!r})")
        self._filled.add(path)
        return [(path, keymap.TRANSFORMS[rule.transform](array, text))]

    def finish(self) -> None:
        """Raise :class:`CheckpointError` naming the first source key that no tensor supplied."""
        text = self.config.text
        for rule in keymap.TABLES[self.fmt]:
            if rule.only_if == "untied" and self.tied:
                continue
            for layer in range(text.n_layers) if "{i}" in rule.source else [None]:
                if keymap.target_path(rule, layer) not in self._filled:
                    raise CheckpointError(f"the {self.fmt} checkpoint has no {keymap.source_key(rule, layer)!r}")


def params_from_state_dict(config: ModelConfig, state_dict: Mapping[str, Any], fmt: str) -> dict:
    """Convert a text-model state dict in format ``"meta"`` or ``"hf"`` into our per-layer parameter tree."""
    mapper = TensorMapper(config, fmt)
    head = mapper.tied_head_key
    if head is not None and head in state_dict:
        embed = state_dict.get(mapper.embed_key)
        if embed is None or not np.array_equal(to_numpy(state_dict[head]), to_numpy(embed)):
            raise CheckpointError(
                f"{head!r} differs from {mapper.embed_key!r} but the config ties the output head to the "
                "embedding; load with tie_embeddings=False"
            )
    return map_state_dict(mapper, state_dict)


def map_state_dict(mapper, state_dict: Mapping[str, Any]) -> dict:
    """Feed every tensor of ``state_dict`` through ``mapper`` (text or vision) into a nested tree; then
    ``mapper.finish()`` checks that every parameter was filled."""
    tree: dict = {}
    for key, value in state_dict.items():
        for path, array in mapper.map(key, value):
            _set(tree, path, array)
    mapper.finish()
    return tree


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
