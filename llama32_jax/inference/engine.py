"""Continuous batching: any number of requests through a fixed number of KV-cache slots.

Static batching (:func:`~llama32_jax.inference.generate.generate_tokens`) runs one batch until its longest
request is done, with a cache sized for its longest prompt plus its longest output. The :class:`Engine` keeps
``slots`` sequences decoding at once instead (:mod:`llama32_jax.inference.slots`), and when one stops, its slot is
refilled: waiting requests are prefilled in groups of similar length (prompt widths rounded up by
:func:`~llama32_jax.inference.generate.bucket`, row counts by powers of two) and inserted while the other slots
keep their state. Shapes come from a few buckets, so a run compiles a handful of programs, whatever its size.

Every request gets what it would get alone: the prefill is the static path's own, each slot's RoPE positions and
visible keys are its own (``start``/``index`` per slot), and sampling step ``i`` of a request draws with
``fold_in(PRNGKey(seed), i)``, wherever and whenever it runs.

Scheduling is first come, first served, with one refinement: when slots free up, the oldest waiting request
picks the length bucket, and younger requests of the same bucket join its prefill (up to ``prefill_tokens``
padded tokens a call). The decode loop returns to the host as soon as a slot is free and a request waits, or
after ``chunk_steps`` steps.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax.errors import InvalidInputError
from llama32_jax.inference.generate import (
    MIN_BUCKET,
    GenerationOutput,
    SamplingState,
    encode_images,
    image_tile_mask,
)
from llama32_jax.inference.slot_memory import choose_slots
from llama32_jax.inference.slots import admit, decode_chunk, init_slots
from llama32_jax.inputs.checks import (
    check_image_counts,
    input_vocab,
    max_new_tokens_list,
    sampling_lists,
    stop_lists,
    token_row,
)
from llama32_jax.inputs.image import ImageBatch, preprocess
from llama32_jax.sharding.distributed import to_host


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: prompt ids and its own sampling settings (see ``generate_tokens``).

    ``images`` (vision models): the images of the prompt's image tokens, in order (PIL images, uint8 arrays or
    paths), a one-row :class:`~llama32_jax.inputs.image.ImageBatch`, or a callable returning either, called when
    the request is admitted (a request whose images fail to load fails alone)."""

    tokens: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    images: Any = None


@dataclasses.dataclass(frozen=True)
class RequestResult:
    """The outcome of request ``index`` (its position in the sequence given to :meth:`Engine.run`)."""

    index: int
    output: GenerationOutput | None  # None when the request failed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class _Slot:
    request: int
    tokens: list[int]
    logprobs: list[float]


