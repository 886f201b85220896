"""Streaming conversion of Meta and HF checkpoint directories into our Orbax checkpoints (``llama32_jax.convert``).

The converter never holds the model: it reads one tensor at a time (Meta shards merged by Meta's column/row
rules, ``meta.SHARD_DIMS``, through bounded memory maps; HF safetensors file by file), maps it through the key
tables (strict: an unused source key, a shape mismatch or an unfilled parameter is a
:class:`~llama32_jax.errors.CheckpointError` naming the key), casts it, and hands it to an Orbax writer that
flushes every few hundred MB. Peak host memory is therefore a small
multiple of the largest tensor, whatever the model size (``experiments/bench_convert.py`` measures it).

With ``quantize`` (``"int8"``, ``"int4"`` or a :class:`~llama32_jax.quant.QuantConfig`) every weight that
:func:`~llama32_jax.models.quantize.quant_targets` names is quantized as soon as it is mapped, from the source's own
values, a block of output channels at a time (:func:`quantize_weight`), and written as its int values plus fp32
scale; the float copy is dropped at once, so the memory bound is the float conversion's. The other parameters are
cast to ``dtype``. The manifest records the :class:`QuantConfig`; an int4 group size that does not divide a
weight's input dimension is a :class:`~llama32_jax.errors.QuantizationError` raised before anything is written.

Everything is written inside a temporary sibling of the output (``.<name>.converting-<pid>-<id>``), which is
renamed into place only when complete: an interrupted or failed run leaves no output directory, and its temporary
directory is removed on failure, or by the next run once the process that made it is gone (after a SIGKILL).

Paths may be relative, start with ``~`` or pass through symlinks; the output must not overlap the source, and
``overwrite`` replaces only an empty directory or a complete earlier output of ours
(:mod:`llama32_jax.checkpoint.safety`). A failed write (disk full ...) is a
:class:`~llama32_jax.errors.StorageError` naming the output; the source's tokenizer is loaded before anything is
written, so a corrupt one is a :class:`~llama32_jax.errors.TokenizerError` and not copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from llama32_jax.checkpoint.convert_vision import tensor_mapper
from llama32_jax.checkpoint.hf import hf_weight_files, iter_hf_tensors, safetensors_header
from llama32_jax.checkpoint.meta import MetaShards, read_params_json
from llama32_jax.checkpoint.orbax_ckpt import MANIFEST, PARAMS_DIR, ParamWriter, write_manifest
from llama32_jax.checkpoint.safety import as_write_error, check_source_dir, ours, short, storage_error
from llama32_jax.checkpoint.safety import check_output as _check_output
from llama32_jax.configs.base import DTYPES, ModelConfig
from llama32_jax.configs.hf import from_hf_config
from llama32_jax.configs.readers import from_params_json
from llama32_jax.errors import CheckpointError, InvalidInputError, TokenizerError, UnsafePathError
from llama32_jax.inputs import tokenizer as tokenizers
from llama32_jax.models.build import abstract_model
from llama32_jax.models.quantize import Target, quant_targets
from llama32_jax.quant.arrays import quantize as quantize_array
from llama32_jax.quant.arrays import scale_shape
from llama32_jax.quant.config import QuantConfig, resolve_quantize

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
QUANT_BLOCK_BYTES = 64 * 2**20  # fp32 bytes of one block of output channels quantized at once
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>converting|replaced)-(?P<pid>\d+)-[0-9a-f]+$")


@dataclass
class Source:
    """A checkpoint to convert: its format, config, tensor index and a one-pass tensor stream."""

    fmt: str  # "meta" | "hf"
    path: Path
    config: ModelConfig
    nbytes: dict[str, int]
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]
    tokenizer_files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def detect_format(path: str | os.PathLike) -> str:
    """``"meta"`` (params.json), ``"hf"`` (config.json), ``"orbax"`` (our manifest) or ``"gguf"`` (a .gguf file).

    ``path`` may be relative, start with ``~`` or be a symlink; a missing or unreadable path is a
    :class:`CheckpointError` naming it."""
    p = check_source_dir(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"{str(p)!r} is a file; expected a checkpoint directory (Meta, HF or converted Orbax)")
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is neither a checkpoint directory nor a .gguf file")
    if (p / MANIFEST).is_file():
        return "orbax"
    if (p / "params.json").is_file():
        return "meta"
    if (p / "config.json").is_file():
        return "hf"
    if any(p.glob("consolidated*.pth")):
        raise CheckpointError(f"{str(p)!r} holds consolidated*.pth shards but no params.json (Meta's config)")
    if any(p.glob("*.safetensors")):
        raise CheckpointError(f"{str(p)!r} holds safetensors files but no config.json (HF's config)")
    raise CheckpointError(
        f"{str(p)!r} is not a checkpoint directory: expected params.json + consolidated.NN.pth (Meta), "
        f"config.json + *.safetensors (HF) or {MANIFEST} (converted)"
    )


def meta_source(
    path: Path,
    *,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    config: ModelConfig | None = None,
) -> Source:
    params_json = read_params_json(path)
    shards = MetaShards(path)
    head, embed = "output.weight", "tok_embeddings.weight"
    both = head in shards.shapes and embed in shards.shapes
    verified = False
    if config is None:
        if tie_embeddings is None and both:
            tie_embeddings = verified = shards.equal(head, embed)
        config = from_params_json(params_json, rope_factor=rope_factor, tie_embeddings=tie_embeddings, name=path.name)
    skip: set[str] = set()
    if config.text.tie_embeddings and both:
        # A tied head is not stored: check it equals the embedding (chunk by chunk, no copies), then never read it.
        if not verified and not shards.equal(head, embed):
            raise CheckpointError(
                f"{head!r} differs from {embed!r} but {config.name} ties the output head to the embedding "
                "(pass tie_embeddings=False / --untied)"
            )
        skip.add(head)

    def tensors():
        for key in shards.keys:
            if key not in skip:
                yield key, shards.tensor(key)

    nbytes = {k: v for k, v in shards.nbytes.items() if k not in skip}
    tok = path / "tokenizer.model"
    return Source("meta", path, config, nbytes, tensors, [tok] if tok.is_file() else [])


def hf_source(path: Path, *, config: ModelConfig | None = None) -> Source:
    if config is None:
        config = from_hf_config(path, name=path.name)
    nbytes: dict[str, int] = {}
    for file in hf_weight_files(path):
        try:
            _, entries = safetensors_header(file)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the safetensors header of {str(file)!r} (truncated or corrupt?)") from e
        for key, entry in entries.items():
            begin, end = entry.get("data_offsets", (0, 0)) if isinstance(entry, dict) else (0, 0)
            nbytes[key] = int(end) - int(begin)
    toks = [path / n for n in HF_TOKENIZER_FILES if (path / n).is_file()]
    return Source("hf", path, config, nbytes, lambda: iter_hf_tensors(path), toks)


def open_source(
    path: str | os.PathLike,
    *,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    config: ModelConfig | None = None,
) -> Source:
    """Open a Meta or HF checkpoint directory for conversion (reads its config and tensor index only).

    ``config`` replaces the one the directory's params.json / config.json describes (e.g. for a checkpoint whose
    shapes Meta's params.json cannot express); the tensors must then fit it exactly.
    """
    p = check_source_dir(path, "source")
    fmt = detect_format(p)
    if config is not None and not isinstance(config, ModelConfig):
        raise InvalidInputError(f"config must be a llama32_jax ModelConfig, got {type(config).__name__}")
    if config is not None and (rope_factor is not None or tie_embeddings is not None):
        raise InvalidInputError("pass either config or rope_factor / tie_embeddings, not both")
    if fmt == "meta":
        return meta_source(p, rope_factor=rope_factor, tie_embeddings=tie_embeddings, config=config)
    if rope_factor is not None or tie_embeddings is not None:
        raise InvalidInputError("rope_factor and tie_embeddings apply to Meta sources only (HF config.json has both)")
    if fmt == "hf":
        return hf_source(p, config=config)
    if fmt == "orbax":
        raise CheckpointError(f"{str(p)!r} is already a converted llama32_jax checkpoint (load it with lj.load)")
    raise CheckpointError(f"{str(p)!r}: GGUF files are loaded directly with lj.load, not converted")


# --------------------------------------------------------------------------------------------------------------
# Output directory handling: temporary siblings, stale-run cleanup, atomic publish.


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(output: Path, kind: str = "converting") -> list[Path]:
    """Temporary siblings of ``output`` left by runs whose process no longer exists."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in output.parent.iterdir():
            m = _TEMP.match(entry.name)
            if m and m["name"] == output.name and m["kind"] == kind and not _pid_alive(int(m["pid"])):
                out.append(entry)
    return out


