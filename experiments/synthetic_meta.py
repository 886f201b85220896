"""A synthetic Meta checkpoint with the Llama 3.2 3B's exact tensor shapes, cut into model-parallel shards by
docs/model-facts.md §8.4 and written shard by shard with bounded memory (for experiments/bench_convert.py)."""

from __future__ import annotations

import json
import os
import re
import time

MARKER = "SYNTHETIC_COMPLETE.json"
PARAMS_JSON = {
    "dim": 3072,
    "n_layers": 28,
    "n_heads": 24,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 256,
    "ffn_dim_multiplier": 1.0,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


def meta_layout(config) -> list[tuple[str, tuple[int, ...], int | None]]:
    """``(key, merged torch-layout shape, concat dim or None)`` in Meta's file order."""
    t = config.text
    d, f, v = t.dim, t.ffn_dim, t.vocab_size
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    out = [("tok_embeddings.weight", (v, d), 0)]
    for i in range(t.n_layers):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", (q, d), 0),
            (p + "attention.wk.weight", (kv, d), 0),
            (p + "attention.wv.weight", (kv, d), 0),
            (p + "attention.wo.weight", (d, q), 1),
            (p + "feed_forward.w1.weight", (f, d), 0),
            (p + "feed_forward.w2.weight", (d, f), 1),
            (p + "feed_forward.w3.weight", (f, d), 0),
            (p + "attention_norm.weight", (d,), None),
            (p + "ffn_norm.weight", (d,), None),
        ]
    out += [("norm.weight", (d,), None), ("output.weight", (v, d), 0)]
    return out


def shard_shape(shape: tuple[int, ...], dim: int | None, shards: int) -> tuple[int, ...]:
    if dim is None:
        return shape
    if shape[dim] % shards:
        raise ValueError(f"dim {dim} of {shape} does not split into {shards} shards")
    return (*shape[:dim], shape[dim] // shards, *shape[dim + 1 :])


def synthetic_config(tied: bool = False):
    from llama32_jax.configs import LLAMA_3_2_3B, from_params_json

    config = from_params_json(PARAMS_JSON, tie_embeddings=tied, name="synthetic-3b-mp8")
    ref = LLAMA_3_2_3B.text
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
        if getattr(config.text, field) != getattr(ref, field):
            raise AssertionError(
                f"params.json gives {field}={getattr(config.text, field)}, 3B has {getattr(ref, field)}"
            )
    return config


def ensure_synthetic(root: str, shards: int, seed: int, tied: bool) -> dict:
    """Write (or reuse) the synthetic checkpoint; one shard in memory at a time. Returns its marker record."""
    import torch

    config = synthetic_config(tied)
    layout = meta_layout(config)
    want = {
        "params": PARAMS_JSON,
        "shards": shards,
        "seed": seed,
        "dtype": "bfloat16",
        "keys": len(layout),
        "tied": tied,
    }
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            record = json.load(f)
        if all(record.get(k) == v for k, v in want.items()):
            print(f"reusing the synthetic checkpoint in {root}")
            return record
        print(f"{root}: marker differs from what is asked; rewriting")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # only the files this script writes
        if name == MARKER or name == "params.json" or re.fullmatch(r"consolidated\.\d+\.pth", name):
            os.remove(os.path.join(root, name))
    with open(os.path.join(root, "params.json"), "w") as f:
        json.dump(PARAMS_JSON, f, indent=2)
    t0 = time.perf_counter()
    for s in range(shards):
        state = {}
        for k, (key, shape, dim) in enumerate(layout):
            part = shard_shape(shape, dim, shards)
            if tied and key == "output.weight":  # a separate storage with equal values, as in Meta's files
                state[key] = state["tok_embeddings.weight"].clone()
            elif dim is None:  # replicated: identical in every shard (RMSNorm weights: ones)
                state[key] = torch.ones(part, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + s * 10_007 + k)
                state[key] = torch.randn(part, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        path = os.path.join(root, f"consolidated.{s:02d}.pth")
        torch.save(state, path)
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        del state
        print(f"  wrote {path}: {nbytes / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.sync()
    record = {**want, "written_s": round(time.perf_counter() - t0, 1)}
    with open(marker, "w") as f:  # last: its presence marks the checkpoint complete
        json.dump(record, f, indent=2)
    return record
