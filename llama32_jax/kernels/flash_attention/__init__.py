"""``flash_attention``: prefill/training self-attention with a Pallas forward and a Pallas ``custom_vjp`` backward.

Semantics are those of :func:`llama32_jax.nn.attention.self_attention` (re-exported by :mod:`.reference` as the
``"xla"`` implementation): queries ``q [B, T, N, H]``, keys/values ``k, v [B, K, S, H]`` (the KV-cache layout,
``N % K == 0``, query head ``n`` uses kv head ``n // (N / K)``). Query ``t`` sits in cache slot ``q_offset + t``;
key ``s`` is visible to query ``t`` of sequence ``b`` iff ``kv_start[b] <= s < kv_end[b]`` and, when causal,
``s <= q_offset + t``. A query that sees no key gets exactly 0 (and zero gradients). ``T`` and ``S`` may differ:
a whole sequence has ``S = T, q_offset = 0``; a prefill into a cache has ``S`` = the cache length and
``q_offset`` = the write index.

Pallas path (``impl="pallas"``; the kernels are in :mod:`.pallas_gpu` and :mod:`.pallas_tpu`):

- Layout. The queries are regrouped per kv head, ``[B, T, N, H] -> [B, K, T * G, H]`` (row ``r`` = query
  position ``r // G``, head ``r % G`` of the group), so one kernel program reads a kv head's K/V once for all of
  its ``G`` query heads and ``dk``/``dv`` come out summed over the group; K/V are never repeated. The regrouping
  is one transposed copy of ``q`` (and of ``o``/``do``/``dq`` in the backward), small next to the attention.
- Ragged lengths. Rows are padded to the row block (free: it fuses into the transposed copy); padded rows are
  dropped (their ``do`` is 0). Keys are padded only when ``S`` is shorter than a key block (a small copy); a
  longer ``S`` that is not a multiple of the block is handled in the kernels (the GPU forward reads its last key
  block shifted back, the TPU kernels zero the tail of a partial block; only the GPU backward pads K/V, as
  training has ``S = T``), so a prefill never copies the cache. Padded keys lie after ``kv_end`` and are masked.
- Autodiff. :func:`jax.custom_vjp`: the forward saves the per-row fp32 logsumexp; the backward computes
  ``delta = rowsum(o * do)`` in XLA and runs two Pallas kernels, one for ``dq`` (per row block, over key
  blocks) and one for ``dk, dv`` (per key block, over row blocks). ``q_offset``, ``kv_start`` and ``kv_end``
  are ordinary (possibly traced) arguments with no cotangent; the whole loss may be jitted.
- Blocks. ``block_q`` (rows of the grouped layout) and ``block_k`` (keys) are powers of two (>= 16 for the
  GPU flavour, Triton's smallest matmul, >= 8 for TPU); when given they apply to the forward and both backward
  kernels, else each kernel takes its flavour's defaults (``FORWARD_BLOCKS`` / ``BACKWARD_BLOCKS``), shrunk to
  the (power-of-two rounded) length when that is shorter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import check_qkv, resolve_backend, resolve_impl, resolve_interpret
from llama32_jax.kernels.flash_attention import pallas_gpu, pallas_tpu
from llama32_jax.kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]


def flash_attention(
    q,
    k,
    v,
    *,
    q_offset=0,
    kv_start=None,
    kv_end=None,
    causal=True,
    scale=None,
    impl="auto",
    backend=None,
    interpret=None,
    block_q=None,
    block_k=None,
) -> jax.Array:
    """Self-attention of ``q`` over the cache ``k, v`` (see the module docstring for the semantics).

    Args:
      q: ``[B, T, N, H]`` queries (fp32, bf16 or fp16).
      k, v: ``[B, K, S, H]`` keys and values, same dtype as ``q``, ``N % K == 0``.
      q_offset: ``[]`` int (may be traced), the cache slot of query 0.
      kv_start, kv_end: ``[B]`` int (may be traced) or None (``0`` / ``S``): the visible key slots of each
        sequence. Values outside ``[0, S]`` are clipped; ``kv_end <= kv_start`` leaves the sequence empty.
      causal: also hide keys after each query's own slot.
      scale: score scale, default ``H ** -0.5`` (a Python number: the kernels take it as a constant).
      impl: ``"auto"``, ``"xla"`` (the reference) or ``"pallas"``.
      backend: Pallas flavour, ``"gpu"``, ``"tpu"`` or None (the platform's).
      interpret: run the Pallas kernels in the interpreter (default: when the platform cannot lower them).
      block_q, block_k: block sizes along the grouped query rows and the keys (powers of two), default per
        flavour and kernel.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.

    Raises:
      InvalidInputError: wrong ranks, shapes or dtypes, ``N % K != 0``, bad ``impl``/``backend``/blocks.
    """
    b, t, n, h, kv_heads, s = check_qkv("flash_attention", q, k, v)
    q_offset = _check_offset(q_offset)
    kv_start = _check_range("kv_start", kv_start, b)
    kv_end = _check_range("kv_end", kv_end, b)
    scale = _check_scale(scale, h)
    impl = resolve_impl(impl)
    flavour = resolve_backend(backend)
    if impl == "xla":
        return flash_attention_reference(
            q, k, v, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end, causal=causal, scale=scale
        )
    kernels = _flavour(flavour)
    if flavour == "gpu" and (h < 16 or h & (h - 1)):
        raise InvalidInputError(f"the gpu flavour needs a power-of-two head dim >= 16, got q {tuple(q.shape)}")
    plan = _plan(
        kernels,
        rows=t * (n // kv_heads),
        keys=s,
        block_q=block_q,
        block_k=block_k,
        flavour=flavour,
        interpret=resolve_interpret(interpret, flavour),
        causal=bool(causal),
        scale=scale,
        groups=n // kv_heads,
    )
    lo = jnp.zeros((b,), jnp.int32) if kv_start is None else jnp.clip(kv_start, 0, s)
    hi = jnp.full((b,), s, jnp.int32) if kv_end is None else jnp.clip(kv_end, 0, s)
    return _attend(plan, q, k, v, q_offset, lo, hi)


# ----------------------------------------------------------------------------------------------- validation


def _check_offset(q_offset):
    off = jnp.asarray(q_offset)
    if off.ndim != 0 or not jnp.issubdtype(off.dtype, jnp.integer):
        raise InvalidInputError(f"q_offset must be a scalar int, got shape {off.shape} dtype {off.dtype}")
    return off.astype(jnp.int32)


def _check_range(name: str, x, b: int):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise InvalidInputError(f"{name} must be an int array of shape [B]=({b},), got shape {x.shape} dtype {x.dtype}")
    return x.astype(jnp.int32)


def _check_scale(scale, h: int) -> float:
    if scale is None:
        return float(h) ** -0.5
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise InvalidInputError(f"scale must be a Python number or None, got {scale!r}") from e


def _check_block(name: str, block, align: int, flavour: str):
    if block is None:
        return
    if not isinstance(block, int) or block < align or block & (block - 1):
        raise InvalidInputError(f"{name} must be a power of two >= {align} for the {flavour} flavour, got {block!r}")


# --------------------------------------------------------------------------------------------------- plan


def _flavour(flavour: str):
    return pallas_gpu if flavour == "gpu" else pallas_tpu


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one Pallas call (the ``custom_vjp``'s non-differentiable argument)."""

    flavour: str
    interpret: bool
    causal: bool
    scale: float
    groups: int
    forward_blocks: tuple[int, int]  # (rows, keys)
    backward_blocks: tuple[int, int]
    keys: int  # S
    rows_padded: int  # T * G rounded up to every row block
    keys_padded: int  # S, or the key block when S is shorter (the kernels handle a ragged last key block)


def _fit(block: int, length: int, align: int) -> int:
    """``block``, or the power of two (>= ``align``) covering ``length`` when that is smaller."""
    return min(block, max(align, 1 << max(length - 1, 0).bit_length()))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan_blocks(flavour: str, *, rows: int, keys: int, block_q=None, block_k=None):
    """``((forward rows, keys), (backward rows, keys))``: the blocks the ``flavour``'s kernels run with for ``rows``
    grouped query rows (``T * G``) and ``keys`` keys, given ``block_q`` / ``block_k`` (None: the defaults)."""
    kernels = _flavour(flavour)
    _check_block("block_q", block_q, kernels.ALIGN, flavour)
    _check_block("block_k", block_k, kernels.ALIGN, flavour)
    blocks = []
    for default_q, default_k in (kernels.FORWARD_BLOCKS, kernels.BACKWARD_BLOCKS):
        bq = _fit(block_q or default_q, rows, kernels.ALIGN)
        bk = _fit(block_k or default_k, keys, kernels.ALIGN)
        blocks.append((bq, bk))
    return tuple(blocks)


def _plan(kernels, *, rows, keys, block_q, block_k, flavour, **static) -> _Plan:
    (fq, fk), (bq, bk) = plan_blocks(flavour, rows=rows, keys=keys, block_q=block_q, block_k=block_k)
    return _Plan(
        flavour=flavour,
        forward_blocks=(fq, fk),
        backward_blocks=(bq, bk),
        keys=keys,
        rows_padded=_round_up(rows, max(fq, bq)),  # powers of two: the larger is a multiple of the smaller
        keys_padded=max(keys, fk, bk),
        **static,
    )


# ----------------------------------------------------------------------------------------------- layout


def _to_rows(x, kv_heads: int, rows_padded: int):
    """``[B, T, N, H] -> [B, K, R_pad, H]``: query heads grouped under their kv head, row = ``t * G + g``."""
    b, t, n, h = x.shape
    g = n // kv_heads
    x = x.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows_padded - t * g), (0, 0)))


