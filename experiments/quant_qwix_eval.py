"""Qwix (Google's JAX quantization library) on our models, against our own weight-only quantization.

    PYTHONPATH=/path/to/qwix .venv/bin/python -m experiments.quant_qwix_eval     # ~3 min on 2 cores

Qwix is not a dependency of this project; this script runs only where ``import qwix`` works (it exits with a
message otherwise). It measures what the decision in ``experiments/results/quant/qwix.md`` rests on:

- ``compat``: ``qwix.quantize_model`` with a ``PtqProvider`` and one weight-only int8 rule for the decoder layers
  (``module_path="layers/.*"``, so the tied head / embedding stays float) on ``lj.init_model(TINY_TEXT)`` with
  ``scan_layers`` False and True, called eagerly (as qwix's NNX example does) and under ``nnx.eval_shape`` (the way
  to avoid materialising float weights on a device), then ``qwix.quantize_params``; with
  ``attention_impl="pallas"``; on ``TINY_VISION`` through ``__call__`` and through ``cross_inputs`` (the vision
  tower). For each: which of the projections our own ``quant_targets`` lists came out stored quantized (an int8
  ``qvalue``), the shapes and logical axes of what qwix stores, whether our sharding plans
  (``sharding.apply.param_specs``) accept them, the logits against the float model and ours, and what our jitted
  entry point (``models.build.forward``: split, jit, merge) does with the model (does each call round weights,
  i.e. quantize float-stored kernels on the fly). Also ``qwix.quantize_params`` on one tensor at a time (what
  streaming conversion needs), given a JAX array and a host numpy array.
- ``matmul``: a 1B-shaped MLP projection (our ``Einsum("btd,fd->btf")``, kernel ``[8192, 2048]``) at 1 and 16
  rows: qwix's PTQ int8 (and int4, tile 128) module vs ours (``llama32_jax.quant.qlinear``, int8 and int4 g128) vs
  fp32, jitted: the optimized HLO (the entry computation's fusions; is a full ``f32[8192,2048]`` copy of the weight
  made; XLA's temporary bytes) and the median / min time per call.

Writes ``experiments/results/quant/qwix.json``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import git_commit, machine, write_result
from llama32_jax import sharding
from llama32_jax.inference.generate import image_tile_mask
from llama32_jax.inputs.image import preprocess
from llama32_jax.models.build import forward
from llama32_jax.models.quantize import quant_targets, quantize_model
from llama32_jax.nn.layers import Einsum
from llama32_jax.quant import qlinear
from llama32_jax.sharding.apply import param_specs

_SECTIONS = flags.DEFINE_list("sections", ["compat", "matmul"], "compat, matmul")
_ROWS = flags.DEFINE_list("rows", ["1", "16"], "matmul rows")
_RUNS = flags.DEFINE_integer("runs", 30, "timed calls per matmul (median)")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/quant/qwix.json)")

# Tensor parallel over 2 devices (splits heads and mlp; the tiny models' 2 KV heads rule out the 8-way "tp") and
# fully sharded over 8 (splits embed).
PLANS = ("h100x2", "fsdp")
qwix = None  # imported in main when available (an optional package, never a dependency)


def _rules():
    return [qwix.QuantizationRule(module_path=r"layers/.*", weight_qtype=jnp.int8)]


def _qvalue_leaves(model) -> dict[tuple, dict]:
    """``{kernel path: {"qvalue", "scale", "axes"}}`` for every parameter qwix quantized (a ``WithAux`` holding a
    ``QArray`` whose ``qvalue`` / ``scale`` are ``nnx.Param`` with the float kernel's metadata copied)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if type(node).__name__ == "WithAux":
            qa = node.array
            out[tuple(path)] = {
                "qvalue": f"{qa.qvalue[...].dtype}{list(qa.qvalue.shape)}",
                "scale": f"{qa.scale[...].dtype}{list(qa.scale.shape)}",
                "axes": list(qa.qvalue.get_metadata().get("axes", ())),
            }
    return out


def _coverage(config, quantized: dict) -> dict:
    """Which of the decoder kernels we quantize (our int8 targets, head excluded) qwix quantized, per projection."""
    ours = [k for k in quant_targets(config, lj.QuantConfig("int8")) if k[0] == "layers"]
    kinds: dict[str, list[int]] = {}
    for k in ours:
        kinds.setdefault(k[-2], [0, 0])
        kinds[k[-2]][1] += 1
        kinds[k[-2]][0] += k in quantized
    return {n: f"{a}/{b}" for n, (a, b) in sorted(kinds.items())}


def _sharding_check(model) -> dict:
    """Can our plans place qwix's parameters? ``param_specs`` under two plans (the error is the finding)."""
    out = {}
    for plan in PLANS:
        try:
            param_specs(model, sharding.load_plan(plan))
            out[plan] = "ok"
        except Exception as e:
            out[plan] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


class _Failed(Exception):
    pass


def _stage(out: dict, name: str, fn):
    """Run one step of a case; on an exception record which step failed and with what, and stop the case."""
    try:
        return fn()
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        frames = [line.strip()[-110:] for line in tb if line.strip().startswith("File ")]
        out["failed_at"] = name
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        out["where"] = frames[-3:]
        raise _Failed from e


def _soft(fn):
    """``fn()``, or its exception as one line (a finding, not the end of the case)."""
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _float_kernels_left(model) -> int:
    return sum(
        1
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param) and p[0] == "layers" and p[-1] == "kernel" and v[...].dtype == jnp.float32
    )


