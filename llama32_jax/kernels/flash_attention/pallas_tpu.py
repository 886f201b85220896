"""The TPU flavour of ``flash_attention``: Pallas kernels in the Mosaic TPU style.

Same operands as :mod:`.pallas_gpu` (the grouped rows layout: ``q, o, do, dq`` ``[B, K, R, H]`` with row ``r``
at cache slot ``q_offset + r // G``, ``R`` padded to the row block; ``k, v, dk, dv`` ``[B, K, S, H]``, ``S >=
block_k`` and not necessarily a multiple of it: the last key block is then partial, its rows past ``S`` are
zeroed in VMEM and masked, and nothing copies the cache),
except that the per-row fp32 vectors are ``[B, K, R, 1]`` so that their blocks ``(block_q, 1)`` obey Mosaic's
rule for the last two block dims (multiples of ``(8, 128)`` or the whole dim).

Mosaic style: the grid's last dimension walks blocks of the reduction axis ("arbitrary"), BlockSpecs DMA one
block per step into VMEM (double-buffered by Pallas), the running state lives in ``pltpu.VMEM`` scratch that is
initialised at the first step and written out at the last (``pl.when``).

- forward: grid ``(B, K, R / block_q, S / block_k)``; scratch: running max ``m`` and sum ``l`` ``(block_q, 1)``
  and the accumulator ``(block_q, H)``, all fp32.
- ``dq``: the same grid; scratch: the fp32 ``dq`` accumulator.
- ``dk, dv``: grid ``(B, K, S / block_k, R / block_q)`` (rows innermost); scratch: fp32 ``dk`` and ``dv``
  accumulators. ``G`` query heads share a kv head through the grouped rows, so the sums over the group are
  plain accumulation over row blocks.

Block skipping: ``q_offset`` and the per-sequence range ``lo <= s < hi`` are scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``). The index maps clamp the walked block index into the range of blocks that can hold
visible pairs (key blocks in ``[lo, hi)`` up to the causal limit of the row block; row blocks from the first one
whose slots reach the key block), so a skipped step maps to the block already resident and issues no new DMA,
and ``pl.when`` skips its compute. Masking inside a computed block uses ``where`` on the scores and on the
probabilities, so a row that sees nothing keeps ``l = 0`` and is written as exactly 0 (never NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama32_jax.kernels import mxu_precision, vmem_array_bytes
from llama32_jax.nn.attention import MASK_VALUE

# Smallest block (a sublane tile) and the default (rows, keys) blocks of the forward and backward kernels.
ALIGN = 8
FORWARD_BLOCKS = (256, 512)
BACKWARD_BLOCKS = (256, 256)

_NT = (((1,), (1,)), ((), ()))  # a . b^T


def _nt(a, b):
    return lax.dot_general(a, b, _NT, precision=mxu_precision(a.dtype), preferred_element_type=jnp.float32)


def _nn(a, b):
    return lax.dot(a, b, precision=mxu_precision(a.dtype), preferred_element_type=jnp.float32)


def _visible(i, j, block_q, block_k, off, lo, hi, groups: int, causal: bool):
    """``(block_q, block_k)`` bool for row block ``i`` x key block ``j`` (see ``pallas_gpu._visible``)."""
    shape = (block_q, block_k)
    rows = i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = (cols >= lo) & (cols < hi)
    if causal:
        vis = vis & (rows >= (cols - off) * groups)
    return vis


def _key_range(i, off, lo, hi, *, block_q, block_k, groups, causal):
    """``(first, last, any)``: row block ``i`` sees key blocks ``first..last`` (``last >= first``) iff ``any``."""
    end = hi
    if causal:
        end = jnp.minimum(hi, off + lax.div(i * block_q + block_q - 1, groups) + 1)
    first = lax.div(lo, block_k)
    last = jnp.maximum(lax.div(end - 1, block_k), first)
    return first, last, end > lo


def _row_range(j, off, lo, hi, *, block_q, block_k, groups, causal, row_blocks):
    """``(first, any)``: key block ``j`` is seen by row blocks ``first..row_blocks - 1`` iff ``any``."""
    col0 = j * block_k
    live = (hi > lo) & (col0 < hi) & (col0 + block_k > lo)
    if not causal:
        return 0, live
    first = lax.div(jnp.maximum((jnp.maximum(col0, lo) - off) * groups, 0), block_q)
    return jnp.minimum(first, row_blocks - 1), live & (first < row_blocks)


def _load_keys(ref, j, block_k: int, keys: int):
    """Key block ``j`` of K or V; when ``S % block_k != 0`` the rows past ``S`` of the last (partial) block hold
    whatever the buffer held before (NaN in interpret mode) and are zeroed, since ``0 * NaN`` would leak into the
    ``p . v`` and ``ds . k`` sums."""
    x = ref[...]
    if keys % block_k:
        inside = j * block_k + lax.broadcasted_iota(jnp.int32, x.shape, 0) < keys
        x = jnp.where(inside, x, jnp.zeros_like(x))
    return x


def vmem_bytes(kernel: str, block_q: int, block_k: int, head_dim: int, dtype) -> int:
    """Estimated VMEM of one ``kernel`` (``"forward"``, ``"dq"`` or ``"dkv"``) configuration: every in/out block
    twice (Pallas double-buffers them), the scratch, and the big per-step values: the ``(block_q, block_k)`` score
    tiles (fp32 ``s``/``p``, and ``dp``/``ds`` in the backward, plus their casts to ``dtype`` for the MXU) and the
    zeroed ragged K/V copies. Mosaic's own spill space for smaller values comes on top."""
    f32 = jnp.float32

    def a(rows, cols, dt=dtype):
        return vmem_array_bytes((rows, cols), dt)

    row, key, col = a(block_q, head_dim), a(block_k, head_dim), a(block_q, 1, f32)
    tile, tile_in = a(block_q, block_k, f32), a(block_q, block_k)
    if kernel == "forward":
        blocks = row + 2 * key + row + col  # in: q, k, v; out: o, lse
        scratch = 2 * col + a(block_q, head_dim, f32)
        values = 2 * tile + tile_in + 2 * key
    elif kernel == "dq":
        blocks = 2 * row + 2 * key + 2 * col + row  # in: q, k, v, do, lse, delta; out: dq
        scratch = a(block_q, head_dim, f32)
        values = 3 * tile + tile_in + 2 * key
    elif kernel == "dkv":
        blocks = 2 * row + 2 * key + 2 * col + 2 * key  # out: dk, dv
        scratch = 2 * a(block_k, head_dim, f32)
        values = 3 * tile + 2 * a(block_k, block_q) + 2 * key  # p.T and ds.T in dtype
    else:
        raise ValueError(f"kernel must be 'forward', 'dq' or 'dkv', got {kernel!r}")
    return 2 * blocks + scratch + values


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ------------------------------------------------------------------------------------------------ forward


