"""The ``"xla"`` implementation of ``flash_attention``: the reference in :mod:`llama32_jax.nn.attention`."""

from __future__ import annotations

from llama32_jax.nn.attention import self_attention as flash_attention_reference

__all__ = ["flash_attention_reference"]
