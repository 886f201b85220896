"""Sharding plans: a device mesh and rules from logical axis names to mesh axes, read from data files.

A plan is one TOML file (``sharding/<name>.toml``, docs/design.md §5)::

    [mesh]
    shape = [2, 4]                 # one entry per mesh axis
    axes = ["fsdp", "tensor"]
    devices = "H100"               # optional: the device kind the plan is written for (memory plans)
    hosts = 1                      # optional: processes the mesh spans
    topology = "v5e:2x4"           # optional, TPU plans: the slice, for compiling without a TPU (sharding.tpu)

    [rules]                        # logical axis (llama32_jax.dims, vision.py) -> mesh axis or list of axes
    batch = ["fsdp"]
    embed = "fsdp"
    q_heads = "tensor"

Logical names without a rule are replicated. Every parameter carries its logical axes (``nnx.Param(...,
axes=...)``), and so do the KV cache (``cache.LAYER_AXES``), the cross-attention keys/values and the activations
at block boundaries (``[batch, seq, embed]``, batch-sharded only). :func:`partition_spec` turns axes + shape into a
``PartitionSpec`` and rejects, before anything compiles, a dimension that does not divide its mesh axes and two
dimensions of one array on the same mesh axis, naming the parameter, its shape and the axis.

Typical use::

    plan = sharding.load_plan("tp")                       # or a path, or a Plan
    mesh = sharding.make_mesh(plan)                       # the first plan.size devices
    model = sharding.shard_model(model, plan, mesh)       # params placed; activations constrained from now on
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llama32_jax import dims
from llama32_jax.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _plan_dir() -> Path:
    """Where the named plans are: the wheel ships the repository's ``sharding/*.toml`` as the package data
    ``llama32_jax/plans/`` (see ``setup.py``); a source checkout (or an editable install) reads ``sharding/``."""
    package = Path(__file__).resolve().parent.parent  # llama32_jax/
    installed = package / "plans"
    return installed if installed.is_dir() else package.parent / "sharding"


PLAN_DIR = _plan_dir()


class PlanError(ConfigError):
    """A sharding plan is malformed, or cannot shard some array of the model (collision, indivisible shape)."""


def _known_axes() -> frozenset[str]:
    extra = (dims.BATCH, dims.SEQ, dims.CACHE_SEQ, VISION_TOKENS_AXIS)
    return frozenset((*dims.PARAM_AXES, *dims.VISION_PARAM_AXES, *extra))


# The vision tokens' axis of the cross-attention keys/values ([B, K, N_v, H]).
VISION_TOKENS_AXIS = "vision_seq"
CROSS_KV_AXES = (dims.BATCH, dims.KV_HEADS, VISION_TOKENS_AXIS, dims.HEAD_DIM)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh (``shape`` x ``axes``) and logical -> mesh-axis ``rules``. Hashable: models keep it as static state."""

    name: str
    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...]
    devices: str | None = None
    hosts: int = 1
    topology: str | None = None

    @property
    def mesh_dict(self) -> dict[str, int]:
        return dict(zip(self.mesh_axes, self.mesh_shape, strict=True))

    @property
    def size(self) -> int:
        return math.prod(self.mesh_shape)

    def rule(self, logical: str) -> tuple[str, ...]:
        """The mesh axes ``logical`` is sharded over (empty: replicated)."""
        return dict(self.rules).get(logical, ())

    def axis_size(self, mesh_axes: Sequence[str]) -> int:
        sizes = dict(zip(self.mesh_axes, self.mesh_shape, strict=True))
        return math.prod(sizes[a] for a in mesh_axes)

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split (a batch must be a multiple of it)."""
        return self.axis_size(self.rule(dims.BATCH))

    def notation(self) -> str:
        """Scaling-book notation of the main arrays, e.g. ``x[B_{fsdp}, T, D] · Wq[N_{tensor}, H, D_{fsdp}]``."""

        def arr(name: str, letters_axes: Sequence[tuple[str, str | None]]) -> str:
            parts = []
            for letter, logical in letters_axes:
                r = self.rule(logical) if logical else ()
                parts.append(letter + (f"_{{{','.join(r)}}}" if r else ""))
            return f"{name}[{', '.join(parts)}]"

        E, N, K, H, F, V = dims.EMBED, dims.Q_HEADS, dims.KV_HEADS, dims.HEAD_DIM, dims.MLP, dims.VOCAB
        arrays = [
            arr("x", [("B", dims.BATCH), ("T", None), ("D", None)]),
            arr("Wq", [("N", N), ("H", H), ("D", E)]),
            arr("Wkv", [("K", K), ("H", H), ("D", E)]),
            arr("Wo", [("D", E), ("N", N), ("H", H)]),
            arr("W13", [("F", F), ("D", E)]),
            arr("W2", [("D", E), ("F", F)]),
            arr("Emb", [("V", V), ("D", E)]),
            arr("KV", [("B", dims.BATCH), ("K", K), ("S", dims.CACHE_SEQ), ("H", H)]),
        ]
        return " · ".join(arrays)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def plan_from_dict(data: Mapping[str, Any], name: str) -> Plan:
    """Validate a parsed plan file (``{"mesh": {...}, "rules": {...}}``) into a :class:`Plan`."""
    where = f"sharding plan {name!r}"
    if not isinstance(data, Mapping):
        raise PlanError(f"{where}: a plan is a table with [mesh] and [rules], got {type(data).__name__}")
    unknown = set(data) - {"mesh", "rules"}
    if unknown:
        raise PlanError(f"{where}: unknown top-level tables {sorted(unknown)}; a plan has only [mesh] and [rules]")
    mesh = data.get("mesh")
    if not isinstance(mesh, Mapping):
        raise PlanError(f"{where}: missing [mesh] table (shape = [...], axes = [...])")
    extra = set(mesh) - {"shape", "axes", "devices", "hosts", "topology"}
    if extra:
        raise PlanError(f"{where}: unknown [mesh] keys {sorted(extra)}; valid: shape, axes, devices, hosts, topology")
    shape, axes = mesh.get("shape"), mesh.get("axes")
    if not isinstance(shape, (list, tuple)) or not shape:
        raise PlanError(f"{where}: mesh.shape must be a non-empty list of positive integers, got {shape!r}")
    for i, s in enumerate(shape):
        if not _is_int(s) or s < 1:
            raise PlanError(
                f"{where}: mesh.shape must be a non-empty list of positive integers, got {list(shape)!r} "
                f"(mesh.shape[{i}] = {s!r}, a {type(s).__name__})"
            )
    if (
        not isinstance(axes, (list, tuple))
        or len(axes) != len(shape)
        or not all(isinstance(a, str) and a for a in axes)
    ):
        raise PlanError(
            f"{where}: mesh.axes must name each of the {len(shape)} mesh dimensions with a non-empty string, "
            f"got {axes!r}"
        )
    if len(set(axes)) != len(axes):
        raise PlanError(f"{where}: mesh.axes {list(axes)} repeats a name")
    shape, axes = [int(s) for s in shape], list(axes)
    devices, hosts = mesh.get("devices"), mesh.get("hosts", 1)
    if devices is not None and not isinstance(devices, str):
        raise PlanError(f"{where}: mesh.devices must be a device kind string such as 'H100', got {devices!r}")
    if not _is_int(hosts) or hosts < 1 or math.prod(shape) % hosts:
        raise PlanError(f"{where}: mesh.hosts must be a positive divisor of the mesh size, got {hosts!r}")
    topology = mesh.get("topology")
    if topology is not None:
        dims_ = _topology_dims(topology)
        if dims_ is None:
            raise PlanError(
                f"{where}: mesh.topology must name a TPU slice as '<generation>:<chips per dimension>', e.g. "
                f"'v5e:2x4' or 'v5p:2x2x2', got {topology!r}"
            )
        if math.prod(dims_) != math.prod(shape):
            raise PlanError(
                f"{where}: mesh.topology {topology!r} has {math.prod(dims_)} chips but the mesh "
                f"{dict(zip(axes, shape, strict=True))} has {math.prod(shape)} devices"
            )
    rules_in = data.get("rules", {})
    if not isinstance(rules_in, Mapping):
        raise PlanError(f"{where}: [rules] must be a table of logical axis = mesh axis (or list of axes)")
    known = _known_axes()
    rules = []
    for logical, target in rules_in.items():
        if logical not in known:
            raise PlanError(f"{where}: rule for unknown logical axis {logical!r}; known: {sorted(known)}")
        target = [target] if isinstance(target, str) else target
        if not isinstance(target, (list, tuple)) or not all(isinstance(t, str) for t in target):
            raise PlanError(f"{where}: rule {logical} must be a mesh axis name or a list of them, got {target!r}")
        target = list(target)
        bad = [t for t in target if t not in axes]
        if bad:
            raise PlanError(f"{where}: rule {logical} = {target} names {bad}, not axes of the mesh {axes}")
        if len(set(target)) != len(target):
            raise PlanError(f"{where}: rule {logical} = {target} repeats a mesh axis")
        rules.append((logical, tuple(target)))
    return Plan(name, tuple(shape), tuple(axes), tuple(rules), devices, int(hosts), topology)


def _topology_dims(topology: Any) -> tuple[int, ...] | None:
    """``(2, 4)`` for ``"v5e:2x4"``; None when ``topology`` is not of the form ``<generation>:<AxB[xC]>``."""
    if not isinstance(topology, str) or topology.count(":") != 1:
        return None
    generation, chips = topology.split(":")
    parts = chips.split("x")
    if not generation or not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) not in (2, 3):
        return None
    return tuple(int(p) for p in parts)


def available_plans() -> list[str]:
    """Names of the plans in ``sharding/``."""
    return sorted(p.stem for p in PLAN_DIR.glob("*.toml"))


_PLAN_KINDS = "a plan name in sharding/ (one of {names}), a .toml path{or_} a sharding.Plan"


def load_plan(plan: str | os.PathLike | Plan, *, what: str = "plan") -> Plan:
    """A :class:`Plan` from a name in ``sharding/`` (``"tp"``, ``"h100x8"``), a ``.toml`` path, or a Plan.

    ``what`` names the argument in error messages (e.g. ``"mesh"`` for :func:`llama32_jax.load`)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mesh):
        raise PlanError(f"{what}: load_plan takes a plan, not a jax Mesh; pass the Mesh to sharding.resolve")
    if not isinstance(plan, (str, os.PathLike)):
        valid = _PLAN_KINDS.format(names=available_plans(), or_=" or")
        raise PlanError(f"{what} must be {valid}; got {type(plan).__name__} {plan!r}")
    path = Path(plan)
    if not str(plan):
        raise PlanError(f"{what} is an empty string; valid: {_PLAN_KINDS.format(names=available_plans(), or_=' or')}")
    if path.suffix != ".toml":
        named = PLAN_DIR / f"{path.name}.toml"
        if path.name == str(plan) and named.is_file():
            path = named
        else:
            hint = " (a plan file's name must end in .toml)" if path.is_file() else " (or a .toml path)"
            raise PlanError(f"{what}: no sharding plan named {str(plan)!r}; available: {available_plans()}{hint}")
    if path.is_dir():
        raise PlanError(f"{what}: sharding plan path {str(path)!r} is a directory, not a .toml plan file")
    if not path.is_file():
        raise PlanError(
            f"{what}: sharding plan file {str(path)!r} does not exist; named plans available: {available_plans()}"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PlanError(f"{what}: cannot read sharding plan file {str(path)!r}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PlanError(
            f"{what}: sharding plan file {str(path)!r} is not UTF-8 text (byte {raw[e.start]:#04x} on line {line}, "
            f"offset {e.start}); a plan is a TOML file"
        ) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{what}: sharding plan {str(path)!r} is not valid TOML: {e}") from e
    try:
        return plan_from_dict(data, path.stem)
    except PlanError as e:
        raise PlanError(f"{what}: in file {str(path)!r}: {e}") from None


def make_mesh(plan: str | os.PathLike | Plan, devices: Sequence[Any] | None = None) -> Mesh:
    """The plan's mesh over ``devices`` (default: the first ``plan.size`` of ``jax.devices()``, all hosts')."""
    plan = load_plan(plan)
    if devices is not None and (isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence)):
        raise PlanError(f"devices must be a sequence of jax devices, got {type(devices).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < plan.size:
        raise PlanError(
            f"sharding plan {plan.name!r} needs {plan.size} devices (mesh {plan.mesh_dict})"
            f" but {len(devices)} are available; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{plan.size} before importing jax"
        )
    return Mesh(np.asarray(devices[: plan.size], dtype=object).reshape(plan.mesh_shape), plan.mesh_axes)


def partition_spec(plan: Plan, axes: Sequence[str | None], shape: Sequence[int], where: str) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` and ``shape`` under ``plan``; raises
    :class:`PlanError` naming ``where`` for a dimension its mesh axes do not divide, or for two dimensions on one
    mesh axis."""
    if len(axes) != len(shape):
        raise PlanError(f"{where}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: dict[str, str] = {}
    entries = []
    for logical, size in zip(axes, shape, strict=True):
        mesh_axes = plan.rule(logical) if logical else ()
        for a in mesh_axes:
            if a in used:
                raise PlanError(
                    f"{where} {tuple(shape)} with axes {tuple(axes)}: logical axes {used[a]!r} and {logical!r} both "
                    f"map to mesh axis {a!r} in plan {plan.name!r}"
                )
            used[a] = logical
        n = plan.axis_size(mesh_axes)
        if size % n:
            raise PlanError(
                f"{where} {tuple(shape)} with axes {tuple(axes)}: {logical}={size} is not divisible by mesh axes "
                f"{list(mesh_axes)} of size {n} in plan {plan.name!r}"
            )
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


# Rules used when a bare Mesh is given: standard roles by axis name.
_ROLE_RULES = {
    "data": {dims.BATCH: "data"},
    "fsdp": {dims.BATCH: "fsdp", dims.EMBED: "fsdp", "vision_embed": "fsdp"},
    "tensor": {
        dims.Q_HEADS: "tensor",
        dims.KV_HEADS: "tensor",
        dims.MLP: "tensor",
        dims.VOCAB: "tensor",
        "vision_heads": "tensor",
        "vision_mlp": "tensor",
    },
}


def plan_for_mesh(mesh: Mesh) -> Plan:
    """A plan for a bare ``Mesh`` whose axes are named by role: ``data`` (batch), ``fsdp`` (batch + model
    width of the weights), ``tensor`` (heads, MLP width, vocabulary)."""
    unknown = [a for a in mesh.axis_names if a not in _ROLE_RULES]
    if unknown:
        raise PlanError(
            f"mesh axes {unknown} have no standard role; name mesh axes 'data', 'fsdp' or 'tensor', or pass a "
            f"plan (one of {available_plans()} or a .toml path)"
        )
    rules: dict[str, list[str]] = {}
    for axis in mesh.axis_names:
        for logical, target in _ROLE_RULES[axis].items():
            rules.setdefault(logical, []).append(target)
    shape = [int(mesh.shape[a]) for a in mesh.axis_names]
    return plan_from_dict({"mesh": {"shape": shape, "axes": list(mesh.axis_names)}, "rules": rules}, "mesh")


def resolve(plan_or_mesh: str | os.PathLike | Plan | Mesh, *, what: str = "mesh") -> tuple[Plan, Mesh]:
    """``(plan, mesh)`` from a plan (name, path, Plan; mesh over the first devices) or a ``Mesh``.

    Anything else raises :class:`PlanError` naming the argument (``what``) and the valid kinds."""
    if isinstance(plan_or_mesh, Mesh):
        return plan_for_mesh(plan_or_mesh), plan_or_mesh
    if not isinstance(plan_or_mesh, (str, os.PathLike, Plan)):
        valid = _PLAN_KINDS.format(names=available_plans(), or_=",")
        raise PlanError(
            f"{what} must be {valid} or a jax.sharding.Mesh; got {type(plan_or_mesh).__name__} {plan_or_mesh!r}"
        )
    plan = load_plan(plan_or_mesh, what=what)
    return plan, make_mesh(plan)
