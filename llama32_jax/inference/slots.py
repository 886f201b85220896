"""The continuous-batching engine's device side: a slot KV cache and the jitted calls that fill and decode it.

A **slot** is one row of a KV cache of fixed shape ``[slots, K, max_len, H]`` per layer, with its own write index
and valid range (``KVCache(per_slot=True)``: ``start[b]`` and ``index[b]``), so rows decode independently:

- :func:`admit` inserts freshly prefilled requests (a small cache of ``n`` rows, prefilled by
  :func:`llama32_jax.inference.generate.prefill` exactly as a static batch is) into free slots, samples each one's
  first token (sampling step 0, as :func:`~llama32_jax.inference.generate.generate_tokens` does), and arms the slot.
- :func:`decode_chunk` runs up to ``steps`` one-token steps of every slot in one ``while_loop``; a slot whose
  request stops (a stop token of its own or its ``max_new_tokens``) goes idle at once, and the loop returns early
  once ``want_free`` slots are idle, so that waiting requests can be admitted.

Idle slots keep computing (the shapes are fixed) but their write index does not move and their tokens are
discarded. Only a handful of shapes ever compile: one decode chunk per engine, and one prefill / admit per
(prompt-width bucket, row-count bucket) pair.

Vision models keep every slot's image keys and values (:class:`~llama32_jax.models.mllama.CrossInputs` with a
slot axis, and each slot's tile-mask rows by position); a text-only request in such a slot sees no tile, which
leaves its hidden state exactly as if the cross-attention blocks were skipped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llama32_jax.inference.generate import SamplingState, prefill, sample, token_logprob
from llama32_jax.nn.cache import KVCache
from llama32_jax.sharding.placement import constrain_cache, constrain_cross


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Every slot's decoding state (all ``[slots]``, plus the sampling parameters of its request)."""

    tok: jax.Array  # int32: the token the slot feeds next (its last sampled token)
    step: jax.Array  # int32: tokens its request has generated (= the sampling step of the next one)
    active: jax.Array  # bool: decoding; False = free (or its request finished)
    sampling: SamplingState


def _cross_kw(cross) -> dict:
    return {} if cross is None else {"cross": cross}


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "max_len", "n_stops", "cache_dtype"))
def init_slots(graphdef, state, cross_shapes=None, *, slots: int, max_len: int, n_stops: int, cache_dtype):
    """An empty slot cache, idle slots and (vision) zeroed per-slot cross inputs shaped like ``cross_shapes``."""
    model = nnx.merge(graphdef, state)
    placement = getattr(model, "placement", None)
    cache = constrain_cache(placement, KVCache.init(model.config, slots, max_len, dtype=cache_dtype, per_slot=True))
    sampling = SamplingState(
        temperature=jnp.zeros((slots,), jnp.float32),
        top_k=jnp.zeros((slots,), jnp.int32),
        top_p=jnp.ones((slots,), jnp.float32),
        keys=jnp.zeros((slots, 2), jnp.uint32),
        stop_ids=jnp.full((slots, n_stops), -1, jnp.int32),
        max_new=jnp.ones((slots,), jnp.int32),
    )
    zeros = jnp.zeros((slots,), jnp.int32)
    slot_state = SlotState(tok=zeros, step=zeros, active=jnp.zeros((slots,), bool), sampling=sampling)
    cross = None
    if cross_shapes is not None:
        cross = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cross_shapes)
        cross = constrain_cross(placement, cross)
    return cache, slot_state, cross


