"""Every Pallas TPU kernel compiled by XLA:TPU (libtpu, Mosaic included) for v5e, v5p and v6e, ahead of time.

    nice .venv/bin/python -m experiments.tpu_kernels          # the full sweep -> results/tpu/kernels_compile.{json,md}
    .venv/bin/python -m experiments.tpu_kernels --kernels=decode --generations=v6e --dtypes=bfloat16 --out=/tmp/d.json

The sweep (``llama32_jax.kernels.aot``): kernels (flash forward; flash backward = forward + dq + dk/dv; decode;
cross-attention forward and backward) x generations x dtypes x the per-device head shapes of the Llama 3.2 models
(1B H=64 32/8 heads, 3B 128 24/8, 11B 128 32/8, 90B 128 64/8, and a GQA-group-1 "mha" 128 8/8; each unsharded and
under 8-way tensor parallelism) x lengths:

- ``flash_fwd``: prefill ``T = S`` of ``--flash_lens`` (2K, 8K) and a 2K chunk written at the end of a cache of
  ``--cache_lens`` (32K, 128K) slots;
- ``flash_bwd``: training, ``grad`` of the loss w.r.t. q, k, v at ``T = S`` of ``--flash_lens``;
- ``decode``: one query per sequence, batch 8, against ``--decode_lens`` (8K, 32K, 128K) caches;
- ``cross_fwd`` / ``cross_bwd``: text over ``--images`` (1, 4) images x 4 tiles x 1601 vision tokens
  (N_v = 6404, 25616), with ``--cross_text`` rows (1 = a decode step, 2048 prefill; the backward skips T = 1);
  models 11B, 90B and mha only (the vision models).

Plus ``--probe_blocks``: the flash forward (11B tp8 heads, fp32, 2K chunk into a 32K cache) with a deliberately
growing key block, to record where each generation's compiler refuses it for scoped VMEM.

Per case: compiled or the compiler's error, compile seconds, the Mosaic kernels in the optimized HLO, our VMEM
estimate per kernel (``vmem_bytes`` beside each kernel) against the generation's default scoped VMEM, XLA's memory
analysis (argument / output / temp bytes), whether K/V are copied (relaid out) before the kernel, and the cost
analysis (flops, bytes accessed). XLA's cost analysis does not see inside a custom call: its flops and bytes are
those of the XLA-side ops around the kernels only, and ``optimal_seconds`` is unreliable (about -1 s per kernel in
some programs); they are recorded as given, not interpreted. Nothing executes: no speed or numbers here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from experiments import cli
from experiments.results_io import RESULTS_DIR, machine, write_result
from llama32_jax.kernels import aot
from llama32_jax.sharding import tpu

MIB = 1 << 20
TEXT_MODELS = ("1B", "3B", "11B", "90B", "mha")
VISION_MODELS = ("11B", "90B", "mha")
PROBE_BLOCKS = (2048, 4096, 8192, 16384)

_KERNELS = flags.DEFINE_list("kernels", list(aot.KERNELS), f"which of {aot.KERNELS}")
_GENERATIONS = flags.DEFINE_list("generations", list(tpu.CHIPS), "TPU generations")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "q/k/v dtypes")
_FLASH_LENS = flags.DEFINE_list("flash_lens", ["2048", "8192"], "flash_fwd / flash_bwd: T = S")
_CACHE_LENS = flags.DEFINE_list("cache_lens", ["32768", "131072"], "flash_fwd: a 2K chunk into caches this long")
_DECODE_LENS = flags.DEFINE_list("decode_lens", ["8192", "32768", "131072"], "decode: cache slots")
_IMAGES = flags.DEFINE_list("images", ["1", "4"], "cross: images (4 tiles x 1601 tokens each)")
_CROSS_TEXT = flags.DEFINE_list("cross_text", ["1", "2048"], "cross: text rows T (the backward skips T = 1)")
_PROBE = flags.DEFINE_bool("probe_blocks", True, f"also compile flash_fwd fp32 with key blocks {PROBE_BLOCKS}")
_REWRITE = flags.DEFINE_bool("rewrite_markdown", False, "only rewrite the .md from the existing --out JSON")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/tpu/kernels_compile.json; .md beside)")


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def cases(kernels, generations, dtypes, flash_lens, cache_lens, decode_lens, images, cross_text, probe) -> list:
    """The sweep's cases, generations and dtypes innermost (a sweep stopped early still covers every chip)."""
    shapes = []
    for kernel in kernels:
        for model in VISION_MODELS if kernel.startswith("cross") else TEXT_MODELS:
            for sharded in (True, False):
                if kernel == "flash_fwd":
                    lengths = [(1, n, n, 0) for n in flash_lens] + [(1, 2048, n, 0) for n in cache_lens]
                elif kernel == "flash_bwd":
                    lengths = [(1, n, n, 0) for n in flash_lens]
                elif kernel == "decode":
                    lengths = [(8, 1, n, 0) for n in decode_lens]
                else:
                    texts = [t for t in cross_text if not (kernel == "cross_bwd" and t == 1)]
                    lengths = [(1, t, 0, i) for t in texts for i in images]
                shapes += [(kernel, model, sharded, *length) for length in lengths]
    out = [
        aot.Case(kernel, g, dt, model, sharded, batch, t, keys=s, images=i)
        for kernel, model, sharded, batch, t, s, i in shapes
        for dt in dtypes
        for g in generations
    ]
    if probe:
        out += [
            aot.Case("flash_fwd", g, "float32", "11B", True, 1, 2048, 32768, block_q=256, block_k=bk)
            for bk in PROBE_BLOCKS
            for g in generations
        ]
    return out