def _forward_kernel(off_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, **static):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    off, lo, hi = off_ref[0], lo_ref[b], hi_ref[b]
    groups, causal, scale = static["groups"], static["causal"], static["scale"]
    block_q, block_k = static["block_q"], static["block_k"]
    first, last, live = _key_range(i, off, lo, hi, **_keys_static(static))

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(live & (j >= first) & (j <= last))
    def _step():
        k = _load_keys(k_ref, j, block_k, static["keys"])
        v = _load_keys(v_ref, j, block_k, static["keys"])
        vis = _visible(i, j, block_q, block_k, off, lo, hi, groups, causal)
        s = jnp.where(vis, _nt(q_ref[...], k) * scale, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _nn(p.astype(v.dtype), v)
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe_l).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe_l), 0.0)


def _keys_static(static):
    return {name: static[name] for name in ("block_q", "block_k", "groups", "causal")}


def _row_specs(static, head_dim):
    """Row-block specs for the forward/dq grid ``(b, h, i, j)``: the ``(block_q, H)`` and ``(block_q, 1)`` blocks."""
    block_q = static["block_q"]
    rows = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    vec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    return rows, vec


def _clamped_key_spec(static, head_dim):
    """Key/value blocks for the grid ``(b, h, i, j)``: ``j`` clamped to the blocks row block ``i`` can see."""

    def index(b, h, i, j, off_ref, lo_ref, hi_ref):
        first, last, _ = _key_range(i, off_ref[0], lo_ref[b], hi_ref[b], **_keys_static(static))
        return b, h, jnp.minimum(jnp.maximum(j, first), last), 0

    return pl.BlockSpec((None, None, static["block_k"], head_dim), index)


