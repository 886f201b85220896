"""Reader of Meta's official checkpoint directories: ``params.json``, ``tokenizer.model``, ``consolidated.NN.pth``.

Shards are model-parallel slices; each tensor is merged by the column/row rules of SPEC.md §8.4 (column-parallel
weights concatenate along dim 0, row-parallel along dim 1, everything else is replicated and must be identical in
every shard). Files are opened with ``torch.load(weights_only=True, mmap=True)``: a pickle that would run code is
refused, never executed, and tensors are paged in from disk one at a time as they are merged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.checkpoint.convert import params_from_state_dict, to_numpy
from llama32_jax.configs import ModelConfig, from_params_json
from llama32_jax.errors import CheckpointError, ConfigError

# SPEC §8.4 as data: (key pattern, dim along which shards concatenate). Keys matching none are replicated.
SHARD_DIMS: tuple[tuple[str, int], ...] = (
    (r"(^|\.)attention\.w[qkv]\.weight$", 0),
    (r"(^|\.)attention\.wo\.weight$", 1),
    (r"(^|\.)feed_forward\.w[13]\.weight$", 0),
    (r"(^|\.)feed_forward\.w2\.weight$", 1),
    (r"(^|\.)tok_embeddings\.weight$", 0),
    (r"(^|\.)learnable_embedding\.weight$", 0),
    (r"(^|\.)output\.weight$", 0),
    (r"(^|\.)attn\.w[qkv]\.weight$", 0),
    (r"(^|\.)attn\.wo\.weight$", 1),
    (r"(^|\.)mlp\.c_fc\.(weight|bias)$", 0),
    (r"(^|\.)mlp\.c_proj\.weight$", 1),
    (r"(^|\.)conv1\._linear\.weight$", 0),
    (r"(^|\.)vision_projection\.(weight|bias)$", 0),
)
_SHARD_DIMS = [(re.compile(p), d) for p, d in SHARD_DIMS]
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


def shard_dim(key: str) -> int | None:
    """The concatenation dim of a Meta key across model-parallel shards, or None if it is replicated."""
    for pattern, dim in _SHARD_DIMS:
        if pattern.search(key):
            return dim
    return None


def meta_shard_files(directory: str | os.PathLike) -> list[Path]:
    """``consolidated.00.pth ... consolidated.{N-1}.pth`` (or a single ``consolidated.pth``), checked complete."""
    root = Path(directory)
    single = root / "consolidated.pth"
    numbered = {int(m.group(1)): root / name for name in os.listdir(root) if (m := _SHARD_NAME.match(name))}
    if single.is_file() and numbered:
        raise CheckpointError(f"{root}: both consolidated.pth and consolidated.NN.pth files exist; keep one set")
    if single.is_file():
        return [single]
    if not numbered:
        raise CheckpointError(f"{root}: no consolidated.NN.pth weight files found")
    n = max(numbered) + 1
    missing = [f"consolidated.{i:02d}.pth" for i in range(n) if i not in numbered]
    if missing:
        raise CheckpointError(f"{root}: shard file(s) {missing} missing from a {n}-shard checkpoint")
    return [numbered[i] for i in range(n)]


def _open_shard(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: its pickle asks for objects other than tensors (weights_only=True); "
            "the file was not executed"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a dict of named tensors, got {type(state).__name__}")
    return state


def iter_meta_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(meta_key, merged numpy array)`` one tensor at a time, merging the shards by SPEC §8.4."""
    files = meta_shard_files(directory)
    shards = [_open_shard(f) for f in files]
    keys = list(shards[0])
    for i, s in enumerate(shards[1:], start=1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise CheckpointError(f"{files[i]}: its keys differ from {files[0].name}'s: {diff[:6]}")
    for key in keys:
        parts = [to_numpy(s[key]) for s in shards]
        if len(parts) == 1:
            yield key, parts[0]
            continue
        dim = shard_dim(key)
        if dim is None:
            for i, p in enumerate(parts[1:], start=1):
                if p.shape != parts[0].shape or not np.array_equal(p, parts[0]):
                    raise CheckpointError(
                        f"{key!r} should be replicated but differs between shard 0 and {files[i].name}"
                    )
            yield key, parts[0]
        else:
            try:
                yield key, np.concatenate(parts, axis=dim)
            except ValueError as e:
                shapes = [p.shape for p in parts]
                raise CheckpointError(f"{key!r}: shard shapes {shapes} do not concatenate along dim {dim}") from e


def read_meta_params(
    directory: str | os.PathLike,
    *,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, dict]:
    """Read a Meta text-model directory into ``(config, per-layer params)``.

    ``tie_embeddings=None`` decides from the tensors: tied when ``output.weight`` equals ``tok_embeddings.weight``
    (Llama 3.2 1B/3B), untied otherwise (e.g. Llama Guard 3 1B). ``rope_factor`` as in ``from_params_json``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"Meta checkpoint directory {str(root)!r} does not exist")
    if not (root / "params.json").is_file():
        raise CheckpointError(f"{root}: params.json is missing (not a Meta checkpoint directory?)")
    try:
        params_json = json.loads((root / "params.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{root / 'params.json'}: cannot read it as JSON: {e}") from e
    tensors = dict(iter_meta_tensors(root))
    if tie_embeddings is None and "output.weight" in tensors and "tok_embeddings.weight" in tensors:
        tie_embeddings = bool(np.array_equal(tensors["output.weight"], tensors["tok_embeddings.weight"]))
    config = from_params_json(
        params_json, rope_factor=rope_factor, tie_embeddings=tie_embeddings, name=root.name, scan_layers=scan_layers
    )
    if config.is_vision:
        raise CheckpointError(f"{root}: vision checkpoints are not loadable yet (they arrive with the vision issue)")
    return config, params_from_state_dict(config, tensors, "meta")
