"""The TPU flavour of ``cross_attention``: Pallas kernels in the Mosaic TPU style.

Arrays arrive in the grouped-rows layout of :mod:`llama32_jax.kernels.cross_attention` (``q [B, K, Rp, H]``, row
``r`` = text position ``r // G``; ``mask [B, Rp, C]`` float row mask over the ``C = I * R`` tiles; per query block
the list of live key blocks, padded by repeating its last entry, and its length).

Forward (:func:`forward`): grid ``(B, K, query blocks, key steps)``, the last dimension ("arbitrary") walking the
live list. The list and its lengths are scalar-prefetch operands (``PrefetchScalarGridSpec``): the K/V index maps
read the step's key block from the list, so the steps past the list's end name the block already in VMEM (no new
DMA) and ``pl.when`` skips their compute. Running max, sum and the ``[block_q, H]`` accumulator live in VMEM
scratch, initialised at the first step and normalised into the output at the last. The ragged last key block is
a partial edge block: its rows past ``N_v`` are zeroed before use (their contents are unspecified) and its keys
are invisible anyway (their tile index is ``>= C``).

Mask: a block of ``block_k`` keys from ``start`` touches at most ``(block_k - 1) // P + 2`` tiles from ``start //
P``; each tile's mask column is selected by a one-hot lane reduction and matched to the keys by comparing
positions with the tile's bounds.

Backward (:func:`backward`): ``dq`` by the forward's walk; ``dk, dv`` on a grid ``(B, K, key blocks, query
steps)`` walking the transposed list (the query blocks that see each key block), accumulating in VMEM; a program
of kv head ``k`` covers all its ``G`` query heads. Block sizes should be multiples of 8 (16 for bf16); 128+
keeps the MXU busy on real hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama32_jax.kernels import mxu_precision, vmem_array_bytes

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 512
ROW_ALIGN = 16  # rows of a bf16 block are packed in pairs: keep the sublane count a multiple of 16
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def choose_blocks(rows: int, n_v: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """``(block_q, block_k)``: ``block_q`` no larger than the (aligned) rows, ``block_k`` no larger than ``N_v``."""
    bq = DEFAULT_BLOCK_Q if block_q is None else block_q
    bk = DEFAULT_BLOCK_K if block_k is None else block_k
    return min(bq, pl.cdiv(rows, ROW_ALIGN) * ROW_ALIGN), min(bk, n_v)


def vmem_bytes(kernel: str, block_q: int, block_k: int, head_dim: int, n_tiles: int, dtype) -> int:
    """Estimated VMEM of one ``kernel`` (``"forward"``, ``"dq"`` or ``"dkdv"``) configuration: in/out blocks twice
    (double-buffered; the ``[block_q, C]`` fp32 row mask among them), the scratch, the fp32 ``(block_q, block_k)``
    score tiles (``s``/``p``, plus ``dp``/``ds`` in the backward) with their casts to ``dtype``, and the zeroed
    ragged K/V copies."""
    f32 = jnp.float32

    def a(rows, cols, dt=dtype):
        return vmem_array_bytes((rows, cols), dt)

    row, key, col, mask = a(block_q, head_dim), a(block_k, head_dim), a(block_q, 1, f32), a(block_q, n_tiles, f32)
    tile, tile_in = a(block_q, block_k, f32), a(block_q, block_k)
    if kernel == "forward":
        blocks = row + 2 * key + mask + row + col
        scratch = 2 * col + a(block_q, head_dim, f32)
        values = 2 * tile + tile_in + 2 * key
    elif kernel == "dq":
        blocks = 2 * row + 2 * key + mask + 2 * col + row
        scratch = a(block_q, head_dim, f32)
        values = 3 * tile + tile_in + 2 * key
    elif kernel == "dkdv":
        blocks = 2 * row + 2 * key + mask + 2 * col + 2 * key
        scratch = 2 * a(block_k, head_dim, f32)
        values = 3 * tile + 2 * tile_in + 2 * key
    else:
        raise ValueError(f"kernel must be 'forward', 'dq' or 'dkdv', got {kernel!r}")
    return 2 * blocks + scratch + values


def _dot_general(a, b, dims, *, preferred_element_type):
    return lax.dot_general(a, b, dims, precision=mxu_precision(a.dtype), preferred_element_type=preferred_element_type)


def _dot(a, b, *, preferred_element_type):
    return _dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=preferred_element_type)


def _visible(mask, start, block_k: int, *, tokens_per_tile: int, n_span: int):
    """``[block_q, block_k]`` bool: row ``r`` sees key ``start + j``; ``mask [block_q, C]`` float rows."""
    pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    cols = lax.broadcasted_iota(jnp.int32, (1, mask.shape[1]), 1)
    c0 = lax.div(start, tokens_per_tile)  # start >= 0: truncation is floor
    vis = None
    for i in range(n_span):
        c = c0 + i
        row_sees = jnp.max(jnp.where(cols == c, mask, 0.0), axis=1, keepdims=True) > 0.0  # [block_q, 1]
        first = c * tokens_per_tile
        term = row_sees & ((pos >= first) & (pos < first + tokens_per_tile))
        vis = term if vis is None else vis | term
    return vis


def _kv_rows(k_ref, v_ref, start, n_v: int):
    """The key/value block, rows past ``N_v`` (a partial edge block's unspecified contents) zeroed."""
    k, v = k_ref[...], v_ref[...]
    if n_v % k.shape[0]:
        valid = start + lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0) < n_v
        k, v = jnp.where(valid, k, 0), jnp.where(valid, v, 0)
    return k, v


