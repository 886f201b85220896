"""Export back to HF: HF -> ours -> HF loads in transformers with equal logits; a Meta directory exported to HF
gives Meta's reference logits in transformers; bf16 is exact; refusals and failures leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.checkpoint import hf_export
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.configs import RopeScaling, TextConfig, from_hf_config
from llama32_jax.errors import CheckpointError
from tests.checkpoint.test_meta_dir import PARAMS, _write
from tests.refs import hf_llama, meta_transformer, torch_logits

TEXT = TextConfig(
    vocab_size=320,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=32.0),
    tie_embeddings=False,
)


def _hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_hf_round_trip_loads_in_transformers(tmp_path, scan):
    ref = hf_llama(TEXT, seed=9)
    ref.save_pretrained(tmp_path / "src")
    tokens = np.random.default_rng(1).integers(0, TEXT.vocab_size, size=(2, 33))
    ours = lj.load(tmp_path / "src", dtype="float32", scan_layers=scan)
    out = export_hf(ours, tmp_path / "out", dtype="float32")
    back = _hf_load(out)
    assert from_hf_config(out).text == TEXT
    for (k, v), (k2, v2) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items()), strict=True):
        assert k == k2
        np.testing.assert_array_equal(v.numpy(), v2.numpy(), err_msg=k)
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(ref, tokens), atol=1e-5, rtol=0)


def test_bf16_export_is_exact(tmp_path):
    ref = hf_llama(TEXT, seed=10)
    ref.save_pretrained(tmp_path / "src")
    out = export_hf(lj.load(tmp_path / "src", dtype="float32"), tmp_path / "out")  # default bfloat16
    back = _hf_load(out)
    for k, v in ref.state_dict().items():
        expected = v.to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), expected, err_msg=k)


def test_meta_directory_exported_to_hf_matches_meta_reference(tmp_path):
    ref = meta_transformer(PARAMS, max_seq_len=64, max_batch_size=2, seed=22)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    tokens = np.random.default_rng(2).integers(0, PARAMS["vocab_size"], size=(2, 40))
    expected = torch_logits(lambda t: ref(t, 0), tokens)
    out = export_hf(lj.load(_write(tmp_path / "meta", state, 2), dtype="float32"), tmp_path / "hf", dtype="float32")
    got = torch_logits(_hf_load(out), tokens)
    assert float(np.max(np.abs(got - expected))) <= 1e-4


def test_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    ref = hf_llama(TEXT, seed=11)
    ref.save_pretrained(tmp_path / "src")
    model = lj.load(tmp_path / "src", dtype="float32")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(model, tmp_path / "taken")
    export_hf(model, tmp_path / "taken", overwrite=True, dtype="float32")
    assert (tmp_path / "taken" / "model.safetensors").is_file()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
