"""A wheel built from this checkout works outside it: installed without ``-e`` into a fresh virtualenv, it lists
and loads the named sharding plans (package data) and runs a tiny model under one."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLANS = sorted(p.stem for p in (ROOT / "sharding").glob("*.toml"))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import llama32_jax as lj
    from llama32_jax import configs, sharding

    module = lj.init_model(configs.TINY_TEXT, param_dtype=jnp.float32)
    ids = np.arange(1, 33).reshape(8, 4)  # 8 rows: one per fsdp shard
    want = np.asarray(lj.forward(module, jnp.asarray(ids))[0])
    lj.export_hf(lj.Model(module), sys.argv[1], dtype="float32")
    model = lj.load(sys.argv[1], dtype="float32", mesh="fsdp")
    got = model.logits(ids)
    print(json.dumps({
        "package": lj.__file__,
        "plans": sharding.available_plans(),
        "fsdp_mesh": dict(sharding.load_plan("fsdp").mesh_dict),
        "devices": len(jax.devices()),
        "max_abs_diff": float(np.max(np.abs(got - want))),
    }))
    """
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_ships_the_plans_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("llama32_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).stem for n in names if n.startswith("llama32_jax/plans/") and n.endswith(".toml")) == PLANS

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    # The dependencies (jax, flax, ...) come from this environment's site-packages, added as a plain path: its .pth
    # files, among them the editable install of this checkout, are not processed, so llama32_jax is the wheel's.
    venv_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    Path(venv_site, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = _run([str(python), "-c", SCRIPT, str(tmp_path / "hf")], cwd=tmp_path, env=env).stdout
    result = __import__("json").loads(out.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(venv), result["package"]
    assert result["plans"] == PLANS
    assert result["devices"] == 8 and result["fsdp_mesh"] == {"fsdp": 8}
    assert result["max_abs_diff"] <= 1e-5
