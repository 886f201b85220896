"""The TPU flavour of ``decode_attention``: Pallas with the Mosaic TPU lowering, split-K.

Grid ``(B, K, splits, steps)`` with ``steps = ceil(ceil(S / block_k) / splits)``, the last dimension walking one
split's key blocks ("arbitrary"; the others "parallel", so megacore chips share them). The block-range ints
(``lo``, ``hi`` per sequence, ``q_offset``) are scalar-prefetched into SMEM: the K/V index maps compute the split's
block range (:func:`~llama32_jax.kernels.split_blocks`) and clamp the block index into it, so the
steps past the split's last block (or of a split with nothing to do) re-name the block already in VMEM and the
pipeline issues no DMA for them; ``pl.when`` skips their compute. Those steps still cost the grid's per-step
overhead (a fraction of a microsecond each), which is why the default ``block_k`` is large (512, or 1024 once
``S >= 8192``): a 128K cache is 128 grid steps per (sequence, kv head) whatever the valid range.

A program's rows are all ``R = T * G`` grouped query rows of its kv head, padded to the sublane tile (8 rows for
fp32, 16 for 16-bit types): one ``[R, H]`` query block, ``[block_k, H]`` K/V blocks, and VMEM scratch for the
running max / sum (lane-replicated ``[R, 128]``) and the fp32 ``[R, H]`` accumulator, initialised at the first step
and written out as the split's partial at the last.

Any ``S`` works: ``block_k`` is ``S`` itself when that is smaller (a full-dimension block), else a multiple of the
sublane tile; a ragged last block reaches past ``S`` (Pallas pads the boundary block with unspecified values) and is
masked with ``where`` on both the scores and the V rows, so garbage never reaches the sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import mxu_precision, split_blocks, vmem_array_bytes

LANES = 128
LONG_CACHE = 8192  # from this cache length on, 1024-key blocks halve the grid steps
SCORE_ELEMENTS = 128 * 1024  # fp32 scores of one grid step (512 KiB, a few times that live with exp / casts)
PROGRAMS = 2  # TensorCores a megacore chip splits "parallel" grid dimensions over


def _sublanes(dtype) -> int:
    return 8 * (4 // jnp.dtype(dtype).itemsize)


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
    """Resolve ``(block_k, num_splits)``.

    ``block_k`` defaults to the largest of 1024 (long caches only) / 512 / 256 / 128 dividing ``S``, else 512 or
    1024 with a masked ragged last block; ``S`` itself when ``S`` is no larger; halved (down to 128) while the
    fp32 ``[R, block_k]`` scores of many grouped rows (``T * G`` up to 512) exceed ``SCORE_ELEMENTS``. A given
    ``block_k`` must be a multiple of the sublane tile (8 for fp32, 16 for 16-bit dtypes) or at least ``S``. The
    grid runs sequentially on a TensorCore, so ``num_splits`` defaults to just enough programs for a megacore
    chip's two cores; a given value is capped at the number of key blocks.
    """
    del head_dim, interpret
    tile = _sublanes(dtype)
    if block_k is None:
        top = 1024 if seq_len >= LONG_CACHE else 512
        while top > LANES and pl.cdiv(rows, tile) * tile * top > SCORE_ELEMENTS:
            top //= 2
        block_k = next((c for c in (top, top // 2, top // 4) if c >= LANES and seq_len % c == 0), top)
    elif block_k < seq_len and block_k % tile:
        raise InvalidInputError(
            f"block_k must be a multiple of {tile} for the TPU kernel with {jnp.dtype(dtype).name} "
            f"(or >= S={seq_len}), got {block_k}"
        )
    block_k = min(block_k, seq_len)
    n_blocks = pl.cdiv(seq_len, block_k)
    if num_splits is None:
        num_splits = pl.cdiv(PROGRAMS, batch * kv_heads)
    return block_k, min(num_splits, n_blocks)


def vmem_bytes(rows: int, block_k: int, head_dim: int, dtype) -> int:
    """Estimated VMEM of the kernel for ``rows = T * G`` grouped rows and ``block_k``: the query block, K/V blocks
    and the three partial outputs, each twice (double-buffered); the scratch; the fp32 ``[R, block_k]`` scores and
    probabilities, the probabilities in ``dtype`` and the masked V copy."""
    f32, tile = jnp.float32, _sublanes(dtype)
    r_pad = pl.cdiv(rows, tile) * tile

    def a(r, c, dt=dtype):
        return vmem_array_bytes((r, c), dt)

    blocks = a(r_pad, head_dim) + 2 * a(block_k, head_dim) + a(r_pad, head_dim, f32) + 2 * a(r_pad, LANES, f32)
    scratch = 2 * a(r_pad, LANES, f32) + a(r_pad, head_dim, f32)
    values = 2 * a(r_pad, block_k, f32) + a(r_pad, block_k) + a(block_k, head_dim)
    return 2 * blocks + scratch + values


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
    """Per-split partials of decode attention (arguments and results as the GPU flavour's ``decode_partials``)."""
    b, kv_heads, r, h = rows.shape
    s = k.shape[2]
    tile = _sublanes(rows.dtype)
    r_pad = pl.cdiv(r, tile) * tile
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))  # the queries are small: padding them is cheap
    n_blocks = pl.cdiv(s, block_k)
    steps = pl.cdiv(n_blocks, num_splits)

    def kv_index(i, j, p, step, lo_ref, hi_ref, qoff_ref):
        first, stop = split_blocks(lo_ref[i], hi_ref[i], p, block_k=block_k, num_splits=num_splits)
        # Past the split's last block: stay on it (no new DMA). An empty split stays on the sequence's last block.
        return i, j, jnp.clip(jnp.minimum(first + step, stop - 1), 0, n_blocks - 1), 0

    kernel = functools.partial(_kernel, block_k=block_k, groups=groups, scale=scale, num_splits=num_splits, steps=steps)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kv_heads, num_splits, steps),
        in_specs=[
            pl.BlockSpec((None, None, r_pad, h), lambda i, j, p, step, *_: (i, j, 0, 0)),
            pl.BlockSpec((None, None, block_k, h), kv_index),
            pl.BlockSpec((None, None, block_k, h), kv_index),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, r_pad, h), lambda i, j, p, step, *_: (i, j, p, 0, 0)),
            pl.BlockSpec((None, None, None, r_pad, LANES), lambda i, j, p, step, *_: (i, j, p, 0, 0)),
            pl.BlockSpec((None, None, None, r_pad, LANES), lambda i, j, p, step, *_: (i, j, p, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((r_pad, LANES), jnp.float32),  # running max, replicated across lanes
            pltpu.VMEM((r_pad, LANES), jnp.float32),  # running sum
            pltpu.VMEM((r_pad, h), jnp.float32),  # unnormalised accumulator
        ],
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad, LANES), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, r_pad, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(lo, hi, q_offset.reshape(1), rows, k, v)
    return acc, m[..., 0], l[..., 0]


