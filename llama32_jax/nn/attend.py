"""The model's attention calls: one function per op that picks the implementation and, under a sharding plan,
runs a Pallas kernel per device with ``jax.shard_map``.

The model never calls a kernel directly: :class:`llama32_jax.models.text.SelfAttention` calls :func:`self_attend` and
:class:`llama32_jax.models.cross_attention.CrossAttention` calls :func:`cross_attend`, passing the module's
``attention_impl`` (``"xla"``, ``"pallas"`` or ``"auto"``; set by ``llama32_jax.load(..., attention_impl=...)`` or
:func:`set_attention_impl`) and its :class:`~llama32_jax.sharding.Placement`.

Why ``shard_map``: XLA partitions its own attention from the operands' shardings, but a ``pallas_call`` is opaque to
the partitioner, which would gather every operand onto every device. Attention is independent per sequence and per
kv head, so each device runs the kernel on its own batch rows and heads, exactly as the plan lays them out
(``batch`` over the data axes, query and kv heads over the tensor axes: a kv head and its query heads always land
on the same device because both head counts are split by the same factor). The key/sequence axes must be
unsharded for that, and a plan that shards them is refused with a :class:`~llama32_jax.sharding.PlanError`.

The devices decide the implementation: with a placement, ``"auto"`` and the Pallas flavour follow the platform of
the placement's mesh (a mesh of TPU devices gets the Mosaic kernels, not interpreted, even when the process's
default backend is the CPU: that is how ``llama32_jax.sharding.tpu`` compiles the model for a TPU slice ahead of
time); without one, the default backend's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from llama32_jax import dims
from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import BACKENDS, resolve_impl
from llama32_jax.kernels.cross_attention import cross_attention as cross_attention_kernel
from llama32_jax.kernels.decode_attention import decode_attention
from llama32_jax.kernels.flash_attention import flash_attention
from llama32_jax.nn import attention as xla
from llama32_jax.sharding.plan import PlanError, partition_spec

# Up to this many new tokens per call, self-attention against a cache uses the split-K decode kernel; longer calls
# (prefill, chunked prefill) use the flash kernel.
DECODE_MAX_TOKENS = 16

_Q_AXES = (dims.BATCH, None, dims.Q_HEADS, None)  # [B, T, N, H]
_KV_AXES = (dims.BATCH, dims.KV_HEADS, None, None)  # [B, K, S, H]


def self_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_offset: jax.Array,
    kv_start: jax.Array,
    kv_end: jax.Array,
    impl: str = "xla",
    placement=None,
    cached: bool = False,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA self-attention of ``q [B, T, N, H]`` over ``k, v [B, K, S, H]`` (see
    :func:`llama32_jax.nn.attention.self_attention` for the argument semantics).

    ``cached``: ``k``/``v`` are a KV cache being decoded into; with at most :data:`DECODE_MAX_TOKENS` queries the
    Pallas implementation then uses ``decode_attention`` (split along the cache), otherwise ``flash_attention``.
    ``segment_ids [B, T]`` (packed training rows) are honoured by the XLA implementation only: with ``"auto"``
    they select it; with ``"pallas"`` they are refused.
    """
    if segment_ids is not None:
        if impl == "pallas":
            raise InvalidInputError(
                "packed sequences (segment_ids) are not supported by the Pallas kernels; use attention_impl='xla' "
                "or 'auto', or unpacked batches"
            )
        impl = "xla"
    target = _mesh_platform(placement)
    if resolve_impl(impl, target) == "xla":
        return xla.self_attention(q, k, v, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end, segment_ids=segment_ids)
    op = decode_attention if cached and q.shape[1] <= DECODE_MAX_TOKENS else flash_attention
    flavour = _flavour(target)

    def run(q, k, v, q_offset, kv_start, kv_end):
        return op(q, k, v, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end, impl="pallas", **flavour)

    args = (q, k, v, jnp.asarray(q_offset, jnp.int32), kv_start, kv_end)
    if placement is None:
        return run(*args)
    specs = _specs(placement, q, k, ((), (dims.BATCH,), (dims.BATCH,)), args[3:])
    return _shard_map(run, placement, specs, _spec(placement, _Q_AXES, q.shape, "attention queries"))(*args)


def cross_attend(
    q: jax.Array, k: jax.Array, v: jax.Array, tile_mask: jax.Array, *, impl: str = "xla", placement=None
) -> jax.Array:
    """Mllama cross-attention of ``q [B, T, N, H]`` over vision ``k, v [B, K, N_v, H]`` with ``tile_mask [B, T, I,
    R]`` (:func:`llama32_jax.nn.attention.cross_attention`); ``N_v = I * R * P`` gives the tokens per tile ``P``."""
    i, r = tile_mask.shape[2:]
    tokens_per_tile = k.shape[2] // max(i * r, 1)
    target = _mesh_platform(placement)
    if resolve_impl(impl, target) == "xla":
        return xla.cross_attention(q, k, v, tile_mask, tokens_per_tile=tokens_per_tile)
    flavour = _flavour(target)

    def run(q, k, v, tile_mask):
        return cross_attention_kernel(q, k, v, tile_mask, tokens_per_tile=tokens_per_tile, impl="pallas", **flavour)

    args = (q, k, v, tile_mask)
    if placement is None:
        return run(*args)
    specs = _specs(placement, q, k, ((dims.BATCH, None, None, None),), args[3:])
    return _shard_map(run, placement, specs, _spec(placement, _Q_AXES, q.shape, "attention queries"))(*args)


def _mesh_platform(placement) -> str | None:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: the platform of the placement's devices (None without a placement)."""
    if placement is None:
        return None
    name = placement.mesh.devices.flat[0].platform
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def _flavour(target: str | None) -> dict:
    """The kernels' ``backend`` / ``interpret`` for devices of platform ``target`` (defaults when it is the CPU or
    unknown: the kernels then decide from the default backend, interpreted on CPU)."""
    if target in BACKENDS:
        return {"backend": target, "interpret": False}
    return {}


def _spec(placement, axes, shape, where: str) -> PartitionSpec:
    return partition_spec(placement.plan, axes, shape, where)


def _specs(placement, q, k, extra_axes, extra) -> tuple[PartitionSpec, ...]:
    for logical in (dims.SEQ, dims.CACHE_SEQ):
        if placement.plan.rule(logical):
            raise PlanError(
                f"plan {placement.plan.name!r} shards the {logical!r} axis, but the Pallas attention kernels need "
                "whole sequences per device; use attention_impl='xla' or a plan without sequence sharding"
            )
    kv = _spec(placement, _KV_AXES, k.shape, "attention keys/values [batch, kv_heads, seq, head_dim]")
    out = [_spec(placement, _Q_AXES, q.shape, "attention queries [batch, seq, q_heads, head_dim]"), kv, kv]
    for axes, x in zip(extra_axes, extra, strict=True):
        out.append(_spec(placement, axes, x.shape, "attention mask inputs"))
    return tuple(out)


def _shard_map(fn, placement, in_specs, out_spec):
    return jax.shard_map(fn, mesh=placement.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)


def set_attention_impl(module: nnx.Module, impl: str) -> nnx.Module:
    """Make every attention module in ``module`` use ``impl`` (``"auto"``, ``"xla"`` or ``"pallas"``); returns it.

    The choice is a static attribute of each attention module, so jitted calls retrace when it changes."""
    resolve_impl(impl)  # validates
    for _, node in nnx.iter_graph(module):
        if hasattr(node, "attention_impl"):
            node.attention_impl = impl
    return module
