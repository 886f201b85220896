"""The whole model with ``attention_impl="pallas"`` (our kernels, interpreted on CPU) equals ``"xla"``.

Text (both layer layouts) and vision models, fp32: logits of a left-padded prefill into a cache and of a
cache-less forward, greedy generation (flash attention for the prompt, split-K decode attention for each step, the
Mllama cross-attention kernel for images), gradients through the flash kernel's custom VJP, and the same under
FSDP x TP sharding on 8 simulated devices (``shard_map`` per device), where the compiled decode step must not
gather the KV cache.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs, sharding
from llama32_jax.errors import InvalidInputError
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.inputs.image import preprocess
from llama32_jax.models.build import forward, init_model, load_params
from llama32_jax.nn.attend import set_attention_impl
from llama32_jax.nn.cache import KVCache

TOL = 1e-5  # fp32 end to end, as the parity tests

# G = 4 query heads per kv head; 16 query / 8 kv heads in the shardable variants (TP over 4 devices).
TEXT = configs.TINY_TEXT.replace(
    name="tiny-text-gqa4", text=dataclasses.replace(configs.TINY_TEXT.text, n_heads=8, n_kv_heads=2)
)
TEXT8 = configs.TINY_TEXT.replace(
    name="tiny-text-shardable16", text=dataclasses.replace(configs.TINY_TEXT.text, n_heads=16, n_kv_heads=8)
)
VISION = configs.TINY_VISION
VISION8 = configs.TINY_VISION.replace(
    name="tiny-vision-shardable16",
    text=dataclasses.replace(configs.TINY_VISION.text, dim=256, n_heads=16, n_kv_heads=8, ffn_dim=128),
    vision=dataclasses.replace(configs.TINY_VISION.vision, width=64, n_heads=8, mlp_dim=128),
)


def _params(config, seed=0):
    tree = nnx.to_pure_dict(nnx.state(init_model(config, param_dtype=jnp.float32, seed=seed), nnx.Param))
    if config.is_vision:  # open the tanh gates (zero at init) so the images matter
        tree = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, 0.6) if "gate" in str(path[-1].key) else x, tree
        )
    return tree


def _model(config, params, impl, plan=None):
    model = set_attention_impl(load_params(config, params, param_dtype=jnp.float32), impl)
    return model if plan is None else sharding.shard_model(model, plan)


def _prompts(config, lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, config.text.vocab_size, n).tolist() for n in lengths]


def _padded_prefill(model, prompts, max_len):
    """Left-padded prompts written into a fresh cache: ``(logits [B, T, V], cache)``."""
    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
    start = jnp.asarray([length - len(p) for p in prompts], jnp.int32)
    cache = KVCache.init(model.config, len(prompts), max_len, dtype=jnp.float32, start=start)
    logits, cache = forward(model, jnp.asarray(ids), cache)
    rows = np.arange(length)[None, :] >= np.asarray(start)[:, None]  # padding rows are never read
    return np.asarray(logits)[rows], cache


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_text_model_pallas_equals_xla(scan):
    config = TEXT.replace(scan_layers=scan)
    params = _params(config)
    xla, pallas = _model(config, params, "xla"), _model(config, params, "pallas")
    prompts = _prompts(config, [70, 9, 33])  # several kernel blocks, ragged tails, heavy left padding

    want, want_cache = _padded_prefill(xla, prompts, 96)
    got, got_cache = _padded_prefill(pallas, prompts, 96)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # A decode step (the split-K kernel) on the cache each wrote.
    step = jnp.asarray([[5], [6], [7]], jnp.int32)
    want_step = forward(xla, step, want_cache)[0]
    got_step = forward(pallas, step, got_cache)[0]
    np.testing.assert_allclose(np.asarray(got_step), np.asarray(want_step), atol=TOL, rtol=0)
    # Without a cache (training-style forward): the flash kernel over the whole sequence.
    ids = jnp.asarray(np.asarray(prompts[0])[None])
    np.testing.assert_allclose(np.asarray(forward(pallas, ids)[0]), np.asarray(forward(xla, ids)[0]), atol=TOL, rtol=0)
    # Greedy generation through the whole loop.
    want_tokens = [o.tokens for o in generate_tokens(xla, prompts, max_new_tokens=8)]
    assert [o.tokens for o in generate_tokens(pallas, prompts, max_new_tokens=8)] == want_tokens


def test_gradients_through_the_flash_kernel_equal_xla():
    """Fine-tuning differentiates the model: the flash kernel's custom VJP gives XLA autodiff's gradients."""
    params = _params(TEXT)
    ids = jnp.asarray(_prompts(TEXT, [40, 40], seed=3))

    def loss(model):
        logits = forward(model, ids[:, :-1])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    grads = {}
    for impl in ("xla", "pallas"):
        model = _model(TEXT, params, impl)
        value, g = nnx.value_and_grad(loss)(model)
        grads[impl] = (float(value), nnx.to_pure_dict(nnx.state(g, nnx.Param)))
    assert grads["pallas"][0] == pytest.approx(grads["xla"][0], abs=1e-6)
    flat_want = jax.tree.leaves(grads["xla"][1])
    flat_got = jax.tree.leaves(grads["pallas"][1])
    for got, want in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def images():
    s = VISION.vision.image_size
    rng = np.random.default_rng(5)
    return [[rng.integers(0, 256, (2 * s, s, 3), dtype=np.uint8)], [], [rng.integers(0, 256, (s, 3 * s, 3), np.uint8)]]


def _vision_prompts(config):
    img = config.image_token_id
    return [[3, 4, img, 5, 17, 300, 9], [3, 8, 21, 7], [img, *range(40, 75), 100, 7]]  # text before an image too


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_vision_model_pallas_equals_xla(images, scan):
    config = VISION.replace(scan_layers=scan)
    params = _params(config, seed=2)
    xla, pallas = _model(config, params, "xla"), _model(config, params, "pallas")
    batch = preprocess(images, config.vision)
    prompts = _vision_prompts(config)
    want = [o.tokens for o in generate_tokens(xla, prompts, max_new_tokens=6, images=batch)]
    assert [o.tokens for o in generate_tokens(pallas, prompts, max_new_tokens=6, images=batch)] == want

    from llama32_jax.inference.generate import image_tile_mask

    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    mask = jnp.asarray(image_tile_mask(config, ids.tolist(), batch, length))
    args = (jnp.asarray(batch.pixel_values), jnp.asarray(batch.aspect_ratio_ids), mask)
    cross = jax.jit(lambda m, *a: m.cross_inputs(*a))(xla, *args)
    np.testing.assert_allclose(
        np.asarray(forward(pallas, jnp.asarray(ids), cross=cross)[0]),
        np.asarray(forward(xla, jnp.asarray(ids), cross=cross)[0]),
        atol=TOL,
        rtol=0,
    )


needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")


@needs8
def test_sharded_text_pallas_equals_unsharded_xla():
    """FSDP x TP (2 x 4): each device runs the kernels on its batch rows and heads."""
    params = _params(TEXT8)
    prompts = _prompts(TEXT8, [20, 5, 13, 30], seed=4)
    want = [o.tokens for o in generate_tokens(_model(TEXT8, params, "xla"), prompts, max_new_tokens=6)]
    sharded = _model(TEXT8, params, "pallas", "fsdp_tp")
    assert [o.tokens for o in generate_tokens(sharded, prompts, max_new_tokens=6)] == want
    want_logits, _ = _padded_prefill(_model(TEXT8, params, "xla"), prompts, 48)
    got_logits, _ = _padded_prefill(sharded, prompts, 48)
    np.testing.assert_allclose(got_logits, want_logits, atol=TOL, rtol=0)


@needs8
def test_sharded_decode_step_gathers_no_cache():
    """Under ``tp`` the compiled Pallas decode step never all-gathers a KV-cache buffer (each device reads its own
    kv heads inside ``shard_map``)."""
    model = _model(TEXT8, _params(TEXT8), "pallas", "tp")
    cache = KVCache.init(TEXT8, 2, 64, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache, last_only=True)

    hlo = jax.jit(step).lower(state, jnp.zeros((2, 1), jnp.int32), cache).compile().as_text()
    cache_shape = ",".join(str(d) for d in cache.k[0].shape)
    assert not re.findall(rf"f32\[{cache_shape}\][^=\n]*? all-gather", hlo)


@needs8
def test_sharded_vision_pallas_equals_unsharded_xla(images):
    params = _params(VISION8, seed=2)
    batch = preprocess(images, VISION8.vision)
    prompts = _vision_prompts(VISION8)
    want = [o.tokens for o in generate_tokens(_model(VISION8, params, "xla"), prompts, max_new_tokens=5, images=batch)]
    sharded = _model(VISION8, params, "pallas", "fsdp_tp")
    assert [o.tokens for o in generate_tokens(sharded, prompts, max_new_tokens=5, images=batch)] == want


def test_bad_attention_impl_is_refused():
    with pytest.raises(InvalidInputError, match="impl must be one of"):
        set_attention_impl(init_model(TEXT, param_dtype=jnp.float32), "triton")