def _fwd_kernel(live_ref, count_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, **kw):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)
    block_k, n_v = kw["block_k"], kw["n_v"]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count_ref[b * nq + i])
    def _step():
        start = live_ref[(b * nq + i) * nk + j] * block_k
        k, v = _kv_rows(k_ref, v_ref, start, n_v)
        s = _dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * kw["scale"]
        vis = _visible(mask_ref[...], start, block_k, **kw["tiles"])
        s = jnp.where(vis, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0  # a row that sees nothing keeps acc = l = 0: exactly 0 out
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), MASK_VALUE)


def _tile_args(tokens_per_tile: int, block_k: int, n_tiles: int) -> dict:
    return dict(tokens_per_tile=tokens_per_tile, n_span=min((block_k - 1) // tokens_per_tile + 2, n_tiles))


def _params(*semantics: str):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(q, k, v, mask, live, count, *, tokens_per_tile, scale, block_q, block_k, interpret):
    """``q [B, K, Rp, H]``, ``k, v [B, K, N_v, H]``, ``mask [B, Rp, C]`` float, ``live [B, Rp/block_q, n_kb]`` /
    ``count [B, Rp/block_q]`` int32 -> ``o [B, K, Rp, H]`` in ``q.dtype`` and ``lse [B, K, Rp]`` fp32."""
    b, kh, rows, h = q.shape
    n_v, n_tiles = k.shape[2], mask.shape[-1]
    nq, nk = rows // block_q, live.shape[-1]
    kernel = functools.partial(
        _fwd_kernel, scale=scale, block_k=block_k, n_v=n_v, tiles=_tile_args(tokens_per_tile, block_k, n_tiles)
    )
    q_spec = pl.BlockSpec((None, None, block_q, h), lambda bi, hi, i, j, live, cnt: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, h), lambda bi, hi, i, j, live, cnt: (bi, hi, live[(bi * nq + i) * nk + j], 0)
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nq, nk),
            in_specs=[
                q_spec,
                kv_spec,
                kv_spec,
                pl.BlockSpec((None, block_q, n_tiles), lambda bi, hi, i, j, live, cnt: (bi, i, 0)),
            ],
            out_specs=[
                q_spec,
                pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, i, j, live, cnt: (bi, hi, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, h), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows, 1), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="cross_attention_fwd",
    )(live.reshape(-1), count.reshape(-1), q, k, v, mask)
    return o, lse[..., 0]


