"""``generate`` for any number of prompts: the static batch when they all fit at once, else the :class:`Engine`.

:func:`generate_continuous` takes the arguments of :func:`~llama32_jax.inference.generate.generate_tokens` (checked
the same way) and returns the same outputs in prompt order; :func:`static_fits` is the rule ``lj.Model.generate``
uses to choose: one static batch holds every prompt when the slots that memory allows (or the ``slots`` asked
for) are at least as many as the prompts. Either way a prompt gets what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from llama32_jax.errors import InvalidInputError
from llama32_jax.inference.engine import Engine, Request, width_bucket
from llama32_jax.inference.generate import GenerationOutput
from llama32_jax.inference.slot_memory import choose_slots
from llama32_jax.inputs.checks import input_vocab, max_new_tokens_list, sampling_lists, stop_lists, token_rows
from llama32_jax.inputs.image import ImageBatch


def static_fits(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: Any, slots: int | None) -> bool:
    """True when one static batch should run every prompt: ``len(prompts) <= slots`` (given, or chosen from memory
    for caches as long as the static batch's)."""
    n = len(prompts)
    if slots is not None:
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise InvalidInputError(f"slots must be a positive int or None (chosen from memory), got {slots!r}")
        return n <= slots
    if n <= 1:
        return True
    longest = max((len(p) for p in prompts), default=1)
    most = max(max_new_tokens_list(max_new_tokens, n))
    length = min(model.config.text.max_position_embeddings, width_bucket(longest) + width_bucket(most))
    return n <= choose_slots(model, length, n)


def generate_continuous(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] = 0,
    stop_ids: Sequence[int] | Sequence[Sequence[int]] = (),
    logprobs: bool = False,
    images: ImageBatch | None = None,
    slots: int | None = None,
    max_len: int | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> list[GenerationOutput]:
    """:func:`~llama32_jax.inference.generate.generate_tokens` through an :class:`Engine` of ``slots`` slots.

    ``images``: an :class:`~llama32_jax.inputs.image.ImageBatch` with one row per prompt (rows without images are
    text-only requests). ``on_tokens(i, tokens)`` streams prompt ``i``'s tokens in bursts. Raises
    :class:`~llama32_jax.errors.InvalidInputError` for a bad argument, before anything runs.
    """
    config = model.config
    vocab = config.text.vocab_size
    prompts = token_rows(prompts, input_vocab(config))
    n = len(prompts)
    max_new = max_new_tokens_list(max_new_tokens, n)
    temps, ks, ps, seeds = sampling_lists(n, vocab, temperature, top_k, top_p, seed)
    stops = stop_lists(stop_ids, n, vocab)
    if images is not None and not config.is_vision:
        raise InvalidInputError(f"{config.name} is a text model; images are not accepted")
    if images is not None and len(images.num_tiles) != n:
        raise InvalidInputError(f"images has {len(images.num_tiles)} rows for {n} prompts; give one per prompt")
    requests = [
        Request(prompts[i], max_new[i], temps[i], ks[i], ps[i], seeds[i], stops[i], images=image_row(images, i))
        for i in range(n)
    ]
    max_images = 1 if images is None else max(1, images.pixel_values.shape[1])
    engine = Engine(model, slots=slots, max_len=max_len, logprobs=logprobs, max_images=max_images)
    outs: list[GenerationOutput | None] = [None] * n
    for result in engine.run(requests, on_tokens=on_tokens):
        outs[result.index] = result.output
    return outs  # type: ignore[return-value]


def image_row(images: ImageBatch | None, i: int) -> ImageBatch | None:
    """Row ``i`` of a preprocessed batch as a one-row batch of its own images (None when it has none)."""
    if images is None or not images.num_tiles[i]:
        return None
    k = len(images.num_tiles[i])
    return ImageBatch(
        pixel_values=images.pixel_values[i : i + 1, :k],
        aspect_ratio_ids=images.aspect_ratio_ids[i : i + 1, :k],
        aspect_ratio_mask=images.aspect_ratio_mask[i : i + 1, :k],
        num_tiles=[list(images.num_tiles[i])],
    )
