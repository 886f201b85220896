"""Path arguments and write safety for conversion and export (``lj.convert``, ``export_hf``, the CLI).

Every path argument goes through :func:`user_path`: ``~`` is expanded and a relative path is made absolute against
the current directory (Orbax insists on absolute paths), so relative paths, ``~`` and symlinks all work. Overlap
and ownership checks compare *real* paths (``..`` and symlinks resolved), so an output reached through ``..`` or a
symlink is recognised as being the source, inside it, or above it.

What an output may replace (``overwrite=True`` / ``--overwrite``): only an empty directory or a complete earlier
output of llama32_jax, and only when it holds nothing else:

- a converted checkpoint: its manifest ``llama32_jax.json`` (written last) names format ``llama32_jax-orbax``; it
  may hold ``params/``, the manifest and the tokenizer files the manifest lists;
- an HF export (``export_hf``, ``--to hf``, ``export_model``): its marker ``llama32_jax_export.json`` (written
  last) names format ``llama32_jax-hf-export`` and lists every file of the export.

Anything else (a non-empty foreign directory, one of ours with extra files in it, a file, ``/``, your home
directory or one above it, a directory holding the source) is refused with
:class:`~llama32_jax.errors.UnsafePathError` naming the path, and nothing is deleted.

A write that fails at the operating-system level (disk full, quota, file too large, read-only file system,
permission denied) becomes a :class:`~llama32_jax.errors.StorageError` naming the output and the OS error.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
from pathlib import Path

from llama32_jax.errors import CheckpointError, InvalidInputError, LlamaJaxError, StorageError, UnsafePathError

MANIFEST = "llama32_jax.json"
ORBAX_FORMAT = "llama32_jax-orbax"
EXPORT_MARKER = "llama32_jax_export.json"
EXPORT_FORMAT = "llama32_jax-hf-export"

_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def user_path(path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` as an absolute :class:`Path`: ``~`` expanded, relative paths taken from the current directory
    (symlinks are kept; :func:`real_path` resolves them). A non-path or empty argument is an
    :class:`InvalidInputError` naming ``what``."""
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise InvalidInputError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a str path, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInputError(f"{what} is an empty path")
    if "\0" in text:
        raise InvalidInputError(f"{what} {text!r} contains a NUL character")
    return Path(os.path.abspath(os.path.expanduser(text)))


