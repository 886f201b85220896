"""Model configurations: frozen dataclasses, one named constant per model, and strict readers.

Every number here is a fact about a published model (docs/model-facts.md §1); the readers turn a checkpoint's own
configuration (Meta ``params.json`` or HF ``config.json``) into these dataclasses: they read every field that
describes the model, ignore only fields that cannot change the computation, give an absent field the format's own
default, and refuse an unknown field, or a field whose value this implementation would not honour, with a
:class:`~llama32_jax.errors.ConfigError` naming the field (the rules: ``llama32_jax.configs.readers``).

The one runtime choice kept in the config is :attr:`ModelConfig.scan_layers` (scan over stacked layer parameters,
or a Python-unrolled loop over per-layer parameters); see ``llama32_jax.models.text``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from llama32_jax.errors import ConfigError

__all__ = [
    "ATTENTION_IMPLS",
    "CONFIGS",
    "DTYPES",
    "LLAMA_3_2_1B",
    "LLAMA_3_2_1B_INSTRUCT",
    "LLAMA_3_2_3B",
    "LLAMA_3_2_3B_INSTRUCT",
    "LLAMA_3_2_11B_VISION",
    "LLAMA_3_2_11B_VISION_INSTRUCT",
    "LLAMA_3_2_90B_VISION",
    "LLAMA_3_2_90B_VISION_INSTRUCT",
    "LLAMA_GUARD_3_1B",
    "LLAMA_GUARD_3_11B_VISION",
    "TINY_TEXT",
    "TINY_VISION",
    "ModelConfig",
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "get_config",
    "llama3_ffn_dim",
]

# The runtime choices a model is loaded with (``llama32_jax.load``), named once for the whole package.
# Parameter dtypes by name: loading, converting (``--dtype``), Orbax manifests, exporting.
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
# Attention implementations: "auto" = Pallas kernels on GPU/TPU, XLA elsewhere (llama32_jax.kernels.resolve_impl).
ATTENTION_IMPLS = ("auto", "xla", "pallas")

# Image-token embedding rows Meta allocates (``learnable_embedding``: max(model-parallel size, 8) = 8 rows).
NUM_IMAGE_EMBEDDINGS = 8
# The model-side id of <|image|> (HF checkpoints; Meta's tokenizer string id 128011 is remapped to it).
IMAGE_TOKEN_ID = 128256
ALL_ASPECT_RATIOS_4 = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ConfigError(what)


@dataclass(frozen=True)
class RopeScaling:
    """'llama3' RoPE frequency scaling (docs/model-facts.md §2.2). ``factor`` is 32 for 1B/3B and 8 for the vision
    models."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {self.factor}")
        _require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"{self.low_freq_factor} and {self.high_freq_factor}",
        )
        _require(
            self.original_max_position_embeddings > 0,
            f"rope_scaling.original_max_position_embeddings must be > 0, got {self.original_max_position_embeddings}",
        )


@dataclass(frozen=True)
class TextConfig:
    """The language model. ``n_layers`` counts self-attention layers only (Meta's convention).

    For the vision models, ``n_cross_attention_layers`` cross-attention blocks are interleaved with the
    self-attention layers (docs/model-facts.md §1.3) and ``n_image_embeddings`` extra embedding rows hold <|image|>.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_embeddings: bool
    max_position_embeddings: int = 131072
    n_cross_attention_layers: int = 0
    n_image_embeddings: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"text config field {name!r} must be a positive int, got {value!r}",
            )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        _require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _require(self.max_position_embeddings > 0, "max_position_embeddings must be > 0")
        _require(self.n_cross_attention_layers >= 0, "n_cross_attention_layers must be >= 0")
        if self.n_cross_attention_layers:
            _require(
                self.n_layers % self.n_cross_attention_layers == 0,
                f"n_layers ({self.n_layers}) must be a multiple of n_cross_attention_layers "
                f"({self.n_cross_attention_layers}) so the text stack is uniform groups [self.., cross, self]",
            )

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (G)."""
        return self.n_heads // self.n_kv_heads

    @property
    def cross_attention_every(self) -> int:
        """Self-attention layers per fusion group (Meta's ``k``; 4 for both vision models)."""
        return self.n_layers // self.n_cross_attention_layers if self.n_cross_attention_layers else 0

    @property
    def meta_fusion_schedule(self) -> tuple[int, ...]:
        """Meta: cross-attention block j runs right before self-attention layer ``schedule[j]``
        (docs/model-facts.md §1.3)."""
        if not self.n_cross_attention_layers:
            return ()
        k = math.ceil(self.n_layers / self.n_cross_attention_layers)
        return tuple(list(range(self.n_layers))[::-1][::k][: self.n_cross_attention_layers][::-1])

    @property
    def hf_cross_attention_layers(self) -> tuple[int, ...]:
        """HF's indices of the cross-attention layers in its merged layer list (docs/model-facts.md §1.3)."""
        if not self.n_cross_attention_layers:
            return ()
        f = math.ceil(self.n_layers / self.n_cross_attention_layers)
        total = self.n_layers + self.n_cross_attention_layers
        return tuple(range(f - 1, total, f + 1))


