"""Meta params.json variants, built here as dicts: Meta's own files (1B, 1B Instruct, 3B, 11B, 90B, Llama 3 / 3.1 8B)
are read with the sizes llama-models' ``ModelArgs`` and Meta's ``FeedForward`` give, and with the sizes transformers
reads from the official HF config of the same model; copies that other tools extended (tt-metal, executorch,
torchchat) are read when their extra fields agree and refused, naming the field, when they do not."""

from __future__ import annotations

import pytest

from experiments.check_config_corpus import diff, sizes_meta, sizes_ours, sizes_transformers
from llama32_jax.configs import LLAMA_3_2_1B, LLAMA_3_2_3B, LLAMA_3_2_11B_VISION, from_hf_config, from_params_json
from llama32_jax.errors import ConfigError, NotAModelConfigError, QuantizedCheckpointError, UnsupportedConfigError
from tests.unit.test_config_variants import HF_1B, MLLAMA_11B, MLLAMA_90B

META_1B = {
    "dim": 2048,
    "ffn_dim_multiplier": 1.5,
    "multiple_of": 256,
    "n_heads": 32,
    "n_kv_heads": 8,
    "n_layers": 16,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": 128256,
}
META_3B = {**META_1B, "dim": 3072, "ffn_dim_multiplier": 1.0, "n_heads": 24, "n_layers": 28}
META_11B = {
    **META_1B,
    "dim": 4096,
    "ffn_dim_multiplier": 1.3,
    "multiple_of": 1024,
    "n_layers": 32,
    "vision_chunk_size": 560,
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 8,
}
META_90B = {**META_11B, "dim": 8192, "multiple_of": 4096, "n_heads": 64, "n_layers": 80}
META_90B["vision_num_cross_attention_layers"] = 20
# Llama 3.1 8B Instruct; Llama 3 8B's file (April 2024) predates use_scaled_rope.
META_31_8B = {k: v for k, v in META_11B.items() if not k.startswith("vision")}
META_3_8B = {k: v for k, v in META_31_8B.items() if k != "use_scaled_rope"}
HF_3B = {**HF_1B, "hidden_size": 3072, "head_dim": 128, "num_attention_heads": 24, "num_hidden_layers": 28}
HF_31_8B = {
    **{k: v for k, v in HF_1B.items() if k != "head_dim"},
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "rope_scaling": {**HF_1B["rope_scaling"], "factor": 8.0},
    "tie_word_embeddings": False,
}
HF_3_8B = {**HF_31_8B, "rope_scaling": None, "max_position_embeddings": 8192}

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


TT_METAL_31_8B = {**META_31_8B, "rope_scaling_factor": 8}
EXECUTORCH_11B = {**META_11B, "fusion_interval": 4, "intermediate_dim": 14336, "n_special_tokens": 8}
TORCHCHAT = {
    "block_size": 131072,
    "dim": 2048,
    "hidden_dim": 8192,
    "n_layers": 16,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "ffn_dim_multiplier": 1.5,
    "multiple_of": 256,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {**HF_1B["rope_scaling"], "factor": 32.0},
    "use_tiktoken": True,
}
TORCHCHAT["rope_scaling"].pop("rope_type")
# torchchat's Llama-Guard-3-1B-INT4: pruned to 12 layers and FFN 6400, which Meta's arithmetic does not give.
TORCHCHAT_GUARD_INT4 = {**TORCHCHAT, "n_layers": 12, "hidden_dim": 6400}


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
