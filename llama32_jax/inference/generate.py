"""Batched generation on device: one jitted prefill, and the whole decode loop in one jitted ``while_loop``.

Prompts are left-padded into a length bucket (powers of two, so prompt lengths cost few recompiles), which puts
every sequence's last prompt token in the same slot; per-sequence ``start`` offsets make RoPE positions and
masks independent of the padding, so a prompt gives the same tokens alone or in any batch. The prefill creates
the KV cache on device and hands it to the decode loop, which donates it (updated in place, never copied). The
loop exits as soon as every sequence has stopped (a stop token of its own, or its ``max_new_tokens``).

Sampling is per sequence: greedy (temperature 0), temperature, top-k and top-p (Meta's rule: keep the smallest
prefix of the sorted distribution whose mass before each kept token is <= top_p), each sequence with its own
seed; the key for step ``i`` is ``fold_in(PRNGKey(seed), i)``, so a request's samples do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.checks import (
    check_bool,
    input_vocab,
    max_new_tokens_list,
    sampling_lists,
    stop_lists,
    token_rows,
)
from llama32_jax.models.cross_mask import dense_cross_attention_mask, image_token_ranges
from llama32_jax.nn.cache import KVCache
from llama32_jax.sharding.distributed import to_host

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """One sequence's result. ``tokens`` excludes the prompt and includes the stop token if one was emitted."""

    tokens: list[int]
    stop_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    logprobs: list[float] | None = None  # log p(token) under the model's (untempered) distribution
    prompt_length: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
    """Per-sequence sampling parameters as device arrays (all ``[B]`` except ``stop_ids [B, M]``)."""

    temperature: jax.Array
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1.0 = off
    keys: jax.Array  # [B, 2] uint32 PRNG keys
    stop_ids: jax.Array  # [B, M] int32, -1 padded
    max_new: jax.Array  # [B] int32

    @classmethod
    def build(cls, temps, ks, ps, seeds, stops, max_new, n_stops: int | None = None) -> SamplingState:
        """Device arrays of per-row values (checked lists); ``stops`` padded with -1 to ``n_stops`` columns (default:
        the longest list, at least 1)."""
        m = n_stops or max(1, max(len(s) for s in stops))
        stop_arr = np.full((len(stops), m), -1, np.int32)
        for i, s in enumerate(stops):
            stop_arr[i, : len(s)] = s
        return cls(
            temperature=jnp.asarray(temps, jnp.float32),
            top_k=jnp.asarray(ks, jnp.int32),
            top_p=jnp.asarray(ps, jnp.float32),
            keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]),
            stop_ids=jnp.asarray(stop_arr),
            max_new=jnp.asarray(max_new, jnp.int32),
        )


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Round ``n`` up to a bucket: ``minimum``, or a multiple of ``2**(floor(log2 n) - 3)``.

    Buckets waste at most 1/8 of the work and number 8 per doubling of the length, so prompts of any length
    compile only a few dozen shapes (110 -> 112, 1000 -> 1024, 5000 -> 5120).
    """
    if n <= minimum:
        return minimum
    granularity = 1 << max(0, math.floor(math.log2(n)) - 3)
    return -(-n // granularity) * granularity


def sample(logits: jax.Array, s: SamplingState, step: jax.Array, *, stochastic: bool, filtered: bool) -> jax.Array:
    """Pick one token per row of ``logits [B, V]`` (fp32). ``stochastic``/``filtered`` are static fast paths.

    ``step`` (``[]``, or ``[B]``: one per row) numbers the token within its own request: row ``b`` draws with
    ``fold_in(keys[b], step)``, so where and with whom a request runs never changes its samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not stochastic:
        return greedy
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)
    scaled = logits / temperature[:, None]
    step = jnp.asarray(step)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, 0 if step.ndim else None))(s.keys, step)
    if filtered:
        vocab = logits.shape[-1]
        order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V] descending
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        k = jnp.where(s.top_k > 0, s.top_k, vocab)[:, None]
        sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before <= s.top_p[:, None]) | (rank == 0)
        sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
        picked = jax.vmap(jax.random.categorical)(step_keys, sorted_logits)
        sampled = jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0]
        # A row without top-k / top-p draws from the unsorted logits, as it does in a batch with none: the same
        # key over the sorted order would pick another token, and a request's samples must not depend on its batch.
        plain = jax.vmap(jax.random.categorical)(step_keys, scaled)
        sampled = jnp.where((s.top_k > 0) | (s.top_p < 1.0), sampled, plain)
    else:
        sampled = jax.vmap(jax.random.categorical)(step_keys, scaled)
    return jnp.where(s.temperature > 0, sampled.astype(jnp.int32), greedy)


