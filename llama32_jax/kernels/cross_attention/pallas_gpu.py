"""The GPU flavour of ``cross_attention``: Pallas kernels in the Triton lowering style.

Every array arrives in the grouped-rows layout built by :mod:`llama32_jax.kernels.cross_attention`: queries
``q [B, K, Rp, H]`` (row ``r`` of kv head ``k`` is text position ``r // G`` of query head ``k * G + r % G``; rows
padded to a multiple of ``block_q``), the row mask ``mask [B, Rp, C]`` float (1 = the row sees tile ``c`` of the
``C = I * R`` tiles), and the per-query-block list of *live* key blocks (those holding a token some row of the
block sees), padded by repeating its last entry.

Forward (:func:`forward`): grid ``(query blocks, splits, B, K)``; a program keeps its ``[block_q, H]`` queries and
the mask rows in registers and walks only its live key blocks (``fori_loop`` over the list) with an online softmax
in fp32. K/V are whole-sequence blocks read with ``ref[pl.ds(start, block_k)]``; the ragged last block is read
*overlapped*, starting at ``N_v - block_k``, with the keys that an earlier block already covered masked off, so
nothing is read out of bounds and the cached K/V are never copied (the decode step re-reads them every token).
When ``B * K * query blocks`` is too small to fill the GPU (decode: one query block), the live list is also split
``splits`` ways; each split writes a normalized partial output and its log-sum-exp, merged in XLA.

Mask: a key's tile is ``s // P``; a block of ``block_k`` keys spans at most ``(block_k - 1) // P + 2`` tiles from
``c0 = start // P``, each selected from the mask rows by a one-hot reduction (Triton has no dynamic column slice)
and matched to the keys by comparing positions with the tile's bounds (no vector division).

Backward (:func:`backward`): ``dq`` by the same walk as the forward (grid ``(query blocks, B, K)``), ``dk, dv`` by
one program per key block (grid ``(key blocks, B, K)``) walking the query blocks that see it (the transposed live
list); each program of a kv head sums all its ``G`` query heads, so no reduction over heads follows. K/V are padded
to whole key blocks there (one copy, small next to the backward's work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_BLOCK = 16  # Triton dots need every dimension >= 16
TARGET_PROGRAMS = 128  # about one program per SM of an H100 (132): split the key walk below this
MIN_BLOCKS_PER_SPLIT = 4


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def choose_blocks(rows: int, n_v: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """``(block_q, block_k)``: powers of two >= 16; ``block_q`` no larger than the rows need (decode: 16)."""
    bq = DEFAULT_BLOCK_Q if block_q is None else block_q
    bk = DEFAULT_BLOCK_K if block_k is None else block_k
    return min(bq, max(MIN_BLOCK, _next_pow2(rows))), bk


def _num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def _visible(mask, start, lo, block_k: int, *, tokens_per_tile: int, n_span: int):
    """``[block_q, block_k]`` bool: row ``r`` sees key ``start + j`` (and ``start + j >= lo``, i.e. not a key an
    earlier block already covered). ``mask [block_q, Cp]`` float rows."""
    pos = start + jnp.arange(block_k, dtype=jnp.int32)
    cols = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    c0 = lax.div(start, tokens_per_tile)
    vis = None
    for i in range(n_span):  # the few tiles this block can touch
        c = c0 + i
        row_sees = jnp.sum(jnp.where(cols == c, mask, 0.0), axis=1) > 0.0  # [block_q]
        first = c * tokens_per_tile
        in_tile = (pos >= first) & (pos < first + tokens_per_tile)  # [block_k]
        term = row_sees[:, None] & in_tile[None, :]
        vis = term if vis is None else vis | term
    return vis & (pos >= lo)[None, :]


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, scale, block_k, splits, tiles):
    n_keys = k_ref.shape[0]
    count = table_ref[0]  # live key blocks of this query block; their indices follow
    per = lax.div(count + splits - 1, splits)
    first = pl.program_id(1) * per
    last = jnp.minimum(count, first + per)
    q = q_ref[...]
    mask = mask_ref[...]
    bq, h = q.shape

    def body(e, carry):
        acc, m, l = carry
        lo = table_ref[1 + e] * block_k
        start = jnp.minimum(lo, n_keys - block_k)  # the ragged last block is read overlapped, never past the end
        k = k_ref[pl.ds(start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        vis = _visible(mask, start, lo, block_k, **tiles)
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
        v = v_ref[pl.ds(start, block_k), :]
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, body, init)
    seen = l > 0.0  # a row that sees nothing keeps acc = l = 0 and returns exactly 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)


def _tile_args(tokens_per_tile: int, block_k: int, n_tiles: int) -> dict:
    return dict(tokens_per_tile=tokens_per_tile, n_span=min((block_k - 1) // tokens_per_tile + 2, n_tiles))


def _table(live, count):
    """``[B, blocks, 1 + n]`` int32: the live count, then the (padded) list; one row per program."""
    return jnp.concatenate([count[..., None], live], axis=-1).astype(jnp.int32)


def _pad_cols(mask):
    """Pad the tile columns to a power of two (Triton vectors)."""
    c = mask.shape[-1]
    return jnp.pad(mask, ((0, 0), (0, 0), (0, _next_pow2(c) - c)))


def forward(q, k, v, mask, live, count, *, tokens_per_tile, scale, block_q, block_k, interpret):
    """``q [B, K, Rp, H]``, ``k, v [B, K, N_v, H]``, ``mask [B, Rp, C]`` float, ``live [B, Rp/block_q, n_kb]`` /
    ``count [B, Rp/block_q]`` int32 -> ``o [B, K, Rp, H]`` in ``q.dtype`` and ``lse [B, K, Rp]`` fp32."""
    b, kh, rows, h = q.shape
    n_v, n_tiles = k.shape[2], mask.shape[-1]
    if n_v < block_k:  # a toy-sized vision input: pad it to one block (a few rows)
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, block_k - n_v), (0, 0))) for x in (k, v))
    n_keys = k.shape[2]
    nq, n_kb = rows // block_q, live.shape[-1]
    programs = nq * b * kh
    splits = 1
    if programs < TARGET_PROGRAMS:
        splits = max(1, min(pl.cdiv(TARGET_PROGRAMS, programs), n_kb // MIN_BLOCKS_PER_SPLIT))
    part_dtype = q.dtype if splits == 1 else jnp.float32
    cols = _pad_cols(mask)
    kernel = functools.partial(
        _fwd_kernel, scale=scale, block_k=block_k, splits=splits, tiles=_tile_args(tokens_per_tile, block_k, n_tiles)
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, splits, b, kh),
        in_specs=[
            pl.BlockSpec((None, None, 1 + n_kb), lambda i, s, bi, hi: (bi, i, 0)),
            pl.BlockSpec((None, None, block_q, h), lambda i, s, bi, hi: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, n_keys, h), lambda i, s, bi, hi: (bi, hi, 0, 0)),
            pl.BlockSpec((None, None, n_keys, h), lambda i, s, bi, hi: (bi, hi, 0, 0)),
            pl.BlockSpec((None, block_q, cols.shape[-1]), lambda i, s, bi, hi: (bi, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, h), lambda i, s, bi, hi: (bi, hi, s, i, 0)),
            pl.BlockSpec((None, None, None, block_q), lambda i, s, bi, hi: (bi, hi, s, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, splits, rows, h), part_dtype),
            jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(h), num_stages=2),
        interpret=interpret,
        name="cross_attention_fwd",
    )(_table(live, count), q, k, v, cols)
    if splits == 1:
        return o[:, :, 0], lse[:, :, 0]
    # Merge the splits: weights exp(lse_s - lse). A split that saw nothing has lse = MASK_VALUE and o = 0; a row
    # that saw nothing in any split gets weights 1 and zeros, so 0 again (never NaN).
    top = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp(lse - top)
    total = jnp.sum(w, axis=2)
    out = jnp.sum(w[..., None] * o, axis=2) / total[..., None]
    return out.astype(q.dtype), top[:, :, 0] + jnp.log(total)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_k, tiles):
    n_keys = k_ref.shape[0]
    q, do, mask = q_ref[...], do_ref[...], mask_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(e, dq):
        lo = table_ref[1 + e] * block_k
        start = jnp.minimum(lo, n_keys - block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        vis = _visible(mask, start, lo, block_k, **tiles)
        p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, table_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    table_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q, tiles
):
    block_k = k_ref.shape[0]
    start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]

    def body(e, carry):
        dk, dv = carry
        rows = pl.ds(table_ref[1 + e] * block_q, block_q)
        q, do, mask = q_ref[rows, :], do_ref[rows, :], mask_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        p = jnp.where(_visible(mask, start, start, block_k, **tiles), jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, table_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, mask, lists, do, lse, delta, *, tokens_per_tile, scale, block_q, block_k, interpret):
    """Gradients of :func:`forward`. ``do [B, K, Rp, H]`` (grouped like ``q``), ``lse, delta [B, K, Rp]`` fp32,
    ``lists = (live, count, live_t, count_t)`` (per query block, and per key block: the live query blocks)
    -> ``dq [B, K, Rp, H]``, ``dk, dv [B, K, N_v, H]``."""
    live, count, live_t, count_t = lists
    b, kh, rows, h = q.shape
    n_v, n_tiles = k.shape[2], mask.shape[-1]
    nq, n_kb = rows // block_q, live.shape[-1]
    pad = n_kb * block_k - n_v
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
    mask = _pad_cols(mask)
    tiles = _tile_args(tokens_per_tile, block_k, n_tiles)
    params = plgpu.CompilerParams(num_warps=_num_warps(h), num_stages=2)
    n_keys = n_kb * block_k
    whole_kv = pl.BlockSpec((None, None, n_keys, h), lambda i, bi, hi: (bi, hi, 0, 0))
    q_block = pl.BlockSpec((None, None, block_q, h), lambda i, bi, hi: (bi, hi, i, 0))
    row_block = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k, tiles=tiles),
        grid=(nq, b, kh),
        in_specs=[
            pl.BlockSpec((None, None, 1 + n_kb), lambda i, bi, hi: (bi, i, 0)),
            q_block,
            whole_kv,
            whole_kv,
            pl.BlockSpec((None, block_q, mask.shape[-1]), lambda i, bi, hi: (bi, i, 0)),
            q_block,
            row_block,
            row_block,
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="cross_attention_dq",
    )(_table(live, count), q, k, v, mask, do, lse, delta)

    whole_q = pl.BlockSpec((None, None, rows, h), lambda j, bi, hi: (bi, hi, 0, 0))
    whole_rows = pl.BlockSpec((None, None, rows), lambda j, bi, hi: (bi, hi, 0))
    kv_block = pl.BlockSpec((None, None, block_k, h), lambda j, bi, hi: (bi, hi, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, tiles=tiles),
        grid=(n_kb, b, kh),
        in_specs=[
            pl.BlockSpec((None, None, 1 + nq), lambda j, bi, hi: (bi, j, 0)),
            whole_q,
            kv_block,
            kv_block,
            pl.BlockSpec((None, rows, mask.shape[-1]), lambda j, bi, hi: (bi, 0, 0)),
            whole_q,
            whole_rows,
            whole_rows,
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="cross_attention_dkdv",
    )(_table(live_t, count_t), q, k, v, mask, do, lse, delta)
    return dq, dk[:, :, :n_v], dv[:, :, :n_v]