class Engine:
    """Continuous batching over a slot KV cache for ``model`` (a text or vision NNX module, sharded or not).

    Args:
      model: the NNX module (``lj.Model.module``).
      slots: sequences decoded at once; default: as many as half the free device memory holds (at most
        :data:`MAX_AUTO_SLOTS`, and no more than the run has requests), rounded to the plan's data shards.
      max_len: cache slots per sequence; default: the run's longest prompt bucket plus its longest output bucket.
        A request needs ``bucket(prompt) + max_new_tokens - 1`` of them (``prompt + max_new_tokens - 1`` at least).
      logprobs: also return each token's log-probability.
      max_images: images per request (vision models; Meta recommends one).
      chunk_steps: the most decode steps between two visits to the host.
      prefill_tokens: the most padded prompt tokens one prefill call takes (a longer prompt goes alone).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        slots: int | None = None,
        max_len: int | None = None,
        logprobs: bool = False,
        max_images: int = 1,
        chunk_steps: int = 32,
        prefill_tokens: int = 4096,
    ):
        for name, value, low in (("chunk_steps", chunk_steps, 1), ("prefill_tokens", prefill_tokens, 1),
                                 ("max_images", max_images, 1)):  # fmt: skip
            if not _is_int(value) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
        for name, value in (("slots", slots), ("max_len", max_len)):
            if value is not None and (not _is_int(value) or value < 1):
                raise InvalidInputError(f"{name} must be a positive int or None (chosen for the run), got {value!r}")
        if max_len is not None and max_len > model.config.text.max_position_embeddings:
            raise InvalidInputError(
                f"max_len={max_len} exceeds the model context of {model.config.text.max_position_embeddings}"
            )
        if not isinstance(logprobs, bool):
            raise InvalidInputError(f"logprobs must be True or False, got {logprobs!r}")
        self.model = model
        self.slots = slots
        self.max_len = max_len
        self.logprobs = logprobs
        self.max_images = max_images
        self.chunk_steps = chunk_steps
        self.prefill_tokens = prefill_tokens
        placement = getattr(model, "placement", None)
        self.shards = placement.plan.batch_shards if placement is not None else 1
        if slots is not None and slots % self.shards:
            raise InvalidInputError(
                f"slots={slots} must be a multiple of the plan's {self.shards} data shards (each holds whole slots)"
            )
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------------------
    def run(
        self,
        requests: Sequence[Request],
        *,
        errors: str = "raise",
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> Iterator[RequestResult]:
        """Generate every request; yields a :class:`RequestResult` as each finishes (completion order).

        ``errors="raise"``: a request that is invalid or longer than the cache raises
        :class:`~llama32_jax.errors.InvalidInputError` before anything runs, and so does one whose images fail to
        load (when admitted). ``errors="result"``: such requests come back failed (``output=None``, ``error`` says
        why) and the run goes on. ``on_tokens(index, new_tokens)`` receives each request's tokens as they are
        generated (in bursts, whenever the decode loop returns to the host).
        """
        if errors not in ("raise", "result"):
            raise InvalidInputError(f"errors must be 'raise' or 'result', got {errors!r}")
        if on_tokens is not None and not callable(on_tokens):
            raise InvalidInputError(f"on_tokens must be a callable on_tokens(index, tokens) or None, got {on_tokens!r}")
        if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)):
            raise InvalidInputError(f"requests must be a sequence of Request, got {type(requests).__name__}")
        return self._run(list(requests), errors, on_tokens)

    def _run(self, requests: list, errors: str, on_tokens) -> Iterator[RequestResult]:
        specs, failed = self._check_requests(requests, errors)
        max_len = self.max_len or _default_max_len(specs, self.model.config.text.max_position_embeddings)
        for i, spec in list(specs.items()):
            problem = _fit_problem(spec, max_len)
            if problem is not None:
                if errors == "raise":
                    raise InvalidInputError(f"request {i}: {problem}")
                failed[i] = problem
                del specs[i]
        pending = len(specs)
        slots = self.slots or choose_slots(self.model, max_len, max(pending, 1), self._cross_bytes(specs, max_len))
        self.stats = dict(slots=slots, max_len=max_len, requests=len(requests), output_tokens=0, decode_steps=0,
                          decode_calls=0, prefill_calls=0, prefill_tokens=0, failed=len(failed))  # fmt: skip
        for i in sorted(failed):
            yield RequestResult(i, None, failed[i])
        if not specs:
            return
        yield from _Run(self, specs, slots, max_len, errors, on_tokens).loop()

    # ------------------------------------------------------------------------------------------------------------
    def _check_requests(self, requests: list, errors: str) -> tuple[dict, dict]:
        config = self.model.config
        vocab = config.text.vocab_size
        specs, failed = {}, {}
        for i, r in enumerate(requests):
            try:
                specs[i] = _spec(r, i, config, vocab, self.max_images)
            except InvalidInputError as e:
                if errors == "raise":
                    raise
                failed[i] = str(e)
        return specs, failed

    def _cross_bytes(self, specs: dict, max_len: int) -> int:
        """Per-slot bytes of the vision state (image K/V of every cross block + tile mask), 0 when not needed."""
        if not any(s.images is not None for s in specs.values()):
            return 0
        t, v = self.model.config.text, self.model.config.vision
        tokens = self.max_images * v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)
        itemsize = jnp.dtype(self.model.embed.embedding.dtype).itemsize
        kv = 2 * t.n_cross_attention_layers * t.n_kv_heads * tokens * t.head_dim * itemsize
        return kv + max_len * self.max_images * v.max_num_tiles


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A checked request."""

    tokens: list[int]
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stops: list[int]
    images: Any


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _spec(r: Any, i: int, config, vocab: int, max_images: int) -> _Spec:
    if not isinstance(r, Request):
        raise InvalidInputError(f"request {i} must be an llama32_jax.inference.engine.Request, got {type(r).__name__}")
    where = f"request {i}"
    tokens = token_row(r.tokens, f"{where} tokens", input_vocab(config))
    try:
        (max_new,) = max_new_tokens_list(r.max_new_tokens, 1)
        temps, ks, ps, seeds = sampling_lists(1, vocab, r.temperature, r.top_k, r.top_p, r.seed)
        (stops,) = stop_lists(r.stop_ids, 1, vocab)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e}") from None
    images = r.images
    if images is not None and not config.is_vision:
        raise InvalidInputError(f"{where} has images but {config.name} is a text model")
    if images is not None and not callable(images) and not isinstance(images, ImageBatch):
        if not isinstance(images, (list, tuple)):
            raise InvalidInputError(
                f"{where} images must be a list of images, a one-row ImageBatch or a callable returning either"
            )
        images = list(images) or None
    if config.is_vision and not callable(images):
        count = len(images.num_tiles[0]) if isinstance(images, ImageBatch) else len(images or [])
        check_image_counts([tokens], config.image_token_id, [count])
        if count > max_images:
            raise InvalidInputError(f"{where} has {count} images; the engine takes max_images={max_images}")
    return _Spec(tokens, max_new, temps[0], ks[0], ps[0], seeds[0], stops, images)


