"""Strict readers of checkpoint configurations: Meta ``params.json`` and HF ``config.json`` (llama, mllama).

An unknown field, or a field whose value this implementation would not honour, is a
:class:`~llama32_jax.errors.ConfigError` naming the field. Where a format itself defines the meaning of an absent
field (HF: no ``num_key_value_heads`` means multi-head attention), that meaning is applied and said in a comment;
nothing that changes the computation is ever guessed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from llama32_jax.configs import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_EMBEDDINGS,
    ModelConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    llama3_ffn_dim,
)
from llama32_jax.errors import ConfigError, UnsupportedConfigError

__all__ = ["FieldReader", "config_from_dict", "config_to_dict", "from_hf_config", "from_params_json"]


def _load_json(source: str | os.PathLike | Mapping[str, Any], filename: str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise ConfigError(f"{filename} not found at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path!r} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
    return data


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
            if value not in allowed:
                raise UnsupportedConfigError(
                    f"{self.where}: field {key!r}={value!r} is not supported ({why}); supported: {list(allowed)}"
                )

    def drop(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self.data.pop(key, None)

    def finish(self) -> None:
        if self.data:
            raise self.error(
                f"{self.where}: unknown field(s) {sorted(self.key_prefix + k for k in self.data)}; refusing to guess "
                "what they mean (llama32_jax reads every field it accepts)"
            )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


_NUM = (int, float)


def _is_llama32_small(dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> bool:
    """True for the Llama 3.2 1B / 3B text shapes (SPEC §1.1)."""
    return (dim, n_layers, n_heads, n_kv_heads) in {(2048, 16, 32, 8), (3072, 28, 24, 8)}


def from_params_json(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    rope_factor: float | None = None,
    tie_embeddings: bool | None = None,
    name: str = "meta",
    scan_layers: bool = False,
) -> ModelConfig:
    """Read Meta's ``params.json`` (a file, a checkpoint directory, or the parsed dict).

    Meta's file has no RoPE scaling factor and its reference code hard-codes 8 (SPEC §1.2). The factor is
    ``rope_factor`` when given; otherwise 32 for the Llama 3.2 1B/3B shapes and Meta's reference 8 for any other
    model. ``tie_embeddings`` likewise defaults to the published fact for the shape (1B/3B tied); the checkpoint
    converter verifies it against the tensors.
    """
    f = FieldReader(_load_json(source, "params.json"), "params.json")
    dim = f.take("dim", int)
    n_layers = f.take("n_layers", int)
    n_heads = f.take("n_heads", int)
    n_kv_heads = f.take("n_kv_heads", int, default=None)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads  # Meta ModelArgs: None means no GQA
    vocab_size = f.take("vocab_size", int)
    multiple_of = f.take("multiple_of", int)
    ffn_mult = f.take("ffn_dim_multiplier", _NUM, default=None)
    norm_eps = float(f.take("norm_eps", _NUM))
    rope_theta = float(f.take("rope_theta", _NUM))
    use_scaled = f.take("use_scaled_rope", bool)
    f.take("max_seq_len", int, default=None)  # a runtime cache size in Meta's code, not a model fact
    f.take("max_batch_size", int, default=None)  # likewise runtime-only
    chunk = f.take("vision_chunk_size", int, default=-1)
    max_chunks = f.take("vision_max_num_chunks", int, default=4)
    n_xattn = f.take("vision_num_cross_attention_layers", int, default=-1)
    vision_model = f.take("vision_model", dict, default=None)
    if vision_model is not None:
        vm = FieldReader(vision_model, "params.json vision_model")
        adapter = FieldReader(
            vm.take("cross_attention_adapter", dict), "params.json vision_model.cross_attention_adapter"
        )
        n_xattn = adapter.take("num_layers", int)
        adapter.finish()
        vm.finish()
    for unsupported in ("quantization_args", "lora_args"):
        if unsupported in f.data:
            raise UnsupportedConfigError(
                f"params.json: {unsupported!r} describes a quantized / QLoRA checkpoint, which llama32_jax does not "
                "load; use the bf16 checkpoint"
            )
    f.finish()

    if use_scaled:
        if rope_factor is None:
            rope_factor = 32.0 if _is_llama32_small(dim, n_layers, n_heads, n_kv_heads) else 8.0
        scaling = RopeScaling(factor=float(rope_factor))
    else:
        if rope_factor is not None:
            raise ConfigError("rope_factor was given but params.json has use_scaled_rope=false")
        scaling = None
    if dim % n_heads:
        raise ConfigError(f"params.json: dim ({dim}) must be a multiple of n_heads ({n_heads})")
    if tie_embeddings is None:
        tie_embeddings = _is_llama32_small(dim, n_layers, n_heads, n_kv_heads)
    is_vision = chunk > 0 or n_xattn > 0
    if is_vision and not (chunk > 0 and n_xattn > 0):
        raise ConfigError(
            "params.json: a vision model needs both vision_chunk_size > 0 and vision_num_cross_attention_layers > 0, "
            f"got {chunk} and {n_xattn}"
        )
    text = TextConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        ffn_dim=llama3_ffn_dim(dim, multiple_of, ffn_mult),
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=tie_embeddings,
        n_cross_attention_layers=n_xattn if is_vision else 0,
        n_image_embeddings=NUM_IMAGE_EMBEDDINGS if is_vision else 0,
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


# HF bookkeeping fields that do not change what the network computes (tokens ids for generation defaults,
# dtypes of the saved tensors, initialisation, library versions, output flags).
_HF_METADATA = (
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "model_type",
    "attn_implementation",
    "quantization_config_applied",
)


def _hf_rope(f: FieldReader, where: str) -> tuple[float, RopeScaling | None]:
    """RoPE from HF fields: legacy ``rope_theta`` + ``rope_scaling`` or 5.x ``rope_parameters``."""
    params = f.take("rope_parameters", dict, default=None)
    scaling = f.take("rope_scaling", dict, default=None)
    theta = f.take("rope_theta", _NUM, default=None)
    if params is not None and scaling is not None:
        raise ConfigError(f"{where}: both 'rope_parameters' and 'rope_scaling' are set; expected one")
    rp = FieldReader(params if params is not None else (scaling or {}), f"{where} rope parameters")
    theta_in_params = rp.take("rope_theta", _NUM, default=None)
    if theta is not None and theta_in_params is not None and float(theta) != float(theta_in_params):
        raise ConfigError(f"{where}: rope_theta {theta} disagrees with rope_parameters.rope_theta {theta_in_params}")
    theta = theta if theta is not None else theta_in_params
    if theta is None:
        raise ConfigError(f"{where}: required field 'rope_theta' is missing")
    rope_type = rp.take("rope_type", str, default=None)
    legacy_type = rp.take("type", str, default=None)
    rope_type = rope_type or legacy_type or ("default" if not rp.data else None)
    if rope_type == "default":
        rp.finish()
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"{where}: rope_type {rope_type!r} is not supported; supported: 'default' (no scaling), 'llama3'"
        )
    out = RopeScaling(
        factor=float(rp.take("factor", _NUM)),
        low_freq_factor=float(rp.take("low_freq_factor", _NUM)),
        high_freq_factor=float(rp.take("high_freq_factor", _NUM)),
        original_max_position_embeddings=rp.take("original_max_position_embeddings", int),
    )
    rp.finish()
    return float(theta), out


def _hf_text(f: FieldReader, *, mllama: bool) -> TextConfig:
    where = f.where
    vocab = f.take("vocab_size", int)
    dim = f.take("hidden_size", int)
    n_total = f.take("num_hidden_layers", int)
    n_heads = f.take("num_attention_heads", int)
    n_kv = f.take("num_key_value_heads", int, default=None)
    n_kv = n_heads if n_kv is None else n_kv  # HF semantics: absent/None means multi-head attention
    head_dim = f.take("head_dim", int, default=None)
    head_dim = dim // n_heads if head_dim is None else head_dim  # HF semantics
    ffn = f.take("intermediate_size", int)
    eps = float(f.take("rms_norm_eps", _NUM))
    theta, scaling = _hf_rope(f, where)
    max_pos = f.take("max_position_embeddings", int)
    tie = f.take("tie_word_embeddings", bool, default=False)  # the Llama/Mllama config classes default to False
    f.expect("hidden_act", ("silu",), "the Llama MLP is SwiGLU")
    f.expect("attention_bias", (False,), "Llama 3.2 projections have no bias")
    f.expect("mlp_bias", (False,), "Llama 3.2 projections have no bias")
    f.expect("attention_dropout", (0, 0.0), "dropout is not implemented")
    f.expect("dropout", (0, 0.0), "dropout is not implemented")
    f.take("pretraining_tp", int, default=1)  # a tensor-parallel slicing of the same math in old HF code
    n_xattn = 0
    if mllama:
        xattn = f.take("cross_attention_layers", list)
        n_xattn = len(xattn)
        n_self = n_total - n_xattn
        probe = (
            TextConfig(
                vocab_size=vocab,
                dim=dim,
                n_layers=max(n_self, 1),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                ffn_dim=ffn,
                norm_eps=eps,
                rope_theta=theta,
                rope_scaling=scaling,
                tie_embeddings=tie,
                n_cross_attention_layers=n_xattn,
                n_image_embeddings=NUM_IMAGE_EMBEDDINGS,
            )
            if n_xattn and n_self > 0 and n_self % n_xattn == 0
            else None
        )
        if probe is None or tuple(xattn) != probe.hf_cross_attention_layers:
            raise UnsupportedConfigError(
                f"{where}: cross_attention_layers={xattn} with num_hidden_layers={n_total} is not the uniform "
                "Llama 3.2 Vision fusion schedule [self x (k-1), cross, self] (e.g. 11B: [3, 8, ..., 38])"
            )
        n_total = n_self
    text = TextConfig(
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
    return text


def _hf_vision(data: Mapping[str, Any]) -> VisionConfig:
    f = FieldReader(data, "config.json vision_config")
    f.expect("model_type", ("mllama_vision_model",), "only the Mllama vision encoder exists here")
    f.expect("hidden_act", ("gelu",), "the Mllama vision MLP uses exact (erf) GELU")
    cfg = VisionConfig(
        image_size=f.take("image_size", int),
        patch_size=f.take("patch_size", int),
        num_channels=f.take("num_channels", int, default=3),
        width=f.take("hidden_size", int),
        n_layers=f.take("num_hidden_layers", int),
        n_global_layers=f.take("num_global_layers", int),
        n_heads=f.take("attention_heads", int),
        mlp_dim=f.take("intermediate_size", int),
        norm_eps=float(f.take("norm_eps", _NUM, default=1e-5)),
        max_num_tiles=f.take("max_num_tiles", int),
        intermediate_layers=tuple(f.take("intermediate_layers_indices", list, default=[3, 7, 15, 23, 30])),
        supported_aspect_ratios=tuple(tuple(r) for r in f.take("supported_aspect_ratios", list)),
    )
    out_dim = f.take("vision_output_dim", int)
    if out_dim != cfg.output_dim:
        raise ConfigError(
            f"config.json vision_config: vision_output_dim={out_dim} but hidden_size x "
            f"(len(intermediate_layers_indices) + 1) = {cfg.output_dim}"
        )
    f.drop(_HF_METADATA)
    f.finish()
    return cfg


def from_hf_config(
    source: str | os.PathLike | Mapping[str, Any], *, name: str = "hf", scan_layers: bool = False
) -> ModelConfig:
    """Read an HF ``config.json`` (a file, an HF model directory, or the parsed dict) for ``llama`` or ``mllama``.

    Unknown fields and fields whose value we would not honour (biases, other activations, other RoPE types, a
    non-uniform cross-attention schedule, ...) raise :class:`~llama32_jax.errors.ConfigError`.
    """
    data = _load_json(source, "config.json")
    model_type = data.get("model_type")
    if model_type == "llama":
        f = FieldReader(data, "config.json")
        text = _hf_text(f, mllama=False)
        f.drop(_HF_METADATA)
        f.finish()
        return ModelConfig(name=name, text=text, scan_layers=scan_layers)
    if model_type == "mllama":
        f = FieldReader(data, "config.json")
        text_data = f.take("text_config", dict)
        vision_data = f.take("vision_config", dict)
        image_token = f.take("image_token_index", int)
        top_tie = f.take("tie_word_embeddings", bool, default=False)
        f.drop(_HF_METADATA)
        f.finish()
        tf = FieldReader(text_data, "config.json text_config")
        tf.expect("model_type", ("mllama_text_model",), "expected the Mllama text model")
        text = _hf_text(tf, mllama=True)
        tf.drop(_HF_METADATA)
        tf.finish()
        if top_tie or text.tie_embeddings:
            raise UnsupportedConfigError(
                "config.json: tie_word_embeddings=true for mllama; the vision models have an untied output layer"
            )
        return ModelConfig(
            name=name, text=text, vision=_hf_vision(vision_data), scan_layers=scan_layers, image_token_id=image_token
        )
    raise UnsupportedConfigError(
        f"config.json: model_type {model_type!r} is not supported; supported: 'llama', 'mllama'"
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
