"""The ``"xla"`` implementation of ``cross_attention``: the reference in :mod:`llama32_jax.nn.attention`,
re-exported."""

from llama32_jax.nn.attention import cross_attention as cross_attention_reference

__all__ = ["cross_attention_reference"]
