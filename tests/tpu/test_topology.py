"""``llama32_jax.sharding.tpu``: TPU slices for ahead-of-time compiles, the plans' ``topology`` key, the chip table,
and libtpu kept quiet on a host without TPU chips."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llama32_jax import sharding
from llama32_jax.sharding import tpu
from llama32_jax.sharding.plan import plan_from_dict
from tests.conftest import require
from tests.tpu.conftest import plan_mesh

TPU_PLANS = ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16", "tpu-v5e-1"]


def test_shipped_tpu_plans_name_their_topology():
    assert sorted(tpu.tpu_plans()) == sorted(TPU_PLANS)
    for name in TPU_PLANS:
        plan = sharding.load_plan(name)
        chip = tpu.chip(plan.topology)
        assert chip is tpu.chip(plan.devices), (name, plan.topology, plan.devices)


@pytest.mark.parametrize("name", TPU_PLANS)
def test_plan_mesh_is_the_topology_chips(name):
    plan = sharding.load_plan(name)
    mesh = plan_mesh(name)
    assert dict(mesh.shape) == plan.mesh_dict
    devices = list(mesh.devices.flat)
    assert len({d.id for d in devices}) == plan.size
    assert {d.platform for d in devices} == {"tpu"}
    assert {tpu.chip(d.device_kind).generation for d in devices} == {tpu.chip(plan.devices).generation}


def test_chip_lookup_and_errors():
    assert tpu.chip("TPU v5 lite").generation == "v5e"
    assert tpu.chip("v5p:2x2x2").generation == "v5p"
    assert tpu.chip("TPU v6e").hbm_bytes == 32e9
    with pytest.raises(sharding.PlanError, match=r"unknown TPU chip 'v9z'.*v5e"):
        tpu.chip("v9z")


def test_plan_mesh_refuses_a_plan_without_topology():
    with pytest.raises(sharding.PlanError, match=r"'tp' names no TPU topology.*tpu-v5e-8"):
        tpu.plan_mesh("tp")


@pytest.mark.parametrize(
    ("topology", "match"),
    [
        ("v5e-8", r"mesh.topology must name a TPU slice as '<generation>:<chips per dimension>'"),
        ("v5e:2x", r"mesh.topology must name"),
        (8, r"mesh.topology must name"),
        ("v5e:2x2", r"mesh.topology 'v5e:2x2' has 4 chips but the mesh \{'tensor': 8\} has 8 devices"),
    ],
)
def test_plan_topology_is_validated(topology, match):
    data = {"mesh": {"shape": [8], "axes": ["tensor"], "topology": topology}, "rules": {"q_heads": "tensor"}}
    with pytest.raises(sharding.PlanError, match=match):
        plan_from_dict(data, "mine")


def test_missing_libtpu_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(tpu, "libtpu_installed", lambda: False)
    monkeypatch.setattr(tpu, "_TOPOLOGIES", {})
    with pytest.raises(tpu.TpuCompilerUnavailable, match=r"'v6e:2x4' needs the XLA:TPU compiler.*tpu-compile"):
        tpu.topology_devices("v6e:2x4")


def test_unknown_topology_is_a_typed_error():
    require("libtpu")
    with pytest.raises(sharding.PlanError, match="unknown TPU chip 'v9:2x2'"):
        tpu.topology_devices("v9:2x2")
    with pytest.raises(tpu.TpuCompilerUnavailable, match=r"libtpu cannot describe TPU topology 'v5e:3x7'"):
        tpu.topology_devices("v5e:3x7")


def test_quiet_changes_nothing_on_a_tpu_host(monkeypatch):
    for key in tpu._CPU_HOST_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tpu, "has_tpu_chips", lambda: True)
    assert tpu.quiet_libtpu_on_cpu_host() is False
    assert not any(key in os.environ for key in tpu._CPU_HOST_ENV)


def test_quiet_never_overrides_a_setting(monkeypatch):
    monkeypatch.setattr(tpu, "has_tpu_chips", lambda: False)
    monkeypatch.setattr(tpu, "libtpu_installed", lambda: True)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")
    tpu.quiet_libtpu_on_cpu_host()
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v6e-8"


_START_JAX = "import jax; print(jax.devices()[0].platform)"


@pytest.mark.skipif(tpu.has_tpu_chips(), reason="this host has TPU chips: libtpu initialises for real")
def test_libtpu_start_up_is_quiet_on_a_cpu_host():
    """With libtpu installed, a bare JAX start prints libtpu's warnings; after quiet_libtpu_on_cpu_host none, and
    JAX still runs on the CPU. (The bare run lifts libtpu's one-process lock itself: while another process holds
    it, as a compiling pytest worker may, libtpu skips its initialisation silently.)"""
    require("libtpu")
    env = {k: v for k, v in os.environ.items() if k not in tpu._CPU_HOST_ENV and k != "JAX_PLATFORMS"}
    quiet = "from llama32_jax.sharding.tpu import quiet_libtpu_on_cpu_host; quiet_libtpu_on_cpu_host(); "
    runs = {}
    for name, code, extra in (
        ("bare", _START_JAX, {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}),
        ("quiet", quiet + _START_JAX, {}),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "cpu"
        runs[name] = proc.stderr
    assert "TPU" in runs["bare"]  # what is being silenced
    assert runs["quiet"] == ""
