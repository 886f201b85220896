"""Checks of a training batch, on the host (numpy) before the jitted step: :func:`check_batch`.

A bad batch must fail loudly *before* it reaches the optimizer: an id ``>= vocab`` is silently clamped (or read as
NaN) by XLA's gathers, a negative target or a mask of 2 gives a wrong loss, and once a NaN reaches the parameters
every later step is poisoned. Every check raises :class:`~llama32_jax.errors.InvalidInputError` naming the batch
key, its shape / dtype and the first bad index and value.

Rules (``[B, T]`` = the shape of ``inputs``):

- keys: ``inputs``, ``targets``, ``loss_mask`` required; ``positions``, ``segment_ids`` optional; a vision model's
  ``pixel_values``, ``aspect_ratio_ids``, ``tile_mask`` all together or not at all. Any other key is refused (a
  typo such as ``labels`` would otherwise be ignored silently). A ``None`` value counts as absent.
- ``inputs``: integer ``[B, T]``, ids in ``[0, input vocab)`` (a vision model's image-token rows included).
- ``loss_mask``: ``[B, T]``, bool, integer or float holding only 0 and 1.
- ``targets``: integer ``[B, T]``; where ``loss_mask`` is 1, in ``[0, vocab_size)`` (the output head's width).
  Where ``loss_mask`` is 0 a target is never read and may hold anything in the int32 range, e.g. a ``-100`` /
  ``-1`` sentinel (:mod:`llama32_jax.training.data` writes the real next token on prompts and 0 on padding); it is
  replaced by 0 before the step.
- ``positions``, ``segment_ids``: integer ``[B, T]``, ``>= 0`` (0 is padding for ``segment_ids``).
- ``pixel_values``: float ``[B, I, R, C, H, W]`` of the model's tiles, finite; ``aspect_ratio_ids`` integer
  ``[B, I]`` in ``[0, len(supported_aspect_ratios)]``; ``tile_mask`` ``[B, T, I, R]``, bool or 0/1.
- ``B`` divisible by ``accum_steps``.

Arrays that live on several hosts (not fully addressable) get the shape and dtype checks only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.checks import input_vocab
from llama32_jax.models.vision import check_vision_inputs

REQUIRED = ("inputs", "targets", "loss_mask")
OPTIONAL = ("positions", "segment_ids")
VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "tile_mask")
_INT32 = np.iinfo(np.int32)


def _host(x: Any) -> np.ndarray | None:
    """``x`` as numpy, or None when it spans several hosts (only its shape and dtype can be checked here)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _describe(key: str, x: Any) -> str:
    return f"batch[{key!r}] (shape {tuple(np.shape(x))}, dtype {np.dtype(x.dtype) if hasattr(x, 'dtype') else '?'})"


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _as_array(key: str, value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray)):
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise InvalidInputError(f"batch[{key!r}] must be an array, got {type(value).__name__} ({e})") from None
    if arr.dtype == object:
        raise InvalidInputError(f"batch[{key!r}] must be a numeric array, got {type(value).__name__} of objects")
    return arr


