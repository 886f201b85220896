"""Peak memory, time and output size of ``python -m llama32_jax.convert --quantize`` against the float conversion.

    .venv/bin/python -m experiments.bench_convert_quant                       # 1B widths, 2 layers, bf16 source
    .venv/bin/python -m experiments.bench_convert_quant --n_layers=16         # the whole 1B depth

The source is a synthetic HF directory (written once under ``--model_dir``, reused while its marker is there) with
Llama 3.2 1B's widths (dim 2048, FFN 8192, 32 / 8 heads, vocabulary 128256) and ``--n_layers`` layers, random bf16
values and an untied head: the head (128256 x 2048, 525 MB in bf16, the largest tensor with the embedding) is then
one of the quantized weights, the hardest case for the memory bound. Each conversion (float bf16; int8; int4 with
groups of 128) runs in a subprocess sampled by :func:`experiments.bench_convert.measure` (peak RSS = the kernel's
VmHWM of the converter process). The bound checked is the float converter's design goal, unchanged by
quantization: peak RSS <= 2 x the largest tensor + 1 GiB. Writes JSON (default
``experiments/results/bench_convert_quant.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys

import ml_dtypes
import numpy as np
from absl import flags

from experiments import cli
from experiments.bench_convert import GIB, MIB, measure
from experiments.results_io import machine, write_result
from llama32_jax.checkpoint.hf_export import hf_config_dict, write_safetensors
from llama32_jax.configs import LLAMA_3_2_1B
from llama32_jax.configs.base import ModelConfig

_MODEL_DIR = flags.DEFINE_string("src_dir", "/tmp/bench_convert_quant/hf-1b-widths", "synthetic HF source (cached)")
_OUTPUT = flags.DEFINE_string("out_dir", "/tmp/bench_convert_quant/out", "converted checkpoints (removed afterwards)")
_LAYERS = flags.DEFINE_integer("n_layers", 2, "decoder layers of the synthetic source")
_MODES = flags.DEFINE_list("modes", ["float", "int8", "int4"], "conversions to run")
_INTERVAL = flags.DEFINE_float("sample_ms", 20.0, "/proc sampling interval")
_OUT = flags.DEFINE_string("json_out", "", "JSON path (default experiments/results/bench_convert_quant.json)")


def synthetic_config(n_layers: int) -> ModelConfig:
    """Llama 3.2 1B with ``n_layers`` layers and an untied head."""
    text = dataclasses.replace(LLAMA_3_2_1B.text, n_layers=n_layers, tie_embeddings=False)
    return LLAMA_3_2_1B.replace(name=f"synthetic-1b-widths-{n_layers}l", text=text)


def ensure_source(root: str, config: ModelConfig) -> dict:
    """Write (or reuse) the synthetic HF directory; returns its tensor count and bytes."""
    marker = os.path.join(root, "complete.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t = config.text
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": w(t.vocab_size, t.dim), "lm_head.weight": w(t.vocab_size, t.dim)}
    tensors["model.norm.weight"] = np.ones(t.dim, ml_dtypes.bfloat16)
    for i in range(t.n_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = w(t.n_heads * t.head_dim, t.dim)
        tensors[p + "self_attn.k_proj.weight"] = w(t.n_kv_heads * t.head_dim, t.dim)
        tensors[p + "self_attn.v_proj.weight"] = w(t.n_kv_heads * t.head_dim, t.dim)
        tensors[p + "self_attn.o_proj.weight"] = w(t.dim, t.n_heads * t.head_dim)
        tensors[p + "mlp.gate_proj.weight"] = w(t.ffn_dim, t.dim)
        tensors[p + "mlp.up_proj.weight"] = w(t.ffn_dim, t.dim)
        tensors[p + "mlp.down_proj.weight"] = w(t.dim, t.ffn_dim)
        tensors[p + "input_layernorm.weight"] = np.ones(t.dim, ml_dtypes.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(t.dim, ml_dtypes.bfloat16)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
    write_safetensors(os.path.join(root, "model.safetensors"), tensors)
    record = {"tensors": len(tensors), "bytes": int(sum(v.nbytes for v in tensors.values()))}
    with open(marker, "w") as f:
        json.dump(record, f)
    return record


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def main(argv):
    del argv
    config = synthetic_config(_LAYERS.value)
    source = ensure_source(_MODEL_DIR.value, config)
    largest = config.text.vocab_size * config.text.dim * 2  # the bf16 embedding / head
    bound = 2 * largest + GIB
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    os.makedirs(_OUTPUT.value, exist_ok=True)
    log = os.path.join(_OUTPUT.value, "convert.log")
    imports = "import llama32_jax, orbax.checkpoint, jax; jax.devices()"
    baseline = measure([sys.executable, "-c", imports], env, _INTERVAL.value / 1e3, log)
    runs = {}
    for mode in _MODES.value:
        out = os.path.join(_OUTPUT.value, mode)
        cmd = [sys.executable, "-m", "llama32_jax.convert", "--source", _MODEL_DIR.value, "--output", out]
        cmd += ["--no-progress", "--overwrite", "--dtype", "bfloat16"]
        if mode != "float":
            cmd += ["--quantize", mode]
        run = measure(cmd, env, _INTERVAL.value / 1e3, log)
        m = re.search(r"wrote .* in ([\d.]+) s", run["output"])
        runs[mode] = {
            "command": " ".join(cmd[1:]),
            "wall_s": run["wall_s"],
            "convert_s_reported": float(m.group(1)) if m else None,
            "peak_rss_mib": run["peak_rss_mib"],
            "peak_over_import_cost_mib": round((run["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / MIB, 1),
            "within_bound": run["peak_rss_bytes"] <= bound,
            "output_bytes": _size(out),
        }
        print(mode, runs[mode])
        shutil.rmtree(out, ignore_errors=True)
    record = {
        "benchmark": "bench_convert_quant",
        "command": f"python -m experiments.bench_convert_quant --n_layers={_LAYERS.value} "
        f"--modes={','.join(_MODES.value)}",
        "machine": machine(),
        "note": "2-core machine shared with other jobs while measured: times are indicative, memory is not affected",
        "source": {"config": config.name, "dtype": "bfloat16", "untied_head": True, **source},
        "memory_bound": {
            "rule": "peak RSS <= 2 x largest single tensor + 1 GiB",
            "largest_tensor": "model.embed_tokens.weight / lm_head.weight, 128256 x 2048 bf16",
            "bound_mib": round(bound / MIB, 1),
        },
        "baseline_import_and_jax_backend_mib": baseline["peak_rss_mib"],
        "conversions": runs,
    }
    write_result(record, "bench_convert_quant.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
