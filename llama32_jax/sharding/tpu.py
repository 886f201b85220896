"""Compiling for Cloud TPU without a TPU: libtpu's ahead-of-time topologies.

With the ``libtpu`` package installed (``pip install 'llama32_jax[tpu-compile]'``, or ``jax[tpu]``), XLA:TPU runs on
any x86 host. :func:`topology_devices` returns the devices of a named TPU slice (``"v5e:2x4"``); they can carry
shardings and a program can be traced, lowered and *compiled* for them, but no array can live on them::

    from llama32_jax import sharding
    from llama32_jax.sharding import tpu

    plan = sharding.load_plan("tpu-v5e-8")
    mesh = tpu.plan_mesh(plan)                      # the plan's mesh over the v5e:2x4 slice's 8 chips
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    compiled = jax.jit(step).trace(x, ...).lower().compile()
    compiled.memory_analysis()                      # one chip's argument / output / temporary bytes, from XLA:TPU
    compiled.cost_analysis()["optimal_seconds"]     # XLA:TPU's own estimate of the step time

Pallas TPU kernels (Mosaic) compile this way too, for the chip generation of the mesh's devices. What it cannot
show: the numbers the chip computes (nothing executes) and the real speed (``optimal_seconds`` is the compiler's
cost model, not a measurement).

On a host without TPU chips, libtpu's initialisation prints warnings about the missing TPU metadata (accelerator
type, worker hostnames) whenever JAX starts its backends, and only one process at a time may load it.
:func:`quiet_libtpu_on_cpu_host` fills in those settings and lifts the lock *only* when the host has no TPU device
files (``/dev/accel*``, ``/dev/vfio/<n>``); JAX then falls back to its other backends as before.

Chip facts (:data:`CHIPS`): HBM capacity, bf16 peak and HBM bandwidth are Google Cloud's published per-chip
figures (cloud.google.com/tpu/docs/v5e, /v5p, /v6e); VMEM per TensorCore and the default scoped-VMEM limit that
Mosaic gives a kernel are those of the installed JAX's Pallas TPU backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Iterator
from typing import Any

from llama32_jax.errors import LlamaJaxError
from llama32_jax.sharding.plan import Plan, PlanError, available_plans, load_plan

MIB = 1 << 20


class TpuCompilerUnavailable(LlamaJaxError, RuntimeError):
    """libtpu (the XLA:TPU compiler) is not installed, or cannot describe the requested topology."""


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """One TPU generation, per chip (one JAX device: v5p's two TensorCores act as one megacore device)."""

    generation: str  # "v5e"
    plan_devices: str  # the plan files' ``devices`` value, "TPU v5e"
    device_kinds: tuple[str, ...]  # what JAX's devices report, "TPU v5 lite"
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bandwidth: float  # bytes/s
    vmem_bytes: int  # per TensorCore
    scoped_vmem_bytes: int  # Mosaic's default per-kernel VMEM limit (CompilerParams.vmem_limit_bytes raises it)
    topologies: tuple[str, ...]  # slices libtpu can describe, smallest first


CHIPS: dict[str, TpuChip] = {
    "v5e": TpuChip("v5e", "TPU v5e", ("TPU v5 lite", "TPU v5e"), 16e9, 197e12, 819e9, 128 * MIB, 16 * MIB,
                   ("v5e:2x2", "v5e:2x4", "v5e:4x4")),
    "v5p": TpuChip("v5p", "TPU v5p", ("TPU v5", "TPU v5p"), 95e9, 459e12, 2765e9, 64 * MIB, 16 * MIB,
                   ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4")),
    "v6e": TpuChip("v6e", "TPU v6e", ("TPU v6 lite", "TPU v6e"), 32e9, 918e12, 1640e9, 128 * MIB, 32 * MIB,
                   ("v6e:2x2", "v6e:2x4", "v6e:4x4")),
}  # fmt: skip


def chip(name: str) -> TpuChip:
    """The :class:`TpuChip` for a generation (``"v5e"``), a plan's ``devices`` (``"TPU v5e"``), a JAX
    ``device_kind`` (``"TPU v5 lite"``) or a topology (``"v5e:2x4"``)."""
    key = name.split(":")[0] if isinstance(name, str) else name
    for c in CHIPS.values():
        if key == c.generation or key == c.plan_devices or key in c.device_kinds:
            return c
    raise PlanError(
        f"unknown TPU chip {name!r}; known: "
        + ", ".join(f"{c.generation} ({c.plan_devices}, device kind {c.device_kinds[0]!r})" for c in CHIPS.values())
    )


def has_tpu_chips() -> bool:
    """Whether this host has TPU device files (a TPU VM), as libtpu itself looks for them."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def libtpu_version() -> str:
    """The installed libtpu's version (what the compiler results record), or "" without it."""
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return ""


# libtpu's metadata settings, filled in on a host with no TPU chips so that its initialisation stays quiet, and
# its one-process-per-host lock (/tmp/libtpu_lockfile) lifted: with no chips to share, several processes (pytest
# workers, a compile sweep beside them) may each load the compiler.
_CPU_HOST_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",
    "TPU_WORKER_ID": "0",
    "TPU_WORKER_HOSTNAMES": "localhost",
}


def quiet_libtpu_on_cpu_host() -> bool:
    """Silence libtpu's start-up warnings on a host without TPU chips; returns whether it changed anything.

    Sets libtpu's metadata variables (never overriding one already set) only when libtpu is installed and the
    host has no TPU device files, so a real TPU VM is never touched. Call it before JAX starts its backends
    (the first ``jax.devices()``, array or compile); it changes nothing after that.
    """
    if not libtpu_installed() or has_tpu_chips():
        return False
    changed = False
    for key, value in _CPU_HOST_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            changed = True
    return changed


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Redirect file descriptor 2 (libtpu writes there from C++) for the duration."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_TOPOLOGIES: dict[str, Any] = {}


def topology_devices(topology: str) -> list[Any]:
    """The devices of TPU slice ``topology`` (``"v5e:2x4"``, ``"v5p:2x2x2"``, ``"v6e:2x4"``, ``"v5e:4x4"``...),
    for ahead-of-time compilation; raises :class:`TpuCompilerUnavailable` without libtpu."""
    if topology in _TOPOLOGIES:
        return list(_TOPOLOGIES[topology].devices)
    if not libtpu_installed():
        raise TpuCompilerUnavailable(
            f"compiling for TPU topology {topology!r} needs the XLA:TPU compiler: "
            "pip install 'llama32_jax[tpu-compile]' (the libtpu wheel that matches your jax; "
            "a TPU VM has it already)"
        )
    chip(topology)  # a known generation, or a PlanError naming the known ones
    quiet_libtpu_on_cpu_host()
    from jax.experimental import topologies

    # libtpu's default host is 2x2 chips, and it rejects a slice that does not fill whole hosts ("v5e:1x1" is "not
    # divisible by chips_per_host_bounds 2x2x1"): a slice of fewer chips is one host of exactly its own chips.
    layout = [int(n) for n in topology.split(":")[1].split("x")] if ":" in topology else []
    kwargs = {}
    if layout and all(n > 0 for n in layout) and len(layout) <= 3 and math.prod(layout) < 4:
        kwargs["chips_per_host_bounds"] = [*layout, *[1] * (3 - len(layout))]
    try:
        with _stderr_to_devnull():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:  # libtpu's own error types differ between versions
        raise TpuCompilerUnavailable(
            f"libtpu cannot describe TPU topology {topology!r}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    _TOPOLOGIES[topology] = desc
    return list(desc.devices)


def plan_mesh(plan: str | os.PathLike | Plan):
    """The plan's mesh over the chips of its TPU ``topology`` (plans ``tpu-*``), laid out by
    ``jax.experimental.mesh_utils`` so that the mesh's last axes follow the physical ICI rings."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    plan = load_plan(plan)
    if plan.topology is None:
        raise PlanError(
            f'sharding plan {plan.name!r} names no TPU topology ([mesh] topology = "v5e:2x4"); plans that do: '
            + ", ".join(_tpu_plan_names())
        )
    devices = topology_devices(plan.topology)
    if len(devices) != plan.size:
        raise PlanError(f"plan {plan.name!r}: topology {plan.topology!r} has {len(devices)} chips, mesh {plan.size}")
    try:
        grid = mesh_utils.create_device_mesh(plan.mesh_shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a shape mesh_utils has no physical layout for
        grid = np.asarray(devices, dtype=object).reshape(plan.mesh_shape)
    return Mesh(grid, plan.mesh_axes)


def _tpu_plan_names() -> list[str]:
    return [n for n in available_plans() if load_plan(n).topology]


def tpu_plans() -> list[str]:
    """The shipped plans that name a TPU topology (compile targets of the AOT tests and experiments)."""
    return _tpu_plan_names()
