"""Memory plans of the weight-only quantized models: bf16 vs int8 vs int4 (``experiments.memory_plan``'s planner).

    .venv/bin/python -m experiments.memory_plan_quant                  # 90B-Vision, 128K: h200x1, h100x2, h100x8
    .venv/bin/python -m experiments.memory_plan_quant --target=tpu     # 11B-Vision on one v5e chip (XLA:TPU)

Each run adds its rows to ``results/memory_plan_quant.json`` (a row is replaced by a newer one of the same model,
plan, quantization, cache length and target) and redraws ``results/memory_plan_quant.md`` from it.

GPU plans are compiled by XLA:CPU on simulated devices (there is no GPU here), as ``memory_plan``'s CPU table is;
its caveats: (1) XLA:CPU computes in f32 and makes f32 copies of bf16 weights before the layer loop, and it unpacks
every int4 kernel into a one-byte (``s8``) copy there too; both are found in the optimized HLO, reported
(``cpu_weight_upcast_gb``, ``cpu_int4_unpack_gb``) and left out of the peak. (2) The int4 arguments themselves are
counted packed, two values per byte, by XLA:CPU's ``memory_analysis`` (``weights_gb`` is our sum of the shards at
int4 = 4 bits, and equals the compiled argument bytes less the cache): that is the size an int4 weight has in GPU
memory, where XLA stores ``s4`` packed. Whether XLA:GPU's dot fusions consume int4 without a wider copy is not
seen from here; one layer's copy would be transient (inside the scanned loop), not the whole stack. (3) The
prefill temporaries are XLA's attention with the score matrix materialized (``attention_impl="auto"`` on a CPU
mesh): a 2048-token chunk against a 128K cache is ``heads/tensor x 2048 x 131072`` f32 per device, which a GPU
flash kernel does not hold; the decode step (one token) has no such term, so both peaks are shown.

The TPU rows are XLA:TPU's own buffer assignment for the plan's slice (libtpu, ahead of time): int4 packed by the
compiler, Pallas attention kernels, and a refusal (``RESOURCE_EXHAUSTED``) when a step cannot fit the chip.

Quantization: ``QuantConfig(mode, --group_size)`` over every projection and the untied head (embeddings, norms and
gates stay bf16; scales f32). int4's groups run along each kernel's first input axis; a plan that splits that
axis into shards not a multiple of the group (the vision tower's 16 heads x 80 = 1280 inputs over 8-way tensor
parallelism: 160 per device) cannot shard the scales, and that plan's int4 row keeps the vision tower in bf16
(``skip=("vision",)``), saying so in ``quant_note``.
"""

from __future__ import annotations

import json
import os
import sys

if "jax" not in sys.modules:  # simulated devices (as memory_plan) must be configured before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"

import jax
from absl import flags

from experiments import cli, memory_plan
from experiments.results_io import RESULTS_DIR, machine
from llama32_jax import sharding
from llama32_jax.quant.config import QuantConfig

GPU_GRID = [("Llama-3.2-90B-Vision", p, 131072) for p in ("h200x1", "h100x2", "h100x8")]
TPU_GRID = [("Llama-3.2-11B-Vision", "tpu-v5e-1", n) for n in (131072, 32768, 16384)]
MODES = ("none", "int8", "int4")
JSON = os.path.join(RESULTS_DIR, "memory_plan_quant.json")

_MODES = flags.DEFINE_list("modes", list(MODES), "weights: none (bf16), int8, int4")
_CACHES = flags.DEFINE_list("cache_lens", [], "only these of the grid's cache lengths (empty: all)")


def quant_row(
    model: str, plan: str, cache_len: int, mode: str, target: str, group_size: int = 128, prompt_len: int = 2048
) -> dict:
    """One row: ``memory_plan.plan_memory`` for ``mode`` (``"none"``: bf16). An int4 plan that cannot shard the
    vision tower's group scales is planned again with the vision tower in bf16, and says so."""
    args = (model, plan, 1, cache_len, prompt_len, 1)
    if mode == "none":
        return memory_plan.plan_memory(*args, target=target)
    try:
        return memory_plan.plan_memory(*args, target=target, quant=QuantConfig(mode, group_size))
    except sharding.PlanError as e:
        if mode != "int4" or "vision" not in str(e):
            raise
        row = memory_plan.plan_memory(*args, target=target, quant=QuantConfig(mode, group_size, ("vision",)))
        row["quant_note"] = f"vision tower kept bf16: {e}"
        return row


