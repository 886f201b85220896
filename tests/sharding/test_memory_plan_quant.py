"""experiments/memory_plan.py with ``quant=``: one device's weight bytes of the int8 / int4 model checked against sums
written out here from the config (values at 1 byte or 4 bits, f32 scales split as their logical axes are), on a
small untied model under 8-way tensor parallelism and on Llama-3.2-1B; and the committed quantized table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import pytest

from experiments.memory_plan import plan_memory
from llama32_jax import configs
from llama32_jax.quant.config import QuantConfig

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
needs8 = pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 simulated CPU devices (conftest XLA_FLAGS)")

# A small untied model whose every split axis divides 8 (plan tp: q_heads, kv_heads, mlp, vocab over tensor=8).
V, D, L, N, K, H, F = 1024, 256, 2, 8, 8, 32, 512
T = 8
GROUP = 32  # divides each device's share of every contracted axis (wo: N*H/8 = 32 inputs, w2: F/8 = 64)
SMALL = configs.TINY_TEXT.replace(
    name="small-untied",
    text=dataclasses.replace(
        configs.TINY_TEXT.text,
        vocab_size=V,
        dim=D,
        n_layers=L,
        n_heads=N,
        n_kv_heads=K,
        head_dim=H,
        ffn_dim=F,
        tie_embeddings=False,
    ),
)


def expected_small(mode: str) -> int:
    """One device's parameter bytes under ``tp`` for ``mode`` ("bf16", "int8", "int4")."""
    bf16 = 2 * (V * D // T + L * 2 * D + D)  # embedding split by vocab; attention/ffn norms and the final norm
    # (kernel elements per device, [output dims], output elements per device whose scale is split, contracted size)
    kernels = [
        (L * N * H * D // T, L * N * H // T, D),  # wq [N, H, D]: heads split, scale [N, H] split
        (L * K * H * D // T, L * K * H // T, D),  # wk
        (L * K * H * D // T, L * K * H // T, D),  # wv
        (L * D * N * H // T, L * D, N * H // T),  # wo [D, N, H]: input split; int8 scale [D] replicated
        (L * F * D // T, L * F // T, D),  # w1 [F, D]
        (L * F * D // T, L * F // T, D),  # w3
        (L * D * F // T, L * D, F // T),  # w2 [D, F]: input split
        (V * D // T, V // T, D),  # the untied head [V, D]
    ]
    if mode == "bf16":
        return bf16 + sum(2 * n for n, _, _ in kernels)
    if mode == "int8":  # 1 byte a value, one f32 scale per output channel
        return bf16 + sum(n + 4 * out for n, out, _ in kernels)
    # int4: 4 bits a value, one f32 scale per GROUP inputs of each output channel; the groups follow the input
    # axis's split (wo, w2) or are whole on every device (the others), so per device: out x (inputs here / GROUP)
    return bf16 + sum(n // 2 + 4 * out * (n_in // GROUP) for n, out, n_in in kernels)


@needs8
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_per_device_match_the_config(mode):
    r = plan_memory(SMALL, "tp", batch=1, cache_len=256, prompt_len=64, images=0, quant=QuantConfig(mode, GROUP))
    assert r["quant"] == {"mode": mode, "group_size": GROUP, "skip": []}
    assert r["weights_gb"] * 1e9 == pytest.approx(expected_small(mode), abs=0.5)
    kv = 2 * L * (K // T) * 256 * H * 2
    for step in ("decode", "prefill"):
        s = r[step]
        # XLA's argument bytes: the weight and cache shards (int4 packed) plus the tokens and cache counters
        extra = s["argument_gb"] * 1e9 - (expected_small(mode) + kv)
        assert 0 <= extra < 1024, (step, extra)
        # XLA:CPU unpacks each stacked (scanned) int4 kernel into an s8 copy (1 byte a value) before the layer
        # loop, reported apart; the head, outside the loop, is converted inside its own fusion
        if mode == "int4":
            assert s["cpu_int4_unpack_gb"] * 1e9 == pytest.approx(_int4_layer_values(), abs=0.5)
        else:
            assert "cpu_int4_unpack_gb" not in s


def _int4_layer_values() -> int:
    """int4 values of the layer stacks per device (the unpacked copies hold one byte each)."""
    return L * (N * H * D + 2 * K * H * D + D * N * H + 3 * F * D) // T


# Llama-3.2-1B (Meta's params.json): tied embeddings (the embedding stays bf16, no separate head).
D1, N1, K1, H1, F1, V1, L1 = 2048, 32, 8, 64, 8192, 128256, 16


@needs8
def test_quantized_1b_is_smaller_by_what_the_config_says():
    r = plan_memory("Llama-3.2-1B", "h100x8", batch=1, cache_len=1024, prompt_len=64, images=0, quant="int4")
    layer_in = {"wq": D1, "wk": D1, "wv": D1, "wo": N1 * H1, "w1": D1, "w3": D1, "w2": F1}
    layer_out = {"wq": N1 * H1, "wk": K1 * H1, "wv": K1 * H1, "wo": D1, "w1": F1, "w3": F1, "w2": D1}
    values = L1 * sum(layer_in[k] * layer_out[k] for k in layer_in)  # quantized values, all split 8 ways
    scales = L1 * sum(layer_out[k] * layer_in[k] // 128 for k in layer_in)  # one f32 per 128 inputs, split 8 ways
    floats = V1 * D1 // 8 + L1 * 2 * D1 + D1  # bf16: embedding (vocab split) and the norms
    int4 = values // 8 // 2 + 4 * scales // 8 + 2 * floats
    bf16 = 2 * (values // 8 + floats)
    assert r["weights_gb"] * 1e9 == pytest.approx(int4, abs=0.5)
    assert abs(bf16 / 1e9 - 0.309) < 0.01  # the bf16 row of test_memory_plan.py
    # The embedding (V x D, bf16) is a quarter of the 1B model and stays: int4 saves 3/4 of the rest and adds the
    # scales (4 bytes per 128 values), so the ratio is (E + (P - E) / 4 + scales) / P with E/P from the config.
    ratio = (2 * floats + values // 8 // 2 + 4 * scales // 8) / bf16
    assert r["weights_gb"] * 1e9 / bf16 == pytest.approx(ratio, rel=1e-6) and 0.4 < ratio < 0.45
    assert r["fits"]


def test_committed_quant_table():
    record = json.loads((RESULTS / "memory_plan_quant.json").read_text())
    rows = {(r["model"], r["plan"], (r.get("quant") or {}).get("mode", "none"), r["cache_len"]): r
            for r in record["rows"]}  # fmt: skip
    for plan in ("h200x1", "h100x2", "h100x8"):
        got = {m: rows["Llama-3.2-90B-Vision", plan, m, 131072] for m in ("none", "int8", "int4")}
        # int8 halves the projections, int4 quarters them (plus scales); the bf16 embeddings and norms stay
        assert got["int4"]["weights_gb"] < got["int8"]["weights_gb"] < 0.55 * got["none"]["weights_gb"]
        assert got["int4"]["weights_gb"] < 0.3 * got["none"]["weights_gb"]
        for r in got.values():
            assert r["target"] == "cpu"
            assert r["fits"] or r["why"]
    for mode in ("none", "int8", "int4"):
        r = rows["Llama-3.2-11B-Vision", "tpu-v5e-1", mode, 131072]
        assert r["target"] == "tpu" and r["budget_gb"] == pytest.approx(14.4)
    # 11B-Vision's bf16 weights alone exceed one v5e chip (16 GB less 10%): not a fit at any cache length
    for r in record["rows"]:
        if r["plan"] == "tpu-v5e-1" and not r.get("quant"):
            assert r["weights_gb"] > r["budget_gb"] and not r["fits"]
    assert "| Llama-3.2-90B-Vision | int4" in (RESULTS / "memory_plan_quant.md").read_text()
