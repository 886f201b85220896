"""Reader of Hugging Face model directories: ``config.json`` and safetensors weights (one file or an indexed set).

Files are opened with ``safetensors.safe_open`` (never unpickled), which validates the header; each tensor is then
read with plain file reads at its byte offsets (no memory map: nothing stays resident after the tensor is
dropped) and comes back as a numpy array in the stored dtype, bf16 as ``ml_dtypes.bfloat16`` (the same bytes, so
values are exact).

Every parameter of a Llama / Mllama checkpoint is a float. Before any tensor is read, every file's header is checked:
a tensor stored as integers (int8 bitsandbytes weights, packed 4-bit ``uint8``, GPTQ ``int32``) or as fp8, and a
quantization side tensor (``.qweight``, ``.scales``, ``.qzeros``, ``.g_idx``, ``.SCB``, ``.absmax``,
``.weight_format``, ``.weight_scale``, ...), is a :class:`~llama32_jax.errors.QuantizedCheckpointError` naming the
file, the tensor and its dtype -- whatever ``config.json`` says (a ``quant_method: gguf`` section, written by
transformers over float tensors it dequantized from a GGUF file, is read like any float checkpoint).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.checkpoint.convert import params_from_state_dict
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict
from llama32_jax.configs.base import ModelConfig
from llama32_jax.configs.hf import from_hf_config
from llama32_jax.errors import CheckpointError, QuantizedCheckpointError

__all__ = ["check_float_tensors", "hf_weight_files", "iter_hf_tensors", "read_hf_params"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _load_index(directory: Path) -> dict[str, list[str]]:
    """``shard file name -> [keys]`` from ``model.safetensors.index.json``, checked for shape and missing shards."""
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(path)!r} has no 'weight_map' object naming the shards")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"{str(path)!r}: key {key!r} names {shard!r}, not a file in the directory")
        shards.setdefault(shard, []).append(key)
    for shard in shards:
        if not (directory / shard).is_file():
            raise CheckpointError(
                f"{str(path)!r} names shard {shard!r} (holding e.g. {shards[shard][0]!r}), which does not exist"
            )
    return shards


def hf_weight_files(directory: str | os.PathLike) -> dict[Path, list[str] | None]:
    """The safetensors files of an HF directory: ``path -> keys the index assigns to it`` (None for one file).

    Every file's header is checked by :func:`check_float_tensors` (quantized tensors are refused before any read).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"HF model directory not found: {str(directory)!r}")
    single, indexed = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file() and indexed.is_file():
        raise CheckpointError(
            f"{str(directory)!r} has both {SINGLE_FILE!r} and {INDEX_FILE!r}; it is unclear which weights to load"
        )
    if single.is_file():
        files = {single: None}
    elif indexed.is_file():
        files = {directory / shard: keys for shard, keys in sorted(_load_index(directory).items())}
    else:
        files = None
    if files is not None:
        for path in files:
            check_float_tensors(path)
        return files
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    raise CheckpointError(
        f"{str(directory)!r} has no {SINGLE_FILE!r} and no {INDEX_FILE!r}"
        + (f" (found {others}; only safetensors weights named as HF saves them are read)" if others else "")
    )


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The safetensors header: (byte offset of the data section, {name: {dtype, shape, data_offsets}})."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > os.fstat(f.fileno()).st_size - 8 or size > 100_000_000:  # also guards the read below
            raise CheckpointError(
                f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): its header claims {size} bytes"
            )
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): bad header")
    header.pop("__metadata__", None)
    return 8 + size, header


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Tensors only quantized checkpoints have: GPTQ / AWQ (qweight, qzeros, scales, g_idx), bitsandbytes 8-bit (SCB,
# weight_format) and 4-bit (absmax, quant_map, nested_*, quant_state.*), compressed-tensors and fp8 (weight_packed,
# weight_scale, weight_zero_point, weight_shape, weight_g_idx, weight_scale_inv, input_scale).
_QUANT_TENSOR_NAMES = frozenset(
    (
        "qweight",
        "qzeros",
        "scales",
        "g_idx",
        "SCB",
        "weight_format",
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "weight_scale_inv",
        "input_scale",
    )
)
_FLOAT_ADVICE = (
    "llama32_jax reads float (bf16 / fp16 / fp32) checkpoints only: use the float model this one was made from, or "
    "dequantize it with transformers where the method supports it (model.dequantize(), then save_pretrained in "
    "bf16) and load the saved directory"
)


def check_float_tensors(path: str | os.PathLike) -> None:
    """Refuse a safetensors file holding quantized tensors (integer or fp8 dtypes, quantization side tensors).

    Reads the header only. :class:`~llama32_jax.errors.QuantizedCheckpointError` names the file, the tensor and
    its dtype; an unreadable header is a :class:`~llama32_jax.errors.CheckpointError`.
    """
    path = Path(path)
    try:
        _, entries = safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from e
    for key, entry in entries.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        last = key.rsplit(".", 1)[-1]
        if last in _QUANT_TENSOR_NAMES or ".quant_state." in key:
            raise QuantizedCheckpointError(
                f"{str(path)!r}: tensor {key!r} ({dtype}) is a quantization tensor: the checkpoint is quantized. "
                + _FLOAT_ADVICE
            )
        if isinstance(dtype, str) and dtype not in _FLOAT_DTYPES and (dtype[:1] in "IUB" or dtype.startswith("F")):
            kind = "integers" if dtype[:1] in "IUB" else "a low-precision float format"
            raise QuantizedCheckpointError(
                f"{str(path)!r}: tensor {key!r} is stored as {dtype} ({kind}), but every Llama parameter is a float: "
                f"the weights are quantized (or not a Llama checkpoint). {_FLOAT_ADVICE}"
            )


# safetensors dtype names -> numpy dtypes (bf16 through ml_dtypes); all little-endian.
_ST_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "bfloat16",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _read_tensor(path: Path, header: tuple[int, dict[str, Any]], key: str) -> np.ndarray:
    """One tensor read with plain file reads at its byte offsets (no memory map, so nothing stays resident)."""
    import ml_dtypes

    start, entries = header
    entry = entries[key]
    name, shape = entry["dtype"], [int(n) for n in entry["shape"]]
    if name not in _ST_NUMPY:
        raise CheckpointError(f"{str(path)!r}: tensor {key!r} has unsupported dtype {name!r}")
    dtype = np.dtype(ml_dtypes.bfloat16) if name == "BF16" else np.dtype(_ST_NUMPY[name])
    begin, end = entry["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != dtype.itemsize * count:
        raise CheckpointError(f"{str(path)!r}: tensor {key!r} has {end - begin} bytes for {name} shape {shape}")
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise CheckpointError(f"{str(path)!r} is truncated: tensor {key!r} is incomplete")
    return data.reshape(shape)


def _iter_file(path: Path, expected: list[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            if expected is not None and set(keys) != set(expected):
                missing = sorted(set(expected) - set(keys))
                extra = sorted(set(keys) - set(expected))
                raise CheckpointError(
                    f"{str(path)!r} does not hold what {INDEX_FILE!r} says: missing {missing[:5]}, unlisted {extra[:5]}"
                )
            header = safetensors_header(path)
            for key in keys:
                yield key, _read_tensor(path, header, key)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from e


def iter_hf_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, array)`` for every tensor of an HF directory, one at a time, file by file.

    Arrays keep the stored dtype (bf16 as ``ml_dtypes.bfloat16``). A key stored twice, a shard the index names but
    that is missing, or a shard whose keys differ from the index is a :class:`~llama32_jax.errors.CheckpointError`.
    """
    seen: dict[str, Path] = {}
    for path, expected in hf_weight_files(directory).items():
        for key, array in _iter_file(path, expected):
            if key in seen:
                raise CheckpointError(f"tensor {key!r} is stored twice: in {seen[key].name!r} and {path.name!r}")
            seen[key] = path
            yield key, array


def read_hf_params(directory: str | os.PathLike, *, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """Read an HF Llama text-model directory into ``(config, params)`` (our per-layer tree, stored dtypes).

    ``config.json`` goes through the strict :func:`~llama32_jax.configs.from_hf_config` (a missing file is a
    :class:`~llama32_jax.errors.ConfigError`); the weights through the ``"hf"`` key table.
    """
    directory = Path(directory)
    config = from_hf_config(directory, name=directory.name or "hf", scan_layers=scan_layers)
    if config.is_vision:
        return config, vision_params_from_state_dict(config, dict(iter_hf_tensors(directory)), "hf")
    return config, params_from_state_dict(config, dict(iter_hf_tensors(directory)), "hf")
