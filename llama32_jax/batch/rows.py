"""Input rows of :func:`~llama32_jax.batch.batch_generate`: where they come from and what a valid row is.

``inputs`` is a path to a JSONL file (one row per line; blank lines are skipped), a list, or a random-access data
source (anything with ``__len__`` and ``__getitem__``, e.g. ``grain.python.InMemoryDataSource`` or
``grain.MapDataset``). A row is a string (the prompt) or a dict with exactly one of

- ``"prompt"``: a non-empty string, encoded as plain text (with ``"images"``, each ``<|image|>`` marks an image);
- ``"messages"``: a chat dialog, a list of ``{"role", "content"}`` messages (content a string or a list of
  ``{"type": "text", "text"}`` / ``{"type": "image", "image": path}`` parts), encoded with the model's chat format;

and optionally ``"id"`` (a string or an int, copied to the output), ``"images"`` (prompt rows of a vision model:
image file paths, one per ``<|image|>``) and per-row ``"max_new_tokens"``, ``"temperature"``, ``"top_k"``,
``"top_p"``, ``"seed"`` (the same rules as :meth:`~llama32_jax.api.Model.generate`'s arguments). Any other key, a
wrong type or an invalid value makes the row bad (:class:`BadRow`, naming the JSONL line or the row index).
Relative image paths in a JSONL file are resolved against the file's directory; elsewhere against the working
directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.checks import max_new_tokens_list, sampling_lists

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
ROW_KEYS = ("id", "prompt", "messages", "images", *SAMPLING_KEYS)
MAX_LISTED = 5  # bad rows quoted in the error message


@dataclasses.dataclass(frozen=True)
class Row:
    """A valid input row. ``where`` names it in messages (``"line 3"`` of a JSONL file, else ``"row 2"``);
    ``settings`` holds the per-row sampling values it gives (checked)."""

    index: int
    where: str
    id: str | int | None
    prompt: str | None = None
    messages: list | None = None
    images: list | None = None
    settings: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that cannot run: ``error`` says why (``id`` is kept when the row had a valid one)."""

    index: int
    where: str
    id: str | int | None
    error: str


@dataclasses.dataclass(frozen=True)
class Rows:
    """Every row of an input, in order, and the directory relative image paths are resolved against."""

    rows: list[Row | BadRow]
    name: str  # the input in messages: the file's path, "inputs"
    base_dir: str

    @property
    def bad(self) -> list[BadRow]:
        return [r for r in self.rows if isinstance(r, BadRow)]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _short(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:50]}{'...' if len(text) > 50 else ''}"


