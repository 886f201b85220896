"""Sharding a model: parameter specs from a plan, plan validation against a config (no compile, no memory),
:func:`shard_model` (place the parameters and record the placement on the model) and checkpoint restore targets.

Quantized models (:mod:`llama32_jax.models.quantize`) shard like float ones: a quantized kernel keeps its logical
axes, and its scale carries the kernel's output axes (int4: plus the first input axis, one entry per group), so a
scale lands on the devices holding its weights' output channels. An int4 kernel whose input axes a plan splits
must be split at group boundaries (:func:`check_quant_plan`), else a group would straddle two devices.

Above ``llama32_jax.models`` (it builds abstract models to read their parameters' logical axes).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama32_jax.models.build import abstract_model
from llama32_jax.models.quantize import quant_targets
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant.config import QuantConfig
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
def param_axes(config, quant: QuantConfig | None = None) -> tuple[tuple[tuple, tuple[str, ...], tuple[int, ...]], ...]:
    """``(path, logical axes, shape)`` of every parameter of ``config`` (an abstract model, built once per config);
    with ``quant``, of its quantized form (kernel scales included)."""
    state = nnx.state(abstract_model(config, quant=quant), nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    paths = flatten_tree(nnx.to_pure_dict(state)).keys()
    out = []
    for path, (_, variable) in zip(paths, leaves, strict=True):
        out.append((path, tuple(variable.get_metadata()["axes"]), tuple(variable.shape)))
    return tuple(out)


def flat_param_specs(config, plan: Plan, quant: QuantConfig | None = None) -> dict[tuple, PartitionSpec]:
    """``{param path: PartitionSpec}`` for ``config``'s parameter tree (e.g. checkpoint restore targets); with
    ``quant``, the quantized tree's (checked by :func:`check_quant_plan` first)."""
    check_quant_plan(config, plan, quant)
    return {
        path: partition_spec(plan, axes, shape, f"parameter {'.'.join(map(str, path))}")
        for path, axes, shape in param_axes(config, quant)
    }


def validate(config, plan: Plan, quant: QuantConfig | None = None) -> None:
    """Raise :class:`PlanError` unless ``plan`` can shard every parameter of ``config`` (no compile, no memory);
    with ``quant``, every parameter of the quantized model, scales included, with int4 groups kept whole.

    Checked on the scanned layout: the same dimensions, plus the stacked layer axis."""
    flat_param_specs(config.replace(scan_layers=True), plan, quant)


def check_quant_plan(config, plan: Plan, quant: QuantConfig | None) -> None:
    """Raise :class:`PlanError` if ``plan`` splits an int4 kernel's inputs inside a group (no memory used).

    A kernel ``[*out, *in]`` is quantized in groups of ``group`` consecutive inputs of its flattened input axes.
    If the plan splits an input axis, each device holds runs of ``size / shards * (the later input axes' sizes)``
    consecutive inputs; every run must be a whole number of groups, so that each device's scales describe its own
    values. (int8 has one scale per output channel: any split works.)"""
    if quant is None or quant.mode != "int4":
        return
    axes_of = {path: (axes, shape) for path, axes, shape in param_axes(config)}
    for kpath, target in quant_targets(config, quant).items():
        axes, shape = axes_of[kpath]
        inputs = list(zip(axes[-target.n_in :], shape[-target.n_in :], strict=True))
        for i in range(len(inputs) - 1, -1, -1):  # the innermost input axis the plan splits
            logical, size = inputs[i]
            mesh_axes = plan.rule(logical) if logical else ()
            shards = plan.axis_size(mesh_axes)
            if shards == 1:
                continue
            if size % shards:
                break  # partition_spec names the indivisible dimension
            run = size // shards * int(np.prod([s for _, s in inputs[i + 1 :]], dtype=np.int64))
            if run % target.group:
                name = ".".join(map(str, kpath))
                raise PlanError(
                    f"int4 parameter {name} {tuple(shape)} with axes {tuple(axes)}: plan {plan.name!r} splits its "
                    f"input axis {logical!r} ({size}) over mesh axes {list(mesh_axes)} of size {shards}, so each "
                    f"device holds runs of {run} inputs, not a multiple of the int4 group size {target.group}; use "
                    f"a group size that divides {run} (e.g. {math.gcd(run, target.group)}), int8, or a plan that "
                    f"keeps {logical!r} whole"
                )
            break


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
    check_quant_plan(model.config, plan, getattr(model, "quant_config", None))
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


def restore_shardings(config, plan: Plan, mesh: Mesh, quant: QuantConfig | None = None):
    """``fn(param_path, shape) -> NamedSharding`` for restoring ``config``'s per-layer checkpoint into the plan
    (``quant``: a quantized checkpoint's, its int values and scales included)."""
    specs = flat_param_specs(config.replace(scan_layers=False), plan, quant)

    def fn(path: tuple, shape: tuple) -> NamedSharding:
        if path not in specs:
            what = f"its {quant.describe()} model" if quant is not None else "its float model (quant=None)"
            raise PlanError(
                f"parameter {'.'.join(map(str, path))} is not a parameter of {config.name} as {what}: restore a "
                "quantized checkpoint with quant= its manifest's setting (orbax_ckpt.manifest_quant)"
            )
        return NamedSharding(mesh, specs[path])

    return fn
