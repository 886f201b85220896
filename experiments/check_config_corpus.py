"""Read a corpus of real configuration files with our readers and check what they read against transformers and Meta.

    .venv/bin/python -m experiments.check_config_corpus --corpus DIR     # experiments/results/config_corpus.{md,json}
    .venv/bin/python -m experiments.check_config_corpus --corpus DIR --out /tmp/corpus   # writes /tmp/corpus.{md,json}

The corpus is a directory of subdirectories of config files (``SOURCE.txt``, ``INDEX.md`` and ``README*`` are
skipped). Every file is read as a user would read it: ``params.json`` with ``from_params_json``, any other file
with ``from_hf_config``. A file is either read, and then its sizes are compared with independent readings of the
same file -- transformers' (``AutoConfig.for_model``) for an HF config; llama-models' ``ModelArgs`` plus Meta's own
``FeedForward`` width arithmetic, and transformers' reading of the official HF config of the same model in the
corpus, for a params.json -- or refused with a typed error (a ``LlamaJaxError``), whose type and message are
recorded.

What each file must give is decided from the file alone, not from our reader:

* a plain ``config.json`` (a JSON object with model_type llama or mllama, not quantized: no quantization_config
  other than transformers' gguf re-save, no compression_config, no AutoGPTQ/AutoAWQ quantize_config.json /
  quant_config.json beside it) must be read;
* an official Meta ``params.json`` (every key a field of llama-models' ``ModelArgs`` or its ``vision_model``
  section; no quantization_args / lora_args) must be read;
* a ``params.json`` carrying other tools' fields may be read only if every extra field is one listed in
  ``EXTRA_PARAMS_FIELDS`` and says what the reading says (re-derived here); it may also be refused;
* every other file must be refused with a typed error.

The script exits 1 when any of that fails, when a size disagrees, or when a reference cannot read a file we read.
It writes a markdown table (paths relative to the corpus) and a JSON record of every comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

SKIPPED = ("SOURCE.txt", "INDEX.md")
QUANTIZE_SIDE_FILES = ("quantize_config.json", "quant_config.json")
# Fields of params.json that only affect the runtime (Meta's cache sizes, torchchat's limit and tokenizer choice).
RUNTIME_PARAMS_FIELDS = ("max_seq_len", "max_batch_size", "block_size", "use_tiktoken")


# --------------------------------------------------------------------------------------------------------------
# Sizes: one flat dict per reading, the same keys whoever reads.


def sizes_ours(config) -> dict[str, Any]:
    """What llama32_jax read (a ModelConfig) as a flat dict."""
    t, s = config.text, config.text.rope_scaling
    out = {
        "vocab_size": t.vocab_size,
        "dim": t.dim,
        "n_layers": t.n_layers,
        "n_heads": t.n_heads,
        "n_kv_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "ffn_dim": t.ffn_dim,
        "norm_eps": float(t.norm_eps),
        "rope_theta": float(t.rope_theta),
        "rope_type": "llama3" if s else "default",
        "rope_factor": s.factor if s else None,
        "rope_low_freq_factor": s.low_freq_factor if s else None,
        "rope_high_freq_factor": s.high_freq_factor if s else None,
        "rope_original_max_position_embeddings": s.original_max_position_embeddings if s else None,
        "tie_embeddings": t.tie_embeddings,
        "max_position_embeddings": t.max_position_embeddings,
        "n_cross_attention_layers": t.n_cross_attention_layers,
        "cross_attention_layers": list(t.hf_cross_attention_layers),
    }
    if config.vision is not None:
        v = config.vision
        out.update(
            {
                "image_token_id": config.image_token_id,
                "vision.image_size": v.image_size,
                "vision.patch_size": v.patch_size,
                "vision.num_channels": v.num_channels,
                "vision.width": v.width,
                "vision.n_layers": v.n_layers,
                "vision.n_global_layers": v.n_global_layers,
                "vision.n_heads": v.n_heads,
                "vision.mlp_dim": v.mlp_dim,
                "vision.norm_eps": float(v.norm_eps),
                "vision.max_num_tiles": v.max_num_tiles,
                "vision.intermediate_layers": list(v.intermediate_layers),
                "vision.supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
                "vision.output_dim": v.output_dim,
            }
        )
    return out


def sizes_transformers(data: dict[str, Any]) -> dict[str, Any]:
    """What transformers reads from the same config dict (``AutoConfig.for_model``), as the same flat dict."""
    from transformers import AutoConfig

    rest = {k: v for k, v in data.items() if k != "model_type"}
    c = AutoConfig.for_model(data["model_type"], **rest)
    mllama = data["model_type"] == "mllama"
    t = c.text_config if mllama else c
    rp = dict(t.rope_parameters or {})
    scaled = rp.get("rope_type") not in (None, "default")
    xattn = list(t.cross_attention_layers) if mllama else []
    out = {
        "vocab_size": t.vocab_size,
        "dim": t.hidden_size,
        "n_layers": t.num_hidden_layers - len(xattn),
        "n_heads": t.num_attention_heads,
        "n_kv_heads": t.num_key_value_heads,
        # modeling_mllama uses hidden_size // num_attention_heads; LlamaConfig resolves head_dim itself
        "head_dim": t.hidden_size // t.num_attention_heads if mllama else t.head_dim,
        "ffn_dim": t.intermediate_size,
        "norm_eps": float(t.rms_norm_eps),
        "rope_theta": float(rp.get("rope_theta", getattr(t, "default_theta", 10000.0))),
        "rope_type": rp.get("rope_type", "default"),
        "rope_factor": rp.get("factor") if scaled else None,
        "rope_low_freq_factor": rp.get("low_freq_factor") if scaled else None,
        "rope_high_freq_factor": rp.get("high_freq_factor") if scaled else None,
        "rope_original_max_position_embeddings": rp.get("original_max_position_embeddings") if scaled else None,
        "tie_embeddings": bool(t.tie_word_embeddings),
        "max_position_embeddings": t.max_position_embeddings,
        "n_cross_attention_layers": len(xattn),
        "cross_attention_layers": xattn,
    }
    if mllama:
        v = c.vision_config
        out.update(
            {
                "image_token_id": c.image_token_index,
                "vision.image_size": v.image_size,
                "vision.patch_size": v.patch_size,
                "vision.num_channels": v.num_channels,
                "vision.width": v.hidden_size,
                "vision.n_layers": v.num_hidden_layers,
                "vision.n_global_layers": v.num_global_layers,
                "vision.n_heads": v.attention_heads,
                "vision.mlp_dim": v.intermediate_size,
                "vision.norm_eps": float(v.norm_eps),
                "vision.max_num_tiles": v.max_num_tiles,
                "vision.intermediate_layers": list(v.intermediate_layers_indices),
                "vision.supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
                "vision.output_dim": v.vision_output_dim,
            }
        )
    return out


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's own ``FeedForward`` computes (its fairscale layers stubbed: only shapes are wanted).

    ``llama_models.llama3.model.FeedForward``; the vision models' text blocks (``llama3.multimodal.model``, which
    needs torchvision to import) use a copy of the same class with the same arguments.
    """
    import llama_models.llama3.model as meta

    class _Shape:
        def __init__(self, in_features, out_features, **_):
            self.out_features = out_features

    saved = meta.ColumnParallelLinear, meta.RowParallelLinear
    meta.ColumnParallelLinear = meta.RowParallelLinear = _Shape
    try:  # the arguments Meta's TransformerBlock passes
        ff = meta.FeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
    finally:
        meta.ColumnParallelLinear, meta.RowParallelLinear = saved
    return ff.w1.out_features


