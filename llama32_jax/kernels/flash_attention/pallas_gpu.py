"""The GPU flavour of ``flash_attention``: Pallas kernels in the Triton lowering style.

All three kernels work on the *grouped rows* layout prepared by :mod:`llama32_jax.kernels.flash_attention`:

- ``q, o, do, dq``: ``[B, K, R, H]`` with ``R = T * G`` rows per kv head; row ``r`` is query head ``r % G`` of
  the group at query position ``r // G``, i.e. in cache slot ``q_offset + r // G``. One program therefore reads
  a kv head's keys and values once for all of its ``G`` query heads, and ``dk`` / ``dv`` come out summed over
  the group without any repeated copy of K/V.
- ``k, v, dk, dv``: ``[B, K, S, H]`` (the KV-cache layout).
- ``lse, delta``: ``[B, K, R]`` fp32 (the per-row logsumexp saved by the forward, and ``rowsum(o * do)``).
- ``q_offset``: ``[]`` int32; ``lo, hi``: ``[B]`` int32, the visible key range ``lo <= s < hi`` (already clipped
  to ``[0, S]`` by the caller).

``R`` is a multiple of the row block (the caller pads; padded rows have ``do = 0``, so they add nothing to
``dk``/``dv``) and ``S >= block_k``. ``S`` need not be a multiple of ``block_k``: the forward and ``dq`` loops
read the last key block shifted back so that it ends at ``S`` (no copy of the cache, see :func:`_key_slice`);
the backward pads K/V to the key block (training has ``S = T``, so that copy is as cheap as the ``q`` one).

Grids and loops (Triton style: each program keeps its tiles in registers/shared memory and loops with
``lax.fori_loop`` over ``ref[pl.ds(start, size)]`` slices of operands whose BlockSpec covers the whole
sequence):

- forward: grid ``(B, K, R / block_q)``; a program walks only the key blocks that intersect ``[lo, hi)`` and,
  when causal, end at the last query slot of its row block: fully-masked blocks are never loaded. Online softmax
  in fp32 (running max ``m``, sum ``l``, unnormalised accumulator); scores and the running max are masked with
  ``where`` (not ``-inf`` arithmetic), so a row that sees nothing keeps ``l = 0`` and is written as exactly 0.
- ``dq``: the same grid and key walk; ``p = exp(s - lse)`` recomputed from the saved logsumexp,
  ``ds = p * (do . v^T - delta)``, ``dq = scale * ds . k``.
- ``dk, dv``: grid ``(B, K, S / block_k)``; a program holds one key/value block and walks the row blocks that can
  see it (from the first row whose causal limit reaches the block; none if the block is outside ``[lo, hi)``),
  accumulating ``dv += p^T . do`` and ``dk += scale * ds^T . q`` over all ``G`` heads' rows.

Triton needs power-of-two tile shapes with every matmul dimension >= 16: block sizes are powers of two >= 16 and
so must the head dim be (64 and 128 for Llama).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llama32_jax.nn.attention import MASK_VALUE

# Smallest block (Triton's minimum matmul tile) and the default (rows, keys) blocks of the forward and backward
# kernels; the backward keeps more tiles live per program (k, v, dk, dv or q, do, dq), hence smaller blocks.
ALIGN = 16
FORWARD_BLOCKS = (128, 64)
BACKWARD_BLOCKS = (64, 64)
NUM_STAGES = 2

_NT = (((1,), (1,)), ((), ()))  # a . b^T
_NN = (((1,), (0,)), ((), ()))  # a . b
_TN = (((0,), (0,)), ((), ()))  # a^T . b


def _warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def _precision(dtype):
    """HIGHEST when the session asks for full fp32 matmuls (Triton's default for fp32 operands is TF32)."""
    name = str(jax.config.jax_default_matmul_precision or "").lower()
    full = dtype == jnp.float32 and name in ("highest", "float32", "fp32")
    return lax.Precision.HIGHEST if full else None


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _visible(rows, cols, off, lo, hi, groups: int, causal: bool):
    """``[rows, cols]`` bool: key ``cols`` is in ``[lo, hi)`` and (causal) not after the slot of row ``rows``.

    ``s <= off + r // G`` is tested as ``r >= (s - off) * G`` (the same set for integers, without a division).
    """
    vis = (cols >= lo) & (cols < hi)
    if causal:
        vis = vis & (rows >= (cols - off) * groups)
    return vis


def _key_blocks(row0, block_q: int, block_k: int, off, lo, hi, groups: int, causal: bool):
    """The key blocks ``[first, stop)`` that rows ``[row0, row0 + block_q)`` may see (empty when none)."""
    end = hi
    if causal:  # one past the slot of the block's last row
        end = jnp.minimum(hi, off + lax.div(row0 + block_q - 1, groups) + 1)
    first = lax.div(lo, block_k)
    stop = jnp.where(end > lo, lax.div(end + block_k - 1, block_k), first)
    return first, stop


def _key_slice(j, block_k: int, keys: int, lo):
    """``(read, floor)`` for key block ``j``: where to read its ``block_k`` keys, and the lowest visible key.

    When ``S`` is not a multiple of ``block_k`` the last block is read shifted back to end at ``S`` (every read
    stays in bounds, no padded copy of the cache) and its keys before ``j * block_k``, already seen by block
    ``j - 1``, are masked out by raising the range floor.
    """
    start = j * block_k
    if keys % block_k == 0:
        return start, lo
    return jnp.minimum(start, keys - block_k), jnp.maximum(lo, start)


def _scalar_specs():
    return [
        pl.BlockSpec((), lambda b, h, i: ()),  # q_offset
        pl.BlockSpec((None,), lambda b, h, i: (b,)),  # lo
        pl.BlockSpec((None,), lambda b, h, i: (b,)),  # hi
    ]


def _block_spec(rows: int, head_dim: int):
    """Block ``i`` of ``rows`` rows of one (batch, kv head) of a ``[B, K, L, H]`` array."""
    return pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0))