def _temp_sibling(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def check_output(output: str | os.PathLike, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Validate an output path before anything is written; returns its real path (see
    :func:`llama32_jax.checkpoint.safety.check_output`: no overlap with ``source`` either way, and ``overwrite``
    replaces only an empty directory or a complete earlier output of ours)."""
    return _check_output(output, overwrite=overwrite, source=source)


@contextlib.contextmanager
def atomic_directory(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``output``; on success rename it to ``output``, on any error remove it.

    Stale temporaries of runs that were killed are removed first. With ``overwrite`` an existing output (checked
    again at publish time: only an empty directory or an earlier output of ours) is moved aside, replaced, then
    deleted. An OS-level failure while writing (disk full, quota, read-only ...) is a :class:`StorageError` naming
    ``output``; the temporary directory is removed either way.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, output.parent, "creating the parent directory") from e
    for stale in stale_temporaries(output):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _temp_sibling(output, "converting")
    try:
        tmp.mkdir()
    except OSError as e:
        raise storage_error(e, output, "creating a temporary directory beside") from e
    try:
        try:
            yield tmp
        except Exception as e:
            typed = as_write_error(e, output, tmp)
            if typed is e:
                raise
            raise typed from e
        if output.exists() or output.is_symlink():
            if not overwrite:
                raise CheckpointError(f"output directory {str(output)!r} appeared while converting; not replaced")
            ok, why = ours(output) if output.is_dir() and not output.is_symlink() else (False, "it is not a directory")
            if not ok:
                raise UnsafePathError(f"output {str(output)!r} changed while writing and {why}; it is not replaced")
            old = _temp_sibling(output, "replaced")
            try:
                os.rename(output, old)
            except OSError as e:
                raise storage_error(e, output, "moving aside the earlier") from e
            try:
                os.rename(tmp, output)
            except OSError as e:
                os.rename(old, output)  # put the earlier output back
                raise storage_error(e, output, "publishing") from e
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, output)
            except OSError as e:
                raise storage_error(e, output, "publishing") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in stale_temporaries(output, "replaced"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def check_flush_bytes(flush_bytes) -> int:
    """``flush_bytes`` as an int: a finite number >= 0 (0: write every tensor on its own)."""
    import math

    if isinstance(flush_bytes, bool) or not isinstance(flush_bytes, int | float):
        raise InvalidInputError(f"flush_bytes must be a number of bytes >= 0, got {type(flush_bytes).__name__}")
    if not math.isfinite(flush_bytes) or flush_bytes < 0:
        raise InvalidInputError(f"flush_bytes must be a finite number of bytes >= 0, got {flush_bytes!r}")
    return int(flush_bytes)


def check_tokenizer(src: Source) -> None:
    """Load the source's tokenizer the way ``llama32_jax.load`` will load the output's, before anything is written:
    a corrupt or unreadable ``tokenizer.json`` / ``tokenizer.model`` is a :class:`TokenizerError` naming it."""
    names = {f.name for f in src.tokenizer_files}
    if not names & {"tokenizer.json", "tokenizer.model"}:
        return
    which = src.path / ("tokenizer.json" if "tokenizer.json" in names else "tokenizer.model")
    try:
        tokenizers.load_tokenizer(src.path)  # looked up at call time (tests replace it)
    except TokenizerError as e:
        raise TokenizerError(f"the source's tokenizer cannot be loaded, so nothing was converted: {e}") from e
    except Exception as e:  # e.g. PermissionError, or a parser's own exception type
        raise TokenizerError(
            f"cannot load the source's tokenizer {str(which)!r}, so nothing was converted: {short(e)}"
        ) from e


def quant_plan(config: ModelConfig, quant: QuantConfig | None) -> dict[tuple[str, ...], Target]:
    """``{kernel path (string keys, as the mapper's paths print): Target}`` of the per-layer tree under ``quant``
    (empty without it). Builds the quantized abstract model first (no memory), so an int4 group size that does
    not divide a weight's input dimension is a :class:`QuantizationError` before anything is written."""
    if quant is None:
        return {}
    per_layer = config.replace(scan_layers=False)
    abstract_model(per_layer, quant=quant)
    return {tuple(map(str, k)): t for k, t in quant_targets(per_layer, quant).items()}


def quantize_weight(w: np.ndarray, target: Target, block_bytes: int = QUANT_BLOCK_BYTES):
    """``w [*out, *in]`` -> ``(q, scale)`` exactly as :func:`llama32_jax.quant.arrays.quantize` computes them,
    a block of output channels at a time: each channel's (int8) or group's (int4) scale depends on its own inputs
    only, so blocks give the same bits while the fp32 temporaries stay under ``block_bytes``."""
    shape = tuple(w.shape)
    sshape = scale_shape(shape, target.n_in, target.mode, target.group)
    n_out = int(np.prod(shape[: len(shape) - target.n_in], dtype=np.int64))
    n_in = int(np.prod(shape[len(shape) - target.n_in :], dtype=np.int64))
    rows = w.reshape(n_out, n_in)
    q = np.empty((n_out, n_in), np.int8 if target.mode == "int8" else ml_dtypes.int4)
    scale = np.empty((n_out, *sshape[len(shape) - target.n_in :]), np.float32)
    step = max(1, block_bytes // (4 * n_in))
    for r in range(0, n_out, step):
        q[r : r + step], scale[r : r + step] = quantize_array(rows[r : r + step], 1, target.mode, target.group)
    return q.reshape(shape), scale.reshape(sshape)


# --------------------------------------------------------------------------------------------------------------


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    flush_bytes: int = 256 * 2**20,
    compress: bool = False,
    config: ModelConfig | None = None,
    quantize: str | QuantConfig | None = None,
) -> Path:
    """Convert a Meta or HF checkpoint directory into a llama32_jax Orbax checkpoint at ``output``.

    ``source``: a Meta directory (``params.json``, ``consolidated.NN.pth``, ``tokenizer.model``) or an HF
    directory (``config.json``, safetensors, tokenizer files); the format is detected. Both paths may be relative,
    start with ``~`` or pass through symlinks; they must not overlap (either way: :class:`UnsafePathError`).
    ``dtype``: the stored parameter dtype (``"bfloat16"``, ``"float32"`` or ``"float16"``). ``overwrite``: replace
    an existing output, which must be an empty directory or a complete earlier output of ours holding nothing else
    (anything else is an :class:`UnsafePathError` and is left untouched); without it an existing output is an
    error. ``rope_factor`` / ``tie_embeddings``: Meta sources only, as in
    :func:`~llama32_jax.configs.from_params_json` (``tie_embeddings=None`` decides from the tensors).
    ``config``: use this config instead of the directory's (the tensors must fit it exactly).
    ``quantize``: ``"int8"`` / ``"int4"`` / a :class:`~llama32_jax.quant.QuantConfig` (group size, parts kept in
    float) writes a quantized checkpoint (see the module docstring); ``dtype`` then applies to the parameters that
    stay float. An int4 group size that does not divide a weight's input dimension is a
    :class:`~llama32_jax.errors.QuantizationError` raised before anything is written.
    ``flush_bytes``: how much is queued before each Orbax write (a finite number >= 0). ``compress``:
    zstd-compress the stored arrays (smaller files, but Orbax then holds a compressed copy of each write in memory).

    The source's tokenizer is loaded first (a corrupt one is a :class:`TokenizerError`; nothing is written). Streams
    tensor by tensor and publishes atomically (see the module docstring); a failed write (disk full ...) is a
    :class:`~llama32_jax.errors.StorageError` and leaves nothing behind. Returns the output's real path. Load the
    result with ``llama32_jax.load(output)``.
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    flush_bytes = check_flush_bytes(flush_bytes)
    quant = resolve_quantize(quantize)
    np_dtype = np.dtype(dtype)
    src = open_source(source, rope_factor=rope_factor, tie_embeddings=tie_embeddings, config=config)
    out = check_output(output, overwrite=overwrite, source=src.path)
    check_tokenizer(src)
    config = src.config
    targets = quant_plan(config, quant)
    mapper = tensor_mapper(config, src.fmt)
    digests: dict[str, str] = {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ParamWriter(tmp / PARAMS_DIR, flush_bytes=flush_bytes, compress=compress)
        bar = tqdm(
            total=src.total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"converting {config.name}",
            disable=not progress,
        )
        with bar:
            for key, array in src.tensors():
                if mapper.tied_head_key is not None and key in (mapper.embed_key, mapper.tied_head_key):
                    digests[key] = hashlib.blake2b(
                        np.ascontiguousarray(array).view(np.uint8), digest_size=16
                    ).hexdigest()
                mapped = mapper.map(key, array)
                bar.update(src.nbytes.get(key, array.nbytes))
                for path, value in mapped:
                    target = targets.get(tuple(map(str, path)))
                    if target is None:
                        writer.add(path, np.asarray(value).astype(np_dtype, copy=False))
                        continue
                    q, scale = quantize_weight(np.asarray(value), target)
                    writer.add(path, q)
                    writer.add(target.scale_path, scale)
                    del q, scale
                del array, mapped
            mapper.finish()
            head = mapper.tied_head_key
            if head in digests and digests[head] != digests.get(mapper.embed_key):
                raise CheckpointError(
                    f"{head!r} differs from {mapper.embed_key!r} but {config.name} ties the output head to the "
                    "embedding (for a Meta source pass tie_embeddings=False / --untied)"
                )
            writer.close()
        names = []
        for file in src.tokenizer_files:
            shutil.copy2(file, tmp / file.name)
            names.append(file.name)
        record = {"format": src.fmt, "path": os.path.realpath(src.path)}
        write_manifest(tmp, config, dtype=dtype, source=record, tokenizer=names, quant=quant)
        _fsync_tree(tmp)
    return out
