"""How to write a weight-only quantized matmul so that XLA:CPU reads the small weight and never a float copy of it.

    .venv/bin/python -m experiments.quant_formulations                      # 1B MLP shape 8192x2048, rows 1..64
    .venv/bin/python -m experiments.quant_formulations --rows=1,16 --hlo=0  # timings only

Times ``y [R, O] = x [R, I] @ W^T`` for ``W [O, I]`` given as fp32, or as int8 / int4 values with fp32 scales, in
the candidate formulations below, each jitted alone, best of ``--repeats`` after a warm-up. For every formulation
it also reads XLA's optimized HLO (``jax.jit(f).lower(...).compile().as_text()``) and reports what happened to the
int -> float convert: fused into the dot's own loop (a ``kLoop`` fusion holding ``convert`` and ``dot``), or
materialized as a full-size float temporary first (a ``wrapped_convert`` / convert fusion whose output has the
weight's shape, then the library dot, ``__ynn_fusion`` / ``__onednn``), plus the compiled temp bytes. With
``--step`` it also compiles one full decode step of the model at ``--model`` under fp32 / int8 / int4 and reports
its temporaries against the fp32 weight size: a full-size fp32 copy of a weight would show there; with
``--step_timing`` it times an int8 decode step with qlinear's CPU chunking on and off.

Results: ``experiments/results/quant/formulations.{json,md}`` (the md is written by hand from the JSON).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import machine, write_result
from llama32_jax.inference.generate import bucket
from llama32_jax.models.quantize import quantize_model
from llama32_jax.nn.cache import KVCache
from llama32_jax.quant import arrays
from llama32_jax.quant.config import QuantConfig

_OUT_DIM = flags.DEFINE_integer("out_dim", 8192, "O (rows of the weight)")
_IN_DIM = flags.DEFINE_integer("in_dim", 2048, "I (contracted)")
_ROWS = flags.DEFINE_list("rows", ["1", "2", "4", "16", "64"], "activation rows R")
_ONLY = flags.DEFINE_list("only", [], "run only these formulations (names as printed)")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed calls per formulation and R (the minimum is reported)")
_CHUNK = flags.DEFINE_integer("chunk", 512, "output rows per chunk in the chunked formulations")
_HLO = flags.DEFINE_bool("hlo", True, "analyse the optimized HLO of each formulation")
_STEP = flags.DEFINE_bool("step", True, "also compile one full decode step of --model and report its temporaries")
_STEP_TIMING = flags.DEFINE_bool(
    "step_timing", True, "also time one int8 decode step of --model (batch 1) with qlinear's CPU chunking on and off"
)
_MODEL = flags.DEFINE_string("model", "Llama-3.2-1B", "named config for --step")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/quant/formulations.json)")

GROUP = 128
_f32 = jnp.float32


# --- the formulations: (x, weights...) -> y [R, O] fp32 ------------------------------------------------------------


def fp32(x, w):
    return x @ w.T


def int8_matmul(x, q, s):  # the form qlinear uses: convert inside `x @ w.T`, per-channel scale after
    return (x @ q.astype(_f32).T) * s


def int8_einsum(x, q, s):
    return jnp.einsum("ri,oi->ro", x, q.astype(_f32)) * s


def int8_dequant_dot(x, q, s):  # scale applied to the weight first
    return x @ (q.astype(_f32) * s[:, None]).T


def int8_barrier(x, q, s):  # force the fp32 weight to exist: what the fused form must beat
    return (x @ jax.lax.optimization_barrier(q.astype(_f32)).T) * s


def int8_rows_unrolled(x, q, s):  # qlinear's CPU path for 2..3 rows: one fused 1-row product per row
    return jnp.concatenate([int8_matmul(x[r : r + 1], q, s) for r in range(x.shape[0])])


def int8_rows_map(x, q, s):  # the same per row, as a loop (lax.map) instead of unrolled
    return jax.lax.map(lambda xr: int8_matmul(xr[None], q, s)[0], x)


def int8_bf16(x, q, s):  # convert into bf16 (half the temporary), bf16 product, fp32 accumulation
    y = jnp.dot(x.astype(jnp.bfloat16), q.astype(jnp.bfloat16).T, preferred_element_type=_f32)
    return y * s


def int8_dot_general(x, q, s):  # mixed-dtype dot_general: fp32 x int8 -> fp32
    y = jax.lax.dot_general(x, q, (((1,), (1,)), ((), ())), preferred_element_type=_f32)
    return y * s


def _chunks(q):
    o, i = q.shape
    c = min(_CHUNK.value, o)
    return q.reshape(o // c, c, i)


def int8_chunked_scan(x, q, s):  # dequantize a chunk of output rows at a time: a small temporary, reused
    def body(_, qc):
        return None, x @ qc.astype(_f32).T

    _, y = jax.lax.scan(body, None, _chunks(q))  # [O/c, R, c]
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], -1) * s


def int8_chunked_unrolled(x, q, s):  # the same chunks, unrolled (XLA may schedule them as it likes)
    return jnp.concatenate([x @ qc.astype(_f32).T for qc in _chunks(q)], axis=1) * s


def _group_dequant(q, s):
    o, i = q.shape
    return (q.astype(_f32).reshape(o, i // GROUP, GROUP) * s[..., None]).reshape(o, i)


def int4_native(x, q4, s):  # jnp.int4 storage, group scales: qlinear's int4 path
    return x @ _group_dequant(q4, s).T


def int4_in_int8(x, q8, s):  # the same values held in int8 (1 byte each, as XLA:CPU stores int4 anyway)
    return x @ _group_dequant(q8, s).T


def int4_in_int8_chunked(x, q8, s):  # int4-in-int8 dequantized a chunk of output rows at a time
    o, i = q8.shape
    c = min(_CHUNK.value, o)

    def body(_, qs):
        qc, sc = qs
        return None, x @ _group_dequant(qc, sc).T

    _, y = jax.lax.scan(body, None, (q8.reshape(o // c, c, i), s.reshape(o // c, c, -1)))
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], -1)


def unpack_nibbles(p):
    """``p [O, I/2]`` uint8, two int4 values per byte (low nibble = even input) -> ``[O, I]`` int8."""
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(p, jnp.uint8(4)).astype(jnp.int8), jnp.int8(4))
    hi = jax.lax.shift_right_arithmetic(p.astype(jnp.int8), jnp.int8(4))
    return jnp.stack([lo, hi], axis=-1).reshape(p.shape[0], -1)


def int4_native_chunked(x, q4, s):  # jnp.int4 storage dequantized a chunk of output rows at a time
    return int4_in_int8_chunked(x, q4, s)


def int4_packed(x, p, s):  # packed nibbles: truly 0.5 byte per value in memory, unpacked in the product
    return x @ _group_dequant(unpack_nibbles(p), s).T


FORMS = {
    "fp32": (fp32, "w"),
    "int8_matmul": (int8_matmul, "int8"),
    "int8_einsum": (int8_einsum, "int8"),
    "int8_dequant_dot": (int8_dequant_dot, "int8"),
    "int8_barrier": (int8_barrier, "int8"),
    "int8_rows_unrolled": (int8_rows_unrolled, "int8"),
    "int8_rows_map": (int8_rows_map, "int8"),
    "int8_bf16": (int8_bf16, "int8"),
    "int8_dot_general": (int8_dot_general, "int8"),
    "int8_chunked_scan": (int8_chunked_scan, "int8"),
    "int8_chunked_unrolled": (int8_chunked_unrolled, "int8"),
    "qlinear_int8": (lambda x, q, s: arrays.qlinear(x, q, s, "int8", 0), "int8"),  # as the models run it
    "int4_native": (int4_native, "int4"),
    "int4_in_int8": (int4_in_int8, "int4_in_int8"),
    "int4_in_int8_chunked": (int4_in_int8_chunked, "int4_in_int8"),
    "int4_native_chunked": (int4_native_chunked, "int4"),
    "int4_packed": (int4_packed, "int4_packed"),
    "qlinear_int4": (lambda x, q, s: arrays.qlinear(x, q, s, "int4", GROUP), "int4"),
}


def _weights(o: int, i: int) -> dict:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((o, i)) * 0.02).astype(np.float32)
    q8, s8 = arrays.quantize(w, 1, "int8", 0)
    q4, s4 = arrays.quantize(w, 1, "int4", GROUP)
    q4i8 = np.asarray(q4).astype(np.int8)
    nib = (q4i8.astype(np.uint8) & 0xF).reshape(o, i // 2, 2)
    packed = (nib[..., 0] | (nib[..., 1] << 4)).astype(np.uint8)
    return {
        "w": (jnp.asarray(w),),
        "int8": (jnp.asarray(q8), jnp.asarray(s8)),
        "int4": (jnp.asarray(q4), jnp.asarray(s4)),
        "int4_in_int8": (jnp.asarray(q4i8), jnp.asarray(s4)),
        "int4_packed": (jnp.asarray(packed), jnp.asarray(s4)),
        "_ref_int8": arrays.dequantize(q8, s8, 1, "int8", 0),
        "_ref_int4": arrays.dequantize(q4, s4, 1, "int4", GROUP),
    }


# --- reading the optimized HLO ---------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)\[([0-9,]*)\]\S*\s+(\w[\w\-]*)\(")


def hlo_summary(text: str, o: int, i: int) -> dict:
    """What the optimized HLO does with the weight. Instructions of fused computations (a fusion's body) stay in
    registers; the others produce buffers. Reports the buffers of the weight's full size (``O x I`` elements) in a
    float type (a materialized float weight: ``parameter`` and ``bitcast`` excluded), whether a fusion's body holds
    both a ``convert`` and a ``dot`` (the convert fused into the product), and the unfused instructions that run
    (fusions with their kind, library calls, dots, converts), trimmed."""
    full = o * i
    comps: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", raw)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current is not None and raw.strip() != "}":
            comps[current].append(raw)
    fused = set(re.findall(r"\bcalls=%?([\w.\-]+)", text))
    fused_convert_dot = [
        n for n, body in comps.items() if n in fused and any(" convert(" in ln for ln in body) and
        any(" dot(" in ln for ln in body)
    ]  # fmt: skip
    materialized, lines = [], []
    for name, body in comps.items():
        if name in fused:
            continue
        for raw in body:
            m = _LINE.match(raw)
            if not m:
                continue
            _, dtype, dims, opcode = m.groups()
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            if n == full and dtype in ("f32", "bf16") and opcode not in ("parameter", "bitcast", "get-tuple-element"):
                materialized.append(f"{dtype}[{dims}] {opcode}")
            if opcode in ("fusion", "custom-call", "dot", "convert", "call", "while"):
                short = re.sub(r", (metadata|backend_config|frontend_attributes)=\{.*", "", raw.strip())
                lines.append(short[:200])
    return {
        "float_weight_materialized": materialized,
        "fusions_with_convert_and_dot": fused_convert_dot,
        "unfused_ops": lines[:12],
    }


# --- timing ----------------------------------------------------------------------------------------------------------


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _step_memory(name: str) -> list[dict]:
    """Compile one decode step (batch 1 and 16, a 128-token cache) of ``name`` at fp32 / int8 / int4 from abstract
    shapes and report XLA's temporaries next to the size of the largest fp32 projection weight."""
    cfg = lj.configs.get_config(name)
    rows = []
    for mode in ("none", "int8", "int4"):
        qc = None if mode == "none" else QuantConfig(mode)
        model = lj.abstract_model(cfg, param_dtype=jnp.float32, quant=qc)
        graphdef, state = nnx.split(model)

        def step(state, tok, cache, graphdef=graphdef):
            logits, cache = nnx.merge(graphdef, state)(tok, cache, last_only=True)
            return logits, cache

        for b in (1, 16):
            cache = jax.eval_shape(lambda b=b: KVCache.init(cfg, b, bucket(128), dtype=jnp.float32))
            tok = jax.ShapeDtypeStruct((b, 1), jnp.int32)
            compiled = jax.jit(step, donate_argnums=(2,)).lower(state, tok, cache).compile()
            mem = compiled.memory_analysis()
            t = cfg.text
            largest = 4 * max(t.dim * t.ffn_dim, t.vocab_size * t.dim if not t.tie_embeddings else 0)
            text = compiled.as_text()
            big = sorted(
                {
                    f"{d}[{s}]"
                    for d, s in re.findall(r"\b(f32|bf16)\[([0-9,]+)\]", text)
                    if np.prod([int(v) for v in s.split(",")]) >= t.dim * t.ffn_dim
                }
            )
            rows.append(
                {
                    "quantize": mode,
                    "batch": b,
                    "temp_bytes": int(mem.temp_size_in_bytes),
                    "argument_bytes": int(mem.argument_size_in_bytes),
                    "largest_fp32_mlp_weight_bytes": 4 * t.dim * t.ffn_dim,
                    "largest_fp32_weight_bytes": largest,
                    "float_shapes_at_least_one_mlp_weight": big,
                }
            )
            print(
                f"step {mode:5s} batch {b:2d}: temp {mem.temp_size_in_bytes / 2**20:8.1f} MiB, arguments "
                f"{mem.argument_size_in_bytes / 2**20:8.1f} MiB; float arrays >= one MLP weight: {big}",
                flush=True,
            )
    return rows


def _int4_analysis_bytes() -> float:
    a = jax.ShapeDtypeStruct((1 << 20,), jnp.int4)
    return jax.jit(lambda v: v).lower(a).compile().memory_analysis().argument_size_in_bytes / (1 << 20)


def _step_timing(name: str, repeats: int) -> dict:
    """One batch-1 decode step of ``name`` quantized int8 (random weights), jitted with qlinear's CPU chunking on
    (:func:`llama32_jax.quant.arrays.cpu_chunking`) and off (each product then one ``x @ convert(q).T``, which
    XLA:CPU fuses into a loop together with the activation's producers); interleaved timing, best of ``repeats``.
    Also returns the first fused computation of the unchunked step that holds a convert, a dot and an exponential
    (a SiLU recomputed inside the dot's loop)."""
    cfg = lj.configs.get_config(name)
    model = quantize_model(lj.init_model(cfg, param_dtype=jnp.float32), QuantConfig("int8"))
    graphdef, state = nnx.split(model)
    cache = KVCache.init(cfg, 1, bucket(128), dtype=jnp.float32)
    tok = jnp.zeros((1, 1), jnp.int32)
    original = arrays.cpu_chunking
    fns, texts = {}, {}
    try:
        for chunking in (True, False):
            arrays.cpu_chunking = lambda chunking=chunking: chunking

            def step(state, tok, cache):
                return nnx.merge(graphdef, state)(tok, cache, last_only=True)[0]

            fn = jax.jit(step).lower(state, tok, cache).compile()
            texts[chunking] = fn.as_text()
            fns[chunking] = fn
    finally:
        arrays.cpu_chunking = original
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, tok, cache))
            best[k] = min(best[k], time.perf_counter() - t0)
    silu_dot = ""
    for block in texts[False].split("\n\n"):
        if " convert(" in block and " dot(" in block and (" exponential(" in block or " logistic(" in block):
            silu_dot = re.sub(r", metadata=\{[^}]*\}", "", block.strip())[:2500]
            break
    row = {
        "model": name,
        "chunked_ms": round(best[True] * 1e3, 1),
        "unchunked_ms": round(best[False] * 1e3, 1),
        "fused_computation_with_convert_dot_and_exp_unchunked": silu_dot,
    }
    print(f"{name} int8 decode step, batch 1: chunked {row['chunked_ms']} ms, unchunked {row['unchunked_ms']} ms")
    return row


