"""RoPE: frequencies against docs/model-facts.md §2.2's anchors and HF's llama3 init function; rotation and
permutation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.configs import LLAMA_3_2_1B, LLAMA_3_2_3B, LLAMA_3_2_11B_VISION, RopeScaling
from llama32_jax.nn.rope import (
    apply_rope,
    half_split_to_interleaved,
    interleaved_to_half_split,
    inv_frequencies,
    rope_angles,
)
from tests.refs import hf_llama_config


def test_spec_anchors_1b():
    t = LLAMA_3_2_1B.text
    f = inv_frequencies(t.head_dim, t.rope_theta, t.rope_scaling)
    assert f.dtype == np.float32 and f.shape == (32,)
    np.testing.assert_allclose(f[15:18], [1.290548e-3, 4.295567e-4, 9.708286e-5], rtol=1e-6)
    np.testing.assert_allclose(f[31], 9.418307e-8, rtol=1e-6)
    unscaled = inv_frequencies(t.head_dim, t.rope_theta, None)
    np.testing.assert_array_equal(f[:15], unscaled[:15])  # high-frequency band untouched
    np.testing.assert_allclose(f[18:], unscaled[18:] / 32, rtol=1e-6)  # low band divided by the factor


def test_spec_anchors_3b_and_vision():
    t = LLAMA_3_2_3B.text
    f = inv_frequencies(t.head_dim, t.rope_theta, t.rope_scaling)
    np.testing.assert_allclose(f[29], 2.118407e-3, rtol=1e-6)
    np.testing.assert_allclose(f[63], 7.672315e-8, rtol=1e-6)
    t = LLAMA_3_2_11B_VISION.text
    f = inv_frequencies(t.head_dim, t.rope_theta, t.rope_scaling)
    np.testing.assert_allclose(f[29], 2.166571e-3, rtol=1e-6)
    np.testing.assert_allclose(f[63], 3.068926e-7, rtol=1e-6)


@pytest.mark.parametrize("factor", [8.0, 32.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_hf_llama3_rope_init(factor, head_dim):
    import dataclasses

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    t = dataclasses.replace(
        LLAMA_3_2_3B.text,
        head_dim=head_dim,
        dim=head_dim * 4,
        n_heads=4,
        n_kv_heads=2,
        rope_scaling=RopeScaling(factor=factor),
    )
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_llama_config(t), "cpu")
    assert attention_factor == 1.0
    np.testing.assert_allclose(inv_frequencies(head_dim, t.rope_theta, t.rope_scaling), hf_inv.numpy(), rtol=1e-6)


def test_rotation_preserves_norm_and_position_zero_is_identity():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 16)), jnp.float32)
    pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 100, 1000, 10000, 100000]])
    cos, sin = rope_angles(pos, inv_frequencies(16, 500000.0, RopeScaling(32.0)))
    y = apply_rope(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=0, atol=0)


def test_relative_position_property():
    """q(m)·k(n) depends on m - n only."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    inv = inv_frequencies(32, 500000.0, RopeScaling(8.0))

    def score(m, n):
        cq, sq = rope_angles(jnp.asarray([[m]]), inv)
        ck, sk = rope_angles(jnp.asarray([[n]]), inv)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(1007, 1003), rel=1e-4)


def test_interleaved_permutation_round_trip_and_meaning():
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8, 3 input features
    p = interleaved_to_half_split(w, 2)
    # Head 0: rows 0,2,4,6 (even = real parts) then 1,3,5,7.
    np.testing.assert_array_equal(p[:8, 0], w[[0, 2, 4, 6, 1, 3, 5, 7], 0])
    np.testing.assert_array_equal(half_split_to_interleaved(p, 2), w)
    with pytest.raises(ValueError):
        interleaved_to_half_split(np.zeros((10, 3)), 2)  # head_dim 5 is odd
