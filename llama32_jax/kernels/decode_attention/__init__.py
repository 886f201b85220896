"""``decode_attention``: a few new queries against a long KV cache, split along the key axis (flash-decoding).

A decode step has ``T`` (1, or a handful for speculative / multi-token steps) new queries per sequence and a KV
cache of up to 128K slots. There is too little query work to fill a GPU with one program per (sequence, head), so
the key axis is also cut into ``num_splits`` contiguous pieces processed in parallel; each piece writes a partial
result (unnormalised accumulator, running max, running sum) and a small XLA step here merges them with the usual
log-sum-exp rescaling (:func:`combine_splits`).

Layout ("grouped rows"): the ``G = N / K`` query heads that share a kv head and the ``T`` query positions become the
``R = T * G`` rows of one program, ``q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, R, H)`` (row
``r`` is query position ``r // G``), so a program reads its kv head's K/V once for all of them and the cache is
never repeated per query head.

Work skipping: only key blocks that intersect ``[kv_start[b], min(kv_end[b], q_offset + T))`` are read. The splits
partition *that* block range (:func:`split_blocks`; computed in the kernel from the traced ints), not the whole
cache, so a step at slot 300 of a 128K cache reads ~300 keys, spread over the splits, and a step at slot 100K uses
every split. Splits left with no block write an empty partial (max ``-inf``, sum 0) that the merge ignores.

The cache is never copied or padded: ``S`` may be anything the flavour's block rules allow (see the flavours'
docstrings: the GPU one needs ``S >= 16`` and a power-of-two head dim >= 16; the TPU one takes any ``S`` and
``H``); a ragged last key block is masked. The
queries (small) are padded to the row count the hardware wants.

Inference only: there is no ``custom_vjp`` (decode steps are never differentiated); use ``flash_attention`` for
training.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import check_qkv, resolve_backend, resolve_impl, resolve_interpret
from llama32_jax.kernels.decode_attention import pallas_gpu, pallas_tpu
from llama32_jax.kernels.decode_attention.reference import decode_attention_reference

# More new queries than this per step is a prefill: the grouped rows would not fit one program's registers / VMEM.
MAX_QUERIES = 64


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_offset: jax.Array | int,
    kv_start: jax.Array | None = None,
    kv_end: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
    backend: str | None = None,
    interpret: bool | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:
    """Causal attention of ``T <= 64`` new queries over a KV cache; the semantics of
    :func:`llama32_jax.nn.attention.self_attention` with ``causal=True``.

    Args:
      q: ``[B, T, N, H]`` the new queries; query ``t`` sits in cache slot ``q_offset + t``.
      k, v: ``[B, K, S, H]`` the KV cache (``N % K == 0``; query head ``n`` uses kv head ``n // (N / K)``).
      q_offset: ``[]`` int (usually traced: the cache write index).
      kv_start, kv_end: ``[B]`` int (traced), the valid slots of sequence ``b`` are ``kv_start[b] <= s <
        kv_end[b]``; default ``0`` / ``S``. Key ``s`` is visible to query ``t`` iff it is valid and
        ``s <= q_offset + t``. Out-of-range values are clipped (a query that sees nothing returns exactly 0).
      scale: score scale, default ``H ** -0.5``.
      impl: ``"auto"`` (Pallas on GPU/TPU, XLA elsewhere), ``"xla"`` (the reference) or ``"pallas"``.
      backend: the Pallas flavour, ``"gpu"`` or ``"tpu"`` (default: the platform's).
      interpret: run the kernel in Pallas' interpreter (default: when the platform cannot lower the flavour).
      block_k: keys per block (default: the flavour's choice for ``S``; larger values are clipped to ``S``).
      num_splits: pieces the visible key range is cut into (default: enough programs to fill the device; at
        most the number of key blocks is used).

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``. Inference only: the Pallas path has no VJP.

    Raises:
      InvalidInputError: bad ranks, shapes, dtypes, ``T > 64`` (use ``flash_attention``), or values the chosen
        flavour cannot run (see its module docstring).
    """
    q_offset = jnp.asarray(q_offset)  # Python ints and lists too; traced values pass through
    kv_start = None if kv_start is None else jnp.asarray(kv_start)
    kv_end = None if kv_end is None else jnp.asarray(kv_end)
    b, t, n, h, kv_heads, s = _check(q, k, v, q_offset, kv_start, kv_end, scale, block_k, num_splits)
    impl = resolve_impl(impl)
    if impl == "xla":
        return _reference(q, k, v, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end, causal=True, scale=scale)
    flavour = resolve_backend(backend)
    interpret = resolve_interpret(interpret, flavour)
    kernel = pallas_gpu if flavour == "gpu" else pallas_tpu
    block_k, num_splits = kernel.plan(
        batch=b, kv_heads=kv_heads, rows=t * (n // kv_heads), seq_len=s, head_dim=h, dtype=q.dtype,
        block_k=block_k, num_splits=num_splits, interpret=interpret,
    )  # fmt: skip
    start = jnp.zeros((b,), jnp.int32) if kv_start is None else kv_start
    end = jnp.full((b,), s, jnp.int32) if kv_end is None else kv_end
    return _pallas(
        q, k, v, q_offset, start, end,
        flavour=flavour, interpret=interpret, scale=h**-0.5 if scale is None else float(scale),
        block_k=block_k, num_splits=num_splits,
    )  # fmt: skip


# Jitted so that an eager decode step is one compiled call, not a dispatch per op (the ints stay traced).
_reference = jax.jit(decode_attention_reference, static_argnames=("causal", "scale"))


@functools.partial(jax.jit, static_argnames=("flavour", "interpret", "scale", "block_k", "num_splits"))
def _pallas(q, k, v, q_offset, kv_start, kv_end, *, flavour, interpret, scale, block_k, num_splits):
    """Grouped rows in, partials from the flavour's kernel, merged, heads back in the model's layout."""
    b, t, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    rows = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
    q_offset = q_offset.astype(jnp.int32)
    # The union of every query's visible keys, [lo, hi): the kernels mask with it and skip blocks outside it.
    lo = jnp.clip(kv_start.astype(jnp.int32), 0, s)
    hi = jnp.clip(jnp.minimum(kv_end.astype(jnp.int32), q_offset + t), lo, s)
    kernel = pallas_gpu if flavour == "gpu" else pallas_tpu
    acc, m, l = kernel.decode_partials(
        rows, k, v, lo, hi, q_offset, groups=g, scale=scale, block_k=block_k, num_splits=num_splits,
        interpret=interpret,
    )  # fmt: skip
    out = combine_splits(acc, m, l)[:, :, : t * g]  # [B, K, R, H]; padded rows dropped
    return out.reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge per-split partials into the attention output.

    Args:
      acc: ``[B, K, P, R, H]`` fp32, split ``p``'s ``sum_s exp(score_s - m_p) v_s``.
      m, l: ``[B, K, P, R]`` fp32, its running max (``-inf`` when the split saw nothing) and
        ``sum_s exp(score_s - m_p)`` (0 then).

    Returns ``[B, K, R, H]`` fp32; a row no split saw is exactly 0.
    """
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)  # every split empty: any finite reference works
    w = jnp.exp(m - m_all)  # an empty split: exp(-inf) = 0, whatever its acc / l hold
    total = jnp.sum(w * l, axis=2)  # [B, K, R]
    out = jnp.sum(w[..., None] * acc, axis=2)
    seen = total > 0
    return jnp.where(seen[..., None], out / jnp.where(seen, total, 1.0)[..., None], 0.0)


def _check(q, k, v, q_offset, kv_start, kv_end, scale, block_k, num_splits):
    """Validate shapes, dtypes and static options; returns ``(B, T, N, H, K, S)``."""
    b, t, n, h, kv_heads, s = check_qkv("decode_attention", q, k, v)
    if t > MAX_QUERIES:
        raise InvalidInputError(
            f"decode_attention takes at most {MAX_QUERIES} new queries per sequence, got T={t} (q {q.shape}); "
            "use llama32_jax.kernels.flash_attention for a prefill"
        )
    if jnp.shape(q_offset) != () or not jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
        raise InvalidInputError(
            f"q_offset must be a [] int (the cache slot of the first query), got shape {jnp.shape(q_offset)} "
            f"dtype {jnp.result_type(q_offset)}"
        )
    for name, x in (("kv_start", kv_start), ("kv_end", kv_end)):
        if x is not None and (jnp.shape(x) != (b,) or not jnp.issubdtype(jnp.result_type(x), jnp.integer)):
            raise InvalidInputError(
                f"{name} must be None or a [B]=[{b}] int array, got shape {jnp.shape(x)} dtype {jnp.result_type(x)}"
            )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise InvalidInputError(f"scale must be a Python float or None, got {scale!r}")
    for name, x in (("block_k", block_k), ("num_splits", num_splits)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise InvalidInputError(f"{name} must be None or a positive int, got {x!r}")
    return b, t, n, h, kv_heads, s
