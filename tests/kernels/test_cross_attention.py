"""The ``cross_attention`` op against oracles written here, for every implementation (``impl_kwargs``).

Forward: a float64 numpy oracle that repeats the kv heads explicitly and builds the dense ``[B, T, N_v]`` token mask
from the tile mask token by token (image-major, then tile, then ``P`` tokens). Gradients: ``jax.vjp`` of the same
construction in float32 jnp. Shapes are tiny and blocks small (16/32) so that query and key blocks are ragged,
key blocks straddle tile boundaries (``P`` = 5, 17, 37 is no multiple of the block), and padded tiles / images
leave whole key blocks dead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels.cross_attention import cross_attention
from tests.kernels.conftest import FORWARD_TOL, GRAD_TOL, tol

R = 4  # tiles per image (max_num_tiles)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    n: int
    k: int
    h: int
    images: int  # I
    p: int  # tokens per tile
    dtype: object
    # Per batch entry: (first text row, valid tiles) per image; rows before the first image see nothing, rows from
    # an image's first row on see its valid tiles (and those of the earlier images). None: a random tile mask.
    layout: tuple | None
    block_q: int | None = 16
    block_k: int | None = 16
    seed: int = 0


FORWARD_CASES = [
    Case("g1-fp32-I2", 2, 37, 2, 2, 64, 2, 17, jnp.float32, (((3, 3), (20, 2)), ((10, 1),))),
    Case("g4-bf16-h128", 1, 100, 8, 2, 128, 1, 37, jnp.bfloat16, (((7, 2),),), block_q=32, block_k=32),
    Case("g8-fp32-P5-random", 2, 24, 8, 1, 64, 2, 5, jnp.float32, None),
    Case("g2-bf16-bk>P", 2, 50, 4, 2, 64, 2, 17, jnp.bfloat16, (((0, 4), (30, 3)), ((45, 2),)), block_q=32, block_k=32),
    Case("decode-g4-fp32", 2, 1, 8, 2, 128, 2, 37, jnp.float32, (((0, 3), (0, 1)), ((1, 2),))),
    Case("decode-g8-bf16", 1, 1, 8, 1, 64, 1, 37, jnp.bfloat16, (((0, 2),),), block_k=32),
    Case("default-blocks", 1, 40, 4, 2, 64, 1, 37, jnp.float32, (((5, 1),),), block_q=None, block_k=None),
]
GRAD_CASES = [
    Case("grad-g2-fp32", 2, 30, 4, 2, 64, 2, 17, jnp.float32, (((4, 3), (18, 1)), ((9, 2),))),
    Case("grad-g4-bf16-h128", 1, 20, 8, 2, 128, 1, 37, jnp.bfloat16, (((6, 2),),), block_q=32, block_k=32),
]


def tile_mask_of(case: Case) -> np.ndarray:
    """``[B, T, I, R]`` bool."""
    mask = np.zeros((case.b, case.t, case.images, R), bool)
    if case.layout is None:
        rng = np.random.default_rng(case.seed + 1)
        mask[:] = rng.random(mask.shape) < 0.4
        mask[:, :3] = False  # text before the first image
        mask[1, :, 1] = False  # a padded image
        return mask
    for bi, images in enumerate(case.layout):
        for i, (start, tiles) in enumerate(images):
            mask[bi, start:, i, :tiles] = True
    return mask


def inputs(case: Case):
    rng = np.random.default_rng(case.seed)
    n_v = case.images * R * case.p

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(case.dtype)

    q, k, v = arr(case.b, case.t, case.n, case.h), arr(case.b, case.k, n_v, case.h), arr(case.b, case.k, n_v, case.h)
    return q, k, v, jnp.asarray(tile_mask_of(case))


def token_mask(tile_mask: np.ndarray, p: int) -> np.ndarray:
    """``[B, T, N_v]``: token ``s`` belongs to image ``s // (R * P)``, tile ``(s // P) % R``."""
    b, t, n_img, n_tiles = tile_mask.shape
    mask = np.zeros((b, t, n_img * n_tiles * p), bool)
    for s in range(mask.shape[-1]):
        mask[:, :, s] = tile_mask[:, :, s // (n_tiles * p), (s // p) % n_tiles]
    return mask


def oracle(q, k, v, tile_mask, p) -> np.ndarray:
    """float64: softmax over the visible tokens, 0 for a row that sees none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, N, N_v, H]
    mask = token_mask(np.asarray(tile_mask), p)[:, None]  # [B, 1, T, N_v]
    s = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    return np.einsum("bnts,bnsh->btnh", e / np.where(denom > 0, denom, 1.0), v)


def oracle_f32(q, k, v, tile_mask, p):
    """The oracle in float32 jnp (differentiable; no NaN for rows that see nothing)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[1]
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    mask = jnp.asarray(token_mask(np.asarray(tile_mask), p))[:, None]
    s = jnp.einsum("btnh,bnsh->bnts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -1e30)
    e = jnp.where(mask, jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))), 0.0)
    denom = e.sum(-1, keepdims=True)
    return jnp.einsum("bnts,bnsh->btnh", e / jnp.where(denom > 0, denom, 1.0), v, precision="highest")


