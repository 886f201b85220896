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

LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

# Llama-3.2-1B's config.json as Meta published it (transformers 4.45).
HF_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
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
    "rope_scaling": {**LLAMA3_ROPE, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Every generic PretrainedConfig attribute, as transformers 4.45 wrote it into each nested mllama config.
GENERIC_445 = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": "bfloat16",
    "torchscript": False,
    "typical_p": 1.0,
    "use_bfloat16": False,
}


def mllama_445(*, dim, layers, heads, kv, ffn, xattn, vocab, vision, image_token, rope_factor=8.0) -> dict:
    """An mllama config.json exactly as transformers 4.45 wrote Meta's Llama-3.2-*-Vision-Instruct ones."""
    text = {
        **GENERIC_445,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "cross_attention_layers": xattn,
        "dropout": 0,
        "hidden_act": "silu",
        "hidden_size": dim,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": 131072,
        "model_type": "mllama_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {**LLAMA3_ROPE, "factor": rope_factor, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }
    vision = {
        **GENERIC_445,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "hidden_act": "gelu",
        "model_type": "mllama_vision_model",
        "norm_eps": 1e-05,
        "num_channels": 3,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "tie_word_embeddings": True,
        **vision,
    }
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": image_token,
        "model_type": "mllama",
        "text_config": text,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "vision_config": vision,
    }


VIT_H = {
    "attention_heads": 16,
    "hidden_size": 1280,
    "image_size": 560,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
    "intermediate_size": 5120,
    "max_num_tiles": 4,
    "num_global_layers": 8,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "vision_output_dim": 7680,
}
MLLAMA_11B = mllama_445(
    dim=4096, layers=40, heads=32, kv=8, ffn=14336, xattn=list(range(3, 40, 5)), vocab=128256, vision=VIT_H,
    image_token=128256,
)  # fmt: skip
MLLAMA_90B = mllama_445(
    dim=8192, layers=100, heads=64, kv=8, ffn=28672, xattn=list(range(3, 100, 5)), vocab=128256, vision=VIT_H,
    image_token=128256,
)  # fmt: skip
TINY_VIT = {
    "attention_heads": 2,
    "hidden_size": 32,
    "image_size": 28,
    "intermediate_layers_indices": [1, 3],
    "intermediate_size": 64,
    "max_num_tiles": 4,
    "num_global_layers": 2,
    "num_hidden_layers": 4,
    "patch_size": 14,
    "vision_output_dim": 96,
}
MLLAMA_TINY = mllama_445(
    dim=64, layers=5, heads=4, kv=2, ffn=192, xattn=[3], vocab=512, vision=TINY_VIT, image_token=512
)  # fmt: skip

# transformers 5.25's config.json after AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) of SmolLM2-135M:
# the tensors it holds are float (dequantized), the quantization_config only records where they came from.
GGUF_RESAVE = {
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "quantization_config": {"dequantize": False, "gguf_file": "smollm2.gguf", "quant_method": "gguf"},
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "transformers_version": "5.25.0",
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}

SMOLLM2_135M = {k: GGUF_RESAVE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")} | {
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "model_type": "llama",
}
# LlamaConfig(...).to_dict() of SmolLM2-135M as dumped with transformers 4.57: generation defaults, id2label,
# nanotron's flags, every generic attribute.
SMOLLM2_TODICT = {
    **{k: v for k, v in GENERIC_445.items() if k not in ("torch_dtype",)},
    **SMOLLM2_135M,
    "initializer_range": 0.041666666666666664,
    "pretraining_tp": 1,
    "use_cache": True,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": 64,
    "dtype": "bfloat16",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 0,
    "pad_token_id": None,
    "eos_token_id": 0,
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M",
    "transformers_version": "4.57.3",
    "is_llama_config": True,
    "rope_interleaved": False,
}
# A fine-tune saved by transformers 5.11: rope_parameters only, nanotron flags, transformers.js' own section.
SMOLLM2_TF511 = {
    **{k: v for k, v in SMOLLM2_135M.items() if k != "rope_theta"},
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "bfloat16",
    "eos_token_id": 2,
    "head_dim": 64,
    "initializer_range": 0.041666666666666664,
    "is_llama_config": True,
    "mlp_bias": False,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rope_interleaved": False,
    "rope_parameters": {"rope_theta": 100000, "rope_type": "default"},
    "transformers.js_config": {"kv_cache_dtype": {"fp16": "float16", "q4f16": "float16"}},
    "transformers_version": "5.11.0",
    "use_cache": True,
}
# Llama 3 8B Instruct as first released (transformers 4.40): no head_dim / mlp_bias, rope_scaling null.
LLAMA3_8B_APR2024 = {
    k: v for k, v in HF_1B.items() if k not in ("head_dim", "mlp_bias", "rope_scaling", "tie_word_embeddings")
} | {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "num_hidden_layers": 32,
    "rope_scaling": None,
    "transformers_version": "4.40.0.dev0",
}
# A Llama-2-era config (transformers 4.30): no rope_theta, no attention_bias / head_dim, max_length 4096.
LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 13824,
    "max_length": 4096,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.30.2",
    "use_cache": True,
    "vocab_size": 32000,
}
MINIMAL = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}

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


BNB_8BIT = {
    "_load_in_4bit": False,
    "_load_in_8bit": True,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": False,
    "load_in_8bit": True,
    "quant_method": "bitsandbytes",
}
BNB_4BIT = {
    **BNB_8BIT,
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "load_in_4bit": True,
    "load_in_8bit": False,
}
GPTQ = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.01,
    "desc_act": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
}
AWQ = {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm", "zero_point": True}
COMPRESSED = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True}}},
}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

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