def _text_case(scan: bool, abstract: bool, impl: str = "auto") -> dict:
    config = lj.configs.TINY_TEXT.replace(scan_layers=scan)
    model = lj.init_model(config, param_dtype=jnp.float32, seed=1)
    lj.Model(model).set_attention_impl(impl)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.text.vocab_size, (2, 12)), jnp.int32)
    want, _ = model(tokens)
    ours_logits, _ = quantize_model(nnx.clone(model), lj.QuantConfig("int8"))(tokens)
    provider = qwix.PtqProvider(_rules())
    out: dict = {}
    try:
        if abstract:
            qmodel = _stage(
                out,
                "quantize_model under eval_shape",
                lambda: nnx.eval_shape(lambda: qwix.quantize_model(model, provider, tokens)),
            )
            float_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            qparams = _stage(out, "quantize_params", lambda: qwix.quantize_params(float_params, qmodel))
            _stage(out, "nnx.update", lambda: nnx.update(qmodel, qparams))
        else:
            qmodel = _stage(out, "quantize_model", lambda: qwix.quantize_model(model, provider, tokens))
        quantized = _qvalue_leaves(qmodel)
        out |= {
            "quantized_kernels": len(quantized),
            "coverage_vs_ours": _coverage(config, quantized),
            "float_kernels_left_in_layers": _float_kernels_left(qmodel),
            "example": next(iter(sorted(quantized.items(), key=lambda kv: str(kv[0]))), None),
            "param_specs": _sharding_check(qmodel),
        }
        got, _ = _stage(out, "call the quantized model", lambda: qmodel(tokens))
        out |= {
            "max_abs_logit_diff_vs_float": float(jnp.abs(got - want).max()),
            "max_abs_logit_diff_vs_ours_int8": float(jnp.abs(got - ours_logits).max()),
            "ours_max_abs_logit_diff_vs_float": float(jnp.abs(ours_logits - want).max()),
        }
        # What our jitted entry point (Model.logits / generation: split, jit, merge) does with the qwix model:
        # inside the trace the projections see tracers, so qwix may quantize more (on the fly, every call).
        graphdef, state = nnx.split(qmodel)
        merged_call = lambda st, t: nnx.merge(graphdef, st)(t)[0]  # noqa: E731 (what forward() jits)
        rounds = _soft(lambda: str(jax.make_jaxpr(merged_call)(state, tokens)).count("round["))
        out["rounds_weights_inside_each_jitted_call"] = rounds if isinstance(rounds, str) else rounds > 0
        jitted = _soft(lambda: forward(qmodel, tokens)[0])
        if isinstance(jitted, str):
            out["llama32_jax_forward_jitted"] = jitted
        else:
            out["llama32_jax_forward_jitted_max_abs_diff_vs_eager_call"] = float(jnp.abs(jitted - got).max())
    except _Failed:
        pass
    return out


def _vision_inputs(config):
    s = config.vision.image_size
    rng = np.random.default_rng(5)
    images = [[rng.integers(0, 256, (2 * s, s, 3), dtype=np.uint8)]]
    batch = preprocess(images, config.vision)
    ids = np.asarray([[1, 5, config.image_token_id, 7, 9, 11]], np.int32)
    mask = jnp.asarray(image_tile_mask(config, ids.tolist(), batch, ids.shape[1]))
    return jnp.asarray(ids), (jnp.asarray(batch.pixel_values), jnp.asarray(batch.aspect_ratio_ids), mask)


