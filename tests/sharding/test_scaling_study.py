"""experiments/scaling_study.py end to end at tiny size on 8 simulated CPU devices: the CSV, JSON and both plots,
a sweep killed mid-way and resumed (only the missing rows are computed), the depth-fitted XLA counts and timings.

The script runs as a subprocess, as from the command line: its absl flag names (``--dtype``, ``--seq_lens``,
``--max_seconds``, ...) are also bench_kernels', which another test imports, and absl allows one definition of a
name per process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP = [
    "--models=tiny-text",
    "--plans=single,fsdp,tp",  # tp (8-way) cannot split tiny-text's 2 kv heads: recorded as skipped
    "--batches=8",
    "--seq_lens=32,64",
    "--phases=prefill,decode,train",
    "--depth_fit=false",
    "--measure=false",
]
N_ROWS = 3 * 2 * 3  # plans x seq_lens x phases
PNG = b"\x89PNG\r\n\x1a\n"


def _cmd(out_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.scaling_study", f"--out_dir={out_dir}", *args]


def _env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def _run(out_dir: Path, *args: str) -> str:
    proc = subprocess.run(_cmd(out_dir, *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "scaling.csv", newline="") as f:
        return list(csv.DictReader(f))


def _key(r: dict) -> tuple:
    return (r["plan"], r["seq_len"], r["phase"])


def _tiny_flops(phase: str, b: int, t: int) -> float:
    """MaxText FLOPs of tiny-text (D=64, N=4, K=2, H=16, F=192, V=512, L=2), written out independently."""
    layer = 2 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 192)
    q, keys = (1, t) if phase == "decode" else (t, t / 2)
    head_rows = t if phase == "train" else 1
    forward = b * (2 * (q * layer + 4 * 4 * 16 * q * keys) + 2 * 64 * 512 * head_rows)
    return forward * (3 if phase == "train" else 1)


def _check_pngs(out_dir: Path) -> None:
    for name in ("roofline.png", "throughput_vs_devices.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


@pytest.mark.slow
def test_sweep_outputs_and_resume_after_kill(tmp_path):
    # A sweep killed (SIGKILL) once a few rows are on disk ...
    proc = subprocess.Popen(
        _cmd(tmp_path, *SWEEP), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    csv_path, deadline = tmp_path / "scaling.csv", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.exists() and csv_path.read_text().count("\n") >= 1 + 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = csv_path.read_text()
    done = _rows(tmp_path)
    assert 4 <= len(done) < N_ROWS

    # ... resumes: only the missing rows are computed, the finished ones are kept as they were.
    out = _run(tmp_path, *SWEEP)
    assert f"{N_ROWS - len(done)} rows computed" in out, out
    rows = _rows(tmp_path)
    assert csv_path.read_text().startswith(before.rsplit("\n", 1)[0])
    assert len(rows) == N_ROWS and len({_key(r) for r in rows}) == N_ROWS

    # Contents: every plan x seq_len x phase; tp skipped with its reason; memory and cost per device.
    by = {_key(r): r for r in rows}
    for (plan, t, phase), r in by.items():
        if plan == "tp":
            assert r["status"] == "skipped" and "not divisible" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["devices"] == ("1" if plan == "single" else "8") and r["platform"] == "cpu"
        assert float(r["compile_s"]) > 0 and float(r["peak_gb"]) > 0 and float(r["xla_flops"]) > 0
        assert float(r["total_gb"]) == pytest.approx(
            float(r["argument_gb"]) + float(r["output_gb"]) - float(r["alias_gb"]) + float(r["temp_gb"])
        )
        assert float(r["analytic_flops"]) == _tiny_flops(phase, 8, int(t))
        assert float(r["alias_gb"]) > 0  # the KV cache (prefill, decode) / parameters + optimiser state (train)
        assert r["target_device"] == "H100" and r["fits"] == "True"
        assert r["step_s"] == "" and r["xla_flops_fit"] == ""  # --measure=false, --depth_fit=false
        if phase == "train":
            assert r["train_mode"] == "full" and float(r["state_gb"]) > float(r["weights_gb"])  # AdamW moments
            # every tiny-text weight has the embed axis, which fsdp splits 8 ways (as do the moments)
            single = by["single", t, "train"]
            assert float(r["weights_gb"]) == pytest.approx(float(single["weights_gb"]) / int(r["devices"]))
    record = json.loads((tmp_path / "scaling.json").read_text())
    assert len(record["rows"]) == N_ROWS and record["machine"] and record["versions"]["jax"]
    assert "MaxText" in record["conventions"]["flops"] and "once" in record["conventions"]["xla"]
    assert record["command"].startswith("python -m experiments.scaling_study")
    _check_pngs(tmp_path)


@pytest.mark.slow
def test_depth_fit_timing_and_replot(tmp_path):
    args = ["--models=tiny-text", "--plans=fsdp", "--batches=8", "--seq_lens=32", "--phases=decode"]
    _run(tmp_path, *args, "--measure=true", "--repeats=2")
    (r,) = _rows(tmp_path)
    # XLA counts the scanned 2-layer stack's body once; the fit counts both layers (and more than the body alone).
    assert float(r["xla_flops_fit"]) > float(r["xla_flops"]) > 0 and float(r["xla_bytes_fit"]) > 0
    step_s = float(r["step_s"])
    assert step_s > 0 and float(r["tokens_per_s"]) == pytest.approx(8 / step_s)
    assert float(r["mfu"]) == pytest.approx(float(r["analytic_flops"]) / step_s / (8 * float(r["peak_tflops"]) * 1e12))
    assert math.isfinite(float(r["hbm_util"])) and float(r["hbm_util"]) > 0
    for name in ("roofline.png", "throughput_vs_devices.png"):
        (tmp_path / name).unlink()
    out = _run(tmp_path, "--plot_only")
    assert "rows computed" not in out
    _check_pngs(tmp_path)


def test_tpu_target_row_is_a_labelled_compiler_estimate(tmp_path):
    """--target=tpu: one 1B decode row compiled by XLA:TPU for tpu-v5e-8, its estimate columns and labels."""
    from tests.conftest import require

    require("libtpu")
    args = ["--target=tpu", "--models=Llama-3.2-1B", "--plans=tpu-v5e-8", "--batches=8", "--seq_lens=256"]
    _run(tmp_path, *args, "--phases=decode")
    (r,) = _rows(tmp_path)
    assert (r["platform"], r["attention_impl"], r["topology"], r["status"]) == ("tpu-aot", "xla", "v5e:2x4", "ok")
    assert (r["target_device"], r["fits"], r["devices"]) == ("TPU v5e", "True", "8")
    assert (float(r["peak_tflops"]), float(r["bandwidth_tbs"])) == (197.0, 0.819)  # tpu.CHIPS["v5e"]
    assert r["step_s"] == r["tokens_per_s"] == r["mfu"] == ""  # nothing was run
    # XLA:TPU's raw optimal_seconds counts -1 s per ConcatBitcast; corrected it is a (small) positive time.
    raw, uncosted = float(r["xla_optimal_s"]), int(r["uncosted_ops"])
    assert raw + uncosted > 0 and int(r["pallas_calls"]) == 0
    est, roof = float(r["est_step_s"]), float(r["roofline_s"])
    flops, nbytes = float(r["xla_flops_fit"]), float(r["xla_bytes_fit"])
    assert roof == pytest.approx(max(flops / 197e12, nbytes / 0.819e12))
    if r["estimate_source"].startswith("XLA:TPU optimal_seconds"):
        assert est == pytest.approx(float(r["est_optimal_s_fit"])) and est >= 0.95 * roof
    else:
        assert r["estimate_source"].startswith("roofline") and est == roof
    assert r["estimate_source"].endswith("depth fit")
    assert float(r["est_tokens_per_s"]) == pytest.approx(8 / est)
    assert float(r["est_mfu"]) == pytest.approx(_llama_1b_decode_flops(8, 256) / est / (8 * 197e12))
    assert float(r["hbm_read_s"]) == pytest.approx(float(r["read_gb"]) * 1e9 / 0.819e12)
    assert float(r["est_hbm_util"]) == pytest.approx(float(r["hbm_read_s"]) / est)
    # 1B over 8 chips: weights are 2.47 GB / 8 (+ replicated norms); the flops one chip runs, depth-fitted, are
    # within a few percent of our analytic count / 8 (XLA also counts norms, softmax, RoPE).
    assert float(r["weights_gb"]) == pytest.approx(0.309, abs=0.001)
    assert flops == pytest.approx(_llama_1b_decode_flops(8, 256) / 8, rel=0.05)
    record = json.loads((tmp_path / "scaling.json").read_text())
    assert record["label"] == "XLA:TPU compiler estimate, not a measurement" and record["libtpu"]
    assert "ConcatBitcast" in record["conventions"]["tpu"]
    for name in ("est_roofline.png", "est_throughput.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def _llama_1b_decode_flops(b: int, t: int) -> float:
    """MaxText FLOPs of one Llama-3.2-1B decode step (D=2048, N=32, K=8, H=64, F=8192, V=128256, L=16)."""
    layer = 2 * (2048 * (32 + 2 * 8) * 64 + 32 * 64 * 2048 + 3 * 2048 * 8192)
    return b * (16 * (layer + 4 * 32 * 64 * t) + 2 * 2048 * 128256)
