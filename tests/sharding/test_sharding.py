"""Sharded execution on 8 simulated CPU devices: every plan gives the single-device results, and every array
lives where the plan says.

Tiny models whose sharded dimensions divide 8 (16 query / 8 KV heads, widths 64 / 128, vocabulary 512; vision
encoder width 64 with 8 heads), fp32. For each plan: the parameters' and the returned KV cache's ``.sharding.spec``
equal the plan-derived specs; logits (with a cache, and for the vision model with images) equal the unsharded
model's to 1e-5; greedy generation gives the same tokens (the batch is padded to a multiple of the batch shards
and the fillers dropped). Under tensor parallelism the compiled decode step gathers no full weight matrix.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs, dims, sharding
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.inputs.image import preprocess
from llama32_jax.models.build import forward, init_model, load_params
from llama32_jax.nn.cache import KVCache
from llama32_jax.nn.layers import flatten_tree

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")

TEXT = configs.TINY_TEXT.replace(
    name="tiny-text-shardable",
    text=dataclasses.replace(configs.TINY_TEXT.text, n_heads=16, n_kv_heads=8, head_dim=8, ffn_dim=128),
)
VISION = configs.TINY_VISION.replace(
    name="tiny-vision-shardable",
    text=dataclasses.replace(
        configs.TINY_VISION.text, dim=128, n_heads=16, n_kv_heads=8, head_dim=8, ffn_dim=128, n_cross_attention_layers=2
    ),  # head_dim * n_heads == dim, as HF's Mllama config assumes
    vision=dataclasses.replace(configs.TINY_VISION.vision, width=64, n_heads=8, mlp_dim=128),
)
PLANS = ["dp", "fsdp", "tp", "fsdp_tp"]
B = 8
TOL = 1e-5


def _params(config, seed=0):
    model = init_model(config, param_dtype=jnp.float32, seed=seed)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if config.is_vision:  # open every tanh gate (zero at init: gate, gate_attn, gate_ffn, ...) so images matter
        tree = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, 0.6) if "gate" in str(path[-1].key) else x, tree
        )
    return tree


def _model(config, params, plan=None):
    model = load_params(config, params, param_dtype=jnp.float32)
    return model if plan is None else sharding.shard_model(model, plan)


def _prompts(config, n=B, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.text.vocab_size, int(rng.integers(3, 12))).tolist() for _ in range(n)]


def _assert_param_specs(model, plan):
    expected = flatten_tree(nnx.to_pure_dict(sharding.param_specs(model, plan)))
    actual = flatten_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert expected.keys() == actual.keys()
    for path, value in actual.items():
        assert value.sharding.spec == expected[path], path
        assert value.sharding.mesh.shape == plan.mesh_dict


@pytest.fixture(scope="module")
def text_params():
    return _params(TEXT)


@pytest.fixture(scope="module")
def vision_params():
    return _params(VISION, seed=2)


TOKENS = np.random.default_rng(0).integers(0, 512, (B, 10))
TEXT_PROMPTS = _prompts(TEXT, n=B - 3)  # 5 prompts: padded to a multiple of the batch shards
_REFERENCE: dict = {}


def _text_reference(params, scan: bool):
    """The unsharded model's logits (with a cache) and greedy tokens, computed once per layout."""
    if ("text", scan) not in _REFERENCE:
        config = TEXT.replace(scan_layers=scan)
        ref = _model(config, params)
        logits, _ = forward(ref, jnp.asarray(TOKENS), KVCache.init(config, B, 16, dtype=jnp.float32))
        tokens = [o.tokens for o in generate_tokens(ref, TEXT_PROMPTS, max_new_tokens=6)]
        _REFERENCE["text", scan] = (np.asarray(logits), tokens)
    return _REFERENCE["text", scan]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("plan_name", PLANS)
def test_text_model_under_each_plan(text_params, plan_name, scan):
    config = TEXT.replace(scan_layers=scan)
    plan = sharding.load_plan(plan_name)
    want, want_tokens = _text_reference(text_params, scan)
    sharded = _model(config, text_params, plan)
    _assert_param_specs(sharded, plan)

    cache = KVCache.init(config, B, 16, dtype=jnp.float32)
    got, new_cache = forward(sharded, jnp.asarray(TOKENS), cache)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    # The cache comes back laid out as the plan says.
    axes = sharding.cache_axes(new_cache.stacked)
    for buf in jax.tree.leaves((new_cache.k, new_cache.v)):
        assert buf.sharding.spec == sharding.partition_spec(plan, axes, buf.shape, "cache")
    assert new_cache.start.sharding.spec == sharding.partition_spec(plan, (dims.BATCH,), (B,), "start")

    assert [o.tokens for o in generate_tokens(sharded, TEXT_PROMPTS, max_new_tokens=6)] == want_tokens


