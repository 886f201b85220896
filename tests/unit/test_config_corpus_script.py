"""experiments/check_config_corpus.py on a small corpus built here: it passes when plain configs and Meta's params are
read with transformers' / Meta's sizes and everything else is refused, and it fails (exit 1, PROBLEM in the table)
when a plain config is refused or a non-config is read."""

from __future__ import annotations

import json

from experiments.check_config_corpus import main
from tests.config_dicts import (
    BNB_8BIT,
    EXECUTORCH_11B,
    GENERATION_CONFIG,
    GGUF_RESAVE,
    GPTQ_QUANTIZE_CONFIG,
    HF_1B,
    LFS_POINTER,
    META_1B,
    MLLAMA_TINY,
    TORCHCHAT_GUARD_INT4,
)


def _corpus(root, files: dict[str, object]):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        (path.parent / "SOURCE.txt").write_text("where it came from\n")
    return root


GOOD = {
    "llama-3.2-1b-hf/config.json": HF_1B,
    "llama-3.2-1b-hf/generation_config.json": GENERATION_CONFIG,
    "llama-3.2-1b-meta-params/params.json": META_1B,
    "llama-3.2-11b-vision-meta-params-executorch/params.json": EXECUTORCH_11B,
    "tiny-vision-hf/config.json": MLLAMA_TINY,
    "gguf-resave/config.json": GGUF_RESAVE,
    "bnb/config.json": {**HF_1B, "quantization_config": BNB_8BIT},
    "gptq/config.json": HF_1B,
    "gptq/quantize_config.json": GPTQ_QUANTIZE_CONFIG,
    "guard-torchchat/params.json": TORCHCHAT_GUARD_INT4,
    "lfs/config.json": LFS_POINTER,
}


def test_good_corpus_passes_and_the_table_uses_relative_paths(tmp_path):
    corpus = _corpus(tmp_path / "corpus", GOOD)
    out = tmp_path / "report"
    assert main(["--corpus", str(corpus), "--out", str(out)]) == 0
    table = (out.with_suffix(".md")).read_text()
    assert "11 files in 9 directories: 5 read, 6 refused; 0 with a problem" in table
    assert str(tmp_path) not in table and str(tmp_path) not in out.with_suffix(".json").read_text()
    rows = {r["file"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["llama-3.2-1b-hf/config.json"]["mismatch_transformers"] == {}
    assert rows["llama-3.2-1b-meta-params/params.json"]["official_hf"] == "llama-3.2-1b-hf/config.json"
    assert rows["llama-3.2-1b-meta-params/params.json"]["mismatch_official_hf"] == {}
    assert "agree with the reading" in rows["llama-3.2-11b-vision-meta-params-executorch/params.json"]["reason"]
    assert rows["gptq/config.json"]["error"] == "QuantizedCheckpointError"
    assert rows["guard-torchchat/params.json"]["error"] == "UnsupportedConfigError"
    assert rows["lfs/config.json"]["error"] == "NotAModelConfigError"


def test_a_refused_plain_config_or_a_read_non_config_fails(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus", {"plain/config.json": {**HF_1B, "logit_scale": 0.5}})
    out = tmp_path / "report"
    assert main(["--corpus", str(corpus), "--out", str(out)]) == 1
    assert "PROBLEM: must be read but was refused" in out.with_suffix(".md").read_text()

    import experiments.check_config_corpus as script

    monkeypatch.setattr(script, "expectation", lambda path: "refuse")  # as if the file were not a model config
    corpus = _corpus(tmp_path / "corpus2", {"x/config.json": HF_1B})
    assert main(["--corpus", str(corpus), "--out", str(out)]) == 1
    assert "read, but it is not a plain model config" in out.with_suffix(".md").read_text()
