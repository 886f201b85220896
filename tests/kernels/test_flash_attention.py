"""``flash_attention`` against a float64 numpy oracle (forward) and ``jax.vjp`` of a float32 jnp oracle (gradients).

Every case runs against every implementation of the shared harness (``impl_kwargs``: the XLA reference, both
Pallas flavours in interpret mode, and the real lowering on a GPU/TPU machine). Both oracles are written here
from first principles: K/V heads explicitly repeated, the mask built slot by slot. Shapes are small and blocks
explicit (16/32) so that every case has several row and key blocks, ragged tails and skipped blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels.flash_attention import flash_attention
from tests.kernels.conftest import FORWARD_TOL, GRAD_TOL, tol


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type
    b: int
    t: int
    s: int
    n: int
    k: int
    h: int
    causal: bool = True
    q_offset: int = 0
    kv_start: tuple | None = None
    kv_end: tuple | None = None
    block_q: int | None = 16
    block_k: int | None = 16

    def arrays(self, seed: int = 0):
        """``q, k, v`` (and a cotangent ``do``) in ``dtype``, normal with unit variance."""
        rng = np.random.default_rng(seed)
        shapes = [(self.b, self.t, self.n, self.h), (self.b, self.k, self.s, self.h), (self.b, self.k, self.s, self.h)]
        shapes.append(shapes[0])
        return [jnp.asarray(rng.standard_normal(shape), self.dtype) for shape in shapes]

    def ranges(self):
        """``q_offset, kv_start, kv_end`` as the op takes them (``None`` ranges stay ``None``)."""
        start = None if self.kv_start is None else jnp.asarray(self.kv_start, jnp.int32)
        end = None if self.kv_end is None else jnp.asarray(self.kv_end, jnp.int32)
        return self.q_offset, start, end

    def mask(self, q_offset: int | None = None) -> np.ndarray:
        """``[B, T, S]`` bool, key by key: inside ``[kv_start, kv_end)`` and (causal) not after the query's slot."""
        q_offset = self.q_offset if q_offset is None else q_offset
        start = [0] * self.b if self.kv_start is None else self.kv_start
        end = [self.s] * self.b if self.kv_end is None else self.kv_end
        mask = np.zeros((self.b, self.t, self.s), bool)
        for b in range(self.b):
            for t in range(self.t):
                for s in range(self.s):
                    mask[b, t, s] = start[b] <= s < end[b] and (not self.causal or s <= q_offset + t)
        return mask

    def blocks(self) -> dict:
        return dict(block_q=self.block_q, block_k=self.block_k)


