"""The in-memory state-dict mapping and the strict parameter loader reject bad checkpoints by name."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax.checkpoint import params_from_state_dict, state_dict_from_params
from llama32_jax.configs import TINY_TEXT
from llama32_jax.errors import CheckpointError
from llama32_jax.models.build import init_model, load_params
from llama32_jax.models.text import stack_layers, unstack_layers

CFG = TINY_TEXT  # tied head


@pytest.fixture(scope="module")
def params():
    return nnx.to_pure_dict(nnx.state(init_model(CFG, param_dtype=jnp.float32), nnx.Param))


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_round_trip_through_source_names(params, fmt):
    sd = state_dict_from_params(CFG, params, fmt)
    if fmt == "meta":  # Meta checkpoints of tied models still carry output.weight (docs/model-facts.md §8.2)
        sd["output.weight"] = sd["tok_embeddings.weight"].copy()
        sd["rope.freqs"] = np.zeros(8)  # a derivable buffer some checkpoints carry; dropped
    back = params_from_state_dict(CFG, sd, fmt)
    for a, b in zip(jax_leaves_with_path(back), jax_leaves_with_path(params), strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=a[0])


def jax_leaves_with_path(tree):
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_unknown_missing_and_out_of_range_keys(params):
    sd = state_dict_from_params(CFG, params, "hf")
    with pytest.raises(CheckpointError, match=r"unexpected key 'model.layers.0.self_attn.q_proj.bias'"):
        params_from_state_dict(CFG, {**sd, "model.layers.0.self_attn.q_proj.bias": np.zeros(64)}, "hf")
    with pytest.raises(CheckpointError, match=r"no 'model.layers.1.mlp.up_proj.weight'"):
        params_from_state_dict(CFG, {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, "hf")
    extra = {**sd, "model.layers.7.input_layernorm.weight": np.ones(64)}
    with pytest.raises(CheckpointError, match="layer 7 is out of range"):
        params_from_state_dict(CFG, extra, "hf")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        params_from_state_dict(CFG, sd, "gguf")


def test_tied_head_must_equal_embedding(params):
    sd = state_dict_from_params(CFG, params, "hf")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointError, match="ties the output head"):
        params_from_state_dict(CFG, sd, "hf")


def test_shape_mismatch_is_named(params):
    sd = state_dict_from_params(CFG, params, "hf")
    sd["model.layers.0.mlp.gate_proj.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight': shape \(100, 64\)"):
        params_from_state_dict(CFG, sd, "hf")
    tree = params_from_state_dict(CFG, state_dict_from_params(CFG, params, "hf"), "hf")
    tree["layers"][0]["feed_forward"]["w1"]["kernel"] = np.zeros((100, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"layers.0.feed_forward.w1.kernel: shape \(100, 64\)"):
        load_params(CFG, tree)
    sd = state_dict_from_params(CFG, params, "hf")
    sd["model.layers.0.self_attn.q_proj.weight"] = np.zeros((60, 64), np.float32)
    with pytest.raises(CheckpointError, match="q_proj"):
        params_from_state_dict(CFG, sd, "hf")


def test_load_params_strict_both_ways(params):
    missing = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(CheckpointError, match=r"missing .*norm.weight"):
        load_params(CFG, missing)
    with pytest.raises(CheckpointError, match=r"unexpected parameters .*lm_head"):
        load_params(CFG, {**params, "lm_head": np.zeros((512, 64))})


def test_layouts_convert_both_ways(params):
    stacked = stack_layers(params)
    assert stacked["layers"]["attention"]["wq"]["kernel"].shape == (2, 4, 16, 64)
    back = unstack_layers(stacked)
    np.testing.assert_array_equal(
        back["layers"][1]["feed_forward"]["w2"]["kernel"], params["layers"][1]["feed_forward"]["w2"]["kernel"]
    )
    # Either layout loads into either config.
    tokens = jnp.asarray([[1, 2, 3, 4]])
    ref = load_params(CFG, params, param_dtype=jnp.float32)(tokens)[0]
    for cfg in (CFG, CFG.replace(scan_layers=True)):
        for tree in (params, stacked):
            got = load_params(cfg, tree, param_dtype=jnp.float32)(tokens)[0]
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)
