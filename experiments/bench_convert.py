"""Peak memory and speed of the streaming Meta -> Orbax converter on a synthetic 8-shard Llama 3.2 3B checkpoint.

    .venv/bin/python -m experiments.bench_convert                          # 3B shapes, 8 shards, bf16, untied head
    .venv/bin/python -m experiments.bench_convert --flush_mb=64 --keep     # a smaller Orbax flush; keep the output
    .venv/bin/python -m experiments.bench_convert --tied --out=/tmp/tied.json   # output.weight == tok_embeddings

The synthetic checkpoint (``params.json`` of Llama 3.2 3B, ``consolidated.00.pth ... 07.pth`` holding each shard's
model-parallel slices as bf16 random values, norms ones) is written once, shard by shard, under ``--model_dir`` and
reused while its completion marker is there. ``output.weight`` is drawn apart from ``tok_embeddings.weight``, so the
converter decides the head is untied and converts both (7.2 GB of tensors in all). With ``--tied`` (as in the
published 1B/3B) ``output.weight`` is a copy of the embedding in every shard instead: the converter then compares the
two whole tensors and converts one (its own cache directory, ``<model_dir>-tied`` by default).

``python -m llama32_jax.convert`` runs in a subprocess (``JAX_PLATFORMS=cpu``, plus any ``--child_env``) while
``/proc/<pid>/status`` is sampled every ``--interval_ms`` for VmRSS, RssAnon, RssFile and VmHWM until it exits. Peak
RSS is the largest VmHWM seen: the kernel's high-water mark of the process's own memory since its exec, so a peak
between samples is not missed (the RssAnon / RssFile peaks are sampled maxima and can be). ``wait4``'s
``ru_maxrss`` is recorded but not used: Linux carries the parent's RSS at fork into it (a bare ``python -c "import
torch"`` child of this 1.8 GB process reports 1.8 GB). Baselines measured the same way: the fixed cost of importing
``llama32_jax, torch, orbax.checkpoint`` (and of starting JAX's CPU backend), and a plain sequential read of the
shard files in 64 MiB chunks. The page cache is dropped (as root) before the cold read and the conversion; whether
that worked is recorded, since without it the "disk" numbers are page-cache numbers.

The bound checked is the converter's design goal: peak RSS <= 2 x the largest single tensor + 1 GiB (the largest is
the merged embedding / output head, 128256 x 3072 bf16 = 788 MB). Afterwards this process restores the converted
checkpoint and compares a few leaves bit for bit with the shards merged by hand. Writes JSON.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments.results_io import machine, write_result
from experiments.synthetic_meta import ensure_synthetic, meta_layout, synthetic_config

_MODEL_DIR = flags.DEFINE_string("model_dir", "/tmp/bench_convert/meta-3b-mp8", "synthetic Meta checkpoint (cached)")
_OUTPUT = flags.DEFINE_string("output", "/tmp/bench_convert/orbax-3b", "converted checkpoint directory")
_SHARDS = flags.DEFINE_integer("shards", 8, "model-parallel shards of the synthetic checkpoint")
_KEEP = flags.DEFINE_bool("keep", False, "keep the converted output (the synthetic source is always kept)")
_FLUSH_MB = flags.DEFINE_integer("flush_mb", 0, "pass --flush-mb to the converter (0: its default)")
_CHILD_ENV = flags.DEFINE_list("child_env", [], "KEY=VALUE pairs set for the converter (e.g. MALLOC_ARENA_MAX=2)")
_INTERVAL = flags.DEFINE_float("interval_ms", 20.0, "/proc sampling interval")
_DROP = flags.DEFINE_bool("drop_caches", True, "drop the page cache before the cold read and the conversion")
_VERIFY = flags.DEFINE_bool("verify", True, "restore the output and compare leaves with the source")
_TIED = flags.DEFINE_bool("tied", False, "output.weight equal to tok_embeddings.weight (tied head)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the synthetic weights")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/bench_convert_3b_mp8.json)")

MIB = 2**20
GIB = 2**30
CHUNK = 64 * MIB
_STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


# --------------------------------------------------------------------------------------------------------------
# Measuring a subprocess.


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False where not permitted (not root, read-only /proc/sys)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _status(pid: int) -> dict[str, int] | None:
    """The memory fields of ``/proc/<pid>/status`` in bytes (None once the process has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in _STATUS_FIELDS:
            out[name] = int(rest.split()[0]) * 1024
    return out or None


def measure(cmd: list[str], env: dict, interval_s: float, log_path: str) -> dict:
    """Run ``cmd``, sampling its memory until it exits; peaks in bytes, a 1 s timeline in MiB."""
    peaks = dict.fromkeys(_STATUS_FIELDS, 0)
    at_peak: dict = {}
    timeline = []
    samples = 0
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        next_tick = 0.0
        while True:
            pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            st = _status(proc.pid)
            now = time.perf_counter() - t0
            if st and "VmRSS" in st:
                samples += 1
                if st["VmRSS"] > peaks["VmRSS"]:
                    at_peak = {"t_s": round(now, 2), **{k.lower() + "_mib": round(v / MIB, 1) for k, v in st.items()}}
                for k, v in st.items():
                    peaks[k] = max(peaks[k], v)
                if now >= next_tick:
                    timeline.append(
                        [round(now, 1), *(round(st.get(k, 0) / MIB) for k in ("VmRSS", "RssAnon", "RssFile"))]
                    )
                    next_tick = now + 1.0
            time.sleep(interval_s)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    with open(log_path) as f:
        output = f.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{output[-4000:]}")
    # ru_maxrss (KiB) includes the parent's RSS copied at fork, so only the child's own VmHWM counts.
    maxrss = rusage.ru_maxrss * 1024
    peak = max(peaks["VmHWM"], peaks["VmRSS"])
    return {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": peak,
        "peak_rss_mib": round(peak / MIB, 1),
        "wait4_ru_maxrss_mib_includes_parent_at_fork": round(maxrss / MIB, 1),
        "sampled_peak_mib": {k: round(v / MIB, 1) for k, v in peaks.items()},
        "at_sampled_rss_peak": at_peak,
        "samples": samples,
        "timeline_t_rss_anon_file_mib": timeline,
        "output": output.strip()[-2000:],
    }


def sequential_read(files: list[str]) -> dict:
    """Read every file start to end in 64 MiB chunks (into one reused buffer); bytes and MB/s."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "s": round(dt, 2), "mb_s": round(total / 1e6 / dt, 1)}


# --------------------------------------------------------------------------------------------------------------
# Checking the output.


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def verify(src: str, out: str, shards: int, tied: bool) -> dict:
    """Restore the converted tree and compare some leaves, bit for bit, with the shards merged here by hand."""
    import torch

    from llama32_jax.checkpoint.convert import to_numpy
    from llama32_jax.checkpoint.keymap import TRANSFORMS
    from llama32_jax.checkpoint.orbax_ckpt import restore_params

    t0 = time.perf_counter()
    config, tree = restore_params(out)
    restore_s = time.perf_counter() - t0
    t = config.text
    states = [
        torch.load(os.path.join(src, f"consolidated.{s:02d}.pth"), map_location="cpu", weights_only=True, mmap=True)
        for s in range(shards)
    ]

    def merged(key: str, dim: int | None) -> np.ndarray:
        parts = [to_numpy(st[key]) for st in states]
        return parts[0] if dim is None else np.concatenate(parts, axis=dim)

    last = t.n_layers - 1
    checks = {
        "embed.embedding == cat(tok_embeddings, 0)": (tree["embed"]["embedding"], merged("tok_embeddings.weight", 0)),
        "norm.weight == norm (shard 0)": (tree["norm"]["weight"], merged("norm.weight", None)),
        "layers[0].ffn.w2 == cat(w2, 1)": (
            tree["layers"][0]["feed_forward"]["w2"]["kernel"],
            merged("layers.0.feed_forward.w2.weight", 1),
        ),
        "layers[0].ffn.w1 == cat(w1, 0)": (
            tree["layers"][0]["feed_forward"]["w1"]["kernel"],
            merged("layers.0.feed_forward.w1.weight", 0),
        ),
        f"layers[{last}].ffn.w3 == cat(w3, 0)": (
            tree["layers"][last]["feed_forward"]["w3"]["kernel"],
            merged(f"layers.{last}.feed_forward.w3.weight", 0),
        ),
        f"layers[{last}].attn.wv == cat(wv, 0) as (K, H, D)": (
            tree["layers"][last]["attention"]["wv"]["kernel"],
            merged(f"layers.{last}.attention.wv.weight", 0).reshape(t.n_kv_heads, t.head_dim, t.dim),
        ),
        f"layers[{last}].attn.wo == cat(wo, 1) as (D, N, H)": (
            tree["layers"][last]["attention"]["wo"]["kernel"],
            merged(f"layers.{last}.attention.wo.weight", 1).reshape(t.dim, t.n_heads, t.head_dim),
        ),
        "layers[0].attn.wq == meta_q(cat(wq, 0))": (
            tree["layers"][0]["attention"]["wq"]["kernel"],
            TRANSFORMS["meta_q"](merged("layers.0.attention.wq.weight", 0), t),
        ),
        f"layers[{last}].attention_norm == shard 0": (
            tree["layers"][last]["attention_norm"]["weight"],
            merged(f"layers.{last}.attention_norm.weight", None),
        ),
    }
    if not tied:
        checks["lm_head == cat(output, 0)"] = (tree["lm_head"], merged("output.weight", 0))
    results = {}
    for name, (got, want) in checks.items():
        got = np.asarray(got)
        results[name] = bool(
            got.shape == want.shape and got.dtype == want.dtype and np.array_equal(_bits(got), _bits(want))
        )
    n_leaves = sum(1 for _ in _leaves(tree))
    ok = all(results.values()) and t.tie_embeddings == tied and ("lm_head" in tree) != tied and t.ffn_dim == 8192
    return {
        "verified": ok,
        "restore_s": round(restore_s, 1),
        "leaves": n_leaves,
        "tie_embeddings": t.tie_embeddings,
        "checks": results,
    }


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(tree=v)
    else:
        yield tree


# --------------------------------------------------------------------------------------------------------------


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def main(argv):
    del argv
    import jax
    import orbax.checkpoint
    import torch

    src, out, shards = _MODEL_DIR.value, os.path.abspath(_OUTPUT.value), _SHARDS.value
    interval = _INTERVAL.value / 1e3
    tied = _TIED.value
    if tied and flags.FLAGS["model_dir"].using_default_value:
        src += "-tied"
    synthetic = ensure_synthetic(src, shards, _SEED.value, tied)
    files = [os.path.join(src, f"consolidated.{s:02d}.pth") for s in range(shards)]
    source_bytes = sum(os.path.getsize(p) for p in files)
    config = synthetic_config()
    largest = max(int(np.prod(shape)) * 2 for _, shape, _ in meta_layout(config))  # bf16
    bound = 2 * largest + GIB
    print(f"source: {len(files)} shards, {source_bytes / 1e9:.2f} GB; largest tensor {largest / 1e6:.0f} MB")

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    log = os.path.join(os.path.dirname(out) or ".", "bench_convert.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)

    imports = "import llama32_jax, torch, orbax.checkpoint"
    base_import = measure([sys.executable, "-c", imports], env, interval, log)
    base_backend = measure([sys.executable, "-c", imports + "; import jax; jax.devices()"], env, interval, log)
    print(
        f"import cost: peak RSS {base_import['peak_rss_mib']:.0f} MiB "
        f"({base_backend['peak_rss_mib']:.0f} MiB with JAX's CPU backend started)"
    )

    cold_dropped = _DROP.value and drop_caches()
    cold = sequential_read(files)
    warm = sequential_read(files)
    print(
        f"sequential read: {cold['mb_s']:.0f} MB/s (page cache dropped: {cold_dropped}), "
        f"{warm['mb_s']:.0f} MB/s again from the page cache"
    )

    cmd = [
        sys.executable,
        "-m",
        "llama32_jax.convert",
        "--source",
        src,
        "--output",
        out,
        "--no-progress",
        "--overwrite",
    ]
    if _FLUSH_MB.value:
        cmd += ["--flush-mb", str(_FLUSH_MB.value)]
    child_env = dict(kv.split("=", 1) for kv in _CHILD_ENV.value)
    conv_dropped = _DROP.value and drop_caches()
    run = measure(cmd, {**env, **child_env}, interval, log)
    m = re.search(r"wrote .* in ([\d.]+) s", run["output"])
    convert_s = float(m.group(1)) if m else None
    output_bytes = sum(
        os.path.getsize(os.path.join(d, n))
        for d, _, names in os.walk(out)
        for n in names
        if not os.path.islink(os.path.join(d, n))
    )
    peak = run["peak_rss_bytes"]
    conversion = {
        "command": " ".join(cmd),
        "env": {"JAX_PLATFORMS": "cpu", **child_env},
        "page_cache_dropped": conv_dropped,
        **{k: v for k, v in run.items() if k != "output"},
        "peak_rss_anon_mib": run["sampled_peak_mib"]["RssAnon"],
        "peak_rss_file_mib": run["sampled_peak_mib"]["RssFile"],
        "convert_s_reported": convert_s,
        "mb_s_wall": round(source_bytes / 1e6 / run["wall_s"], 1),
        "mb_s_convert": round(source_bytes / 1e6 / convert_s, 1) if convert_s else None,
        "output_bytes": output_bytes,
        "converter_output": run["output"],
    }
    within = peak <= bound
    check = {
        "rule": "peak RSS <= 2 x largest single tensor + 1 GiB",
        "largest_tensor": "tok_embeddings.weight / output.weight merged, 128256 x 3072 bf16",
        "largest_tensor_bytes": largest,
        "bound_bytes": bound,
        "bound_mib": round(bound / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "within_bound": within,
        "margin_mib": round((bound - peak) / MIB, 1),
        "peak_over_import_cost_mib": round((peak - base_backend["peak_rss_bytes"]) / MIB, 1),
    }
    print(
        f"conversion: {run['wall_s']:.1f} s wall ({convert_s} s inside the converter), "
        f"{conversion['mb_s_wall']:.0f} MB/s of source per wall second"
    )
    print(
        f"peak RSS {peak / MIB:.0f} MiB (sampled peaks: RssAnon {conversion['peak_rss_anon_mib']:.0f} MiB, "
        f"RssFile {conversion['peak_rss_file_mib']:.0f} MiB); bound 2 x {largest / MIB:.0f} MiB + 1 GiB = "
        f"{bound / MIB:.0f} MiB: {'within' if within else 'ABOVE'} by {abs(bound - peak) / MIB:.0f} MiB"
    )

    verified = verify(src, out, shards, tied) if _VERIFY.value else {"verified": None}
    print(f"verified: {verified['verified']} {verified.get('checks', '')}")
    if not _KEEP.value:
        shutil.rmtree(out, ignore_errors=True)

    flags_used = (
        "model_dir",
        "output",
        "shards",
        "flush_mb",
        "child_env",
        "interval_ms",
        "drop_caches",
        "verify",
        "seed",
        "tied",
        "keep",
    )
    record = {
        "benchmark": "bench_convert",
        "command": "python -m experiments.bench_convert "
        + " ".join(f"--{f}={_flag_text(getattr(flags.FLAGS, f))}" for f in flags_used),
        "machine": machine(),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "orbax-checkpoint": getattr(orbax.checkpoint, "__version__", "?"),
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "source": {
            "dir": src,
            "synthetic": synthetic,
            "shards": len(files),
            "bytes": source_bytes,
            "tied_head": tied,
        },
        "units": "MiB = 2**20 bytes; MB/s = 1e6 bytes per second of source data",
        "baseline_import": {"code": imports, **{k: v for k, v in base_import.items() if k != "output"}},
        "baseline_import_and_jax_backend": {k: v for k, v in base_backend.items() if k != "output"},
        "baseline_sequential_read": {
            "chunk_bytes": CHUNK,
            "cold": {**cold, "page_cache_dropped": cold_dropped},
            "warm_page_cache": warm,
        },
        "conversion": conversion,
        "memory_bound": check,
        "verification": verified,
    }
    write_result(record, "bench_convert_3b_mp8.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
