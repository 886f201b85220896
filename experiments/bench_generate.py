"""Generation speed, ours vs HF transformers (PyTorch eager), on the same random-weight model and prompts.

    .venv/bin/python -m experiments.bench_generate                                  # 1B shape, fp32, CPU
    .venv/bin/python -m experiments.bench_generate --model=tiny-text --batch=1,4    # a quick smoke run
    python -m experiments.bench_generate --dtype=bfloat16 --batch=1,64 --bandwidth_gbs=4800 --peak_gflops=989000
                                                                     # on a GPU (HF then runs on CUDA too)
    .venv/bin/python -m experiments.bench_generate --skip_hf --dtype=float32,bfloat16 --quantize=none,int8,int4
                                            # weight-only int8 / int4 vs float, ours only (quant/decode_<model>.json)

Both run one after the other in this process. Decode speed is measured by difference, so prefill cancels:
``(time(n2 new tokens) - time(n1 new tokens)) / (n2 - n1)`` per step, greedy, no early stop. Prefill is timed
on its own (ours: the jitted prefill; HF: one forward with ``logits_to_keep=1``, as its ``generate`` does).
Prints tokens/s, our/HF ratios, the fraction of the bandwidth floor at batch 1 (weight bytes / --bandwidth_gbs)
and of the compute floor at larger batches (2 x params FLOP per token / --peak_gflops). Writes JSON.

``--dtype`` and ``--quantize`` are lists: every (dtype, quantize) pair runs, one after the other, in this process.
A quantized model is built with random weights (``lj.init_model`` + ``quantize_model``; no HF model, so no HF
row). The bytes a decode step reads are counted from the model's own buffers as this backend stores them
(``on_device_size_in_bytes``: XLA:CPU holds a ``jnp.int4`` value in one byte), scales and the float embedding /
tied head included, less the embedding table when the head is untied (a step reads one row of it per sequence),
plus the KV cache at the mean context of the timed steps.
"""

from __future__ import annotations

import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import best_time, machine, write_result
from llama32_jax.checkpoint import params_from_state_dict
from llama32_jax.inference import generate as gen
from llama32_jax.inference.generate import bucket, generate_tokens
from llama32_jax.models.quantize import quantize_model
from llama32_jax.quant.config import resolve_quantize

_MODEL = flags.DEFINE_string("model", "Llama-3.2-1B", "named config (random weights)")
_BATCH = flags.DEFINE_list("batch", ["1", "16"], "batch sizes")
_PROMPT = flags.DEFINE_integer("prompt_len", 110, "prompt tokens per sequence")
_N1 = flags.DEFINE_integer("n1", 8, "new tokens, short run")
_N2 = flags.DEFINE_integer("n2", 40, "new tokens, long run")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repeats (the minimum is reported)")
_DTYPE = flags.DEFINE_list("dtype", ["float32"], "weights and activations: float32 and/or bfloat16")
_QUANT = flags.DEFINE_list("quantize", ["none"], "weight-only quantization: none, int8, int4 (a list runs each)")
_BW = flags.DEFINE_float("bandwidth_gbs", 36.0, "memory bandwidth for the floor (this CPU: ~36 GB/s)")
_PEAK = flags.DEFINE_float("peak_gflops", 200.0, "compute peak for the floor (this CPU: ~200 GFLOP/s fp32)")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "time ours only (always so for quantized models)")
_HF_DEVICE = flags.DEFINE_string("hf_device", "auto", "torch device for HF ('auto': cuda when available, else cpu)")
_OUT = flags.DEFINE_string(
    "out",
    "",
    "JSON path (default experiments/results/bench_generate_<model>_<dtype>.json, or, with a quantized model in "
    "the run, experiments/results/quant/decode_<model>.json)",
)


def _ours(model, prompts: np.ndarray, dtype) -> dict:
    ids = prompts.tolist()

    def run(n):
        return lambda: generate_tokens(model, ids, max_new_tokens=n, stop_ids=())

    for n in (_N1.value, _N2.value):
        run(n)()  # compile both decode-loop sizes and the prefill
    t1, t2 = best_time(run(_N1.value), _REPEATS.value), best_time(run(_N2.value), _REPEATS.value)
    graphdef, state = nnx.split(model)
    width = bucket(prompts.shape[1])
    tokens = jnp.asarray(prompts)
    start = jnp.zeros((prompts.shape[0],), jnp.int32) + (width - prompts.shape[1])
    padded = jnp.pad(tokens, ((0, 0), (width - prompts.shape[1], 0)))

    def prefill():
        jax.block_until_ready(gen.prefill(graphdef, state, padded, start, cache_len=width + 8, cache_dtype=dtype))

    prefill()
    return {"t_n1_s": t1, "t_n2_s": t2, "prefill_s": best_time(prefill, _REPEATS.value)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf(model, prompts: np.ndarray) -> dict:
    import torch

    device = next(model.parameters()).device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        def go():
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )
            assert out.shape[1] == ids.shape[1] + n
            _sync(device)

        return go

    def prefill():
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        _sync(device)

    run(_N1.value)()  # warm-up
    return {
        "t_n1_s": best_time(run(_N1.value), _REPEATS.value),
        "t_n2_s": best_time(run(_N2.value), _REPEATS.value),
        "prefill_s": best_time(prefill, _REPEATS.value),
    }