def sizes_meta(params: dict[str, Any]) -> dict[str, Any]:
    """What Meta's llama-models reads from a params.json (``ModelArgs``; the keys it defines)."""
    from llama_models.llama3.args import ModelArgs

    a = ModelArgs(**params)
    vision = a.vision_chunk_size > 0
    out = {
        "vocab_size": a.vocab_size,
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "head_dim": a.dim // a.n_heads,
        "ffn_dim": meta_ffn_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier),
        "norm_eps": float(a.norm_eps),
        "rope_theta": float(a.rope_theta),
        "rope_type": "llama3" if a.use_scaled_rope else "default",
        "n_cross_attention_layers": a.vision_num_cross_attention_layers if vision else 0,
    }
    if vision:
        out["vision.image_size"] = a.vision_chunk_size
        out["vision.max_num_tiles"] = a.vision_max_num_chunks
    return out


def model_args_fields() -> set[str]:
    from llama_models.llama3.args import ModelArgs

    return {f.name for f in dataclasses.fields(ModelArgs)} | {"vision_model"}


def diff(ours: dict[str, Any], theirs: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, list]:
    """``key -> [ours, theirs]`` for every key both readings have that disagrees."""
    return {k: [ours[k], theirs[k]] for k in theirs if k in ours and k not in skip and ours[k] != theirs[k]}