def _vision_case(method: str) -> dict:
    config = lj.configs.TINY_VISION
    model = lj.init_model(config, param_dtype=jnp.float32, seed=2)
    ids, args = _vision_inputs(config)
    cross = model.cross_inputs(*args)
    want, _ = model(ids, cross=cross)
    rules = [qwix.QuantizationRule(module_path=r"(layers|vision|projector|cross_layers)(/.*)?", weight_qtype=jnp.int8)]
    provider = qwix.PtqProvider(rules)
    out: dict = {}
    try:
        if method == "__call__":
            qmodel = _stage(out, "quantize_model", lambda: qwix.quantize_model(model, provider, ids, cross=cross))
        else:
            qmodel = _stage(
                out, "quantize_model", lambda: qwix.quantize_model(model, provider, *args, methods=(method,))
            )
        quantized = _qvalue_leaves(qmodel)
        ours = [k for k in quant_targets(config, lj.QuantConfig("int8")) if k != ("lm_head",)]
        parts: dict[str, list[int]] = {}
        for k in ours:
            parts.setdefault(str(k[0]), [0, 0])
            parts[str(k[0])][1] += 1
            parts[str(k[0])][0] += k in quantized
        out |= {
            "quantized_kernels": len(quantized),
            "coverage_vs_ours_by_part": {n: f"{a}/{b}" for n, (a, b) in sorted(parts.items())},
            "other_kernels_quantized": sorted(".".join(map(str, k)) for k in quantized if k not in set(ours))[:4],
        }
        calls: dict = {}  # each entry point on its own: qwix intercepts only the method it quantized through
        for name, fn in (
            ("cross_inputs", lambda: qmodel.cross_inputs(*args)),
            ("encode_images", lambda: qmodel.encode_images(*args[:2])),
            ("__call__", lambda: qmodel(ids, cross=cross)[0]),
        ):
            try:
                result = fn()
            except Exception as e:
                calls[name] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            if name == "encode_images":
                calls[name] = (
                    f"ok, max |diff| vs float {float(jnp.abs(result - model.encode_images(*args[:2])).max()):.3g}"
                )
            elif name == "__call__":
                calls[name] = f"ok, max |logit diff| vs float {float(jnp.abs(result - want).max()):.3g}"
            else:
                calls[name] = "ok"
        out["calls"] = calls
    except _Failed:
        pass
    return out


def _per_tensor() -> dict:
    """``qwix.quantize_params`` on one tensor at a time (a one-leaf subtree), as streaming conversion needs: with a
    JAX array and with a host numpy array (how our converter holds each tensor it reads)."""
    config = lj.configs.TINY_TEXT
    model = lj.init_model(config, param_dtype=jnp.float32, seed=1)
    tokens = jnp.zeros((1, 4), jnp.int32)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(_rules()), tokens)
    w = model.layers[0].feed_forward.w1.kernel[...]
    out = {}
    for name, leaf in (("jax array", w), ("numpy array", np.asarray(w))):
        try:
            q = qwix.quantize_params({"layers": {0: {"feed_forward": {"w1": {"kernel": leaf}}}}}, qmodel)
            arr = q["layers"][0]["feed_forward"]["w1"]["kernel"]["array"]
            out[name] = f"ok: qvalue {arr['qvalue'].dtype}{list(arr['qvalue'].shape)}, scale {list(arr['scale'].shape)}"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def compat() -> dict:
    out = {"per_tensor_quantize_params": _per_tensor()}
    print(out, flush=True)
    for scan in (False, True):
        for abstract in (False, True):
            name = f"text scan_layers={scan} {'abstract (eval_shape + quantize_params)' if abstract else 'eager'}"
            print(name, flush=True)
            out[name] = _text_case(scan, abstract)
            print(" ", out[name], flush=True)
    out["text scan_layers=False eager, attention_impl=pallas"] = _text_case(False, False, "pallas")
    for method in ("__call__", "cross_inputs"):
        out[f"vision via {method}"] = _vision_case(method)
        print(method, out[f"vision via {method}"], flush=True)
    return out


# ------------------------------------------------------------------------------------------------------------
F, D = 8192, 2048  # Llama 3.2 1B MLP: ffn_dim x dim


