"""Sharding a model: parameter specs from a plan, plan validation against a config (no compile, no memory),
:func:`shard_model` (place the parameters and record the placement on the model) and checkpoint restore targets.

Above ``llama32_jax.models`` (it builds abstract models to read their parameters' logical axes).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama32_jax.models.build import abstract_model
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.sharding.placement import Placement
from llama32_jax.sharding.plan import Plan, PlanError, load_plan, make_mesh, partition_spec


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_specs(model: nnx.Module, plan: Plan) -> Any:
    """``nnx.State`` of the model's parameters with a ``PartitionSpec`` per leaf (works on abstract models)."""
    state = nnx.state(model, nnx.Param)

    def spec(path, variable):
        axes = variable.get_metadata().get("axes")
        if axes is None:
            raise PlanError(f"parameter {_path_str(path)} has no logical axes")
        return partition_spec(plan, axes, variable.shape, f"parameter {_path_str(path)}")

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.lru_cache(maxsize=16)
def param_axes(config) -> tuple[tuple[tuple, tuple[str, ...], tuple[int, ...]], ...]:
    """``(path, logical axes, shape)`` of every parameter of ``config`` (an abstract model, built once per config)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    paths = flatten_tree(nnx.to_pure_dict(state)).keys()
    out = []
    for path, (_, variable) in zip(paths, leaves, strict=True):
        out.append((path, tuple(variable.get_metadata()["axes"]), tuple(variable.shape)))
    return tuple(out)


def flat_param_specs(config, plan: Plan) -> dict[tuple, PartitionSpec]:
    """``{param path: PartitionSpec}`` for ``config``'s parameter tree (e.g. checkpoint restore targets)."""
    return {
        path: partition_spec(plan, axes, shape, f"parameter {'.'.join(map(str, path))}")
        for path, axes, shape in param_axes(config)
    }


def validate(config, plan: Plan) -> None:
    """Raise :class:`PlanError` unless ``plan`` can shard every parameter of ``config`` (no compile, no memory).

    Checked on the scanned layout: the same dimensions, plus the stacked layer axis."""
    flat_param_specs(config.replace(scan_layers=True), plan)


def shard_model(model: nnx.Module, plan: str | os.PathLike | Plan, mesh: Mesh | None = None) -> nnx.Module:
    """Place ``model``'s parameters by ``plan`` (on ``mesh``, default :func:`make_mesh`) and record the placement
    on it and its attention modules, so its calls constrain activations, caches and cross-attention inputs and
    run Pallas attention kernels per device. Returns the same module."""
    plan = load_plan(plan)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise PlanError(f"mesh must be a jax.sharding.Mesh or None (the plan's own mesh), got {type(mesh).__name__}")
    mesh = make_mesh(plan) if mesh is None else mesh
    if tuple(mesh.axis_names) != plan.mesh_axes or tuple(mesh.devices.shape) != plan.mesh_shape:
        raise PlanError(f"mesh {dict(mesh.shape)} does not match plan {plan.name!r} ({plan.mesh_dict})")
    specs = nnx.to_pure_dict(param_specs(model, plan))
    state = nnx.state(model, nnx.Param)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    placed = jax.device_put(nnx.to_pure_dict(state), shardings)
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    placement = Placement(plan, mesh)
    for _, node in nnx.iter_graph(model):  # the model and its attention modules (which shard_map their kernels)
        if isinstance(node, nnx.Module) and hasattr(node, "placement"):
            node.placement = placement
    return model


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def restore_shardings(config, plan: Plan, mesh: Mesh):
    """``fn(param_path, shape) -> NamedSharding`` for restoring ``config``'s per-layer checkpoint into the plan."""
    specs = flat_param_specs(config.replace(scan_layers=False), plan)

    def fn(path: tuple, shape: tuple) -> NamedSharding:
        return NamedSharding(mesh, specs[path])

    return fn