def run(case: Case, q, k, v, tile_mask, impl_kwargs):
    return cross_attention(
        q, k, v, tile_mask, tokens_per_tile=case.p, block_q=case.block_q, block_k=case.block_k, **impl_kwargs
    )


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.name)
def test_forward(case, impl_kwargs):
    q, k, v, tile_mask = inputs(case)
    out = run(case, q, k, v, tile_mask, impl_kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    got = np.asarray(out.astype(jnp.float32))
    np.testing.assert_allclose(got, oracle(q, k, v, tile_mask, case.p), **tol(FORWARD_TOL, case.dtype))
    blind = ~np.asarray(tile_mask).any(axis=(2, 3))  # [B, T]: rows that see no tile
    assert blind.any() or case.name == "decode-g8-bf16"  # the exactly-0 check below is not vacuous
    assert np.all(got[blind] == 0.0)


def value_and_grads(fn):
    """Jitted ``(out, dq, dk, dv)`` of ``fn(q, k, v)`` for a cotangent ``dout`` (eager vjps are slow to dispatch)."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))

    return jax.jit(run)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_gradients(case, impl_kwargs):
    q, k, v, tile_mask = inputs(case)
    dout = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32).astype(case.dtype)
    got = value_and_grads(lambda q, k, v: run(case, q, k, v, tile_mask, impl_kwargs))(q, k, v, dout)
    want = value_and_grads(lambda q, k, v: oracle_f32(q, k, v, tile_mask, case.p))(q, k, v, dout.astype(jnp.float32))
    blind = ~np.asarray(tile_mask).any(axis=(2, 3))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == case.dtype, name
        g = np.asarray(g.astype(jnp.float32))
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(
            g, np.asarray(w), **tol(FORWARD_TOL if name == "out" else GRAD_TOL, case.dtype), err_msg=name
        )
        if name == "dq":
            assert np.all(g[blind] == 0.0)  # rows that see nothing get no gradient


def test_jit_traced_mask(impl_kwargs):
    """The tile mask is data: one compiled function serves different masks."""
    case = FORWARD_CASES[0]
    q, k, v, tile_mask = inputs(case)
    fn = jax.jit(lambda q, k, v, m: run(case, q, k, v, m, impl_kwargs))
    for mask in (tile_mask, jnp.asarray(np.roll(np.asarray(tile_mask), 5, axis=1))):
        np.testing.assert_allclose(
            np.asarray(fn(q, k, v, mask)), oracle(q, k, v, mask, case.p), **tol(FORWARD_TOL, case.dtype)
        )


def test_dead_blocks_are_not_read(impl_kwargs):
    """Key blocks that no row sees (padded tiles and images) are skipped: NaN there cannot reach the output."""
    if impl_kwargs["impl"] == "xla":
        pytest.skip("the XLA reference reads every token (0 * NaN probabilities)")
    case = Case("dead", 2, 20, 4, 2, 64, 2, 32, jnp.float32, (((2, 1),), ((0, 2), (10, 1))), block_k=32)
    q, k, v, tile_mask = inputs(case)
    dead = ~token_mask(np.asarray(tile_mask), case.p).any(axis=1)  # [B, N_v]: tokens no row sees
    assert dead.sum() > 4 * 32  # several whole blocks
    nan = jnp.asarray(dead[:, None, :, None])
    k_bad, v_bad = jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v)
    got = run(case, q, k_bad, v_bad, tile_mask, impl_kwargs)
    np.testing.assert_allclose(np.asarray(got), oracle(q, k, v, tile_mask, case.p), **tol(FORWARD_TOL, case.dtype))


def _bad(**changes):
    q = jnp.zeros((1, 3, 4, 64), jnp.float32)
    k = jnp.zeros((1, 2, 2 * R * 5, 64), jnp.float32)
    args = dict(q=q, k=k, v=k, tile_mask=jnp.zeros((1, 3, 2, R), bool), tokens_per_tile=5)
    args.update(changes)
    return args


BAD_INPUTS = {
    "n_v-not-I*R*P": _bad(tokens_per_tile=6),
    "k-v-shapes-differ": _bad(v=jnp.zeros((1, 2, 2 * R * 5 - 1, 64), jnp.float32)),
    "mask-rank": _bad(tile_mask=jnp.zeros((1, 3, 2 * R), bool)),
    "mask-batch": _bad(tile_mask=jnp.zeros((2, 3, 2, R), bool)),
    "mask-rows": _bad(tile_mask=jnp.zeros((1, 4, 2, R), bool)),
    "mask-dtype": _bad(tile_mask=jnp.zeros((1, 3, 2, R), jnp.int32)),
    "q-dtype": _bad(q=jnp.zeros((1, 3, 4, 64), jnp.int32)),
    "kv-dtype": _bad(k=jnp.zeros((1, 2, 2 * R * 5, 64), jnp.bfloat16)),
    "q-rank": _bad(q=jnp.zeros((3, 4, 64), jnp.float32)),
    "heads-not-multiple": _bad(q=jnp.zeros((1, 3, 3, 64), jnp.float32)),
    "head-dim-differs": _bad(q=jnp.zeros((1, 3, 4, 32), jnp.float32)),
    "tokens-per-tile-zero": _bad(tokens_per_tile=0),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs(name, impl_kwargs):
    args = BAD_INPUTS[name]
    with pytest.raises(InvalidInputError):
        cross_attention(**args, **impl_kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(impl="fast"),
        dict(impl="pallas", backend="cuda"),
        dict(impl="pallas", backend="gpu", block_k=24),
        dict(impl="pallas", backend="gpu", block_q=8),
        dict(impl="pallas", backend="tpu", block_q=12),
        dict(impl="pallas", backend="gpu", scale=jnp.float32(0.1)),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_kernel_arguments(kwargs):
    with pytest.raises(InvalidInputError):
        cross_attention(**_bad(), **kwargs)


def test_gpu_head_dim_must_suit_triton():
    args = _bad(q=jnp.zeros((1, 3, 4, 48), jnp.float32), k=jnp.zeros((1, 2, 40, 48), jnp.float32))
    args["v"] = args["k"]
    with pytest.raises(InvalidInputError):
        cross_attention(**args, impl="pallas", backend="gpu", interpret=True)
    cross_attention(**args, impl="pallas", backend="tpu", interpret=True)  # Mosaic takes any head dim
