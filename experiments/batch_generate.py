"""Generation over a whole JSONL file, continuously batched, resumable (``llama32_jax.batch.batch_generate``).

    .venv/bin/python -m experiments.batch_generate --input=prompts.jsonl --output=results.jsonl
    .venv/bin/python -m experiments.batch_generate --checkpoint=/path/to/Llama-3.2-1B-Instruct --dtype=bfloat16 \
        --input=prompts.jsonl --output=results.jsonl --max_new_tokens=256 --slots=64

Each input line is a prompt string or an object with ``"prompt"`` or ``"messages"`` (a chat dialog), optional
``"id"``, ``"images"`` and per-row sampling values (see ``llama32_jax/batch/rows.py``). Each output line is one
row's result, in input order: ``index``, ``id``, ``status``, ``text``, ``prompt_tokens``, ``output_tokens``,
``stop_reason``, ``error``. Interrupt it (Ctrl-C, a kill) and run the same command again: finished rows are kept
in ``<output>.partial`` and only the rest run; ``--overwrite`` starts over. Bad rows stop the run before anything
is generated (``--bad_rows=fail`` writes them as failed rows instead). Default model: the built-in
SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import sys
import time

from absl import flags

import llama32_jax as lj
from experiments import cli
from llama32_jax.batch import batch_generate
from llama32_jax.batch.journal import check_output_path, refuse_existing
from llama32_jax.batch.rows import read_rows
from llama32_jax.checkpoint.gguf import smollm2_gguf_path
from llama32_jax.errors import InvalidInputError

_CKPT = flags.DEFINE_string("checkpoint", None, "HF / Meta / converted directory or .gguf (default: built-in SmolLM2)")
_INPUT = flags.DEFINE_string("input", None, "JSONL file: one prompt string or row object per line")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL results file (journaled to <output>.partial while running)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "tokens per row at most (a row's own value wins)")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed (a row's own value wins)")
_SLOTS = flags.DEFINE_integer("slots", None, "sequences decoded at once (default: from free memory)")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "cache positions per sequence (default: from the rows)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output / discard an unfinished run")
_BAD_ROWS = flags.DEFINE_string("bad_rows", "error", "'error': stop on bad rows; 'fail': write them as failed rows")
_DTYPE = flags.DEFINE_string("dtype", "float32", "parameter dtype: float32, bfloat16 or float16")


def main(argv):
    if len(argv) > 1:
        raise InvalidInputError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    if not _INPUT.value or not _OUTPUT.value:
        raise InvalidInputError("--input (a JSONL file) and --output (the results file) are required")
    if _BAD_ROWS.value not in ("error", "fail"):
        raise InvalidInputError(f"--bad_rows must be 'error' or 'fail', got {_BAD_ROWS.value!r}")
    # A missing input or a finished output is reported before the model loads.
    read_rows(_INPUT.value)
    refuse_existing(check_output_path(_OUTPUT.value), _OVERWRITE.value)
    path = _CKPT.value or str(smollm2_gguf_path())
    t0 = time.perf_counter()
    model = lj.load(path, dtype=_DTYPE.value)
    print(f"loaded {model.config.name} from {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    rows = batch_generate(
        model,
        _INPUT.value,
        _OUTPUT.value,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMP.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        slots=_SLOTS.value,
        max_len=_MAX_LEN.value,
        overwrite=_OVERWRITE.value,
        bad_rows=_BAD_ROWS.value,
    )
    elapsed = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in rows)
    tokens = sum(r["output_tokens"] for r in rows)
    print(
        f"{len(rows)} rows ({ok} ok, {len(rows) - ok} failed), {tokens} output tokens in {elapsed:.1f} s "
        f"(resumed rows included) -> {_OUTPUT.value}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    cli.run(main)
