"""Our converted checkpoints: an Orbax parameter tree with its config and tokenizer beside it.

Layout of a converted directory::

    out/
      params/            Orbax checkpoint (OCDBT) of the per-layer parameter tree; layer indices are string keys
      tokenizer.model    (Meta sources) or tokenizer.json + tokenizer_config.json ... (HF / GGUF sources)
      llama32_jax.json   the manifest, written last: format version, our config, dtype, source, tokenizer files,
                         the size of every file under params/ and, for a quantized checkpoint, its
                         ``quantization`` (:meth:`~llama32_jax.quant.QuantConfig.to_json`)

A directory is a converted checkpoint only if it holds the manifest *and* a finalized Orbax tree; the converter
writes both inside a temporary sibling and renames it into place, so nothing half-written carries a manifest
under the output's name. Before restoring, every file under ``params/`` is checked against the size the
manifest records, so a truncated or deleted array file is a :class:`~llama32_jax.errors.CheckpointError` naming
it (any other damage Orbax reports is one too, with the parameter named where TensorStore says which).
Restoring builds its targets as ``jax.ShapeDtypeStruct``\\s with the caller's shardings, so arrays land directly
where a mesh wants them (nothing is restored to one device first).

A quantized checkpoint (``llama32_jax.convert --quantize``) stores each quantized kernel as its ``int8`` / ``int4``
values under the kernel's own path and its fp32 scale beside it (``kernel_scale``, ``lm_head_scale``); the other
parameters are floats in ``dtype``. Its tree is that of the quantized model
(:func:`llama32_jax.models.build.abstract_model` with ``quant``), so it restores the same way, values and scales
straight into their shardings. A manifest without ``quantization`` is a float checkpoint (the format version is
the same: float checkpoints written before quantization existed read as before).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.checkpoint.safety import MANIFEST, ORBAX_FORMAT, os_errno, short, storage_error, user_path
from llama32_jax.configs.base import DTYPES, ModelConfig
from llama32_jax.configs.readers import config_from_dict, config_to_dict
from llama32_jax.errors import CheckpointError, ConfigError, LlamaJaxError, QuantizationError
from llama32_jax.models.build import abstract_model
from llama32_jax.models.quantize import quant_targets
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant.config import QuantConfig

PARAMS_DIR = "params"
FORMAT = ORBAX_FORMAT
FORMAT_VERSION = 1


def _orbax_v1():
    from orbax.checkpoint.experimental import v1

    return v1


def _key(part: Any) -> str:
    return str(part)


def _nest(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(_key(part), {})
        node[_key(path[-1])] = value
    return tree


def _save_context(compress: bool):
    """Orbax options that keep a save's memory near the data it is given.

    By default Orbax deep-copies host arrays before writing (a guard against the caller mutating them meanwhile;
    our saves are synchronous and the arrays are never touched again) and zstd-compresses whole arrays in memory:
    together ~1.8x the largest tensor on top of it (measured: +1351 MiB for a 752 MiB tensor; +114 MiB without
    the copy and compression). Compression stays available (``compress=True``) for smaller files.
    """
    v1 = _orbax_v1()
    try:
        ctx = v1.Context()
        if hasattr(ctx, "memory") and hasattr(ctx, "array"):  # Orbax's mutable options (0.12.8+)
            ctx.memory.deepcopy_host_arrays = False
            ctx.array.saving.use_compression = compress
            return ctx
        opts = v1.options  # older spelling: option objects passed to the constructor
        return v1.Context(
            memory_options=opts.MemoryOptions(deepcopy_host_arrays=False),
            array_options=opts.ArrayOptions(saving=opts.ArrayOptions.Saving(use_compression=compress)),
        )
    except (AttributeError, TypeError, dataclasses.FrozenInstanceError):
        return contextlib.nullcontext()  # an Orbax without these options: its defaults (more memory, same files)


class ParamWriter:
    """Writes parameters to an Orbax checkpoint a group at a time (``orbax ... v1.partial``), never all at once.

    ``add(path, array)`` queues a leaf; once ``flush_bytes`` are queued they are written and released. ``close()``
    writes the rest and finalizes the checkpoint (Orbax renames its own temporary directory into ``directory``).
    """

    def __init__(self, directory: str | os.PathLike, *, flush_bytes: int = 256 * 2**20, compress: bool = False):
        self.directory = Path(directory)
        self.flush_bytes = flush_bytes
        self.compress = compress
        self._queue: dict[tuple, np.ndarray] = {}
        self._queued = 0
        self.written_bytes = 0
        self._closed = False

    def add(self, path: tuple, array: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("ParamWriter is closed")
        if self._queue and self._queued + array.nbytes > self.flush_bytes:
            self.flush()  # a large tensor is written on its own, not on top of what is queued
        self._queue[tuple(path)] = array
        self._queued += array.nbytes
        if self._queued >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._queue:
            return
        try:
            with _save_context(self.compress):
                _orbax_v1().partial.save(self.directory, _nest(self._queue))
        except Exception as e:
            raise self._error(e) from e
        self.written_bytes += self._queued
        self._queue, self._queued = {}, 0

    def close(self) -> None:
        self.flush()
        if not self.written_bytes:
            raise CheckpointError("no parameters were written")
        try:
            _orbax_v1().partial.finalize(self.directory)
        except Exception as e:
            raise self._error(e) from e
        self._closed = True

    def _error(self, e: Exception) -> Exception:
        """A failed Orbax write: :class:`StorageError` for an OS-level cause (TensorStore reports those as
        ``ValueError``\\s carrying ``os_error_code``), else :class:`CheckpointError`; typed errors pass through."""
        if isinstance(e, LlamaJaxError):
            return e
        if isinstance(e, OSError) or os_errno(e) is not None:
            return storage_error(e, self.directory)
        return CheckpointError(f"writing the Orbax checkpoint under {str(self.directory)!r} failed: {short(e)}")


def write_manifest(
    directory: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: str,
    source: dict,
    tokenizer: list,
    quant: QuantConfig | None = None,
):
    """Write the manifest (last step of a conversion: its presence marks the directory complete). ``dtype`` is the
    float parameters' dtype; ``quant`` (recorded as ``quantization``) marks a quantized checkpoint."""
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "params": PARAMS_DIR,
        "dtype": dtype,
        "config": config_to_dict(config),
        "source": source,
        "tokenizer_files": tokenizer,
        "files": _file_sizes(Path(directory), PARAMS_DIR),
    }
    if quant is not None:
        record["quantization"] = quant.to_json()
    path = Path(directory) / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _file_sizes(root: Path, sub: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root / sub`` (recorded in the manifest, checked on restore)."""
    out = {}
    for dirpath, _, files in os.walk(root / sub):
        for name in sorted(files):
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.stat().st_size
    return dict(sorted(out.items()))


def is_converted_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like one of our converted checkpoints (it has the manifest)."""
    return (user_path(directory, "checkpoint path") / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """The manifest and config of a converted checkpoint, checked (format, version, dtype, finalized Orbax tree).

    ``directory`` may be relative, start with ``~`` or be a symlink. Every problem is a :class:`CheckpointError`
    naming the directory or file."""
    root = user_path(directory, "checkpoint path")
    if not root.exists():
        raise CheckpointError(f"converted checkpoint {str(root)!r} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r} is a file; a converted checkpoint is a directory holding {MANIFEST}")
    path = root / MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{str(root)!r} is not a converted llama32_jax checkpoint (no {MANIFEST})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the manifest {str(path)!r} (damaged?): {short(e)}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} manifest")
    if record.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {record.get('version')!r}; this llama32_jax reads version "
            f"{FORMAT_VERSION} (reconvert the source checkpoint)"
        )
    if record.get("dtype") not in DTYPES:
        raise CheckpointError(f"{str(path)!r}: dtype must be one of {tuple(DTYPES)}, got {record.get('dtype')!r}")
    sub = record.get("params", PARAMS_DIR)
    if not isinstance(sub, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", sub) or sub in (".", ".."):
        raise CheckpointError(f"{str(path)!r}: 'params' must name a sub-directory, got {sub!r}")
    files = record.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in files.items()):
        raise CheckpointError(f"{str(path)!r}: 'files' must map file names to sizes")
    try:
        config = config_from_dict(record["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{str(path)!r}: its config is invalid: {short(e)}") from e
    if record.get("quantization") is not None:
        try:
            QuantConfig.from_json(record["quantization"])
        except (QuantizationError, TypeError, ValueError) as e:
            raise CheckpointError(f"{str(path)!r}: its 'quantization' record is invalid: {short(e)}") from e
    params = root / sub
    if not params.is_dir():
        raise CheckpointError(f"{str(root)!r} has no {sub}/ directory: its parameters are missing")
    if not (params / "commit_success.txt").is_file() and not (params / "_CHECKPOINT_METADATA").is_file():
        raise CheckpointError(f"{str(params)!r} is not a finalized Orbax checkpoint (interrupted conversion?)")
    return record, config


def manifest_quant(record: Mapping) -> QuantConfig | None:
    """The :class:`~llama32_jax.quant.QuantConfig` a checkpoint was quantized with (from :func:`read_manifest`'s
    record, which checked it), or None for a float checkpoint."""
    data = record.get("quantization")
    return None if data is None else QuantConfig.from_json(data)


def check_files(root: Path, record: dict) -> None:
    """Every parameter file the manifest lists exists with its recorded size (older manifests list none)."""
    for name, size in record.get("files", {}).items():
        file = root / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(
                f"converted checkpoint {str(root)!r} is damaged: its parameter file {name!r} is missing"
            ) from None
        except OSError as e:
            raise CheckpointError(f"converted checkpoint {str(root)!r}: cannot read {name!r}: {short(e)}") from e
        if actual != size:
            raise CheckpointError(
                f"converted checkpoint {str(root)!r} is damaged: its parameter file {name!r} has {actual} bytes, "
                f"expected {size} (truncated or overwritten?); reconvert it"
            )


_PARAM_IN_ERROR = re.compile(r'"([A-Za-z0-9_.]+)/(?:c/|zarr\.json)')


def _abstract_tree(
    config: ModelConfig, dtype, sharding: Callable[[tuple, tuple], Any] | None, quant: QuantConfig | None = None
) -> dict:
    """ShapeDtypeStructs for our per-layer tree (string keys, as stored), with the shardings asked for: every
    float parameter in ``dtype``; with ``quant``, the quantized values in their int dtype and the scales in fp32."""
    import jax
    from flax import nnx

    per_layer = config.replace(scan_layers=False)
    abstract = abstract_model(per_layer, param_dtype=dtype, quant=quant)
    flat = flatten_tree(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    kept = set()  # leaves restored in their own dtype: quantized values and their scales
    if quant is not None:
        for kpath, target in quant_targets(per_layer, quant).items():
            kept.update((kpath, target.scale_path))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        spec = sharding(path, shape) if sharding is not None else default
        out[path] = jax.ShapeDtypeStruct(shape, leaf.dtype if path in kept else dtype, sharding=spec)
    return _nest(out)


def restore_params(
    directory: str | os.PathLike,
    *,
    param_dtype: Any = None,
    sharding: Callable[[tuple, tuple], Any] | None = None,
) -> tuple[ModelConfig, dict]:
    """Restore a converted checkpoint's parameters: ``(config, per-layer tree of jax.Arrays)``.

    ``param_dtype`` (default: the stored dtype) is the dtype float arrays are restored as; a quantized
    checkpoint's int values and fp32 scales keep their own (:func:`manifest_quant` says whether it is one).
    ``sharding(path, shape)`` returns the ``jax.sharding.Sharding`` for one parameter (e.g. a ``NamedSharding``
    over a mesh; for a quantized checkpoint it is also asked for the scales' paths); Orbax reads each array
    straight into it. Default: the first device.
    """
    import jax.numpy as jnp

    record, config = read_manifest(directory)
    root = user_path(directory, "checkpoint path")  # Orbax needs an absolute path
    check_files(root, record)
    dtype = jnp.dtype(param_dtype if param_dtype is not None else record["dtype"])
    v1 = _orbax_v1()
    path = root / record.get("params", PARAMS_DIR)
    target = _abstract_tree(config, dtype, sharding, manifest_quant(record))
    load = getattr(v1, "load", None) or v1.load_pytree
    try:
        tree = load(path, target)
    except Exception as e:  # TensorStore raises bare Exceptions carrying multi-KB spec dumps: keep the gist
        reason = short(e)
        m = _PARAM_IN_ERROR.search(str(e)) or _PARAM_IN_ERROR.search(reason)
        cause = e.__cause__
        while m is None and cause is not None:
            m, cause = _PARAM_IN_ERROR.search(str(cause)), cause.__cause__
        what = f"parameter {m.group(1)!r}" if m else "its parameters"
        if "do not match" in reason or "not compatible with the stored shape" in reason:
            raise CheckpointError(
                f"converted checkpoint {str(root)!r}: {what} in {record.get('params', PARAMS_DIR)}/ do not match the "
                f"config in its manifest: {reason}"
            ) from e
        raise CheckpointError(
            f"converted checkpoint {str(root)!r}: cannot read {what} from {record.get('params', PARAMS_DIR)}/ "
            f"(truncated, deleted or corrupt files?): {reason}"
        ) from e
    return config, _int_layer_keys(tree)


def _int_layer_keys(tree: dict) -> dict:
    """Stored string keys of layer lists (``layers``, ``cross_layers``, vision ``transformer.layers`` ...) -> ints."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _int_layer_keys(value)
            if key.endswith("layers") and value and all(k.isdigit() for k in value):
                value = {int(k): v for k, v in value.items()}
        out[key] = value
    return out
