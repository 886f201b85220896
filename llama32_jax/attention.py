"""Pure reference attention (the ``"xla"`` implementation) and its masks.

Grouped-query attention is computed by reshaping the query heads into ``[K, G]`` groups, so the key/value heads
are never repeated in memory (the cache holds ``K`` heads). Scores, masking and softmax are in fp32. Masked
scores get the most negative finite fp32 value instead of ``-inf``: a row with nothing visible then softmaxes to
a uniform (finite) distribution rather than NaN; callers never read such rows (they are padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def causal_mask(q_slots: jax.Array, k_slots: jax.Array, start: jax.Array) -> jax.Array:
    """Which keys each query may see: ``[B, T, S]`` bool.

    Args:
      q_slots: ``[T]`` int, the cache slot of each query token (its absolute index in the sequence buffer).
      k_slots: ``[S]`` int, the slot of each key.
      start: ``[B]`` int, the first valid slot of each sequence (left padding before it is invisible).

    A key is visible when it is not padding (``k >= start``) and not in the future (``k <= q``).
    """
    not_future = k_slots[None, :] <= q_slots[:, None]  # [T, S]
    not_padding = k_slots[None, :] >= start[:, None]  # [B, S]
    return not_future[None, :, :] & not_padding[:, None, :]


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
