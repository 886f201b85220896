"""LoRA adapters on the model's projections: add, count, merge.

A LoRA adapter on a projection ``y = W x`` (``W`` of shape ``[out, in]``, flattened from the projection's kernel)
adds ``(alpha / r) * B (A x)`` with ``A [r, in]`` (random, std ``1/sqrt(in)``) and ``B [out, r]`` (zeros, so a
fresh adapter changes nothing). The adapters are :class:`flax.nnx.LoRAParam` variables: training differentiates
only them (``nnx.DiffState(0, nnx.LoRAParam)`` / :func:`llama32_jax.training.train.split_for_training`) while every
other weight stays frozen, and :func:`merge_lora` folds them into the kernels (``W += (alpha / r) B A``) for inference
at no extra cost.

Targets (:data:`TARGETS`):

- ``"attention"``: ``wq, wk, wv, wo`` of every self-attention layer;
- ``"mlp"``: ``w1, w3, w2`` of every decoder feed-forward block (not the cross-attention blocks');
- ``"cross"``: the vision models' cross-attention adapter, i.e. every projection of the ``cross_layers`` blocks
  (``wq, wk, wv, wo`` and their feed-forward ``w1, w3, w2``). With only ``"cross"`` everything else, the vision
  tower included, stays frozen.

Both layer layouts work: in the scanned layout an adapter is stacked like its kernel (``[L, r, in]``).
Adapter axes use the projection's logical axes and ``lora_rank`` (never sharded), so sharding plans place them
with their kernels.

QLoRA: adapters on a weight-only quantized model (:mod:`llama32_jax.models.quantize`, quantize first). The kernel
then holds int8 / int4 codes: the adapter takes its shapes from the kernel's shape and axes as usual, but its dtype
is the model's float compute dtype (:func:`~llama32_jax.models.quantize.compute_dtype`, the embedding's), never the
kernel's integer one. Training differentiates only the adapters; the codes and their scales are frozen state.
:func:`merge_lora` on a quantized base returns a FLOAT model: each adapted kernel becomes ``q * scale + (alpha / r)
B A`` (in fp32, then cast to the compute dtype), and every other quantized kernel (and the untied head) is
dequantized too (:func:`~llama32_jax.models.quantize.dequantize_model`), ``quant_config`` cleared. One consistent
model results, of exactly the structure of a float model: it exports (``export_hf``), loads anywhere and can be
quantized again. The merged weights are the dequantized base plus the adapters, so the merged model computes what
the quantized model with its adapters did (up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax import dims
from llama32_jax.errors import InvalidInputError
from llama32_jax.models.quantize import compute_dtype, dequantize_model, dequantized_kernel, set_float_kernel
from llama32_jax.nn.layers import Einsum, HeadsProjection, MergeHeadsProjection

TARGETS = ("attention", "mlp", "cross")


class LoRA(nnx.Module):
    """``x [..., in] -> (alpha / r) * B (A x) [..., out]`` on flattened projection inputs and outputs."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        in_axis: str | None,
        out_axis: str | None,
        *,
        rank: int,
        alpha: float,
        dtype,
        stack: int | None,
        rngs: nnx.Rngs,
    ):
        a_shape, b_shape = (rank, n_in), (n_out, rank)
        a_axes, b_axes = (dims.LORA_RANK, in_axis), (out_axis, dims.LORA_RANK)
        if stack is not None:
            a_shape, b_shape = (stack, *a_shape), (stack, *b_shape)
            a_axes, b_axes = (dims.LAYERS, *a_axes), (dims.LAYERS, *b_axes)
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / math.sqrt(n_in)
        self.a = nnx.LoRAParam(a.astype(dtype), axes=a_axes)
        self.b = nnx.LoRAParam(jnp.zeros(b_shape, dtype), axes=b_axes)
        self.scale = float(alpha) / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("...i,ri->...r", x, self.a[...].astype(x.dtype))
        return jnp.einsum("...r,or->...o", h, self.b[...].astype(x.dtype)) * self.scale

    def delta(self) -> jax.Array:
        """``(alpha / r) B A``: ``[out, in]`` (``[L, out, in]`` stacked), fp32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return jnp.einsum("...or,...ri->...oi", b, a) * self.scale


def _geometry(proj) -> tuple[int, int, str | None, str | None, int | None]:
    """``(n_in, n_out, in_axis, out_axis, stack)`` of a projection's flattened ``[out, in]`` kernel."""
    kernel = proj.kernel
    axes = tuple(getattr(kernel, "axes", ()) or ())
    shape = tuple(kernel.shape)
    if isinstance(proj, HeadsProjection):  # [heads, H, D]: out = heads*H (head-major), in = D
        core = 3
        (heads, h, d), names = shape[-3:], axes[-3:]
        n_in, n_out, in_axis, out_axis = d, heads * h, names[2], names[0]
    elif isinstance(proj, MergeHeadsProjection):  # [D, heads, H]: out = D, in = heads*H
        core = 3
        (d, heads, h), names = shape[-3:], axes[-3:]
        n_in, n_out, in_axis, out_axis = heads * h, d, names[1], names[0]
    elif isinstance(proj, Einsum):  # [out, in], contracted on the input's last axis (the feed-forward kernels)
        core = 2
        lhs, rest = proj.spec.split(",")
        rhs, out = rest.split("->")
        if len(rhs) != 2 or lhs[-1] != rhs[1] or out[-1] != rhs[0] or lhs[:-1] != out[:-1]:
            raise InvalidInputError(f"LoRA needs an '...i,oi->...o' projection, got {proj.spec!r}")
        (n_out, n_in), names = shape[-2:], axes[-2:]
        out_axis, in_axis = names
    else:
        raise InvalidInputError(f"no LoRA for {type(proj).__name__}")
    stack = shape[0] if len(shape) == core + 1 else None
    return n_in, n_out, in_axis, out_axis, stack


