"""The ``"xla"`` implementation of ``decode_attention``: the shared reference (never a second copy)."""

from __future__ import annotations

from llama32_jax.nn.attention import self_attention as decode_attention_reference

__all__ = ["decode_attention_reference"]
