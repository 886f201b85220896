"""Weight-only quantization of a model: which projections, their quantized state, and quantizing parameter trees.

A quantized projection keeps its ``kernel`` parameter (same shape and logical axes, int8 or int4 values) and gains
``kernel_scale`` (fp32, :func:`llama32_jax.quant.arrays.scale_shape`) and the static ``quant = (mode, group)``;
its call then runs :func:`llama32_jax.quant.arrays.qlinear`. The untied output head is ``lm_head`` +
``lm_head_scale`` + ``head_quant`` on the model. What is quantized is :class:`~llama32_jax.quant.QuantConfig`'s
doc; ``model.quant_config`` records it.

- :func:`quantize_model` quantizes a built model in place (concrete, or abstract under ``nnx.eval_shape``);
  :func:`dequantize_model` turns it back into a float model (``q * scale``; what merging QLoRA adapters uses);
- :func:`quant_targets` lists, for a config, every parameter path that is quantized with its scale's path;
- :func:`quantize_tree` quantizes a float parameter tree (our names) one weight at a time, on the host for numpy
  leaves: what loading and conversion use, so no device ever holds the float weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import InvalidInputError, QuantizationError
from llama32_jax.models.mllama import Mllama
from llama32_jax.models.text import Transformer
from llama32_jax.models.vision import Linear
from llama32_jax.nn.layers import Einsum, HeadsProjection, MergeHeadsProjection
from llama32_jax.quant.arrays import dequantize, quantize, scale_axes, scale_shape
from llama32_jax.quant.config import QuantConfig

VISION_PARTS = ("vision", "projector")  # top-level attributes of Mllama that form the vision tower
SCALE_SUFFIX = "_scale"


class Target(NamedTuple):
    """A quantized parameter: where its scale goes, how many trailing input axes it has, mode and group."""

    scale_path: tuple
    n_in: int
    mode: str
    group: int


def n_in_axes(proj: nnx.Module) -> int:
    """How many trailing kernel axes ``proj`` contracts (the projections this module quantizes)."""
    if isinstance(proj, MergeHeadsProjection):
        return 2
    if isinstance(proj, Einsum):
        lhs, rest = proj.spec.split(",")
        rhs, out = rest.split("->")
        if len(rhs) != 2 or lhs[-1] != rhs[1] or out[-1] != rhs[0] or lhs[:-1] != out[:-1]:
            raise QuantizationError(f"only '...i,oi->...o' projections are quantized, got {proj.spec!r}")
        return 1
    return 1


def _part(path: tuple) -> str:
    return "vision" if path and str(path[0]) in VISION_PARTS else "text"


def _quantized_param(param: nnx.Param, n_in: int, qc: QuantConfig) -> tuple[nnx.Param, nnx.Param]:
    axes = tuple(param.get_metadata()["axes"])
    q, scale = quantize(param[...], n_in, qc.mode, qc.group)
    return nnx.Param(q, axes=axes), nnx.Param(scale, axes=scale_axes(axes, n_in, qc.mode))


def quantize_model(model: nnx.Module, quant: QuantConfig) -> nnx.Module:
    """Quantize ``model``'s projections in place by ``quant`` and return it.

    Raises :class:`~llama32_jax.errors.QuantizationError` for an int4 group size that does not divide a weight's
    input dimension (nothing is changed then), :class:`~llama32_jax.errors.InvalidInputError` for a model that is
    already quantized or carries LoRA adapters (add adapters after quantizing: QLoRA)."""
    if not isinstance(quant, QuantConfig):
        raise QuantizationError(f"quantize_model needs a QuantConfig, got {type(quant).__name__}")
    if getattr(model, "quant_config", None) is not None:
        raise InvalidInputError(f"the model is already quantized ({model.quant_config.describe()})")
    nodes = []
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, (Einsum, HeadsProjection, MergeHeadsProjection, Linear)):
            if getattr(node, "lora", None) is not None:
                raise InvalidInputError("quantize the model before adding LoRA adapters (QLoRA), not after")
            if _part(path) == "vision" and "vision" in quant.skip:
                continue
            nodes.append((node, n_in_axes(node)))
    untied = hasattr(model, "lm_head") and "head" not in quant.skip
    for node, n_in in nodes:  # check every shape first: an error leaves the model unchanged
        if quant.mode == "int4":
            quantize_check(node.kernel.shape, n_in, quant)
    if untied and quant.mode == "int4":
        quantize_check(model.lm_head.shape, 1, quant)
    for node, n_in in nodes:
        node.kernel, node.kernel_scale = _quantized_param(node.kernel, n_in, quant)
        node.quant = (quant.mode, quant.group)
    if untied:
        model.lm_head, model.lm_head_scale = _quantized_param(model.lm_head, 1, quant)
        model.head_quant = (quant.mode, quant.group)
    model.quant_config = quant
    return model


def compute_dtype(model: nnx.Module):
    """The dtype of ``model``'s float parameters (its ``param_dtype``): that of the token embedding, which is never
    quantized (float32 for a module without one)."""
    embed = getattr(getattr(model, "embed", None), "embedding", None)
    return embed.dtype if embed is not None else jax.numpy.float32


def dequantized_kernel(proj: nnx.Module) -> jax.Array:
    """A quantized projection's kernel as fp32 ``q * scale``, in the kernel's shape."""
    mode, group = proj.quant
    return dequantize(proj.kernel[...], proj.kernel_scale[...], n_in_axes(proj), mode, group, jax.numpy.float32)


def set_float_kernel(proj: nnx.Module, value: jax.Array) -> None:
    """Give ``proj`` the float ``value`` as its kernel (the kernel's metadata, its logical axes included) and drop
    its quantized state, so it runs the float path again."""
    proj.kernel = nnx.Param(value, **proj.kernel.get_metadata())
    proj.kernel_scale = nnx.data(None)
    proj.quant = None


def dequantize_model(model: nnx.Module, dtype=None) -> nnx.Module:
    """Turn a quantized ``model`` back into a float one in place and return it: every quantized kernel (and the
    untied head) becomes ``q * scale`` computed in fp32 and cast to ``dtype`` (default :func:`compute_dtype`, the
    dtype of the model's other float parameters); scales and ``quant_config`` are cleared, so the model has the
    structure of one that was never quantized (exportable, fully trainable). The values are the dequantized
    weights, not the original float ones: quantization error stays. A float model is returned unchanged."""
    if not isinstance(model, nnx.Module):
        raise InvalidInputError(f"dequantize_model needs an nnx.Module, got {type(model).__name__}")
    dtype = compute_dtype(model) if dtype is None else dtype
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, (Einsum, HeadsProjection, MergeHeadsProjection, Linear)) and node.quant is not None:
            set_float_kernel(node, dequantized_kernel(node).astype(dtype))
    if getattr(model, "head_quant", None) is not None:
        mode, group = model.head_quant
        head = dequantize(model.lm_head[...], model.lm_head_scale[...], 1, mode, group, jax.numpy.float32)
        model.lm_head = nnx.Param(head.astype(dtype), **model.lm_head.get_metadata())
        model.lm_head_scale = nnx.data(None)
        model.head_quant = None
    if hasattr(model, "quant_config"):
        model.quant_config = None
    return model


def quantize_check(shape, n_in: int, quant: QuantConfig) -> None:
    """Raise :class:`~llama32_jax.errors.QuantizationError` unless ``quant`` can quantize a kernel of ``shape``."""
    scale_shape(shape, n_in, quant.mode, quant.group)


@functools.lru_cache(maxsize=32)
def quant_targets(config: ModelConfig, quant: QuantConfig) -> dict[tuple, Target]:
    """``{kernel path: Target}`` for ``config``'s parameter tree (its ``scan_layers`` layout) under ``quant``."""
    cls = Mllama if config.is_vision else Transformer
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    out: dict[tuple, Target] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Einsum, HeadsProjection, MergeHeadsProjection, Linear)):
            if _part(path) == "vision" and "vision" in quant.skip:
                continue
            kpath = (*path, "kernel")
            out[kpath] = Target((*path, "kernel" + SCALE_SUFFIX), n_in_axes(node), quant.mode, quant.group)
    if not config.text.tie_embeddings or config.is_vision:
        if "head" not in quant.skip:
            out[("lm_head",)] = Target(("lm_head" + SCALE_SUFFIX,), 1, quant.mode, quant.group)
    return out


