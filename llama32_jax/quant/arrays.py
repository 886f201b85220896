"""Quantizing one weight, dequantizing it, and the matmul on quantized weights.

A projection kernel has shape ``[*out, *in]``: its trailing ``n_in`` axes are the ones the projection contracts
(every projection in this package contracts the kernel's trailing axes), so it is the matrix ``[O, I]`` with
``O = prod(out)`` and ``I = prod(in)`` by a free row-major reshape. Scales:

- int8: ``[*out]`` fp32, one per output channel (logical axes: the kernel's output axes);
- int4: ``[*out, I // group]`` fp32 (axes: the output axes and the first input axis, so a sharding plan that splits
  the input axis splits the groups with it; groups never straddle shards when ``I / shards`` is a multiple of the
  group size, which :func:`llama32_jax.sharding.apply.check_quant_plan` verifies).

The values are stored as ``int8`` / ``int4`` arrays of the kernel's own shape and logical axes, so sharding plans
place them exactly as they place the float kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llama32_jax.errors import QuantizationError

INT8_MAX = 127
INT4_MAX = 7
# On XLA:CPU a product with an int8 / int4 weight either converts the whole weight into a fresh fp32 temporary and
# then calls the library dot (several rows: 3-10x slower than the fp32 product at the 1B MLP shape), or, for one row,
# becomes one loop fusion that computes the dot element by element: fast alone, but inside a model XLA also fuses
# the activation's producers (RMSNorm, SiLU x up) into that loop and recomputes them for every output channel (a 1B
# int8 decode step: 1.8x slower than chunked). So on a one-device CPU every quantized product runs over chunks of
# output channels: each chunk is converted into a small fp32 temporary, reused from chunk to chunk, that stays in
# cache for its dot (experiments/results/quant/formulations.md).
CPU_CHUNK_BYTES = 1 << 20  # the fp32 temporary of one chunk: [chunk, I] x 4 bytes
CPU_MIN_CHUNK = 8  # fewer output channels per chunk than this: no chunking (the loop would cost more than it saves)


def _check_mode(mode: str, group: int) -> None:
    """Refuse an unknown mode, or an int4 group that is not a positive int (it would divide by zero below)."""
    if mode not in ("int8", "int4"):
        raise QuantizationError(f"quantize mode must be one of ('int8', 'int4'), got {mode!r}")
    if mode == "int4" and (isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1):
        raise QuantizationError(f"int4 quantization needs a positive int group size, got {group!r}")


def _divide(xp, a, b):
    """``a / b`` correctly rounded, as numpy computes it. XLA rewrites a division by a broadcast value into a
    multiplication by its reciprocal (one more rounding: ``amax / 7`` then differs from numpy's in the last bit
    for about half the values); the barrier keeps the divisor opaque so the division stays a division."""
    if xp is np:
        return a / b
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _split(shape: Sequence[int], n_in: int) -> tuple[tuple[int, ...], int]:
    if not 1 <= n_in < len(shape):
        raise QuantizationError(f"a kernel of shape {tuple(shape)} cannot have {n_in} input axes")
    return tuple(int(s) for s in shape[: len(shape) - n_in]), int(math.prod(shape[len(shape) - n_in :]))


def scale_shape(kernel_shape: Sequence[int], n_in: int, mode: str, group: int) -> tuple[int, ...]:
    """The scale's shape for a kernel of ``kernel_shape`` (stacked ``[L, ...]`` kernels included)."""
    _check_mode(mode, group)
    out, n = _split(kernel_shape, n_in)
    if mode == "int8":
        return out
    if n % group:
        raise QuantizationError(
            f"int4 group size {group} does not divide the input dimension {n} of a weight of shape "
            f"{tuple(kernel_shape)}; use a group size that divides it (e.g. {math.gcd(n, group)}) or int8"
        )
    return (*out, n // group)


def scale_axes(kernel_axes: Sequence[str], n_in: int, mode: str) -> tuple[str, ...]:
    """Logical axes of the scale of a kernel with ``kernel_axes`` (see the module docstring)."""
    kernel_axes = tuple(kernel_axes)
    out_axes = kernel_axes[: len(kernel_axes) - n_in]
    return out_axes if mode == "int8" else (*out_axes, kernel_axes[len(kernel_axes) - n_in])


def quantize(w, n_in: int, mode: str, group: int):
    """``w [*out, *in]`` float -> ``(q, scale)``: ``q`` int8 / int4 of ``w``'s shape, ``scale`` fp32.

    numpy in, numpy out (host-side conversion, one weight at a time); a JAX array in, JAX arrays out (usable
    under ``jit`` and on sharded arrays). The maths is fp32 whatever ``w``'s dtype; rounding is half-to-even."""
    xp = np if isinstance(w, np.ndarray) else jnp
    shape = tuple(w.shape)
    out, n = _split(shape, n_in)
    sshape = scale_shape(shape, n_in, mode, group)
    wf = xp.asarray(w).astype(xp.float32)
    if mode == "int8":
        rows = wf.reshape(*out, n)
        amax = xp.max(xp.abs(rows), axis=-1)
        scale = xp.where(amax > 0, _divide(xp, amax, xp.float32(INT8_MAX)), 1.0).astype(xp.float32)
        q = xp.clip(xp.round(_divide(xp, rows, scale[..., None])), -INT8_MAX, INT8_MAX)
        return q.astype(xp.int8).reshape(shape), scale
    groups = wf.reshape(*sshape, group)
    amax = xp.max(xp.abs(groups), axis=-1)
    scale = xp.where(amax > 0, _divide(xp, amax, xp.float32(INT4_MAX)), 1.0).astype(xp.float32)
    q = xp.clip(xp.round(_divide(xp, groups, scale[..., None])), -INT4_MAX - 1, INT4_MAX)
    int4 = ml_dtypes.int4 if xp is np else jnp.int4
    return q.astype(xp.int8).astype(int4).reshape(shape), scale


def dequantize(q, scale, n_in: int, mode: str, group: int, dtype=jnp.float32):
    """``q * scale`` back in the kernel's shape, computed in fp32 and cast to ``dtype`` (numpy or JAX, as given)."""
    _check_mode(mode, group)
    xp = np if isinstance(q, np.ndarray) else jnp
    shape = tuple(q.shape)
    out, n = _split(shape, n_in)
    s = xp.asarray(scale).astype(xp.float32)
    if mode == "int8":
        w = q.astype(xp.int8).astype(xp.float32).reshape(*out, n) * s[..., None]
    else:
        w = q.astype(xp.int8).astype(xp.float32).reshape(*s.shape, group) * s[..., None]
    return w.reshape(shape).astype(dtype)


def _rows_product(x2, q2, scale, mode: str, group: int):
    """``x2 [R, I] @ dequant(q2 [O, I])^T -> [R, O]`` fp32, written ``x @ w.T``: the form XLA:CPU fuses at R = 1."""
    if mode == "int8":  # the scale is per output channel: applied after the product, on R x O values
        return (x2 @ q2.astype(x2.dtype).T).astype(jnp.float32) * scale.astype(jnp.float32)
    o, i = q2.shape
    w = (q2.astype(jnp.float32).reshape(o, i // group, group) * scale[..., None]).reshape(o, i)
    return (x2 @ w.astype(x2.dtype).T).astype(jnp.float32)


def cpu_chunking() -> bool:
    """Whether :func:`qlinear` chunks products here: on CPU with one device. With several devices a weight may be
    sharded along its output channels, and a loop over chunks of them would make the partitioner gather it."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _cpu_chunk(o: int, i: int) -> int:
    """Output channels per chunk on CPU: the largest divisor of ``o`` whose fp32 ``[chunk, i]`` fits
    :data:`CPU_CHUNK_BYTES` (0: no useful chunking)."""
    limit = max(1, CPU_CHUNK_BYTES // (4 * i))
    if limit >= o:
        return 0
    best = max((c for c in range(1, limit + 1) if o % c == 0), default=0)
    return best if best >= CPU_MIN_CHUNK else 0


def _chunked_product(x2, q2, scale, mode: str, group: int, chunk: int):
    """:func:`_rows_product` over ``O / chunk`` chunks of output channels in a loop: one small fp32 temporary."""
    o, i = q2.shape
    qc = q2.reshape(o // chunk, chunk, i)
    sc = scale.reshape(o // chunk, chunk, *scale.shape[1:])
    _, y = jax.lax.scan(lambda _, qs: (None, _rows_product(x2, *qs, mode, group)), None, (qc, sc))
    return jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], o)  # [O / chunk, R, chunk] -> [R, O]


def qlinear(x: jax.Array, q2: jax.Array, scale: jax.Array, mode: str, group: int, out_dtype=None) -> jax.Array:
    """``x [..., I] @ W^T`` with ``W [O, I] = dequantize(q2, scale)``: ``[..., O]`` in ``out_dtype`` (default
    ``x.dtype``; the products accumulate as the float path's do, the scales apply in fp32).

    ``q2`` is the kernel as ``[O, I]``; ``scale`` is ``[O]`` (int8) or ``[O, I // group]`` (int4). On GPU and TPU
    the compiler fuses the conversion into the matmul; on a single-device CPU (:func:`cpu_chunking`) the product
    runs chunk by chunk of output channels (:func:`_chunked_product`), unless the weight is small enough to be
    one chunk."""
    _check_mode(mode, group)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    chunk = _cpu_chunk(*q2.shape) if cpu_chunking() else 0
    if chunk:
        y = _chunked_product(x2, q2, scale, mode, group, chunk)
    else:
        y = _rows_product(x2, q2, scale, mode, group)
    return y.astype(out_dtype or x.dtype).reshape(*lead, q2.shape[0])
