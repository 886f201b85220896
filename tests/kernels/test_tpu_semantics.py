"""The TPU kernels under Pallas' TPU-semantics interpreter (``pltpu.InterpretParams``).

``interpret=True`` (the shared suites) runs a kernel's arithmetic; the TPU interpreter also simulates the TPU's
memory spaces and the block pipeline's DMAs, fills uninitialised memory with NaN, raises on any out-of-bounds
read, and runs a happens-before race detector over two simulated cores (the grid's "parallel" dimensions are
split between them, as on a megacore chip). It is 50-100x slower, so one small case per kernel (forward and
backward) runs here, with ragged lengths, GQA, a sequence that sees nothing and several blocks per axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.kernels.cross_attention import cross_attention
from llama32_jax.kernels.decode_attention import decode_attention
from llama32_jax.kernels.flash_attention import flash_attention
from llama32_jax.nn.attention import cross_attention as cross_reference
from llama32_jax.nn.attention import self_attention
from tests.kernels.conftest import FORWARD_TOL, GRAD_TOL, tol

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
if not hasattr(pltpu, "InterpretParams"):
    pytest.skip("this jax has no TPU-semantics interpreter", allow_module_level=True)

B, T, N, K, S, H = 2, 40, 4, 2, 72, 64  # G = 2; T and S are not multiples of the blocks below


def _params():
    return pltpu.InterpretParams(
        detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan", num_cores_or_threads=2
    )


def _no_races():
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as state
    except ImportError:  # private module moved: the run itself still checked bounds and NaN-filled memory
        return True
    return state.races is None or not state.races.races_found


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    return q, k, v


def test_flash_attention_forward_and_backward(arrays):
    q, k, v = arrays
    ranges = dict(q_offset=20, kv_start=jnp.asarray([0, 70]), kv_end=jnp.asarray([S, S]))  # row 1: early rows see 0

    def ours(q, k, v):
        return flash_attention(
            q, k, v, **ranges, impl="pallas", backend="tpu", interpret=_params(), block_q=16, block_k=32
        )

    def ref(q, k, v):
        return self_attention(q, k, v, **ranges)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), **tol(FORWARD_TOL, jnp.float32))
    assert _no_races()
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    got = jax.vjp(ours, q, k, v)[1](cotangent)
    want = jax.vjp(ref, q, k, v)[1](cotangent)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **tol(GRAD_TOL, jnp.float32))
    assert _no_races()


def test_decode_attention(arrays):
    q, k, v = arrays
    q1, start = q[:, :3], jnp.asarray([0, 30])
    got = decode_attention(
        q1, k, v, q_offset=50, kv_start=start, impl="pallas", backend="tpu", interpret=_params(), block_k=16
    )
    want = self_attention(q1, k, v, q_offset=50, kv_start=start, kv_end=jnp.asarray([53, 53]))
    np.testing.assert_allclose(got, want, **tol(FORWARD_TOL, jnp.float32))
    assert _no_races()


def test_cross_attention_forward_and_backward(arrays):
    q = arrays[0]
    rng = np.random.default_rng(2)
    images, tiles, per_tile = 2, 4, 17  # blocks of 16 straddle the 17-token tiles
    kv = jnp.asarray(rng.normal(size=(B, K, images * tiles * per_tile, H)), jnp.float32)
    mask = rng.random((B, T, images, tiles)) < 0.5
    mask[:, :5] = False  # text before the first image
    mask[1, :, 1] = False  # a padded image
    mask = jnp.asarray(mask)

    def ours(q, k, v):
        return cross_attention(
            q,
            k,
            v,
            mask,
            tokens_per_tile=per_tile,
            impl="pallas",
            backend="tpu",
            interpret=_params(),
            block_q=16,
            block_k=16,
        )

    def ref(q, k, v):
        return cross_reference(q, k, v, mask, tokens_per_tile=per_tile)

    np.testing.assert_allclose(ours(q, kv, kv), ref(q, kv, kv), **tol(FORWARD_TOL, jnp.float32))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    got = jax.vjp(ours, q, kv, kv * 0.5)[1](cotangent)
    want = jax.vjp(ref, q, kv, kv * 0.5)[1](cotangent)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **tol(GRAD_TOL, jnp.float32))
    assert _no_races()
