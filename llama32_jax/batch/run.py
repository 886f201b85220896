"""``batch_generate``: every row of a dataset through the continuous-batching engine, resumable, in input order."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from llama32_jax.api import Model
from llama32_jax.batch.journal import Journal, check_output_path, fingerprint
from llama32_jax.batch.rows import BadRow, Row, Rows, describe_bad, read_rows, resolve_image
from llama32_jax.errors import InvalidInputError
from llama32_jax.inference.engine import Engine, Request
from llama32_jax.inputs.chat_format import dialog_images
from llama32_jax.inputs.checks import check_bool, max_new_tokens_list, sampling_lists, stop_lists
from llama32_jax.inputs.image import load_image

BAD_ROWS = ("error", "fail")


def _positive_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{name} must be None or an int >= 1, got {value!r}")
    return int(value)


def _image_identity(image: Any) -> Any:
    """What a fingerprint records of an image: its path, or a hash of its pixels."""
    if isinstance(image, str):
        return image
    if isinstance(image, Image.Image):
        return ["pil", image.mode, list(image.size), hashlib.sha256(image.tobytes()).hexdigest()]
    array = np.ascontiguousarray(image)
    return ["array", str(array.dtype), list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()]


def _loader(images: list, where: str) -> Callable[[], list]:
    """Reads the row's images when the engine admits it; an unreadable one fails only this row."""

    def load() -> list:
        return [load_image(image, where=f"image {j}") for j, image in enumerate(images)]

    return load


class _Prepared:
    """A tokenized row: its prompt ids, sampling values and images (resolved paths or in-memory images)."""

    def __init__(self, row: Row, tokens: list[int], images: list, settings: dict):
        self.row, self.tokens, self.images, self.settings = row, tokens, images, settings


def _prepare(model, row: Row, rows: Rows, defaults: dict, add_bos, chat_options: dict) -> _Prepared | BadRow:
    config = model.config
    try:
        if row.messages is not None:
            fmt = model._get_chat_format()
            tokens = model._model_ids(fmt.encode_dialog(row.messages, add_generation_prompt=True, **chat_options))
            images = dialog_images(row.messages, text_model=None if config.is_vision else config.name)
        else:
            images = row.images or []
            if images and not config.is_vision:
                raise InvalidInputError(f"{config.name} is a text model; images are not accepted")
            tokens = model._model_ids(model._encode_prompt(row.prompt, row.index, add_bos, images=bool(images)))
        if config.is_vision:
            markers = sum(1 for t in tokens if t == config.image_token_id)
            if markers != len(images):
                raise InvalidInputError(
                    f"the prompt has {markers} <|image|> marker(s) but {len(images)} image(s); give one image per "
                    "<|image|>"
                )
    except InvalidInputError as e:
        return BadRow(row.index, row.where, row.id, str(e))
    settings = {**defaults, **row.settings}
    return _Prepared(row, tokens, [resolve_image(im, rows.base_dir) for im in images], settings)


def _result(index: int, row_id, *, status: str, prompt_tokens: int = 0, text=None, output_tokens: int = 0,
            stop_reason=None, error=None) -> dict:  # fmt: skip
    return {
        "index": index,
        "id": row_id,
        "status": status,
        "text": text,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "stop_reason": stop_reason,
        "error": error,
    }


