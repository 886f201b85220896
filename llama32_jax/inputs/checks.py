"""Checks of the public model API's inputs: token ids, sampling arguments, stream callbacks, ``load`` arguments.

One set of rules, shared by :meth:`~llama32_jax.api.Model.generate`, :meth:`~llama32_jax.api.Model.logits`,
:func:`~llama32_jax.inference.generate.generate_tokens` and :func:`~llama32_jax.models.build.forward`. Every check
raises :class:`~llama32_jax.errors.InvalidInputError` naming the argument (and, for per-prompt values, the prompt) and
saying what is valid.

Token ids are Python ints or numpy/JAX integer arrays. Floats (even integral ones such as ``2.0``), bools,
strings and nested lists are refused rather than converted, so nothing is silently truncated. A batch may hold
prompts of different lengths; ids must lie in ``[0, vocab)``, where ``vocab`` counts a vision model's image-token
rows too (:func:`input_vocab`).

Sampling decisions:

- ``top_k`` at least the vocabulary size keeps every token: it is the same as ``top_k=0`` (off), samples included.
- ``seed`` is any int; only ``seed mod 2**32`` matters (JAX's 32-bit PRNG keys: ``jax.random.PRNGKey`` already
  keeps only the low 32 bits without x64), so ``seed=2**70`` works and equals ``seed=0``.
- ``stop_ids`` is ``None`` (the tokenizer's), one id (``5`` means ``[5]``), a list of ids shared by every prompt,
  or one list per prompt; ids must lie in the output vocabulary ``[0, vocab_size)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama32_jax.errors import InvalidInputError

SEED_MODULUS = 2**32


def input_vocab(config) -> int:
    """How many ids the model's embedding accepts: the text vocabulary, plus the image-token rows of a vision model."""
    text = config.text
    return text.vocab_size + (text.n_image_embeddings if config.is_vision else 0)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "__array__") and hasattr(x, "dtype") and hasattr(x, "ndim"))


def _describe(x: Any) -> str:
    if x is None or isinstance(x, bool):
        return repr(x)
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# ---------------------------------------------------------------------------------------------------- token ids


def token_row(row: Any, where: str, vocab: int) -> list[int]:
    """One prompt's ids as a list of Python ints, checked: a flat, non-empty int sequence with ids in ``[0, vocab)``.

    ``where`` names the row in messages (``"prompt 2"``)."""
    if _is_array(row):
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise InvalidInputError(f"{where} must be a 1-D sequence of token ids, got an array of shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(
                f"{where} must hold integer token ids, got an array of dtype {arr.dtype}; ids are never rounded "
                "(convert with .astype(int) if the values are whole numbers)"
            )
        ids = arr.tolist()
    elif isinstance(row, (list, tuple)):
        ids = list(row)
        for j, t in enumerate(ids):
            if not _is_int(t):
                if isinstance(t, (list, tuple)) or (_is_array(t) and np.ndim(t) > 0):
                    raise InvalidInputError(
                        f"{where} is nested: position {j} holds a {type(t).__name__}; a prompt is a flat list of "
                        "int token ids, and a batch a list of such lists"
                    )
                raise InvalidInputError(
                    f"{where} position {j} is {_describe(t)}; token ids must be ints (bools and floats are refused, "
                    "not rounded)"
                )
        ids = [int(t) for t in ids]
    else:
        raise InvalidInputError(f"{where} must be a list of int token ids or an integer array, got {_describe(row)}")
    if not ids:
        raise InvalidInputError(f"{where} is empty; every prompt needs at least one token")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab:
        bad = next(j for j, t in enumerate(ids) if not 0 <= t < vocab)
        raise InvalidInputError(
            f"{where} has token id {ids[bad]} at position {bad}, outside [0, {vocab}) (min {lo}, max {hi})"
        )
    return ids


def token_rows(prompts: Any, vocab: int, *, name: str = "prompts") -> list[list[int]]:
    """A batch of token-id prompts (a list of id lists of any lengths, or a 2-D integer array), each row checked."""
    if _is_array(prompts):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise InvalidInputError(f"{name} as an array must be 2-D [batch, length], got shape {arr.shape}")
        prompts = list(arr)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInputError(f"{name} must be a non-empty list of token-id lists, got {_describe(prompts)}")
    if all(_is_int(p) for p in prompts):
        raise InvalidInputError(
            f"{name} is a flat list of ints; a batch [batch, length] is a list of rows: wrap one row as [[id, ...]]"
        )
    return [token_row(p, f"prompt {i}", vocab) for i, p in enumerate(prompts)]


def token_array(token_ids: Any, vocab: int, *, name: str = "token_ids") -> np.ndarray:
    """``[batch, length]`` int32 ids for a full-sequence call: rectangular, integer, in ``[0, vocab)``."""
    if _is_array(token_ids):
        arr = np.asarray(token_ids)
        if arr.ndim != 2 or arr.size == 0:
            raise InvalidInputError(
                f"{name} must be a non-empty integer array [batch, length], got {arr.dtype}{list(arr.shape)}"
            )
        rows = token_rows(arr, vocab, name=name)
    else:
        rows = token_rows(token_ids, vocab, name=name)
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise InvalidInputError(
                f"{name} rows have different lengths {lengths}; a [batch, length] call needs one length (pad the "
                "rows, or call once per row)"
            )
    return np.asarray(rows, np.int32)


