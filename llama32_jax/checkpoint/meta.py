"""Reader of Meta's official checkpoint directories: ``params.json``, ``tokenizer.model``, ``consolidated.NN.pth``.

Shards are model-parallel slices; each tensor is merged by Meta's column/row rules (``SHARD_DIMS``: column-parallel
weights concatenate along dim 0, row-parallel along dim 1, everything else is replicated and must be identical in
every shard). Files are opened with ``torch.load(weights_only=True, mmap=True)``: a pickle that would run code is
refused, never executed, and tensors are paged in from disk one at a time as they are merged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.checkpoint.convert import params_from_state_dict, to_numpy
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict
from llama32_jax.configs.base import ModelConfig
from llama32_jax.configs.files import load_config_json
from llama32_jax.configs.readers import from_params_json
from llama32_jax.errors import CheckpointError

# Meta's model-parallel layout as data: (key pattern, dim along which shards concatenate). Keys matching none
# are replicated.
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
    root = Path(os.path.expanduser(os.fspath(directory)))
    single = root / "consolidated.pth"
    try:
        names = os.listdir(root)
    except OSError as e:  # missing, a file, or no permission
        raise CheckpointError(f"cannot list the Meta checkpoint directory {str(root)!r}: {e.strerror or e}") from e
    numbered = {int(m.group(1)): root / name for name in names if (m := _SHARD_NAME.match(name))}
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
    bad = [k for k, v in state.items() if not hasattr(v, "detach")]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    return state


# How many bytes of tensor data may be paged in through the shards' memory maps before they are dropped and
# reopened. Pages read through a map count towards the process's RSS until it is unmapped, so this bounds the
# file-backed part of the converter's footprint (reopening costs one unpickling of the small index pickle).
DEFAULT_MAP_BUDGET = 512 * 2**20


class MetaShards:
    """The ``consolidated.NN.pth`` shards of one checkpoint, read tensor by tensor with a bounded footprint.

    Each file is opened with ``torch.load(weights_only=True, mmap=True)``: the pickle may only build tensors (one
    that would run code is refused, not executed), and tensor data stays on disk until read. After
    ``map_budget`` bytes have been read the maps are dropped and reopened, so resident file pages stay bounded
    however large the checkpoint is. :meth:`tensor` merges a key's shards by :data:`SHARD_DIMS`.
    """

    def __init__(self, directory: str | os.PathLike, *, map_budget: int = DEFAULT_MAP_BUDGET):
        self.files = meta_shard_files(directory)
        self.map_budget = map_budget
        self._states: list[dict[str, Any]] | None = None
        self._read = 0
        states = self._open()
        self.keys: list[str] = list(states[0])
        for i, state in enumerate(states[1:], start=1):
            if set(state) != set(self.keys):
                diff = sorted(set(state) ^ set(self.keys))
                raise CheckpointError(f"{self.files[i]}: its keys differ from {self.files[0].name}'s: {diff[:6]}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nbytes: dict[str, int] = {}
        for key in self.keys:
            parts = [s[key] for s in states]
            self.shapes[key] = self._merged_shape(key, [tuple(p.shape) for p in parts])
            self.nbytes[key] = sum(p.numel() * p.element_size() for p in parts)
        self.release()

    def _merged_shape(self, key: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if len(shapes) == 1:
            return shapes[0]
        dim = shard_dim(key)
        if dim is None:
            if len(set(shapes)) != 1:
                raise CheckpointError(f"{key!r} should be replicated but its shard shapes differ: {shapes}")
            return shapes[0]
        rest = {s[:dim] + s[dim + 1 :] for s in shapes if len(s) > dim}
        if len(rest) != 1 or any(len(s) <= dim for s in shapes):
            raise CheckpointError(f"{key!r}: shard shapes {shapes} do not concatenate along dim {dim}")
        first = shapes[0]
        return (*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1 :])

    def _open(self) -> list[dict[str, Any]]:
        if self._states is None:
            self._states = [None] * len(self.files)
            self._read = 0
        for i, state in enumerate(self._states):
            if state is None:  # never opened, or dropped after a large read
                self._states[i] = _open_shard(self.files[i])
        return self._states

    def release(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._states = None

    def parts(self, key: str) -> list[np.ndarray]:
        """The shards' slices of ``key`` as numpy views onto the maps (no copy)."""
        return [self._part(i, key) for i in range(len(self.files))]

    def tensor(self, key: str) -> np.ndarray:
        """``key`` merged across shards: a view onto the map for one shard, else a new concatenated array.

        Maps are dropped before a read that would take the bytes read through them past the budget, and while a
        sharded tensor is assembled each shard's map is dropped as soon as its slice is copied, so the pages
        resident at once stay near one tensor, not one tensor plus the budget.
        """
        size = self.nbytes[key]
        if self._states is not None and self._read + size > self.map_budget:
            self.release()
        n = len(self.files)
        if n == 1:
            merged = self.parts(key)[0]
        else:
            dim = shard_dim(key)
            if dim is None:
                parts = self.parts(key)
                for i, p in enumerate(parts[1:], start=1):
                    if not np.array_equal(p, parts[0]):
                        raise CheckpointError(
                            f"{key!r} should be replicated but differs between shard 0 and {self.files[i].name}"
                        )
                merged = np.array(parts[0])
                del parts
            else:
                merged = None
                offset = 0
                for i in range(n):
                    part = self._part(i, key)
                    if merged is None:
                        merged = np.empty(self.shapes[key], dtype=part.dtype)
                    index = [slice(None)] * merged.ndim
                    index[dim] = slice(offset, offset + part.shape[dim])
                    merged[tuple(index)] = part
                    offset += part.shape[dim]
                    del part
                    if size >= self.map_budget // 4:
                        self._states[i] = None  # drop this shard's map now: its pages of this tensor are copied
        self._read += size
        if self._read >= self.map_budget:
            self.release()
        return merged

    def _part(self, i: int, key: str) -> np.ndarray:
        if self._states is None:
            self._states = [None] * len(self.files)
            self._read = 0
        if self._states[i] is None:
            self._states[i] = _open_shard(self.files[i])
        try:
            return to_numpy(self._states[i][key])
        except RuntimeError as e:  # e.g. a storage whose bytes the (truncated) file does not hold
            raise CheckpointError(f"cannot read tensor {key!r} from {self.files[i]}: {e}") from e

    def equal(self, key_a: str, key_b: str, *, chunk_bytes: int = 64 * 2**20) -> bool:
        """Whether two tensors hold equal values, compared shard by shard in row chunks (no full copies)."""
        if self.shapes[key_a] != self.shapes[key_b]:
            return False
        try:
            for a, b in zip(self.parts(key_a), self.parts(key_b), strict=True):
                if a.shape != b.shape:
                    return False
                rows = max(1, chunk_bytes // max(1, a[:1].nbytes))
                for r in range(0, a.shape[0], rows):
                    if not np.array_equal(a[r : r + rows], b[r : r + rows]):
                        return False
            return True
        finally:
            self.release()


def iter_meta_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(meta_key, merged numpy array)`` one tensor at a time, merging the shards by :data:`SHARD_DIMS`."""
    shards = MetaShards(directory)
    for key in shards.keys:
        yield key, shards.tensor(key)


def read_params_json(root: Path) -> dict:
    """``params.json`` of a Meta directory as a dict (missing or unreadable: a typed error naming the file)."""
    if not root.is_dir():
        raise CheckpointError(f"Meta checkpoint directory {str(root)!r} does not exist")
    path = root / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{root}: params.json is missing (not a Meta checkpoint directory?)")
    # The shared reader names what the file is when it is not a config (LFS pointer, empty, binary, not UTF-8).
    data, _, _ = load_config_json(path, "params.json", "Meta's params.json (a JSON object of model sizes)")
    return data


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
    root = Path(os.path.expanduser(os.fspath(directory)))
    params_json = read_params_json(root)
    tensors = dict(iter_meta_tensors(root))
    if tie_embeddings is None and "output.weight" in tensors and "tok_embeddings.weight" in tensors:
        tie_embeddings = bool(np.array_equal(tensors["output.weight"], tensors["tok_embeddings.weight"]))
    config = from_params_json(
        params_json, rope_factor=rope_factor, tie_embeddings=tie_embeddings, name=root.name, scan_layers=scan_layers
    )
    if config.is_vision:
        return config, vision_params_from_state_dict(config, tensors, "meta")
    return config, params_from_state_dict(config, tensors, "meta")
