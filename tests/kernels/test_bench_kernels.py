"""experiments/bench_kernels.py end to end in smoke mode: every section writes rows for every implementation that can
run here, with finite times, and ours agrees with the XLA reference (on CPU ours runs in Pallas' interpreter)."""

from __future__ import annotations

import json
import math

import numpy as np
from absl import flags
from absl.testing import flagsaver

from experiments import bench_kernels

# Max abs error of ours vs our XLA reference, both bf16 (outputs of magnitude ~1: a few bf16 ulps; gradients are
# larger). Implementations that cannot run here (cuDNN off GPU, tokamax not installed) must say why instead.
FWD_ERR, BWD_ERR = 5e-2, 1e-1
MAY_BE_MISSING = {"cudnn", "tokamax"}


def test_smoke_run_covers_every_section_and_implementation(tmp_path):
    out = tmp_path / "bench_kernels.json"
    # The smoke shapes, fewer of them: one flash length, one cross text length besides the single-row call.
    argv = ["bench_kernels", "--smoke", f"--out={out}", "--seq_lens=128", "--cross_text=1,64"]
    with flagsaver.flagsaver():
        flags.FLAGS(argv)
        bench_kernels.main([])
    record = json.loads(out.read_text())
    assert record["complete"] and record["smoke"] and not record["skipped"]
    assert "4*B*N*T*S_visible*H" in record["flop_convention"] and record["machine"] and record["versions"]["jax"]
    rows = record["rows"]
    expected = {
        "flash": {"ours", "cudnn", "jax_xla", "xla_ref", "tokamax"},
        "flash_bwd": {"ours", "cudnn", "jax_xla", "xla_ref"},
        "decode": {"ours", "cudnn", "jax_xla", "xla_ref"},
        "cross": {"ours", "cudnn", "xla_ref"},
    }
    for section, impls in expected.items():
        mine = [r for r in rows if r["section"] == section]
        assert {r["impl"] for r in mine} == impls, section
        for r in mine:
            assert r["flops"] > 0
            if "error" in r:
                assert r["impl"] in MAY_BE_MISSING, (section, r["impl"], r["error"])
                continue
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["tflops"]), r
            if r["impl"] != "xla_ref":
                tol = BWD_ERR if section == "flash_bwd" else FWD_ERR
                assert r["max_abs_err"] < tol, (section, r["impl"], r["max_abs_err"])
                assert r["speedup_vs_xla_ref"] > 0
            if section in ("decode", "cross"):
                assert r["kv_bytes"] > 0 and math.isfinite(r["kv_gbs"])
    decode = {(r["fill"], r["impl"]) for r in rows if r["section"] == "decode"}
    assert {("half", "ours"), ("full", "ours")} <= decode
    cross = [r for r in rows if r["section"] == "cross" and r["impl"] == "ours"]
    assert {r["q_len"] for r in cross} == {1, 64} and all(r["max_abs_err_seen_rows"] < FWD_ERR for r in cross)


def test_cross_mask_is_realistic():
    mask = bench_kernels.cross_tile_mask(2, 64, 2, 4)  # [B, T, I, R]
    assert not mask[:, :8].any()  # text before the first image sees nothing
    assert mask[0, 8:36, 0].all() and not mask[0, 8:36, 1].any()  # image 0 (4 valid tiles) until image 1 starts
    assert mask[0, 36:, 1, :3].all() and not mask[0, 36:, 1, 3].any()  # image 1: 3 valid tiles, to the end
    assert (mask[1].any(axis=0).sum(axis=-1) == [3, 2]).all()  # sequence 1: 3 and 2 valid tiles
    one_row = bench_kernels.cross_tile_mask(1, 1, 4, 4)
    assert np.array_equal(one_row[0, 0].sum(axis=-1), [0, 0, 0, 1])  # a single row sees the last image