def _hlo_facts(compiled) -> dict:
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    entry = text[text.index("ENTRY") :]
    full = re.compile(rf"f32\[({F},{D}|{D},{F})\]")
    materialized = [
        line.strip()[:160]
        for line in entry.splitlines()
        if full.search(line.split("=", 1)[-1].split("(", 1)[0]) and "parameter(" not in line
    ]
    fusions = re.findall(r"%([\w.\-]+) = [^=]*? fusion\(", entry)
    return {
        "entry_fusions": [re.sub(r"\.\d+$", "", f) for f in fusions],
        "temp_bytes": int(mem.temp_size_in_bytes),
        "full_f32_weight_values_in_entry": materialized[:4],
        "fusion_kinds": sorted(set(re.findall(r"kind=(k\w+)", text))),
        "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
        "dot_ops": len(re.findall(r"\bdot\(", text)),
        "converts": len(re.findall(r"\bconvert\(", text)),
    }


def _median_ms(fn, *args) -> tuple[float, float]:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_RUNS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def _merged_call(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def matmul() -> list[dict]:
    rngs = nnx.Rngs(0)
    proj = Einsum("btd,fd->btf", (F, D), ("mlp", "embed"), dtype=jnp.float32, rngs=rngs)
    w = proj.kernel[...]
    rows_out = []
    for rows in [int(r) for r in _ROWS.value]:
        x = jax.random.normal(jax.random.key(rows), (1, rows, D), jnp.float32)
        qproj = qwix.quantize_model(proj, qwix.PtqProvider([qwix.QuantizationRule(weight_qtype=jnp.int8)]), x)
        q_state = nnx.state(qproj)
        run_qwix = functools.partial(_merged_call, nnx.graphdef(qproj))
        q4proj = qwix.quantize_model(
            proj, qwix.PtqProvider([qwix.QuantizationRule(weight_qtype=jnp.int4, tile_size=128)]), x
        )
        q4_state = nnx.state(q4proj)
        run_qwix4 = functools.partial(_merged_call, nnx.graphdef(q4proj))
        from_ours = quantize_model(nnx.clone(proj), lj.QuantConfig("int8"))
        q8, s8 = from_ours.kernel[...], from_ours.kernel_scale[...]
        from_ours4 = quantize_model(nnx.clone(proj), lj.QuantConfig("int4", group_size=128))
        q4, s4 = from_ours4.kernel[...], from_ours4.kernel_scale[...]
        cases = {
            "fp32 einsum (our float Einsum)": (jax.jit(lambda w, x: jnp.einsum("btd,fd->btf", x, w)), (w, x)),
            "fp32 x @ w.T": (jax.jit(lambda w, x: x @ w.T), (w, x)),
            "qwix PTQ int8": (jax.jit(run_qwix), (q_state, x)),
            "ours int8 (qlinear)": (jax.jit(lambda q, s, x: qlinear(x, q, s, "int8", 0)), (q8, s8, x)),
            "qwix PTQ int4 tile 128": (jax.jit(run_qwix4), (q4_state, x)),
            "ours int4 g128 (qlinear)": (jax.jit(lambda q, s, x: qlinear(x, q, s, "int4", 128)), (q4, s4, x)),
        }
        ref = x @ w.T
        for name, (fn, args) in cases.items():
            compiled = fn.lower(*args).compile()
            med, best = _median_ms(fn, *args)
            err = float(jnp.abs(fn(*args) - ref).max())
            rows_out.append(
                {"rows": rows, "impl": name, "ms_median": med, "ms_min": best, "max_abs_err_vs_fp32": err}
                | _hlo_facts(compiled)
            )
            print(rows_out[-1], flush=True)
    return rows_out


def main(argv):
    del argv
    global qwix
    if importlib.util.find_spec("qwix") is None:
        print(
            "qwix is not importable here (it is not a dependency of llama32_jax); put it on PYTHONPATH, e.g. "
            "pip install --no-deps --target /tmp/qwix_site qwix && PYTHONPATH=/tmp/qwix_site ...",
            file=sys.stderr,
        )
        sys.exit(1)
    import qwix as qwix_module  # an optional package: imported only when present

    qwix = qwix_module
    load_start = os.getloadavg()
    record = {
        "git_commit": git_commit(),
        "what": "qwix PTQ weight-only int8 on llama32_jax models vs our quantization",
        "command": "python -m experiments.quant_qwix_eval " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": {"qwix": qwix.__version__ if hasattr(qwix, "__version__") else "?", "jax": jax.__version__},
    }
    if "compat" in _SECTIONS.value:
        record["compat"] = compat()
    if "matmul" in _SECTIONS.value:
        record["matmul"] = matmul()
    record["load_average_start_end"] = [list(load_start), list(os.getloadavg())]
    write_result(record, "quant/qwix.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
