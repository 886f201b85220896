"""Our converted checkpoints: an Orbax parameter tree with its config and tokenizer beside it.

Layout of a converted directory::

    out/
      params/            Orbax checkpoint (OCDBT) of the per-layer parameter tree; layer indices are string keys
      tokenizer.model    (Meta sources) or tokenizer.json + tokenizer_config.json ... (HF / GGUF sources)
      llama32_jax.json   the manifest, written last: format version, our config, dtype, source, tokenizer files

A directory is a converted checkpoint only if it holds the manifest *and* a finalized Orbax tree; the converter
writes both inside a temporary sibling and renames it into place, so nothing half-written carries a manifest
under the output's name. Restoring builds its targets as ``jax.ShapeDtypeStruct``\\s with the caller's
shardings, so arrays land directly where a mesh wants them (nothing is restored to one device first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.config_readers import config_from_dict, config_to_dict
from llama32_jax.configs import ModelConfig
from llama32_jax.errors import CheckpointError, ConfigError

MANIFEST = "llama32_jax.json"
PARAMS_DIR = "params"
FORMAT = "llama32_jax-orbax"
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
        except OSError as e:
            raise CheckpointError(f"writing the Orbax checkpoint under {str(self.directory)!r} failed: {e}") from e
        self.written_bytes += self._queued
        self._queue, self._queued = {}, 0

    def close(self) -> None:
        self.flush()
        if not self.written_bytes:
            raise CheckpointError("no parameters were written")
        _orbax_v1().partial.finalize(self.directory)
        self._closed = True


def write_manifest(directory: str | os.PathLike, config: ModelConfig, *, dtype: str, source: dict, tokenizer: list):
    """Write the manifest (last step of a conversion: its presence marks the directory complete)."""
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "params": PARAMS_DIR,
        "dtype": dtype,
        "config": config_to_dict(config),
        "source": source,
        "tokenizer_files": tokenizer,
    }
    path = Path(directory) / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def is_converted_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like one of our converted checkpoints (it has the manifest)."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """The manifest and config of a converted checkpoint, checked (format, version, finalized Orbax tree)."""
    root = Path(directory)
    path = root / MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{str(root)!r} is not a converted llama32_jax checkpoint (no {MANIFEST})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} manifest")
    if record.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {record.get('version')!r}; this llama32_jax reads version "
            f"{FORMAT_VERSION} (reconvert the source checkpoint)"
        )
    try:
        config = config_from_dict(record["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{str(path)!r}: its config is invalid: {e}") from e
    params = root / record.get("params", PARAMS_DIR)
    if not (params / "commit_success.txt").is_file() and not (params / "_CHECKPOINT_METADATA").is_file():
        raise CheckpointError(f"{str(params)!r} is not a finalized Orbax checkpoint (interrupted conversion?)")
    return record, config


def _abstract_tree(config: ModelConfig, dtype, sharding: Callable[[tuple, tuple], Any] | None) -> dict:
    """ShapeDtypeStructs for our per-layer tree (string keys, as stored), with the shardings asked for."""
    import jax
    from flax import nnx

    from llama32_jax.model import _flatten, abstract_model

    abstract = abstract_model(config.replace(scan_layers=False), param_dtype=dtype)
    flat = _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        spec = sharding(path, shape) if sharding is not None else default
        out[path] = jax.ShapeDtypeStruct(shape, dtype, sharding=spec)
    return _nest(out)


def restore_params(
    directory: str | os.PathLike,
    *,
    param_dtype: Any = None,
    sharding: Callable[[tuple, tuple], Any] | None = None,
) -> tuple[ModelConfig, dict]:
    """Restore a converted checkpoint's parameters: ``(config, per-layer tree of jax.Arrays)``.

    ``param_dtype`` (default: the stored dtype) is the dtype arrays are restored as. ``sharding(path, shape)``
    returns the ``jax.sharding.Sharding`` for one parameter (e.g. a ``NamedSharding`` over a mesh); Orbax reads
    each array straight into it. Default: the first device.
    """
    import jax.numpy as jnp

    record, config = read_manifest(directory)
    dtype = jnp.dtype(param_dtype if param_dtype is not None else record["dtype"])
    v1 = _orbax_v1()
    path = Path(directory) / record.get("params", PARAMS_DIR)
    target = _abstract_tree(config, dtype, sharding)
    load = getattr(v1, "load", None) or v1.load_pytree
    try:
        tree = load(path, target)
    except ValueError as e:  # structure or shape mismatch between the manifest's config and the stored tree
        raise CheckpointError(f"{str(path)!r} does not match the config in its manifest: {e}") from e
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the Orbax checkpoint {str(path)!r}: {e}") from e
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
