"""Meta checkpoint directories: tiny random models from Meta's reference, saved as ``consolidated.00.pth`` +
``params.json`` (+ the real ``tokenizer.model``) and re-sharded into 2 and 8 model-parallel shards, load through
``llama32_jax.load`` to the reference's logits. Bad directories give typed errors that name the file or key.

The re-sharding below is written here from docs/model-facts.md §8.4's column/row rules (Meta's ``reshard_mp``),
independently of the reader's merge table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.checkpoint.meta import read_meta_params
from llama32_jax.errors import CheckpointError
from llama32_jax.inputs.tokenizer import default_llama3_tokenizer_path
from tests.refs import meta_transformer, torch_logits

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 8,
    "vocab_size": 384,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.5,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
COLUMN = (
    "attention.wq.",
    "attention.wk.",
    "attention.wv.",
    "feed_forward.w1.",
    "feed_forward.w3.",
    "output.",
    "tok_embeddings.",
)
ROW = ("attention.wo.", "feed_forward.w2.")


def _split(key: str, t: torch.Tensor, n: int) -> list[torch.Tensor]:
    if any(c in key for c in COLUMN):
        return list(torch.chunk(t, n, dim=0))
    if any(r in key for r in ROW):
        return list(torch.chunk(t, n, dim=-1))
    return [t] * n  # replicated


def _write(root: Path, state: dict, n_shards: int, params=PARAMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text(json.dumps(params))
    shutil.copy(default_llama3_tokenizer_path(), root / "tokenizer.model")
    pieces = {k: _split(k, v, n_shards) for k, v in state.items()}
    for i in range(n_shards):
        torch.save({k: p[i].clone() for k, p in pieces.items()}, root / f"consolidated.{i:02d}.pth")
    return root


@pytest.fixture(scope="module")
def reference():
    ref = meta_transformer(PARAMS, max_seq_len=64, max_batch_size=2, seed=21)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    tokens = np.random.default_rng(0).integers(0, PARAMS["vocab_size"], size=(2, 40))
    return state, tokens, torch_logits(lambda t: ref(t, 0), tokens)


@pytest.mark.parametrize("n_shards", [1, 2, 8])
def test_sharded_meta_directory_loads_to_reference_logits(tmp_path, reference, n_shards):
    state, tokens, expected = reference
    root = _write(tmp_path / f"mp{n_shards}", state, n_shards)
    model = lj.load(root, dtype="float32")
    assert model.config.text.rope_scaling.factor == 8.0  # Meta's value for a non-1B/3B shape
    assert not model.config.text.tie_embeddings  # output differs from the embedding
    err = float(np.max(np.abs(model.logits(tokens) - expected)))
    assert err <= 1e-4, err
    assert model.tokenizer.encode("user") == [882]  # the real tokenizer.model came along


def test_tied_head_detected_from_the_tensors(tmp_path, reference):
    state, _, _ = reference
    tied = dict(state)
    tied["output.weight"] = tied["tok_embeddings.weight"].clone()
    model = lj.load(_write(tmp_path / "tied", tied, 2), dtype="float32")
    assert model.config.text.tie_embeddings


def test_errors_name_the_culprit(tmp_path, reference):
    state, _, _ = reference
    root = _write(tmp_path / "base", state, 2)

    no_params = tmp_path / "no_params"
    shutil.copytree(root, no_params)
    (no_params / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json"):
        read_meta_params(no_params)

    missing = _write(tmp_path / "missing", state, 8)
    (missing / "consolidated.03.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.03\.pth"):
        lj.load(missing)

    truncated = tmp_path / "truncated"
    shutil.copytree(root, truncated)
    with open(truncated / "consolidated.01.pth", "r+b") as f:
        f.truncate(200)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*truncated or corrupt"):
        lj.load(truncated)

    bad_shape = dict(state)
    bad_shape["layers.0.feed_forward.w1.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match="feed_forward.w1"):
        lj.load(_write(tmp_path / "shape", bad_shape, 1))

    unknown = dict(state)
    unknown["layers.0.attention.wq.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"unexpected key 'layers.0.attention.wq.bias'"):
        lj.load(_write(tmp_path / "unknown", unknown, 1))

    diverged = _write(tmp_path / "diverged", state, 2)
    shard = torch.load(diverged / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, diverged / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="'norm.weight' should be replicated"):
        lj.load(diverged)

    with pytest.raises(lj.errors.ConfigError, match="quantization_args"):
        lj.load(_write(tmp_path / "quant", state, 1, params={**PARAMS, "quantization_args": {"group_size": 32}}))

    lfs = tmp_path / "lfs"
    shutil.copytree(root, lfs)
    (lfs / "params.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1558\n"
    )
    with pytest.raises(lj.errors.NotAModelConfigError, match=r"params\.json is a Git LFS pointer.*git lfs pull"):
        lj.load(lfs)


class _Payload:
    """An object whose unpickling would run a command (create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, reference):
    state, _, _ = reference
    root = _write(tmp_path / "evil", state, 1)
    marker = tmp_path / "PWNED"
    torch.save({**state, "layers.0.attention_norm.weight": _Payload(marker)}, root / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused to load.*not executed"):
        lj.load(root)
    assert not marker.exists()