def _whole_spec(length: int, head_dim: int):
    """The whole ``[L, H]`` sequence of one (batch, kv head): the kernel reads slices of it in its loop."""
    return pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h, 0, 0))


# ------------------------------------------------------------------------------------------------ forward


def _forward_kernel(off_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, groups, causal, scale, block_k):
    block_q, head_dim = q_ref.shape
    row0 = pl.program_id(2) * block_q
    off, lo, hi = off_ref[()], lo_ref[()], hi_ref[()]
    first, stop = _key_blocks(row0, block_q, block_k, off, lo, hi, groups, causal)
    q = q_ref[...]
    rows = row0 + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def step(j, carry):
        acc, m, l = carry
        read, floor = _key_slice(j, block_k, k_ref.shape[0], lo)
        k = k_ref[pl.ds(read, block_k), :]
        v = v_ref[pl.ds(read, block_k), :]
        cols = read + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        vis = _visible(rows, cols, off, floor, hi, groups, causal)
        s = jnp.where(vis, _dot(q, k, _NT) * scale, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first visible block, 1 while nothing has been visible
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, _NN)
        return acc, m_new, l

    acc = jnp.zeros((block_q, head_dim), jnp.float32)
    m = jnp.full((block_q,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc, m, l = lax.fori_loop(first, stop, step, (acc, m, l))
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)  # acc is 0 on rows that saw nothing
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def forward(q, k, v, q_offset, lo, hi, *, groups, causal, scale, block_q, block_k, interpret):
    """Attention output ``[B, K, R, H]`` (``q.dtype``) and the per-row logsumexp ``[B, K, R]`` fp32."""
    b, kv_heads, rows, head_dim = q.shape
    keys = k.shape[2]
    kernel = functools.partial(_forward_kernel, groups=groups, causal=causal, scale=scale, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(b, kv_heads, rows // block_q),
        in_specs=[
            *_scalar_specs(),
            _block_spec(block_q, head_dim),
            _whole_spec(keys, head_dim),
            _whole_spec(keys, head_dim),
        ],
        out_specs=[_block_spec(block_q, head_dim), pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_warps(head_dim), num_stages=NUM_STAGES),
        interpret=interpret,
        name="flash_attention_fwd_gpu",
    )(q_offset, lo, hi, q, k, v)


# ----------------------------------------------------------------------------------------------- backward


def _dq_kernel(
    off_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, groups, causal, scale, block_k
):
    block_q, head_dim = q_ref.shape
    row0 = pl.program_id(2) * block_q
    off, lo, hi = off_ref[()], lo_ref[()], hi_ref[()]
    first, stop = _key_blocks(row0, block_q, block_k, off, lo, hi, groups, causal)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    rows = row0 + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def step(j, dq):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        vis = _visible(rows, cols, off, lo, hi, groups, causal)
        p = jnp.where(vis, jnp.exp(_dot(q, k, _NT) * scale - lse), 0.0)
        ds = p * (_dot(do, v, _NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = lax.fori_loop(first, stop, step, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    off_ref,
    lo_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    groups,
    causal,
    scale,
    block_q,
):
    block_k, head_dim = k_ref.shape
    col0 = pl.program_id(2) * block_k
    off, lo, hi = off_ref[()], lo_ref[()], hi_ref[()]
    live = (hi > lo) & (col0 < hi) & (col0 + block_k > lo)
    first = 0
    if causal:  # the first row whose slot reaches the block's first visible key
        first = lax.div(jnp.maximum((jnp.maximum(col0, lo) - off) * groups, 0), block_q)
    stop = jnp.where(live, q_ref.shape[0] // block_q, first)
    k, v = k_ref[...], v_ref[...]
    cols = col0 + jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def step(i, carry):
        dk, dv = carry
        row0 = i * block_q
        q = q_ref[pl.ds(row0, block_q), :]
        do = do_ref[pl.ds(row0, block_q), :]
        lse = lse_ref[pl.ds(row0, block_q)][:, None]
        delta = delta_ref[pl.ds(row0, block_q)][:, None]
        rows = row0 + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        vis = _visible(rows, cols, off, lo, hi, groups, causal)
        p = jnp.where(vis, jnp.exp(_dot(q, k, _NT) * scale - lse), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        ds = p * (_dot(do, v, _NT) - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(first, stop, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, do, lse, delta, q_offset, lo, hi, *, groups, causal, scale, block_q, block_k, interpret):
    """``(dq [B, K, R, H], dk [B, K, S, H], dv [B, K, S, H])`` from the saved logsumexp and ``delta``."""
    b, kv_heads, rows, head_dim = q.shape
    keys = k.shape[2]
    padded = -(-keys // block_k) * block_k  # training: S = T, so padding K/V costs no more than the q copy
    if padded != keys:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - keys), (0, 0))) for x in (k, v))
    params = plgpu.CompilerParams(num_warps=_warps(head_dim), num_stages=NUM_STAGES)
    static = dict(groups=groups, causal=causal, scale=scale)
    row_vec = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, **static),
        grid=(b, kv_heads, rows // block_q),
        in_specs=[
            *_scalar_specs(),
            _block_spec(block_q, head_dim),
            _whole_spec(padded, head_dim),
            _whole_spec(padded, head_dim),
            _block_spec(block_q, head_dim),
            row_vec,
            row_vec,
        ],
        out_specs=_block_spec(block_q, head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq_gpu",
    )(q_offset, lo, hi, q, k, v, do, lse, delta)
    whole_vec = pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q, **static),
        grid=(b, kv_heads, padded // block_k),
        in_specs=[
            *_scalar_specs(),
            _whole_spec(rows, head_dim),
            _block_spec(block_k, head_dim),
            _block_spec(block_k, head_dim),
            _whole_spec(rows, head_dim),
            whole_vec,
            whole_vec,
        ],
        out_specs=[_block_spec(block_k, head_dim), _block_spec(block_k, head_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv_gpu",
    )(q_offset, lo, hi, q, k, v, do, lse, delta)
    return dq, dk[:, :, :keys], dv[:, :, :keys]