def _target_of(path: tuple) -> str | None:
    """Which target a projection at ``path`` belongs to (None: not adaptable)."""
    names = [str(p) for p in path]
    if not names or names[-1] not in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        return None
    if names[0] == "cross_layers":
        return "cross"
    if names[0] == "layers":
        return "attention" if "attention" in names else "mlp" if "feed_forward" in names else None
    return None


def add_lora(
    model: nnx.Module, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("attention", "mlp"), seed=0
) -> int:
    """Attach a LoRA adapter to every projection of ``targets`` (:data:`TARGETS`) in place; returns how many.

    The adapters' dtype is the kernels' (the model's float compute dtype where a kernel is quantized: QLoRA).
    Raises :class:`InvalidInputError` for an unknown target, a target the model
    does not have (``"cross"`` on a text model), a bad rank, alpha or seed, or a model that already has adapters.
    """
    _check_model(model, "add_lora")
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        raise InvalidInputError(
            f"LoRA targets must be a sequence of names from {TARGETS} (e.g. ('attention',)), got {targets!r}"
        )
    unknown = sorted(str(t) for t in set(targets) - set(TARGETS))
    if unknown or not targets:
        raise InvalidInputError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise InvalidInputError(f"LoRA rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if (
        isinstance(alpha, (bool, np.bool_))
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise InvalidInputError(f"LoRA alpha must be a finite number > 0 (the scale is alpha / rank), got {alpha!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InvalidInputError(f"LoRA seed must be an int in [0, 2**32), got {seed!r}")
    if has_lora(model):
        raise InvalidInputError("the model already has LoRA adapters (merge_lora folds them in first)")
    rngs = nnx.Rngs(seed)
    found = {t: 0 for t in targets}
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, (Einsum, HeadsProjection, MergeHeadsProjection)):
            continue
        target = _target_of(path)
        if target not in found:
            continue
        n_in, n_out, in_axis, out_axis, stack = _geometry(node)
        dtype = node.kernel.dtype if getattr(node, "quant", None) is None else compute_dtype(model)
        node.lora = LoRA(n_in, n_out, in_axis, out_axis, rank=rank, alpha=alpha, dtype=dtype, stack=stack, rngs=rngs)
        found[target] += 1
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        raise InvalidInputError(f"the model has no projections for LoRA target(s) {missing}")
    return sum(found.values())


def _check_model(model, where: str) -> None:
    if not isinstance(model, nnx.Module):
        raise InvalidInputError(
            f"{where} needs an nnx.Module (init_model / load_params, or lj.load(...).module), "
            f"got {type(model).__name__}"
        )


def _adapted(model: nnx.Module, where: str = "has_lora"):
    _check_model(model, where)
    return [node for _, node in nnx.iter_graph(model) if getattr(node, "lora", None) is not None]


def has_lora(model: nnx.Module) -> bool:
    return bool(_adapted(model))


def lora_param_count(model: nnx.Module) -> int:
    _check_model(model, "lora_param_count")
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (``W += (alpha / r) B A``, computed in fp32) and remove the adapters;
    returns the model (changed in place), which then has exactly the structure of one without LoRA.

    On a quantized model (QLoRA) the result is a float model: each adapted kernel becomes its fp32 dequantized
    weight plus the delta, and every remaining quantized weight is dequantized (module docstring)."""
    adapted = _adapted(model, "merge_lora")
    quantized = getattr(model, "quant_config", None) is not None or any(p.quant is not None for p in adapted)
    dtype = compute_dtype(model)
    for proj in adapted:
        if proj.quant is not None:  # QLoRA: dequantize in fp32, add, keep a float kernel
            kernel = dequantized_kernel(proj)
            set_float_kernel(proj, (kernel + proj.lora.delta().reshape(kernel.shape)).astype(dtype))
        else:
            kernel = proj.kernel[...]
            delta = proj.lora.delta().reshape(kernel.shape)  # the flattened [out, in] order is the kernel's own
            proj.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        proj.lora = None
    if quantized:
        dequantize_model(model, dtype)
    return model