def _dq_kernel(live_ref, count_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, **kw):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq, nk = pl.num_programs(2), pl.num_programs(3)
    block_k = kw["block_k"]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < count_ref[b * nq + i])
    def _step():
        start = live_ref[(b * nq + i) * nk + j] * block_k
        k, v = _kv_rows(k_ref, v_ref, start, kw["n_v"])
        s = _dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * kw["scale"]
        vis = _visible(mask_ref[...], start, block_k, **kw["tiles"])
        p = jnp.where(vis, jnp.exp(s - lse_ref[...]), 0.0)
        dp = _dot_general(do_ref[...], v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * kw["scale"]).astype(dq_ref.dtype)


def _dkdv_kernel(
    live_ref, count_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, **kw
):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk, nq = pl.num_programs(2), pl.num_programs(3)
    block_k = kw["block_k"]
    start = j * block_k

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(i < count_ref[b * nk + j])
    def _step():
        k, v = _kv_rows(k_ref, v_ref, start, kw["n_v"])
        q, do = q_ref[...], do_ref[...]
        s = _dot_general(q, k, NT, preferred_element_type=jnp.float32) * kw["scale"]
        vis = _visible(mask_ref[...], start, block_k, **kw["tiles"])
        p = jnp.where(vis, jnp.exp(s - lse_ref[...]), 0.0)
        dv_sc[...] += _dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
        dp = _dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32)

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * kw["scale"]).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, mask, lists, do, lse, delta, *, tokens_per_tile, scale, block_q, block_k, interpret):
    """Gradients of :func:`forward`. ``do [B, K, Rp, H]`` (grouped like ``q``), ``lse, delta [B, K, Rp]`` fp32,
    ``lists = (live, count, live_t, count_t)`` (per query block, and per key block: the live query blocks)
    -> ``dq [B, K, Rp, H]``, ``dk, dv [B, K, N_v, H]``."""
    live, count, live_t, count_t = lists
    b, kh, rows, h = q.shape
    n_v, n_tiles = k.shape[2], mask.shape[-1]
    nq, nk = rows // block_q, live.shape[-1]
    kw = dict(scale=scale, block_k=block_k, n_v=n_v, tiles=_tile_args(tokens_per_tile, block_k, n_tiles))
    lse, delta = lse[..., None], delta[..., None]  # [B, K, Rp, 1]: rows on sublanes, like the score rows

    # dq: the forward's walk over the live key blocks of each query block.
    q_spec = pl.BlockSpec((None, None, block_q, h), lambda bi, hi, i, j, live, cnt: (bi, hi, i, 0))
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, i, j, live, cnt: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, h), lambda bi, hi, i, j, live, cnt: (bi, hi, live[(bi * nq + i) * nk + j], 0)
    )
    mask_spec = pl.BlockSpec((None, block_q, n_tiles), lambda bi, hi, i, j, live, cnt: (bi, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, mask_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="cross_attention_dq",
    )(live.reshape(-1), count.reshape(-1), q, k, v, mask, do, lse, delta)

    # dk, dv: per key block, the walk over the query blocks that see it.
    def qb(bi, j, i, live):
        return live[(bi * nk + j) * nq + i]

    q_spec_t = pl.BlockSpec((None, None, block_q, h), lambda bi, hi, j, i, live, cnt: (bi, hi, qb(bi, j, i, live), 0))
    row_spec_t = pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, j, i, live, cnt: (bi, hi, qb(bi, j, i, live), 0))
    mask_spec_t = pl.BlockSpec((None, block_q, n_tiles), lambda bi, hi, j, i, live, cnt: (bi, qb(bi, j, i, live), 0))
    kv_block = pl.BlockSpec((None, None, block_k, h), lambda bi, hi, j, i, live, cnt: (bi, hi, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, nq),
            in_specs=[q_spec_t, kv_block, kv_block, mask_spec_t, q_spec_t, row_spec_t, row_spec_t],
            out_specs=[kv_block, kv_block],
            scratch_shapes=[pltpu.VMEM((block_k, h), jnp.float32), pltpu.VMEM((block_k, h), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="cross_attention_dkdv",
    )(live_t.reshape(-1), count_t.reshape(-1), q, k, v, mask, do, lse, delta)
    return dq, dk, dv