def _from_rows(x, t: int, n: int):
    """Inverse of :func:`_to_rows`: ``[B, K, R_pad, H] -> [B, T, N, H]``."""
    b, kv_heads, _, h = x.shape
    g = n // kv_heads
    x = x[:, :, : t * g].reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, t, n, h)


def _pad_keys(x, keys_padded: int):
    pad = keys_padded - x.shape[2]
    return x if pad == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))


# ---------------------------------------------------------------------------------------------- custom_vjp


def _kernel_args(plan: _Plan, which: str) -> dict:
    bq, bk = plan.forward_blocks if which == "forward" else plan.backward_blocks
    return dict(
        groups=plan.groups, causal=plan.causal, scale=plan.scale, block_q=bq, block_k=bk, interpret=plan.interpret
    )


def _forward(plan: _Plan, q, k, v, q_offset, lo, hi):
    kv_heads = k.shape[1]
    q_rows = _to_rows(q, kv_heads, plan.rows_padded)
    k_p, v_p = _pad_keys(k, plan.keys_padded), _pad_keys(v, plan.keys_padded)
    o_rows, lse = _flavour(plan.flavour).forward(q_rows, k_p, v_p, q_offset, lo, hi, **_kernel_args(plan, "forward"))
    out = _from_rows(o_rows, q.shape[1], q.shape[2])
    return out, (q_rows, k_p, v_p, o_rows, lse, q_offset, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q, k, v, q_offset, lo, hi):
    return _forward(plan, q, k, v, q_offset, lo, hi)[0]


def _attend_fwd(plan: _Plan, q, k, v, q_offset, lo, hi):
    return _forward(plan, q, k, v, q_offset, lo, hi)


def _attend_bwd(plan: _Plan, residuals, do):
    q_rows, k_p, v_p, o_rows, lse, q_offset, lo, hi = residuals
    t, n = do.shape[1:3]
    do_rows = _to_rows(do.astype(q_rows.dtype), k_p.shape[1], plan.rows_padded)
    delta = jnp.sum(o_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)  # [B, K, R_pad]
    dq_rows, dk, dv = _flavour(plan.flavour).backward(
        q_rows, k_p, v_p, do_rows, lse, delta, q_offset, lo, hi, **_kernel_args(plan, "backward")
    )
    return _from_rows(dq_rows, t, n), dk[:, :, : plan.keys], dv[:, :, : plan.keys], None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
