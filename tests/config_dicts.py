"""Config files as real checkpoints carry them, written out as dicts for the config reader tests (nothing here is
read from outside the repository): HF config.json variants (transformers 4.30-5.25, fine-tunes, quantized ones),
Meta params.json variants (Meta's own and copies other tools extended) and the files that sit beside them."""

from __future__ import annotations

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


# Meta params.json (Meta's own files)
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


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:bfb7b232a0a0f56bdf8599be6b7a54e0df9baa06d8a972170ebd741030e153ce\n"
    "size 1558\n"
)
TOKENIZER_CONFIG = {
    "added_tokens_decoder": {"128000": {"content": "<|begin_of_text|>", "special": True}},
    "bos_token": "<|begin_of_text|>",
    "clean_up_tokenization_spaces": True,
    "eos_token": "<|eot_id|>",
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": 131072,
    "tokenizer_class": "PreTrainedTokenizerFast",
}
GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.45.0.dev0",
}
GPTQ_QUANTIZE_CONFIG = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.01,
    "desc_act": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}
