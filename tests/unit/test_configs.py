"""Configs: named constants hold docs/model-facts.md §1 facts; the readers are strict and never default silently."""

from __future__ import annotations

import json

import pytest

from llama32_jax import configs
from llama32_jax.configs import (
    LLAMA_3_2_1B,
    LLAMA_3_2_3B,
    LLAMA_3_2_11B_VISION,
    LLAMA_3_2_90B_VISION,
    from_hf_config,
    from_params_json,
    get_config,
    llama3_ffn_dim,
)
from llama32_jax.errors import ConfigError, UnsupportedConfigError
from tests.config_dicts import META_1B, META_3B, META_11B, META_90B

# Meta params.json of the published models (docs/model-facts.md §1.1): the same dicts the config-variant tests use.


def test_ffn_formula():
    assert llama3_ffn_dim(2048, 256, 1.5) == 8192
    assert llama3_ffn_dim(3072, 256, 1.0) == 8192
    assert llama3_ffn_dim(4096, 1024, 1.3) == 14336
    assert llama3_ffn_dim(8192, 4096, 1.3) == 28672


@pytest.mark.parametrize(
    "params,expected",
    [
        (META_1B, LLAMA_3_2_1B),
        (META_3B, LLAMA_3_2_3B),
        (META_11B, LLAMA_3_2_11B_VISION),
        (META_90B, LLAMA_3_2_90B_VISION),
    ],
)
def test_params_json_gives_the_named_constants(params, expected, tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(params))
    got = from_params_json(tmp_path, name=expected.name)  # a directory works like the file
    assert got == expected


def test_params_json_rope_factor_rules():
    assert from_params_json(META_1B).text.rope_scaling.factor == 32.0
    assert from_params_json(META_11B).text.rope_scaling.factor == 8.0
    other = {**META_1B, "dim": 1024, "n_heads": 16}
    assert from_params_json(other).text.rope_scaling.factor == 8.0  # Meta's reference value
    assert from_params_json(other, rope_factor=32).text.rope_scaling.factor == 32.0  # caller override
    assert from_params_json({**META_1B, "use_scaled_rope": False}).text.rope_scaling is None
    with pytest.raises(ConfigError, match="use_scaled_rope=false"):
        from_params_json({**META_1B, "use_scaled_rope": False}, rope_factor=32)


def test_params_json_rope_scaling_factor_is_read():
    assert from_params_json({**META_1B, "rope_scaling_factor": 32}).text == LLAMA_3_2_1B.text
    assert from_params_json({**META_1B, "rope_scaling_factor": 16}).text.rope_scaling.factor == 16.0
    with pytest.raises(ConfigError, match="rope_factor=32 was given but params.json says rope_scaling_factor=16"):
        from_params_json({**META_1B, "rope_scaling_factor": 16}, rope_factor=32)


def test_params_json_nested_cross_attention_count():
    params = {k: v for k, v in META_11B.items() if k != "vision_num_cross_attention_layers"}
    params["vision_model"] = {"cross_attention_adapter": {"num_layers": 8}}
    assert from_params_json(params).text.n_cross_attention_layers == 8


@pytest.mark.parametrize(
    "change,error,match",
    [
        # Llama 4's QK norm would change the computation: an unknown field is refused, naming it.
        ({"use_qk_norm": True}, ConfigError, r"unknown field\(s\) \['use_qk_norm'\]"),
        # tt-metal's rope_scaling_factor is read, and refused when it contradicts the file or the caller.
        ({"use_scaled_rope": False, "rope_scaling_factor": 8}, ConfigError, "use_scaled_rope=false"),
        ({"quantization_args": {"group_size": 256}}, UnsupportedConfigError, "quantization_args"),
        ({"lora_args": {"rank": 16, "scale": 2.0}}, UnsupportedConfigError, "lora_args"),
        ({"dim": "2048"}, ConfigError, "'dim' must be int"),
        ({"use_scaled_rope": 1}, ConfigError, "'use_scaled_rope' must be bool"),
        ({"n_layers": True}, ConfigError, "'n_layers' must be int"),
        ({"n_kv_heads": 7}, ConfigError, "multiple of n_kv_heads"),
        ({"vision_chunk_size": 560}, ConfigError, "needs both"),
    ],
)
def test_params_json_rejects(change, error, match):
    with pytest.raises(error, match=match):
        from_params_json({**META_1B, **change})