def check_row(value: Any, index: int, where: str) -> Row | BadRow:
    """One row (a str or a dict) -> :class:`Row`, or :class:`BadRow` saying what is wrong."""
    if isinstance(value, str):
        if not value:
            return BadRow(index, where, None, "the prompt is an empty string")
        return Row(index, where, None, prompt=value)
    if not isinstance(value, Mapping):
        return BadRow(index, where, None, f"a row must be a string (a prompt) or an object, got {_short(value)}")
    row_id = value.get("id")
    if row_id is not None and not (isinstance(row_id, str) or _is_int(row_id)):
        return BadRow(index, where, None, f"'id' must be a string or an int, got {_short(row_id)}")
    row_id = int(row_id) if _is_int(row_id) else row_id

    def bad(message: str) -> BadRow:
        return BadRow(index, where, row_id, message)

    unknown = [k for k in value if k not in ROW_KEYS]
    if unknown:
        return bad(f"unknown key(s) {sorted(map(str, unknown))}; valid keys are {list(ROW_KEYS)}")
    has_prompt, has_messages = "prompt" in value, "messages" in value
    if has_prompt == has_messages:
        what = "both" if has_prompt else "neither"
        return bad(f"a row needs exactly one of 'prompt' (a string) or 'messages' (a chat dialog); it has {what}")
    prompt, messages, images = value.get("prompt"), value.get("messages"), value.get("images")
    if has_prompt and (not isinstance(prompt, str) or not prompt):
        return bad(f"'prompt' must be a non-empty string, got {_short(prompt)}")
    if has_messages and (not isinstance(messages, list) or not messages):
        return bad(f"'messages' must be a non-empty list of {{'role', 'content'}} messages, got {_short(messages)}")
    if "images" in value:
        if has_messages:
            return bad("'images' goes with 'prompt' rows; in 'messages' give images as {'type': 'image'} parts")
        if not isinstance(images, list):
            return bad(f"'images' must be a list of image file paths, got {_short(images)}")
        for j, image in enumerate(images):
            path_like = isinstance(image, (str, os.PathLike)) and os.fspath(image) != ""
            if not (path_like or isinstance(image, (Image.Image, np.ndarray))):
                return bad(f"'images'[{j}] must be an image file path, got {_short(image)}")
    settings = {k: value[k] for k in SAMPLING_KEYS if k in value}
    try:
        if "max_new_tokens" in settings:
            max_new_tokens_list(settings["max_new_tokens"], 1)
        sampling_lists(
            1,
            2**62,
            settings.get("temperature", 0.0),
            settings.get("top_k", 0),
            settings.get("top_p", 1.0),
            settings.get("seed", 0),
        )
    except InvalidInputError as e:
        return bad(str(e))
    return Row(
        index,
        where,
        row_id,
        prompt=prompt if has_prompt else None,
        messages=messages if has_messages else None,
        images=list(images) if images is not None else None,
        settings=settings,
    )


def _jsonl_rows(path: str) -> list[Row | BadRow]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidInputError(f"cannot read the input file {path!r}: {e.strerror or e}") from e
    rows: list[Row | BadRow] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(
                BadRow(len(rows), where, None, f"not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})")
            )
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(BadRow(len(rows), where, None, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        rows.append(check_row(value, len(rows), where))
    return rows


def read_rows(inputs: Any) -> Rows:
    """Read and check every row of ``inputs`` (see the module docstring). An input that is none of the accepted
    kinds, a missing file or an input without rows is an :class:`~llama32_jax.errors.InvalidInputError`."""
    if isinstance(inputs, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(inputs))
        if not path:
            raise InvalidInputError("inputs is an empty path; pass a JSONL file, a list of rows or a data source")
        if not os.path.exists(path):
            raise InvalidInputError(f"the input file {path!r} does not exist")
        if not os.path.isfile(path):
            raise InvalidInputError(f"the input {path!r} is not a file; pass a JSONL file with one row per line")
        rows, name, base = _jsonl_rows(path), path, os.path.dirname(os.path.abspath(path))
    elif isinstance(inputs, (list, tuple)):
        rows = [check_row(v, i, f"row {i}") for i, v in enumerate(inputs)]
        name, base = "inputs", os.getcwd()
    elif hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__") and not isinstance(inputs, (bytes, Mapping)):
        rows = [check_row(inputs[i], i, f"row {i}") for i in range(len(inputs))]
        name, base = f"inputs ({type(inputs).__name__})", os.getcwd()
    else:
        raise InvalidInputError(
            "inputs must be a JSONL file path, a list of rows (prompt strings or dicts) or a random-access data "
            f"source (__len__ and __getitem__, e.g. grain.python.InMemoryDataSource), got {_short(inputs)}"
        )
    if not rows:
        raise InvalidInputError(f"{name} holds no rows")
    return Rows(rows, name, base)


def describe_bad(bad: list[BadRow], name: str) -> str:
    """The error message for bad rows: how many, and the first few with what is wrong."""
    listed = "; ".join(f"{b.where}: {b.error}" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return (
        f"{len(bad)} bad row(s) in {name}: {listed}{more}. Fix them, or pass bad_rows='fail' to write them as "
        "failed results and run the rest"
    )


def resolve_image(image: Any, base_dir: str) -> Any:
    """A relative image path joined to ``base_dir``; anything else as given."""
    if isinstance(image, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(image))
        return path if os.path.isabs(path) else os.path.join(base_dir, path)
    return image
