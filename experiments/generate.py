"""Batched generation from the command line.

    .venv/bin/python -m experiments.generate                                   # built-in SmolLM2-135M-Instruct
    .venv/bin/python -m experiments.generate --checkpoint=/path/to/hf_dir --prompt="Why is the sky blue?" \
        --prompt="Write a haiku about JAX." --max_new_tokens=64 --temperature=0.6 --top_p=0.9 --seed=1

Prompts are raw text (use experiments/chat.py for chat-formatted turns). Prints each continuation, and with
--stream prints the first prompt's text as it is generated.
"""

from __future__ import annotations

import sys
import time

from absl import flags

import llama32_jax as lj
from experiments import cli
from llama32_jax.checkpoint.gguf import smollm2_gguf_path

_CKPT = flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file (default: the built-in SmolLM2 GGUF)")
_PROMPTS = flags.DEFINE_multi_string("prompt", ["The capital of France is", "def fibonacci(n):"], "prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "tokens to generate per prompt")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
_STREAM = flags.DEFINE_bool("stream", False, "stream the first prompt's text")


def main(argv):
    del argv
    path = _CKPT.value or str(smollm2_gguf_path())
    t0 = time.perf_counter()
    model = lj.load(path, dtype=_DTYPE.value)
    print(f"loaded {model.config.name} from {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def stream(i, delta):
        if i == 0:
            print(delta, end="", flush=True)

    t0 = time.perf_counter()
    outs = model.generate(
        _PROMPTS.value,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMP.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        stream=stream if _STREAM.value else None,
        return_details=True,
    )
    if _STREAM.value:
        print()
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(_PROMPTS.value, outs, strict=True):
        print(f"--- {prompt!r} ({out.prompt_tokens} prompt tokens, {len(out.tokens)} new, {out.stop_reason})")
        print(prompt + out.text)
    n = sum(len(o.tokens) for o in outs)
    print(f"{n} tokens in {elapsed:.1f} s (including compilation)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