# --------------------------------------------------------------------------------------------------------------
# Expectations, from the file alone.


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def expectation(path: Path) -> str:
    """``"read"`` (must be read), ``"either"`` (params.json with other tools' fields) or ``"refuse"``."""
    data = _json(path)
    if not isinstance(data, dict):
        return "refuse"
    if path.name == "params.json":
        if "dim" not in data or "quantization_args" in data or "lora_args" in data:
            return "refuse"
        return "read" if set(data) <= model_args_fields() else "either"
    if path.name != "config.json" or data.get("model_type") not in ("llama", "mllama"):
        return "refuse"
    q = data.get("quantization_config")
    if (
        q is not None and not (isinstance(q, dict) and q.get("quant_method") == "gguf")
    ) or "compression_config" in data:
        return "refuse"
    if any((path.parent / n).is_file() for n in QUANTIZE_SIDE_FILES):
        return "refuse"
    return "read"


def extra_fields_agree(params: dict[str, Any], ours: dict[str, Any], meta: dict[str, Any]) -> tuple[bool, str]:
    """Whether every params.json field beyond ModelArgs' is one we know and says what the reading says."""
    checks = {
        "rope_scaling_factor": lambda v: ours["rope_type"] == "llama3" and float(v) == ours["rope_factor"],
        "intermediate_dim": lambda v: v == meta["ffn_dim"] == ours["ffn_dim"],
        "hidden_dim": lambda v: v == meta["ffn_dim"] == ours["ffn_dim"],
        "fusion_interval": lambda v: (
            ours["n_cross_attention_layers"] > 0 and v == meta["n_layers"] // meta["n_cross_attention_layers"]
        ),
        "n_special_tokens": lambda v: ours["n_cross_attention_layers"] > 0 and v == 8,
        "rope_scaling": lambda v: (
            ours["rope_type"] == "llama3"
            and (v["factor"], v["low_freq_factor"], v["high_freq_factor"], v["original_max_position_embeddings"])
            == (
                ours["rope_factor"],
                ours["rope_low_freq_factor"],
                ours["rope_high_freq_factor"],
                ours["rope_original_max_position_embeddings"],
            )
        ),
    }
    extra = sorted(set(params) - model_args_fields() - set(RUNTIME_PARAMS_FIELDS))
    bad = [k for k in extra if k not in checks or not checks[k](params[k])]
    if bad:
        return False, f"extra field(s) {bad} read although unknown or disagreeing"
    return True, f"extra field(s) {extra} agree with the reading" if extra else "official ModelArgs fields only"


def official_hf_config(corpus: Path, directory: str) -> Path | None:
    """The official HF config.json of the model a ``<model>-meta-params*`` directory describes, if the corpus has
    it: ``<model>-hf``, else ``<model>-instruct-hf`` (e.g. a base model's params against the Instruct config,
    which has the same architecture)."""
    if "-meta-params" not in directory:
        return None
    model = directory[: directory.index("-meta-params")]
    for name in (f"{model}-hf", f"{model}-instruct-hf"):
        if (corpus / name / "config.json").is_file():
            return corpus / name / "config.json"
    return None


# --------------------------------------------------------------------------------------------------------------


