"""HF config.json variants as real checkpoints carry them, built here as dicts: every accepted one is read with the
sizes transformers reads from the same dict (``AutoConfig.for_model``), every refused one gets a typed error naming
the field and the reason.

The dicts reproduce what the tools write: transformers 4.45's mllama configs (every generic PretrainedConfig field
in text_config / vision_config), a transformers 5.x re-save after loading a GGUF, a SmolLM2 ``to_dict()`` dump, a
nanotron-converted fine-tune, 5.x ``rope_parameters``, configs from before a field existed (no rope_theta /
num_key_value_heads / head_dim), and quantized (bitsandbytes, GPTQ, AWQ, compressed-tensors, fp8) or unsupported
(linear RoPE, biases, GELU) ones.
"""

from __future__ import annotations

import copy

import pytest

from experiments.check_config_corpus import diff, sizes_ours, sizes_transformers
from llama32_jax.configs import LLAMA_3_2_1B, LLAMA_3_2_11B_VISION, LLAMA_3_2_90B_VISION, TINY_VISION, from_hf_config
from llama32_jax.errors import ConfigError, QuantizedCheckpointError, UnsupportedConfigError
from tests.config_dicts import (
    AWQ,
    BNB_4BIT,
    BNB_8BIT,
    COMPRESSED,
    FP8,
    GGUF_RESAVE,
    GPTQ,
    HF_1B,
    LLAMA2_13B,
    LLAMA3_8B_APR2024,
    LLAMA3_ROPE,
    MINIMAL,
    MLLAMA_11B,
    MLLAMA_90B,
    MLLAMA_TINY,
    SMOLLM2_TF511,
    SMOLLM2_TODICT,
)