def main(argv):
    del argv
    o, i = _OUT_DIM.value, _IN_DIM.value
    weights = _weights(o, i)
    names = [n for n in FORMS if not _ONLY.value or n in _ONLY.value]
    rng = np.random.default_rng(1)
    results = []
    for r in [int(v) for v in _ROWS.value]:
        x = jnp.asarray(rng.standard_normal((r, i)).astype(np.float32))
        ref = {"w": np.asarray(x) @ np.asarray(weights["w"][0]).T}
        ref["int8"] = np.asarray(x) @ weights["_ref_int8"].T
        ref["int4"] = ref["int4_in_int8"] = ref["int4_packed"] = np.asarray(x) @ weights["_ref_int4"].T
        t_fp32 = None
        for name in names:
            fn, kind = FORMS[name]
            args = (x, *weights[kind])
            jitted = jax.jit(fn)
            try:
                y = np.asarray(jitted(*args))
            except Exception as e:  # a formulation the compiler refuses is a result too
                print(f"R={r:3d} {name:22s} refused: {type(e).__name__}: {str(e)[:160]}", flush=True)
                results.append({"rows": r, "form": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            err = float(np.max(np.abs(y - ref[kind])) / np.max(np.abs(ref[kind])))
            t = _time(jitted, args, _REPEATS.value)
            t_fp32 = t if name == "fp32" else t_fp32
            row = {"rows": r, "form": name, "ms": round(t * 1e3, 3), "max_rel_err_vs_dequant_ref": err}
            if t_fp32:
                row["speedup_vs_fp32"] = round(t_fp32 / t, 2)
            if _HLO.value:
                compiled = jitted.lower(*args).compile()
                row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
                row["hlo"] = hlo_summary(compiled.as_text(), o, i)
            results.append(row)
            extra = ""
            if "hlo" in row:
                h = row["hlo"]
                extra = (
                    f" temp {row['temp_bytes'] / 2**20:6.1f} MiB, float weight materialized: "
                    f"{h['float_weight_materialized'] or 'no'}, "
                    f"convert+dot fused: {bool(h['fusions_with_convert_and_dot'])}"
                )
            print(
                f"R={r:3d} {name:22s} {t * 1e3:8.3f} ms  x{row.get('speedup_vs_fp32', 1.0):5.2f} vs fp32  "
                f"err {err:.1e}{extra}",
                flush=True,
            )
    record = {
        "benchmark": "quant_formulations",
        "command": "python -m experiments.quant_formulations "
        + " ".join(
            f"--{f}={getattr(flags.FLAGS, f)}" for f in ("out_dim", "in_dim", "repeats", "chunk", "step", "step_timing")
        )
        + f" --rows={','.join(_ROWS.value)}",
        "machine": machine(),
        "versions": {"jax": jax.__version__},
        "shape": {"out": o, "in": i, "group": GROUP},
        # what a jnp.int4 array occupies on this backend (the buffer), vs what the compiler's memory analysis counts
        "int4_bytes_per_value_on_device": jnp.zeros((1 << 20,), jnp.int4).on_device_size_in_bytes() / (1 << 20),
        "int4_bytes_per_value_in_memory_analysis": _int4_analysis_bytes(),
        "results": results,
    }
    if _STEP.value:
        record["decode_step_memory"] = _step_memory(_MODEL.value)
    if _STEP_TIMING.value:
        record["decode_step_int8_timing"] = _step_timing(_MODEL.value, _REPEATS.value)
    write_result(record, "quant/formulations.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