def check_file(corpus: Path, path: Path) -> dict[str, Any]:
    from llama32_jax.configs.readers import from_hf_config, from_params_json
    from llama32_jax.errors import LlamaJaxError

    rel = path.relative_to(corpus).as_posix()
    row: dict[str, Any] = {"file": rel, "expected": expectation(path), "problems": []}
    reader = from_params_json if path.name == "params.json" else from_hf_config
    row["reader"] = reader.__name__
    try:
        config = reader(path)
    except LlamaJaxError as e:
        row.update(verdict="refused", error=type(e).__name__, reason=str(e).replace(str(corpus) + os.sep, ""))
        if row["expected"] == "read":
            row["problems"].append("must be read but was refused")
        return row
    except Exception as e:  # an untyped error is itself the finding
        row.update(verdict="crashed", error=type(e).__name__, reason=str(e)[:300])
        row["problems"].append("raised an untyped error")
        return row
    row["verdict"] = "read"
    ours = sizes_ours(config)
    row["ours"] = ours
    data = _json(path)
    if row["expected"] == "refuse":
        row["problems"].append("read, but it is not a plain model config or official params.json")
    if path.name == "params.json":
        meta = sizes_meta(data)
        row["meta"] = meta
        row["mismatch_meta"] = diff(ours, meta)
        if row["expected"] == "either":
            ok, why = extra_fields_agree(data, ours, meta)
            row["reason"] = why
            if not ok:
                row["problems"].append(why)
        official = official_hf_config(corpus, path.parent.name)
        if official is not None:
            row["official_hf"] = official.relative_to(corpus).as_posix()
            # params.json does not define max_position_embeddings
            row["mismatch_official_hf"] = diff(ours, sizes_transformers(_json(official)), ("max_position_embeddings",))
        mismatches = {**row["mismatch_meta"], **row.get("mismatch_official_hf", {})}
    else:
        gguf = " (quantization_config gguf: transformers' re-save over float tensors)"
        row["reason"] = f"model_type {data['model_type']!r}" + (gguf if data.get("quantization_config") else "")
        try:
            theirs = sizes_transformers(data)
        except Exception as e:
            row["problems"].append(f"transformers cannot read it: {type(e).__name__}: {e}")
            return row
        row["transformers"] = theirs
        mismatches = row["mismatch_transformers"] = diff(ours, theirs)
    if mismatches:
        row["problems"].append(f"sizes disagree: {mismatches}")
    return row


def corpus_files(corpus: Path) -> list[Path]:
    files = []
    for directory in sorted(p for p in corpus.iterdir() if p.is_dir()):
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name not in SKIPPED and not path.name.startswith("README"):
                files.append(path)
    return files


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(rows: list[dict[str, Any]], n_dirs: int) -> str:
    n_read = sum(r["verdict"] == "read" for r in rows)
    bad = [r for r in rows if r["problems"]]
    lines = [
        "# Real config corpus",
        "",
        f"{len(rows)} files in {n_dirs} directories: {n_read} read, {len(rows) - n_read} refused; "
        f"{len(bad)} with a problem. Written by `experiments/check_config_corpus.py` (paths relative to the corpus "
        "directory). *Matches* compares our sizes with transformers' reading of the same file (HF configs), with "
        "llama-models' `ModelArgs` and Meta's `FeedForward` width, and with transformers' reading of the official HF "
        "config of the same model (params.json).",
        "",
        "| file | verdict | error type: reason | matches transformers / Meta? |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["verdict"] == "read":
            checks = []
            if "mismatch_transformers" in r:
                checks.append("transformers: " + ("yes" if not r["mismatch_transformers"] else "NO"))
            if "mismatch_meta" in r:
                checks.append("ModelArgs: " + ("yes" if not r["mismatch_meta"] else "NO"))
            if "mismatch_official_hf" in r:
                checks.append(f"{r['official_hf']}: " + ("yes" if not r["mismatch_official_hf"] else "NO"))
            match = "; ".join(checks) or "-"
            reason = r.get("reason", "")
        else:
            match = "-"
            reason = f"{r['error']}: {r['reason']}"
        if r["problems"]:
            match += " **PROBLEM: " + _cell("; ".join(r["problems"]), 300) + "**"
        lines.append(f"| `{r['file']}` | {r['verdict']} | {_cell(reason)} | {match} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    # argparse, not absl flags: tests import this module next to other experiments that define absl's --out.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="directory of subdirectories of config files")
    parser.add_argument(
        "--out", default="experiments/results/config_corpus", help="output path without extension: OUT.md, OUT.json"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    corpus = Path(args.corpus).resolve()
    if not corpus.is_dir():
        _parser().error(f"--corpus {args.corpus!r} is not a directory")
    import transformers

    transformers.logging.set_verbosity_error()
    files = corpus_files(corpus)
    rows = [check_file(corpus, p) for p in files]
    n_dirs = len({p.parent for p in files})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, n_dirs), encoding="utf-8")
    record = {"files": len(rows), "directories": n_dirs, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    bad = [r for r in rows if r["problems"]]
    for r in rows:
        print(f"{r['verdict']:8s} {r['file']}" + (f"  PROBLEM: {r['problems']}" if r["problems"] else ""))
    print(
        f"{len(rows)} files, {len(bad)} with a problem; wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