def _mesh(generation: str) -> Mesh:
    devices = tpu.topology_devices(tpu.CHIPS[generation].topologies[0])
    return Mesh(np.asarray(devices[:1], dtype=object), ("x",))


def _kv_copied(hlo: str) -> bool:
    return any(re.search(r" copy\(%(k|v)\.\d+\)", line) for line in hlo.splitlines())


def _error_text(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[:4])[:600]


def run_case(case: aot.Case) -> dict:
    limit = tpu.CHIPS[case.generation].scoped_vmem_bytes
    h, n, kv = case.heads
    vmem = aot.vmem_estimates(case)
    row = dict(
        id=case.id, kernel=case.kernel, generation=case.generation, dtype=case.dtype, model=case.model,
        tensor_parallel=aot.TENSOR_PARALLEL if case.sharded else 1, head_dim=h, q_heads=n, kv_heads=kv,
        batch=case.batch, queries=case.queries, keys=case.key_length, images=case.images,
        block_q=case.block_q, block_k=case.block_k,
        vmem_estimate=vmem, vmem_estimate_max=max(vmem.values()), scoped_vmem_limit=limit,
        vmem_fits=max(vmem.values()) <= limit,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        result = aot.compile_case(case, _mesh(case.generation))
    except Exception as e:  # the compiler's refusal is a result: record it and go on
        row.update(compiled=False, compile_s=round(time.perf_counter() - start, 2), error=_error_text(e))
        return row
    row.update(
        compiled=True, compile_s=round(result.seconds, 2), error="",
        custom_calls=result.custom_calls, expected_custom_calls=aot.KERNEL_CALLS[case.kernel],
        memory=result.memory, cost=result.cost, kv_copied=_kv_copied(result.hlo),
        row_vector_bytes=aot.row_vector_bytes(case),
    )  # fmt: skip
    return row


def _mib(x) -> str:
    return f"{x / MIB:.1f}"


def _md_row(r: dict) -> str:
    lengths = f"{r['queries']} x {r['keys']}" + (f" ({r['images']} img)" if r["images"] else "")
    blocks = "" if r["block_k"] is None else f" bq{r['block_q']} bk{r['block_k']}"
    status = "ok" if r["compiled"] else "**refused**: " + r["error"].replace("|", "/")[:160]
    vmem = f"{_mib(r['vmem_estimate_max'])} / {_mib(r['scoped_vmem_limit'])}"
    if not r["compiled"]:
        return (
            f"| {r['kernel']}{blocks} | {r['generation']} | {r['dtype']} | {r['model']} tp{r['tensor_parallel']} | "
            f"{r['head_dim']}, {r['q_heads']}/{r['kv_heads']} | {r['batch']} | {lengths} | {status} | "
            f"{r['compile_s']} | {vmem} | | | | |"
        )
    cost = r["cost"]
    return (
        f"| {r['kernel']}{blocks} | {r['generation']} | {r['dtype']} | {r['model']} tp{r['tensor_parallel']} | "
        f"{r['head_dim']}, {r['q_heads']}/{r['kv_heads']} | {r['batch']} | {lengths} | {status} "
        f"({r['custom_calls']} kernels) | {r['compile_s']} | {vmem} | {_mib(r['memory']['temp'])} | "
        f"{'yes' if r['kv_copied'] else ''} | {cost.get('flops', 0):.3g} | {cost.get('bytes accessed', 0):.3g} |"
    )


def _summary(rows: list[dict]) -> list[str]:
    """Per kernel, the compiled / tried count of each generation x dtype (model-shape rows, default blocks)."""
    cols = sorted({(r["generation"], r["dtype"]) for r in rows})
    lines = ["| kernel | " + " | ".join(f"{g} {d}" for g, d in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kernel in aot.KERNELS:
        cells = []
        for g, d in cols:
            mine = [r for r in rows if (r["kernel"], r["generation"], r["dtype"]) == (kernel, g, d)]
            cells.append(f"{sum(r['compiled'] for r in mine)}/{len(mine)}" if mine else "")
        if any(cells):
            lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(record: dict, path: str) -> None:
    rows = record["rows"]
    ok = sum(r["compiled"] for r in rows)
    shaped = [r for r in rows if r["block_k"] is None]
    probes = [r for r in rows if r["block_k"] is not None]
    lines = [
        "# Pallas TPU kernels compiled by XLA:TPU (ahead of time, no TPU)",
        "",
        f"`{record['command']}` on {record['machine']}, jax {record['jax']}, libtpu {record['libtpu']}, "
        f"{record['wall_s']:.0f} s{'' if record['complete'] else ' (stopped early)'}. {ok} of {len(rows)} cases "
        "compiled. Written by `experiments/tpu_kernels.py` "
        "(see its docstring and docs/tpu-kernels.md).",
        "",
        "Columns: lengths are T x S (flash, decode) or T x N_v (cross); VMEM is our largest per-kernel estimate "
        "against the generation's default scoped VMEM (MiB); temp is XLA's temporaries of the whole program (MiB); "
        "'K/V copied' marks a relayout copy of K/V before the kernel; flops and bytes are XLA's cost analysis, "
        "which does not count inside the Mosaic kernels (only the XLA ops around them).",
        "",
        "## Compiled / tried, model shapes with the default blocks",
        "",
        *_summary(shaped),
        "",
    ]
    header = [
        "| kernel | gen | dtype | model | H, N/K | B | lengths | result | compile s | VMEM est / scoped | temp MiB "
        "| K/V copied | flops | bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if probes:
        lines += ["## Growing key blocks (fp32 flash forward): where the compiler refuses them", "", *header]
        lines += [*[_md_row(r) for r in probes], ""]
    lines += ["## Every case", "", *header, *[_md_row(r) for r in shaped], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("wrote", path)


def main(argv):
    del argv
    out = _OUT.value or os.path.join(RESULTS_DIR, "tpu", "kernels_compile.json")
    if _REWRITE.value:
        with open(out) as f:
            write_markdown(json.load(f), os.path.splitext(out)[0] + ".md")
        return
    todo = cases(
        _KERNELS.value, _GENERATIONS.value, _DTYPES.value, _ints(_FLASH_LENS.value), _ints(_CACHE_LENS.value),
        _ints(_DECODE_LENS.value), _ints(_IMAGES.value), _ints(_CROSS_TEXT.value), _PROBE.value,
    )  # fmt: skip
    record = dict(
        command="python -m experiments.tpu_kernels " + " ".join(sys.argv[1:]),
        machine=machine(),
        jax=jax.__version__,
        libtpu=tpu.libtpu_version(),
        scoped_vmem_bytes={g: tpu.CHIPS[g].scoped_vmem_bytes for g in tpu.CHIPS},
        vmem_bytes={g: tpu.CHIPS[g].vmem_bytes for g in tpu.CHIPS},
        note="nothing executed; XLA's cost analysis does not count inside the Mosaic kernels",
        rows=[],
    )
    start = time.perf_counter()
    for i, case in enumerate(todo):
        row = run_case(case)
        record["rows"].append(row)
        print(f"[{i + 1}/{len(todo)}] {case.id}: {'ok' if row['compiled'] else row['error'][:120]} {row['compile_s']}s")
        if (i + 1) % 20 == 0 or i + 1 == len(todo):  # a sweep stopped from outside keeps what it compiled
            record["wall_s"] = time.perf_counter() - start
            record["complete"] = i + 1 == len(todo)
            write_result(record, "", out)
            write_markdown(record, os.path.splitext(out)[0] + ".md")


if __name__ == "__main__":
    cli.run(main)