def step_weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter buffer as this backend stores it (quantized values,
    scales, float embedding / tied head, norms), less the untied embedding table but ``batch`` rows of it."""
    total = sum(leaf.on_device_size_in_bytes() for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not model.config.text.tie_embeddings:
        table = model.embed.embedding[...]
        total -= table.on_device_size_in_bytes() - batch * table.shape[1] * table.dtype.itemsize
    return int(total)


def _summarise(raw: dict, batch: int, weight_bytes: int, n_params: int, kv_bytes_per_token: int) -> dict:
    step = (raw["t_n2_s"] - raw["t_n1_s"]) / (_N2.value - _N1.value)
    tok_s = batch / step
    bw_floor = _BW.value * 1e9 / weight_bytes  # tokens/s at batch 1
    compute_floor = _PEAK.value * 1e9 / (2 * n_params)  # tokens/s, any batch
    # A step must also read the KV cache: batch x (mean context over the timed steps) x bytes per cached token.
    context = _PROMPT.value + (_N1.value + _N2.value) / 2
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    bw_kv_floor = batch * _BW.value * 1e9 / step_bytes
    return {
        "bytes_per_step": {"weights": weight_bytes, "kv_cache": round(batch * context * kv_bytes_per_token)},
        "bytes_per_token": round(step_bytes / batch),
        "achieved_gbs": round(step_bytes / step / 1e9, 2),
        "bandwidth_floor_with_kv_tok_s": round(bw_kv_floor, 2),
        "fraction_of_bandwidth_floor_with_kv": round(tok_s / bw_kv_floor, 3),
        **{k: round(v, 3) for k, v in raw.items()},
        "decode_ms_per_step": round(step * 1e3, 1),
        "decode_tok_s": round(tok_s, 2),
        "floor_tok_s": round(bw_floor if batch == 1 else compute_floor, 2),
        "fraction_of_floor": round(tok_s / (bw_floor if batch == 1 else compute_floor), 3),
        "prefill_tok_s": round(batch * _PROMPT.value / raw["prefill_s"], 1),
    }


def _hf_model(cfg, dtype_name: str, hf_device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama32_jax.checkpoint.hf_export import hf_config_dict

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    with torch.device(hf_device):  # random init where the model runs (fast on a GPU)
        return LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(cfg))).eval().to(torch_dtype)


def _variant(cfg, dtype_name: str, quantize: str, hf_device: str, rng) -> dict:
    """Build one model (ours, and HF's when it is compared), time every batch size, return the record's part."""
    dtype = jnp.dtype(dtype_name)
    qc = resolve_quantize(None if quantize == "none" else quantize)
    with_hf = qc is None and not _SKIP_HF.value
    t0 = time.perf_counter()
    hf = None
    if with_hf:
        hf = _hf_model(cfg, dtype_name, hf_device)
        ours = lj.load_params(cfg, params_from_state_dict(cfg, hf.state_dict(), "hf"), param_dtype=dtype)
    else:
        ours = lj.init_model(cfg, param_dtype=dtype)
        if qc is not None:
            quantize_model(ours, qc)
    gc.collect()
    n_params = lj.param_count(ours)
    t = cfg.text
    kv_bytes_per_token = 2 * t.n_layers * t.n_kv_heads * t.head_dim * dtype.itemsize
    name = dtype.name + ("" if qc is None else f" + {qc.describe()}")
    print(
        f"{cfg.name} {name}: {n_params / 1e9:.3f} B params, {step_weight_bytes(ours, 1) / 1e9:.3f} GB read per "
        f"batch-1 step, built in {time.perf_counter() - t0:.0f} s; JAX on {jax.devices()[0].device_kind}"
        + (f", HF on {hf_device}" if with_hf else ""),
        flush=True,
    )
    results = []
    for batch in [int(b) for b in _BATCH.value]:
        prompts = rng.integers(0, cfg.text.vocab_size, size=(batch, _PROMPT.value)).astype(np.int32)
        weight_bytes = step_weight_bytes(ours, batch)
        row = {
            "batch": batch,
            "ours": _summarise(_ours(ours, prompts, dtype), batch, weight_bytes, n_params, kv_bytes_per_token),
        }
        if hf is not None:
            row["hf"] = _summarise(_hf(hf, prompts), batch, weight_bytes, n_params, kv_bytes_per_token)
            row["decode_ratio_ours_over_hf"] = round(row["ours"]["decode_tok_s"] / row["hf"]["decode_tok_s"], 2)
            row["prefill_ratio_ours_over_hf"] = round(row["hf"]["prefill_s"] / row["ours"]["prefill_s"], 2)
        results.append(row)
        o, h = row["ours"], row.get("hf")
        line = (
            f"  batch {batch:3d}: ours decode {o['decode_tok_s']:7.2f} tok/s ({o['fraction_of_floor']:.0%} of floor "
            f"{o['floor_tok_s']}; {o['bytes_per_token'] / 1e9:.3f} GB/token, {o['achieved_gbs']} GB/s), "
            f"prefill {o['prefill_s']:.2f} s"
        )
        if h:
            line += (
                f" | HF decode {h['decode_tok_s']:7.2f} tok/s, prefill {h['prefill_s']:.2f} s | ratio decode "
                f"{row['decode_ratio_ours_over_hf']}x, prefill {row['prefill_ratio_ours_over_hf']}x"
            )
        print(line, flush=True)
    del ours, hf
    gc.collect()
    return {
        "dtype": dtype.name,
        "quantize": None if qc is None else qc.to_json(),
        "params": n_params,
        "weight_bytes_per_step_batch1": weight_bytes_record(cfg, dtype, qc),
        "results": results,
    }


def int4_bytes_per_value() -> float:
    """What one ``jnp.int4`` value occupies in a buffer on the default backend (1 on XLA:CPU)."""
    return jnp.zeros((1 << 20,), jnp.int4).on_device_size_in_bytes() / (1 << 20)


def weight_bytes_record(cfg, dtype, qc) -> dict:
    """All parameter bytes, by kind: quantized values as stored on this backend and as they would be with int4
    packed two per byte, their scales, and the float parameters (embedding / tied head, norms)."""
    model = lj.abstract_model(cfg, param_dtype=dtype, quant=qc)
    out = {"int_values_stored": 0, "int_values_packed": 0, "scales": 0, "float": 0}
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(leaf.shape))
        if leaf.dtype == jnp.int4:
            out["int_values_stored"] += round(n * int4_bytes_per_value())
            out["int_values_packed"] += n // 2
        elif leaf.dtype == jnp.int8:
            out["int_values_stored"] += n
            out["int_values_packed"] += n
        elif str(path[-1]).endswith("_scale"):
            out["scales"] += n * 4
        else:
            out["float"] += n * jnp.dtype(leaf.dtype).itemsize
    out["total_stored"] = out["int_values_stored"] + out["scales"] + out["float"]
    return out


def main(argv):
    del argv
    import torch
    import transformers

    cfg = lj.configs.get_config(_MODEL.value)
    for d in _DTYPE.value:
        if d not in ("float32", "bfloat16"):
            raise lj.errors.InvalidInputError(f"--dtype takes float32 and/or bfloat16, got {d!r}")
    for q in _QUANT.value:
        resolve_quantize(None if q == "none" else q, "--quantize")
    hf_device = _HF_DEVICE.value
    if hf_device == "auto":
        hf_device = "cuda" if torch.cuda.is_available() else "cpu"
    int4_bytes = int4_bytes_per_value()
    print(f"a jnp.int4 value occupies {int4_bytes:g} byte(s) on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(0)
    variants = []
    record = {
        "benchmark": "bench_generate",
        "command": "python -m experiments.bench_generate "
        + " ".join(
            f"--{f}={getattr(flags.FLAGS, f)}"
            for f in ("model", "prompt_len", "n1", "n2", "repeats", "bandwidth_gbs", "peak_gflops", "hf_device")
        )
        + f" --dtype={','.join(_DTYPE.value)} --quantize={','.join(_QUANT.value)} --batch={','.join(_BATCH.value)}"
        + (" --skip_hf" if _SKIP_HF.value else ""),
        "machine": machine(),
        "hf_device": hf_device if hf_device == "cpu" else torch.cuda.get_device_name(0),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": cfg.name,
        "int4_bytes_per_value_on_device": int4_bytes,
        "floors": {"bandwidth_gbs": _BW.value, "peak_gflops": _PEAK.value},
    }
    pairs = [(d, q) for d in _DTYPE.value for q in _QUANT.value]
    for d, q in pairs:  # the record is rewritten after each model, so a cut-short run keeps what it measured
        variants.append(_variant(cfg, d, q, hf_device, rng))
        record["load_average"] = os.getloadavg()
        if len(pairs) == 1 and variants[0]["quantize"] is None:  # the original single-variant record
            record["dtype"] = variants[0]["dtype"]
            record["results"] = variants[0]["results"]
            write_result(record, f"bench_generate_{cfg.name}_{variants[0]['dtype']}.json", _OUT.value)
        else:
            record["variants"] = variants
            write_result(record, f"quant/decode_{cfg.name}.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
