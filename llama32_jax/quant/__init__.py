"""Weight-only quantization: int8 (per output channel) and int4 (group-wise) projection weights.

:class:`QuantConfig` says what to quantize; :mod:`llama32_jax.quant.arrays` quantizes and dequantizes one weight
(numpy on the host, or JAX); :func:`llama32_jax.quant.arrays.qlinear` is the matmul the projections run on
quantized weights. Attaching quantized weights to a model is :mod:`llama32_jax.models.quantize`.
"""

from llama32_jax.quant.arrays import dequantize, qlinear, quantize, scale_axes, scale_shape
from llama32_jax.quant.config import GROUP_SIZE, MODES, SKIPPABLE, QuantConfig, resolve_quantize

__all__ = [
    "GROUP_SIZE",
    "MODES",
    "SKIPPABLE",
    "QuantConfig",
    "dequantize",
    "qlinear",
    "quantize",
    "resolve_quantize",
    "scale_axes",
    "scale_shape",
]