def token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


def _cross_kw(cross) -> dict:
    """Text models take no ``cross`` argument; vision models get their encoded images (or None: text only)."""
    return {} if cross is None else {"cross": cross}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_images(graphdef, state, pixel_values, aspect_ratio_ids, tile_mask):
    """The images' cross-attention inputs, once per request batch (vision tower + every block's K/V)."""
    return nnx.merge(graphdef, state).cross_inputs(pixel_values, aspect_ratio_ids, tile_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype"))
def prefill(graphdef, state, tokens, start, cross=None, *, cache_len: int, cache_dtype):
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    cache = KVCache.init(model.config, b, cache_len, dtype=cache_dtype, start=start)
    logits, cache = model(tokens, cache, last_only=True, **_cross_kw(cross))
    return logits[:, 0], cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_steps", "stochastic", "filtered", "stream"),
    donate_argnames=("cache",),
)
def _decode(
    graphdef, state, logits, cache, s: SamplingState, cross=None, stream_key=None, *, max_steps, stochastic, filtered,
    stream: bool,
):  # fmt: skip
    """Sample, feed back, repeat: tokens ``[B, max_steps]``, logprobs, lengths; exits when all sequences stop.

    The final cache is returned (and dropped by the caller) so that XLA can alias it to the donated input: the
    loop then updates the one cache buffer in place. ``stream``: call the host callback numbered ``stream_key``
    (:class:`_HostCallback`) with every step's tokens.
    """
    model = nnx.merge(graphdef, state)
    b = logits.shape[0]

    def is_stop(tok):
        return jnp.any(tok[:, None] == s.stop_ids, axis=-1)

    def emit(step, tok, done):
        if stream:
            io_callback(_dispatch, None, stream_key, step, tok, done, ordered=True)

    tok = sample(logits, s, jnp.int32(0), stochastic=stochastic, filtered=filtered)
    out = jnp.zeros((b, max_steps), jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((b, max_steps), jnp.float32).at[:, 0].set(token_logprob(logits, tok))
    lengths = jnp.ones((b,), jnp.int32)
    done = is_stop(tok) | (lengths >= s.max_new)
    emit(jnp.int32(0), tok, jnp.zeros((b,), bool))

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_steps) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, done, out, lps, lengths = carry
        logits, cache = model(tok[:, None], cache, last_only=True, **_cross_kw(cross))
        logits = logits[:, 0]
        new = sample(logits, s, step, stochastic=stochastic, filtered=filtered)
        new = jnp.where(done, 0, new)
        emit(step, new, done)
        out = out.at[:, step].set(new)
        lps = lps.at[:, step].set(jnp.where(done, 0.0, token_logprob(logits, new)))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(new) | (lengths >= s.max_new)
        return step + 1, new, cache, done, out, lps, lengths

    carry = (jnp.int32(1), tok, cache, done, out, lps, lengths)
    _, _, cache, _, out, lps, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lps, lengths, cache


def stops_per_sequence(stop_ids, n: int, vocab: int | None = None) -> list[list[int]]:
    """``stop_ids`` as one list per sequence: one id, one list shared by all ``n``, or ``n`` lists (checked; ``vocab``
    bounds the ids when given). See :func:`llama32_jax.inputs.checks.stop_lists`."""
    return stop_lists(stop_ids, n, vocab)


