"""Meta params.json variants, built here as dicts: Meta's own files (1B, 1B Instruct, 3B, 11B, 90B, Llama 3 / 3.1 8B)
are read with the sizes llama-models' ``ModelArgs`` and Meta's ``FeedForward`` give, and with the sizes transformers
reads from the official HF config of the same model; copies that other tools extended (tt-metal, executorch,
torchchat) are read when their extra fields agree and refused, naming the field, when they do not."""

from __future__ import annotations

import pytest

from experiments.check_config_corpus import diff, sizes_meta, sizes_ours, sizes_transformers
from llama32_jax.configs import LLAMA_3_2_1B, LLAMA_3_2_3B, LLAMA_3_2_11B_VISION, from_hf_config, from_params_json
from llama32_jax.errors import ConfigError, NotAModelConfigError, QuantizedCheckpointError, UnsupportedConfigError
from tests.config_dicts import (
    EXECUTORCH_11B,
    HF_1B,
    HF_3_8B,
    HF_3B,
    HF_31_8B,
    META_1B,
    META_3_8B,
    META_3B,
    META_11B,
    META_31_8B,
    META_90B,
    MLLAMA_11B,
    MLLAMA_90B,
    TORCHCHAT,
    TORCHCHAT_GUARD_INT4,
    TT_METAL_31_8B,
)

OFFICIAL = {
    "1b": (META_1B, HF_1B, LLAMA_3_2_1B),
    "1b-instruct-insertion-order": (dict(reversed(list(META_1B.items()))), HF_1B, LLAMA_3_2_1B),
    "3b": (META_3B, HF_3B, LLAMA_3_2_3B),
    "11b-vision": (META_11B, MLLAMA_11B, LLAMA_3_2_11B_VISION),
    "90b-vision": (META_90B, MLLAMA_90B, None),
    "3.1-8b": (META_31_8B, HF_31_8B, None),
    "3-8b-no-use-scaled-rope": (META_3_8B, HF_3_8B, None),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_params_read_as_meta_and_the_official_hf_config(name):
    params, hf, named = OFFICIAL[name]
    ours = sizes_ours(from_params_json(dict(params)))
    assert diff(ours, sizes_meta(dict(params))) == {}
    assert diff(ours, sizes_transformers(dict(hf)), skip=("max_position_embeddings",)) == {}
    assert diff(ours, sizes_ours(from_hf_config(dict(hf))), skip=("max_position_embeddings",)) == {}
    if named is not None:
        assert from_params_json(dict(params), name=named.name) == named


@pytest.mark.parametrize(
    "params,hf,extra",
    [
        (TT_METAL_31_8B, HF_31_8B, {"rope_factor": 8.0}),
        (EXECUTORCH_11B, MLLAMA_11B, {"ffn_dim": 14336, "n_cross_attention_layers": 8}),
        (TORCHCHAT, HF_1B, {"ffn_dim": 8192, "rope_factor": 32.0}),
    ],
)
def test_extended_params_read_when_their_extra_fields_agree(params, hf, extra):
    ours = sizes_ours(from_params_json(dict(params)))
    assert diff(ours, sizes_meta({k: v for k, v in params.items() if k != "rope_scaling"}), ("rope_type",)) == {}
    assert diff(ours, sizes_transformers(dict(hf)), skip=("max_position_embeddings",)) == {}
    assert {k: ours[k] for k in extra} == extra


@pytest.mark.parametrize(
    "params,error,match",
    [
        (TORCHCHAT_GUARD_INT4, UnsupportedConfigError, r"field 'hidden_dim'=6400 disagrees with the FFN width .*8192"),
        ({**EXECUTORCH_11B, "intermediate_dim": 11008}, UnsupportedConfigError, r"'intermediate_dim'=11008.*14336"),
        ({**EXECUTORCH_11B, "fusion_interval": 5}, UnsupportedConfigError, r"'fusion_interval'=5 disagrees.*\(4\)"),
        ({**EXECUTORCH_11B, "n_special_tokens": 16}, UnsupportedConfigError, r"'n_special_tokens'=16"),
        ({**META_1B, "n_special_tokens": 8}, UnsupportedConfigError, r"'n_special_tokens'=8 disagrees.*\(0\)"),
        ({**TORCHCHAT, "rope_scaling_factor": 8}, UnsupportedConfigError, r"'rope_scaling_factor'=8 disagrees"),
        ({**TORCHCHAT, "use_scaled_rope": False}, ConfigError, "use_scaled_rope=false but rope_scaling"),
        (
            {**TORCHCHAT, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            UnsupportedConfigError,
            r"rope_scaling rope_type 'linear' is not supported",
        ),
        # Llama 2's file: vocab from the tokenizer, rope_theta implicit (10000 there, 500000 in Llama 3's code)
        (
            {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
            ConfigError,
            r"vocab_size=-1 .*positive vocabulary size is required",
        ),
        ({k: v for k, v in META_1B.items() if k != "rope_theta"}, ConfigError, "'rope_theta' is missing"),
        # Llama 4 fields change the computation: unknown, refused
        ({**META_1B, "use_qk_norm": True, "nope_layer_interval": 4}, ConfigError, r"unknown field\(s\)"),
        (
            {**META_1B, "quantization_args": {"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32}},
            QuantizedCheckpointError,
            r"'quantization_args' describes quantized weights.*bf16 release",
        ),
        ({**META_1B, "lora_args": {"rank": 16, "scale": 2.0}}, QuantizedCheckpointError, "QLoRA"),
        (HF_1B, NotAModelConfigError, r"params.json is an HF config.json \(read it with from_hf_config\)"),
        ({"temperature": 0.6, "top_p": 0.9}, NotAModelConfigError, "params.json is a generation config"),
    ],
)
def test_params_refusals_name_the_field(params, error, match):
    with pytest.raises(error, match=match):
        from_params_json(dict(params))


def test_official_params_have_only_model_args_fields():
    from experiments.check_config_corpus import model_args_fields

    for params, _, _ in OFFICIAL.values():
        assert set(params) <= model_args_fields()
