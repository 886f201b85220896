"""Every Llama 3.2 model x TPU plan x attention impl x phase, compiled by XLA:TPU ahead of time on this host.

    nice .venv/bin/python -m experiments.tpu_models            # the full product -> results/tpu/models_compile.*
    .venv/bin/python -m experiments.tpu_models --models=Llama-3.2-1B --plans=tpu-v5e-8 --phases=decode --out=x.json

For each row, the step of ``experiments.scaling_steps.build`` (prefill, one decode step, or one full training step
with ``remat="full"``), with scanned layers at full depth, ``--rows`` sequences per data replica of ``--seq_len``
tokens (prefill: 16 more cache slots; vision prefill/decode: one 4-tile image's cross-attention K/V; training: text
only), is compiled for the plan's TPU slice (``llama32_jax.sharding.tpu``; libtpu, nothing executes), and the row
records:

- ``fits_full_depth``: whether XLA:TPU accepted the full-depth program (it refuses one whose buffers exceed the
  chip's HBM, with ``RESOURCE_EXHAUSTED``: recorded in ``full_depth_error``); when not, the row is compiled at 2 (or
  1) scan units (``depth``: layers of a text model, 4-self + 1-cross groups of a vision model) so that its
  collectives are still checked, and its memory numbers are those of the reduced model;
- ``compile_s``: seconds of ``lower().compile()`` on this host (a shared 2-core machine: the load average at the
  start of the row is recorded with it; other processes compile at the same time, so these are upper bounds);
- ``collectives``: per kind (all-reduce, all-gather, ...): call sites in the optimized per-device program,
  executions per step (scan trip counts applied) and bytes moved per step per device (each execution's larger side:
  result or operands), and the list of all-reduces with their group size and where they run;
- ``memory``: XLA:TPU's ``memory_analysis()`` per chip: argument, output, alias, temporary and generated-code bytes,
  and ``peak = argument + output - alias + temp`` against the chip's HBM (``sharding.tpu.CHIPS``);
- ``kernels``: Pallas TPU kernel executions per step (``tpu_custom_call`` sites x trip counts);
- ``checks``: ``experiments/tpu_checks.py``'s ``check`` (what the plan implies: per layer two tensor-group
  all-reduces of ``[B, T, D]``, the embedding's, the training step's backward and data-group gradient sums, no
  all-gather of weights or cache, Pallas kernels and no score tensor with ``pallas``): ``passed`` and the problems
  found;
- ``xla_cost``: ``cost_analysis()``'s flops, bytes accessed and ``optimal_seconds``, raw, for reference only: XLA
  counts a loop body once, and ``optimal_seconds`` is negative when the program has Pallas custom calls.

Output is written after every row and a rerun skips the rows already in ``--out`` (``--max_seconds`` stops
between rows), so the product can be computed in several runs.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
from absl import flags

from experiments import cli, hlo_text, tpu_checks
from experiments.results_io import RESULTS_DIR, machine, write_result
from llama32_jax import sharding
from llama32_jax.errors import InvalidInputError
from llama32_jax.sharding import tpu

MODELS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision"]
PHASES = ["prefill", "decode", "train"]
IMPLS = ["pallas", "xla"]

_MODELS = flags.DEFINE_list("models", MODELS, "named configs")
_PLANS = flags.DEFINE_list("plans", ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16"], "TPU plans")
_IMPLS = flags.DEFINE_list("impls", IMPLS, "attention_impl values")
_PHASES = flags.DEFINE_list("phases", PHASES, "prefill, decode, train")
_SEQ = flags.DEFINE_integer("seq_len", 256, "tokens per sequence (prefill, train); cache slots (decode)")
_ROWS = flags.DEFINE_integer("rows", 2, "sequences per data replica")
_SLOTS = flags.DEFINE_integer("decode_slots", 16, "prefill: cache slots beyond the prompt")
_MAX_SECONDS = flags.DEFINE_integer("max_seconds", 0, "stop starting rows after this many seconds (0: no limit)")
_OUT = flags.DEFINE_string("out", "", "JSON path (default results/tpu/models_compile.json; .md beside it)")

GB = 1e9


def _key(r: dict) -> tuple:
    return (r["model"], r["plan"], r["impl"], r["phase"])


def _compile(model: str, plan: str, impl: str, phase: str):
    """Full depth; when XLA:TPU refuses it for the chip's HBM, the largest of 2 and 1 scan units that fits, so
    that the collectives can still be checked. Returns (compiled, expected, seconds, depth, full-depth error)."""
    mesh = tpu.plan_mesh(plan)
    args = (model, plan, mesh, impl, phase, _SEQ.value, _ROWS.value, _SLOTS.value)
    try:
        return (*tpu_checks.compile_step(*args), None, None)
    except Exception as e:  # only XLA:TPU's out-of-memory refusal is handled
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        full_error = str(e).splitlines()[0][:400]
    jax.clear_caches()
    for depth in (2, 1):
        try:
            return (*tpu_checks.compile_step(*args, depth), depth, full_error)
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or depth == 1:
                raise
            jax.clear_caches()
    raise AssertionError("unreachable")


def run_row(model: str, plan: str, impl: str, phase: str) -> dict:
    load = os.getloadavg()[0]
    compiled, expected, seconds, depth, full_error = _compile(model, plan, impl, phase)
    module = hlo_text.Module(compiled.as_text())
    colls = module.collectives()
    problems = tpu_checks.check(module, expected)
    mem = compiled.memory_analysis()
    hbm = tpu.chip(sharding.load_plan(plan).devices).hbm_bytes
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    kernels: dict[str, int] = {}
    for k in module.kernels():
        base = k.name.rsplit(".", 1)[0]
        kernels[base] = kernels.get(base, 0) + module_trips(module, k.loops)
    return {
        "model": model,
        "plan": plan,
        "impl": impl,
        "phase": phase,
        "batch": expected.batch * expected.data,
        "seq_len": _SEQ.value,
        "fits_full_depth": full_error is None,
        "full_depth_error": full_error,
        "depth": depth or "full",  # scan units compiled (full, or 2/1 when full depth does not fit)
        "compile_s": round(seconds, 2),
        "load_avg_1m": round(load, 2),
        "collectives": hlo_text.summary(colls),
        "all_reduces": [
            {
                "arrays": [str(a) for a in c.results],
                "group": c.group_size,
                "in_loop": c.in_loop,
                "executions": c.trips,
            }
            for c in colls
            if c.kind == "all-reduce"
        ],
        "kernels": kernels,
        "memory": {
            "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes,
            "code_bytes": mem.generated_code_size_in_bytes,
            "peak_bytes": peak,
            "hbm_bytes": hbm,
            "fits": peak <= hbm,
        },
        "checks": {"passed": not problems, "problems": problems},
        "xla_cost": {
            "flops": float(ca.get("flops", float("nan"))),
            "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
            "optimal_seconds": float(ca.get("optimal_seconds", float("nan"))),
        },
    }


def module_trips(module: hlo_text.Module, loops: tuple[str, ...]) -> int:
    n = 1
    for b in loops:
        n *= module.trip_counts.get(b, 1)
    return n


def markdown(record: dict) -> str:
    lines = [
        "# Llama 3.2 compiled by XLA:TPU for the TPU plans (ahead of time, nothing executed)",
        "",
        f"Written by `experiments/tpu_models.py` on {record['machine']}, JAX {record['jax']}. "
        f"{record['rows_per_replica']} sequences per data replica, seq_len {record['seq_len']} (prefill: "
        f"+{record['decode_slots']} cache slots; decode: a {record['seq_len']}-slot cache), scanned layers at full "
        "depth, bf16; vision prefill/decode with one 4-tile image, training text only (mode=full, remat=full). "
        "Per chip: memory from `memory_analysis()`, peak = argument + output - alias + temp; collectives per step "
        "(executions x bytes of the larger side). Compile seconds on a shared 2-core host (load average at the "
        "row's start in the JSON). `checks`: experiments/tpu_checks.py's comparison with what the plan implies.",
        "",
        "| model | plan | impl | phase | fits (depth) | compile s | all-reduce execs | all-reduce MB | "
        "other collectives | kernels | args GB | temp GB | peak GB | HBM GB | checks |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['plan']} | {r['impl']} | {r['phase']} | | | | | | | | | | | "
                         f"error: {r['error'][:120]} |")  # fmt: skip
            continue
        c = r["collectives"]
        ar = c.get("all-reduce", {"executions": 0, "bytes": 0})
        others = ", ".join(f"{k} {int(v['executions'])}" for k, v in c.items() if k != "all-reduce") or "none"
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(r["kernels"].items())) or "-"
        m = r["memory"]
        checks = "pass" if r["checks"]["passed"] else "FAIL: " + "; ".join(r["checks"]["problems"])[:200]
        lines.append(
            f"| {r['model'].removeprefix('Llama-3.2-')} | {r['plan']} | {r['impl']} | {r['phase']} | "
            f"{'yes' if r['fits_full_depth'] else 'no (' + str(r['depth']) + ')'} | {r['compile_s']:.1f} | "
            f"{int(ar['executions'])} | {ar['bytes'] / 1e6:.1f} | {others} | {kernels} | "
            f"{m['argument_bytes'] / GB:.2f} | {m['temp_bytes'] / GB:.2f} | {m['peak_bytes'] / GB:.2f} | "
            f"{m['hbm_bytes'] / GB:.0f} | {checks} |"
        )
    ok = [r for r in record["rows"] if "error" not in r]
    neg = [r for r in ok if r["xla_cost"]["optimal_seconds"] < 0]
    lines += [
        "",
        f"{len(ok)} rows compiled, {sum(r['checks']['passed'] for r in ok)} pass the HLO checks; "
        f"{len(record['rows']) - len(ok)} failed to compile. Compile seconds: total "
        f"{sum(r['compile_s'] for r in ok):.0f}, max {max((r['compile_s'] for r in ok), default=0):.1f}.",
        "",
        f"`cost_analysis()['optimal_seconds']` is negative in {len(neg)} of {len(ok)} rows "
        f"({sum(1 for r in neg if r['kernels'])} of them with Pallas kernels): not a time, not reported here.",
        "",
        "What the compiled programs show (the checks, experiments/tpu_checks.py `Expected`): under these pure "
        "tensor-parallel plans the only collectives are all-reduces: per self-attention layer two of the "
        "`[B, T, D]` residual stream (attention output projection, MLP down projection) in the scan body, "
        "two more per cross-attention "
        "block, and one per vocab-sharded embedding table outside the scan (masked lookup + all-reduce; the vision "
        "models' text table and learnable image-token table are all-reduced together). No all-gather anywhere: "
        "not of weights, not of the KV cache (split by kv head like the queries), and the vocab-sharded head's "
        "logits leave the step vocab-sharded (`[B, 1, V/8]` per chip) with no collective. Training adds three "
        "all-reduces per layer in the backward scan (the input gradients of the column-parallel q/k/v and "
        "gate/up projections, and the remat recompute's attention output projection) and the vocab-sharded "
        "cross-entropy's `[B, T]` sums; weight gradients need no collective under pure tensor parallelism. On "
        "tpu-v5e-16 (data=2) every trainable shard's gradient is all-reduced over the data pair once, inside the "
        "backward scan per layer, except a tied embedding table's (1B, 3B): XLA all-reduces its two gradient parts "
        "(the head's and the lookup's scatter-add) separately before adding them, one extra table shard per step "
        "(66 MB per chip for 1B). With `pallas` the kernels run once per layer (flash forward; decode; "
        "cross-attention forward per cross block; in training flash forward twice with remat=full, dq and dkv "
        "once) and no `[B, N, T, S]` score tensor exists; with `xla` there is one.",
        "",
    ]
    return "\n".join(lines)


def _covering(model: str, plan: str, impl: str, phase: str) -> bool:
    """Whether the row is in tests/tpu/test_models_compile.py's covering set (plan (model + impl + phase) % 4)."""
    plans = ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16"]
    return plans.index(plan) == (MODELS.index(model) + IMPLS.index(impl) + PHASES.index(phase)) % 4


