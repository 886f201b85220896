"""The GPU flavour of ``decode_attention``: Pallas with the Triton lowering, split-K (flash-decoding).

Grid ``(B, K, row blocks, splits)``. A program owns one kv head of one sequence, one block of its grouped query
rows (``R = T * G`` rows, padded to a power of two >= 16 because Triton's dots need every dimension >= 16; at most
64 rows per program) and one split. Its K/V BlockSpec covers that kv head's whole ``[S, H]`` cache; the program
walks its split's key blocks with a ``fori_loop`` whose bounds come from the traced ranges
(:func:`~llama32_jax.kernels.split_blocks`), so blocks outside ``[lo, hi)`` are never read. It
writes its partial (fp32 accumulator, running max, running sum) for the merge in XLA.

Ragged ``S``: ``block_k`` is a power of two; when it does not divide ``S``, the last block is read shifted back to
end at slot ``S`` (overlapping its predecessor) and the overlap is masked, so no load ever leaves the cache and the
cache is never padded. Hence the constraints of this flavour:

- ``S >= 16`` key slots (``block_k`` is clipped to the largest power of two <= ``S``);
- ``H`` a power of two >= 16 (64 and 128 for Llama; Triton tensors have power-of-two shapes);
- ``block_k`` a power of two >= 16 (default 128, or 64 when that divides ``S`` and 128 does not).

Softmax in fp32 with a ``-inf``-safe online update: a row whose keys are all masked so far keeps ``m = -inf``,
``l = 0``, ``acc = 0`` (exponentials are taken against 0 instead of ``-inf``). Masked V rows are zeroed with
``where`` so unwritten cache slots holding NaN/Inf cannot leak through ``0 * garbage``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import split_blocks

DEFAULT_BLOCK_K = 128
MIN_DIM = 16  # Triton's tl.dot needs M, N, K >= 16
MAX_BLOCK_R = 64  # query rows per program: keeps the fp32 accumulator in registers
MIN_SPLIT_BLOCKS = 4  # a default split is at least this many key blocks of the full cache
DEFAULT_SMS = 132  # H100 SXM; used when the device does not report its core count (or in interpret mode)
PROGRAMS_PER_SM = 2


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _floor_pow2(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _sm_count(interpret: bool) -> int:
    if interpret:
        return DEFAULT_SMS
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else DEFAULT_SMS


def _row_block(rows: int) -> int:
    return min(max(MIN_DIM, _next_pow2(rows)), MAX_BLOCK_R)


def plan(
    *,
    batch: int,
    kv_heads: int,
    rows: int,
    seq_len: int,
    head_dim: int,
    dtype,
    block_k: int | None,
    num_splits: int | None,
    interpret: bool,
) -> tuple[int, int]:
    """Check this flavour's constraints and resolve ``(block_k, num_splits)``.

    ``num_splits`` defaults to about ``2 * #SMs`` programs in all, each split spanning at least
    ``MIN_SPLIT_BLOCKS`` key blocks of the full cache; a given value is capped at the number of key blocks.
    """
    del dtype
    if seq_len < MIN_DIM:
        raise InvalidInputError(
            f"the GPU decode_attention kernel needs a KV cache of at least {MIN_DIM} slots, got S={seq_len}; "
            "use impl='xla' for such a short cache"
        )
    if head_dim < MIN_DIM or not _is_pow2(head_dim):
        raise InvalidInputError(
            f"the GPU decode_attention kernel needs a power-of-two head dim >= 16, got H={head_dim}"
        )
    cap = _floor_pow2(seq_len)
    if block_k is None:
        block_k = min(DEFAULT_BLOCK_K, cap)
        if seq_len % block_k and block_k >= 128 and seq_len % (block_k // 2) == 0:
            block_k //= 2
    elif block_k < MIN_DIM or not _is_pow2(block_k):
        raise InvalidInputError(f"block_k must be a power of two >= {MIN_DIM} for the GPU kernel, got {block_k}")
    block_k = min(block_k, cap)
    n_blocks = pl.cdiv(seq_len, block_k)
    if num_splits is None:
        programs = batch * kv_heads * pl.cdiv(rows, _row_block(rows))
        wanted = pl.cdiv(PROGRAMS_PER_SM * _sm_count(interpret), programs)
        num_splits = max(1, min(wanted, n_blocks // MIN_SPLIT_BLOCKS))
    return block_k, min(num_splits, n_blocks)


def decode_partials(
    rows: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    q_offset: jax.Array,
    *,
    groups: int,
    scale: float,
    block_k: int,
    num_splits: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-split partials of decode attention.

    Args:
      rows: ``[B, K, R, H]`` grouped query rows (row ``r`` is query position ``r // groups``).
      k, v: ``[B, K, S, H]`` the cache, read in place.
      lo, hi: ``[B]`` int32, ``0 <= lo <= hi <= S``: the union of the visible keys of sequence ``b``.
      q_offset: ``[]`` int32, the slot of query position 0.

    Returns:
      ``acc [B, K, P, R_pad, H]``, ``m, l [B, K, P, R_pad]`` (fp32, ``P = num_splits``; rows past ``R`` are
      padding) as :func:`~llama32_jax.kernels.decode_attention.combine_splits` takes them.
    """
    b, kv_heads, r, h = rows.shape
    s = k.shape[2]
    block_r = _row_block(r)
    r_pad = pl.cdiv(r, block_r) * block_r
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))  # the queries are small: padding them is cheap
    grid = (b, kv_heads, r_pad // block_r, num_splits)
    per_seq = pl.BlockSpec((None,), lambda i, j, rb, p: (i,))
    cache = pl.BlockSpec((None, None, s, h), lambda i, j, rb, p: (i, j, 0, 0))
    kernel = functools.partial(
        _kernel, block_k=block_k, seq_len=s, groups=groups, scale=scale, num_splits=num_splits, block_r=block_r
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            per_seq,
            per_seq,
            per_seq,
            pl.BlockSpec((None, None, block_r, h), lambda i, j, rb, p: (i, j, rb, 0)),
            cache,
            cache,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_r, h), lambda i, j, rb, p: (i, j, p, rb, 0)),
            pl.BlockSpec((None, None, None, block_r), lambda i, j, rb, p: (i, j, p, rb)),
            pl.BlockSpec((None, None, None, block_r), lambda i, j, rb, p: (i, j, p, rb)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=8 if block_r * h >= 64 * 128 else 4, num_stages=2),
        interpret=interpret,
        name="decode_attention_gpu",
    )(lo, hi, jnp.broadcast_to(q_offset, (b,)), rows, k, v)


