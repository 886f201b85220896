"""``lj.load(path, mesh=...)``: a converted checkpoint is restored straight into the plan's shardings.

Text and vision checkpoints are written by our converter from HF directories; the restored arrays carry the plan's
specs as they come out of Orbax (before any model is built), the loaded model's every parameter too, and its
logits equal the unsharded model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama32_jax as lj
from llama32_jax import sharding
from llama32_jax.checkpoint.orbax_ckpt import read_manifest, restore_params
from llama32_jax.nn.layers import flatten_tree
from tests.sharding.test_sharding import TEXT, VISION, _assert_param_specs, _params

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_load")
    model = lj.load_params(TEXT, _params(TEXT), param_dtype=jnp.float32)
    lj.export_hf(model, root / "hf", dtype="float32")
    return lj.convert(root / "hf", root / "orbax", dtype="float32", progress=False), model


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    from safetensors.numpy import save_file

    from llama32_jax.checkpoint.convert_vision import vision_state_dict_from_params
    from tests.refs_vision import hf_mllama_config

    root = tmp_path_factory.mktemp("sharded_load_vision")
    params = _params(VISION, seed=2)
    (root / "hf").mkdir()
    hf_mllama_config(VISION).save_pretrained(root / "hf")
    sd = vision_state_dict_from_params(VISION, params, "hf")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, str(root / "hf" / "model.safetensors"))
    out = lj.convert(root / "hf", root / "orbax", dtype="float32", progress=False)
    return out, lj.load_params(VISION, params, param_dtype=jnp.float32)


def test_restore_reads_each_array_into_its_plan_sharding(text_ckpt):
    path, _ = text_ckpt
    plan, mesh = sharding.resolve("fsdp_tp")
    _, config = read_manifest(path)
    _, tree = restore_params(path, sharding=sharding.restore_shardings(config, plan, mesh))
    specs = sharding.flat_param_specs(config, plan)
    for key, array in flatten_tree(tree).items():
        assert array.sharding.spec == specs[key] and array.sharding.mesh == mesh, key


@pytest.mark.parametrize("mesh", ["fsdp_tp", "tp", "mesh"])
def test_load_with_a_plan_or_a_mesh(text_ckpt, mesh):
    path, reference = text_ckpt
    if mesh == "mesh":  # a bare Mesh with role-named axes gets the standard rules
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    model = lj.load(path, mesh=mesh, dtype="float32")
    plan = model.module.placement.plan
    _assert_param_specs(model.module, plan)
    tokens = np.random.default_rng(3).integers(0, TEXT.text.vocab_size, (8, 9))
    want = np.asarray(lj.forward(reference, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(model.logits(tokens), want, atol=1e-5, rtol=0)


def test_load_vision_checkpoint_into_a_plan(vision_ckpt):
    path, reference = vision_ckpt
    model = lj.load(path, mesh="fsdp_tp", dtype="float32", scan_layers=True)
    _assert_param_specs(model.module, model.module.placement.plan)
    assert model.module.cross_layers.gate_attn.shape[0] == VISION.text.n_cross_attention_layers  # stacked
    s = VISION.vision.image_size
    image = np.random.default_rng(4).integers(0, 256, (s, 2 * s, 3), dtype=np.uint8)
    ids = [[VISION.image_token_id, 5, 6, 7, 8]] * 2
    got = model.logits(ids, images=[[image]] * 2)
    want = lj.api.Model(reference).logits(ids, images=[[image]] * 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bad_mesh_arguments_are_named(text_ckpt):
    path, _ = text_ckpt
    with pytest.raises(sharding.PlanError, match="no sharding plan named 'tpu'"):
        lj.load(path, mesh="tpu")
    odd = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("model",))
    with pytest.raises(sharding.PlanError, match="mesh axes \\['model'\\] have no standard role"):
        lj.load(path, mesh=odd)
    rules = {"q_heads": "t", "head_dim": "t"}
    collide = sharding.plan_from_dict({"mesh": {"shape": [8], "axes": ["t"]}, "rules": rules}, "x")
    with pytest.raises(sharding.PlanError, match="'q_heads' and 'head_dim' both map to mesh axis 't'"):
        lj.load(path, mesh=collide)
