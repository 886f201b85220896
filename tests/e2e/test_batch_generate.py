"""``batch_generate`` end to end on tiny random models with a real (tiny, trained) byte-level BPE tokenizer.

The model is written as an HF directory and loaded from there, so that the command line
(``experiments/batch_generate.py``, in a subprocess) and this process run the same model. The reference for every
row is ``Model.generate`` / ``Model.chat`` on that row alone (one prompt, no batching): the batch run, with fewer
slots than rows, must give the same text, token counts and stop reason. A command-line run killed with SIGKILL in
the middle and resumed must write a file byte-identical to an uninterrupted run's. Prompts stay under 16 tokens and
outputs under 8, so the references share one compiled program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grain.python as grain
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llama32_jax.api import Model, load
from llama32_jax.batch import batch_generate
from llama32_jax.batch import run as batch_run
from llama32_jax.batch.journal import journal_path
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.configs import TINY_TEXT, TINY_VISION
from llama32_jax.errors import InvalidInputError, UnsafePathError
from llama32_jax.inputs.tokenizer import HFTokenizer
from llama32_jax.models.build import init_model
from tests.unit.test_api_inputs import LLAMA3_SPECIALS, _bpe

ROOT = Path(__file__).resolve().parents[2]
NEW = 6
ROWS = [
    "Hello there, how are",
    {"prompt": "The user asks", "id": "a", "max_new_tokens": 3},
    {"messages": [{"role": "user", "content": "how are you today?"}], "id": 2},
    {"prompt": "the assistant answers", "temperature": 0.9, "seed": 5, "top_k": 20},
    "you today",
    {"prompt": "Hello", "id": "last", "max_new_tokens": 8},
]
# The command line, SIGKILLed by its own journal once KILL_AFTER rows are written.
KILL_AFTER = 3
KILLED_CLI = f"""
import os, signal, sys
from llama32_jax.batch import journal
append, done = journal.Journal.append, []

def killing_append(self, row):
    append(self, row)
    done.append(row)
    if len(done) == {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)

journal.Journal.append = killing_append
from experiments import batch_generate, cli
cli.run(batch_generate.main)
"""


def _tokenizer(backend) -> HFTokenizer:
    ids = {t: backend.token_to_id(t) for t in LLAMA3_SPECIALS}
    return HFTokenizer(backend, bos_id=ids["<|begin_of_text|>"], eos_id=ids["<|eot_id|>"], name="tiny")


@pytest.fixture(scope="module")
def backend():
    return _bpe(LLAMA3_SPECIALS)


@pytest.fixture(scope="module")
def checkpoint(backend, tmp_path_factory) -> Path:
    model = Model(init_model(TINY_TEXT, param_dtype=jnp.float32, seed=1), _tokenizer(backend))
    return export_hf(model, tmp_path_factory.mktemp("tiny") / "hf", dtype="float32")


@pytest.fixture(scope="module")
def model(checkpoint) -> Model:
    return load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def stop(model) -> int:
    """A stop id the random model does emit: row 0's third greedy token, so some rows stop early."""
    return model.generate([ROWS[0]], max_new_tokens=NEW, stop_ids=[], return_details=True)[0].tokens[2]


def _alone(model, row, stop: int, **defaults):
    """The reference: the row generated on its own."""
    row = {"prompt": row} if isinstance(row, str) else row
    kw = {"max_new_tokens": NEW, "stop_ids": [stop], **defaults}
    kw.update({k: v for k, v in row.items() if k not in ("prompt", "messages", "id", "images")})
    if "messages" in row:
        return model.chat(row["messages"], return_details=True, **kw)[0]
    images = [row["images"]] if "images" in row else None
    return model.generate([row["prompt"]], return_details=True, images=images, **kw)[0]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(model, stop, tmp_path_factory):
    """One uninterrupted run of ROWS from a JSONL file: (its output file, the rows it returned)."""
    tmp = tmp_path_factory.mktemp("batch")
    out = tmp / "out.jsonl"
    rows = batch_generate(
        model, _write_jsonl(tmp / "in.jsonl", ROWS), out, max_new_tokens=NEW, stop_ids=[stop], slots=2, progress=False
    )
    return out, rows