def forward(q, k, v, q_offset, lo, hi, *, groups, causal, scale, block_q, block_k, interpret):
    """Attention output ``[B, K, R, H]`` (``q.dtype``) and the per-row logsumexp ``[B, K, R]`` fp32."""
    b, kv_heads, rows, head_dim = q.shape
    keys = k.shape[2]
    static = dict(groups=groups, causal=causal, scale=scale, block_q=block_q, block_k=block_k, keys=keys)
    row_spec, vec_spec = _row_specs(static, head_dim)
    key_spec = _clamped_key_spec(static, head_dim)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, rows // block_q, pl.cdiv(keys, block_k)),
            in_specs=[row_spec, key_spec, key_spec],
            out_specs=[row_spec, vec_spec],
            scratch_shapes=[
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, head_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kv_heads, rows, 1), jnp.float32),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_fwd_tpu",
    )(q_offset.reshape(1), lo, hi, q, k, v)
    return out, lse[..., 0]


# ----------------------------------------------------------------------------------------------- backward


def _dq_kernel(off_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, **static):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    off, lo, hi = off_ref[0], lo_ref[b], hi_ref[b]
    scale = static["scale"]
    first, last, live = _key_range(i, off, lo, hi, **_keys_static(static))

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(live & (j >= first) & (j <= last))
    def _step():
        k = _load_keys(k_ref, j, static["block_k"], static["keys"])
        v = _load_keys(v_ref, j, static["block_k"], static["keys"])
        vis = _visible(i, j, static["block_q"], static["block_k"], off, lo, hi, static["groups"], static["causal"])
        p = jnp.where(vis, jnp.exp(_nt(q_ref[...], k) * scale - lse_ref[...]), 0.0)
        ds = p * (_nt(do_ref[...], v) - delta_ref[...])
        dq_sc[...] += _nn(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    off_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, **static
):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    off, lo, hi = off_ref[0], lo_ref[b], hi_ref[b]
    scale = static["scale"]
    first, live = _row_range(j, off, lo, hi, row_blocks=pl.num_programs(3), **_keys_static(static))

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(live & (i >= first))
    def _step():
        q, do = q_ref[...], do_ref[...]
        k = _load_keys(k_ref, j, static["block_k"], static["keys"])
        v = _load_keys(v_ref, j, static["block_k"], static["keys"])
        vis = _visible(i, j, static["block_q"], static["block_k"], off, lo, hi, static["groups"], static["causal"])
        p = jnp.where(vis, jnp.exp(_nt(q, k) * scale - lse_ref[...]), 0.0)  # (block_q, block_k)
        dv_sc[...] += _nn(p.T.astype(do.dtype), do)
        ds = p * (_nt(do, v) - delta_ref[...])
        dk_sc[...] += _nn(ds.T.astype(q.dtype), q)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, do, lse, delta, q_offset, lo, hi, *, groups, causal, scale, block_q, block_k, interpret):
    """``(dq [B, K, R, H], dk [B, K, S, H], dv [B, K, S, H])`` from the saved logsumexp and ``delta``."""
    b, kv_heads, rows, head_dim = q.shape
    keys = k.shape[2]
    static = dict(groups=groups, causal=causal, scale=scale, block_q=block_q, block_k=block_k, keys=keys)
    scalars = (q_offset.reshape(1), lo, hi)
    lse, delta = lse[..., None], delta[..., None]
    semantics = ("parallel", "parallel", "parallel", "arbitrary")

    row_spec, vec_spec = _row_specs(static, head_dim)
    key_spec = _clamped_key_spec(static, head_dim)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, rows // block_q, pl.cdiv(keys, block_k)),
            in_specs=[row_spec, key_spec, key_spec, row_spec, vec_spec, vec_spec],
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(semantics),
        interpret=interpret,
        name="flash_attention_dq_tpu",
    )(*scalars, q, k, v, do, lse, delta)

    # dk/dv grid (b, h, j, i): key block j outer, row blocks i walked innermost and clamped to those that see j.
    row_blocks = rows // block_q

    def row_index(b, h, j, i, off_ref, lo_ref, hi_ref):
        first, live = _row_range(j, off_ref[0], lo_ref[b], hi_ref[b], row_blocks=row_blocks, **_keys_static(static))
        return b, h, jnp.where(live, jnp.maximum(i, first), first), 0  # a dead key block keeps one row block

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), row_index)
    qvec_spec = pl.BlockSpec((None, None, block_q, 1), row_index)
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, i, *_: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, pl.cdiv(keys, block_k), row_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, qvec_spec, qvec_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(semantics),
        interpret=interpret,
        name="flash_attention_dkv_tpu",
    )(*scalars, q, k, v, do, lse, delta)
    return dq, dk, dv