def check_concrete_ids(tokens: Any, vocab: int, *, name: str = "tokens") -> None:
    """Range-check ``tokens`` when their values are known: host arrays always, JAX arrays when concrete and fully
    addressable (one small reduction on the device). Traced values (inside ``jit``, ``scan``...) are not checked,
    so the check costs nothing in compiled code."""
    import jax

    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    if isinstance(tokens, jax.Array):
        if not tokens.is_fully_addressable:
            return
        lo, hi = (int(v) for v in jax.device_get(_min_max(tokens)))
    else:
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise InvalidInputError(f"{name} must lie in [0, {vocab}), got min {lo} max {hi}")


def _min_max(x):
    import jax
    import jax.numpy as jnp

    global _min_max_jit
    if _min_max_jit is None:
        _min_max_jit = jax.jit(lambda a: jnp.stack([jnp.min(a), jnp.max(a)]))
    return _min_max_jit(x)


_min_max_jit = None


def check_image_counts(rows: Sequence[Sequence[int]], image_token_id: int | None, counts: Sequence[int]) -> None:
    """Every prompt needs exactly one image per ``<|image|>`` token (``image_token_id``); ``counts[i]`` = its images."""
    if image_token_id is None:
        return
    for i, (row, n) in enumerate(zip(rows, counts, strict=True)):
        markers = sum(1 for t in row if t == image_token_id)
        if markers != n:
            hint = "pass images=[[...], ...] with" if n == 0 else "give"
            raise InvalidInputError(
                f"prompt {i} has {markers} <|image|> token(s) but {n} image(s); {hint} one image per <|image|> token"
            )


def check_image_lists(config, images: Any, n: int, rows: Sequence[Sequence[int]] | None = None) -> None:
    """``images`` for ``n`` prompts: None, or one list of images per prompt (a text model takes none). With the
    prompts' ids (``rows``), each prompt must have one image per ``<|image|>`` token; this runs before any image
    is read. The images themselves are checked by :func:`llama32_jax.inputs.image.preprocess`."""
    if images is not None and not config.is_vision:
        raise InvalidInputError(f"{config.name} is a text model; images are not accepted")
    if not config.is_vision:
        return
    if images is not None:
        if not isinstance(images, (list, tuple)) or len(images) != n:
            got = f"{len(images)} entries" if isinstance(images, (list, tuple)) else _describe(images)
            raise InvalidInputError(
                f"images must hold one list of images per prompt ({n} prompts), got {got}; e.g. [[img], []]"
            )
        for b, row in enumerate(images):
            if not isinstance(row, (list, tuple)):
                raise InvalidInputError(
                    f"images[{b}] must be a list of images (prompt {b}'s), got {_describe(row)}; wrap single images "
                    "as [[img]]"
                )
    if rows is not None:
        counts = [0] * n if images is None else [len(row) for row in images]
        check_image_counts(rows, config.image_token_id, counts)


# ---------------------------------------------------------------------------------------------------- sampling


def per_prompt(value: Any, n: int, name: str) -> list:
    """One value for every prompt, or a list/tuple/1-D array of exactly ``n`` values."""
    if isinstance(value, (list, tuple)) or (_is_array(value) and np.ndim(value) == 1):
        values = value.tolist() if _is_array(value) else list(value)
        if len(values) != n:
            raise InvalidInputError(
                f"{name} has {len(values)} entries for {n} prompts; give one value or one per prompt"
            )
        return values
    if _is_array(value) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    return [value] * n


def _each(values: list, given: Any, name: str, ok: Callable[[Any], bool], what: str) -> None:
    for i, v in enumerate(values):
        if not ok(v):
            which = f" (prompt {i})" if isinstance(given, (list, tuple)) or _is_array(given) else ""
            raise InvalidInputError(f"{name}{which} must be {what}, got {_describe(v)}")


def max_new_tokens_list(max_new_tokens: Any, n: int) -> list[int]:
    values = per_prompt(max_new_tokens, n, "max_new_tokens")
    _each(values, max_new_tokens, "max_new_tokens", lambda m: _is_int(m) and m >= 1, "an int >= 1")
    return [int(m) for m in values]


def sampling_lists(n: int, vocab: int, temperature: Any, top_k: Any, top_p: Any, seed: Any) -> tuple[list, ...]:
    """``(temperatures, top_ks, top_ps, seeds)`` per prompt, checked; ``top_k >= vocab`` becomes 0 (off: it keeps
    every token either way), seeds are taken mod 2**32."""
    temps = per_prompt(temperature, n, "temperature")
    finite = "a finite number >= 0 (0 = greedy)"
    _each(temps, temperature, "temperature", lambda t: _is_real(t) and math.isfinite(t) and t >= 0, finite)
    ks = per_prompt(top_k, n, "top_k")
    _each(ks, top_k, "top_k", lambda k: _is_int(k) and k >= 0, "an int >= 0 (0 = off; >= the vocabulary: all kept)")
    ps = per_prompt(top_p, n, "top_p")
    _each(ps, top_p, "top_p", lambda p: _is_real(p) and 0.0 < p <= 1.0, "a number in (0, 1] (1 = off)")
    seeds = per_prompt(seed, n, "seed")
    _each(seeds, seed, "seed", _is_int, "an int (any size; seed mod 2**32 is used)")
    return (
        [float(t) for t in temps],
        [int(k) if k < vocab else 0 for k in ks],
        [float(p) for p in ps],
        [int(s) % SEED_MODULUS for s in seeds],
    )


