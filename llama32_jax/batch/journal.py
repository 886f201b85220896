"""The resume journal and the final output file of :func:`~llama32_jax.batch.batch_generate`.

While a run with ``output=PATH`` goes on, each finished row is appended to ``PATH.partial`` as one JSON line and
flushed. Its first line is a header: the format, a fingerprint of the inputs and generation settings, the number of
rows and the settings themselves (to say what changed when a resumed run does not match). A run that is killed
leaves the journal; the next run with the same inputs and settings loads the finished rows from it (a torn last line,
from a kill in the middle of a write, is dropped) and runs only the others. At the end the whole output is written in
input order to a temporary file beside ``PATH``, moved onto ``PATH`` with ``os.replace`` and the journal is removed,
so ``PATH`` is either absent or complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from llama32_jax.errors import InvalidInputError, StorageError, UnsafePathError

FORMAT = "llama32_jax.batch_generate/1"
RESULT_KEYS = ("index", "id", "status", "text", "prompt_tokens", "output_tokens", "stop_reason", "error")


def fingerprint(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def dumps(row: Mapping[str, Any]) -> str:
    """One output or journal line (no newline): the result keys in their fixed order."""
    return json.dumps({k: row[k] for k in RESULT_KEYS}, ensure_ascii=False)


def check_output_path(output: Any) -> str:
    """``output`` as a path whose directory exists and which is not a directory itself."""
    if not isinstance(output, (str, os.PathLike)) or not os.fspath(output):
        raise InvalidInputError(f"output must be None or a file path (str or os.PathLike), got {output!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.isdir(path):
        raise UnsafePathError(f"output {path!r} is a directory; give the path of the JSONL file to write")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise InvalidInputError(f"output {path!r}: its directory {parent!r} does not exist")
    return path


def refuse_existing(output: str, overwrite: bool) -> None:
    """A finished ``output`` is replaced only with ``overwrite``."""
    if os.path.exists(output) and not overwrite:
        raise UnsafePathError(
            f"output {output!r} already exists (a finished run); pass overwrite=True (--overwrite) to run again "
            "and replace it, or choose another output path"
        )


def journal_path(output: str) -> str:
    return output + ".partial"


def _storage(e: OSError, what: str) -> StorageError:
    return StorageError(f"{what}: [Errno {e.errno}] {e.strerror or e}")


def _is_result(row: Any, n: int) -> bool:
    return (
        isinstance(row, dict)
        and tuple(row) == RESULT_KEYS
        and isinstance(row["index"], int)
        and 0 <= row["index"] < n
        and row["status"] in ("ok", "failed")
    )


def _differences(stored: Mapping, settings: Mapping) -> list[str]:
    keys = sorted(set(stored) | set(settings))
    return [f"{k}: {stored.get(k)!r} then, {settings.get(k)!r} now" for k in keys if stored.get(k) != settings.get(k)]


class Journal:
    """``output``'s journal, opened for appending after loading what an earlier run finished (``done``, by index).

    ``header``: ``{"fingerprint", "rows", "settings"}`` of this run. Raises :class:`UnsafePathError` when ``output``
    exists (unless ``overwrite``), or when the journal belongs to other inputs or settings or is damaged (unless
    ``overwrite``, which discards it; ``resume=False`` refuses an existing journal too)."""

    def __init__(self, output: str, header: Mapping[str, Any], *, resume: bool = True, overwrite: bool = False):
        self.output, self.path = output, journal_path(output)
        self.header = {"format": FORMAT, **header}
        self.done: dict[int, dict] = {}
        refuse_existing(output, overwrite)
        self._file = None
        keep = 0
        if os.path.exists(self.path) and not overwrite:
            if not resume:
                raise UnsafePathError(
                    f"{self.path!r} holds an unfinished run; pass resume=True to finish it or overwrite=True to "
                    "discard it"
                )
            keep = self._load()
        try:
            if keep:
                os.truncate(self.path, keep)  # drops a torn last line, so the next line starts cleanly
                self._file = open(self.path, "a", encoding="utf-8")
            else:
                self._file = open(self.path, "w", encoding="utf-8")
                self._file.write(json.dumps(self.header, sort_keys=True) + "\n")
                self._file.flush()
        except OSError as e:
            self.close()
            raise _storage(e, f"cannot write the journal {self.path!r}") from e

    def _load(self) -> int:
        """Read the journal into ``done``; the number of bytes to keep (0: start it again, it has no header)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _storage(e, f"cannot read the journal {self.path!r}") from e
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # the tail is b"" when the file ends with a newline
        if not complete:
            return 0  # killed while writing the header: nothing finished
        damaged = UnsafePathError(
            f"{self.path!r} is not a journal of batch_generate or is damaged; pass overwrite=True to discard it and "
            "start over"
        )
        try:
            stored = json.loads(complete[0])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise damaged from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise damaged
        if stored.get("fingerprint") != self.header["fingerprint"] or stored.get("rows") != self.header["rows"]:
            changed = _differences(stored.get("settings") or {}, self.header.get("settings") or {})
            what = "settings changed (" + "; ".join(changed) + ")" if changed else "the inputs differ"
            raise UnsafePathError(
                f"{self.path!r} is an unfinished run with different inputs or generation settings: {what}. Run with "
                "the same inputs and settings to resume it, or pass overwrite=True to discard it and start over"
            )
        keep = len(complete[0]) + 1
        n = self.header["rows"]
        for k, raw in enumerate(complete[1:], start=2):
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not _is_result(row, n):
                if k == len(complete) and not tail:  # the last line may be torn even when a newline follows
                    break
                raise UnsafePathError(
                    f"{self.path!r} line {k} is not a result row; the journal is damaged. Pass overwrite=True to "
                    "discard it and start over"
                )
            self.done[row["index"]] = row
            keep += len(raw) + 1
        return keep

    def append(self, row: Mapping[str, Any]) -> None:
        """Record one finished row (flushed, so a killed process keeps it)."""
        try:
            self._file.write(dumps(row) + "\n")
            self._file.flush()
        except OSError as e:
            raise _storage(e, f"cannot write the journal {self.path!r}") from e
        self.done[row["index"]] = dict(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` (every row, in input order) to ``output`` atomically and remove the journal."""
        self.close()
        write_atomic(self.output, rows)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def write_atomic(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as JSONL at ``path``: written to a temporary file beside it, synced, then ``os.replace``d."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _storage(e, f"cannot write the output {path!r}") from e
