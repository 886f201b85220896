"""Reader of HF ``config.json`` for ``llama`` and ``mllama`` (the rules are in ``llama32_jax.configs.readers``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llama32_jax.configs.base import (
    ALL_ASPECT_RATIOS_4,
    NUM_IMAGE_EMBEDDINGS,
    ModelConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
)
from llama32_jax.configs.files import (
    HF_EXPECTED,
    NUM,
    FieldReader,
    check_not_quantized,
    is_ignorable_key,
    load_config_json,
    not_a_model_config,
)
from llama32_jax.errors import ConfigError, UnsupportedConfigError

__all__ = ["from_hf_config"]

_ABSENT = object()  # "no default, but null is not accepted either"
_NO_DROPOUT = ((0, 0.0), "dropout is not implemented, so training would silently not apply it")
# Fields whose transformers meaning we honour only at these values: (allowed, why).
_TEXT_MUST_BE: dict[str, tuple[tuple[Any, ...], str]] = {
    "attention_bias": ((False,), "the attention projections here have no bias"),
    "mlp_bias": ((False,), "the MLP projections here have no bias"),
    "hidden_act": (("silu", "swish"), "the Llama MLP is SwiGLU; transformers' 'swish' is the same SiLU"),
    "attention_dropout": _NO_DROPOUT,
    "dropout": _NO_DROPOUT,
    "rope_interleaved": (
        (False,),
        "nanotron's flag for GPT-J-style interleaved rotary pairs; HF Llama and llama32_jax rotate the two halves "
        "of each head, and transformers ignores the flag, so a checkpoint that sets it is ambiguous",
    ),
    "pruned_heads": (({}, None), "pruned attention heads are not supported"),
    "sliding_window": ((None,), "attention here is full causal attention, not a sliding window"),
    "use_sliding_window": ((False,), "attention here is full causal attention, not a sliding window"),
    "partial_rotary_factor": ((None, 1, 1.0), "RoPE rotates the whole head here"),
    "per_layer_config": (({}, None), "per-layer overrides are not supported"),
}
_VISION_MUST_BE = {k: _TEXT_MUST_BE[k] for k in ("pruned_heads", "per_layer_config", "attention_dropout", "dropout")}
_OTHER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")

# transformers' defaults for absent fields: LlamaConfig / MllamaTextConfig (kv None: = num_attention_heads).
_LLAMA_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "kv": None}
_MLLAMA_TEXT_DEFAULTS = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "kv": 8}
_MLLAMA_CROSS_ATTENTION_LAYERS = [3, 8, 13, 18, 23, 28, 33, 38]
_MLLAMA_IMAGE_TOKEN_INDEX = 128256
_MLLAMA_INTERMEDIATE_LAYERS = [3, 7, 15, 23, 30]


def _hf_common(f: FieldReader, must_be: Mapping[str, tuple[tuple[Any, ...], str]]) -> None:
    """Checks shared by every HF (sub-)config, then drop the fields that cannot change the computation."""
    arch = f.take("architectures", list, default=None) or []
    heads = [a for a in arch if isinstance(a, str) and a.endswith(_OTHER_HEADS)]
    if heads:
        raise UnsupportedConfigError(
            f"{f.where}: architectures={arch} names a {heads[0]} model; supported: a causal language model "
            "(LlamaForCausalLM, MllamaForConditionalGeneration)"
        )
    for key, (allowed, why) in must_be.items():
        f.expect(key, allowed, why)
    layer_types = f.take("layer_types", list, default=None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(
            f"{f.where}: layer_types={sorted(set(map(str, layer_types)))} is not supported; every layer here is "
            "'full_attention'"
        )
    f.drop_where(is_ignorable_key)


def _hf_rope(f: FieldReader, default_theta: float, max_pos: int) -> tuple[float, RopeScaling | None]:
    """RoPE from legacy ``rope_theta`` + ``rope_scaling`` or 5.x ``rope_parameters``, as transformers merges them."""
    params = f.take("rope_parameters", dict, default=None)
    scaling = f.take("rope_scaling", dict, default=None)
    theta = f.take("rope_theta", NUM, default=_ABSENT)
    if params is not None and scaling is not None and params != scaling:
        raise ConfigError(f"{f.where}: both 'rope_parameters' and 'rope_scaling' are set and differ; expected one")
    section = "rope_parameters" if params is not None else "rope_scaling"
    rp = FieldReader(params if params is not None else (scaling or {}), f"{f.where} {section}")
    theta_in_params = rp.take("rope_theta", NUM, default=None)
    if theta is not _ABSENT and theta_in_params is not None and float(theta) != float(theta_in_params):
        raise ConfigError(f"{f.where}: rope_theta {theta} disagrees with {section}.rope_theta {theta_in_params}")
    # transformers' priority: the rope dict, then the top-level field, then the class default.
    theta = theta_in_params if theta_in_params is not None else (default_theta if theta is _ABSENT else theta)
    rope_type = rp.take("rope_type", str, default=None)
    legacy_type = rp.take("type", str, default=None)
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ConfigError(f"{rp.where}: rope_type {rope_type!r} and type {legacy_type!r} disagree")
    rope_type = rope_type or legacy_type or "default"
    rp.expect("partial_rotary_factor", _TEXT_MUST_BE["partial_rotary_factor"][0], "RoPE rotates the whole head here")
    if rope_type == "default":
        rp.finish()
        return float(theta), None
    if rope_type != "llama3":
        factor = rp.data.get("factor")
        raise UnsupportedConfigError(
            f"{rp.where}: rope_type {rope_type!r}"
            + (f" (factor {factor})" if factor is not None else "")
            + " is not supported; supported: 'default' (no scaling), 'llama3'"
        )
    out = RopeScaling(
        factor=float(rp.take("factor", NUM)),
        low_freq_factor=float(rp.take("low_freq_factor", NUM)),
        high_freq_factor=float(rp.take("high_freq_factor", NUM)),
        # transformers 5.x: absent means max_position_embeddings
        original_max_position_embeddings=rp.take("original_max_position_embeddings", int, default=max_pos),
    )
    rp.finish()
    return float(theta), out


def _hf_text(f: FieldReader, *, mllama: bool) -> TextConfig:
    where = f.where
    defaults = _MLLAMA_TEXT_DEFAULTS if mllama else _LLAMA_DEFAULTS
    vocab = f.take("vocab_size", int)
    dim = f.take("hidden_size", int)
    n_total = f.take("num_hidden_layers", int)
    n_heads = f.take("num_attention_heads", int)
    n_kv = f.take("num_key_value_heads", int, default=None)
    if n_kv is None:  # absent / null: LlamaConfig means multi-head attention, MllamaTextConfig means 8
        n_kv = n_heads if defaults["kv"] is None else defaults["kv"]
    head_dim = f.take("head_dim", int, default=None)
    if dim % n_heads and (head_dim is None or mllama):
        raise ConfigError(f"{where}: hidden_size ({dim}) must be a multiple of num_attention_heads ({n_heads})")
    if mllama and head_dim not in (None, dim // n_heads):
        raise UnsupportedConfigError(
            f"{where}: head_dim={head_dim} is not supported: transformers' Mllama ignores it and uses hidden_size / "
            f"num_attention_heads = {dim // n_heads}"
        )
    head_dim = dim // n_heads if head_dim is None else head_dim  # transformers' default
    ffn = f.take("intermediate_size", int)
    eps = float(f.take("rms_norm_eps", NUM, default=defaults["rms_norm_eps"]))
    max_pos = f.take("max_position_embeddings", int, default=defaults["max_position_embeddings"])
    theta, scaling = _hf_rope(f, defaults["rope_theta"], max_pos)
    tie = f.take("tie_word_embeddings", bool, default=False)  # the Llama/Mllama config classes default to False
    n_xattn = 0
    if mllama:
        xattn = f.take("cross_attention_layers", list, default=None) or _MLLAMA_CROSS_ATTENTION_LAYERS
        n_xattn = len(xattn)
        n_self = n_total - n_xattn
        # The uniform schedule of n_self self-attention layers and n_xattn cross blocks, as HF numbers it.
        uniform = n_xattn > 0 and n_self > 0 and n_self % n_xattn == 0
        every = n_self // n_xattn if uniform else 0
        if not uniform or tuple(xattn) != tuple(range(every - 1, n_total, every + 1)):
            raise UnsupportedConfigError(
                f"{where}: cross_attention_layers={xattn} with num_hidden_layers={n_total} is not the uniform "
                "Llama 3.2 Vision fusion schedule [self x (k-1), cross, self] (e.g. 11B: [3, 8, ..., 38])"
            )
        n_total = n_self
    _hf_common(f, _TEXT_MUST_BE)
    return TextConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_total,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=ffn,
        norm_eps=eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=tie,
        max_position_embeddings=max_pos,
        n_cross_attention_layers=n_xattn,
        n_image_embeddings=NUM_IMAGE_EMBEDDINGS if mllama else 0,
    )


def _square(f: FieldReader, key: str) -> int:
    """An image / patch size: an int, or [n, n] (transformers 5.x also accepts a pair)."""
    value = f.take(key, (int, list))
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1] or not all(isinstance(v, int) for v in value):
            raise UnsupportedConfigError(f"{f.where}: {key}={value} is not supported; supported: a square size")
        value = value[0]
    return value


def _alias(f: FieldReader, key: str, alias: str, default: Any = ...) -> Any:
    """A field transformers also reads under another name (its attribute_map)."""
    a, b = f.take(key, int, default=None), f.take(alias, int, default=None)
    if a is not None and b is not None and a != b:
        raise ConfigError(f"{f.where}: {key}={a} and {alias}={b} name the same field and disagree")
    value = a if a is not None else b
    if value is None:
        if default is ...:
            raise ConfigError(f"{f.where}: required field {key!r} is missing")
        return default
    return value


def _hf_vision(data: Mapping[str, Any], where: str) -> VisionConfig:
    f = FieldReader(data, f"{where} vision_config")
    f.expect("model_type", ("mllama_vision_model",), "only the Mllama vision encoder exists here")
    f.expect("hidden_act", ("gelu",), "the Mllama vision MLP uses exact (erf) GELU")
    cfg = VisionConfig(
        image_size=_square(f, "image_size"),
        patch_size=_square(f, "patch_size"),
        num_channels=f.take("num_channels", int, default=3),
        width=f.take("hidden_size", int),
        n_layers=f.take("num_hidden_layers", int),
        n_global_layers=f.take("num_global_layers", int),
        n_heads=_alias(f, "attention_heads", "num_attention_heads"),
        mlp_dim=f.take("intermediate_size", int),
        norm_eps=float(f.take("norm_eps", NUM, default=1e-5)),
        max_num_tiles=f.take("max_num_tiles", int),
        intermediate_layers=tuple(
            f.take("intermediate_layers_indices", list, default=None) or _MLLAMA_INTERMEDIATE_LAYERS
        ),
        supported_aspect_ratios=tuple(
            tuple(r) for r in (f.take("supported_aspect_ratios", list, default=None) or ALL_ASPECT_RATIOS_4)
        ),
    )
    out_dim = f.take("vision_output_dim", int, default=None)
    if out_dim is not None and out_dim != cfg.output_dim:
        raise ConfigError(
            f"{f.where}: vision_output_dim={out_dim} but hidden_size x (len(intermediate_layers_indices) + 1) = "
            f"{cfg.output_dim}"
        )
    f.take("tie_word_embeddings", bool, default=None)  # a generic attribute: the encoder has no word embeddings
    _hf_common(f, _VISION_MUST_BE)
    f.finish()
    return cfg


def from_hf_config(
    source: str | os.PathLike | Mapping[str, Any], *, name: str = "hf", scan_layers: bool = False
) -> ModelConfig:
    """Read an HF ``config.json`` (a file, an HF model directory, or the parsed dict) for ``llama`` or ``mllama``.

    See the module docstring for what is read, ignored, defaulted and refused; every refusal is a typed
    :class:`~llama32_jax.errors.ConfigError` subclass naming the file and the field.
    """
    data, where, path = load_config_json(source, "config.json", HF_EXPECTED)
    check_not_quantized(data, where, path)
    not_a_model_config(
        data,
        where,
        HF_EXPECTED,
        "dim" in data and "model_type" not in data and "hidden_size" not in data,
        "Meta's params.json (read it with from_params_json)",
    )
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: required field 'model_type' is missing; supported: 'llama', 'mllama'")
    f = FieldReader(data, where)
    f.drop(("model_type", "quantization_config"))  # a quantization_config left here is gguf's (float tensors)
    if model_type == "llama":
        text = _hf_text(f, mllama=False)
        f.finish()
        return ModelConfig(name=name, text=text, scan_layers=scan_layers)
    if model_type == "mllama":
        text_data = f.take("text_config", dict)
        vision_data = f.take("vision_config", dict)
        image_token = _alias(f, "image_token_index", "image_token_id", _MLLAMA_IMAGE_TOKEN_INDEX)
        top_tie = f.take("tie_word_embeddings", bool, default=False)
        _hf_common(f, {})
        f.finish()
        tf = FieldReader(text_data, f"{where} text_config")
        tf.expect("model_type", ("mllama_text_model",), "expected the Mllama text model")
        text = _hf_text(tf, mllama=True)
        tf.finish()
        if top_tie or text.tie_embeddings:
            raise UnsupportedConfigError(
                f"{where}: tie_word_embeddings=true for mllama; the vision models have an untied output layer"
            )
        return ModelConfig(
            name=name,
            text=text,
            vision=_hf_vision(vision_data, where),
            scan_layers=scan_layers,
            image_token_id=image_token,
        )
    raise UnsupportedConfigError(f"{where}: model_type {model_type!r} is not supported; supported: 'llama', 'mllama'")