def test_params_json_missing_field_and_file(tmp_path):
    with pytest.raises(ConfigError, match="'rope_theta' is missing"):
        from_params_json({k: v for k, v in META_1B.items() if k != "rope_theta"})
    with pytest.raises(ConfigError, match="params.json not found"):
        from_params_json(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        from_params_json(tmp_path)


# The HF hub config.json of Llama-3.2-1B-Instruct (legacy spelling: rope_theta + rope_scaling), as a fixture of
# the format; its values are docs/model-facts.md §1.1-1.2 facts.
HF_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def test_hf_config_legacy_spelling():
    assert from_hf_config(HF_1B).text == LLAMA_3_2_1B.text


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, UnsupportedConfigError, "rope_type 'linear'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, ConfigError, "'low_freq_factor' is missing"),
        ({"attention_bias": True}, UnsupportedConfigError, "attention_bias"),
        ({"hidden_act": "gelu"}, UnsupportedConfigError, "hidden_act"),
        ({"sliding_window": 4096}, UnsupportedConfigError, "'sliding_window'=4096 is not supported"),
        ({"attn_logit_softcapping": 50.0}, ConfigError, r"unknown field\(s\) \['attn_logit_softcapping'\]"),
        ({"model_type": "mistral"}, UnsupportedConfigError, "model_type 'mistral'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}, ConfigError, "both"),
        ({"rope_theta": None}, ConfigError, "rope_theta"),
    ],
)
def test_hf_config_rejects(change, error, match):
    with pytest.raises(error, match=match):
        from_hf_config({**HF_1B, **change})


def test_hf_mllama_config_written_by_transformers(tmp_path):
    from transformers import MllamaConfig

    hf = MllamaConfig()
    hf.vision_config.image_size = 560  # the class default is 448; published configs use 560
    hf.text_config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf.save_pretrained(tmp_path)
    got = from_hf_config(tmp_path, name=LLAMA_3_2_11B_VISION.name)
    assert got == LLAMA_3_2_11B_VISION
    assert got.text.hf_cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert got.text.meta_fusion_schedule == (3, 7, 11, 15, 19, 23, 27, 31)

    data = json.loads((tmp_path / "config.json").read_text())
    data["text_config"]["cross_attention_layers"] = [3, 8, 13, 18, 23, 28, 33, 37]
    with pytest.raises(UnsupportedConfigError, match="fusion schedule"):
        from_hf_config(data)


def test_90b_schedules():
    t = LLAMA_3_2_90B_VISION.text
    assert t.hf_cross_attention_layers == tuple(range(3, 100, 5))
    assert t.meta_fusion_schedule == tuple(range(3, 80, 4))


def test_named_constants_and_lookup():
    assert get_config("llama-3.2-1b") is LLAMA_3_2_1B
    with pytest.raises(ConfigError, match="unknown model name"):
        get_config("llama-4")
    assert configs.LLAMA_GUARD_3_1B.text.tie_embeddings is False
    assert configs.LLAMA_3_2_1B.text.tie_embeddings and configs.LLAMA_3_2_3B.text.tie_embeddings
    assert configs.LLAMA_3_2_11B_VISION.vision.output_dim == 7680
    assert configs.LLAMA_3_2_11B_VISION.vision.tokens_per_tile == 1601
    for cfg in configs.CONFIGS.values():
        with pytest.raises(AttributeError):
            cfg.name = "x"  # frozen


def test_json_form_round_trips_every_named_config():
    from llama32_jax.configs.readers import config_from_dict, config_to_dict

    for cfg in [*configs.CONFIGS.values(), configs.TINY_TEXT.replace(scan_layers=True)]:
        data = json.loads(json.dumps(config_to_dict(cfg)))
        assert config_from_dict(data) == cfg
    data = config_to_dict(configs.LLAMA_3_2_1B)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['sliding_window'\]"):
        config_from_dict({**data, "text": {**data["text"], "sliding_window": 4096}})
    with pytest.raises(ConfigError, match=r"rope_scaling: missing field\(s\) \['factor', 'high_freq_factor'"):
        config_from_dict({**data, "text": {**data["text"], "rope_scaling": {"low_freq_factor": 1.0}}})
    with pytest.raises(ConfigError, match="n_heads"):
        config_from_dict({**data, "text": {**data["text"], "n_heads": 7}})