def _kernel(
    lo_ref, hi_ref, qoff_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out, m_scr, l_scr, acc_scr,
    *, block_k, groups, scale, num_splits, steps,
):  # fmt: skip
    """One grid step: key block ``first + step`` of split ``p`` for one (sequence, kv head)."""
    i, p, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi, q_offset = lo_ref[i], hi_ref[i], qoff_ref[0]
    first, stop = split_blocks(lo, hi, p, block_k=block_k, num_splits=num_splits)
    block = first + step

    @pl.when(step == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(block < stop)
    def _compute():
        precision = mxu_precision(q_ref.dtype)
        s = jax.lax.dot_general(
            q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        s = s * scale  # [R, block_k]
        key = block * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        # Row r (slot q_offset + r // G) sees key slot x iff lo <= x < hi and r >= (x - q_offset) * G.
        visible = (key >= lo) & (key < hi) & (row >= (key - q_offset) * groups)
        s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_scr[...]  # [R, LANES]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0 below
        alpha = jnp.exp(m_prev - m_use)
        p_blk = jnp.exp(s - m_use[:, :1])
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p_blk, axis=1, keepdims=True)
        m_scr[...] = m_new
        v_key = block * block_k + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0)
        v = jnp.where((v_key >= lo) & (v_key < hi), v_ref[...], 0)  # the ragged tail block holds garbage
        pv = jax.lax.dot_general(
            p_blk.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        acc_scr[...] = acc_scr[...] * alpha[:, :1] + pv

    @pl.when(step == steps - 1)
    def _done():
        acc_out[...] = acc_scr[...]
        m_out[...] = m_scr[...]
        l_out[...] = l_scr[...]