def _stop_list(value: Any, where: str, vocab: int) -> list[int]:
    if _is_array(value):
        if np.ndim(value) != 1 or not np.issubdtype(np.asarray(value).dtype, np.integer):
            raise InvalidInputError(f"{where} must be a list of int token ids, got an array {np.asarray(value).dtype}")
        value = np.asarray(value).tolist()
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{where} must be a list of int token ids, got {_describe(value)}")
    for t in value:
        if not _is_int(t):
            raise InvalidInputError(f"{where} holds {_describe(t)}; stop ids must be ints in [0, {vocab})")
        if not 0 <= t < vocab:
            raise InvalidInputError(f"{where} holds {t}, outside the model's output vocabulary [0, {vocab})")
    return [int(t) for t in value]


def stop_lists(stop_ids: Any, n: int, vocab: int | None = None) -> list[list[int]]:
    """``stop_ids`` as one list per prompt: one id, one list shared by all ``n`` prompts, or ``n`` lists.

    ``vocab``: the output vocabulary (stop ids outside it could never be generated); ``None``: not range-checked."""
    bound = 2**31 - 1 if vocab is None else vocab
    if _is_int(stop_ids):
        stop_ids = [stop_ids]
    if _is_array(stop_ids) and np.ndim(stop_ids) == 2:
        stop_ids = [list(r) for r in np.asarray(stop_ids)]
    if isinstance(stop_ids, (str, bytes)) or not (isinstance(stop_ids, (list, tuple)) or _is_array(stop_ids)):
        raise InvalidInputError(
            f"stop_ids must be None, an int, a list of ints, or one list per prompt; got {_describe(stop_ids)}"
        )
    values = np.asarray(stop_ids).tolist() if _is_array(stop_ids) else list(stop_ids)
    nested = [isinstance(v, (list, tuple)) or (_is_array(v) and np.ndim(v) > 0) for v in values]
    if any(nested) and not all(nested):
        raise InvalidInputError(
            "stop_ids mixes ids and lists; give one list of ids shared by every prompt, or one list per prompt"
        )
    if not any(nested):
        return [_stop_list(values, "stop_ids", bound)] * n
    if len(values) != n:
        raise InvalidInputError(f"stop_ids has {len(values)} lists for {n} prompts; give one list per prompt")
    return [_stop_list(v, f"stop_ids[{i}] (prompt {i})", bound) for i, v in enumerate(values)]


def check_bool(value: Any, name: str, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        valid = "True, False or None" if allow_none else "True or False"
        raise InvalidInputError(f"{name} must be {valid}, got {_describe(value)}")
    return bool(value)


def check_stream(stream: Any, *, has_tokenizer: bool = True) -> None:
    """``stream`` is None or a callable ``stream(i, text_delta)``; text needs a tokenizer."""
    if stream is None:
        return
    if not callable(stream):
        raise InvalidInputError(
            f"stream must be a callable stream(prompt_index, text_delta) or None, got {_describe(stream)}"
        )
    if not has_tokenizer:
        raise InvalidInputError(
            "stream receives text, but this model has no tokenizer; load one, or use "
            "llama32_jax.inference.generate.generate_tokens(on_step=...) for token ids"
        )


# ---------------------------------------------------------------------------------------------------- load


def load_arguments(path: Any, dtype: Any, attention_impl: Any, scan_layers: Any, unknown: dict,
                   *, dtypes: dict, attention_impls: Sequence[str]) -> tuple[str, str]:  # fmt: skip
    """``lj.load``'s arguments checked: returns ``(path, dtype name)`` with ``~`` expanded in ``path``."""
    if unknown:
        valid = ["path", "mesh", "dtype", "attention_impl", "scan_layers", "quantize"]
        raise InvalidInputError(f"load() got unknown keyword argument(s) {sorted(unknown)}; valid ones are {valid}")
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(
            f"path must be a str or os.PathLike naming a checkpoint directory or .gguf file, got {_describe(path)}"
        )
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path.strip():
        raise InvalidInputError("path is an empty string; pass a checkpoint directory or a .gguf file")
    path = os.path.expanduser(path)
    name = dtype
    if not isinstance(dtype, str):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in dtypes:
        raise InvalidInputError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if not isinstance(attention_impl, str) or attention_impl not in attention_impls:
        raise InvalidInputError(f"attention_impl must be one of {tuple(attention_impls)}, got {attention_impl!r}")
    check_bool(scan_layers, "scan_layers")
    return path, name