def oracle_f64(q, k, v, mask: np.ndarray) -> np.ndarray:
    """float64 attention with K/V repeated per query head; a row with nothing visible is 0."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # [B, N, S, H]
    scores = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    m = mask[:, None]  # [B, 1, T, S]
    scores = np.where(m, scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.where(m, np.exp(scores - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bnts,bnsh->btnh", probs, v)


def oracle_f32(q, k, v, mask):
    """The float32 jnp twin of :func:`oracle_f64`, differentiable (``jax.vjp`` gives the reference gradients)."""
    groups = q.shape[2] // k.shape[1]
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
    scores = jnp.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    m = jnp.asarray(mask)[:, None]
    scores = jnp.where(m, scores, -1e30)  # finite: an empty row stays NaN-free in the backward
    weights = jnp.where(m, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bnts,bnsh->btnh", probs, v)


FORWARD_CASES = {
    # whole sequences, one kv head per query head, T = S not a multiple of the blocks
    "f32-d64-g1-causal": Case(jnp.float32, b=2, t=45, s=45, n=2, k=2, h=64),
    # left padding: sequence 1's first 13 queries see nothing (exact zeros)
    "bf16-d128-g2-leftpad": Case(jnp.bfloat16, b=2, t=40, s=40, n=4, k=2, h=128, kv_start=(0, 13), block_k=32),
    # prefill into a cache: S > T, q_offset > 0, per-sequence ranges
    "f32-d64-g4-prefill": Case(
        jnp.float32, b=2, t=21, s=70, n=8, k=2, h=64, q_offset=30, kv_start=(0, 5), kv_end=(51, 40), block_q=32
    ),
    # non-causal, G = 8, sequence 1 has an empty key range
    "bf16-d64-g8-noncausal-empty": Case(
        jnp.bfloat16, b=2, t=19, s=33, n=8, k=1, h=64, causal=False, kv_start=(3, 20), kv_end=(30, 20)
    ),
    # G = 3 (Llama 3.2 3B's ratio), d 128, prefill whose first rows of sequence 1 precede its kv_start
    "f32-d128-g3-prefill-leftpad": Case(
        jnp.float32, b=2, t=13, s=48, n=6, k=2, h=128, q_offset=35, kv_start=(0, 40), block_k=32
    ),
    # the flavours' default blocks (shrunk to these short lengths)
    "bf16-d64-g2-default-blocks": Case(jnp.bfloat16, b=1, t=24, s=24, n=4, k=2, h=64, block_q=None, block_k=None),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_oracle(name, impl_kwargs):
    case = FORWARD_CASES[name]
    q, k, v, _ = case.arrays()
    q_offset, kv_start, kv_end = case.ranges()
    run = jax.jit(functools.partial(flash_attention, causal=case.causal, **case.blocks(), **impl_kwargs))
    out = run(q, k, v, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = case.mask()
    expected = oracle_f64(q, k, v, mask)
    got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, **tol(FORWARD_TOL, case.dtype))
    empty = ~mask.any(axis=-1)  # [B, T]
    assert (got[empty] == 0.0).all()


def test_forward_jit_traced_ranges(impl_kwargs):
    """Under jit with q_offset and the ranges traced: one compilation serves different offsets."""
    case = Case(jnp.float32, b=2, t=17, s=64, n=4, k=2, h=64, kv_start=(0, 9), kv_end=(64, 50))
    q, k, v, _ = case.arrays(seed=1)
    _, kv_start, kv_end = case.ranges()
    run = jax.jit(
        lambda q, k, v, off, ks, ke: flash_attention(
            q, k, v, q_offset=off, kv_start=ks, kv_end=ke, **case.blocks(), **impl_kwargs
        )
    )
    for q_offset in (0, 29, 47):
        out = run(q, k, v, jnp.int32(q_offset), kv_start, kv_end)
        expected = oracle_f64(q, k, v, case.mask(q_offset))
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, **tol(FORWARD_TOL, case.dtype))


GRAD_CASES = {
    # left padding: rows of sequence 1 before slot 9 see nothing and must get zero gradients
    "f32-d64-g2-leftpad": Case(jnp.float32, b=2, t=29, s=29, n=4, k=2, h=64, kv_start=(0, 9)),
    # GQA 4, prefill into a cache with ragged kv_end
    "bf16-d64-g4-prefill": Case(jnp.bfloat16, b=2, t=17, s=40, n=8, k=2, h=64, q_offset=20, kv_end=(37, 40)),
    # non-causal, d 128, sequence 1 entirely empty
    "f32-d128-g1-noncausal-empty": Case(
        jnp.float32, b=2, t=11, s=25, n=2, k=2, h=128, causal=False, kv_start=(4, 10), kv_end=(25, 10)
    ),
}


@functools.cache
def oracle_grads(name: str):
    """``jax.vjp`` of :func:`oracle_f32` on the case's inputs (rounded to its dtype), computed once per case."""
    case = GRAD_CASES[name]
    q, k, v, do = (jnp.asarray(x, jnp.float32) for x in case.arrays(seed=2))
    mask = case.mask()
    return jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: oracle_f32(q, k, v, mask), q, k, v)[1](do))(q, k, v, do)


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_oracle(name, impl_kwargs):
    """dq, dk, dv from the custom_vjp (the xla impl: autodiff of the reference), jitted with traced ranges."""
    case = GRAD_CASES[name]
    q, k, v, do = case.arrays(seed=2)
    q_offset, kv_start, kv_end = case.ranges()

    @jax.jit
    def grads(q, k, v, do, off, ks, ke):
        def f(q, k, v):
            return flash_attention(
                q, k, v, q_offset=off, kv_start=ks, kv_end=ke, causal=case.causal, **case.blocks(), **impl_kwargs
            )

        return jax.vjp(f, q, k, v)[1](do)

    got = grads(q, k, v, do, jnp.int32(q_offset), kv_start, kv_end)
    mask = case.mask()
    expected = oracle_grads(name)
    for name_, g, e, x in zip(("dq", "dk", "dv"), got, expected, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name_
        g = np.asarray(jnp.asarray(g, jnp.float32))
        assert np.isfinite(g).all(), name_
        np.testing.assert_allclose(g, np.asarray(e), **tol(GRAD_TOL, case.dtype), err_msg=name_)
    empty = ~mask.any(axis=-1)  # rows that see nothing: zero dq
    assert (np.asarray(jnp.asarray(got[0], jnp.float32))[empty] == 0.0).all()


def test_grad_of_jitted_loss(impl_kwargs):
    """``jax.grad`` of a scalar loss w.r.t. q, k, v, the whole loss jitted with a traced q_offset."""
    case = Case(jnp.float32, b=1, t=16, s=32, n=2, k=1, h=64, q_offset=16)
    q, k, v, do = case.arrays(seed=3)

    @jax.jit
    def loss_grads(q, k, v, off):
        def loss(q, k, v):
            return jnp.sum(flash_attention(q, k, v, q_offset=off, **case.blocks(), **impl_kwargs) * do)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    got = loss_grads(q, k, v, jnp.int32(case.q_offset))
    mask = case.mask()
    expected = jax.jit(jax.grad(lambda q, k, v: jnp.sum(oracle_f32(q, k, v, mask) * do), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **tol(GRAD_TOL, jnp.float32))


def _good():
    q = jnp.zeros((2, 5, 4, 16), jnp.float32)
    kv = jnp.zeros((2, 2, 8, 16), jnp.float32)
    return q, kv, kv


BAD_INPUTS = {
    "q-rank": (lambda q, k, v: (q[0], k, v), {}),
    "k-rank": (lambda q, k, v: (q, k[0], v), {}),
    "n-not-multiple-of-k": (lambda q, k, v: (q[:, :, :3], k, v), {}),
    "head-dim-mismatch": (lambda q, k, v: (q, k[..., :8], v[..., :8]), {}),
    "k-v-mismatch": (lambda q, k, v: (q, k, v[:, :, :4]), {}),
    "dtype-mismatch": (lambda q, k, v: (q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)), {}),
    "kv-start-shape": (lambda q, k, v: (q, k, v), dict(kv_start=jnp.zeros((3,), jnp.int32))),
    "kv-end-rank": (lambda q, k, v: (q, k, v), dict(kv_end=jnp.zeros((2, 1), jnp.int32))),
    "q-offset-vector": (lambda q, k, v: (q, k, v), dict(q_offset=jnp.zeros((2,), jnp.int32))),
    "bad-impl": (lambda q, k, v: (q, k, v), dict(impl="cuda")),
    "bad-backend": (lambda q, k, v: (q, k, v), dict(backend="cpu")),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name, impl_kwargs):
    make, overrides = BAD_INPUTS[name]
    with pytest.raises(InvalidInputError):
        flash_attention(*make(*_good()), **{**impl_kwargs, **overrides})


def test_bad_block_raises():
    q, k, v = _good()
    with pytest.raises(InvalidInputError, match="block_q"):
        flash_attention(q, k, v, impl="pallas", backend="gpu", interpret=True, block_q=24)
    with pytest.raises(InvalidInputError, match="block_k"):
        flash_attention(q, k, v, impl="pallas", backend="tpu", interpret=True, block_k=4)
