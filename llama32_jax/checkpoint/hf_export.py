"""Export a text model to a Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files).

The directory is written to a temporary sibling and renamed into place only when complete, so an interrupted
export never leaves something that looks like a finished checkpoint. Its last file, ``llama32_jax_export.json``,
marks it as an export of ours (format ``llama32_jax-hf-export`` and the list of its files): only such a
directory (or a converted checkpoint, or an empty directory) may be replaced with ``overwrite``. Weights are
written with HF names and torch's ``(out, in)`` layout (``state_dict_from_params``); bf16 is written exactly
(safetensors ``BF16``).

A quantized model (``quantize=`` / a ``--quantize`` checkpoint) is exported dequantized: each weight is written as
``q * scale`` (computed in fp32, then cast to ``dtype``), the float model it computes with, which any HF loader
reads; HF has no format for our int8 / int4 values and scales. The export marker records the quantization.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from llama32_jax.checkpoint.convert import state_dict_from_params
from llama32_jax.checkpoint.pipeline import HF_TOKENIZER_FILES, atomic_directory, check_output
from llama32_jax.checkpoint.safety import EXPORT_FORMAT, EXPORT_MARKER, user_path
from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.inputs.tokenizer import HFTokenizer, LlamaTokenizer, default_llama3_tokenizer_path
from llama32_jax.models.quantize import quant_targets
from llama32_jax.models.text import unstack_layers
from llama32_jax.quant.arrays import dequantize

__all__ = ["export_hf", "hf_config_dict", "write_export_marker", "write_hf_files", "write_safetensors"]

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_config_dict(config: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The HF ``config.json`` (``LlamaForCausalLM``) describing ``config``; ``from_hf_config`` reads it back equal."""
    if config.is_vision:
        raise InvalidInputError("exporting vision models to HF is not supported yet")
    t = config.text
    rope: dict[str, Any] | None = None
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "intermediate_size": t.ffn_dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write a safetensors file (8-byte header size, JSON header, raw little-endian data), bf16 included."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        dtype = _ST_DTYPES.get(arr.dtype.name)
        if dtype is None:
            raise InvalidInputError(f"tensor {name!r}: dtype {arr.dtype} cannot be exported; use {sorted(_ST_DTYPES)}")
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def source_path(model: Any) -> Path | None:
    """The model's source file or directory on disk (``Model.source``), or None (built-in or in-memory models)."""
    source = getattr(model, "source", None)
    if isinstance(source, str | os.PathLike) and os.path.exists(os.path.expanduser(os.fspath(source))):
        return user_path(source, "model source")
    return None


def write_hf_files(model: Any, directory: Path, *, dtype: str, tokenizer_dir: Path | None) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files of ``model`` into ``directory``."""
    import ml_dtypes

    module = getattr(model, "module", model)
    config: ModelConfig = module.config
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    params = dequantized(module, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    if config.scan_layers:
        params = unstack_layers(params)
    tensors = {k: np.asarray(v).astype(np_dtype) for k, v in state_dict_from_params(config, params, "hf").items()}
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config, torch_dtype=dtype), indent=2) + "\n")
    write_safetensors(directory / "model.safetensors", tensors)
    del tensors
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = tokenizer_dir / name
            if src.is_file():
                shutil.copy(src, directory / name)
    elif getattr(model, "tokenizer", None) is not None:
        write_tokenizer_files(model, directory)


def dequantized(module: Any, params: dict) -> dict:
    """``params`` (the module's pure dict) with every quantized weight replaced by its fp32 dequantization and
    the scales dropped, one weight at a time on the host; a float model's params are returned as they are."""
    quant = getattr(module, "quant_config", None)
    if quant is None:
        return params
    for kpath, target in quant_targets(module.config, quant).items():
        parent = params
        for key in kpath[:-1]:
            parent = parent[key]
        scale_parent = params
        for key in target.scale_path[:-1]:
            scale_parent = scale_parent[key]
        q, scale = np.asarray(parent[kpath[-1]]), np.asarray(scale_parent.pop(target.scale_path[-1]))
        parent[kpath[-1]] = dequantize(q, scale, target.n_in, target.mode, target.group, np.float32)
    return params


def write_tokenizer_files(model: Any, directory: str | os.PathLike) -> list[str]:
    """Write ``model``'s tokenizer (an ``llama32_jax.Model``) into an HF directory; returns the file names.

    Copied from the model's source directory when it has tokenizer files (HF, Meta or converted checkpoints), else
    written from the loaded tokenizer: an HF-style one (GGUF, built-in models) as ``tokenizer.json`` +
    ``tokenizer_config.json`` (BOS/EOS/pad, ``add_bos_token``, chat template) + ``generation_config.json`` (stop
    ids); Meta's Llama 3 tokenizer as the ``tokenizer.model`` of the llama-models package. ``llama32_jax.load`` of
    the directory then reads the same tokenizer back.
    """

    directory = Path(directory)
    source = getattr(model, "source", None)
    source = Path(os.path.expanduser(source)) if isinstance(source, str) else None
    source = source if source is not None and source.is_dir() else None
    names = [n for n in HF_TOKENIZER_FILES if source is not None and (source / n).is_file()]
    if names:
        for name in names:
            shutil.copy2(source / name, directory / name)
        return names
    tok = model.tokenizer
    if isinstance(tok, LlamaTokenizer):
        shutil.copy2(default_llama3_tokenizer_path(), directory / "tokenizer.model")
        return ["tokenizer.model"]
    if isinstance(tok, HFTokenizer):
        tok.backend.save(str(directory / "tokenizer.json"))

        def piece(i):
            return None if i is None else tok.id_to_piece(i)

        config = {
            "bos_token": piece(tok.bos_id),
            "eos_token": piece(tok.eos_id),
            "pad_token": piece(tok.pad_id),
            "add_bos_token": tok.add_bos,
            "chat_template": tok.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids)}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    raise CheckpointError(f"cannot write tokenizer files for a {type(tok).__name__}")


