"""Generation speed, ours vs HF transformers (PyTorch eager), on the same random-weight model and prompts.

    .venv/bin/python -m experiments.bench_generate                                  # 1B shape, fp32, CPU
    .venv/bin/python -m experiments.bench_generate --model=tiny-text --batch=1,4    # a quick smoke run
    python -m experiments.bench_generate --dtype=bfloat16 --batch=1,64 --bandwidth_gbs=4800 --peak_gflops=989000
                                                                     # on a GPU (HF then runs on CUDA too)

Both run one after the other in this process. Decode speed is measured by difference, so prefill cancels:
``(time(n2 new tokens) - time(n1 new tokens)) / (n2 - n1)`` per step, greedy, no early stop. Prefill is timed
on its own (ours: the jitted prefill; HF: one forward with ``logits_to_keep=1``, as its ``generate`` does).
Prints tokens/s, our/HF ratios, the fraction of the bandwidth floor at batch 1 (weight bytes / --bandwidth_gbs)
and of the compute floor at larger batches (2 x params FLOP per token / --peak_gflops). Writes JSON.
"""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import llama32_jax as lj
from experiments import cli
from experiments.results_io import machine, write_result
from llama32_jax.checkpoint import params_from_state_dict
from llama32_jax.inference.generate import bucket, generate_tokens

_MODEL = flags.DEFINE_string("model", "Llama-3.2-1B", "named config (random weights)")
_BATCH = flags.DEFINE_list("batch", ["1", "16"], "batch sizes")
_PROMPT = flags.DEFINE_integer("prompt_len", 110, "prompt tokens per sequence")
_N1 = flags.DEFINE_integer("n1", 8, "new tokens, short run")
_N2 = flags.DEFINE_integer("n2", 40, "new tokens, long run")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repeats (the minimum is reported)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weights and activations")
_BW = flags.DEFINE_float("bandwidth_gbs", 36.0, "memory bandwidth for the floor (this CPU: ~36 GB/s)")
_PEAK = flags.DEFINE_float("peak_gflops", 200.0, "compute peak for the floor (this CPU: ~200 GFLOP/s fp32)")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "time ours only")
_HF_DEVICE = flags.DEFINE_string("hf_device", "auto", "torch device for HF ('auto': cuda when available, else cpu)")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/bench_generate_<model>_<dtype>.json)")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ours(model, prompts: np.ndarray) -> dict:
    ids = prompts.tolist()

    def run(n):
        return lambda: generate_tokens(model, ids, max_new_tokens=n, stop_ids=())

    for n in (_N1.value, _N2.value):
        run(n)()  # compile both decode-loop sizes and the prefill
    t1, t2 = _best(run(_N1.value), _REPEATS.value), _best(run(_N2.value), _REPEATS.value)
    from flax import nnx

    graphdef, state = nnx.split(model)
    width = bucket(prompts.shape[1])
    tokens = jnp.asarray(prompts)
    start = jnp.zeros((prompts.shape[0],), jnp.int32) + (width - prompts.shape[1])
    padded = jnp.pad(tokens, ((0, 0), (width - prompts.shape[1], 0)))
    dtype = jnp.dtype(_DTYPE.value)

    def prefill():
        jax.block_until_ready(prefill(graphdef, state, padded, start, cache_len=width + 8, cache_dtype=dtype))

    prefill()
    return {"t_n1_s": t1, "t_n2_s": t2, "prefill_s": _best(prefill, _REPEATS.value)}


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
        "t_n1_s": _best(run(_N1.value), _REPEATS.value),
        "t_n2_s": _best(run(_N2.value), _REPEATS.value),
        "prefill_s": _best(prefill, _REPEATS.value),
    }


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
        "bandwidth_floor_with_kv_tok_s": round(bw_kv_floor, 2),
        "fraction_of_bandwidth_floor_with_kv": round(tok_s / bw_kv_floor, 3),
        **{k: round(v, 3) for k, v in raw.items()},
        "decode_ms_per_step": round(step * 1e3, 1),
        "decode_tok_s": round(tok_s, 2),
        "floor_tok_s": round(bw_floor if batch == 1 else compute_floor, 2),
        "fraction_of_floor": round(tok_s / (bw_floor if batch == 1 else compute_floor), 3),
        "prefill_tok_s": round(batch * _PROMPT.value / raw["prefill_s"], 1),
    }