def test_rows_equal_each_row_generated_alone(model, stop, uninterrupted):
    out, rows = uninterrupted
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    assert not os.path.exists(journal_path(str(out)))
    assert [r["index"] for r in rows] == list(range(len(ROWS)))
    assert [r["id"] for r in rows] == [None, "a", 2, None, None, "last"]
    for row, got in zip(ROWS, rows, strict=True):
        ref = _alone(model, row, stop)
        assert got["status"] == "ok" and got["error"] is None
        assert (got["text"], got["prompt_tokens"], got["output_tokens"], got["stop_reason"]) == (
            ref.text,
            ref.prompt_tokens,
            len(ref.tokens),
            ref.stop_reason,
        ), row
    assert {r["stop_reason"] for r in rows} == {"stop", "length"}


def test_a_grain_source_gives_the_same_rows(model, stop, uninterrupted):
    _, expected = uninterrupted
    source = grain.MapDataset.source(ROWS[:3])
    rows = batch_generate(model, source, max_new_tokens=NEW, stop_ids=[stop], slots=2, progress=False)
    assert rows == expected[:3]


def test_bad_rows_stop_the_run_or_fail_alone(model, stop, uninterrupted, tmp_path):
    _, expected = uninterrupted
    lines = [json.dumps(ROWS[0]), "{oops", json.dumps({"prompt": "x", "colour": 1}), json.dumps(ROWS[1])]
    lines += [json.dumps({"prompt": "x", "messages": []}), json.dumps({"prompt": "x", "max_new_tokens": -1})]
    lines += [json.dumps({"messages": [{"role": "wizard", "content": "hi"}], "id": "w"})]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(InvalidInputError) as e:
        batch_generate(model, src, out, max_new_tokens=NEW, stop_ids=[stop], progress=False)
    message = str(e.value)
    assert message.startswith(f"5 bad row(s) in {src}: line 2: invalid JSON")
    for part in ["line 3: unknown key(s) ['colour']", "line 5: a row needs exactly one of", "line 6: max_new_tokens",
                 "line 7: ", "bad_rows='fail'"]:  # fmt: skip
        assert part in message, part
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing written
    rows = batch_generate(model, src, out, max_new_tokens=NEW, stop_ids=[stop], bad_rows="fail", progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok", "failed", "failed", "failed"]
    assert rows[0]["text"] == expected[0]["text"] and rows[3]["text"] == expected[1]["text"]
    assert rows[1]["error"].startswith("line 2: invalid JSON") and rows[1]["prompt_tokens"] == 0
    assert rows[6]["id"] == "w" and "line 7: " in rows[6]["error"] and "wizard" in rows[6]["error"]
    assert all(r["text"] is None and r["stop_reason"] is None for r in rows if r["status"] == "failed")
    for kwargs, match in [
        (dict(bad_rows="skip"), r"bad_rows must be one of \('error', 'fail'\), got 'skip'"),
        (dict(temperature=-1.0), r"temperature must be a finite number >= 0"),
        (dict(slots=0), r"slots must be None or an int >= 1, got 0"),
        (dict(chat_options={"bogus": 1}), r"unknown chat option\(s\) \['bogus'\]"),
        (dict(resume="yes"), r"resume must be True or False"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            batch_generate(model, src, **kwargs)
    with pytest.raises(InvalidInputError, match=r"model must be an llama32_jax Model .* got Transformer"):
        batch_generate(model.module, src)


def test_a_row_longer_than_the_cache_fails_alone(model, stop):
    long_prompt = " ".join(["Hello there"] * 20)
    rows = batch_generate(
        model, [ROWS[0], long_prompt, ROWS[4]], max_new_tokens=NEW, stop_ids=[stop], slots=2, max_len=28, progress=False
    )
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["error"].startswith("row 1: ") and "max_len=28" in rows[1]["error"], rows[1]["error"]
    assert rows[1]["prompt_tokens"] > 28
    assert rows[2]["text"] == _alone(model, ROWS[4], stop).text


def _cli(*args: str, script: str | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if cache is not None:  # the second run reuses the first one's compiled programs
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    command = ["-c", script] if script else ["-m", "experiments.batch_generate"]
    return subprocess.run(
        [sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_killed_command_line_run_resumes_to_the_same_bytes(model, checkpoint, tmp_path, monkeypatch):
    src, out = _write_jsonl(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    expected = tmp_path / "expected.jsonl"
    batch_generate(model, src, expected, max_new_tokens=NEW, slots=2, progress=False)
    flags = [f"--checkpoint={checkpoint}", f"--input={src}", f"--output={out}", f"--max_new_tokens={NEW}", "--slots=2"]
    proc = _cli(*flags, script=KILLED_CLI, cache=tmp_path / "jax-cache")
    assert proc.returncode == -9, proc.stderr[-3000:]
    journal = Path(journal_path(str(out)))
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + KILL_AFTER  # header + finished rows
    with open(journal, "a", encoding="utf-8") as f:
        f.write('{"index": 5, "id": "la')  # as if killed in the middle of a write

    with pytest.raises(UnsafePathError, match=r"settings changed \(max_new_tokens: 6 then, 7 now\)"):
        batch_generate(model, src, out, max_new_tokens=NEW + 1, progress=False)
    with pytest.raises(UnsafePathError, match=r"the inputs differ"):
        batch_generate(model, ROWS[:-1], out, max_new_tokens=NEW, progress=False)

    ran = []
    engine_class = batch_run.Engine

    class CountingEngine(engine_class):
        def run(self, requests, **kw):
            ran.append(len(requests))
            return super().run(requests, **kw)

    monkeypatch.setattr(batch_run, "Engine", CountingEngine)
    batch_generate(model, src, out, max_new_tokens=NEW, slots=2, progress=False)
    assert ran == [len(ROWS) - KILL_AFTER]  # only the unfinished rows ran
    assert out.read_bytes() == expected.read_bytes()
    assert not journal.exists()
    with pytest.raises(UnsafePathError, match=r"already exists \(a finished run\); pass overwrite=True"):
        batch_generate(model, src, out, max_new_tokens=NEW, progress=False)

    out.unlink()
    proc = _cli(*flags, cache=tmp_path / "jax-cache")  # the command line, uninterrupted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(ROWS)} rows ({len(ROWS)} ok, 0 failed)" in proc.stderr
    assert out.read_bytes() == expected.read_bytes()
    for args, match in [
        (flags, "error: UnsafePathError: output"),  # exists; refused before the model loads
        ((f"--input={src}", f"--output={out}", "--bad_rows=skip"), "error: InvalidInputError: --bad_rows must be"),
    ]:
        proc = _cli(*args)
        assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_an_unreadable_image_fails_only_its_row(backend, tmp_path):
    vision = Model(init_model(TINY_VISION, param_dtype=jnp.float32, seed=2), _tokenizer(backend))
    size = TINY_VISION.vision.image_size
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, 2 * size, 3), np.uint8)).save(good)
    (tmp_path / "corrupt.png").write_bytes(good.read_bytes()[:60])  # a PNG header and a few bytes
    rows = [
        {"prompt": "<|image|>Hello there", "images": ["good.png"]},  # relative to the JSONL file's directory
        {"prompt": "<|image|>how are", "images": ["missing.png"]},
        {"prompt": "<|image|>you today", "images": ["corrupt.png"]},
    ]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    rows = batch_generate(vision, src, max_new_tokens=NEW, stop_ids=[], progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[1]["error"].startswith("line 2") and str(tmp_path / "missing.png") in rows[1]["error"]
    assert "no such file" in rows[1]["error"]
    assert rows[2]["error"].startswith("line 3") and str(tmp_path / "corrupt.png") in rows[2]["error"]
    assert rows[0]["output_tokens"] == NEW and rows[0]["error"] is None
