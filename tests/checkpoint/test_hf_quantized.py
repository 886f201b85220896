"""Quantized safetensors are refused before any tensor is read (integer or fp8 parameters, quantization side
tensors), naming the file, the tensor and its dtype; a float directory whose config.json carries transformers'
``quant_method: gguf`` re-save section loads and gives the same logits as without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama32_jax as lj
from llama32_jax.checkpoint.hf import check_float_tensors, iter_hf_tensors, read_hf_params
from llama32_jax.checkpoint.pipeline import open_source
from llama32_jax.configs import RopeScaling, TextConfig
from llama32_jax.errors import CheckpointError, QuantizedCheckpointError
from tests.refs import hf_llama

TEXT = TextConfig(
    vocab_size=256,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=64,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=32.0),
    tie_embeddings=False,
)
KEY = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("float") / "model"
    hf_llama(TEXT, seed=4).save_pretrained(directory)
    return directory


def _tensors(directory: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """The file's tensors as ``name -> (safetensors dtype, shape, raw bytes)``, read from its header."""
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    start = 8 + size
    return {
        k: (v["dtype"], v["shape"], raw[start + v["data_offsets"][0] : start + v["data_offsets"][1]])
        for k, v in header.items()
    }


def _write(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written byte by byte (any dtype name, e.g. fp8, which numpy cannot express)."""
    header, offset, blobs = {}, 0, []
    for key, (dtype, shape, blob) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.fixture
def variant(float_dir, tmp_path):
    """A copy of the float directory whose tensors ``change`` rewrites (``name -> entry or None to delete``)."""

    def make(change: dict[str, tuple[str, list[int], bytes] | None]) -> Path:
        d = Path(shutil.copytree(float_dir, tmp_path / "variant"))
        tensors = _tensors(d)
        for key, entry in change.items():
            if entry is None:
                tensors.pop(key)
            else:
                tensors[key] = entry
        _write(d / "model.safetensors", tensors)
        return d

    return make


def _int8(shape) -> tuple[str, list[int], bytes]:
    return "I8", list(shape), np.ones(shape, np.int8).tobytes()


SHAPE = [TEXT.dim, TEXT.ffn_dim]  # down_proj: [dim, ffn]


@pytest.mark.parametrize(
    "change,match",
    [
        # bitsandbytes 8-bit: int8 weight (plus its SCB scales and weight_format)
        ({KEY: _int8(SHAPE)}, rf"tensor '{KEY}' is stored as I8 \(integers\)"),
        # bitsandbytes 4-bit: packed uint8
        ({KEY: ("U8", [SHAPE[0] * SHAPE[1] // 2, 1], bytes(SHAPE[0] * SHAPE[1] // 2))}, r"stored as U8 \(integers\)"),
        # fp8 (compressed-tensors / fbgemm): a float format we do not read
        ({KEY: ("F8_E4M3", SHAPE, bytes(SHAPE[0] * SHAPE[1]))}, r"stored as F8_E4M3 \(a low-precision float format\)"),
        (
            {KEY + ".SCB": ("F32", [SHAPE[0]], bytes(4 * SHAPE[0]))},
            r"'model.layers.0.mlp.down_proj.weight.SCB' \(F32\) "
            r"is a quantization tensor",
        ),
        ({KEY + ".absmax": ("F32", [4], bytes(16))}, r"weight\.absmax' \(F32\) is a quantization tensor"),
        ({KEY + ".quant_state.bitsandbytes__nf4": ("U8", [8], bytes(8))}, r"quant_state\.bitsandbytes__nf4"),
        # GPTQ / AWQ: qweight int32 packs 8 4-bit values, plus scales / qzeros / g_idx
        (
            {KEY: None, "model.layers.0.mlp.down_proj.qweight": ("I32", [8, 32], bytes(4 * 8 * 32))},
            r"down_proj\.qweight' \(I32\) is a quantization tensor",
        ),
        ({"model.layers.0.mlp.down_proj.scales": ("F16", [1, 32], bytes(64))}, r"down_proj\.scales' \(F16\)"),
        ({"model.layers.0.mlp.down_proj.g_idx": ("I32", [64], bytes(256))}, r"down_proj\.g_idx' \(I32\)"),
        ({KEY + "_scale": ("BF16", [1], bytes(2))}, r"down_proj\.weight_scale' \(BF16\)"),
    ],
)
def test_quantized_tensors_are_refused_naming_file_key_and_dtype(variant, change, match):
    d = variant(change)
    for read in (read_hf_params, lambda p: list(iter_hf_tensors(p)), check_float_tensors_of, lj.load, open_source):
        with pytest.raises(QuantizedCheckpointError, match=match) as info:
            read(d)
        assert "model.safetensors" in str(info.value) and "float" in str(info.value)


def check_float_tensors_of(directory: Path) -> None:
    check_float_tensors(directory / "model.safetensors")


def test_a_corrupt_header_is_a_checkpoint_error_not_a_memory_blowup(variant, tmp_path):
    d = variant({})
    (d / "model.safetensors").write_bytes(b"\xff" * 64)  # claims a 2**64-byte header
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt.*header claims"):
        check_float_tensors(d / "model.safetensors")


def test_gguf_resave_section_over_float_tensors_loads_like_the_plain_directory(float_dir, tmp_path):
    """What transformers 5.x writes after loading a GGUF: its quantization_config says gguf, the tensors are float."""
    resaved = Path(shutil.copytree(float_dir, tmp_path / "gguf-resave"))
    config = json.loads((resaved / "config.json").read_text())
    config.update(
        {
            "_model_name_or_path": "Tiny Llama 2L",
            "unk_token_id": 0,
            "quantization_config": {"dequantize": False, "gguf_file": "tiny.gguf", "quant_method": "gguf"},
        }
    )
    (resaved / "config.json").write_text(json.dumps(config, indent=2))
    plain_model = lj.load(float_dir, dtype="float32")
    model = lj.load(resaved, dtype="float32")
    assert model.config.text == plain_model.config.text == TEXT
    tokens = np.random.default_rng(0).integers(0, TEXT.vocab_size, size=(2, 17))
    np.testing.assert_array_equal(model.logits(tokens), plain_model.logits(tokens))