def width_bucket(n: int) -> int:
    """A prompt's prefill width in the engine: at least :data:`MIN_BUCKET`, else the next of ``2^k`` and
    ``1.5 * 2^k`` (16, 24, 32, 48, 64, 96, ...). Coarser than the static path's buckets: each width is one compiled
    prefill per row count, and on a long run the few dozen programs the finer ladder makes cost more than the
    padding (at most a third of a prompt) saves."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    power = 1 << (n - 1).bit_length()  # the next power of two >= n
    return power * 3 // 4 if n <= power * 3 // 4 else power


def _default_max_len(specs: dict, context: int) -> int:
    if not specs:
        return MIN_BUCKET
    width = max(width_bucket(len(s.tokens)) for s in specs.values())
    steps = max(s.max_new for s in specs.values())
    return min(context, width + width_bucket(steps))


def _width(spec: _Spec, max_len: int) -> int:
    """The prefill width of a request: its bucket, or less where the bucket would not leave it room."""
    return min(width_bucket(len(spec.tokens)), max_len - spec.max_new + 1)


def _fit_problem(spec: _Spec, max_len: int) -> str | None:
    need = len(spec.tokens) + spec.max_new - 1
    if need > max_len:
        return (
            f"its prompt of {len(spec.tokens)} tokens and max_new_tokens={spec.max_new} need {need} cache slots, more "
            f"than the engine's max_len={max_len}; raise max_len or shorten the request"
        )
    return None


class _Run:
    """One :meth:`Engine.run`: the host side of the schedule."""

    def __init__(self, engine: Engine, specs: dict, slots: int, max_len: int, errors: str, on_tokens):
        self.engine, self.specs, self.slots, self.max_len = engine, specs, slots, max_len
        self.errors, self.on_tokens = errors, on_tokens
        self.model = engine.model
        self.config = self.model.config
        self.graphdef, self.state = nnx.split(self.model)
        self.cache_dtype = jnp.dtype(self.model.embed.embedding.dtype)
        values = list(specs.values())
        self.stochastic = any(s.temperature > 0 for s in values)
        self.filtered = any(s.temperature > 0 and (s.top_k > 0 or s.top_p < 1.0) for s in values)
        self.n_stops = max(1, max(len(s.stops) for s in values))
        self.vision = self.config.is_vision and any(s.images is not None for s in values)
        self.stats = engine.stats

    def loop(self) -> Iterator[RequestResult]:
        cross = self._cross_zeros() if self.vision else None
        self.cache, self.slot_state, self.cross = init_slots(
            self.graphdef, self.state, cross, slots=self.slots, max_len=self.max_len, n_stops=self.n_stops,
            cache_dtype=self.cache_dtype,
        )  # fmt: skip
        waiting = _Waiting(sorted(self.specs), self._key)
        free = list(range(self.slots))
        busy: dict[int, _Slot] = {}
        while waiting or busy:
            while waiting and free:
                yield from self._admit(waiting, free, busy)
            if not busy:
                continue
            want = 1 if waiting else self.slots + 1
            before = {b: len(s.tokens) for b, s in busy.items()}
            self.cache, self.slot_state, out, lps, steps = decode_chunk(
                self.graphdef, self.state, self.cache, self.slot_state, self.cross, jnp.int32(want),
                steps=self.engine.chunk_steps, stochastic=self.stochastic, filtered=self.filtered,
                logprobs=self.engine.logprobs,
            )  # fmt: skip
            out, lps, step, active, steps = jax.tree.map(
                to_host, (out, lps, self.slot_state.step, self.slot_state.active, steps)
            )  # gathered across hosts when sharded
            self.stats["decode_calls"] += 1
            self.stats["decode_steps"] += int(steps)
            for b in list(busy):
                slot = busy[b]
                count = int(step[b]) - before[b]
                new = out[b, :count].tolist()
                slot.tokens += new
                if self.engine.logprobs:
                    slot.logprobs += lps[b, :count].tolist()
                self._emit_tokens(slot.request, new)
                if not active[b]:
                    del busy[b]
                    free.append(b)
                    yield self._result(slot)

    # ------------------------------------------------------------------------------------------------------------
    def _admit(self, waiting: _Waiting, free: list, busy: dict) -> Iterator[RequestResult]:
        """Prefill one group of waiting requests (the oldest one's bucket) into free slots."""
        key = waiting.oldest_key()
        cap = min(max(1, self.engine.prefill_tokens // key[0]), len(free))
        group = waiting.take(key, cap)
        images = {}
        if key[1]:
            for i in list(group):
                try:
                    images[i] = self._load_images(i)
                except Exception as e:  # any failure to read a request's images fails that request alone
                    if self.errors == "raise":
                        raise
                    group.remove(i)
                    self.stats["failed"] += 1
                    yield RequestResult(i, None, f"request {i}: its images could not be used: {e}")
        if not group:
            return
        rows = _row_bucket(len(group), self.engine.shards)
        width = key[0]
        tokens = np.zeros((rows, width), np.int32)
        start = np.full((rows,), width - 1, np.int32)
        slot_ids = np.full((rows,), self.slots, np.int32)  # fillers: out of range, dropped
        targets = [free.pop(0) for _ in group]
        for r, (i, b) in enumerate(zip(group, targets, strict=True)):
            p = self.specs[i].tokens
            tokens[r, width - len(p) :] = p
            start[r] = width - len(p)
            slot_ids[r] = b
        small_cross = self._encode(group, images, rows) if key[1] else None
        self.cache, self.slot_state, self.cross, tok, lp, done = admit(
            self.graphdef, self.state, self.cache, self.slot_state, self.cross, jnp.asarray(tokens),
            jnp.asarray(start), small_cross, jnp.asarray(slot_ids), self._sampling(group, rows),
            stochastic=self.stochastic, filtered=self.filtered,
        )  # fmt: skip
        tok, lp, done = jax.tree.map(to_host, (tok, lp, done))
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += rows * width
        for r, (i, b) in enumerate(zip(group, targets, strict=True)):
            slot = _Slot(i, [int(tok[r])], [float(lp[r])] if self.engine.logprobs else [])
            self._emit_tokens(i, slot.tokens)
            if done[r]:
                free.append(b)
                yield self._result(slot)
            else:
                busy[b] = slot

    def _key(self, i: int) -> tuple[int, bool]:
        s = self.specs[i]
        return _width(s, self.max_len), s.images is not None

    def _sampling(self, group: list[int], rows: int) -> SamplingState:
        specs = [self.specs[i] for i in group] + [None] * (rows - len(group))
        return SamplingState.build(
            [s.temperature if s else 0.0 for s in specs], [s.top_k if s else 0 for s in specs],
            [s.top_p if s else 1.0 for s in specs], [s.seed if s else 0 for s in specs],
            [s.stops if s else [] for s in specs], [s.max_new if s else 1 for s in specs], self.n_stops,
        )  # fmt: skip

    def _load_images(self, i: int) -> ImageBatch | None:
        """Request ``i``'s images, preprocessed (one row), or None (no image after all)."""
        spec = self.specs[i]
        images = spec.images() if callable(spec.images) else spec.images
        if isinstance(images, ImageBatch):
            batch, count = images, len(images.num_tiles[0])
        elif isinstance(images, (list, tuple)):
            count = len(images)
            if count > self.engine.max_images:
                raise InvalidInputError(f"{count} images; the engine takes max_images={self.engine.max_images}")
            batch = preprocess([list(images)], self.config.vision) if count else None
        else:
            raise InvalidInputError(f"its images are a {type(images).__name__}, not a list of images")
        check_image_counts([spec.tokens], self.config.image_token_id, [count])
        return batch

    def _encode(self, group: list[int], images: dict, rows: int):
        """The group's cross-attention inputs (vision tower + every block's K/V) for ``rows`` rows of
        ``max_images`` images (padding: zero pixels that no token sees), with tile-mask rows for every cache slot."""
        v = self.config.vision
        n_img, tiles, size = self.engine.max_images, v.max_num_tiles, v.image_size
        pixels = np.zeros((rows, n_img, tiles, 3, size, size), np.float32)
        ratio_ids = np.zeros((rows, n_img), np.int32)
        num_tiles: list[list[int]] = [[] for _ in range(rows)]
        for r, i in enumerate(group):
            batch = images[i]
            if batch is not None:
                k = batch.pixel_values.shape[1]
                pixels[r, :k] = batch.pixel_values[0]
                ratio_ids[r, :k] = batch.aspect_ratio_ids[0]
                num_tiles[r] = list(batch.num_tiles[0])
        prompts = [self.specs[i].tokens for i in group] + [[0]] * (rows - len(group))
        padded = ImageBatch(pixels, ratio_ids, np.ones((rows, n_img, tiles), np.int32), num_tiles)
        mask = image_tile_mask(self.config, prompts, padded, self.max_len)
        return encode_images(
            self.graphdef, self.state, jnp.asarray(pixels, self.cache_dtype), jnp.asarray(ratio_ids),
            jnp.asarray(mask),
        )  # fmt: skip

    def _cross_zeros(self):
        """Zeroed per-slot cross inputs (the shapes of :meth:`_encode` for ``slots`` rows)."""
        v = self.config.vision
        n, i, r = self.slots, self.engine.max_images, v.max_num_tiles
        shapes = jax.eval_shape(
            encode_images, self.graphdef, self.state,
            jax.ShapeDtypeStruct((n, i, r, 3, v.image_size, v.image_size), self.cache_dtype),
            jax.ShapeDtypeStruct((n, i), jnp.int32), jax.ShapeDtypeStruct((n, self.max_len, i, r), jnp.bool_),
        )  # fmt: skip
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def _emit_tokens(self, i: int, tokens: list[int]) -> None:
        self.stats["output_tokens"] += len(tokens)
        if self.on_tokens is not None and tokens:
            self.on_tokens(i, tokens)

    def _result(self, slot: _Slot) -> RequestResult:
        spec = self.specs[slot.request]
        reason = "stop" if slot.tokens and slot.tokens[-1] in spec.stops else "length"
        out = GenerationOutput(
            tokens=slot.tokens,
            stop_reason=reason,
            logprobs=slot.logprobs if self.engine.logprobs else None,
            prompt_length=len(spec.tokens),
        )
        return RequestResult(slot.request, out)


class _Waiting:
    """The waiting requests, in arrival order and queued per bucket key: the oldest one's key, and the next
    requests of a key, in constant time (a long run admits thousands of groups)."""

    def __init__(self, order: list[int], key_of: Callable[[int], tuple]):
        self.key_of = key_of
        self.order = collections.deque(order)
        self.by_key: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        for i in order:
            self.by_key[key_of(i)].append(i)
        self.taken: set[int] = set()
        self.count = len(order)

    def __len__(self) -> int:
        return self.count

    def oldest_key(self) -> tuple:
        while self.order[0] in self.taken:  # admitted earlier with an older request of its bucket
            self.taken.discard(self.order.popleft())
        return self.key_of(self.order[0])

    def take(self, key: tuple, n: int) -> list[int]:
        queue = self.by_key[key]
        out = [queue.popleft() for _ in range(min(n, len(queue)))]
        self.taken.update(out)
        self.count -= len(out)
        return out


def _row_bucket(n: int, shards: int) -> int:
    """Prefill rows: ``n`` rounded up to a power of two, and to a multiple of the data shards."""
    rows = 1 << math.ceil(math.log2(max(n, 1)))
    return -(-max(rows, shards) // shards) * shards
