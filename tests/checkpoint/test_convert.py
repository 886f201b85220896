"""Conversion to Orbax (``lj.convert`` / ``python -m llama32_jax.convert``) against the references.

Fixtures are generated here: a tiny random model of Meta's reference (``llama_models``) saved as
``consolidated.00.pth`` + ``params.json`` and re-sharded into 2 and 8 shards (by this suite's column/row split and
by Meta's own ``reshard_mp``), and tiny HF models saved with ``save_pretrained``. Logits after conversion must
equal the reference model's (fp32, 1e-4). Bad inputs must give a typed error naming the file or key, a non-zero
CLI exit, and leave no output directory (nor a temporary one) behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.checkpoint.orbax_ckpt import MANIFEST, read_manifest, restore_params
from llama32_jax.configs import TINY_TEXT
from llama32_jax.errors import (
    CheckpointError,
    ConfigError,
    InvalidInputError,
    LlamaJaxError,
    StorageError,
    UnsafePathError,
)
from tests.checkpoint.test_meta_dir import PARAMS, _Payload, _write
from tests.refs import hf_llama, meta_transformer, torch_logits

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def meta_ref():
    ref = meta_transformer(PARAMS, max_seq_len=64, max_batch_size=2, seed=7)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    tokens = np.random.default_rng(1).integers(0, PARAMS["vocab_size"], size=(2, 40))
    return state, tokens, torch_logits(lambda t: ref(t, 0), tokens)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, meta_ref):
    return _write(tmp_path_factory.mktemp("meta") / "mp1", meta_ref[0], 1)


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    text = dataclasses.replace(TINY_TEXT.text, tie_embeddings=False, n_kv_heads=1)
    model = hf_llama(text, seed=3)
    root = tmp_path_factory.mktemp("hf") / "untied"
    model.save_pretrained(root)
    tokens = np.random.default_rng(2).integers(0, text.vocab_size, size=(2, 33))
    return root, model, tokens, torch_logits(model, tokens)


def _logits(path, tokens) -> np.ndarray:
    return np.asarray(lj.load(path, dtype="float32").logits(tokens))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name)


def _cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "llama32_jax.convert", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# --------------------------------------------------------------------------------------------------------------
# Equality with the references


@pytest.mark.parametrize("n_shards", [1, 2, 8])
def test_meta_to_orbax_matches_reference(tmp_path, meta_ref, n_shards):
    state, tokens, expected = meta_ref
    src = _write(tmp_path / f"mp{n_shards}", state, n_shards)
    out = lj.convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    record, config = read_manifest(out)
    assert record["dtype"] == "float32" and record["source"]["format"] == "meta"
    assert record["tokenizer_files"] == ["tokenizer.model"] and (out / "tokenizer.model").is_file()
    assert not config.text.tie_embeddings  # the reference's random head differs from its embedding
    got = _logits(out, tokens)
    direct = _logits(src, tokens)
    assert np.abs(got - expected).max() <= TOL
    np.testing.assert_array_equal(got, direct)  # conversion changes nothing: same values as loading directly
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("n_shards", [2, 8])
def test_meta_resharded_by_meta_reshard_mp(tmp_path, meta_ref, n_shards):
    """Shards cut by Meta's own resharder (llama_models.checkpoint.reshard_mp) merge back to the reference."""
    from llama_models.checkpoint import reshard_mp

    state, tokens, expected = meta_ref
    src = tmp_path / "src"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(PARAMS))
    for rank in range(n_shards):
        shard = reshard_mp([state], size=n_shards, rank=rank, repeat_qk_qv=max(n_shards // PARAMS["n_kv_heads"], 1))
        torch.save(shard, src / f"consolidated.{rank:02d}.pth")
    out = lj.convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    assert np.abs(_logits(out, tokens) - expected).max() <= TOL


def test_meta_tied_head_detected(tmp_path, meta_ref):
    state, tokens, _ = meta_ref
    tied = dict(state, **{"output.weight": state["tok_embeddings.weight"].clone()})
    src = _write(tmp_path / "tied", tied, 2)
    out = lj.convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    _, config = read_manifest(out)
    assert config.text.tie_embeddings
    np.testing.assert_array_equal(_logits(out, tokens), _logits(src, tokens))
    # Forcing a tie on a checkpoint whose head differs is refused, naming both keys.
    with pytest.raises(CheckpointError, match=r"'output.weight' differs from 'tok_embeddings.weight'"):
        lj.convert(_write(tmp_path / "untied", state, 1), tmp_path / "bad", tie_embeddings=True, progress=False)
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_orbax_matches_reference(tmp_path, tied):
    text = dataclasses.replace(TINY_TEXT.text, tie_embeddings=tied)
    model = hf_llama(text, seed=5)
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(5).integers(0, text.vocab_size, size=(2, 37))
    expected = torch_logits(model, tokens)
    out = lj.convert(tmp_path / "hf", tmp_path / "orbax", dtype="float32", progress=False)
    got = _logits(out, tokens)
    assert np.abs(got - expected).max() <= TOL
    np.testing.assert_array_equal(got, _logits(tmp_path / "hf", tokens))


def test_hf_orbax_hf_round_trip_through_the_cli(tmp_path, hf_untied):
    """HF -> Orbax -> HF (CLI ``--to hf``): transformers loads the export and gives the reference logits."""
    from transformers import LlamaForCausalLM

    src, _, tokens, expected = hf_untied
    _cli("--source", str(src), "--output", str(tmp_path / "orbax"), "--dtype", "float32", check=True)
    _cli(
        "--source",
        str(tmp_path / "orbax"),
        "--output",
        str(tmp_path / "back"),
        "--to",
        "hf",
        "--dtype",
        "float32",
        check=True,
    )
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert np.abs(torch_logits(back, tokens) - expected).max() <= TOL
    original = {k: v for k, v in LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict().items()}
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)


def test_bfloat16_conversion_is_exact_rounding(tmp_path, hf_untied):
    import ml_dtypes

    src, model, _, _ = hf_untied
    out = lj.convert(src, tmp_path / "orbax", progress=False)  # default dtype: bfloat16
    _, params = restore_params(out)
    w = np.asarray(params["layers"][1]["feed_forward"]["w2"]["kernel"])
    assert w.dtype == ml_dtypes.bfloat16
    want = model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(w.view(np.uint16), want.view(np.uint16))


def test_restore_into_mesh_shardings(tmp_path, hf_untied):
    """Orbax restores each array straight into the sharding asked for (here: 8 simulated devices, 4x2 mesh)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    src, model, _, _ = hf_untied
    out = lj.convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    def sharding(path, shape):
        if len(shape) == 2 and shape[0] % 4 == 0 and shape[1] % 2 == 0:
            return NamedSharding(mesh, P("data", "model"))
        return NamedSharding(mesh, P())

    _, params = restore_params(out, sharding=sharding)
    embed = params["embed"]["embedding"]
    assert embed.sharding == NamedSharding(mesh, P("data", "model"))
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape == (128, 32)
    norm = params["norm"]["weight"]
    assert norm.sharding == NamedSharding(mesh, P())
    want = model.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(embed), want)


def test_cli_help_and_progress(tmp_path, hf_untied):
    assert _cli("--help").returncode == 0
    src = hf_untied[0]
    proc = _cli("--source", str(src), "--output", str(tmp_path / "o"), check=True)
    assert "converting untied" in proc.stderr and "100%" in proc.stderr  # the tqdm progress bar
    assert f"wrote {tmp_path / 'o'}" in proc.stdout


def test_convert_is_callable_after_importing_the_cli_module():
    import llama32_jax.convert as cli_module

    assert callable(lj.convert) and callable(cli_module)
    with pytest.raises(CheckpointError, match="does not exist"):
        lj.convert("/nonexistent/checkpoint", "/tmp/never")


# --------------------------------------------------------------------------------------------------------------
# Bad input: typed error naming the file/key, non-zero CLI exit, nothing left behind


def _assert_refused(tmp_path: Path, src: Path, match: str, error=CheckpointError, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        lj.convert(src, out, progress=False, **kwargs)
    assert not out.exists() and _leftovers(tmp_path) == []
    proc = _cli("--source", str(src), "--output", str(out), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_missing_params_json(tmp_path, meta_ref):
    src = _write(tmp_path / "m", meta_ref[0], 1)
    (src / "params.json").unlink()
    _assert_refused(tmp_path, src, "no params.json")


def test_missing_shard(tmp_path, meta_ref):
    src = _write(tmp_path / "m", meta_ref[0], 8)
    (src / "consolidated.03.pth").unlink()
    _assert_refused(tmp_path, src, r"consolidated\.03\.pth.*missing")


def test_truncated_pth(tmp_path, meta_ref):
    src = _write(tmp_path / "m", meta_ref[0], 2)
    shard = src / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _assert_refused(tmp_path, src, r"consolidated\.01\.pth.*truncated or corrupt")


def test_corrupt_pth(tmp_path, meta_ref):
    src = _write(tmp_path / "m", meta_ref[0], 1)
    shard = src / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[-200:] = os.urandom(200)  # the zip's central directory
    shard.write_bytes(bytes(data))
    _assert_refused(tmp_path, src, r"consolidated\.00\.pth.*truncated or corrupt")


def test_pickle_that_would_run_code_is_refused_not_executed(tmp_path, meta_ref):
    marker = tmp_path / "pwned"
    src = _write(tmp_path / "m", meta_ref[0], 1)
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    state["evil"] = _Payload(marker)
    torch.save(state, src / "consolidated.00.pth")
    _assert_refused(tmp_path, src, r"consolidated\.00\.pth: refused to load.*not executed")
    assert not marker.exists()
    # The same payload does run when unpickled without weights_only: the test would notice if it had been.
    torch.load(src / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


def test_shape_mismatch_names_the_key(tmp_path, meta_ref):
    state = dict(meta_ref[0])
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    src = _write(tmp_path / "m", state, 1)
    _assert_refused(tmp_path, src, r"'layers.1.feed_forward.w2.weight': shape \(64, 100\)")


def test_unknown_key_is_named(tmp_path, meta_ref):
    state = dict(meta_ref[0], **{"layers.0.attention.wqkv.weight": torch.zeros(4, 4)})
    src = _write(tmp_path / "m", state, 1)
    _assert_refused(tmp_path, src, r"unexpected key 'layers.0.attention.wqkv.weight'")


def test_missing_key_is_named(tmp_path, meta_ref):
    state = {k: v for k, v in meta_ref[0].items() if k != "layers.1.ffn_norm.weight"}
    src = _write(tmp_path / "m", state, 1)
    _assert_refused(tmp_path, src, r"no 'layers.1.ffn_norm.weight'")


def test_truncated_and_corrupt_safetensors(tmp_path, hf_untied):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(hf_untied[0], src)
    weights = src / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 1000])
    _assert_refused(tmp_path, src, r"model\.safetensors")
    weights.write_bytes(good[:8] + b"{not json" + good[17:])
    _assert_refused(tmp_path, src, r"model\.safetensors.*(truncated or corrupt)")


def test_unsupported_architecture(tmp_path, hf_untied):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(hf_untied[0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_refused(tmp_path, src, "mistral", error=ConfigError)


def test_existing_output_refused_unless_overwrite(tmp_path, hf_untied):
    src, _, tokens, expected = hf_untied
    out = lj.convert(src, tmp_path / "out", progress=False)  # an earlier output of ours (bfloat16)
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        lj.convert(src, out, progress=False)
    proc = _cli("--source", str(src), "--output", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    lj.convert(src, out, dtype="float32", overwrite=True, progress=False)
    assert read_manifest(out)[0]["dtype"] == "float32"
    assert np.abs(_logits(out, tokens) - expected).max() <= TOL
    assert _leftovers(tmp_path) == []
    # A directory that is not an output of ours is never replaced, with or without overwrite.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    for overwrite in (False, True):
        with pytest.raises(UnsafePathError, match="already exists and it is not an output of llama32_jax"):
            lj.convert(src, foreign, overwrite=overwrite, progress=False)
    assert (foreign / "keep.txt").read_text() == "user data"
    assert _leftovers(tmp_path) == []


def test_output_inside_source_refused(tmp_path, hf_untied):
    src = hf_untied[0]
    with pytest.raises(UnsafePathError, match="lies inside the source"):
        lj.convert(src, src / "converted", progress=False)
    assert not (src / "converted").exists()


def test_write_failure_midway_leaves_nothing(tmp_path, hf_untied, monkeypatch):
    from orbax.checkpoint.experimental.v1 import partial

    calls = {"n": 0}
    real_save = partial.save

    def failing_save(path, state, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(path, state, **kw)

    monkeypatch.setattr(partial, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"out'.*\[Errno 28\] No space left on device"):
        lj.convert(hf_untied[0], out, flush_bytes=0, progress=False)
    assert calls["n"] == 3
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_arguments(tmp_path, hf_untied):
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        lj.convert(hf_untied[0], tmp_path / "o", dtype="int8")
    with pytest.raises(InvalidInputError, match="Meta sources only"):
        lj.convert(hf_untied[0], tmp_path / "o", rope_factor=8.0)
    proc = _cli("--source", str(hf_untied[0]), "--output", str(tmp_path / "o"), "--dtype", "int8")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_converted_directory_is_not_reconverted_and_half_written_does_not_load(tmp_path, hf_untied):
    out = lj.convert(hf_untied[0], tmp_path / "orbax", progress=False)
    with pytest.raises(CheckpointError, match="already a converted"):
        lj.convert(out, tmp_path / "again", progress=False)
    (out / MANIFEST).unlink()  # what a run killed before publishing would look like, if it ever were visible
    with pytest.raises(LlamaJaxError):
        lj.load(out)


def test_compressed_conversion_loads_the_same(tmp_path, hf_untied):
    src, _, tokens, expected = hf_untied
    plain = lj.convert(src, tmp_path / "plain", dtype="float32", progress=False)
    packed = lj.convert(src, tmp_path / "packed", dtype="float32", progress=False, compress=True)
    np.testing.assert_array_equal(_logits(packed, tokens), _logits(plain, tokens))
    assert np.abs(_logits(packed, tokens) - expected).max() <= TOL
