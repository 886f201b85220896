"""The pure reference attention against a naive numpy implementation with explicit K/V repeats."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.nn.attention import attention, slot_mask


def _naive(q, k, v, mask):
    n, h = q.shape[2:]
    g = n // k.shape[1]
    k = np.repeat(k, g, axis=1).transpose(0, 2, 1, 3)  # Meta's repeat_kv: kv head j serves heads j*g .. j*g+g-1
    v = np.repeat(v, g, axis=1).transpose(0, 2, 1, 3)  # -> [B, S, N, H]
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("n,kv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_gqa_matches_naive(n, kv):
    rng = np.random.default_rng(n * 10 + kv)
    b, t, s, h = 2, 5, 9, 16
    q, k, v = (rng.normal(size=shape) for shape in [(b, t, n, h), (b, kv, s, h), (b, kv, s, h)])
    start = np.array([0, 3])
    mask = np.asarray(slot_mask(b, t, s, q_offset=4, kv_start=jnp.asarray(start)))
    out = attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, mask), atol=1e-5)


def test_slot_mask_semantics():
    m = np.asarray(slot_mask(2, 2, 5, q_offset=2, kv_start=jnp.asarray([0, 2])))
    assert m.shape == (2, 2, 5)
    np.testing.assert_array_equal(m[0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(m[1], [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0]])


def test_fully_masked_row_is_zero():
    """A row that sees nothing gives exactly zero (the kernels' contract), and its neighbours are untouched."""
    q = jnp.ones((1, 2, 2, 4))
    k = v = jnp.ones((1, 1, 3, 4))
    out = np.asarray(attention(q, k, v, jnp.asarray([[[False] * 3, [True, False, False]]])))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1], 1.0)


@pytest.mark.parametrize("t,chunk", [(11, 4), (12, 4), (7, 3)])
@pytest.mark.parametrize("masked", [True, False])
def test_query_blocks_match_naive(t, chunk, masked):
    """More queries than ``q_chunk``: blocks of queries (the last one padded) give the one-shot result."""
    rng = np.random.default_rng(t * chunk)
    b, n, kv, s, h = 2, 4, 2, t, 8
    q, k, v = (rng.normal(size=shape) for shape in [(b, t, n, h), (b, kv, s, h), (b, kv, s, h)])
    mask = np.asarray(slot_mask(b, t, s))  # causal, no empty rows
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out = attention(*args, jnp.asarray(mask) if masked else None, q_chunk=chunk)
    want = _naive(q, k, v, mask if masked else np.ones((b, t, s), bool))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
    assert out.shape == (b, t, n, h)