ACCEPTED = {
    "llama-3.2-1b": HF_1B,
    "llama-3.2-1b-tf5-rope-parameters": {
        **{k: v for k, v in HF_1B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
        "dtype": "bfloat16",
        "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0, "rope_type": "llama3"},
        "transformers_version": "5.0.0",
    },
    "llama-3.2-1b-legacy-type-key": {**HF_1B, "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}},
    "llama-3.2-1b-resaved": {**HF_1B, "_name_or_path": "meta-llama/Llama-3.2-1B", "torch_dtype": "float16"},
    "llama-3.2-1b-unsloth": {**HF_1B, "unsloth_version": "2024.11.7", "pad_token_id": 128004},
    "llama-3.2-1b-swish": {**HF_1B, "hidden_act": "swish"},
    "llama3-rope-without-original-context": {
        **HF_1B,
        "rope_scaling": {k: v for k, v in HF_1B["rope_scaling"].items() if k != "original_max_position_embeddings"},
    },
    "mllama-11b-tf4.45": MLLAMA_11B,
    "mllama-90b-tf4.45": MLLAMA_90B,
    "mllama-tiny-tf4.45": MLLAMA_TINY,
    "mllama-alias-image-token-id": {
        **{k: v for k, v in MLLAMA_TINY.items() if k != "image_token_index"},
        "image_token_id": 512,
    },
    "gguf-resave-tf5.25": GGUF_RESAVE,
    "smollm2-to-dict-tf4.57": SMOLLM2_TODICT,
    "smollm2-finetune-tf5.11": SMOLLM2_TF511,
    "llama3-8b-apr2024": LLAMA3_8B_APR2024,
    "llama2-13b-no-rope-theta": LLAMA2_13B,
    "minimal-defaults": MINIMAL,
    "null-kv-heads-and-head-dim": {**MINIMAL, "num_key_value_heads": None, "head_dim": None},
    "llama1-era": {**MINIMAL, "architectures": ["LLaMAForCausalLM"], "max_sequence_length": 2048, "pad_token_id": -1},
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_variant_reads_the_sizes_transformers_reads(name):
    data = copy.deepcopy(ACCEPTED[name])
    ours = sizes_ours(from_hf_config(data))
    theirs = sizes_transformers(copy.deepcopy(ACCEPTED[name]))
    assert diff(ours, theirs) == {}
    assert set(theirs) <= set(ours)


def test_official_mllama_configs_give_the_named_constants():
    for data, expected in ((MLLAMA_11B, LLAMA_3_2_11B_VISION), (MLLAMA_90B, LLAMA_3_2_90B_VISION)):
        assert from_hf_config(data, name=expected.name) == expected
    assert from_hf_config(MLLAMA_TINY, name=TINY_VISION.name) == TINY_VISION
    assert from_hf_config(HF_1B).text == LLAMA_3_2_1B.text


def test_absent_fields_get_transformers_defaults():
    t = from_hf_config(MINIMAL).text
    # LlamaConfig: rope_theta 10000, num_key_value_heads = heads, head_dim = hidden / heads, eps 1e-6, 2048, untied
    assert (t.rope_theta, t.rope_scaling, t.n_kv_heads, t.head_dim) == (10000.0, None, 4, 16)
    assert (t.norm_eps, t.max_position_embeddings, t.tie_embeddings) == (1e-6, 2048, False)
    assert from_hf_config(LLAMA2_13B).text.rope_theta == 10000.0
    rope = from_hf_config(ACCEPTED["llama3-rope-without-original-context"]).text.rope_scaling
    assert rope.original_max_position_embeddings == 131072  # transformers 5.x: max_position_embeddings
    # MllamaTextConfig's own defaults differ: rope_theta 500000, num_key_value_heads 8
    text = {k: v for k, v in MLLAMA_TINY["text_config"].items() if k not in ("rope_theta", "num_key_value_heads")}
    t = from_hf_config({**MLLAMA_TINY, "text_config": {**text, "num_attention_heads": 8}}).text
    assert (t.rope_theta, t.n_kv_heads) == (500000.0, 8)


def _mllama_text(**change) -> dict:
    return {**MLLAMA_TINY, "text_config": {**MLLAMA_TINY["text_config"], **change}}


def _mllama_vision(**change) -> dict:
    return {**MLLAMA_TINY, "vision_config": {**MLLAMA_TINY["vision_config"], **change}}


REFUSED = {
    # quantized: refused first, whatever else the config lacks (the GPTQ one has no rope_theta)
    "bnb-8bit": (
        {**HF_1B, "_name_or_path": "meta-llama/Llama-3.2-1B", "quantization_config": BNB_8BIT},
        QuantizedCheckpointError,
        r"quantization_config says the checkpoint is quantized \(bitsandbytes, 8-bit\).*float.*"
        r"per _name_or_path: 'meta-llama/Llama-3.2-1B'.*dequantize",
    ),
    "bnb-4bit-nf4": (
        {**HF_1B, "quantization_config": BNB_4BIT},
        QuantizedCheckpointError,
        r"bitsandbytes, 4-bit, nf4",
    ),
    "gptq-llama2-without-rope-theta": (
        {**LLAMA2_13B, "quantization_config": GPTQ},
        QuantizedCheckpointError,
        r"gptq, 4-bit, group size 128",
    ),
    "awq": ({**HF_1B, "quantization_config": AWQ}, QuantizedCheckpointError, r"awq, 4-bit, group size 128"),
    "compressed-tensors": (
        {**HF_1B, "quantization_config": COMPRESSED},
        QuantizedCheckpointError,
        r"compressed-tensors, 8-bit, int weights",
    ),
    "fp8": ({**HF_1B, "quantization_config": FP8}, QuantizedCheckpointError, r"\(fp8\)"),
    "compression-config": ({**HF_1B, "compression_config": COMPRESSED}, QuantizedCheckpointError, "compression_config"),
    "bnb-linear-rope": (
        {**HF_1B, "quantization_config": BNB_8BIT, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
        QuantizedCheckpointError,
        "bitsandbytes",
    ),
    "mllama-quantized-text": (_mllama_text(quantization_config=BNB_4BIT), QuantizedCheckpointError, "text_config"),
    "quantization-config-not-object": ({**HF_1B, "quantization_config": "int8"}, ConfigError, "must be an object"),
    # values we would not honour: refused naming the field, the value and what is supported
    "linear-rope": (
        {**HF_1B, "rope_scaling": {"factor": 8.0, "rope_type": "linear", "type": "linear"}},
        UnsupportedConfigError,
        r"rope_scaling: rope_type 'linear' \(factor 8.0\) is not supported; supported: 'default'",
    ),
    "dynamic-rope": (
        {**HF_1B, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        UnsupportedConfigError,
        "'dynamic'",
    ),
    "yarn-rope-5x": (
        {
            **HF_1B,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0},
            "rope_scaling": None,
        },
        UnsupportedConfigError,
        r"rope_parameters: rope_type 'yarn'",
    ),
    "partial-rotary": (
        {**HF_1B, "partial_rotary_factor": 0.5},
        UnsupportedConfigError,
        r"'partial_rotary_factor'=0.5 is not supported",
    ),
    "attention-bias": ({**HF_1B, "attention_bias": True}, UnsupportedConfigError, r"'attention_bias'=True"),
    "mlp-bias": ({**HF_1B, "mlp_bias": True}, UnsupportedConfigError, r"'mlp_bias'=True.*no bias"),
    "gelu": ({**HF_1B, "hidden_act": "gelu"}, UnsupportedConfigError, r"'hidden_act'='gelu'.*supported: \['silu'"),
    "dropout": ({**HF_1B, "attention_dropout": 0.1}, UnsupportedConfigError, r"'attention_dropout'=0.1"),
    "rope-interleaved": (
        {**SMOLLM2_TF511, "rope_interleaved": True},
        UnsupportedConfigError,
        r"'rope_interleaved'=True.*interleaved rotary pairs",
    ),
    "pruned-heads": ({**HF_1B, "pruned_heads": {"0": [1]}}, UnsupportedConfigError, "'pruned_heads'"),
    "sliding-window": ({**HF_1B, "layer_types": ["sliding_attention"] * 16}, UnsupportedConfigError, "layer_types"),
    "classification-head": (
        {**HF_1B, "architectures": ["LlamaForSequenceClassification"]},
        UnsupportedConfigError,
        "LlamaForSequenceClassification",
    ),
    "mistral": ({**HF_1B, "model_type": "mistral"}, UnsupportedConfigError, "model_type 'mistral'"),
    "no-model-type": ({k: v for k, v in HF_1B.items() if k != "model_type"}, ConfigError, "'model_type' is missing"),
    "no-hidden-size": ({k: v for k, v in HF_1B.items() if k != "hidden_size"}, ConfigError, "'hidden_size' is missing"),
    "unknown-field": ({**HF_1B, "logit_scale": 0.5}, ConfigError, r"unknown field\(s\) \['logit_scale'\]"),
    "mllama-head-dim": (_mllama_text(head_dim=32), UnsupportedConfigError, "head_dim=32.*Mllama ignores it"),
    "mllama-vision-tanh-gelu": (
        _mllama_vision(hidden_act="gelu_pytorch_tanh"),
        UnsupportedConfigError,
        r"vision_config: field 'hidden_act'='gelu_pytorch_tanh'",
    ),
    "mllama-vision-output-dim": (_mllama_vision(vision_output_dim=7680), ConfigError, "vision_output_dim=7680"),
    "mllama-image-token-aliases-disagree": (
        {**MLLAMA_TINY, "image_token_id": 7},
        ConfigError,
        "image_token_index=512 and image_token_id=7",
    ),
    "mllama-tied": (_mllama_text(tie_word_embeddings=True), UnsupportedConfigError, "untied output layer"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_variant_names_the_reason(name):
    data, error, match = REFUSED[name]
    with pytest.raises(error, match=match):
        from_hf_config(copy.deepcopy(data))
