"""Files given as a model config that are something else get NotAModelConfigError naming the file and saying what it
looks like; a quantize_config.json beside config.json makes the checkpoint a QuantizedCheckpointError."""

from __future__ import annotations

import json

import pytest

import llama32_jax as lj
from llama32_jax.configs import LLAMA_3_2_1B, TINY_TEXT, from_hf_config, from_params_json
from llama32_jax.configs.readers import config_to_dict
from llama32_jax.errors import ConfigError, NotAModelConfigError, QuantizedCheckpointError
from tests.config_dicts import GENERATION_CONFIG, GPTQ_QUANTIZE_CONFIG, HF_1B, LFS_POINTER, MLLAMA_11B, TOKENIZER_CONFIG

TEXT_FILES = {
    "lfs-pointer": (
        LFS_POINTER,
        r"is a Git LFS pointer, not the file itself \(the real file has 1558 bytes\).*git lfs",
    ),
    "generation": (json.dumps(GENERATION_CONFIG), r"is a generation config \(generation_config.json"),
    "generation-crlf-no-newline": (json.dumps(GENERATION_CONFIG, indent=2).replace("\n", "\r\n"), "generation config"),
    "tokenizer": (json.dumps(TOKENIZER_CONFIG), r"is a tokenizer config \(tokenizer_config.json"),
    "chat-template": (json.dumps({"chat_template": "{{- bos_token }}"}), r"is a chat template \(chat_template.json\)"),
    "quantize-config": (json.dumps(GPTQ_QUANTIZE_CONFIG), r"AutoGPTQ / AutoAWQ quantize_config.json, 4-bit"),
    "peft-adapter": (json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}), "PEFT adapter config.*merge"),
    "index": (json.dumps({"metadata": {}, "weight_map": {"a": "model-1.safetensors"}}), "safetensors index"),
    "ours": (json.dumps(config_to_dict(TINY_TEXT)), "llama32_jax's own config.*config_from_dict"),
    "manifest": (json.dumps({"format": "x", "params": "params", "config": {}}), "manifest of a converted"),
    "empty": ("", r"is empty; expected an HF model config.json"),
    "blank": (" \n\r\n", "is empty"),
    "array": ("[1, 2]", r"holds a JSON list, not an object"),
    "string": ('"config"', r"holds a JSON str, not an object"),
    "empty-object": ("{}", "is an empty JSON object"),
    "truncated": (json.dumps(HF_1B)[:200], r"cannot read .*config.json as JSON"),
    "meta-params-to-hf-reader": (json.dumps({"dim": 2048, "n_layers": 16, "n_heads": 32}), "Meta's params.json"),
}
BINARY_FILES = {
    "gguf": (b"GGUF\x03\x00\x00\x00" + bytes(32), "is a GGUF model file"),
    "safetensors": ((14).to_bytes(8, "little") + b'{"a":{}}      ', "is a safetensors weights file"),
    "zip": (b"PK\x03\x04" + bytes(32), r"is a zip archive \(a PyTorch"),
    "pickle": (b"\x80\x02}q\x00." + bytes(8), "is a Python pickle"),
    "latin-1": ('{"model_type": "llama", "name": "caf\xe9"}'.encode("latin-1"), "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(TEXT_FILES))
def test_text_that_is_not_a_model_config(tmp_path, name):
    text, match = TEXT_FILES[name]
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(NotAModelConfigError, match=match) as info:
        from_hf_config(path)
    assert str(path) in str(info.value)  # names the file


@pytest.mark.parametrize("name", sorted(BINARY_FILES))
def test_binary_files(tmp_path, name):
    data, match = BINARY_FILES[name]
    for reader, filename in ((from_hf_config, "config.json"), (from_params_json, "params.json")):
        (tmp_path / filename).write_bytes(data)
        with pytest.raises(NotAModelConfigError, match=match):
            reader(tmp_path)  # a directory holding the file


def test_params_reader_names_what_it_got(tmp_path):
    (tmp_path / "params.json").write_text(LFS_POINTER)
    with pytest.raises(NotAModelConfigError, match=r"params.json is a Git LFS pointer.*expected Meta's params.json"):
        from_params_json(tmp_path)
    for data, match in (
        (HF_1B, "is an HF config.json"),
        (MLLAMA_11B, "is an HF config.json"),
        (TOKENIZER_CONFIG, "tokenizer config"),
    ):
        (tmp_path / "params.json").write_text(json.dumps(data))
        with pytest.raises(NotAModelConfigError, match=match):
            from_params_json(tmp_path / "params.json")


def test_quantize_config_beside_config_json_is_a_quantized_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_1B))
    assert from_hf_config(tmp_path).text == LLAMA_3_2_1B.text
    (tmp_path / "quantize_config.json").write_text(json.dumps(GPTQ_QUANTIZE_CONFIG))
    for source in (tmp_path, tmp_path / "config.json"):
        with pytest.raises(QuantizedCheckpointError, match=r"quantize_config.json beside it.*gptq \(AutoGPTQ\), 4-bit"):
            from_hf_config(source)
    # the file itself, given as a config, is named for what it is
    with pytest.raises(NotAModelConfigError, match="quantize_config.json is a quantization config"):
        from_hf_config(tmp_path / "quantize_config.json")
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 128, "zero_point": True}))
    with pytest.raises(QuantizedCheckpointError, match=r"quant_config.json beside it.*awq \(AutoAWQ\), 4-bit"):
        from_hf_config(tmp_path)


def test_lj_load_of_a_directory_whose_config_is_an_lfs_pointer(tmp_path):
    (tmp_path / "config.json").write_text(LFS_POINTER)
    (tmp_path / "model.safetensors").write_text(LFS_POINTER)
    with pytest.raises(NotAModelConfigError, match="Git LFS pointer"):
        lj.load(tmp_path)


def test_bom_and_crlf_are_read(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(HF_1B, indent=2).replace("\n", "\r\n").encode())
    assert from_hf_config(tmp_path).text == LLAMA_3_2_1B.text


def test_missing_file_and_bad_source(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json not found"):
        from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match=r"params.json not found"):
        from_params_json(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="expected a path to config.json.*got int"):
        from_hf_config(3)


def test_a_huge_file_is_not_read_into_memory(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.write(b'{"model_type": "llama"')
        f.truncate(32 * 2**20)  # sparse: 32 MiB of NULs after the text
    with pytest.raises(NotAModelConfigError, match=r"is 33554432 bytes long \(a config is a few kilobytes"):
        from_hf_config(path)
