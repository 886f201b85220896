"""What a configuration file is, before anything is read from it; and which checkpoints are quantized.

:func:`load_config_json` turns a path, a directory or a parsed dict into a JSON object, and refuses with
:class:`~llama32_jax.errors.NotAModelConfigError` (naming the file and saying what it looks like) anything that is
not one: a missing or empty file, a Git LFS pointer left by a checkout without ``git lfs pull``, a binary file
(GGUF, safetensors, a PyTorch pickle or zip), text that is not JSON, a JSON array.
:func:`non_model_config_kind` recognises the JSON objects that sit beside a model config and are something else
(generation config, tokenizer config, chat template, AutoGPTQ ``quantize_config.json``, PEFT adapter config, ...).

:func:`check_not_quantized` refuses a quantized checkpoint with
:class:`~llama32_jax.errors.QuantizedCheckpointError`, which says which method and how many bits, and how to get a
float checkpoint instead. It runs before any other field is read, so a GPTQ config that also lacks ``rope_theta``
is refused for being quantized. ``quant_method: gguf`` is not a refusal: transformers writes that section when it
saves a model it loaded (and dequantized) from a GGUF file, and the saved tensors are float; the safetensors reader
still checks every tensor's dtype (``llama32_jax.checkpoint.hf``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from llama32_jax.errors import (
    ConfigError,
    NotAModelConfigError,
    QuantizedCheckpointError,
    UnsupportedConfigError,
)

__all__ = [
    "GENERATION_KEYS",
    "GENERIC_CONFIG_KEYS",
    "HARMLESS_KEYS",
    "HF_EXPECTED",
    "META_EXPECTED",
    "NUM",
    "FieldReader",
    "check_not_quantized",
    "is_ignorable_key",
    "load_config_json",
    "non_model_config_kind",
    "not_a_model_config",
    "sibling_quantization_files",
]

_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_MAX_CONFIG_BYTES = 16 * 2**20  # never read a weights file given by mistake into memory

# Every attribute of transformers' GenerationConfig (4.x and 5.x): sampling defaults and token ids, which a
# model config.json may also carry (old transformers wrote them there) and a generation_config.json holds alone.
GENERATION_KEYS = (
    "_from_model_config",
    "assistant_confidence_threshold",
    "assistant_early_exit",
    "assistant_ensemble_weight",
    "assistant_lookbehind",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "cache_config",
    "cache_implementation",
    "compile_config",
    "constraints",
    "continuous_batching_config",
    "decoder_start_token_id",
    "disable_compile",
    "diversity_penalty",
    "do_sample",
    "dola_layers",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "eos_token_id",
    "epsilon_cutoff",
    "eta_cutoff",
    "exponential_decay_length_penalty",
    "force_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "guidance_scale",
    "is_assistant",
    "length_penalty",
    "low_memory",
    "max_cache_len",
    "max_length",
    "max_matching_ngram_size",
    "max_new_tokens",
    "max_time",
    "min_length",
    "min_new_tokens",
    "min_p",
    "no_repeat_ngram_size",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_logits",
    "output_scores",
    "pad_token_id",
    "penalty_alpha",
    "prefill_chunk_size",
    "prompt_lookup_num_tokens",
    "remove_invalid_values",
    "renormalize_logits",
    "repetition_penalty",
    "return_dict_in_generate",
    "sequence_bias",
    "speculation_type",
    "stop_strings",
    "suppress_tokens",
    "target_lookbehind",
    "temperature",
    "token_healing",
    "top_h",
    "top_k",
    "top_p",
    "transformers_version",
    "typical_p",
    "use_cache",
    "use_mtp",
    "watermarking_config",
)

# Fields by which a JSON object is (the start of) a model config: HF, Meta params.json, or ours.
_HF_MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "text_config")
_META_MODEL_KEYS = ("dim", "n_layers", "n_heads")
_TOKENIZER_KEYS = (
    "tokenizer_class",
    "added_tokens_decoder",
    "model_max_length",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "clean_up_tokenization_spaces",
)


def _describe_binary(head: bytes) -> str | None:
    if head.startswith(b"GGUF"):
        return "a GGUF model file (load it with lj.load(path_to_the_gguf_file))"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pth / .bin checkpoint?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch checkpoint?)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors weights file"
    return None


def load_config_json(
    source: str | os.PathLike | Mapping[str, Any], filename: str, expected: str
) -> tuple[dict[str, Any], str, str | None]:
    """``(data, where, path)``: the JSON object in ``source`` (a file, a directory holding ``filename``, or a dict).

    ``where`` names the input in messages (the path, or ``filename`` for a dict); ``path`` is the file read, or
    None for a dict. ``expected`` says in messages what the file should have been.
    """
    if isinstance(source, Mapping):
        return dict(source), filename, None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"expected a path to {filename}, a directory holding it, or its parsed dict; got {type(source).__name__}"
        )
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise ConfigError(f"{filename} not found at {path!r}")
    where = path
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
            binary = _describe_binary(head[:16])
            if binary is None and size > _MAX_CONFIG_BYTES:
                binary = f"{size} bytes long (a config is a few kilobytes; a weights file?)"
            raw = head if binary is not None else head + f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path!r}: {e}") from e
    if binary is not None:
        raise NotAModelConfigError(f"{where} is {binary}, not a JSON config; expected {expected}")
    if not raw.strip():
        raise NotAModelConfigError(f"{where} is empty; expected {expected}")
    if raw.startswith(_LFS_POINTER):
        size = re.search(rb"^size (\d+)", raw, re.MULTILINE)
        raise NotAModelConfigError(
            f"{where} is a Git LFS pointer, not the file itself"
            + (f" (the real file has {int(size.group(1))} bytes)" if size else "")
            + "; fetch the content with `git lfs pull` (or download the file) and try again; expected "
            + expected
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NotAModelConfigError(f"{where} is not UTF-8 text (a binary file?): {e}; expected {expected}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NotAModelConfigError(f"cannot read {where} as JSON ({e}); expected {expected}") from e
    if not isinstance(data, dict):
        raise NotAModelConfigError(f"{where} holds a JSON {type(data).__name__}, not an object; expected {expected}")
    return data, where, path


def non_model_config_kind(data: Mapping[str, Any]) -> str | None:
    """What a JSON object is when it is not a model config of any kind we know; None when it may be one."""
    keys = set(data)
    if not keys:
        return "an empty JSON object"
    if any(k in keys for k in _HF_MODEL_KEYS + _META_MODEL_KEYS):
        return None
    if {"text", "name", "scan_layers"} <= keys:
        return "llama32_jax's own config (read it with llama32_jax.configs.readers.config_from_dict)"
    if "format" in keys and "config" in keys and "params" in keys:
        return "the manifest of a converted llama32_jax checkpoint (load its directory with lj.load)"
    if "weight_map" in keys:
        return "a safetensors index (model.safetensors.index.json)"
    if "peft_type" in keys or "lora_alpha" in keys:
        return (
            "a PEFT adapter config (adapter_config.json); merge the adapter into its base model "
            "(peft: model.merge_and_unload(), then save_pretrained) and load the merged model"
        )
    if keys <= {"chat_template"}:
        return "a chat template (chat_template.json)"
    if any(k in keys for k in _TOKENIZER_KEYS) or "chat_template" in keys:
        return "a tokenizer config (tokenizer_config.json / special_tokens_map.json)"
    if isinstance(data.get("model"), Mapping) and ("added_tokens" in keys or "pre_tokenizer" in keys):
        return "a tokenizer (tokenizer.json)"
    if "image_processor_type" in keys or "processor_class" in keys:
        return "an image processor config (preprocessor_config.json)"
    if "bits" in keys and ("group_size" in keys or "desc_act" in keys or "zero_point" in keys):
        return (
            f"a quantization config (AutoGPTQ / AutoAWQ quantize_config.json, {data.get('bits')}-bit): the directory "
            "holds a quantized checkpoint"
        )
    if "quant_method" in keys:
        method = data.get("quant_method")
        return f"a quantization config (quant_method {method!r}): the directory holds a quantized checkpoint"
    if keys <= set(GENERATION_KEYS):
        return "a generation config (generation_config.json: sampling defaults and special token ids)"
    return None


# --------------------------------------------------------------------------------------------------------------
# Quantized checkpoints.

_FLOAT_ADVICE = (
    "llama32_jax reads float (bf16 / fp16 / fp32) checkpoints only. Use the float model this one was made from{base}, "
    "or dequantize it with transformers where the method supports it (model = "
    "AutoModelForCausalLM.from_pretrained(dir); model = model.dequantize(); "
    "model.to(torch.bfloat16).save_pretrained(out)) -- for a QLoRA fine-tune, merge the adapter into the float base "
    "model instead -- and load the saved directory"
)


def _float_advice(data: Mapping[str, Any]) -> str:
    base = data.get("_name_or_path") or data.get("_model_name_or_path")
    hub_id = isinstance(base, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) is not None
    return _FLOAT_ADVICE.format(base=f" (per _name_or_path: {base!r})" if hub_id else "")


def _describe_quantization(q: Mapping[str, Any]) -> str:
    """``gptq, 4-bit, group size 128`` and the like, from a transformers quantization_config."""
    method = q.get("quant_method")
    if method is None and (q.get("load_in_8bit") or q.get("load_in_4bit")):
        method = "bitsandbytes"
    parts = [str(method) if method is not None else "unknown method"]
    bits = q.get("bits", q.get("w_bit", q.get("weight_bits")))
    if q.get("load_in_8bit"):
        bits = 8
    elif q.get("load_in_4bit"):
        bits = 4
        if q.get("bnb_4bit_quant_type"):
            parts.append(str(q["bnb_4bit_quant_type"]))
    if bits is None and isinstance(q.get("config_groups"), Mapping):  # compressed-tensors
        for group in q["config_groups"].values():
            weights = group.get("weights") if isinstance(group, Mapping) else None
            if isinstance(weights, Mapping) and weights.get("num_bits") is not None:
                bits = weights["num_bits"]
                if weights.get("type"):
                    parts.append(f"{weights['type']} weights")
                break
    if bits is not None:
        parts.insert(1, f"{bits}-bit")
    if q.get("group_size", q.get("q_group_size")) not in (None, -1):
        parts.append(f"group size {q.get('group_size', q.get('q_group_size'))}")
    return ", ".join(parts)


def sibling_quantization_files(path: str | None) -> list[str]:
    """Quantization configs that AutoGPTQ / AutoAWQ write beside config.json (empty for a dict source)."""
    if path is None:
        return []
    directory = os.path.dirname(os.path.abspath(path))
    names = ("quantize_config.json", "quant_config.json")
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]


def check_not_quantized(data: Mapping[str, Any], where: str, path: str | None) -> None:
    """Refuse an HF config (or its directory) that describes quantized weights; accept ``quant_method: gguf``."""
    for section in ("quantization_config", "compression_config"):
        for scope, d in (("", data), ("text_config.", data.get("text_config"))):
            q = d.get(section) if isinstance(d, Mapping) else None
            if q is None:
                continue
            if not isinstance(q, Mapping):
                raise ConfigError(f"{where}: field {scope + section!r} must be an object, got {q!r}")
            if section == "quantization_config" and q.get("quant_method") == "gguf":
                continue  # transformers' re-save of a model it dequantized from GGUF: the tensors are float
            what = _describe_quantization(q) if section == "quantization_config" else "compressed-tensors"
            raise QuantizedCheckpointError(
                f"{where}: {scope + section} says the checkpoint is quantized ({what}). {_float_advice(data)}. If "
                f"the weights are in fact float (e.g. a merged model saved with the section left in), delete "
                f"{section!r} from the config"
            )
    for sibling in sibling_quantization_files(path):
        if os.path.samefile(sibling, path):
            continue  # the file itself: non_model_config_kind says what it is
        try:
            with open(sibling, encoding="utf-8") as f:
                q = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            q = {}
        tool = "gptq (AutoGPTQ)" if os.path.basename(sibling) == "quantize_config.json" else "awq (AutoAWQ)"
        what = _describe_quantization({**q, "quant_method": tool} if isinstance(q, dict) else {"quant_method": tool})
        raise QuantizedCheckpointError(
            f"{where}: {os.path.basename(sibling)} beside it says the checkpoint is quantized ({what}). "
            f"{_float_advice(data)}"
        )


# --------------------------------------------------------------------------------------------------------------
# HF config.json fields that cannot change what the network computes (see the docstring of configs.readers).

# transformers' generic PretrainedConfig attributes (4.x wrote all of them into nested configs, 5.x a few),
# other than the ones the readers check (model_type, architectures, tie_word_embeddings, pruned_heads).
GENERIC_CONFIG_KEYS = (
    "add_cross_attention",
    "attn_implementation",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "dtype",
    "experts_implementation",
    "finetuning_task",
    "gradient_checkpointing",
    "id2label",
    "initializer_range",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "name_or_path",
    "num_labels",
    "output_attentions",
    "output_hidden_states",
    "prefix",
    "problem_type",
    "return_dict",
    "task_specific_params",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tokenizer_class",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "use_bfloat16",
)

# Flags of other tools that describe the same computation: nanotron's conversion marker, old tensor-parallel
# pretraining slices of the same matmuls, a Llama-1-era runtime length limit transformers never read, unsloth's
# bookkeeping.
HARMLESS_KEYS = ("is_llama_config", "pretraining_tp", "max_sequence_length", "unsloth_version", "unsloth_fixed")


def is_ignorable_key(key: str) -> bool:
    """A config.json key that cannot change the computation: generic transformers attributes, generation defaults,
    any ``*_token_id``, ``_``-prefixed bookkeeping, other libraries' dotted sections, harmless flags."""
    return (
        key.startswith("_")
        or key.endswith("_token_id")
        or "." in key
        or key in GENERIC_CONFIG_KEYS
        or key in GENERATION_KEYS
        or key in HARMLESS_KEYS
    )