def quantize_tree(config: ModelConfig, params: Mapping, quant: QuantConfig, *, progress=None) -> dict:
    """A nested float parameter tree (our names, ``config``'s layout) with every target weight quantized.

    Weights are quantized one at a time: numpy leaves on the host (the float copy is dropped as soon as its
    quantized values exist), JAX leaves where they live (keeping their sharding). ``progress(n)`` is called
    after each weight, if given. Leaves that are already integer arrays are left as they are (a quantized
    checkpoint)."""
    targets = quant_targets(config, quant)
    out = _copy_tree(params)
    for kpath, target in targets.items():
        parent = _node(out, kpath[:-1])
        if parent is None or kpath[-1] not in parent:
            continue  # load_params reports what is missing
        value = parent[kpath[-1]]
        if jax.numpy.issubdtype(value.dtype, jax.numpy.integer):  # int4 too (numpy's issubdtype says no)
            continue
        if isinstance(value, jax.Array):
            q, s = jax.jit(quantize, static_argnums=(1, 2, 3))(value, target.n_in, target.mode, target.group)
        else:
            q, s = quantize(np.asarray(value), target.n_in, target.mode, target.group)
        parent[kpath[-1]] = q
        _node(out, target.scale_path[:-1])[target.scale_path[-1]] = s
        if progress is not None:
            progress(1)
    return out


def _copy_tree(tree: Mapping) -> dict:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _node(tree: dict, path: tuple) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node