@pytest.fixture(scope="module")
def images():
    s = VISION.vision.image_size
    rng = np.random.default_rng(5)
    return [[rng.integers(0, 256, (2 * s, s, 3), dtype=np.uint8)], [], [rng.integers(0, 256, (s, 3 * s, 3), np.uint8)]]


VISION_PROMPTS = [[VISION.image_token_id, 5, 17, 300, 9], [3, 8, 21, 7], [VISION.image_token_id, 44, 2, 13, 100, 7]]


def _vision_inputs(config, images):
    """Eight id rows (the prompts + text, and text-only fillers) with their images, tile mask and cross inputs."""
    from llama32_jax.inference.generate import image_tile_mask

    full = [[*p, 11, 12, 13] for p in VISION_PROMPTS] + [[1, 2, 3]] * (B - len(VISION_PROMPTS))
    length = max(len(p) for p in full)
    ids = np.zeros((B, length), np.int32)
    for i, p in enumerate(full):
        ids[i, : len(p)] = p
    batch8 = preprocess([*images, *[[]] * (B - len(images))], config.vision)
    mask = image_tile_mask(config, ids.tolist(), batch8, length)
    return ids, (jnp.asarray(batch8.pixel_values), jnp.asarray(batch8.aspect_ratio_ids), jnp.asarray(mask))


def _vision_reference(params, images, scan: bool):
    if ("vision", scan) not in _REFERENCE:
        config = VISION.replace(scan_layers=scan)
        ref = _model(config, params)
        batch = preprocess(images, config.vision)
        tokens = [o.tokens for o in generate_tokens(ref, VISION_PROMPTS, max_new_tokens=5, images=batch)]
        ids, args = _vision_inputs(config, images)
        logits, _ = forward(ref, jnp.asarray(ids), cross=jax.jit(lambda m, *a: m.cross_inputs(*a))(ref, *args))
        _REFERENCE["vision", scan] = (tokens, np.asarray(logits))
    return _REFERENCE["vision", scan]


# Every plan with the unrolled layout, and the scanned [self, cross, self] groups under FSDP x TP.
@pytest.mark.parametrize(("plan_name", "scan"), [*[(p, False) for p in PLANS], ("fsdp_tp", True)])
def test_vision_model_under_each_plan(vision_params, images, plan_name, scan):
    config = VISION.replace(scan_layers=scan)
    plan = sharding.load_plan(plan_name)
    want_tokens, want_logits = _vision_reference(vision_params, images, scan)
    sharded = _model(config, vision_params, plan)
    _assert_param_specs(sharded, plan)

    batch = preprocess(images, config.vision)  # 3 requests (one without an image), padded to the batch shards
    got = [o.tokens for o in generate_tokens(sharded, VISION_PROMPTS, max_new_tokens=5, images=batch)]
    assert got == want_tokens

    # Cross-attention inputs sit where the plan puts them; logits with images equal the unsharded ones.
    ids, args = _vision_inputs(config, images)
    cross = jax.jit(lambda m, *a: m.cross_inputs(*a))(sharded, *args)
    for kv in jax.tree.leaves(cross.kv):
        axes = sharding.CROSS_KV_AXES if kv.ndim == 4 else (dims.LAYERS, *sharding.CROSS_KV_AXES)
        assert kv.sharding.spec == sharding.partition_spec(plan, axes, kv.shape, "cross K/V")
    got_logits, _ = forward(sharded, jnp.asarray(ids), cross=cross)
    np.testing.assert_allclose(np.asarray(got_logits), want_logits, atol=TOL, rtol=0)


def _weight_shapes(model) -> set[tuple[int, ...]]:
    return {tuple(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)) if v.ndim >= 2}


