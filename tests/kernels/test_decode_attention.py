"""The ``decode_attention`` suite: every case against every implementation (``impl_kwargs``), checked against a
float64 numpy oracle written here (explicit kv-head repeats, the mask built from first principles).

Shapes are small and blocks explicit (16/32) so that caches span several key blocks with a ragged tail, several
splits, and splits with nothing visible.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import split_blocks
from llama32_jax.kernels.decode_attention import decode_attention
from tests.kernels.conftest import FORWARD_TOL, tol

F32, BF16 = jnp.float32, jnp.bfloat16


def oracle(q, k, v, q_offset, kv_start, kv_end) -> np.ndarray:
    """float64 causal attention of ``q [B, T, N, H]`` over ``k, v [B, K, S, H]``; rows seeing nothing give 0."""
    q, k, v = (np.asarray(jnp.asarray(x, F32), np.float64) for x in (q, k, v))
    t, n, h = q.shape[1:]
    s = k.shape[2]
    k = np.repeat(k, n // k.shape[1], axis=1)  # query head i uses kv head i // G
    v = np.repeat(v, n // v.shape[1], axis=1)
    slot, query = np.arange(s)[None, None, :], np.arange(t)[None, :, None]
    start, end = np.asarray(kv_start)[:, None, None], np.asarray(kv_end)[:, None, None]
    mask = (start <= slot) & (slot < end) & (slot <= q_offset + query)  # [B, T, S]
    scores = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(h)
    scores = np.where(mask[:, None], scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    probs = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bnts,bnsh->btnh", probs, v)


def make(b, t, kv_heads, g, s, h, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, kv_heads * g, h)), dtype)
    k = jnp.asarray(rng.standard_normal((b, kv_heads, s, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv_heads, s, h)), dtype)
    return q, k, v


def check(out, q, k, v, q_offset, kv_start, kv_end):
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(jnp.asarray(out, F32), np.float64)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, oracle(q, k, v, q_offset, kv_start, kv_end), **tol(FORWARD_TOL, q.dtype))


# (T, G, H, dtype, S, block_k, num_splits): every S is ragged for its block_k.
CASES = {
    "t1-g1-d64-f32": (1, 1, 64, F32, 200, 32, 3),
    "t3-g2-d64-bf16": (3, 2, 64, BF16, 173, 16, 4),
    "t1-g4-d128-bf16": (1, 4, 128, BF16, 150, 32, 2),
    "t3-g8-d128-f32": (3, 8, 128, F32, 100, 16, 5),
    "t1-g8-d64-bf16": (1, 8, 64, BF16, 90, 16, 3),
    "t3-g4-d128-f32": (3, 4, 128, F32, 70, 16, 2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_oracle(impl_kwargs, case):
    t, g, h, dtype, s, block_k, num_splits = case
    kv_heads = 1 if g == 8 else 2
    q, k, v = make(2, t, kv_heads, g, s, h, dtype)
    q_offset = s // 2 + 3
    kv_start = np.array([0, 11])  # sequence 1 left-padded
    kv_end = np.array([s, q_offset + 1])  # sequence 1 ends at slot q_offset: with T = 3, later queries see less
    out = decode_attention(
        q, k, v, q_offset=jnp.int32(q_offset), kv_start=jnp.asarray(kv_start), kv_end=jnp.asarray(kv_end),
        block_k=block_k, num_splits=num_splits, **impl_kwargs,
    )  # fmt: skip
    check(out, q, k, v, q_offset, kv_start, kv_end)


@pytest.mark.parametrize("q_offset", [0, 1, 47, 147], ids=["start", "start+1", "middle", "end"])
def test_q_offset_near_both_ends(impl_kwargs, q_offset):
    s, t = 150, 3  # 10 blocks of 16, the last ragged; q_offset 147 puts the last query in slot S - 1
    q, k, v = make(2, t, 2, 2, s, 64, F32, seed=1)
    kv_start, kv_end = np.array([0, 1]), np.array([s, s])  # q_offset 0: sequence 1's first row sees nothing
    out = decode_attention(
        q, k, v, q_offset=jnp.int32(q_offset), kv_start=jnp.asarray(kv_start), block_k=16, num_splits=4,
        **impl_kwargs,
    )  # fmt: skip
    check(out, q, k, v, q_offset, kv_start, kv_end)
    if q_offset == 0:
        assert np.all(np.asarray(out[1, 0]) == 0)


def test_empty_splits_and_rows(impl_kwargs):
    """8 splits over 10 blocks: most splits of the short ranges see nothing; whole sequences / single rows see
    nothing (exactly 0); a sequence whose few visible keys sit in one block."""
    s, t, q_offset = 160, 3, 100
    q, k, v = make(4, t, 2, 4, s, 64, BF16, seed=2)
    kv_start = np.array([0, 97, q_offset + t, q_offset + 1])  # 1: keys 97..102 only; 2: nothing; 3: row 0 nothing
    kv_end = np.array([s, s, s, s])
    out = decode_attention(
        q, k, v, q_offset=jnp.int32(q_offset), kv_start=jnp.asarray(kv_start), kv_end=jnp.asarray(kv_end),
        block_k=16, num_splits=8, **impl_kwargs,
    )  # fmt: skip
    check(out, q, k, v, q_offset, kv_start, kv_end)
    out = np.asarray(jnp.asarray(out, F32))
    assert np.all(out[2] == 0) and np.all(out[3, 0] == 0)
    assert np.all(np.abs(out[3, 1:]).sum(axis=-1) > 0)


def test_default_blocks_and_splits(impl_kwargs):
    s, q_offset = 1000, 613  # no power-of-two block >= 16 divides 1000: the flavours' ragged-tail paths
    q, k, v = make(1, 1, 2, 4, s, 128, BF16, seed=3)
    kv_start, kv_end = np.array([5]), np.array([s])
    out = decode_attention(q, k, v, q_offset=q_offset, kv_start=jnp.asarray(kv_start), **impl_kwargs)
    check(out, q, k, v, q_offset, kv_start, kv_end)


def test_garbage_outside_the_valid_range(impl_kwargs):
    """Unwritten / padding cache slots may hold anything: NaN there must not reach the output. (The XLA reference
    computes ``0 * v`` over masked keys, so it makes no such promise.)"""
    if impl_kwargs["impl"] == "xla":
        pytest.skip("the reference multiplies masked probabilities (0) by every value row")
    s, t, q_offset = 90, 3, 40
    q, k, v = make(2, t, 2, 2, s, 64, F32, seed=4)
    kv_start = np.array([0, 20])
    slots = np.arange(s)
    bad = (slots[None, :] < kv_start[:, None]) | (slots[None, :] >= q_offset + t)  # [B, S]
    bad_k = jnp.where(bad[:, None, :, None], jnp.nan, k)
    bad_v = jnp.where(bad[:, None, :, None], jnp.inf, v)
    out = decode_attention(
        q, bad_k, bad_v, q_offset=q_offset, kv_start=jnp.asarray(kv_start), block_k=16, num_splits=3, **impl_kwargs
    )
    check(out, q, k, v, q_offset, kv_start, np.array([s, s]))


def test_jit_traced_offsets_reused(impl_kwargs):
    s, t = 120, 1
    q, k, v = make(2, t, 2, 2, s, 64, F32, seed=5)
    traces = []

    @jax.jit
    def step(q, k, v, q_offset, kv_start):
        traces.append(1)
        return decode_attention(q, k, v, q_offset=q_offset, kv_start=kv_start, block_k=32, num_splits=2, **impl_kwargs)

    for q_offset, kv_start in ((30, [0, 25]), (110, [64, 3])):
        out = step(q, k, v, jnp.int32(q_offset), jnp.asarray(kv_start, jnp.int32))
        check(out, q, k, v, q_offset, np.array(kv_start), np.array([s, s]))
    assert len(traces) == 1


def _args(**change):
    q, k, v = make(1, 1, 2, 2, 64, 64, F32)
    args = dict(q=q, k=k, v=v, q_offset=3)
    args.update(change)
    return args


BAD = {
    "q-rank": lambda: _args(q=jnp.zeros((1, 4, 64))),
    "kv-shape-mismatch": lambda: _args(v=jnp.zeros((1, 2, 63, 64))),
    "batch-mismatch": lambda: _args(k=jnp.zeros((2, 2, 64, 64)), v=jnp.zeros((2, 2, 64, 64))),
    "heads-not-multiple": lambda: _args(q=jnp.zeros((1, 1, 3, 64))),
    "too-many-queries": lambda: _args(q=jnp.zeros((1, 65, 4, 64))),
    "dtype-mix": lambda: _args(q=jnp.zeros((1, 1, 4, 64), BF16)),
    "int-dtype": lambda: _args(q=jnp.zeros((1, 1, 4, 64), jnp.int32)),
    "q-offset-vector": lambda: _args(q_offset=jnp.zeros((1,), jnp.int32)),
    "q-offset-float": lambda: _args(q_offset=3.0),
    "kv-start-shape": lambda: _args(kv_start=jnp.zeros((2,), jnp.int32)),
    "kv-end-float": lambda: _args(kv_end=jnp.ones((1,), F32)),
    "block-k-zero": lambda: _args(block_k=0),
    "num-splits-negative": lambda: _args(num_splits=-1),
    "scale-array": lambda: _args(scale=jnp.ones(())),
}


@pytest.mark.parametrize("make_args", BAD.values(), ids=BAD.keys())
def test_bad_inputs(impl_kwargs, make_args):
    with pytest.raises(InvalidInputError):
        decode_attention(**make_args(), **impl_kwargs)


@pytest.mark.parametrize(
    "backend, change",
    [
        ("gpu", dict(block_k=24)),  # not a power of two
        ("gpu", dict(block_k=8)),  # below Triton's 16
        ("gpu", dict(k=jnp.zeros((1, 2, 8, 64)), v=jnp.zeros((1, 2, 8, 64)))),  # S < 16
        ("gpu", dict(q=jnp.zeros((1, 1, 4, 48)), k=jnp.zeros((1, 2, 64, 48)), v=jnp.zeros((1, 2, 64, 48)))),
        ("tpu", dict(block_k=12)),  # not a multiple of the 8-row sublane tile
        (None, dict(impl="triton")),
    ],
    ids=["gpu-block-k-24", "gpu-block-k-8", "gpu-short-cache", "gpu-head-dim-48", "tpu-block-k-12", "bad-impl"],
)
def test_bad_flavour_options(backend, change):
    kwargs = dict(impl="pallas", backend=backend, interpret=True)
    kwargs.update(change)
    args = {key: kwargs.pop(key) for key in ("q", "k", "v") if key in kwargs}
    with pytest.raises(InvalidInputError):
        decode_attention(**_args(**args), **kwargs)


def test_split_blocks_partition_the_visible_blocks():
    """The splits tile exactly the key blocks that intersect [lo, hi), in order, whatever their number: a step at
    slot 300 of a 128K cache touches 3 blocks of 128, not 1024."""
    for lo, hi, block_k, num_splits in ((0, 301, 128, 32), (5, 5, 16, 4), (37, 1000, 16, 8), (130, 131072, 128, 7)):
        runs = [split_blocks(lo, hi, p, block_k=block_k, num_splits=num_splits) for p in range(num_splits)]
        blocks = [b for first, stop in runs for b in range(int(first), int(stop))]
        assert blocks == (list(range(lo // block_k, -(-hi // block_k))) if hi > lo else [])


def _lowered_text(backend: str, platform: str, t: int, g: int, dtype) -> str:
    b, kv_heads, s, h = 2, 2, 1000, 128
    q = jax.ShapeDtypeStruct((b, t, kv_heads * g, h), dtype)
    kv = jax.ShapeDtypeStruct((b, kv_heads, s, h), dtype)
    step = jax.jit(partial(decode_attention, impl="pallas", backend=backend, interpret=False))
    ints = dict(q_offset=jax.ShapeDtypeStruct((), jnp.int32), kv_start=jax.ShapeDtypeStruct((b,), jnp.int32))
    return step.trace(q, kv, kv, **ints).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("t, g, dtype", [(1, 4, BF16), (64, 8, F32)], ids=["t1-g4-bf16", "t64-g8-f32"])
def test_gpu_kernel_lowers_to_triton(t, g, dtype):
    """The real Triton lowering, checked without a GPU (CI's machines rarely have one)."""
    assert "__gpu$xla.gpu.triton" in _lowered_text("gpu", "cuda", t, g, dtype)


@pytest.mark.parametrize("t, g, dtype", [(1, 4, BF16), (64, 8, F32)], ids=["t1-g4-bf16", "t64-g8-f32"])
def test_tpu_kernel_lowers_to_mosaic(monkeypatch, t, g, dtype):
    """The real Mosaic lowering, checked without a TPU: the chip is named through Pallas' private tpu_info."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not all(hasattr(tpu_info, name) for name in ("get_device_kind", "get_num_device_cores")):
        pytest.skip("this jax names the TPU chip differently")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5e")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    assert "tpu_custom_call" in _lowered_text("tpu", "tpu", t, g, dtype)
