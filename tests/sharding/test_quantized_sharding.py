"""Quantized models under sharding plans, on 8 simulated CPU devices.

The tiny shardable text and vision models of ``test_sharding.py``, quantized (int8 per channel; int4 with groups
that fit the plan's shards), under tensor parallelism and FSDP x TP: every parameter, int values and fp32 scales
included, lives where the plan says (a scale on the devices of its kernel's output channels), and the logits (with
a cache; with images for the vision model) equal the unsharded quantized model's to the same 1e-5; the text
model's greedy tokens are the same. A quantized Orbax checkpoint restores straight into the plan's shardings.
An int4 plan that would split a group across devices is a :class:`PlanError` naming the parameter, the plan and
the group size, raised before any memory is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama32_jax as lj
from llama32_jax import sharding
from llama32_jax.checkpoint.orbax_ckpt import read_manifest, restore_params
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.models.build import abstract_model, forward, load_params
from llama32_jax.models.quantize import quant_targets
from llama32_jax.nn.cache import KVCache
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant import QuantConfig
from tests.sharding.test_sharding import (
    TEXT,
    TEXT_PROMPTS,
    TOKENS,
    VISION,
    _assert_param_specs,
    _vision_inputs,
)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")

TOL = 1e-5  # as test_sharding.py
B = TOKENS.shape[0]
# Text: int4 inputs per device under TP are 16 (wo: 2 of 16 heads x 8; w2: 128 / 8), so groups of 16 fit, 32 do not.
# Vision: its attention output projection has 8 heads x 8 inputs, one head per device under TP: groups of 8.
INT8 = QuantConfig("int8")
TEXT_INT4 = QuantConfig("int4", 16)
VISION_INT4 = QuantConfig("int4", 8)


def _quantized(config, params, quant, plan=None):
    model = load_params(config, params, param_dtype=jnp.float32, quant=quant)
    return model if plan is None else sharding.shard_model(model, plan)


def _assert_scales_follow_kernels(model, quant):
    """Each scale is split like its kernel's output axes (int4: and like the kernel's first input axis)."""
    flat = flatten_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for kpath, t in quant_targets(model.config, quant).items():
        kernel, scale = flat[kpath], flat[t.scale_path]
        spec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
        n_out = kernel.ndim - t.n_in
        want = spec[:n_out] if t.mode == "int8" else (*spec[:n_out], spec[n_out])
        got = tuple(scale.sharding.spec) + (None,) * (scale.ndim - len(scale.sharding.spec))
        assert got == want, kpath
        assert scale.dtype == jnp.float32 and kernel.dtype == jnp.dtype(t.mode), kpath


def _random_params(config, seed: int) -> dict:
    """Random fp32 parameters of ``config``'s shapes, drawn with numpy (faster than initialising the model on 8
    devices): weights ~ N(0, 0.05), norm scales ~ 1 + N(0, 0.05), every tanh gate 0.6 so images matter."""
    rng = np.random.default_rng(seed)
    flat = flatten_tree(nnx.to_pure_dict(nnx.state(abstract_model(config, param_dtype=jnp.float32), nnx.Param)))
    tree: dict = {}
    for path, leaf in flat.items():
        value = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        if "gate" in str(path[-1]):
            value = np.full(leaf.shape, 0.6, np.float32)
        elif any("norm" in str(p) or str(p).startswith("ln_") for p in path) and path[-1] in ("weight", "scale"):
            value += 1.0
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@pytest.fixture(scope="module")
def text_params():
    return _random_params(TEXT, seed=0)


@pytest.fixture(scope="module")
def vision_params():
    return _random_params(VISION, seed=2)


@pytest.mark.parametrize(
    ("quant", "plan_name"), [(INT8, "tp"), (TEXT_INT4, "fsdp_tp")], ids=["int8-tp", "int4-fsdp_tp"]
)
def test_quantized_text_model_under_a_plan(text_params, quant, plan_name):
    ref = _quantized(TEXT, text_params, quant)
    want, _ = forward(ref, jnp.asarray(TOKENS), KVCache.init(TEXT, B, 16, dtype=jnp.float32))
    want_tokens = [o.tokens for o in generate_tokens(ref, TEXT_PROMPTS, max_new_tokens=6)]

    plan = sharding.load_plan(plan_name)
    sharded = _quantized(TEXT, text_params, quant, plan)
    _assert_param_specs(sharded, plan)
    _assert_scales_follow_kernels(sharded, quant)
    got, _ = forward(sharded, jnp.asarray(TOKENS), KVCache.init(TEXT, B, 16, dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)
    assert [o.tokens for o in generate_tokens(sharded, TEXT_PROMPTS, max_new_tokens=6)] == want_tokens


@pytest.fixture(scope="module")
def images():
    s = VISION.vision.image_size
    rng = np.random.default_rng(5)
    return [[rng.integers(0, 256, (2 * s, s, 3), dtype=np.uint8)], [], [rng.integers(0, 256, (s, 3 * s, 3), np.uint8)]]


def _vision_logits(model, images):
    ids, args = _vision_inputs(model.config, images)
    cross = jax.jit(lambda m, *a: m.cross_inputs(*a))(model, *args)
    return np.asarray(forward(model, jnp.asarray(ids), cross=cross)[0])


def test_quantized_vision_model_under_a_plan(vision_params, images):
    """int4 under tensor parallelism (one group per device in the vision output projections): logits with images
    (vision tower, projector, cross-attention). Greedy decoding and int8 / FSDP x TP are the text tests' (the
    vision model compiles slowly on CPU)."""
    quant, plan = VISION_INT4, sharding.load_plan("tp")
    want = _vision_logits(_quantized(VISION, vision_params, quant), images)
    sharded = _quantized(VISION, vision_params, quant, plan)
    _assert_param_specs(sharded, plan)
    _assert_scales_follow_kernels(sharded, quant)
    np.testing.assert_allclose(_vision_logits(sharded, images), want, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def text_ckpts(tmp_path_factory, text_params):
    """The float text model exported to HF, and converted from there: float, and int4 with groups of 16 and 32."""
    root = tmp_path_factory.mktemp("quantized_sharded")
    lj.export_hf(load_params(TEXT, text_params, param_dtype=jnp.float32), root / "hf", dtype="float32")
    out = {"float": lj.convert(root / "hf", root / "float", dtype="float32", progress=False)}
    for g in (16, 32):
        out[g] = lj.convert(
            root / "hf", root / f"g{g}", dtype="float32", progress=False, quantize=QuantConfig("int4", g)
        )
    return out


def test_quantized_checkpoint_restores_into_the_plan(text_ckpts, text_params):
    path = text_ckpts[16]
    plan, mesh = sharding.resolve("fsdp_tp")
    _, config = read_manifest(path)
    _, tree = restore_params(path, sharding=sharding.restore_shardings(config, plan, mesh, quant=TEXT_INT4))
    specs = sharding.flat_param_specs(config, plan, TEXT_INT4)
    flat = flatten_tree(tree)
    assert len(flat) == len(specs)
    for key, array in flat.items():  # as they come out of Orbax, int4 values and fp32 scales included
        assert array.sharding.spec == specs[key] and array.sharding.mesh == mesh, key
    assert flat[("layers", 0, "attention", "wo", "kernel")].dtype == jnp.int4

    model = lj.load(path, mesh="fsdp_tp", dtype="float32")
    assert model.module.quant_config == TEXT_INT4
    _assert_param_specs(model.module, plan)
    _assert_scales_follow_kernels(model.module, TEXT_INT4)
    want = np.asarray(forward(_quantized(TEXT, text_params, TEXT_INT4), jnp.asarray(TOKENS))[0])
    np.testing.assert_allclose(model.logits(TOKENS), want, atol=TOL, rtol=0)


def test_int4_groups_split_across_devices_are_refused(text_ckpts, text_params, monkeypatch):
    plan = sharding.load_plan("tp")
    named = r"int4 parameter layers\.(0\.)?(attention\.wo|feed_forward\.w2)\.kernel .*plan 'tp'.*int4 group size 32"
    with pytest.raises(sharding.PlanError, match=named):
        sharding.validate(TEXT, plan, QuantConfig("int4", 32))
    sharding.validate(TEXT, plan, TEXT_INT4)  # groups of 16 fit
    sharding.validate(TEXT, plan, QuantConfig("int8"))  # any split fits per-channel scales

    model = _quantized(TEXT, text_params, QuantConfig("int4", 32))
    with pytest.raises(sharding.PlanError, match=named):
        sharding.shard_model(model, plan)
    assert all(len(v.sharding.device_set) == 1 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))  # not placed

    def no_restore(*args, **kwargs):
        raise AssertionError("restore_params ran before the plan was checked")

    monkeypatch.setattr(lj.api, "restore_params", no_restore)
    with pytest.raises(sharding.PlanError, match=named):
        lj.load(text_ckpts[32], mesh="tp", dtype="float32")
    with pytest.raises(sharding.PlanError, match=named):  # a float checkpoint quantized on load: checked first too
        lj.load(text_ckpts["float"], mesh="tp", dtype="float32", quantize=QuantConfig("int4", 32))
