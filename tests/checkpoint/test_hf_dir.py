"""HF directory reader: what ``LlamaForCausalLM.save_pretrained`` writes (one file, shards, bf16) reads back to the
torch model's logits, and broken directories raise typed errors naming the file or key."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llama32_jax.checkpoint.hf import iter_hf_tensors, read_hf_params
from llama32_jax.configs import RopeScaling, TextConfig
from llama32_jax.errors import CheckpointError, ConfigError
from llama32_jax.models.build import forward, load_params
from tests.refs import hf_llama, torch_logits

TOL = 1e-4  # max |Δlogit|, fp32 end to end


def _text(tied: bool) -> TextConfig:
    return TextConfig(
        vocab_size=384,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=160,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=tied,
    )


def _round_to_bf16_(model) -> None:
    """Make the fp32 reference hold exactly the values a bf16 save stores."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (directory, fp32 torch reference with the saved values)."""
    import torch

    root = tmp_path_factory.mktemp("hf")
    out = {}
    tied = hf_llama(_text(True), seed=1)
    tied.save_pretrained(root / "single-tied")
    out["single-tied"] = (root / "single-tied", tied)
    untied = hf_llama(_text(False), seed=2)
    untied.save_pretrained(root / "sharded-untied", max_shard_size="40KB")
    out["sharded-untied"] = (root / "sharded-untied", untied)
    bf16 = hf_llama(_text(False), seed=3)
    _round_to_bf16_(bf16)
    copy.deepcopy(bf16).to(torch.bfloat16).save_pretrained(root / "bf16-untied")
    out["bf16-untied"] = (root / "bf16-untied", bf16)
    return out


@pytest.mark.parametrize("case", ["single-tied", "sharded-untied", "bf16-untied"])
def test_directory_reads_back_to_torch_logits(saved, case):
    directory, ref = saved[case]
    config, params = read_hf_params(directory)
    assert config.text == _text(case.endswith("-tied"))
    model = load_params(config, params, param_dtype=jnp.float32)
    tokens = np.random.default_rng(0).integers(0, config.text.vocab_size, size=(2, 130))
    err = float(np.max(np.abs(np.asarray(forward(model, jnp.asarray(tokens))[0]) - torch_logits(ref, tokens))))
    print(f"[hf dir {case}] max |dlogit| = {err:.3e}")
    assert err <= TOL


def test_shards_and_dtypes_as_stored(saved):
    directory, ref = saved["sharded-untied"]
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 3
    stream = iter_hf_tensors(directory)
    assert iter(stream) is stream  # a generator: one tensor at a time
    got = dict(stream)
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(got) == set(want)
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    bf16 = dict(iter_hf_tensors(saved["bf16-untied"][0]))
    assert {v.dtype for v in bf16.values()} == {np.dtype(ml_dtypes.bfloat16)}
    _, params = read_hf_params(saved["bf16-untied"][0])
    assert params["norm"]["weight"].dtype == ml_dtypes.bfloat16


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(case: str) -> Path:
        return Path(shutil.copytree(saved[case][0], tmp_path / case))

    return make


def test_missing_config_json(copy_of):
    d = copy_of("single-tied")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        read_hf_params(d)


def test_no_weights(copy_of):
    d = copy_of("single-tied")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no 'model\.safetensors' and no 'model\.safetensors\.index\.json'.*bin"):
        read_hf_params(d)


def test_index_naming_a_missing_shard(copy_of):
    d = copy_of("sharded-untied")
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{shard.name}'.*does not exist"):
        read_hf_params(d)


def test_index_disagreeing_with_a_shard(copy_of):
    d = copy_of("sharded-untied")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][key])
    index["weight_map"][key] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(other)}'.*missing \['model\.norm\.weight'\]"):
        read_hf_params(d)


@pytest.mark.parametrize("case", ["single-tied", "bf16-untied"])
def test_truncated_safetensors(copy_of, case):
    d = copy_of(case)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        read_hf_params(d)


def test_corrupt_safetensors(copy_of):
    d = copy_of("single-tied")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        list(iter_hf_tensors(d))


def test_single_file_and_index_together_is_ambiguous(copy_of, saved):
    d = copy_of("sharded-untied")
    shutil.copy(saved["single-tied"][0] / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="unclear which weights"):
        read_hf_params(d)


def test_unexpected_key_is_named(copy_of):
    from safetensors.numpy import load_file, save_file

    d = copy_of("single-tied")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        read_hf_params(d)


def test_mllama_config_without_weights_names_the_missing_file(tmp_path):
    from transformers import MllamaConfig

    MllamaConfig().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no 'model.safetensors'"):
        read_hf_params(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        list(iter_hf_tensors(tmp_path / "absent"))
