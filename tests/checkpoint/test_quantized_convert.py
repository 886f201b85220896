"""Quantized conversion (``lj.convert(..., quantize=)`` / ``python -m llama32_jax.convert --quantize``) end to end.

The source is a tiny untied Llama saved by transformers' ``save_pretrained`` (fp32). A quantized checkpoint must
hold exactly what quantizing the source on load gives (``lj.load(hf_dir, quantize=...)``): the same int values,
the same fp32 scales, the same float parameters, bit for bit, hence the same logits; its manifest records the
:class:`~llama32_jax.quant.QuantConfig`; it is smaller on disk than the float conversion. A float converted
checkpoint loaded with ``quantize`` gives the same model. Another ``quantize`` setting on load, or an int4 group
that does not divide a weight's input dimension, is a :class:`~llama32_jax.errors.QuantizationError` (the latter
before anything is written: no output directory, no temporary one). An HF export of a quantized model is its
dequantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import llama32_jax as lj
from llama32_jax.checkpoint.convert_vision import vision_state_dict_from_params
from llama32_jax.checkpoint.orbax_ckpt import MANIFEST, read_manifest, restore_params
from llama32_jax.configs import TINY_TEXT, TINY_VISION
from llama32_jax.convert import main as convert_main
from llama32_jax.errors import QuantizationError
from llama32_jax.models.build import abstract_model
from llama32_jax.models.quantize import quant_targets
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant import QuantConfig
from llama32_jax.quant.arrays import dequantize, scale_shape
from tests.checkpoint.convert_paths import convert_cli, nothing_left
from tests.refs import hf_llama
from tests.refs_vision import hf_mllama_config

# Input dimensions 64 (dim, 4 heads x 16) and 192 (ffn): int4 groups of 32 divide both, the default 128 does not.
TEXT = dataclasses.replace(TINY_TEXT.text, tie_embeddings=False)
MODES = {"int8": QuantConfig("int8"), "int4": QuantConfig("int4", 32)}
TOKENS = np.random.default_rng(2).integers(0, TEXT.vocab_size, size=(2, 11))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "tiny"
    hf_llama(TEXT, seed=3).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, hf_dir) -> Path:
    return lj.convert(hf_dir, tmp_path_factory.mktemp("float") / "ckpt", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, hf_dir) -> dict[str, Path]:
    """One quantized checkpoint per mode, written by the Python entry point (a mode name, then a mapping)."""
    root = tmp_path_factory.mktemp("quantized")
    return {
        "int8": lj.convert(hf_dir, root / "int8", dtype="float32", progress=False, quantize="int8"),
        "int4": lj.convert(
            hf_dir, root / "int4", dtype="float32", progress=False, quantize={"mode": "int4", "group_size": 32}
        ),
    }


def _params(model) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_tree(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))).items()}


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value.dtype == want[key].dtype and value.shape == want[key].shape, key
        assert value.tobytes() == want[key].tobytes(), key


def _size(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_equals_quantizing_the_source(hf_dir, float_ckpt, quantized, mode):
    qc = MODES[mode]
    path = quantized[mode]
    record, config = read_manifest(path)
    assert record["quantization"] == qc.to_json() and record["dtype"] == "float32"
    assert QuantConfig.from_json(record["quantization"]) == qc

    # Stored as int values with fp32 scales beside them, for every quantized kernel; the rest stays fp32.
    _, stored = restore_params(path)
    stored = {tuple(map(str, k)): v for k, v in flatten_tree(stored).items()}
    targets = quant_targets(config.replace(scan_layers=False), qc)
    assert len(targets) == 2 * 7 + 1  # 7 projections per layer + the untied head
    scales = set()
    for kpath, t in targets.items():
        kernel, scale = stored[tuple(map(str, kpath))], stored[tuple(map(str, t.scale_path))]
        assert kernel.dtype == np.dtype(mode), kpath
        assert scale.dtype == np.float32 and scale.shape == scale_shape(kernel.shape, t.n_in, t.mode, t.group)
        scales.add(tuple(map(str, t.scale_path)))
    targets = {tuple(map(str, k)) for k in targets}
    assert all(v.dtype == np.float32 for k, v in stored.items() if k not in targets), "float parameters are fp32"
    assert {k for k in stored if k[-1].endswith("_scale")} == scales

    loaded = lj.load(path, dtype="float32")
    assert loaded.module.quant_config == qc
    direct = lj.load(hf_dir, dtype="float32", quantize=qc)
    _assert_identical(_params(loaded), _params(direct))
    np.testing.assert_array_equal(loaded.logits(TOKENS), direct.logits(TOKENS))

    # The float conversion loaded with the same quantize: the same model again.
    _assert_identical(_params(lj.load(float_ckpt, dtype="float32", quantize=qc)), _params(loaded))

    # Smaller on disk: int8 (or int4, one byte per value as TensorStore stores it) instead of fp32 weights.
    assert "quantization" not in json.loads((float_ckpt / MANIFEST).read_text())
    assert _size(path / "params") < 0.5 * _size(float_ckpt / "params")


def test_cli_int4_with_group_size_and_keep_float(tmp_path, hf_dir):
    out = tmp_path / "int4"
    proc = convert_cli(
        "--source", str(hf_dir), "--output", str(out), "--dtype", "float32",
        "--quantize", "int4", "--group-size", "32", "--keep-float", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    qc = QuantConfig("int4", 32, ("head",))
    record, _ = read_manifest(out)
    assert record["quantization"] == {"mode": "int4", "group_size": 32, "skip": ["head"]}
    loaded = lj.load(out, dtype="float32")
    params = _params(loaded)
    assert params[("lm_head",)].dtype == np.float32 and ("lm_head_scale",) not in params
    assert params[("layers", 0, "feed_forward", "w2", "kernel")].dtype == np.dtype("int4")
    direct = lj.load(hf_dir, dtype="float32", quantize=qc)
    _assert_identical(params, _params(direct))
    np.testing.assert_array_equal(loaded.logits(TOKENS), direct.logits(TOKENS))


def test_loading_with_another_setting_is_refused(quantized):
    with pytest.raises(QuantizationError, match=r"\(int8, per channel\).*quantize='int4, group 128'"):
        lj.load(quantized["int8"], quantize="int4")
    with pytest.raises(QuantizationError, match=r"\(int4, group 32\).*quantize='int4, group 64'"):
        lj.load(quantized["int4"], quantize=QuantConfig("int4", 64))
    with pytest.raises(QuantizationError, match=r"\(int4, group 32\).*quantize='int4, group 32; kept in"):
        lj.load(quantized["int4"], quantize=QuantConfig("int4", 32, ("head",)))
    # Its own setting, or its mode's name, is accepted.
    for ok in ("int8", QuantConfig("int8"), None):
        assert lj.load(quantized["int8"], dtype="float32", quantize=ok).module.quant_config == MODES["int8"]
    assert lj.load(quantized["int4"], dtype="float32", quantize="int4").module.quant_config == MODES["int4"]


def test_misaligned_int4_group_writes_nothing(tmp_path, hf_dir, capsys):
    match = "int4 group size 128 does not divide the input dimension 64"
    with pytest.raises(QuantizationError, match=match):
        lj.convert(hf_dir, tmp_path / "out", quantize="int4", progress=False)
    nothing_left(tmp_path, "out")
    # The command line (in this process: its subprocess form is tested above): exit status 2, one typed line.
    for args, error in [
        (["--quantize", "int4"], match),
        (["--group-size", "32"], "--group-size and --keep-float apply with --quantize int8|int4 only"),
        (["--quantize", "int8", "--group-size", "32"], "--group-size applies to --quantize int4"),
        (["--quantize", "int8", "--keep-float", "vision,tail"], "quantize skip names unknown parts ['tail']"),
    ]:
        assert convert_main(["--no-progress", "--source", str(hf_dir), "--output", str(tmp_path / "cli"), *args]) == 2
        assert f"error: QuantizationError: {error}" in capsys.readouterr().err
        nothing_left(tmp_path, "cli")


def test_hf_export_of_a_quantized_model_is_its_dequantization(tmp_path, quantized):
    model = lj.load(quantized["int8"], dtype="float32")
    out = lj.export_hf(model, tmp_path / "hf", dtype="float32")
    marker = json.loads((out / "llama32_jax_export.json").read_text())
    assert marker["dequantized_from"] == MODES["int8"].to_json()
    back = lj.load(out, dtype="float32")
    assert back.module.quant_config is None
    got = _params(back)
    params = _params(model)
    for kpath, t in quant_targets(model.config, MODES["int8"]).items():
        want = dequantize(params[kpath], params[t.scale_path], t.n_in, t.mode, t.group, np.float32)
        np.testing.assert_array_equal(got[kpath], want)
    # The float model computes what the quantized one does (the int8 path applies the scale after the product).
    np.testing.assert_allclose(back.logits(TOKENS), model.logits(TOKENS), atol=1e-5, rtol=0)


def test_vision_checkpoint_equals_quantizing_the_source(tmp_path):
    """Llama 3.2 Vision: the vision tower's projections, the cross-attention blocks and the head are quantized as
    they stream (random fp32 weights of TINY_VISION's shapes, written with HF's names)."""
    vision = TINY_VISION.replace(scan_layers=False)
    rng = np.random.default_rng(6)
    abstract = flatten_tree(nnx.to_pure_dict(nnx.state(abstract_model(vision, param_dtype=np.float32))))
    params: dict = {}
    for path, leaf in abstract.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    hf = tmp_path / "hf"
    hf_mllama_config(vision).save_pretrained(hf)
    state = vision_state_dict_from_params(vision, params, "hf")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(hf / "model.safetensors"))
    qc = QuantConfig("int4", 32)
    out = lj.convert(hf, tmp_path / "int4", dtype="float32", progress=False, quantize=qc)
    params = _params(lj.load(out, dtype="float32"))
    _assert_identical(params, _params(lj.load(hf, dtype="float32", quantize=qc)))
    targets = quant_targets(vision, qc)
    assert {k for k, v in params.items() if v.dtype == np.dtype("int4")} == set(targets)
    # The vision tower's 4 + 2 encoder layers x (wq, wk, wv, wo, fc1, fc2), its projector, the cross-attention blocks.
    assert len([k for k in targets if k[0] == "vision"]) == 6 * 6 and ("projector", "kernel") in targets
    assert ("cross_layers", 0, "attention", "wq", "kernel") in targets