def _key(r: dict) -> tuple:
    mode = (r.get("quant") or {}).get("mode", "none")
    return (r["model"], r["plan"], mode, r["cache_len"], r.get("target", "cpu"), r["prompt_len"])


def _order(r: dict) -> tuple:
    model, plan, mode, cache_len, target, prompt_len = _key(r)
    return (target, model, plan, -cache_len, -prompt_len, MODES.index(mode))


def _fits(r: dict) -> str:
    return {True: "yes", False: f"**no** ({r.get('why', '')})", None: "—"}[r.get("fits")]


def _step(r: dict, step: str) -> str:
    s = r[step]
    return f"{s['peak_gb']:.1f}" if "peak_gb" in s else "refused"


def _weights(r: dict) -> str:
    parts = r.get("weights_by_dtype_gb") or {"bfloat16": r["weights_gb"]}
    names = {"int8": "int8", "int4": "int4", "float32": "f32 scales", "bfloat16": "bf16"}
    return " + ".join(f"{parts[k]:.2f} {names[k]}" for k in ("int4", "int8", "float32", "bfloat16") if k in parts)


def _outside(r: dict) -> float | None:
    """GB of weights that the compiled steps do not take: jit drops unused arguments, and decode and prefill take
    the cross-attention K/V precomputed, so the vision tower is not in their arguments; it stays resident."""
    step = r["decode"]
    if "argument_gb" not in step:
        return None
    return max(0.0, r["weights_gb"] + r["kv_cache_gb"] + r["cross_kv_gb"] - step["argument_gb"])


def _peak(r: dict | None, step: str) -> str:
    """A step's peak plus the resident weights outside it, marked when over the budget."""
    if r is None:
        return "—"
    if "peak_gb" not in r[step]:
        return "refused"
    total = r[step]["peak_gb"] + (_outside(r) or 0.0)
    return f"{total:.1f}" + ("" if total <= r["budget_gb"] else " (over)")


def _mode(r: dict) -> str:
    return (r.get("quant") or {}).get("mode", "bf16") + (" (vision bf16)" if r.get("quant_note") else "")


