"""experiments/memory_plan.py --target=tpu: the 1B model on tpu-v5e-8, compiled by XLA:TPU, its accounting checked
against sums written out here from the model's dimensions, and the committed TPU table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"

# Llama-3.2-1B (Meta's params.json): D=2048, 32 query heads and 8 kv heads of 64, F=8192, V=128256, 16 layers, tied.
D, N, K, H, F, V, L = 2048, 32, 8, 64, 8192, 128256, 16
TENSOR = 8  # tpu-v5e-8: every matrix split 8 ways (heads, mlp, vocab); the RMSNorm scales replicated


def test_tpu_plan_of_1b_matches_our_sums():
    require("libtpu")
    from experiments.memory_plan import plan_memory

    r = plan_memory("Llama-3.2-1B", "tpu-v5e-8", 1, 4096, 256, 0, target="tpu")
    matrices = V * D + L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)
    norms = L * 2 * D + D
    weights = 2 * (matrices // TENSOR + norms)  # bf16 bytes per chip
    kv = 2 * L * 1 * (K // TENSOR) * 4096 * H * 2  # k and v, [L, B, K/8, S, H] bf16 per chip
    assert r["weights_gb"] * 1e9 == pytest.approx(weights, abs=1)
    assert r["kv_cache_gb"] * 1e9 == pytest.approx(kv, abs=1)
    assert (r["target"], r["topology"], r["budget_gb"]) == ("tpu", "v5e:2x4", pytest.approx(14.4))
    for step in ("decode", "prefill"):
        s = r[step]
        # XLA:TPU's argument bytes: our weight and cache shards, plus the tokens and cache counters (a few KB with
        # TPU tiling); the donated cache comes back aliased.
        extra = s["argument_gb"] * 1e9 - (weights + kv)
        assert 0 <= extra < 64 * 1024, (step, extra)
        assert s["alias_gb"] * 1e9 == pytest.approx(kv, rel=1e-3)
        assert s["f32_weight_copies_gb"] == 0.0  # XLA:TPU multiplies bf16 directly: no upcast copies
        assert s["peak_gb"] == pytest.approx(s["argument_gb"] + s["output_gb"] - s["alias_gb"] + s["temp_gb"])
    assert r["fits"] and r["peak_gb"] == max(r["decode"]["peak_gb"], r["prefill"]["peak_gb"])


def test_committed_tpu_table():
    record = json.loads((RESULTS / "memory_plan_tpu.json").read_text())
    plans = ("tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16")
    models = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision")
    rows = {(r["model"], r["plan"]): r for r in record["rows"]}
    assert set(rows) == {(m, p) for m in models for p in plans}
    assert record["libtpu"] and record["jax"] and "--target=tpu" in record["command"]
    for r in rows.values():
        assert r["target"] == "tpu" and r["budget_gb"] < 0.9 * 95 + 1e-9
        assert r["fits"] or r["why"]
        for step in ("decode", "prefill"):
            assert "compiler_oom" in r[step] or r[step]["f32_weight_copies_gb"] == 0.0
    # 90B's bf16 weights over 8 chips (22.4 GB) exceed a v5e chip's 16 GB: XLA:TPU refuses to compile it.
    assert not rows["Llama-3.2-90B-Vision", "tpu-v5e-8"]["fits"]
    assert rows["Llama-3.2-1B", "tpu-v5e-8"]["fits"]
    assert "| Llama-3.2-1B | `tpu-v5e-8` |" in (RESULTS / "memory_plan_tpu.md").read_text()


def test_xla_tpu_packs_int4_weights():
    """One v5e chip (plan tpu-v5e-1): XLA:TPU's argument bytes of the int4 model are smaller than the int8 model's
    by half a byte per quantized value, less the int4 scales' extra bytes (sums from the config): int4 is stored
    two values per byte, and our packed count (``weights_gb``) is what the chip holds."""
    require("libtpu")
    import dataclasses

    from experiments.memory_plan import plan_memory
    from llama32_jax import configs
    from llama32_jax.quant.config import QuantConfig

    v, d, layers, n, k, h, f = 2048, 512, 2, 4, 4, 128, 1024  # untied: the head is quantized too
    text = dataclasses.replace(configs.TINY_TEXT.text, vocab_size=v, dim=d, n_layers=layers, n_heads=n,
                               n_kv_heads=k, head_dim=h, ffn_dim=f, tie_embeddings=False)  # fmt: skip
    config = configs.TINY_TEXT.replace(name="small-untied", text=text)
    # (outputs, inputs) of every quantized kernel: wq, wk, wv, wo, w1, w3, w2 per layer, and the head
    kernels = layers * [(n * h, d), (k * h, d), (k * h, d), (d, n * h), (f, d), (f, d), (d, f)] + [(v, d)]
    values = sum(o * i for o, i in kernels)
    scales8 = 4 * sum(o for o, _ in kernels)  # f32, one per output channel
    scales4 = 4 * sum(o * i // 128 for o, i in kernels)  # f32, one per 128 inputs
    rows = {m: plan_memory(config, "tpu-v5e-1", 1, 256, 64, 0, target="tpu", quant=QuantConfig(m, 128))
            for m in ("int8", "int4")}  # fmt: skip
    assert rows["int8"]["weights_gb"] * 1e9 - rows["int4"]["weights_gb"] * 1e9 == values // 2 + scales8 - scales4
    for step in ("decode", "prefill"):
        saved = (rows["int8"][step]["argument_gb"] - rows["int4"][step]["argument_gb"]) * 1e9
        assert saved == pytest.approx(values // 2 + scales8 - scales4, abs=1)
        for r in rows.values():  # the chip's arguments: our shards (int4 packed) and the cache, plus a few KB
            extra = r[step]["argument_gb"] * 1e9 - (r["weights_gb"] + r["kv_cache_gb"]) * 1e9
            assert 0 <= extra < 64 * 1024, (step, extra)