def _row_error(error: str, k: int, where: str) -> str:
    """The engine's message about its request ``k``, naming the input row instead."""
    for prefix in (f"request {k}: ", f"request {k} "):
        if error.startswith(prefix):
            return f"{where}{prefix[len(f'request {k}') :]}{error[len(prefix) :]}"
    return f"{where}: {error}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def batch_generate(
    model,
    inputs: Any,
    output: Any = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Any = None,
    slots: int | None = None,
    max_len: int | None = None,
    add_bos: bool | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    chat_options: Mapping[str, Any] | None = None,
    bad_rows: str = "error",
) -> list[dict]:
    """Generate a completion for every row of ``inputs`` with ``model`` (an :class:`~llama32_jax.api.Model` with a
    tokenizer), continuously batched by :class:`~llama32_jax.inference.engine.Engine` (``slots`` sequences at a
    time, a cache of ``max_len`` positions each; defaults: the engine's).

    ``inputs``: a JSONL file, a list or a random-access data source of rows (see :mod:`llama32_jax.batch.rows`:
    prompt strings, or dicts with ``"prompt"`` or ``"messages"``, optional ``"id"``, ``"images"`` and per-row
    sampling values overriding the arguments here). Every row is read, checked and tokenized before anything is
    generated; with ``bad_rows="error"`` any bad row raises :class:`~llama32_jax.errors.InvalidInputError` listing
    the first few (JSONL line numbers and what is wrong); ``bad_rows="fail"`` writes them as failed results and runs
    the rest. Images are read only when their row starts, so an unreadable image fails that row alone; so does a row
    longer than the cache or the model context.

    Returns one dict per row, in input order: ``index``, ``id`` (the row's or None), ``status`` (``"ok"`` or
    ``"failed"``), ``text`` (stop token excluded; None if failed), ``prompt_tokens``, ``output_tokens`` (the stop
    token included, as in :class:`~llama32_jax.api.Completion`), ``stop_reason`` (``"stop"``, ``"length"``, None if
    failed) and ``error`` (why it failed, else None). Each equals what ``model.generate`` gives for the row alone.

    ``output``: also write the rows there as JSONL. Finished rows are journaled to ``output + ".partial"`` as they
    complete; a run that was interrupted resumes from it (``resume=True``, the same inputs and settings, else an
    :class:`~llama32_jax.errors.UnsafePathError` saying what changed), and the result is byte-identical to an
    uninterrupted run. The file is written atomically at the end. An existing ``output`` is an ``UnsafePathError``
    unless ``overwrite=True``, which also discards a journal. ``progress``: a tqdm bar with the tokens/s generated.
    ``chat_options``: the chat format's options for ``"messages"`` rows (as :meth:`~llama32_jax.api.Model.chat`'s).
    """
    if not isinstance(model, Model):
        raise InvalidInputError(
            f"model must be an llama32_jax Model (lj.load(...) or Model(module, tokenizer)), got {type(model).__name__}"
        )
    tokenizer = model._require_tokenizer()
    config = model.config
    vocab = config.text.vocab_size
    if bad_rows not in BAD_ROWS:
        raise InvalidInputError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    resume, overwrite = check_bool(resume, "resume"), check_bool(overwrite, "overwrite")
    progress, add_bos = check_bool(progress, "progress"), check_bool(add_bos, "add_bos", allow_none=True)
    slots, max_len = _positive_or_none(slots, "slots"), _positive_or_none(max_len, "max_len")
    if chat_options is not None and not isinstance(chat_options, Mapping):
        raise InvalidInputError(f"chat_options must be None or a dict of chat format options, got {chat_options!r}")
    chat_options = dict(chat_options or {})
    (max_new,) = max_new_tokens_list(max_new_tokens, 1)
    sampling_lists(1, vocab, temperature, top_k, top_p, seed)  # checked; each request is checked again by the engine
    stops = stop_lists(list(tokenizer.stop_ids) if stop_ids is None else stop_ids, 1, vocab)[0]
    path = None if output is None else check_output_path(output)
    defaults = dict(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    if chat_options:
        model._get_chat_format().check_options(chat_options)
    rows = read_rows(inputs)
    prepared = [
        r if isinstance(r, BadRow) else _prepare(model, r, rows, defaults, add_bos, chat_options) for r in rows.rows
    ]
    bad = [p for p in prepared if isinstance(p, BadRow)]
    if bad and bad_rows == "error":
        raise InvalidInputError(describe_bad(bad, rows.name))

    settings = _jsonable(
        dict(
            model=config.name,
            source=model.source,
            dtype=str(model.module.embed.embedding.dtype),
            max_len=max_len,
            stop_ids=stops,
            add_bos=add_bos,
            chat_options=chat_options,
            bad_rows=bad_rows,
            **defaults,
        )
    )
    per_row = [
        ["bad", p.where, p.error]
        if isinstance(p, BadRow)
        else [p.tokens, _jsonable(p.settings), [_image_identity(im) for im in p.images]]
        for p in prepared
    ]
    n = len(prepared)
    journal = None
    if path is not None:
        header = {"fingerprint": fingerprint([settings, per_row]), "rows": n, "settings": settings}
        journal = Journal(path, header, resume=resume, overwrite=overwrite)
    try:
        results: list[dict | None] = [None] * n
        if journal is not None:
            for i, row in journal.done.items():
                results[i] = row

        def record(row: dict) -> None:
            results[row["index"]] = row
            if journal is not None:
                journal.append(row)

        for p in bad:
            if results[p.index] is None:
                record(_result(p.index, p.id, status="failed", error=f"{p.where}: {p.error}"))
        pending = [p for p in prepared if isinstance(p, _Prepared) and results[p.row.index] is None]
        _run_engine(model, pending, stops, record, slots, max_len, n, n - len(pending), progress)
        if journal is not None:
            journal.finish(results)
    finally:
        if journal is not None:
            journal.close()
    return results


def _run_engine(model, pending: list[_Prepared], stops, record, slots, max_len, total, initial, progress) -> None:
    bar = tqdm(total=total, initial=initial, disable=not progress, unit="row", dynamic_ncols=True)
    try:
        if not pending:
            return
        requests = [
            Request(
                tokens=p.tokens,
                stop_ids=stops,
                images=_loader(p.images, p.row.where) if p.images else None,
                **p.settings,
            )
            for p in pending
        ]
        engine = Engine(
            model.module, slots=slots, max_len=max_len, max_images=max(1, max(len(p.images) for p in pending))
        )
        generated, start = 0, time.perf_counter()
        for res in engine.run(requests, errors="result"):
            p = pending[res.index]
            index, row_id = p.row.index, p.row.id
            if res.output is None:
                record(
                    _result(
                        index,
                        row_id,
                        status="failed",
                        prompt_tokens=len(p.tokens),
                        error=_row_error(res.error or "failed", res.index, p.row.where),
                    )
                )
            else:
                completion = model._completion(res.output)
                generated += len(completion.tokens)
                record(
                    _result(
                        index,
                        row_id,
                        status="ok",
                        prompt_tokens=completion.prompt_tokens,
                        text=completion.text,
                        output_tokens=len(completion.tokens),
                        stop_reason=completion.stop_reason,
                    )
                )
            bar.update(1)
            bar.set_postfix_str(f"{generated / max(time.perf_counter() - start, 1e-9):.1f} tok/s", refresh=False)
    finally:
        bar.close()
