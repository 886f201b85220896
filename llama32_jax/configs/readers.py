"""Readers of checkpoint configurations: Meta ``params.json`` and HF ``config.json`` (llama, mllama).

What a reader does with each field of a file -- one rule for all of them:

* **Quantized checkpoints are refused first**, before any other field is looked at, with
  :class:`~llama32_jax.errors.QuantizedCheckpointError` naming the method and bits and saying how to get a float
  checkpoint (HF ``quantization_config`` / ``compression_config``, an AutoGPTQ/AutoAWQ ``quantize_config.json``
  beside ``config.json``, Meta ``quantization_args`` / ``lora_args``). ``quant_method: gguf`` is read: transformers
  writes it when it saves a model it dequantized from a GGUF file, and the tensors are float (the safetensors
  reader checks every tensor's dtype anyway).
* **A file that is not a model config** (generation or tokenizer config, chat template, quantize_config.json, a
  Git LFS pointer, an empty, binary or non-JSON file, a JSON array, the other format's config) is a
  :class:`~llama32_jax.errors.NotAModelConfigError` naming the file and saying what it looks like.
* **Fields that cannot change the computation are ignored**: transformers' generic ``PretrainedConfig``
  attributes (``bad_words_ids``, ``torchscript``, ``id2label``, ``dtype`` ...), generation defaults
  (``max_length``, ``temperature`` ...), any ``*_token_id``, ``_``-prefixed bookkeeping (``_name_or_path``,
  ``_model_name_or_path``), other libraries' dotted sections (``transformers.js_config``) and flags that describe
  the same math (``use_cache``, ``is_llama_config``, ``pretraining_tp``). Lists: ``llama32_jax.configs.files``.
* **Fields that describe the model are read**, and **an absent one gets the format's own default**: transformers'
  ``LlamaConfig`` / ``MllamaTextConfig`` / ``MllamaVisionConfig`` defaults for HF (``rope_theta`` 10000 for llama and
  500000 for mllama, ``num_key_value_heads`` = heads for llama and 8 for mllama, ``head_dim`` = hidden / heads,
  ``rms_norm_eps`` 1e-6 / 1e-5, ``max_position_embeddings`` 2048 / 131072, untied head, no RoPE scaling,
  ``original_max_position_embeddings`` = ``max_position_embeddings`` for 'llama3' RoPE); Meta's ``ModelArgs``
  defaults for ``params.json`` (``n_kv_heads`` = heads, ``multiple_of`` 256, ``norm_eps`` 1e-5, no scaled RoPE).
  Two exceptions, where a default would be a guess: the sizes that set the tensor shapes (vocab, hidden, FFN,
  layers, heads; the vision encoder's sizes) are required -- transformers always writes them, and its defaults are
  one particular model's sizes -- and so is Meta's ``rope_theta``, whose default differs between Meta's Llama 2
  (10000) and Llama 3 (500000) code.
* **A field whose value would not be honoured is refused, naming the field and the value and saying what is
  supported** (:class:`~llama32_jax.errors.UnsupportedConfigError`): biases, an activation other than SiLU,
  non-zero dropout, a RoPE type other than default / 'llama3', interleaved RoPE pairs, pruned heads, sliding
  windows, a classification head, a non-uniform cross-attention schedule, an extra params.json field (tt-metal's
  ``rope_scaling_factor``, executorch's ``intermediate_dim`` / ``fusion_interval`` / ``n_special_tokens``,
  torchchat's ``hidden_dim`` / ``rope_scaling``) that disagrees with what the standard fields compute.
* **Any other field is an unknown field and an error** (:class:`~llama32_jax.errors.ConfigError` naming it):
  it might change the computation (a logit scale or soft-capping, Llama 4's ``use_qk_norm`` ...), and guessing
  is never done.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from llama32_jax.configs.base import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_EMBEDDINGS,
    ModelConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    llama3_ffn_dim,
)
from llama32_jax.configs.files import META_EXPECTED, NUM, FieldReader, load_config_json, not_a_model_config
from llama32_jax.configs.hf import from_hf_config
from llama32_jax.errors import ConfigError, QuantizedCheckpointError, UnsupportedConfigError

__all__ = ["FieldReader", "config_from_dict", "config_to_dict", "from_hf_config", "from_params_json"]


def _is_llama32_small(dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> bool:
    """True for the Llama 3.2 1B / 3B text shapes (whose published HF configs use RoPE factor 32 and a tied head)."""
    return (dim, n_layers, n_heads, n_kv_heads) in {(2048, 16, 32, 8), (3072, 28, 24, 8)}


def _must_agree(where: str, field: str, value: Any, computed: Any, how: str) -> None:
    """An extra params.json field (another tool's) is honoured only when it says what the standard fields say."""
    if value is not None and value != computed:
        raise UnsupportedConfigError(
            f"{where}: field {field!r}={value!r} disagrees with {how} ({computed!r}); Meta's reference code ignores "
            f"{field!r} and computes {computed!r}, so the file is ambiguous and refused. If the weights really have "
            "this shape, pass an explicit ModelConfig (config=...) to the converter"
        )


def from_params_json(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    name: str = "meta",
    scan_layers: bool = False,
) -> ModelConfig:
    """Read Meta's ``params.json`` (a file, a checkpoint directory, or the parsed dict).

    Meta's Llama 3 file has no RoPE scaling factor (its reference code hard-codes 8). The factor is ``rope_factor``
    when given, else the file's ``rope_scaling_factor`` (a field Meta's Llama 4 ``ModelArgs`` defines and tt-metal's
    Llama 3 copies carry) or torchchat's ``rope_scaling.factor``; otherwise 32 for the Llama 3.2 1B/3B shapes (as
    their published HF configs say) and Meta's reference 8 for any other model. ``tie_embeddings`` likewise
    defaults to the published fact for the shape (1B/3B tied); the checkpoint converter verifies it against the
    tensors. Fields other tools add (executorch's ``intermediate_dim`` / ``fusion_interval`` /
    ``n_special_tokens``, torchchat's ``hidden_dim`` / ``block_size`` / ``use_tiktoken`` / ``rope_scaling``) are
    read when they agree with what the standard fields compute and refused, naming the field, when they do not.
    """
    data, where, _ = load_config_json(source, "params.json", META_EXPECTED)
    for key, what in (
        ("quantization_args", "quantized weights (Meta's int4 / SpinQuant releases)"),
        ("lora_args", "Meta's QLoRA release (quantized weights with LoRA adapters)"),
    ):
        if key in data:
            raise QuantizedCheckpointError(
                f"{where}: {key!r} describes {what}; llama32_jax reads float checkpoints only: use the bf16 release "
                "of the same model (its original/ params.json has no quantization_args / lora_args)"
            )
    not_a_model_config(
        data,
        where,
        META_EXPECTED,
        "dim" not in data and any(k in data for k in ("model_type", "hidden_size", "num_hidden_layers")),
        "an HF config.json (read it with from_hf_config)",
    )
    f = FieldReader(data, where)
    dim = f.take("dim", int)
    n_layers = f.take("n_layers", int)
    n_heads = f.take("n_heads", int)
    n_kv_heads = f.take("n_kv_heads", int, default=None)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads  # Meta ModelArgs: None means no GQA
    vocab_size = f.take("vocab_size", int)
    if vocab_size <= 0:
        raise ConfigError(
            f"{where}: vocab_size={vocab_size} (Meta's Llama 2 files say -1: 'take it from the tokenizer'); "
            "a positive vocabulary size is required"
        )
    multiple_of = f.take("multiple_of", int, default=256)  # Meta ModelArgs default
    ffn_mult = f.take("ffn_dim_multiplier", NUM, default=None)
    norm_eps = float(f.take("norm_eps", NUM, default=1e-5))  # Meta ModelArgs default
    # Required: Meta's Llama 2 code used 10000 and its Llama 3 ModelArgs defaults to 500000.
    rope_theta = float(f.take("rope_theta", NUM))
    use_scaled = f.take("use_scaled_rope", bool, default=None)
    f.take("max_seq_len", int, default=None)  # a runtime cache size in Meta's code, not a model fact
    f.take("max_batch_size", int, default=None)  # likewise runtime-only
    f.take("block_size", int, default=None)  # torchchat's name for the runtime sequence limit
    f.take("use_tiktoken", bool, default=None)  # torchchat: which tokenizer library, not the network
    chunk = f.take("vision_chunk_size", int, default=-1)
    max_chunks = f.take("vision_max_num_chunks", int, default=4)
    n_xattn = f.take("vision_num_cross_attention_layers", int, default=-1)
    vision_model = f.take("vision_model", dict, default=None)
    if vision_model is not None:
        vm = FieldReader(vision_model, f"{where} vision_model")
        adapter = FieldReader(vm.take("cross_attention_adapter", dict), f"{where} vision_model.cross_attention_adapter")
        n_xattn = adapter.take("num_layers", int)
        adapter.finish()
        vm.finish()

    # RoPE scaling: use_scaled_rope (Meta), rope_scaling_factor (Meta's Llama 4 ModelArgs, tt-metal), rope_scaling
    # (torchchat: the full 'llama3' parameters).
    file_factor = f.take("rope_scaling_factor", NUM, default=None)
    torchchat = f.take("rope_scaling", dict, default=None)
    scaling_fields = RopeScaling(factor=1.0)
    if torchchat is not None:
        rs = FieldReader(torchchat, f"{where} rope_scaling")
        kind = rs.take("rope_type", str, default=None) or rs.take("type", str, default=None) or "llama3"
        if kind != "llama3":
            raise UnsupportedConfigError(
                f"{where}: rope_scaling rope_type {kind!r} is not supported; supported: 'llama3' (or none)"
            )
        scaling_fields = RopeScaling(
            factor=float(rs.take("factor", NUM)),
            low_freq_factor=float(rs.take("low_freq_factor", NUM)),
            high_freq_factor=float(rs.take("high_freq_factor", NUM)),
            original_max_position_embeddings=rs.take("original_max_position_embeddings", int),
        )
        rs.finish()
        _must_agree(where, "rope_scaling_factor", file_factor, scaling_fields.factor, "rope_scaling.factor")
        file_factor = scaling_fields.factor
    if use_scaled is None:
        use_scaled = torchchat is not None
    elif not use_scaled and (torchchat is not None or file_factor is not None):
        raise ConfigError(
            f"{where}: use_scaled_rope=false but {'rope_scaling' if torchchat is not None else 'rope_scaling_factor'} "
            "gives a RoPE scaling factor; Meta's code would not scale, so the file contradicts itself"
        )
    if use_scaled:
        if rope_factor is not None and file_factor is not None and float(rope_factor) != float(file_factor):
            raise ConfigError(
                f"rope_factor={rope_factor} was given but {where} says rope_scaling_factor={file_factor}; "
                "pass the same value or none"
            )
        factor = rope_factor if rope_factor is not None else file_factor
        if factor is None:
            factor = 32.0 if _is_llama32_small(dim, n_layers, n_heads, n_kv_heads) else 8.0
        scaling = dataclasses.replace(scaling_fields, factor=float(factor))
    else:
        if rope_factor is not None:
            raise ConfigError(
                f"rope_factor was given but {where} has use_scaled_rope=false (or absent): no RoPE scaling"
            )
        scaling = None
    if dim % n_heads:
        raise ConfigError(f"{where}: dim ({dim}) must be a multiple of n_heads ({n_heads})")
    if tie_embeddings is None:
        tie_embeddings = _is_llama32_small(dim, n_layers, n_heads, n_kv_heads)
    is_vision = chunk > 0 or n_xattn > 0
    if is_vision and not (chunk > 0 and n_xattn > 0):
        raise ConfigError(
            f"{where}: a vision model needs both vision_chunk_size > 0 and vision_num_cross_attention_layers > 0, "
            f"got {chunk} and {n_xattn}"
        )
    ffn_dim = llama3_ffn_dim(dim, multiple_of, ffn_mult)
    arithmetic = "the FFN width from dim / multiple_of / ffn_dim_multiplier"
    _must_agree(where, "hidden_dim", f.take("hidden_dim", int, default=None), ffn_dim, arithmetic)  # torchchat
    _must_agree(where, "intermediate_dim", f.take("intermediate_dim", int, default=None), ffn_dim, arithmetic)
    interval = n_layers // n_xattn if is_vision else None
    # executorch (torchtune's builder): self-attention layers per fusion group, and the learnable image-token rows.
    _must_agree(
        where,
        "fusion_interval",
        f.take("fusion_interval", int, default=None),
        interval,
        "n_layers / vision_num_cross_attention_layers",
    )
    n_image = NUM_IMAGE_EMBEDDINGS if is_vision else 0
    _must_agree(
        where,
        "n_special_tokens",
        f.take("n_special_tokens", int, default=None),
        n_image,
        "the learnable image-token embedding rows of Meta's vision models",
    )
    f.finish()

    text = TextConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        ffn_dim=ffn_dim,
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=tie_embeddings,
        n_cross_attention_layers=n_xattn if is_vision else 0,
        n_image_embeddings=n_image,
    )
    vision = None
    if is_vision:
        # Meta's encoder is a hard-coded ViT-H/14; only the tile size and tile count come from params.json.
        ratios = tuple(
            (h, w) for h in range(1, max_chunks + 1) for w in range(1, max_chunks + 1) if h * w <= max_chunks
        )
        vision = VisionConfig(image_size=chunk, max_num_tiles=max_chunks, supported_aspect_ratios=ratios)
    return ModelConfig(
        name=name,
        text=text,
        vision=vision,
        scan_layers=scan_layers,
        image_token_id=IMAGE_TOKEN_ID if is_vision else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Our own JSON form (stored beside converted checkpoints): every dataclass field, nothing else.


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict (tuples become lists); :func:`config_from_dict` inverts it exactly."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _dataclass_from(cls: type, data: Any, where: str, nested: dict[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(data) - names), sorted(names - set(data))
    if unknown or missing:
        problems = [f"unknown field(s) {unknown}"] * bool(unknown) + [f"missing field(s) {missing}"] * bool(missing)
        raise ConfigError(f"{where}: {', '.join(problems)}")
    values = {}
    for key, value in data.items():
        if key in nested:
            values[key] = None if value is None else nested[key](value, f"{where}.{key}")
        elif isinstance(value, list):  # tuple fields (intermediate layers, aspect ratios)
            values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            values[key] = value
    return cls(**values)


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from :func:`config_to_dict`'s output; any unknown or missing field is an error."""

    def rope(d, where):
        return _dataclass_from(RopeScaling, d, where, {})

    def text(d, where):
        return _dataclass_from(TextConfig, d, where, {"rope_scaling": rope})

    def vision(d, where):
        return _dataclass_from(VisionConfig, d, where, {})

    return _dataclass_from(ModelConfig, data, "config", {"text": text, "vision": vision})