def write_export_marker(directory: Path, *, dtype: str, **extra: Any) -> None:
    """Write the marker of an HF export of ours (last): what ``overwrite`` may later replace, with every file the
    export holds (see :mod:`llama32_jax.checkpoint.safety`)."""
    files = sorted(n for n in os.listdir(directory) if n != EXPORT_MARKER)
    record = {"format": EXPORT_FORMAT, "version": 1, "dtype": dtype, "files": files, **extra}
    with open(directory / EXPORT_MARKER, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def export_hf(
    model: Any,
    output: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (an ``llama32_jax.Model`` or a text ``Transformer`` module) as an HF directory; a quantized
    model is written dequantized (``q * scale`` in fp32, cast to ``dtype``: see the module docstring).

    Tokenizer files are copied from ``tokenizer_dir``; by default from the model's source directory, or written
    from the loaded tokenizer (GGUF and built-in models: ``tokenizer.json``; Meta: ``tokenizer.model``). The
    directory is marked as ours by ``llama32_jax_export.json`` (written last; it lists the export's files).

    ``output`` may be relative, start with ``~`` or pass through symlinks. It must not overlap the model's source
    (either way). An existing ``output`` is refused unless ``overwrite``, and even then only an empty directory or
    a complete earlier output of llama32_jax (nothing else in it) is replaced: anything else is an
    :class:`~llama32_jax.errors.UnsafePathError` and nothing is deleted. A failed write (disk full ...) is a
    :class:`~llama32_jax.errors.StorageError` and leaves nothing behind. Returns the output's real path.
    """
    module = getattr(model, "module", model)
    config = getattr(module, "config", None)
    if not isinstance(config, ModelConfig):
        raise InvalidInputError(f"model must be an llama32_jax Model or text Transformer, got {type(model).__name__}")
    if dtype not in _ST_DTYPES:
        raise InvalidInputError(f"dtype must be one of {sorted(_ST_DTYPES)}, got {dtype!r}")
    hf_config_dict(config)  # vision models are refused before anything is written
    source = source_path(model)
    out = check_output(output, overwrite=overwrite, source=source)
    tok_dir = None
    if tokenizer_dir is not None:
        tok_dir = user_path(tokenizer_dir, "tokenizer_dir")
        if not tok_dir.is_dir():
            raise InvalidInputError(f"tokenizer_dir {str(tok_dir)!r} is not a directory")
    elif source is not None and source.is_dir() and getattr(model, "tokenizer", None) is None:
        tok_dir = source
    quant = getattr(module, "quant_config", None)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_hf_files(model, tmp, dtype=dtype, tokenizer_dir=tok_dir)
        extra = {} if quant is None else {"dequantized_from": quant.to_json()}
        write_export_marker(tmp, dtype=dtype, **extra)
    return out
