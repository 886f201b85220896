"""Pure reference attention (the ``"xla"`` implementation) and its masks.

Grouped-query attention is computed by reshaping the query heads into ``[K, G]`` groups, so the key/value heads
are never repeated in memory (the cache holds ``K`` heads). Scores, masking and softmax are in fp32. Masked
scores get the most negative finite fp32 value instead of ``-inf``, and a row with nothing visible (left-padding
queries; Mllama text before its first image) returns exactly zero, never NaN: that is the result every kernel in
:mod:`llama32_jax.kernels` must reproduce.

:func:`self_attention` and :func:`cross_attention` are the references of the kernels' ops (the ``"xla"``
implementation): they describe their masks structurally, as the kernels take them, and build the dense mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


# Queries per block when a call has many: the fp32 scores of a block, [B, N, Q_CHUNK, S], are all that is live at
# once instead of [B, N, T, S] (a 4-tile image's 6432 tokens: 2.6 GB per vision layer unblocked).
Q_CHUNK = 1024


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float | None = None,
    q_chunk: int = Q_CHUNK,
) -> jax.Array:
    """Softmax attention with grouped-query heads; more than ``q_chunk`` queries run block by block (``lax.map``
    over query blocks, each with every key: the same per-row arithmetic, a fraction of the memory).

    Args:
      q: ``[B, T, N, H]`` queries.
      k, v: ``[B, K, S, H]`` keys and values (the cache layout: per kv head, a contiguous ``[S, H]`` block, so
        the score and output contractions need no transposed copy of the cache), ``N % K == 0``.
      mask: ``[B, T, S]`` bool (True = visible) or None (everything visible).
      scale: score scale, default ``H ** -0.5``.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``. Query head ``n`` uses kv head ``n // (N / K)`` (Meta's ``repeat_kv``).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if t > q_chunk:
        return _blocked(q, k, v, mask, scale, q_chunk)
    g = n // kv_heads
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kv_heads, g, h)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:  # a row that sees nothing gives zero (its softmax would be a uniform average)
        probs = jnp.where(mask.any(axis=-1)[:, None, None, :, None], probs, 0.0)
    # Contract into [B, K, G, T, H] and transpose that (small) result: asking the einsum for [B, T, K, G, H]
    # directly makes XLA:CPU transpose a copy of the whole value cache instead (measured: ~3x slower at S=4096).
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)  # [B, T, N, H]


def _blocked(q, k, v, mask, scale, q_chunk: int) -> jax.Array:
    """:func:`attention` over query blocks of ``q_chunk`` (the last one padded; padded rows are dropped)."""
    b, t, n, h = q.shape
    blocks = -(-t // q_chunk)
    pad = blocks * q_chunk - t
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, q_chunk, n, h).swapaxes(0, 1)
    if mask is None:
        out = jax.lax.map(lambda qi: attention(qi, k, v, None, scale=scale, q_chunk=q_chunk), qb)
    else:
        mb = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, q_chunk, mask.shape[-1]).swapaxes(0, 1)
        out = jax.lax.map(lambda a: attention(a[0], k, v, a[1], scale=scale, q_chunk=q_chunk), (qb, mb))
    return out.swapaxes(0, 1).reshape(b, blocks * q_chunk, n, h)[:, :t]


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_offset: jax.Array | int = 0,
    kv_start: jax.Array | None = None,
    kv_end: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The reference of the ``flash_attention`` and ``decode_attention`` kernels.

    Args:
      q: ``[B, T, N, H]``; query ``t`` sits in slot ``q_offset + t`` of the key buffer.
      k, v: ``[B, K, S, H]`` (the KV-cache layout), ``N % K == 0``.
      q_offset: ``[]`` int, the slot of the first query (the cache's write index; 0 for a whole sequence).
      kv_start, kv_end: ``[B]`` int, the valid key slots of each sequence are ``kv_start[b] <= s < kv_end[b]``
        (left padding before ``kv_start``, right padding or unwritten slots from ``kv_end``); default ``0`` / ``S``.
      causal: also hide keys after the query's own slot (``s > q_offset + t``).
      segment_ids: ``[B, T]`` int, packed sequences (``S == T``, no cache): a query sees only keys of its own
        segment (the kernels do not take it; packed training runs on this implementation).

    Returns ``[B, T, N, H]`` in ``q.dtype``; a query that sees no key gets zeros.
    """
    b, t = q.shape[:2]
    s = k.shape[2]
    mask = slot_mask(b, t, s, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end, causal=causal)
    if segment_ids is not None:
        if s != t:
            raise ValueError(f"segment_ids need keys of the queries' own length, got T={t}, S={s}")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return attention(q, k, v, mask, scale=scale)


def slot_mask(b: int, t: int, s: int, *, q_offset=0, kv_start=None, kv_end=None, causal: bool = True) -> jax.Array:
    """The ``[B, T, S]`` bool mask of :func:`self_attention`'s structural arguments."""
    k_slots = jnp.arange(s, dtype=jnp.int32)
    start = jnp.zeros((b,), jnp.int32) if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    end = jnp.full((b,), s, jnp.int32) if kv_end is None else jnp.asarray(kv_end, jnp.int32)
    mask = (k_slots[None, :] >= start[:, None]) & (k_slots[None, :] < end[:, None])  # [B, S]
    mask = jnp.broadcast_to(mask[:, None, :], (b, t, s))
    if causal:
        q_slots = jnp.asarray(q_offset, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        mask = mask & (k_slots[None, None, :] <= q_slots[None, :, None])
    return mask


def cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tile_mask: jax.Array,
    *,
    tokens_per_tile: int,
    scale: float | None = None,
) -> jax.Array:
    """The reference of the ``cross_attention`` kernel: text queries over vision tokens with the Mllama mask.

    Args:
      q: ``[B, T, N, H]`` text queries.
      k, v: ``[B, K, N_v, H]`` vision keys/values, ``N_v = I * R * P`` laid out image-major, then tile, then token
        (``P = tokens_per_tile``, 1601 for Llama 3.2 Vision).
      tile_mask: ``[B, T, I, R]`` bool: text row ``t`` may attend to every token of tile ``r`` of image ``i``.

    Returns ``[B, T, N, H]``; a row that sees no tile (text before the first image, padded images) gets zeros.
    """
    b, t, i, r = tile_mask.shape
    if k.shape[2] != i * r * tokens_per_tile:
        raise ValueError(
            f"vision keys have {k.shape[2]} tokens; tile_mask {tile_mask.shape} with {tokens_per_tile} tokens per "
            f"tile needs {i * r * tokens_per_tile}"
        )
    mask = jnp.repeat(tile_mask.reshape(b, t, i * r), tokens_per_tile, axis=-1)  # [B, T, N_v]
    return attention(q, k, v, mask, scale=scale)
