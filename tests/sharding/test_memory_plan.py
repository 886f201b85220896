"""The committed memory table (experiments/memory_plan.py --all) and the planner itself on a small case."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from experiments.memory_plan import MODELS, TOPOLOGIES, plan_memory

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def test_committed_table_covers_every_model_and_topology():
    record = json.loads((RESULTS / "memory_plan.json").read_text())
    rows = {(r["model"], r["plan"]): r for r in record["rows"]}
    assert set(rows) == {(m, t) for m in MODELS for t in TOPOLOGIES}
    row = rows["Llama-3.2-90B-Vision", "h100x8"]
    assert (row["batch"], row["cache_len"], row["images"]) == (1, 131072, 1)
    # Within the 72 GB budget, or the table says exactly what exceeds it.
    assert row["peak_gb"] <= 72 if row["fits"] else "why" in row
    for r in rows.values():
        assert r["fits"] or r["why"].startswith(("decode peak", "prefill peak"))
        assert abs(r["peak_gb"] - max(r["decode"]["peak_gb"], r["prefill"]["peak_gb"])) < 1e-9
    assert "| Llama-3.2-90B-Vision | `h100x8` |" in (RESULTS / "memory_plan.md").read_text()


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 simulated CPU devices (XLA_FLAGS in conftest)")
def test_planner_compiles_a_full_size_model_without_allocating():
    before = {id(a) for a in jax.live_arrays()}
    r = plan_memory("Llama-3.2-1B", "h100x8", batch=1, cache_len=4096, prompt_len=256, images=0)
    assert not {id(a) for a in jax.live_arrays()} - before  # shapes only
    # 1B bf16 weights over 8 devices: 2.47 GB / 8; the KV cache shard: 16 layers x 2 x 8 heads x 4096 x 64 x 2 B / 8.
    assert abs(r["weights_gb"] - 0.309) < 0.01
    assert abs(r["kv_cache_gb"] - 16 * 2 * 8 * 4096 * 64 * 2 / 8 / 1e9) < 1e-6
    assert r["fits"] and r["decode"]["argument_gb"] >= r["kv_cache_gb"]
