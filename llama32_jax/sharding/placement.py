"""Placing arrays by a plan inside the model: a sharded model's :class:`Placement` (plan + mesh), and the
``with_sharding_constraint`` helpers its layers call on activations, the KV cache and the cross-attention inputs.

Sits with ``llama32_jax.nn`` (imports ``dims``, ``sharding.plan``, ``nn.cache``); the models import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama32_jax import dims
from llama32_jax.nn.cache import LAYER_AXES, STACKED_AXES
from llama32_jax.sharding.plan import CROSS_KV_AXES, Plan, partition_spec


@dataclasses.dataclass(frozen=True)
class Placement:
    """What a sharded model keeps (static, hashable): the plan and its mesh. Layers read it to constrain
    activations; generation to place the KV cache and cross-attention inputs."""

    plan: Plan
    mesh: Mesh

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int], where: str) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(self.plan, axes, shape, where))

    def constrain(self, x: jax.Array, axes: Sequence[str | None], where: str = "activation") -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape, where))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def constrain_activation(placement: Placement | None, h: jax.Array) -> jax.Array:
    """Block-boundary activations ``[B, T, D]``: batch-sharded, replicated over the model axes."""
    if placement is None:
        return h
    return placement.constrain(h, (dims.BATCH, None, None), "activations [batch, seq, embed]")


def cache_axes(stacked: bool) -> tuple[str, ...]:
    return STACKED_AXES if stacked else LAYER_AXES


def constrain_cache(placement: Placement | None, cache):
    """The KV cache with every buffer constrained to its plan sharding (``start`` batch-sharded)."""
    if placement is None or cache is None:
        return cache
    axes = cache_axes(cache.stacked)
    if cache.stacked:
        k = placement.constrain(cache.k, axes, "KV cache k")
        v = placement.constrain(cache.v, axes, "KV cache v")
    else:
        k = tuple(placement.constrain(x, axes, f"KV cache k[{i}]") for i, x in enumerate(cache.k))
        v = tuple(placement.constrain(x, axes, f"KV cache v[{i}]") for i, x in enumerate(cache.v))
    start = placement.constrain(cache.start, (dims.BATCH,), "KV cache start")
    return dataclasses.replace(cache, k=k, v=v, start=start)


def constrain_cross(placement: Placement | None, cross):
    """Cross-attention inputs: each block's K/V ``[B, K, N_v, H]`` (stacked ``[C, ...]`` when scanned) and the
    tile mask ``[B, S, I, R]``, batch-sharded with K/V heads on the plan's kv_heads axes."""
    if placement is None or cross is None:
        return cross

    def kv_axes(x):
        return CROSS_KV_AXES if x.ndim == 4 else (dims.LAYERS, *CROSS_KV_AXES)

    kv = jax.tree.map(lambda x: placement.constrain(x, kv_axes(x), "cross-attention K/V"), cross.kv)
    mask = placement.constrain(cross.tile_mask, (dims.BATCH, None, None, None), "cross-attention tile mask")
    return dataclasses.replace(cross, kv=kv, tile_mask=mask)
