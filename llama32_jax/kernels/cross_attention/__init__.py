"""``cross_attention``: Mllama text queries over vision tokens with the per-image, per-tile mask.

Semantics are exactly :func:`llama32_jax.nn.attention.cross_attention` (the ``"xla"`` implementation, re-exported by
``reference.py``): text row ``t`` attends to every token of tile ``r`` of image ``i`` where ``tile_mask[b, t, i,
r]``; vision K/V are laid out image-major, then tile, then token (``N_v = I * R * P``); a row that sees no tile
(text before the first ``<|image|>``, padded images) returns exactly 0.

The Pallas implementation (``pallas_gpu.py``: Triton lowering; ``pallas_tpu.py``: Mosaic TPU) never builds the
``[B, T, N_v]`` token mask the reference materialises. What the kernels get, prepared here in XLA (all small):

- the grouped-rows layout: ``q [B, T, N, H] -> [B, K, T * G, H]`` (row ``r`` is text position ``r // G`` of query
  head ``k * G + r % G``), rows padded to a multiple of ``block_q``, so one program reads a kv head's vision K/V
  once for all its ``G`` query heads (K/V heads are never repeated in memory). ``T = 1`` (a decode step, which
  re-reads the cached vision K/V every token) is ``G`` rows;
- the row mask ``[B, Rp, I * R]`` (the tile mask flattened, repeated per head, as float 0/1); the kernels derive
  each key's tile from its position (``s // P``) and select the mask column of the (at most ``(block_k - 1) // P +
  2``) tiles a key block touches;
- liveness lists: for each (batch, query block), the key blocks holding a token some row of the block sees, in
  order, padded by repeating the last one, and their count; and the transpose (for each key block, the query
  blocks that see it) for the ``dk/dv`` kernel. Key blocks of padded tiles and images (most of a 1-tile image's
  blocks in a 4-tile layout) are never read or computed.

Gradients: :func:`cross_attention` with ``impl="pallas"`` is a ``jax.custom_vjp`` whose backward is two Pallas
kernels per flavour (``dq``, and ``dk, dv``, reusing the forward's mask logic and liveness lists) plus ``delta =
rowsum(o * do)`` in XLA; w.r.t. ``q``, ``k`` and ``v`` (the mask gets none). Rows that see nothing give zero
gradients. ``impl="xla"`` is differentiated by JAX directly.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import check_qkv, resolve_backend, resolve_impl, resolve_interpret
from llama32_jax.kernels.cross_attention import pallas_gpu, pallas_tpu
from llama32_jax.kernels.cross_attention.reference import cross_attention_reference


def cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tile_mask: jax.Array,
    *,
    tokens_per_tile: int,
    scale: float | None = None,
    impl: str = "auto",
    backend: str | None = None,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Cross-attention of text queries over vision tokens with the Mllama tile mask.

    Args:
      q: ``[B, T, N, H]`` text queries (``T`` hundreds to thousands in prefill, 1 in a decode step).
      k, v: ``[B, K, N_v, H]`` vision keys/values, ``N % K == 0``, ``N_v = I * R * P``, image-major then tile then
        token; same floating dtype as ``q``.
      tile_mask: ``[B, T, I, R]`` bool: row ``t`` sees every token of tile ``r`` of image ``i``.
      tokens_per_tile: ``P`` (1601 for Llama 3.2 Vision).
      scale: score scale, default ``H ** -0.5`` (a Python number: it is compiled into the kernels).
      impl: ``"auto"``, ``"xla"`` or ``"pallas"`` (:func:`llama32_jax.kernels.resolve_impl`).
      backend: Pallas flavour ``"gpu"`` / ``"tpu"`` (default: the platform's).
      interpret: run the kernel in Pallas' interpreter (default: when the platform cannot lower the flavour).
      block_q: grouped query rows per block (GPU: a power of two >= 16, default 64; TPU: a multiple of 8, default
        128); shrunk to fit small inputs (a decode step's ``G`` rows).
      block_k: vision tokens per key block (GPU: a power of two >= 16, default 64; TPU: a multiple of 8, default
        512). It need not divide ``P`` or ``N_v``: blocks may straddle tile boundaries.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; rows that see no tile are exactly 0.

    Raises:
      InvalidInputError: bad ranks, shapes, dtypes, ``N_v != I * R * P``, or bad ``impl`` / ``backend`` / blocks.
    """
    _check_inputs(q, k, v, tile_mask, tokens_per_tile, scale)
    impl = resolve_impl(impl)
    if impl == "xla":
        return cross_attention_reference(q, k, v, tile_mask, tokens_per_tile=tokens_per_tile, scale=scale)
    flavour = resolve_backend(backend)
    _check_kernel_args(flavour, q.shape[-1], block_q, block_k)
    if q.size == 0 or k.shape[2] == 0:  # no rows, or no vision tokens: nothing is visible
        return jnp.zeros(q.shape, q.dtype)
    _, t, n, h = q.shape
    kernels = pallas_gpu if flavour == "gpu" else pallas_tpu
    bq, bk = kernels.choose_blocks(t * (n // k.shape[1]), k.shape[2], block_q, block_k)
    plan = _Plan(
        flavour=flavour,
        interpret=resolve_interpret(interpret, flavour),
        tokens_per_tile=int(tokens_per_tile),
        scale=float(h**-0.5 if scale is None else scale),
        block_q=bq,
        block_k=bk,
    )
    return _pallas(plan, q, k, v, tile_mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _pallas(plan: _Plan, q, k, v, tile_mask):
    """The kernels' inputs (row mask, liveness lists; see the module docstring), then the custom_vjp'd kernels.
    Jitted so that eager calls reuse the compiled kernels."""
    g = q.shape[2] // k.shape[1]
    rows_padded = -(-q.shape[1] * g // plan.block_q) * plan.block_q
    mask = _row_mask(tile_mask, g, rows_padded)
    lists = _live_lists(mask, plan.block_q, plan.block_k, k.shape[2], plan.tokens_per_tile)
    return _attention(plan, q, k, v, mask.astype(jnp.float32), lists)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static choices of one Pallas call (hashable: the custom_vjp's non-differentiable argument)."""

    flavour: str
    interpret: bool
    tokens_per_tile: int
    scale: float
    block_q: int
    block_k: int

    @property
    def kernels(self):
        return pallas_gpu if self.flavour == "gpu" else pallas_tpu

    @property
    def kwargs(self) -> dict:
        return dict(
            tokens_per_tile=self.tokens_per_tile,
            scale=self.scale,
            block_q=self.block_q,
            block_k=self.block_k,
            interpret=self.interpret,
        )


def _group(x: jax.Array, kv_heads: int, rows_padded: int) -> jax.Array:
    """``[B, T, N, H] -> [B, K, Rp, H]``: row ``r`` = position ``r // G`` of head ``k * G + r % G``; zero padding."""
    b, t, n, h = x.shape
    g = n // kv_heads
    x = x.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows_padded - t * g), (0, 0)))


def _ungroup(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_group`: ``[B, K, Rp, H] -> [B, T, N, H]`` (padding rows dropped)."""
    b, t, n, h = shape
    kv_heads = x.shape[1]
    g = n // kv_heads
    return x[:, :, : t * g].reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _row_mask(tile_mask: jax.Array, g: int, rows_padded: int) -> jax.Array:
    """``[B, T, I, R] -> [B, Rp, I * R]`` bool in grouped-row order (row ``r`` is text position ``r // G``)."""
    b, t, i, r = tile_mask.shape
    mask = jnp.repeat(tile_mask.reshape(b, t, i * r), g, axis=1)
    return jnp.pad(mask, ((0, 0), (0, rows_padded - t * g), (0, 0)))


def _live_lists(mask: jax.Array, block_q: int, block_k: int, n_v: int, tokens_per_tile: int):
    """``(live, count, live_t, count_t)`` int32: per (batch, query block) the live key blocks ``[B, nq, nk]``
    (ascending, padded with the last live one, or 0) and their number ``[B, nq]``; and the same per (batch, key
    block) over query blocks: ``[B, nk, nq]``, ``[B, nk]``. A key block is live for a query block when some row
    of it sees a tile that the key block overlaps."""
    b, rows, n_tiles = mask.shape
    nq, nk = rows // block_q, -(-n_v // block_k)
    row_any = mask.reshape(b, nq, block_q, n_tiles).any(axis=2)  # [B, nq, C]
    cover = np.zeros((n_tiles, nk), bool)  # tile c overlaps key block j
    for j in range(nk):
        first, last = j * block_k, min((j + 1) * block_k, n_v) - 1
        cover[first // tokens_per_tile : last // tokens_per_tile + 1, j] = True
    live = jnp.any(row_any[..., :, None] & cover, axis=-2)  # [B, nq, nk]
    return (*_compact(live), *_compact(live.swapaxes(1, 2)))


def _compact(live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., n]`` bool -> the indices of its True entries first (ascending), the tail repeating the last of them
    (0 if none), and their count ``[...]``; int32."""
    n = live.shape[-1]
    ar = jnp.arange(n, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(live, ar, n + ar), axis=-1).astype(jnp.int32)
    count = jnp.sum(live, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    return jnp.where(ar < count[..., None], order, last), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, mask, lists):
    return _forward(plan, q, k, v, mask, lists)[0]


def _forward(plan: _Plan, q, k, v, mask, lists):
    qg = _group(q, k.shape[1], mask.shape[1])
    o, lse = plan.kernels.forward(qg, k, v, mask, lists[0], lists[1], **plan.kwargs)
    return _ungroup(o, q.shape), (qg, k, v, mask, lists, o, lse)


def _backward(plan: _Plan, residuals, dout):
    qg, k, v, mask, lists, o, lse = residuals
    dog = _group(dout.astype(qg.dtype), k.shape[1], qg.shape[2])
    delta = jnp.sum(o.astype(jnp.float32) * dog.astype(jnp.float32), axis=-1)  # [B, K, Rp]
    dqg, dk, dv = plan.kernels.backward(qg, k, v, mask, lists, dog, lse, delta, **plan.kwargs)
    return _ungroup(dqg, dout.shape), dk, dv, None, None


_attention.defvjp(_forward, _backward)


def _check_inputs(q, k, v, tile_mask, tokens_per_tile, scale) -> None:
    b, t, _, _, _, _ = check_qkv("cross_attention", q, k, v, keys="N_v")
    mask_shape = tuple(getattr(tile_mask, "shape", ()))
    if len(mask_shape) != 4 or mask_shape[:2] != (b, t):
        raise InvalidInputError(f"cross_attention: tile_mask must be [B={b}, T={t}, I, R] bool, got shape {mask_shape}")
    if tile_mask.dtype != jnp.bool_:
        raise InvalidInputError(f"cross_attention: tile_mask must be bool, got {tile_mask.dtype}")
    if not isinstance(tokens_per_tile, numbers.Integral) or isinstance(tokens_per_tile, bool) or tokens_per_tile < 1:
        raise InvalidInputError(f"cross_attention: tokens_per_tile must be a positive int, got {tokens_per_tile!r}")
    n_img, n_tiles = tile_mask.shape[2:]
    if k.shape[2] != n_img * n_tiles * tokens_per_tile:
        raise InvalidInputError(
            f"cross_attention: k/v have N_v={k.shape[2]} vision tokens, but tile_mask {tuple(tile_mask.shape)} with "
            f"tokens_per_tile={tokens_per_tile} needs I * R * P = {n_img * n_tiles * tokens_per_tile}"
        )
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise InvalidInputError(f"cross_attention: scale must be a Python number or None, got {type(scale).__name__}")


def _check_kernel_args(flavour: str, head_dim: int, block_q, block_k) -> None:
    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    for name, x in (("block_q", block_q), ("block_k", block_k)):
        if x is None:
            continue
        if not isinstance(x, numbers.Integral) or isinstance(x, bool):
            raise InvalidInputError(f"cross_attention: {name} must be an int or None, got {x!r}")
        if flavour == "gpu" and not (pow2(x) and x >= pallas_gpu.MIN_BLOCK):
            raise InvalidInputError(f"cross_attention: GPU {name} must be a power of two >= 16, got {x}")
        if flavour == "tpu" and not (x > 0 and x % 8 == 0):
            raise InvalidInputError(f"cross_attention: TPU {name} must be a positive multiple of 8, got {x}")
    if flavour == "gpu" and not (pow2(head_dim) and head_dim >= pallas_gpu.MIN_BLOCK):
        raise InvalidInputError(
            f"cross_attention: the GPU kernel needs a head dim that is a power of two >= 16 (Triton), got {head_dim}"
        )