def main(argv):
    del argv
    import torch
    from transformers import LlamaConfig

    from llama32_jax.checkpoint.hf_export import hf_config_dict

    cfg = lj.configs.get_config(_MODEL.value)
    dtype = jnp.dtype(_DTYPE.value)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
    from transformers import LlamaForCausalLM

    hf_device = _HF_DEVICE.value
    if hf_device == "auto":
        hf_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(hf_device):  # random init where the model runs (fast on a GPU)
        hf = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(cfg))).eval().to(torch_dtype)
    ours = lj.load_params(cfg, params_from_state_dict(cfg, hf.state_dict(), "hf"), param_dtype=dtype)
    gc.collect()
    n_params = lj.param_count(ours)
    weight_bytes = n_params * dtype.itemsize
    t = cfg.text
    kv_bytes_per_token = 2 * t.n_layers * t.n_kv_heads * t.head_dim * dtype.itemsize
    print(
        f"{cfg.name} {dtype.name}: {n_params / 1e9:.3f} B params, built both in {time.perf_counter() - t0:.0f} s; "
        f"JAX on {jax.devices()[0].device_kind}, HF on {hf_device}, torch threads {torch.get_num_threads()}"
    )
    rng = np.random.default_rng(0)
    results = []
    for batch in [int(b) for b in _BATCH.value]:
        prompts = rng.integers(0, cfg.text.vocab_size, size=(batch, _PROMPT.value)).astype(np.int32)
        row = {
            "batch": batch,
            "ours": _summarise(_ours(ours, prompts), batch, weight_bytes, n_params, kv_bytes_per_token),
        }
        if not _SKIP_HF.value:
            row["hf"] = _summarise(_hf(hf, prompts), batch, weight_bytes, n_params, kv_bytes_per_token)
            row["decode_ratio_ours_over_hf"] = round(row["ours"]["decode_tok_s"] / row["hf"]["decode_tok_s"], 2)
            row["prefill_ratio_ours_over_hf"] = round(row["hf"]["prefill_s"] / row["ours"]["prefill_s"], 2)
        results.append(row)
        o, h = row["ours"], row.get("hf")
        line = (
            f"batch {batch:3d}: ours decode {o['decode_tok_s']:7.2f} tok/s ({o['fraction_of_floor']:.0%} of floor "
            f"{o['floor_tok_s']}), prefill {o['prefill_s']:.2f} s"
        )
        if h:
            line += (
                f" | HF decode {h['decode_tok_s']:7.2f} tok/s, prefill {h['prefill_s']:.2f} s | ratio decode "
                f"{row['decode_ratio_ours_over_hf']}x, prefill {row['prefill_ratio_ours_over_hf']}x"
            )
        print(line, flush=True)
    record = {
        "benchmark": "bench_generate",
        "command": "python -m experiments.bench_generate "
        + " ".join(
            f"--{f}={getattr(flags.FLAGS, f)}"
            for f in (
                "model",
                "dtype",
                "prompt_len",
                "n1",
                "n2",
                "repeats",
                "bandwidth_gbs",
                "peak_gflops",
                "hf_device",
            )
        )
        + f" --batch={','.join(_BATCH.value)}",
        "machine": machine(),
        "hf_device": hf_device if hf_device == "cpu" else torch.cuda.get_device_name(0),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "model": cfg.name,
        "dtype": dtype.name,
        "floors": {"bandwidth_gbs": _BW.value, "peak_gflops": _PEAK.value},
        "results": results,
    }
    write_result(record, f"bench_generate_{cfg.name}_{dtype.name}.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
