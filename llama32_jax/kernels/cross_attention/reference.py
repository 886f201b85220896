"""The ``"xla"`` implementation of ``cross_attention``: the reference in :mod:`llama32_jax.attention`, re-exported."""

from llama32_jax.attention import cross_attention as cross_attention_reference

__all__ = ["cross_attention_reference"]
