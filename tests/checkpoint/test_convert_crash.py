"""Crash safety of the converter: SIGKILL it at random points, repeatedly; nothing half-written ever loads, and a
rerun always completes with the same result as an uninterrupted conversion.

The source is a random 2-shard Meta checkpoint (~36 MB fp32) converted with a 1 MB flush size, so the writing
phase spans dozens of Orbax partial saves and the kills land inside it (each kill waits for the run's temporary
directory to appear, then a random fraction of an uninterrupted run's writing time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.checkpoint.orbax_ckpt import restore_params
from llama32_jax.errors import LlamaJaxError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "dim": 256,
    "n_layers": 8,
    "n_heads": 8,
    "n_kv_heads": 4,
    "vocab_size": 4096,
    "multiple_of": 64,
    "ffn_dim_multiplier": 1.0,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
KILLS = 5


def _random_meta(root: Path, n_shards: int = 2, seed: int = 0) -> Path:
    """A random Meta-format checkpoint with the shapes ``PARAMS`` implies, split into column/row shards."""
    cfg = lj.from_params_json(PARAMS).text
    d, f, v, h = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    gen = torch.Generator().manual_seed(seed)
    full = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(cfg.n_layers):
        full |= {
            f"layers.{i}.attention.wq.weight": (cfg.n_heads * h, d),
            f"layers.{i}.attention.wk.weight": (cfg.n_kv_heads * h, d),
            f"layers.{i}.attention.wv.weight": (cfg.n_kv_heads * h, d),
            f"layers.{i}.attention.wo.weight": (d, cfg.n_heads * h),
            f"layers.{i}.feed_forward.w1.weight": (f, d),
            f"layers.{i}.feed_forward.w3.weight": (f, d),
            f"layers.{i}.feed_forward.w2.weight": (d, f),
            f"layers.{i}.attention_norm.weight": (d,),
            f"layers.{i}.ffn_norm.weight": (d,),
        }
    root.mkdir(parents=True)
    (root / "params.json").write_text(json.dumps(PARAMS))
    shards: list[dict] = [{} for _ in range(n_shards)]
    for key, shape in full.items():
        t = torch.randn(shape, generator=gen) * 0.02
        dim = 1 if key.endswith(("wo.weight", "w2.weight")) else 0 if len(shape) == 2 else None
        for s, part in enumerate(torch.chunk(t, n_shards, dim=dim) if dim is not None else [t] * n_shards):
            shards[s][key] = part.clone()
    for s, shard in enumerate(shards):
        torch.save(shard, root / f"consolidated.{s:02d}.pth")
    return root


def _start(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "llama32_jax.convert", "--source", str(src), "--output", str(out)]
    cmd += ["--dtype", "float32", "--no-progress", "--flush-mb", "1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _temporaries(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _wait_for_temporary(proc: subprocess.Popen, parent: Path, name: str, before: set) -> float:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if {p.name for p in _temporaries(parent, name)} - before:
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"the converter exited ({proc.returncode}) before writing: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("the converter never started writing")


def _assert_same(out: Path, reference: dict) -> None:
    _, params = restore_params(out)
    flat_ref = {jax_path: np.asarray(x) for jax_path, x in _flatten(reference).items()}
    flat_got = {jax_path: np.asarray(x) for jax_path, x in _flatten(params).items()}
    assert flat_ref.keys() == flat_got.keys()
    for k, v in flat_ref.items():
        np.testing.assert_array_equal(flat_got[k], v, err_msg=str(k))


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_loadable_partial(tmp_path):
    src = _random_meta(tmp_path / "meta")
    reference = restore_params(lj.convert(src, tmp_path / "reference", dtype="float32", progress=False))[1]
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "ckpt"

    # An uninterrupted run through the CLI: how long its writing phase lasts.
    proc = _start(src, out)
    began = _wait_for_temporary(proc, parent, "ckpt", set())
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    writing = time.monotonic() - began
    _assert_same(out, reference)
    import shutil

    shutil.rmtree(out)

    rng = np.random.default_rng(1234)
    interrupted = 0
    for attempt in range(KILLS):
        before = {p.name for p in _temporaries(parent, "ckpt")}
        proc = _start(src, out, "--overwrite")
        _wait_for_temporary(proc, parent, "ckpt", before)
        time.sleep(float(rng.uniform(0.0, 1.1 * writing)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        interrupted += bool({p.name for p in _temporaries(parent, "ckpt")} - before)
        # Nothing that a killed run left behind loads as a checkpoint, except a complete one.
        for entry in parent.iterdir():
            try:
                restore_params(entry)
            except LlamaJaxError:
                assert entry != out or not out.exists(), f"attempt {attempt}: the published output does not load"
                continue
            _assert_same(entry, reference)
        if out.exists():  # the kill came after the atomic rename: the output must be complete and right
            _assert_same(out, reference)

    assert interrupted >= KILLS // 2, f"only {interrupted} of {KILLS} kills landed while the converter was writing"

    # A rerun completes (replacing an output an earlier run may have published) and cleans up the dead runs.
    proc = _start(src, out, "--overwrite")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    _assert_same(out, reference)
    assert _temporaries(parent, "ckpt") == []
    assert sorted(p.name for p in parent.iterdir()) == ["ckpt"]
