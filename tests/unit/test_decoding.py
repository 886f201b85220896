"""Incremental decoding through the KV cache equals the full forward; padding never changes a result."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.configs import TINY_TEXT
from llama32_jax.errors import InvalidInputError
from llama32_jax.models.build import forward, init_model
from llama32_jax.nn.cache import KVCache

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def model(request):
    return init_model(TINY_TEXT.replace(scan_layers=request.param), param_dtype=jnp.float32, seed=3)


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY_TEXT.text.vocab_size, size=(b, t)))


@pytest.mark.parametrize("prefill", [1, 5, 17])
def test_prefill_then_decode_equals_full_forward(model, prefill):
    tokens = _tokens(3, 24)
    full, _ = forward(model, tokens)
    cache = KVCache.init(model.config, 3, 32, dtype=jnp.float32)
    logits, cache = forward(model, tokens[:, :prefill], cache)
    steps = [logits]
    for i in range(prefill, 24):
        logits, cache = forward(model, tokens[:, i : i + 1], cache)
        steps.append(logits)
    assert int(cache.index) == 24
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=TOL, rtol=0)


def test_chunked_prefill_equals_full_forward(model):
    tokens = _tokens(2, 30, seed=1)
    full, _ = forward(model, tokens)
    cache = KVCache.init(model.config, 2, 40, dtype=jnp.float32)
    a, cache = forward(model, tokens[:, :11], cache)
    b, cache = forward(model, tokens[:, 11:30], cache)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), np.asarray(full), atol=TOL, rtol=0)


def test_left_padding_does_not_change_results(model):
    """Sequence 1 is left-padded by 6 slots (garbage tokens there); its logits equal running it alone."""
    seq = _tokens(1, 12, seed=2)
    alone, _ = forward(model, seq)
    pad = 6
    other = _tokens(1, 12 + pad, seed=3)
    batch = jnp.concatenate([other, jnp.concatenate([_tokens(1, pad, seed=4), seq], axis=1)], axis=0)
    cache = KVCache.init(model.config, 2, 24, dtype=jnp.float32, start=jnp.asarray([0, pad]))
    logits, cache = forward(model, batch[:, :15], cache)
    steps = [logits]
    for i in range(15, 18):
        logits, cache = forward(model, batch[:, i : i + 1], cache)
        steps.append(logits)
    got = np.concatenate(steps, axis=1)[1, pad:]
    np.testing.assert_allclose(got, np.asarray(alone)[0], atol=TOL, rtol=0)


def test_cache_errors(model):
    cache = KVCache.init(model.config, 2, 8, dtype=jnp.float32)
    for call in (model, lambda t, c: forward(model, t, c)):
        with pytest.raises(InvalidInputError, match="do not fit the cache"):
            call(_tokens(2, 9), cache)
    with pytest.raises(InvalidInputError, match="batch"):
        model(_tokens(3, 2), cache)
    other_layout = KVCache.init(model.config.replace(scan_layers=not model.config.scan_layers), 2, 8)
    with pytest.raises(InvalidInputError, match="layout"):
        model(_tokens(2, 2), other_layout)
    with pytest.raises(InvalidInputError, match=r"\[batch, length\]"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(InvalidInputError, match="exceeds the model context"):
        KVCache.init(model.config, 1, 10**7)
    with pytest.raises(InvalidInputError, match="start"):
        KVCache.init(model.config, 2, 8, start=jnp.zeros((3,), jnp.int32))
