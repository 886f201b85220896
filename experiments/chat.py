"""Chat with a model: one-shot with --message, or an interactive loop reading stdin.

    .venv/bin/python -m experiments.chat --message="What is the tallest mountain?"
    .venv/bin/python -m experiments.chat --checkpoint=/path/to/Llama-3.2-1B-Instruct-hf --system="Be brief."
    echo "Tell me a joke" | .venv/bin/python -m experiments.chat

Llama checkpoints use Meta's chat format; other HF/GGUF tokenizers their own chat template (SmolLM2: ChatML).
In the interactive loop an empty line or EOF ends the conversation.
"""

from __future__ import annotations

import sys

from absl import flags

import llama32_jax as lj
from experiments import cli
from llama32_jax.checkpoint.gguf import smollm2_gguf_path

_CKPT = flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file (default: the built-in SmolLM2 GGUF)")
_MESSAGE = flags.DEFINE_multi_string("message", None, "user message(s); each one is a turn of one conversation")
_SYSTEM = flags.DEFINE_string("system", None, "optional system message")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens per reply")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")


def _reply(model, dialog):
    def stream(_, delta):
        print(delta, end="", flush=True)

    (text,) = model.chat(
        [dialog],
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMP.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        stream=stream,
    )
    print()
    return text


def main(argv):
    del argv
    model = lj.load(_CKPT.value or str(smollm2_gguf_path()), dtype=_DTYPE.value)
    dialog = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    messages = _MESSAGE.value
    interactive = messages is None
    while True:
        if interactive:
            if sys.stdin.isatty():
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return
            user = line.rstrip("\n")
        else:
            if not messages:
                return
            user, messages = messages[0], messages[1:]
            print(f"you> {user}")
        dialog.append({"role": "user", "content": user})
        print("model> ", end="", flush=True)
        dialog.append({"role": "assistant", "content": _reply(model, dialog)})


if __name__ == "__main__":
    cli.run(main)