def _is_stop(tok: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop_ids, axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "stochastic", "filtered"),
    donate_argnames=("cache", "slot_state", "cross"),
)
def admit(
    graphdef,
    state,
    cache: KVCache,
    slot_state: SlotState,
    cross,
    tokens: jax.Array,
    start: jax.Array,
    small_cross,
    slot_ids: jax.Array,
    sampling: SamplingState,
    *,
    stochastic: bool,
    filtered: bool,
):  # fmt: skip
    """Prefill ``tokens [n, W]`` (left-padded from ``start [n]``; ``small_cross``: their images' cross inputs or
    None) and insert them into slots ``slot_ids [n]`` (``>= slots``: a filler row, dropped).

    The prefill is :func:`~llama32_jax.inference.generate.prefill`, the static path's own, into a cache of exactly
    ``W`` slots; one compiled program per ``(n, W)`` does both steps.
    ``sampling`` holds the requests' parameters. The slot rows get the prompt's keys and values in slots ``[0, W)``
    (whatever a previous request left after them is past ``index`` and never seen), its ``start``, and index
    ``W``. Returns the updated ``(cache, slot_state, cross)`` and the first tokens, their logprobs and whether the
    request already stopped (then the slot stays free).
    """
    width = tokens.shape[1]
    dtype = cache.k.dtype if cache.stacked else cache.k[0].dtype
    logits, small = prefill(graphdef, state, tokens, start, small_cross, cache_len=width, cache_dtype=dtype)
    first = sample(logits, sampling, jnp.zeros(logits.shape[:1], jnp.int32), stochastic=stochastic, filtered=filtered)
    logprob = token_logprob(logits, first)
    done = _is_stop(first, sampling.stop_ids) | (sampling.max_new <= 1)

    def put(big, rows, lead: tuple = ()):
        return big.at[(*lead, slot_ids, slice(None), slice(0, width))].set(rows.astype(big.dtype), mode="drop")

    if cache.stacked:
        k = put(cache.k, small.k, (slice(None),))
        v = put(cache.v, small.v, (slice(None),))
    else:
        k = tuple(put(big, rows) for big, rows in zip(cache.k, small.k, strict=True))
        v = tuple(put(big, rows) for big, rows in zip(cache.v, small.v, strict=True))
    cache = KVCache(
        k=k,
        v=v,
        start=cache.start.at[slot_ids].set(small.start, mode="drop"),
        index=cache.index.at[slot_ids].set(width, mode="drop"),
    )
    cache = constrain_cache(getattr(nnx.merge(graphdef, state), "placement", None), cache)

    def set_rows(big, rows):
        return big.at[slot_ids].set(rows.astype(big.dtype), mode="drop")

    n = logits.shape[0]
    new_state = SlotState(
        tok=set_rows(slot_state.tok, first),
        step=set_rows(slot_state.step, jnp.ones((n,), jnp.int32)),
        active=set_rows(slot_state.active, ~done),
        sampling=jax.tree.map(set_rows, slot_state.sampling, sampling),
    )
    if cross is not None:
        cross = _admit_cross(cross, small_cross, slot_ids, n)
    return cache, new_state, cross, first, logprob, done


def _admit_cross(cross, small_cross, slot_ids, n: int):
    """The slots' cross inputs: the new requests' image K/V and tile-mask rows, or (text-only requests) a tile mask
    that shows nothing, which leaves the stale K/V unread."""
    if small_cross is None:
        rows = jnp.zeros((n, *cross.tile_mask.shape[1:]), bool)
        return dataclasses.replace(cross, tile_mask=cross.tile_mask.at[slot_ids].set(rows, mode="drop"))

    def put(big, rows):  # [B, K, N_v, H] per block, or stacked [C, B, K, N_v, H]
        at = (slice(None), slot_ids) if big.ndim == 5 else (slot_ids,)
        return big.at[at].set(rows.astype(big.dtype), mode="drop")

    kv = jax.tree.map(put, cross.kv, small_cross.kv)
    mask = cross.tile_mask.at[slot_ids].set(small_cross.tile_mask, mode="drop")
    return dataclasses.replace(cross, kv=kv, tile_mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "stochastic", "filtered", "logprobs"),
    donate_argnames=("cache", "slot_state"),
)
def decode_chunk(
    graphdef, state, cache: KVCache, slot_state: SlotState, cross, want_free: jax.Array, *, steps: int,
    stochastic: bool, filtered: bool, logprobs: bool,
):  # fmt: skip
    """Up to ``steps`` decode steps of every slot; stops early when no slot is active or ``want_free`` are idle.

    Returns ``(cache, slot_state, tokens [slots, steps], logprobs [slots, steps], steps run)``: the tokens slot
    ``b`` generated are ``tokens[b, :new_step[b] - old_step[b]]`` (a prefix: an active slot emits one per step).
    """
    model = nnx.merge(graphdef, state)
    n_slots = slot_state.tok.shape[0]
    out = jnp.zeros((n_slots, steps), jnp.int32)
    lps = jnp.zeros((n_slots, steps if logprobs else 0), jnp.float32)

    def cond(carry):
        i, _, s, _, _ = carry
        idle = jnp.sum(~s.active)
        return (i < steps) & jnp.any(s.active) & (idle < want_free)

    def body(carry):
        i, cache, s, out, lps = carry
        logits, new_cache = model(s.tok[:, None], cache, last_only=True, **_cross_kw(cross))
        logits = logits[:, 0]
        new_cache = dataclasses.replace(new_cache, index=jnp.where(s.active, new_cache.index, cache.index))
        new = sample(logits, s.sampling, s.step, stochastic=stochastic, filtered=filtered)
        new = jnp.where(s.active, new, 0)
        out = out.at[:, i].set(new)  # every active slot emits one token per step: its tokens are a prefix
        if logprobs:
            lps = lps.at[:, i].set(jnp.where(s.active, token_logprob(logits, new), 0.0))
        step = s.step + s.active.astype(jnp.int32)
        done = s.active & (_is_stop(new, s.sampling.stop_ids) | (step >= s.sampling.max_new))
        s = SlotState(tok=jnp.where(s.active, new, s.tok), step=step, active=s.active & ~done, sampling=s.sampling)
        return i + 1, new_cache, s, out, lps

    carry = (jnp.int32(0), cache, slot_state, out, lps)
    i, cache, new_state, out, lps = jax.lax.while_loop(cond, body, carry)
    return cache, new_state, out, lps, i