def _integer(key: str, x: Any, what: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_:
        raise InvalidInputError(
            f"{_describe(key, x)} must hold integer {what}; floats and bools are never rounded or cast "
            "(convert with .astype(np.int32) if the values are whole numbers)"
        )


def _range(key: str, x: Any, lo: int, hi: int | None, what: str, where: np.ndarray | None = None) -> None:
    """Every value of ``x`` (where ``where``) in ``[lo, hi)`` (``hi`` None: no upper bound)."""
    host = _host(x)
    if host is None or host.size == 0:
        return
    bad = host < lo if hi is None else (host < lo) | (host >= hi)
    if where is not None:
        bad &= where
    if bad.any():
        idx = _first_bad(bad)
        valid = f">= {lo}" if hi is None else f"in [0, {hi})" if lo == 0 else f"in [{lo}, {hi})"
        raise InvalidInputError(
            f"{_describe(key, x)}: {what} must be {valid}; index {list(idx)} holds {host[idx].item()} "
            f"({int(bad.sum())} bad value(s))"
        )


def _zero_one(key: str, x: Any) -> np.ndarray | None:
    """Check a mask holds only 0 and 1 (bool, integer or float); returns it as a numpy bool array when on host."""
    if not (x.dtype == np.bool_ or jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
        raise InvalidInputError(f"{_describe(key, x)} must be bool, integer or float 0/1 values")
    host = _host(x)
    if host is None:
        return None
    if host.dtype == np.bool_:
        return host
    bad = (host != 0) & (host != 1)  # NaN is != both
    if bad.any():
        idx = _first_bad(bad)
        raise InvalidInputError(
            f"{_describe(key, x)} must hold only 0 and 1 (1: trained, 0: not); index {list(idx)} holds "
            f"{host[idx].item()} ({int(bad.sum())} bad value(s)); for per-token weights scale the loss instead"
        )
    return host == 1


def _check_vision(batch: dict, shape: tuple[int, int], model_config: Any) -> None:
    present = [k for k in VISION_KEYS if k in batch]
    if not present:
        return
    if model_config is not None and not getattr(model_config, "is_vision", False):
        raise InvalidInputError(
            f"batch has {present} but {model_config.name} is a text model; image inputs need a vision model"
        )
    missing = [k for k in VISION_KEYS if k not in batch]
    if missing:
        raise InvalidInputError(f"batch has {present} but not {missing}; images need all of {list(VISION_KEYS)}")
    b, t = shape
    pixels, ids, mask = (batch[k] for k in VISION_KEYS)
    if not jnp.issubdtype(pixels.dtype, jnp.floating):
        raise InvalidInputError(f"{_describe('pixel_values', pixels)} must be floating point (image.preprocess)")
    if model_config is not None:
        try:
            check_vision_inputs(model_config.vision, pixels, ids)
        except InvalidInputError as e:
            raise InvalidInputError(f"batch: {e}") from None
    for key, x in (("pixel_values", pixels), ("aspect_ratio_ids", ids)):
        if np.ndim(x) < 2 or np.shape(x)[0] != b:
            raise InvalidInputError(f"{_describe(key, x)} must start with the batch size {b} of batch['inputs']")
    _integer("aspect_ratio_ids", ids, "aspect-ratio ids")
    want = (b, t, *np.shape(pixels)[1:3])
    if tuple(np.shape(mask)) != want:
        raise InvalidInputError(f"{_describe('tile_mask', mask)} must be [batch, length, images, tiles] = {want}")
    _zero_one("tile_mask", mask)
    host = _host(pixels)
    if host is not None and not np.isfinite(host).all():
        idx = _first_bad(~np.isfinite(host))
        raise InvalidInputError(
            f"{_describe('pixel_values', pixels)} must be finite; index {list(idx)} holds {host[idx].item()}"
        )


def check_batch(batch: Any, cfg: Any, model_config: Any = None) -> dict:
    """Validate a training batch (module docstring) and return it as a dict of arrays (``None`` values dropped,
    masked-out targets set to 0). ``cfg`` is the :class:`~llama32_jax.training.train.TrainConfig` (for ``accum_steps``);
    ``model_config`` (the model's :class:`~llama32_jax.configs.ModelConfig`) enables the vocabulary and image
    checks."""
    if not isinstance(batch, dict):
        raise InvalidInputError(f"a training batch must be a dict of arrays, got {type(batch).__name__}")
    batch = {k: v for k, v in batch.items() if v is not None}
    missing = [k for k in REQUIRED if k not in batch]
    if missing:
        raise InvalidInputError(f"a training batch needs inputs, targets and loss_mask; missing {missing}")
    unknown = sorted(str(k) for k in set(batch) - set(REQUIRED) - set(OPTIONAL) - set(VISION_KEYS))
    if unknown:
        raise InvalidInputError(
            f"a training batch has unknown key(s) {unknown}; valid: {[*REQUIRED, *OPTIONAL, *VISION_KEYS]}"
        )
    batch = {k: _as_array(k, v) for k, v in batch.items()}
    inputs = batch["inputs"]
    shape = tuple(np.shape(inputs))
    if len(shape) != 2:
        raise InvalidInputError(f"batch['inputs'] must be [batch, length], got shape {shape}")
    if 0 in shape:
        raise InvalidInputError(f"batch['inputs'] has shape {shape}; a training batch needs >= 1 row and position")
    for key in ("targets", "loss_mask", *OPTIONAL):
        if key in batch and tuple(np.shape(batch[key])) != shape:
            raise InvalidInputError(f"batch[{key!r}] has shape {tuple(np.shape(batch[key]))}, expected {shape}")
    if shape[0] % cfg.accum_steps:
        raise InvalidInputError(f"batch size {shape[0]} is not divisible by accum_steps={cfg.accum_steps}")

    vocab = out_vocab = None
    if model_config is not None:
        vocab, out_vocab = input_vocab(model_config), model_config.text.vocab_size
    _integer("inputs", inputs, "token ids")
    _range("inputs", inputs, 0, vocab if vocab is not None else _INT32.max, "token ids")
    trained = _zero_one("loss_mask", batch["loss_mask"])
    targets = batch["targets"]
    _integer("targets", targets, "token ids")
    hi = out_vocab if out_vocab is not None else _INT32.max
    _range("targets", targets, 0, hi, "where loss_mask is 1, targets", where=trained)
    if trained is not None:
        host = _host(targets)
        _range("targets", targets, int(_INT32.min), int(_INT32.max) + 1, "masked-out targets")
        if not trained.all():
            batch["targets"] = np.where(trained, host, 0).astype(host.dtype)
    for key in OPTIONAL:
        if key in batch:
            _integer(key, batch[key], key.replace("_", " "))
            _range(key, batch[key], 0, None, key)
    _check_vision(batch, shape, model_config)
    return {k: jnp.asarray(v) for k, v in batch.items()}