# --------------------------------------------------------------------------------------------------------------
# Reading fields.

HF_EXPECTED = "an HF model config.json with model_type 'llama' or 'mllama'"
META_EXPECTED = "Meta's params.json (dim, n_layers, n_heads, vocab_size, rope_theta, ...)"
NUM = (int, float)


class FieldReader:
    """Pops fields off a config dict; whatever is left at the end is an unknown field and an error.

    ``error`` is the exception type raised (ConfigError for config files; the GGUF reader uses CheckpointError).
    Messages name fields as ``key_prefix + key``.
    """

    def __init__(self, data: Mapping[str, Any], where: str, error: type[Exception] = ConfigError, key_prefix: str = ""):
        self.data = dict(data)
        self.where = where
        self.error = error
        self.key_prefix = key_prefix  # shown before field names in messages (GGUF: "llama.")

    def take(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        """The field's value, checked against ``types``; absent: ``default`` (``...``: required). null is accepted
        only where ``default`` is None (HF writes null for "use the default" in those fields)."""
        if key not in self.data:
            if default is ...:
                raise self.error(f"{self.where}: required field {self.key_prefix + key!r} is missing")
            return default
        value = self.data.pop(key)
        if value is None and default is None:
            return None
        # bool is an int subclass: never accept it where a number is asked for.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise self.error(
                f"{self.where}: field {self.key_prefix + key!r} must be {_type_names(types)}, got {value!r}"
            )
        return value

    def expect(self, key: str, allowed: tuple[Any, ...], why: str) -> None:
        """An optional field this implementation supports only at the given value(s)."""
        if key in self.data:
            value = self.data.pop(key)
            if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
                raise UnsupportedConfigError(
                    f"{self.where}: field {self.key_prefix + key!r}={value!r} is not supported ({why}); "
                    f"supported: {list(allowed)}"
                )

    def drop(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self.data.pop(key, None)

    def drop_where(self, predicate: Callable[[str], bool]) -> None:
        for key in [k for k in self.data if predicate(k)]:
            del self.data[key]

    def finish(self) -> None:
        if self.data:
            raise self.error(
                f"{self.where}: unknown field(s) {sorted(self.key_prefix + k for k in self.data)}; refusing to guess "
                "what they mean (llama32_jax reads every field that describes the model and ignores only fields "
                "known not to change the computation)"
            )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def not_a_model_config(data: Mapping[str, Any], where: str, expected: str, other_format: bool, hint: str) -> None:
    """NotAModelConfigError when ``data`` is something else: another kind of file, or (``other_format``) the other
    format's model config, described by ``hint``."""
    kind = non_model_config_kind(data)
    if kind is None and other_format:
        kind = hint
    if kind is not None:
        raise NotAModelConfigError(f"{where} is {kind}, not a model config; expected {expected}")
