"""Thin Flax NNX modules that own parameters and their logical axes; the math lives in pure functions.

Every parameter is an ``nnx.Param`` carrying ``axes=(...)``: one logical axis name per dimension (names in
:mod:`llama32_jax.dims`). A sharding plan maps those names onto mesh axes. Modules built with ``stack=L`` hold
``L`` layers' parameters in one array with a leading ``layers`` axis (the scanned layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama32_jax import dims
from llama32_jax.quant.arrays import qlinear

# Standard deviation of the random initialisation (HF ``initializer_range``); real weights replace it.
INIT_STD = 0.02


def make_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype: jnp.dtype,
    *,
    stack: int | None = None,
    init: str = "normal",
) -> nnx.Param:
    """A parameter of ``shape`` (prefixed by ``[stack]`` and the ``layers`` axis when stacked).

    ``init`` is ``"normal"`` (std :data:`INIT_STD`), ``"ones"`` or ``"zeros"``.
    """
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if stack is not None:
        shape, axes = (stack, *shape), (dims.LAYERS, *axes)
    shape = tuple(int(s) for s in shape)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Llama RMSNorm: normalise in fp32, cast back to ``x.dtype``, then scale by ``weight`` (docs/model-facts.md §3)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def quantized_matmul(x: jax.Array, proj: nnx.Module, n_out: int, out_dtype=None) -> jax.Array:
    """``x [..., I] @ W^T`` for a projection whose kernel was quantized (:mod:`llama32_jax.models.quantize`):
    its ``kernel`` holds int8 / int4 values of shape ``[*out, *in]`` and ``kernel_scale`` their fp32 scales."""
    mode, group = proj.quant
    kernel, scale = proj.kernel[...], proj.kernel_scale[...]
    q2 = kernel.reshape(n_out, kernel.size // n_out)
    s2 = scale.reshape((n_out,) if mode == "int8" else (n_out, -1))
    return qlinear(x, q2, s2, mode, group, out_dtype=out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis; weight ``[D]`` (initialised to ones)."""

    def __init__(
        self, dim: int, eps: float, *, axis_name: str = dims.EMBED, dtype=jnp.float32, stack=None, rngs: nnx.Rngs
    ):
        self.eps = eps
        self.weight = make_param(rngs, (dim,), (axis_name,), dtype, stack=stack, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; ``attend`` is the tied output head (``[B, T, D] -> [B, T, V]`` fp32)."""

    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = make_param(rngs, (vocab, dim), (dims.VOCAB, dims.EMBED), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,vd->btv", x, self.embedding[...], preferred_element_type=jnp.float32)


class Einsum(nnx.Module):
    """A bias-free projection ``einsum(spec, x, kernel)``; the kernel's shape and axes are spelled out.

    Kernels keep torch's ``(out, in)`` orientation: contracting the *last* axis of both operands is what
    XLA:CPU's matrix kernels do fastest (measured on this project's 2-core CI machine, 1B-shaped MLP: +13% at
    batch 1, +70% at batch 16, +10% at prefill over ``(in, out)``); GPU/TPU compilers pick layouts themselves.
    Example: ``Einsum("btd,fd->btf", (F, D), (MLP, EMBED), ...)`` is the gate projection.
    """

    def __init__(
        self,
        spec: str,
        shape: Sequence[int],
        axes: Sequence[str],
        *,
        dtype=jnp.float32,
        stack: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.kernel = make_param(rngs, shape, axes, dtype, stack=stack)
        self.lora = nnx.data(None)  # an optional low-rank adapter (llama32_jax.training.lora)
        # Weight-only quantization (llama32_jax.models.quantize): (mode, group) and the kernel's fp32 scales.
        self.quant = None
        self.kernel_scale = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quant is not None:  # quantized only for '...i,oi->...o' specs (checked when quantizing)
            y = quantized_matmul(x, self, self.kernel.shape[-2])
        else:
            y = jnp.einsum(self.spec, x, self.kernel[...])
        return y if self.lora is None else y + self.lora(x).astype(y.dtype)


class HeadsProjection(nnx.Module):
    """``[B, T, D] -> [B, T, heads, H]`` with a kernel ``[heads, H, D]`` (axes e.g. ``q_heads, head_dim, embed``).

    Computed as one ``[heads*H, D]`` matmul over a free (row-major) reshape of the kernel: XLA then reads the
    weight in place, where a 3-D einsum can make it materialise a transposed copy per call.
    """

    def __init__(self, shape: Sequence[int], axes: Sequence[str], *, dtype=jnp.float32, stack=None, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, shape, axes, dtype, stack=stack)
        self.lora = nnx.data(None)  # an optional low-rank adapter (llama32_jax.training.lora)
        self.quant = None  # weight-only quantization, as in Einsum
        self.kernel_scale = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        heads, h, d = self.kernel.shape[-3:]
        if self.quant is not None:
            y = quantized_matmul(x, self, heads * h)
        else:
            y = jnp.einsum("btd,ed->bte", x, self.kernel[...].reshape(heads * h, d))
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y.reshape(*x.shape[:-1], heads, h)  # [B, T, heads, H]


class MergeHeadsProjection(nnx.Module):
    """``[B, T, heads, H] -> [B, T, D]`` with a kernel ``[D, heads, H]`` (Wo), as one ``[D, heads*H]`` matmul."""

    def __init__(self, shape: Sequence[int], axes: Sequence[str], *, dtype=jnp.float32, stack=None, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, shape, axes, dtype, stack=stack)
        self.lora = nnx.data(None)  # an optional low-rank adapter (llama32_jax.training.lora)
        self.quant = None  # weight-only quantization, as in Einsum
        self.kernel_scale = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        d, heads, h = self.kernel.shape[-3:]
        flat = x.reshape(*x.shape[:-2], heads * h)  # [B, T, heads*H]
        if self.quant is not None:
            y = quantized_matmul(flat, self, d)
        else:
            y = jnp.einsum("bte,de->btd", flat, self.kernel[...].reshape(d, heads * h))
        return y if self.lora is None else y + self.lora(flat).astype(y.dtype)


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """``{path tuple: leaf}`` of a nested mapping (a pure-dict parameter tree)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out
