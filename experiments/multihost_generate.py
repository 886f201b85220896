"""Generate on several hosts (processes): each restores its own shards of a converted checkpoint and runs the
same jitted program; process 0 reports the result once.

    # on each of 2 machines (or 2 shells on one; on CPU add XLA_FLAGS=--xla_force_host_platform_device_count=4):
    python -m experiments.multihost_generate --coordinator=host0:1234 --num_processes=2 --process_id=$RANK \\
        --checkpoint=ckpt/llama-3.2-1b --plan=fsdp_tp --prompt="Why is the sky blue?"

``--prompt_ids`` (a JSON list of token-id lists) replaces ``--prompt`` for checkpoints without a tokenizer.
``--out`` writes the result as JSON (from process 0 only).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from experiments import cli

_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0's coordinator", required=True)
_N = flags.DEFINE_integer("num_processes", 2, "processes in the job")
_ID = flags.DEFINE_integer("process_id", None, "this process's index", required=True)
_CKPT = flags.DEFINE_string("checkpoint", None, "converted (Orbax) checkpoint directory", required=True)
_PLAN = flags.DEFINE_string("plan", "fsdp_tp", "sharding plan (a name in sharding/ or a .toml path)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "text prompt(s)")
_IDS = flags.DEFINE_string("prompt_ids", None, "JSON list of token-id prompts")
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate per prompt")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "parameter dtype")
_OUT = flags.DEFINE_string("out", None, "write the result here as JSON (process 0 only)")
_SLOTS = flags.DEFINE_integer(
    "slots", None, "also generate through continuous batching with this many slots (reported as engine_outputs)"
)


def main(argv):
    del argv
    from llama32_jax.sharding import distributed

    distributed.initialize(_COORD.value, _N.value, _ID.value)
    import jax

    import llama32_jax as lj

    model = lj.load(_CKPT.value, mesh=_PLAN.value, dtype=_DTYPE.value)
    prompts = json.loads(_IDS.value) if _IDS.value else list(_PROMPT.value)
    if not prompts:
        raise app.UsageError("give --prompt or --prompt_ids")
    outs = model.generate(prompts, max_new_tokens=_NEW.value, return_details=True)
    if distributed.is_primary():
        result = {
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "plan": _PLAN.value,
            "outputs": [{"text": o.text, "tokens": o.tokens} for o in outs],
        }
    if _SLOTS.value:  # every process runs the same schedule; the slots are split over the plan's data axes
        engine_outs = model.generate(prompts, max_new_tokens=_NEW.value, return_details=True, slots=_SLOTS.value)
        if distributed.is_primary():
            result["engine_outputs"] = [{"text": o.text, "tokens": o.tokens} for o in engine_outs]
    if distributed.is_primary():
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(result, f)
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
