"""What to quantize: :class:`QuantConfig` and the validation of a user's ``quantize=`` argument."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llama32_jax.errors import QuantizationError

MODES = ("int8", "int4")
GROUP_SIZE = 128  # int4 default: one scale per 128 consecutive input values of an output channel
# Parts that can stay in the compute dtype: the vision tower (encoder + projector) and the untied output head.
SKIPPABLE = ("vision", "head")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the model's projections.

    - ``mode="int8"``: one fp32 scale per output channel, ``q = round(w / s)`` in ``[-127, 127]``,
      ``s = max|w| / 127`` over the channel's inputs.
    - ``mode="int4"``: one fp32 scale per ``group_size`` consecutive inputs of an output channel,
      ``s = max|w| / 7`` over the group, ``q`` in ``[-8, 7]`` (``-8`` is never produced).

    Quantized: every projection of the text decoder (attention and MLP), of the cross-attention blocks, of the
    vision tower (its transformer layers and the vision-to-text projector) and the untied output head. Always kept
    in the compute dtype: token and image embeddings, the tied head (it is the embedding), norms, biases, gates,
    the vision patch embedding and positional / tile embeddings. ``skip`` keeps ``"vision"`` and/or ``"head"`` in
    the compute dtype as well.
    """

    mode: str
    group_size: int = GROUP_SIZE
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise QuantizationError(f"quantize mode must be one of {MODES}, got {self.mode!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g & (g - 1):
            raise QuantizationError(f"quantize group_size must be a power of two >= 2 (e.g. 128), got {g!r}")
        skip = self.skip
        if isinstance(skip, str) or not isinstance(skip, (tuple, list, frozenset, set)):
            raise QuantizationError(f"quantize skip must be a tuple of names from {SKIPPABLE}, got {skip!r}")
        unknown = sorted(str(s) for s in set(skip) - set(SKIPPABLE))
        if unknown:
            raise QuantizationError(f"quantize skip names unknown parts {unknown}; valid: {SKIPPABLE}")
        object.__setattr__(self, "skip", tuple(s for s in SKIPPABLE if s in set(skip)))

    @property
    def group(self) -> int:
        """The group size the weights use: ``group_size`` for int4, 0 (the whole input row) for int8."""
        return self.group_size if self.mode == "int4" else 0

    def describe(self) -> str:
        extra = f", group {self.group_size}" if self.mode == "int4" else ", per channel"
        kept = f"; kept in the compute dtype: {', '.join(self.skip)}" if self.skip else ""
        return f"{self.mode}{extra}{kept}"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_size": self.group_size, "skip": list(self.skip)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuantConfig:
        if not isinstance(data, Mapping) or set(data) - {"mode", "group_size", "skip"} or "mode" not in data:
            raise QuantizationError(f"malformed quantization record {data!r}")
        return cls(data["mode"], int(data.get("group_size", GROUP_SIZE)), tuple(data.get("skip", ())))


def resolve_quantize(value: Any, name: str = "quantize") -> QuantConfig | None:
    """``None`` / ``"int8"`` / ``"int4"`` / a :class:`QuantConfig` / a mapping of its fields -> ``QuantConfig``."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, str):
        if value not in MODES:
            raise QuantizationError(f"{name} must be one of {MODES}, a QuantConfig or None, got {value!r}")
        return QuantConfig(value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"mode", "group_size", "skip"})
        if unknown or "mode" not in value:
            raise QuantizationError(
                f"{name} as a mapping takes 'mode' and optionally 'group_size', 'skip'; got keys {sorted(value)}"
            )
        return QuantConfig(**value)
    raise QuantizationError(f"{name} must be one of {MODES}, a QuantConfig or None, got {type(value).__name__}")