def generate_tokens(
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
    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    pad_id: int = 0,
    images: Any = None,
) -> list[GenerationOutput]:
    """Generate from token-id prompts; every sampling argument is one value or one per prompt.

    ``stop_ids`` is one id, one list for all prompts or one list per prompt. ``on_step(step, tokens [B], done [B])``
    is called from the device loop for every generated position (``done`` marks sequences that had already
    stopped, whose token is meaningless). If it raises, it is not called again, the loop runs to its end and the
    exception itself is re-raised here. Every argument is checked first (:mod:`llama32_jax.inputs.checks`).

    ``images`` (vision models): an :class:`llama32_jax.inputs.image.ImageBatch` with one row per prompt, holding as many
    images as the prompt has ``<|image|>`` tokens (``config.image_token_id``), in order; a prompt may have none.
    Without ``images``, image tokens are allowed here and see no image (``Model.generate`` refuses them). The
    images are encoded once; which tokens see which image follows Meta (docs/model-facts.md §4.3): each image from its
    token to the next image token, a single image up to the end, generated tokens included.
    """
    config = model.config
    text = config.text
    prompts = token_rows(prompts, input_vocab(config))
    n = len(prompts)
    max_new = max_new_tokens_list(max_new_tokens, n)
    temps, ks, ps, seeds = sampling_lists(n, text.vocab_size, temperature, top_k, top_p, seed)
    stops = stop_lists(stop_ids, n, text.vocab_size)
    check_bool(logprobs, "logprobs")
    if on_step is not None and not callable(on_step):
        raise InvalidInputError(f"on_step must be a callable on_step(step, tokens, done) or None, got {on_step!r}")
    if images is not None and not config.is_vision:
        raise InvalidInputError(f"{config.name} is a text model; images are not accepted")
    for i, p in enumerate(prompts):
        if len(p) + max_new[i] > text.max_position_embeddings:
            raise InvalidInputError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new[i]} it exceeds the model context of "
                f"{text.max_position_embeddings} positions"
            )
    placement = getattr(model, "placement", None)
    if placement is not None and n % placement.plan.batch_shards:
        # A sharded batch must split evenly: add one-token filler requests, generate, and drop them.
        return _generate_padded(
            model, prompts, placement.plan.batch_shards, images,
            max_new_tokens=max_new, temperature=temps, top_k=ks, top_p=ps, seed=seeds,
            stop_ids=stops, logprobs=logprobs, on_step=on_step, pad_id=pad_id,
        )  # fmt: skip

    lengths = [len(p) for p in prompts]
    width = bucket(max(lengths))
    steps = bucket(max(max_new), minimum=8)
    cache_len = width + steps
    if cache_len > text.max_position_embeddings:
        cache_len = max(lengths) + max(max_new)  # near the context limit: exact size instead of buckets
        width, steps = max(lengths), max(max_new)
    tokens = np.full((n, width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = np.asarray(p, np.int32)
    start = np.asarray([width - length for length in lengths], np.int32)
    state_s = SamplingState.build(temps, ks, ps, seeds, stops, max_new)
    graphdef, state = nnx.split(model)
    cache_dtype = jnp.dtype(model.embed.embedding.dtype)
    cross = None
    if images is not None:
        tile_mask = image_tile_mask(config, prompts, images, cache_len)
        cross = encode_images(
            graphdef,
            state,
            jnp.asarray(images.pixel_values, cache_dtype),
            jnp.asarray(images.aspect_ratio_ids),
            jnp.asarray(tile_mask),
        )
    logits, cache = prefill(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(start), cross, cache_len=cache_len, cache_dtype=cache_dtype
    )
    stochastic = any(t > 0 for t in temps)
    filtered = stochastic and any(k > 0 or p < 1.0 for k, p, t in zip(ks, ps, temps, strict=True) if t > 0)
    host = _HostCallback(on_step)
    with host:
        out, lps, gen_lengths, _ = _decode(
            graphdef,
            state,
            logits,
            cache,
            state_s,
            cross,
            jnp.int32(host.key),
            max_steps=steps,
            stochastic=stochastic,
            filtered=filtered,
            stream=on_step is not None,
        )
        out, lps, gen_lengths = to_host(out), to_host(lps), to_host(gen_lengths)  # gathered across hosts if sharded
        if on_step is not None:
            jax.effects_barrier()  # every callback of this request has run
    host.reraise()
    results = []
    for i in range(n):
        toks = out[i, : gen_lengths[i]].tolist()
        reason = "stop" if toks and toks[-1] in stops[i] else "length"
        results.append(
            GenerationOutput(
                tokens=toks,
                stop_reason=reason,
                logprobs=lps[i, : gen_lengths[i]].tolist() if logprobs else None,
                prompt_length=lengths[i],
            )
        )
    return results


def _generate_padded(model, prompts, shards: int, images, **kw) -> list[GenerationOutput]:
    """``generate_tokens`` on ``prompts`` plus fillers up to a multiple of ``shards``; the fillers' results dropped."""
    n = len(prompts)
    extra = -n % shards
    padded = dict(kw)
    for name, default in (("max_new_tokens", 1), ("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("seed", 0)):
        value = kw[name]
        if isinstance(value, (list, tuple)):
            padded[name] = [*value, *[default] * extra]
    stops = kw["stop_ids"]
    if stops and isinstance(stops[0], (list, tuple)):
        padded["stop_ids"] = [*stops, *[[]] * extra]
    on_step = kw["on_step"]
    if on_step is not None:
        padded["on_step"] = lambda step, tokens, done: on_step(step, tokens[:n], done[:n])
    if images is not None:
        images = _pad_images(images, extra)
    out = generate_tokens(model, [*prompts, *[[kw["pad_id"]]] * extra], images=images, **padded)
    return out[:n]


def _pad_images(images, extra: int):
    """An :class:`~llama32_jax.inputs.image.ImageBatch` with ``extra`` image-less rows appended."""
    import dataclasses as dc

    def pad(a, fill=0):
        return np.concatenate([a, np.full((extra, *a.shape[1:]), fill, a.dtype)])

    mask = pad(images.aspect_ratio_mask)
    mask[-extra:, :, 0] = 1  # padding image slots keep tile 0, as everywhere
    return dc.replace(
        images,
        pixel_values=pad(images.pixel_values),
        aspect_ratio_ids=pad(images.aspect_ratio_ids),
        aspect_ratio_mask=mask,
        num_tiles=[*images.num_tiles, *[[]] * extra],
    )


def image_tile_mask(config, prompts, images, length: int) -> np.ndarray:
    """``[B, length, I, R]``: which image tiles each token position may attend to (llama32_jax.models.cross_mask)."""
    pixel_values = getattr(images, "pixel_values", None)
    if pixel_values is None or not hasattr(images, "num_tiles") or not hasattr(images, "aspect_ratio_ids"):
        raise InvalidInputError(
            "images must be an llama32_jax.inputs.image.ImageBatch (llama32_jax.inputs.image.preprocess)"
        )
    if len(images.num_tiles) != len(prompts):
        raise InvalidInputError(
            f"images has {len(images.num_tiles)} rows for {len(prompts)} prompts; give one per prompt"
        )
    ranges = [image_token_ranges(p, config.image_token_id) for p in prompts]
    v = config.vision
    return dense_cross_attention_mask(
        ranges, images.num_tiles, length, v.max_num_tiles, max_images=int(np.shape(pixel_values)[1])
    )


class _HostCallback:
    """A user's ``on_step`` as called from the device loop.

    The compiled loop calls :func:`_dispatch` with a request number (a traced argument, so one compiled program
    serves every callback); the number selects this wrapper in ``_ACTIVE``. If the user's function raises, the
    exception is kept, the function is not called again, and the loop runs to its end (at most ``max_new_tokens``
    steps); :func:`generate_tokens` then re-raises the user's own exception object. An exception escaping into
    XLA would instead surface as an opaque ``JaxRuntimeError: INTERNAL``.
    """

    _next = itertools.count(1)

    def __init__(self, fn):
        self.fn = fn  # None: no streaming (the loop then makes no calls)
        self.error: BaseException | None = None
        self.key = next(self._next) % (2**31 - 1)

    def __call__(self, step, tokens, done):
        if self.error is not None or self.fn is None:
            return
        try:
            self.fn(int(step), np.asarray(tokens), np.asarray(done))
        except BaseException as e:  # re-raised by generate_tokens, on the caller's thread
            self.error = e

    def __enter__(self):
        _ACTIVE[self.key] = self
        return self

    def __exit__(self, *exc):
        _ACTIVE.pop(self.key, None)
        return False

    def reraise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_ACTIVE: dict[int, _HostCallback] = {}


def _dispatch(key, step, tokens, done) -> None:
    callback = _ACTIVE.get(int(key))
    if callback is not None:
        callback(step, tokens, done)