def table(record: dict) -> str:
    """``results/memory_plan_quant.md`` from the record (also redrawn from the JSON alone)."""
    cpu = [r for r in record["rows"] if r.get("target", "cpu") == "cpu"]
    tpu = [r for r in record["rows"] if r.get("target") == "tpu"]
    out = [
        "# Memory plans of the quantized models (per device, batch 1, 1 image of 4 tiles)\n",
        "Weights: weight-only int8 (per output channel) or int4 (groups of 128 inputs) projections and untied "
        "head, f32 scales; embeddings, norms and gates bf16. `weights GB` is the sum of one device's shards with int4 "
        "at 4 bits, which is what the compiled arguments hold (XLA counts `s4` packed). Peaks are arguments + outputs "
        "- aliased (the donated cache) + temporaries, plus the weights the steps do not take (`outside GB`: the "
        "vision tower, resident but not an argument of decode or prefill, which take the cross-attention K/V "
        "precomputed). Budget: the device's memory less 10%; (over): above it. Commands: "
        + ", ".join(f"`{c}`" for c in record["commands"])
        + f"; {record['machine']}, jax {record['jax']}, libtpu {record.get('libtpu') or '—'}.\n",
    ]
    if cpu:
        out += [
            "## GPU plans: 90B-Vision, 128K cache (XLA:CPU SPMD compile on simulated devices)\n",
            "Peaks leave out XLA:CPU's f32 copies of bf16 weights and its one-byte copies of the int4 kernels (both "
            "made before the layer loop; GPUs multiply bf16 and hold int4 packed); the compiled XLA:CPU decode peak "
            "is shown beside. Prefill's temporaries hold XLA's materialized attention scores (each prefill call's "
            "queries x 131072 keys x the device's heads, f32), which a GPU flash kernel does not; decode (one "
            "token) has none, so the verdict is decode's, and prefill is shown at 2048 and 256 tokens a call. "
            "Caveats: experiments/memory_plan_quant.py.\n",
            "| model | weights | plan | weights GB / device | of which | KV cache GB | outside GB | decode peak GB | "
            "prefill peak GB, 2048 tokens | prefill peak GB, 256 tokens | XLA:CPU decode peak GB (raw) | "
            "XLA:CPU int4 unpack GB | budget GB | decode fits |",
            "|---" * 14 + "|",
        ]
        by = {_key(r): r for r in cpu}
        for r in (r for r in cpu if r["prompt_len"] == 2048):
            model, plan, mode, cache_len, target, _ = _key(r)
            short = by.get((model, plan, mode, cache_len, target, 256))
            unpack = r["decode"].get("cpu_int4_unpack_gb", 0.0)
            fits = r["decode"]["peak_gb"] + _outside(r) <= r["budget_gb"]
            out.append(
                f"| {r['model']} | {_mode(r)} | `{r['plan']}` | {r['weights_gb']:.2f} | {_weights(r)} | "
                f"{r['kv_cache_gb']:.2f} | {_outside(r):.2f} | {_peak(r, 'decode')} | {_peak(r, 'prefill')} | "
                f"{_peak(short, 'prefill')} | {r['decode']['xla_cpu_peak_gb']:.1f} | {unpack:.2f} | "
                f"{r['budget_gb']:.0f} | {'yes' if fits else '**no**'} |"
            )
        out.append("")
    if tpu:
        out += [
            "## 11B-Vision on one TPU v5e chip (XLA:TPU, libtpu ahead of time, plan `tpu-v5e-1`)\n",
            "XLA:TPU's buffer assignment for the chip: int4 packed by the compiler, Pallas attention kernels. "
            "refused: XLA:TPU would not compile the step (RESOURCE_EXHAUSTED, its message in the JSON).\n",
            "| model | weights | cache slots | weights GB | of which | KV cache GB | outside GB | decode peak GB | "
            "prefill tokens / call | prefill peak GB | budget GB | fits |",
            "|---" * 12 + "|",
        ]
        for r in tpu:
            outside = _outside(r)
            fits = r["fits"] and all(r[s]["peak_gb"] + outside <= r["budget_gb"] for s in ("decode", "prefill"))
            out.append(
                f"| {r['model']} | {_mode(r)} | {r['cache_len']} | {r['weights_gb']:.2f} | {_weights(r)} | "
                f"{r['kv_cache_gb']:.2f} | {'—' if outside is None else f'{outside:.2f}'} | {_peak(r, 'decode')} | "
                f"{r['prompt_len']} | {_peak(r, 'prefill')} | {r['budget_gb']:.1f} | "
                f"{'yes' if fits else '**no**' + (' (refused)' if not r['fits'] and outside is None else '')} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv):
    del argv
    target = "tpu" if memory_plan._TARGET.value == "tpu" else "cpu"
    for m in _MODES.value:
        if m not in MODES:
            raise sharding.PlanError(f"--modes: unknown {m!r}; valid: {', '.join(MODES)}")
    record = {"rows": [], "commands": []}
    if os.path.exists(JSON):
        with open(JSON) as f:
            record = json.load(f)
    rows = {_key(r): r for r in record["rows"]}
    for model, plan, cache_len in TPU_GRID if target == "tpu" else GPU_GRID:
        if _CACHES.value and str(cache_len) not in _CACHES.value:
            continue
        for mode in _MODES.value:
            r = quant_row(model, plan, cache_len, mode, target, memory_plan._GROUP.value, memory_plan._PROMPT.value)
            r.setdefault("target", target)
            rows[_key(r)] = r
            times = " + ".join(str(r[s]["compile_s"]) for s in ("decode", "prefill"))
            print(
                model,
                plan,
                cache_len,
                memory_plan._PROMPT.value,
                mode,
                f"{r['weights_gb']:.2f} GB",
                _fits(r),
                f"(compile {times} s)",
            )
            command = "python -m experiments.memory_plan_quant " + " ".join(sys.argv[1:])
            record.update(machine=machine(), jax=jax.__version__, libtpu=sharding.tpu.libtpu_version())
            record["commands"] = sorted({*record.get("commands", []), command.strip()})
            record["rows"] = sorted(rows.values(), key=_order)
            with open(JSON, "w") as f:
                json.dump(record, f, indent=1)
            with open(JSON.removesuffix(".json") + ".md", "w") as f:
                f.write(table(record))


if __name__ == "__main__":
    cli.run(main)