def _kernel(
    lo_ref, hi_ref, qoff_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref,
    *, block_k, seq_len, groups, scale, num_splits, block_r,
):  # fmt: skip
    """One (sequence, kv head, row block, split): online softmax over the split's key blocks."""
    lo, hi, q_offset = lo_ref[...], hi_ref[...], qoff_ref[...]
    first, stop = split_blocks(lo, hi, pl.program_id(3), block_k=block_k, num_splits=num_splits)
    q = q_ref[...]  # [block_r, H]
    row = pl.program_id(2) * block_r + jax.lax.broadcasted_iota(jnp.int32, (block_r, block_k), 0)
    offs = jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def body(i, carry):
        acc, m, l = carry
        start = i * block_k
        base = jnp.minimum(start, seq_len - block_k)  # the ragged last block, shifted back inside the cache
        key = base + offs  # [block_k] cache slots
        # Keys of the union range not already covered by the previous block (the shifted tail overlaps it).
        valid = (key >= jnp.maximum(lo, start)) & (key < hi)
        k_blk = k_ref[pl.ds(base, block_k), :]
        v_blk = jnp.where(valid[:, None], v_ref[pl.ds(base, block_k), :], 0)
        s = jax.lax.dot_general(q, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        # Row r (query position r // G, slot q_offset + r // G) sees key slot x iff r >= (x - q_offset) * G.
        visible = valid[None, :] & (row >= (key[None, :] - q_offset) * groups)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0 below
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pv = jax.lax.dot_general(
            p.astype(v_blk.dtype), v_blk, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc * alpha[:, None] + pv, m_new, l

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_r,), -jnp.inf, jnp.float32),
        jnp.zeros((block_r,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first, stop, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l