def main(argv):
    del argv
    for m in _MODELS.value:
        if m not in MODELS:
            raise InvalidInputError(f"--models: unknown {m!r}; valid: {', '.join(MODELS)}")
    for p in _PLANS.value:
        if p not in tpu.tpu_plans():
            raise InvalidInputError(f"--plans: {p!r} is not a TPU plan; valid: {', '.join(tpu.tpu_plans())}")
    for i in _IMPLS.value:
        if i not in IMPLS:
            raise InvalidInputError(f"--impls: unknown {i!r}; valid: {', '.join(IMPLS)}")
    for ph in _PHASES.value:
        if ph not in PHASES:
            raise InvalidInputError(f"--phases: unknown {ph!r}; valid: {', '.join(PHASES)}")
    out = _OUT.value or os.path.join(RESULTS_DIR, "tpu", "models_compile.json")
    settings = {"seq_len": _SEQ.value, "rows_per_replica": _ROWS.value, "decode_slots": _SLOTS.value}
    record = {"machine": machine(), "jax": jax.__version__, **settings, "rows": []}
    if os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in settings.items()):
            # rows that failed (to compile, or the checks) are computed again
            record["rows"] = [r for r in old["rows"] if "error" not in r and r["checks"]["passed"]]
    done = {_key(r) for r in record["rows"]}
    start = time.time()
    todo = [(m, p, i, ph) for m in _MODELS.value for p in _PLANS.value for i in _IMPLS.value for ph in _PHASES.value]
    todo.sort(key=lambda k: not _covering(*k))  # the CI test's covering set first (stable otherwise)
    for key in todo:
        if key in done:
            continue
        if _MAX_SECONDS.value and time.time() - start > _MAX_SECONDS.value:
            print("--max_seconds reached; rerun to continue")
            return
        try:
            row = run_row(*key)
        except Exception as e:  # a compile failure is a result: recorded, the sweep goes on
            row = dict(zip(("model", "plan", "impl", "phase"), key, strict=True), error=f"{type(e).__name__}: {e}")
        record["rows"].append(row)
        jax.clear_caches()
        status = row.get("error") or (f"{row['compile_s']:.1f}s checks={'pass' if row['checks']['passed'] else 'FAIL'}")
        print(" ".join(key), status, flush=True)
        order = {k: n for n, k in enumerate(itertools.product(MODELS, tpu.tpu_plans(), IMPLS, PHASES))}
        record["rows"].sort(key=lambda r: order.get(_key(r), 0))
        write_result(record, "", out)
        with open(out.removesuffix(".json") + ".md", "w") as f:
            f.write(markdown(record))


if __name__ == "__main__":
    cli.run(main)
