"""Fine-tuning end to end: LoRA on the real SmolLM2-135M weights, exact kill-and-resume of experiments/finetune.py,
sharded restores, checkpoint mismatch errors, and the fine-tuning notebook.

Kept within a few minutes on the 2-core CPU: the SmolLM2 run uses the scanned layer layout (a ~3x faster compile
than 30 unrolled layers; LoRA on stacked kernels is covered by the unit tests in both layouts), and the script runs
use the built-in ``tiny-text`` model, several processes at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama32_jax as lj
from llama32_jax import configs, sharding
from llama32_jax.checkpoint.hf_export import write_tokenizer_files
from llama32_jax.errors import CheckpointError
from llama32_jax.models.build import init_model
from llama32_jax.training.data import make_dataset
from llama32_jax.training.lora import merge_lora
from llama32_jax.training.state import (
    RunSpec,
    TrainCheckpointer,
    read_run,
    read_state,
    resume,
)
from llama32_jax.training.train import TrainConfig, Trainer
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "finetune.ipynb"

# A consistent reply style the model can pick up in a few dozen steps; the last two are held out.
EXAMPLES = [
    [{"role": "user", "content": f"What colour is {thing}?"}, {"role": "assistant", "content": f"Colour: {colour}!"}]
    for thing, colour in [
        ("the sky on a clear day", "blue"),
        ("fresh grass", "green"),
        ("a ripe banana", "yellow"),
        ("snow", "white"),
        ("coal", "black"),
        ("a ripe tomato", "red"),
        ("an orange", "orange"),
        ("a flamingo", "pink"),
        ("a plum", "purple"),
        ("milk chocolate", "brown"),
        ("a lemon", "yellow"),
        ("a fire truck", "red"),
        ("an emerald", "green"),
        ("the sea", "blue"),
        ("a crow", "black"),
        ("a cloud", "white"),
    ]
]
TRAIN, HELD_OUT = EXAMPLES[:14], EXAMPLES[14:]


def _chat_ids(model, dialog) -> np.ndarray:
    from llama32_jax.inputs.chat_format import chat_format_for

    return np.array([chat_format_for(model.tokenizer).encode_dialog(dialog[:1], add_generation_prompt=True)])


def _detached(trainer: Trainer) -> nnx.Module:
    """The trained model on its own variables (``trainer.model`` shares the trainer's: merging it would alter them)."""
    return nnx.merge(trainer.graphdef, trainer.trainable, trainer.frozen, copy=True)


def test_lora_on_smollm2_lowers_the_loss_and_merges_exactly(gguf_file, tmp_path):
    model = lj.load(gguf_file, dtype="float32", scan_layers=True)
    batches = iter(make_dataset(TRAIN, model.tokenizer, seq_len=64, batch_size=4, seed=0))
    steps = 24
    trainer = Trainer(model.module, TrainConfig(mode="lora", learning_rate=1e-3, warmup_steps=2, total_steps=steps))
    losses = [trainer.step(next(batches))["loss"] for _ in range(steps)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert np.all(np.isfinite(losses))
    assert last < 0.5 * first and last < first - 0.3, losses

    # Merged = unmerged up to fp32 rounding. The floor for this 30-layer model: perturbing every projection weight
    # by up to one fp32 ulp (relative 6e-8, as rounding W + BA does) moves its logits (|logit| up to ~40) by ~1e-4,
    # and the merge measures 1.7e-4 - 1.9e-4; hence 3e-4, and the greedy token at every position must agree.
    ids = _chat_ids(model, HELD_OUT[0])
    unmerged = np.asarray(lj.forward(_detached(trainer), ids)[0])
    merged = np.asarray(lj.forward(merge_lora(_detached(trainer)), ids)[0])
    np.testing.assert_allclose(merged, unmerged, atol=3e-4, rtol=0)
    np.testing.assert_array_equal(merged.argmax(-1), unmerged.argmax(-1))

    # A GGUF's tokenizer written for an HF export reads back the same (tokens, chat format, BOS/stop ids).
    from llama32_jax.inputs.chat_format import chat_format_for
    from llama32_jax.inputs.tokenizer import load_tokenizer

    write_tokenizer_files(model, tmp_path)
    back = load_tokenizer(tmp_path)
    text = "Colour: blue! <|im_end|> naïve"
    assert back.encode(text) == model.tokenizer.encode(text)
    assert (back.bos_id, back.eos_id, back.add_bos, back.stop_ids) == (
        model.tokenizer.bos_id,
        model.tokenizer.eos_id,
        model.tokenizer.add_bos,
        model.tokenizer.stop_ids,
    )
    dialog = HELD_OUT[1]
    assert chat_format_for(back).encode_dialog(dialog) == chat_format_for(model.tokenizer).encode_dialog(dialog)


# --------------------------------------------------------------------------------------------- the script

SCRIPT = [sys.executable, "-m", "experiments.finetune"]
ARGS = [
    "--model=tiny-text",
    "--steps=8",
    "--save_every=2",
    "--batch_size=4",
    "--seq_len=128",
    "--accum_steps=2",
    "--learning_rate=1e-2",
    "--warmup_steps=1",
    "--log_every=4",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: what a plain run gets
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TOKENIZERS_PARALLELISM="false")
    return env


def _start(ckpt_dir: Path, *extra: str) -> subprocess.Popen:
    with open(ckpt_dir.parent / f"{ckpt_dir.name}.out", "ab") as log:  # the child has its own copy of the fd
        return subprocess.Popen(
            [*SCRIPT, f"--ckpt_dir={ckpt_dir}", *extra], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )


def _output(ckpt_dir: Path) -> str:
    return (ckpt_dir.parent / f"{ckpt_dir.name}.out").read_text(errors="replace")[-4000:]


def _records(ckpt_dir: Path) -> list[dict]:
    path = ckpt_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def _losses(ckpt_dir: Path) -> dict[int, float]:
    """step -> loss; after a resume a step is logged again and its last line counts."""
    return {r["step"]: r["loss"] for r in _records(ckpt_dir) if "event" not in r}


def _wait_until(proc: subprocess.Popen, ckpt_dir: Path, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready(_records(ckpt_dir)):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it was interrupted:\n{_output(ckpt_dir)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the run:\n{_output(ckpt_dir)}")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, ckpt_dir: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not finish:\n{_output(ckpt_dir)}")


def _latest(ckpt_dir: Path) -> int:
    with TrainCheckpointer(ckpt_dir) as ckpt:
        return ckpt.latest_step()


def _checkpointed_and_logged(step: int):
    """Ready once checkpoint ``step`` is on disk and the step after it has been logged (killed mid-interval)."""

    def ready(records):
        saved = any(r.get("event") == "checkpoint" and r["step"] == step for r in records)
        return saved and any("event" not in r and r["step"] == step + 1 for r in records)

    return ready


def test_killed_and_terminated_runs_resume_exactly(tmp_path):
    """SIGKILL after the step-2 checkpoint (step 3 done, unsaved) and SIGTERM at the same point; both resumed with
    only ``--ckpt_dir`` give bit for bit the per-step losses and final state of an uninterrupted run."""
    full, killed, termed = tmp_path / "full", tmp_path / "killed", tmp_path / "termed"
    out = tmp_path / "export"
    procs = {
        full: _start(full, *ARGS, f"--output={out}"),
        killed: _start(killed, *ARGS, "--step_sleep=0.6"),
        termed: _start(termed, *ARGS, "--step_sleep=0.6"),
    }
    _wait_until(procs[killed], killed, _checkpointed_and_logged(2))
    procs[killed].send_signal(signal.SIGKILL)
    _wait_until(procs[termed], termed, _checkpointed_and_logged(2))
    procs[termed].send_signal(signal.SIGTERM)

    assert _finish(procs[killed], killed) == -signal.SIGKILL
    killed_at = max(_losses(killed))
    assert killed_at >= 3 and _latest(killed) < killed_at  # some work was lost
    assert _finish(procs[termed], termed) == 128 + signal.SIGTERM, _output(termed)
    events = [r for r in _records(termed) if r.get("event")]
    assert events[-1]["event"] == "interrupted"
    stopped_at = events[-1]["step"]
    assert stopped_at == max(_losses(termed)) and stopped_at >= 3
    assert _latest(termed) == stopped_at  # saved on SIGTERM, off the save interval

    resumed = {d: _start(d) for d in (killed, termed)}  # the directory alone
    for d, proc in [*resumed.items(), (full, procs[full])]:
        assert _finish(proc, d) == 0, _output(d)

    want = _losses(full)
    assert sorted(want) == list(range(1, 9))
    for d in (killed, termed):
        assert [r["event"] for r in _records(d) if r.get("event") == "resume"] == ["resume"]
        got = _losses(d)
        assert sorted(got) == sorted(want)
        np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])
    step, want_state = read_state(full)
    assert step == 8 and any(k.startswith("trainable/") for k in want_state)
    for d in (killed, termed):
        got_step, got_state = read_state(d)
        assert got_step == 8 and got_state.keys() == want_state.keys()
        for key, value in want_state.items():
            np.testing.assert_array_equal(got_state[key], value, err_msg=key)

    # --output: the merged model as an HF directory that lj.load reads, equal to base + adapters.
    trainer, ckpt, _, base = resume(full)
    ckpt.close()
    exported = lj.load(out, dtype="float32")
    assert json.loads((out / "finetune.json").read_text())["lora_merged"] is True
    ids = np.array([base.tokenizer.encode("Colour: blue!", bos=True)])
    np.testing.assert_allclose(
        exported.logits(ids), np.asarray(lj.forward(_detached(trainer), ids)[0]), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------------------------- the library

SHARDABLE = configs.TINY_TEXT.replace(
    name="tiny-text-shardable",
    text=dataclasses.replace(configs.TINY_TEXT.text, n_heads=16, n_kv_heads=8, head_dim=8, ffn_dim=128),
)


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SHARDABLE.text.vocab_size, (8, 17))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")
def test_sharded_trainer_restores_into_its_shardings(tmp_path):
    """A single-device checkpoint restored into an FSDP x TP trainer: arrays land in the plan's shardings with the
    saved values, and the next step equals the single-device one."""
    cfg = TrainConfig(mode="lora", learning_rate=1e-2, total_steps=6)
    run = RunSpec("tiny-text-shardable", cfg, data={"batches": "random"})
    single = Trainer(init_model(SHARDABLE, param_dtype=jnp.float32, seed=1), cfg)
    for seed in (0, 1):
        single.step(_batch(seed))
    with TrainCheckpointer(tmp_path, run, save_every=2) as ckpt:
        assert ckpt.save(single, {"position": 2})
        assert not ckpt.save(single, force=True)  # already saved
    saved = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(single.state())}
    want = single.step(_batch(2))

    model = sharding.shard_model(init_model(SHARDABLE, param_dtype=jnp.float32, seed=1), "fsdp_tp")
    placed = Trainer(model, cfg)
    layout = {
        jax.tree_util.keystr(p): v.sharding
        for p, v in jax.tree_util.tree_leaves_with_path(placed.state())
        if isinstance(v, jax.Array)
    }
    assert any(not s.is_fully_replicated for s in layout.values())
    with TrainCheckpointer(tmp_path, run) as ckpt:
        assert ckpt.restore(placed) == {"position": 2}
    assert placed.steps_done == 2
    for path, value in jax.tree_util.tree_leaves_with_path(placed.state()):
        key = jax.tree_util.keystr(path)
        if isinstance(value, jax.Array):  # the plan's layout (optimizer step counters: replicated over the mesh)
            if isinstance(layout[key], jax.sharding.NamedSharding):
                assert value.sharding == layout[key], key
            else:
                assert value.sharding.is_fully_replicated and len(value.sharding.device_set) == 8, key
        np.testing.assert_array_equal(np.asarray(value), saved[key], err_msg=key)
    got = placed.step(_batch(2))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_checkpoints_of_another_run_are_refused_by_name(tmp_path):
    cfg = TrainConfig(mode="lora", total_steps=4)
    run = RunSpec("tiny-text-shardable", cfg, data={"seq_len": 16})
    trainer = Trainer(init_model(SHARDABLE, param_dtype=jnp.float32), cfg)
    trainer.step(_batch(0))
    with TrainCheckpointer(tmp_path, run, save_every=1) as ckpt:
        assert ckpt.save(trainer)
    assert read_run(tmp_path) == run
    assert read_run(tmp_path / "nothing-here") is None
    with pytest.raises(CheckpointError, match="base_model: checkpoint 'tiny-text-shardable', this run 'other'"):
        TrainCheckpointer(tmp_path, dataclasses.replace(run, base_model="other"))
    with pytest.raises(CheckpointError, match=r"train_config\.lora_rank: checkpoint 8, this run 4"):
        TrainCheckpointer(tmp_path, dataclasses.replace(run, train_config=dataclasses.replace(cfg, lora_rank=4)))
    with pytest.raises(CheckpointError, match=r"data\.seq_len: checkpoint 16, this run 32"):
        TrainCheckpointer(tmp_path, dataclasses.replace(run, data={"seq_len": 32}))
    # The same run record but a trainer whose arrays differ (one layer fewer): the missing leaves are named.
    shallow = SHARDABLE.replace(text=dataclasses.replace(SHARDABLE.text, n_layers=1))
    other = Trainer(init_model(shallow, param_dtype=jnp.float32), cfg)
    with (
        TrainCheckpointer(tmp_path, run) as ckpt,
        pytest.raises(
            CheckpointError,
            match=r"\d+ array\(s\) in the checkpoint but not in the trainer, e\.g\. trainable/layers/1/",
        ),
    ):
        ckpt.restore(other)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        TrainCheckpointer(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- the notebook


def test_finetune_notebook_runs(tmp_path):
    require("nbclient")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook cleared"
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "step 6: loss" in outputs and "fine-tuned:" in outputs