def real_path(path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` with ``~``, ``..`` and every symlink resolved (a missing tail is kept as is)."""
    return Path(os.path.realpath(user_path(path, what)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_overlap(source: str | os.PathLike, output: str | os.PathLike) -> None:
    """:class:`UnsafePathError` if ``output`` is ``source``, inside it, or holds it (real paths compared)."""
    src, out = real_path(source, "source"), real_path(output, "output")
    if src == out:
        raise UnsafePathError(f"output {str(out)!r} is the source {str(src)!r}; choose another output directory")
    if _within(out, src):
        raise UnsafePathError(f"output {str(out)!r} lies inside the source {str(src)!r}; write it somewhere else")
    if _within(src, out):
        raise UnsafePathError(
            f"output {str(out)!r} contains the source {str(src)!r}; replacing it would delete the source"
        )


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be an output (root, home or above it), or None."""
    if out == Path(out.anchor):
        return "the file system root"
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if _within(home, out):
        return "your home directory" if out == home else f"a directory above your home directory {str(home)!r}"
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ours(directory: Path) -> tuple[bool, str]:
    """Whether ``directory`` is a complete earlier output of llama32_jax holding nothing else: ``(ok, why not)``."""
    try:
        entries = set(os.listdir(directory))
    except OSError as e:
        return False, f"it cannot be listed ({e.strerror or e})"
    if not entries:
        return True, ""
    if MANIFEST in entries:
        record = _read_json(directory / MANIFEST)
        if record is None or record.get("format") != ORBAX_FORMAT:
            return False, f"its {MANIFEST} is not a readable llama32_jax manifest"
        tokenizer = record.get("tokenizer_files") or []
        allowed = {MANIFEST, str(record.get("params", "params")), *(t for t in tokenizer if isinstance(t, str))}
        if str(record.get("params", "params")) not in entries:
            return False, "it has a manifest but no parameters (an incomplete copy?)"
    elif EXPORT_MARKER in entries:
        record = _read_json(directory / EXPORT_MARKER)
        files = record.get("files") if record is not None else None
        if record is None or record.get("format") != EXPORT_FORMAT or not isinstance(files, list):
            return False, f"its {EXPORT_MARKER} is not a readable llama32_jax export marker"
        allowed = {EXPORT_MARKER, *(f for f in files if isinstance(f, str))}
    else:
        return False, f"it is not an output of llama32_jax (no {MANIFEST} or {EXPORT_MARKER})"
    extra = sorted(entries - allowed)
    if extra:
        return False, f"it holds files that are not part of a llama32_jax output: {extra[:5]}"
    return True, ""


def check_output(
    output: str | os.PathLike, *, overwrite: bool, source: str | os.PathLike | None = None, what: str = "output"
) -> Path:
    """Validate an output path before anything is written; returns its real path.

    Refused with :class:`UnsafePathError`: an output that overlaps ``source`` (either way), the root or home
    directory (or above), an existing file, an existing directory that is not an earlier output of ours
    (:func:`ours`), a parent that is a file. An existing output of ours needs ``overwrite`` (else
    :class:`CheckpointError`). An unwritable parent is a :class:`StorageError`.
    """
    if not isinstance(overwrite, bool):
        raise InvalidInputError(f"overwrite must be True or False, got {overwrite!r}")
    out = real_path(output, what)
    why = _protected(out)
    if why is not None:
        raise UnsafePathError(f"{what} {str(out)!r} is {why}; refusing to write there")
    if source is not None:
        refuse_overlap(source, out)
    if out.exists():
        if not out.is_dir():
            raise UnsafePathError(f"{what} {str(out)!r} exists and is a file, not a directory; it is not replaced")
        ok, why = ours(out)
        if not ok:
            raise UnsafePathError(
                f"{what} directory {str(out)!r} already exists and {why}; overwrite only replaces an empty directory "
                "or an earlier llama32_jax output. Choose a new directory (or remove this one yourself)"
            )
        if not overwrite:
            raise CheckpointError(
                f"{what} directory {str(out)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
            )
        return out
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnsafePathError(f"{what} {str(out)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        err = StorageError(
            f"cannot write {what} {str(out)!r}: {str(ancestor)!r} is not writable "
            "(permission denied or a read-only file system)"
        )
        err.errno = _errno.EACCES  # (filename and strerror stay unset: they would replace the message in str())
        raise err
    return out


def check_source_dir(path: str | os.PathLike, what: str = "checkpoint path") -> Path:
    """An existing, readable source path as an absolute :class:`Path` (symlinks kept), else :class:`CheckpointError`
    naming it."""
    p = user_path(path, what)
    if not p.exists():
        hint = " (a dangling symlink)" if p.is_symlink() else ""
        raise CheckpointError(f"{what} {str(p)!r} does not exist{hint}")
    mode = os.R_OK | (os.X_OK if p.is_dir() else 0)
    if not os.access(p, mode):
        raise CheckpointError(f"{what} {str(p)!r} is not readable (permission denied)")
    return p


# --------------------------------------------------------------------------------------------- errors


def short(error: BaseException, limit: int = 300) -> str:
    """A short description of ``error``: the most specific message in its chain (TensorStore's spec dumps and
    multi-line tree dumps cut), at most ``limit`` characters."""
    best = error
    seen = 0
    cause = error.__cause__
    while cause is not None and seen < 8:  # Orbax wraps TensorStore's precise error in a generic one
        if str(cause).strip():
            best = cause
        cause, seen = cause.__cause__, seen + 1
    text = str(best).strip() or type(best).__name__
    text = text.split(" [tensorstore_spec=")[0].split(". See full TensorStore details")[0]
    text = text.splitlines()[0] if text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_errno(error: BaseException) -> int | None:
    """The errno behind ``error`` (an ``OSError``, or TensorStore's ``[os_error_code=N]`` text), if any."""
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_CODE.search(str(e))
        if m:
            return int(m.group(1))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def storage_error(error: BaseException, output: str | os.PathLike, what: str = "writing") -> StorageError:
    """A :class:`StorageError` for a failed write under ``output``, naming it and the OS error."""
    code = os_errno(error)
    reason = f"[Errno {code}] {os.strerror(code)}" if code else short(error)
    hint = ""
    if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        hint = " (free some space, or write elsewhere)"
    err = StorageError(f"{what} {str(output)!r} failed: {reason}{hint}; nothing was left behind")
    err.errno = code  # (filename and strerror stay unset: they would replace the message in str())
    return err


def as_write_error(error: BaseException, output: Path, tmp: Path) -> BaseException:
    """The typed error for an exception raised while writing ``tmp`` (the temporary of ``output``): typed errors
    pass through; an OS-level error on a file outside ``tmp`` (reading the source) is a :class:`CheckpointError`;
    any other OS-level error (or TensorStore's report of one) is a :class:`StorageError`."""
    if isinstance(error, StorageError) and str(tmp) in str(error):
        return storage_error(error, output)  # name the output the user asked for, not our temporary directory
    if isinstance(error, LlamaJaxError) or not isinstance(error, Exception):
        return error
    if isinstance(error, OSError):
        name = getattr(error, "filename", None)
        if name and not _within(Path(os.path.abspath(name)), tmp) and not _within(Path(os.path.abspath(name)), output):
            return CheckpointError(f"cannot read {name!r}: {short(error)}")
        return storage_error(error, output)
    if os_errno(error) is not None:
        return storage_error(error, output)
    return error