@pytest.mark.parametrize("config", [TEXT, VISION], ids=["text", "vision"])
def test_tensor_parallel_decode_gathers_no_full_weight(text_params, vision_params, config):
    """The compiled decode step under ``tp``: no all-gather produces an array of a full weight matrix's shape."""
    params = vision_params if config.is_vision else text_params
    model = _model(config, params, "tp")
    cache = KVCache.init(config, 2, 32, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache, last_only=True)

    hlo = jax.jit(step).lower(state, jnp.zeros((2, 1), jnp.int32), cache).compile().as_text()
    gathered = [
        tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"= f32\[([\d,]*)\][^=]*? all-gather", hlo)
    ]
    assert len(gathered) == len(re.findall(r"all-gather(?:-start)?\(", hlo))  # every gather was parsed
    full = _weight_shapes(model)
    both = {s for s in full} | {s[1:] for s in full if len(s) > 2}
    assert not [s for s in gathered if s in both], f"all-gathers of full weights: {gathered}"
    assert "all-reduce" in hlo  # the Megatron partial sums are reduced, not the weights gathered


# --------------------------------------------------------------------------------------------------------------
# Plan validation: before anything compiles.


def _plan(shape, axes, rules, name="test"):
    return sharding.plan_from_dict({"mesh": {"shape": shape, "axes": axes}, "rules": rules}, name)


def test_indivisible_dimension_names_the_parameter_shape_and_axis():
    plan = _plan([16], ["tensor"], {"kv_heads": "tensor"})
    with pytest.raises(sharding.PlanError) as info:
        sharding.validate(configs.LLAMA_3_2_1B, plan)
    msg = str(info.value)
    assert "parameter layers.attention.wk.kernel (16, 8, 64, 2048)" in msg  # validated on the stacked layout
    assert "kv_heads=8 is not divisible by mesh axes ['tensor'] of size 16" in msg


def test_collision_names_both_logical_axes():
    plan = _plan([2, 4], ["fsdp", "tensor"], {"mlp": "tensor", "embed": "tensor"})
    with pytest.raises(sharding.PlanError, match=r"logical axes 'mlp' and 'embed' both map to mesh axis 'tensor'"):
        sharding.validate(configs.LLAMA_3_2_1B, plan)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"rules": {}}, "missing \\[mesh\\]"),
        ({"mesh": {"shape": [8], "axes": ["x"]}, "extra": {}}, "unknown top-level tables"),
        ({"mesh": {"shape": [8, 2], "axes": ["x"]}}, "must name each of the 2 mesh dimensions"),
        ({"mesh": {"shape": [0], "axes": ["x"]}}, "positive integers"),
        ({"mesh": {"shape": [8], "axes": ["x"], "color": 1}}, "unknown \\[mesh\\] keys"),
        ({"mesh": {"shape": [8], "axes": ["x"]}, "rules": {"heads": "x"}}, "unknown logical axis 'heads'"),
        ({"mesh": {"shape": [8], "axes": ["x"]}, "rules": {"mlp": "y"}}, "names \\['y'\\], not axes of the mesh"),
        ({"mesh": {"shape": [8], "axes": ["x"], "hosts": 3}}, "positive divisor"),
    ],
)
def test_malformed_plans_are_named(data, match):
    with pytest.raises(sharding.PlanError, match=match):
        sharding.plan_from_dict(data, "bad")


def test_plan_files(tmp_path):
    names = sharding.available_plans()
    for required in ["single", "dp", "fsdp", "tp", "fsdp_tp", "tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "h100x8",
                     "h200x8", "h100x16-2host"]:  # fmt: skip
        assert required in names
    for name in names:  # every shipped plan shards every full-size model
        for model in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision"):
            sharding.validate(configs.get_config(model), sharding.load_plan(name))
    with pytest.raises(sharding.PlanError, match="no sharding plan named 'nope'"):
        sharding.load_plan("nope")
    bad = tmp_path / "broken.toml"
    bad.write_text("[mesh\nshape=")
    with pytest.raises(sharding.PlanError, match="not valid TOML"):
        sharding.load_plan(bad)
    with pytest.raises(sharding.PlanError, match="needs 16 devices"):
        sharding.make_mesh(sharding.load_plan("h100x16-2host"))


def test_unsplittable_batch_is_named(text_params):
    model = _model(TEXT, text_params, "dp")
    with pytest.raises(sharding.PlanError, match=r"batch=3 is not divisible by mesh axes \['data'\] of size 8"):
        forward(model, jnp.zeros((3, 4), jnp.int32))