@dataclass(frozen=True)
class VisionConfig:
    """The Mllama vision encoder (a ViT-H/14 with tile embeddings) and its projector (docs/model-facts.md §1.3, §5)."""

    image_size: int = 560
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    mlp_dim: int = 5120
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = ALL_ASPECT_RATIOS_4

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_channels", "width", "n_layers", "n_heads", "mlp_dim"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"vision config field {name!r} must be a positive int, got {value!r}",
            )
        _require(self.n_global_layers >= 0, "vision n_global_layers must be >= 0")
        _require(
            self.image_size % self.patch_size == 0,
            f"vision image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        _require(self.width % self.n_heads == 0, f"vision width ({self.width}) must be a multiple of n_heads")
        _require(
            all(0 <= i < self.n_layers for i in self.intermediate_layers),
            f"vision intermediate_layers {self.intermediate_layers} must index the {self.n_layers} local layers",
        )
        _require(
            all(h * w <= self.max_num_tiles for h, w in self.supported_aspect_ratios),
            f"supported_aspect_ratios {self.supported_aspect_ratios} exceed max_num_tiles={self.max_num_tiles}",
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Patches plus the CLS token (1601 at 560/14)."""
        return self.patches_per_side**2 + 1

    @property
    def output_dim(self) -> int:
        """Final features concatenated with the intermediate ones: width x (len(intermediate) + 1) = 7680."""
        return self.width * (len(self.intermediate_layers) + 1)


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: the text decoder, and the vision encoder for the Vision models.

    ``scan_layers`` picks the parameter layout of the decoder: ``True`` scans over stacked ``[L, ...]``
    parameters (compile time flat in depth; training), ``False`` unrolls a Python loop over per-layer parameters
    (fastest decode on XLA:CPU, see docs/performance.md). Checkpoints convert between the two at load time.
    """

    text: TextConfig
    vision: VisionConfig | None = None
    name: str = "custom"
    scan_layers: bool = False
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.vision is not None:
            _require(
                self.text.n_cross_attention_layers > 0,
                f"{self.name}: a vision model needs n_cross_attention_layers > 0",
            )
            _require(self.text.n_image_embeddings > 0, f"{self.name}: a vision model needs n_image_embeddings > 0")
            _require(self.image_token_id is not None, f"{self.name}: a vision model needs image_token_id")
        else:
            _require(
                self.text.n_cross_attention_layers == 0,
                f"{self.name}: cross-attention layers need a vision config",
            )

    @property
    def is_vision(self) -> bool:
        return self.vision is not None

    def replace(self, **changes: Any) -> ModelConfig:
        """``dataclasses.replace`` shorthand, e.g. ``cfg.replace(scan_layers=True)``."""
        return dataclasses.replace(self, **changes)


def llama3_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN width from Meta's ``params.json`` fields (Meta ``FeedForward`` with hidden_dim = 4*dim)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --------------------------------------------------------------------------------------------------------------
# Named constants (docs/model-facts.md §1.1 - §1.5).

_LLAMA3_BASE = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)

_TEXT_1B = TextConfig(
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    ffn_dim=8192,
    rope_scaling=RopeScaling(factor=32.0),
    tie_embeddings=True,
    **_LLAMA3_BASE,
)
_TEXT_3B = TextConfig(
    dim=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=8192,
    rope_scaling=RopeScaling(factor=32.0),
    tie_embeddings=True,
    **_LLAMA3_BASE,
)
_TEXT_11B = TextConfig(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=14336,
    rope_scaling=RopeScaling(factor=8.0),
    tie_embeddings=False,
    n_cross_attention_layers=8,
    n_image_embeddings=NUM_IMAGE_EMBEDDINGS,
    **_LLAMA3_BASE,
)
_TEXT_90B = TextConfig(
    dim=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=28672,
    rope_scaling=RopeScaling(factor=8.0),
    tie_embeddings=False,
    n_cross_attention_layers=20,
    n_image_embeddings=NUM_IMAGE_EMBEDDINGS,
    **_LLAMA3_BASE,
)
# The base 11B-Vision SKU lists vision_chunk_size 448 while every published config uses
# 560 (docs/model-facts.md §1.3, §10.2); the constant uses 560 and a checkpoint's own params.json / config.json always
# wins.
_VISION = VisionConfig()

LLAMA_3_2_1B = ModelConfig(name="Llama-3.2-1B", text=_TEXT_1B)
LLAMA_3_2_1B_INSTRUCT = ModelConfig(name="Llama-3.2-1B-Instruct", text=_TEXT_1B)
LLAMA_3_2_3B = ModelConfig(name="Llama-3.2-3B", text=_TEXT_3B)
LLAMA_3_2_3B_INSTRUCT = ModelConfig(name="Llama-3.2-3B-Instruct", text=_TEXT_3B)
LLAMA_3_2_11B_VISION = ModelConfig(
    name="Llama-3.2-11B-Vision", text=_TEXT_11B, vision=_VISION, image_token_id=IMAGE_TOKEN_ID
)
LLAMA_3_2_11B_VISION_INSTRUCT = LLAMA_3_2_11B_VISION.replace(name="Llama-3.2-11B-Vision-Instruct")
LLAMA_3_2_90B_VISION = ModelConfig(
    name="Llama-3.2-90B-Vision", text=_TEXT_90B, vision=_VISION, image_token_id=IMAGE_TOKEN_ID
)
LLAMA_3_2_90B_VISION_INSTRUCT = LLAMA_3_2_90B_VISION.replace(name="Llama-3.2-90B-Vision-Instruct")
# Llama Guard 3 1B: the 1B architecture with an untied output layer (HF converter, llama_version="Guard-3";
# docs/model-facts.md §1.5). Its RoPE factor is not in a primary source available here; 32 follows the 1B base model,
# and a checkpoint's own config overrides it.
LLAMA_GUARD_3_1B = ModelConfig(name="Llama-Guard-3-1B", text=dataclasses.replace(_TEXT_1B, tie_embeddings=False))
LLAMA_GUARD_3_11B_VISION = LLAMA_3_2_11B_VISION.replace(name="Llama-Guard-3-11B-Vision")

# Tiny configs for tests and the demo: every structural feature of the full models (GQA, llama3 RoPE scaling,
# tied head, the [self, self, self, cross, self] fusion group) at a size that runs in milliseconds on a CPU.
TINY_TEXT = ModelConfig(
    name="tiny-text",
    text=TextConfig(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=True,
        max_position_embeddings=131072,
    ),
)
TINY_VISION = ModelConfig(
    name="tiny-vision",
    text=TextConfig(
        vocab_size=512,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0),
        tie_embeddings=False,
        max_position_embeddings=131072,
        n_cross_attention_layers=1,
        n_image_embeddings=NUM_IMAGE_EMBEDDINGS,
    ),
    vision=VisionConfig(
        image_size=28,
        patch_size=14,
        width=32,
        n_layers=4,
        n_global_layers=2,
        n_heads=2,
        mlp_dim=64,
        intermediate_layers=(1, 3),
    ),
    image_token_id=512,  # vocab_size: the first learnable-embedding row, as 128256 in the published models
)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        LLAMA_3_2_1B,
        LLAMA_3_2_1B_INSTRUCT,
        LLAMA_3_2_3B,
        LLAMA_3_2_3B_INSTRUCT,
        LLAMA_3_2_11B_VISION,
        LLAMA_3_2_11B_VISION_INSTRUCT,
        LLAMA_3_2_90B_VISION,
        LLAMA_3_2_90B_VISION_INSTRUCT,
        LLAMA_GUARD_3_1B,
        LLAMA_GUARD_3_11B_VISION,
        TINY_TEXT,
        TINY_VISION,
    )
}


def get_config(name: str) -> ModelConfig:
    """Look up a named config (case-insensitive, e.g. ``"llama-3.2-1b"``)."""
    by_lower = {k.lower(): v for k, v in CONFIGS.items()}
    try:
        return by_lower[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}") from None
