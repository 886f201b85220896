"""Path arguments and output safety for conversion, export, loading and fine-tuning runs.

Every path argument takes relative paths, ``~`` and symlinks; an output never overlaps its source (real paths
compared, so ``..`` and symlinks are seen through); ``overwrite`` replaces only an empty directory or a complete
earlier output of ours; a path of the wrong kind, missing or unreadable is a typed error naming it. (Failed
writes, damaged checkpoints, bad CLI arguments and tokenizer files: test_failed_writes_and_bad_inputs.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama32_jax as lj
from llama32_jax.checkpoint import orbax_ckpt, pipeline, safety
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.checkpoint.orbax_ckpt import MANIFEST, read_manifest, restore_params
from llama32_jax.checkpoint.safety import EXPORT_MARKER
from llama32_jax.errors import (
    CheckpointError,
    InvalidInputError,
    StorageError,
    UnsafePathError,
)
from tests.checkpoint.convert_paths import assert_refused, convert_cli, converted, hf_src  # noqa: F401  (fixtures)
from tests.checkpoint.test_convert import TOL, _leftovers, hf_untied  # noqa: F401  (hf_untied: a fixture)
from tests.checkpoint.test_meta_dir import PARAMS, _write


def _logits(path, tokens) -> np.ndarray:
    return np.asarray(lj.load(path, dtype="float32").logits(tokens))


# --------------------------------------------------------------------------------------------------------------
# Relative paths, ~ and symlinks


def test_relative_paths_everywhere(tmp_path, monkeypatch, hf_src, hf_untied):
    _, _, tokens, expected = hf_untied
    monkeypatch.chdir(tmp_path)
    out = lj.convert("src", "ckpt/tiny", dtype="float32", progress=False)
    assert out == tmp_path / "ckpt" / "tiny"
    record, _ = read_manifest("ckpt/tiny")
    assert record["source"]["path"] == str(hf_src)
    assert restore_params("ckpt/tiny")[0].text.vocab_size == 512
    np.testing.assert_allclose(_logits("ckpt/tiny", tokens), expected, atol=TOL, rtol=0)  # the issue's failure
    model = lj.load("./ckpt/../ckpt/tiny", dtype="float32")
    assert model.tokenizer is not None
    assert export_hf(model, "hf", dtype="float32") == tmp_path / "hf"
    np.testing.assert_allclose(_logits("hf", tokens), expected, atol=TOL, rtol=0)
    # The CLI, run from tmp_path with relative --source / --output: to Orbax, then the converted one to HF.
    assert convert_cli("--source", "src", "--output", "cli/orbax", "--dtype", "float32", cwd=tmp_path).returncode == 0
    proc = convert_cli("--source", "cli/orbax", "--output", "cli/hf", "--to", "hf", "--dtype", "float32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli/hf" / EXPORT_MARKER).is_file()
    np.testing.assert_allclose(_logits(tmp_path / "cli/hf", tokens), expected, atol=TOL, rtol=0)


def test_relative_meta_directory(tmp_path, monkeypatch):
    from tests.refs import meta_transformer

    ref = meta_transformer(PARAMS, max_seq_len=16, max_batch_size=1, seed=5)
    _write(tmp_path / "meta" / "original", {k: v.detach().clone() for k, v in ref.state_dict().items()}, 2)
    monkeypatch.chdir(tmp_path / "meta")
    out = lj.convert("original", "../ckpt", progress=False)
    assert out == tmp_path / "ckpt" and (out / "tokenizer.model").is_file()
    assert lj.load("../ckpt").config.name == "original"


def test_tilde_paths(tmp_path, monkeypatch, hf_src, hf_untied):
    _, _, tokens, expected = hf_untied
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.move(hf_src, home / "src")
    out = lj.convert("~/src", "~/ckpt", dtype="float32", progress=False)
    assert out == home / "ckpt"
    assert read_manifest("~/ckpt")[1].text.n_layers == 2
    restore_params("~/ckpt")
    model = lj.load("~/ckpt", dtype="float32")
    np.testing.assert_allclose(np.asarray(model.logits(tokens)), expected, atol=TOL, rtol=0)
    assert export_hf(model, "~/hf") == home / "hf"
    assert pipeline.detect_format("~/hf") == "hf"


def test_symlinked_source_and_output(tmp_path, hf_src, hf_untied):
    _, _, tokens, expected = hf_untied
    (tmp_path / "link-src").symlink_to(hf_src)
    (tmp_path / "disk").mkdir()
    (tmp_path / "out-dir").symlink_to(tmp_path / "disk")  # the output's parent is a symlink
    out = lj.convert(tmp_path / "link-src", tmp_path / "out-dir" / "ckpt", dtype="float32", progress=False)
    assert out == tmp_path / "disk" / "ckpt" and out.is_dir()
    assert read_manifest(out)[1].name == "link-src"  # the name the user gave, not the link target's
    (tmp_path / "ckpt-link").symlink_to(out)
    np.testing.assert_allclose(_logits(tmp_path / "ckpt-link", tokens), expected, atol=TOL, rtol=0)
    # An HF directory whose files are symlinks (the Hugging Face cache layout) converts too.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), snap.mkdir()
    for f in hf_src.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    out2 = lj.convert(snap, tmp_path / "from-cache", dtype="float32", progress=False)
    assert not (out2 / "tokenizer.json").is_symlink()
    np.testing.assert_allclose(_logits(out2, tokens), expected, atol=TOL, rtol=0)


def test_relative_gguf_file(tmp_path, monkeypatch):
    from tests.checkpoint.test_gguf import _tiny

    (tmp_path / "models").mkdir()
    _tiny(tmp_path / "models")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "models" / "tiny.gguf")
    monkeypatch.chdir(tmp_path / "models")
    tokens = np.array([[1, 5, 9, 260]])
    expected = _logits("tiny.gguf", tokens)
    np.testing.assert_array_equal(_logits("../link.gguf", tokens), expected)
    with pytest.raises(CheckpointError, match="GGUF files are loaded directly"):
        lj.convert("tiny.gguf", "out", progress=False)
    proc = convert_cli("--source", "tiny.gguf", "--output", "../hf", "--to", "hf", "--dtype", "float32", cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr
    hf = tmp_path / "hf"
    assert (hf / "tokenizer.json").is_file() and (hf / EXPORT_MARKER).is_file()  # the GGUF's tokenizer, written
    np.testing.assert_allclose(_logits(hf, tokens), expected, atol=1e-5, rtol=0)
    proc = convert_cli("--source", "tiny.gguf", "--output", "tiny.gguf", "--to", "hf", "--overwrite", cwd=Path.cwd())
    assert_refused(proc, "UnsafePathError", "is the source")
    assert (tmp_path / "models" / "tiny.gguf").is_file()


# --------------------------------------------------------------------------------------------------------------
# Overlap between source and output, and what overwrite may replace


def test_the_issues_data_loss_scenario_is_refused(tmp_path, converted):
    parent = tmp_path / "P"
    parent.mkdir()
    shutil.copytree(converted, parent / "ok")
    (parent / "unrelated.txt").write_text("keep me")
    proc = convert_cli("--source", str(parent / "ok"), "--output", str(parent), "--to", "hf", "--overwrite")
    assert_refused(proc, "UnsafePathError", "contains the source")
    assert (parent / "unrelated.txt").read_text() == "keep me"
    assert (parent / "ok" / MANIFEST).is_file() and sorted(p.name for p in parent.iterdir()) == ["ok", "unrelated.txt"]
    restore_params(parent / "ok")  # intact


@pytest.mark.parametrize(
    "output, match",
    [
        ("src", "is the source"),
        ("src/../src", "is the source"),
        ("link", "is the source"),
        ("src/sub/out", "lies inside the source"),
        ("link/out", "lies inside the source"),
        ("elsewhere/../src/out", "lies inside the source"),
        (".", "contains the source"),
        ("uplink", "contains the source"),
    ],
)
def test_overlap_is_refused_either_way(tmp_path, monkeypatch, converted, output, match):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(converted, "src")
    Path("link").symlink_to(tmp_path / "src")
    Path("uplink").symlink_to(tmp_path)
    Path("elsewhere").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    model = lj.load("src", dtype="float32")
    for overwrite in (False, True):
        with pytest.raises(UnsafePathError, match=match):
            export_hf(model, output, overwrite=overwrite)
        with pytest.raises(UnsafePathError, match=match):
            pipeline.check_output(output, overwrite=overwrite, source="link")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_convert_overlap_through_dotdot_and_symlink(tmp_path, hf_src):
    (tmp_path / "link").symlink_to(hf_src)
    before = sorted(p.name for p in hf_src.iterdir())
    for output, match in [
        (hf_src / ".." / "src", "is the source"),
        (tmp_path / "link" / "out", "lies inside the source"),
        (tmp_path, "contains the source"),
    ]:
        with pytest.raises(UnsafePathError, match=match):
            lj.convert(tmp_path / "link", output, overwrite=True, progress=False)
    assert sorted(p.name for p in hf_src.iterdir()) == before


def test_overwrite_replaces_only_our_complete_outputs(tmp_path, monkeypatch, hf_src, converted):
    model = lj.load(converted, dtype="float32")
    # Ours: an earlier HF export (marker), a converted checkpoint (manifest), an empty directory.
    first = export_hf(model, tmp_path / "hf")
    assert json.loads((first / EXPORT_MARKER).read_text())["files"] == sorted(
        p.name for p in first.iterdir() if p.name != EXPORT_MARKER
    )
    export_hf(model, tmp_path / "hf", overwrite=True, dtype="float32")
    assert json.loads((first / EXPORT_MARKER).read_text())["dtype"] == "float32"
    ours = lj.convert(hf_src, tmp_path / "orbax", progress=False)
    export_hf(model, ours, overwrite=True)  # a converted checkpoint may become an HF export
    assert not (ours / MANIFEST).exists() and (ours / EXPORT_MARKER).is_file()
    (tmp_path / "empty").mkdir()
    lj.convert(hf_src, tmp_path / "empty", overwrite=True, progress=False)
    # Not ours: each refused with overwrite, nothing deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"data")
    extra = shutil.copytree(tmp_path / "empty", tmp_path / "ours-plus")
    (extra / "my-notes.txt").write_text("mine")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text("{not json")
    (fake / "params").mkdir()
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    cases = [
        (foreign, "it is not an output of llama32_jax"),
        (a_file, "exists and is a file"),
        (extra, r"files that are not part of a llama32_jax output: \['my-notes.txt'\]"),
        (fake, "not a readable llama32_jax manifest"),
        ("~", "your home directory"),
        (tmp_path / "users", "a directory above your home directory"),
        ("/", "file system root"),
    ]
    for output, match in cases:
        with pytest.raises(UnsafePathError, match=match):
            lj.convert(hf_src, output, overwrite=True, progress=False)
        with pytest.raises(UnsafePathError, match=match):
            export_hf(model, output, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine" and a_file.read_bytes() == b"data"
    assert (extra / "my-notes.txt").is_file() and (extra / MANIFEST).is_file() and (fake / MANIFEST).is_file()
    proc = convert_cli("--source", str(hf_src), "--output", str(foreign), "--overwrite")
    assert_refused(proc, "UnsafePathError", "not an output of llama32_jax")
    assert _leftovers(tmp_path) == []


def test_output_that_became_foreign_while_writing_is_not_replaced(tmp_path, hf_src, monkeypatch):
    out = lj.convert(hf_src, tmp_path / "out", progress=False)
    real_close = orbax_ckpt.ParamWriter.close

    def close_and_meddle(self):
        real_close(self)
        (out / "arrived-meanwhile.txt").write_text("mine")

    monkeypatch.setattr(orbax_ckpt.ParamWriter, "close", close_and_meddle)
    with pytest.raises(UnsafePathError, match="changed while writing"):
        lj.convert(hf_src, out, overwrite=True, progress=False)
    assert (out / "arrived-meanwhile.txt").is_file() and (out / MANIFEST).is_file()
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# Wrong kinds of path, missing and unreadable paths


def test_wrong_kind_missing_and_unreadable_paths(tmp_path, monkeypatch, hf_src, converted):
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    with pytest.raises(CheckpointError, match=r"file\.json' is a file; expected a checkpoint directory"):
        lj.convert(a_file, tmp_path / "o", progress=False)
    with pytest.raises(CheckpointError, match=r"missing' does not exist"):
        lj.convert(tmp_path / "missing", tmp_path / "o", progress=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="dangling symlink"):
        lj.convert(tmp_path / "dangling", tmp_path / "o", progress=False)
    with pytest.raises(UnsafePathError, match=r"file\.json' is a file, not a directory"):
        lj.convert(hf_src, a_file / "sub" / "o", progress=False)
    with pytest.raises(InvalidInputError, match="source is an empty path"):
        lj.convert("", tmp_path / "o", progress=False)
    with pytest.raises(InvalidInputError, match="output must be a path"):
        lj.convert(hf_src, 3, progress=False)
    with pytest.raises(CheckpointError, match=r"file\.json' is a file; a converted checkpoint is a directory"):
        read_manifest(a_file)
    with pytest.raises(CheckpointError, match=r"nothing' does not exist"):
        restore_params(tmp_path / "nothing")
    with pytest.raises(InvalidInputError, match="tokenizer_dir .* is not a directory"):
        export_hf(lj.load(converted), tmp_path / "x", tokenizer_dir=a_file)
    # Permissions (we may run as root, where chmod does not bite: os.access stands in for the kernel's answer).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != hf_src and real_access(p, mode, **kw))
    with pytest.raises(CheckpointError, match=r"src' is not readable \(permission denied\)"):
        lj.convert(hf_src, tmp_path / "o", progress=False)
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "locked")
    with pytest.raises(StorageError, match=r"locked' is not writable \(permission denied") as info:
        lj.convert(converted.parent / "src", tmp_path / "locked" / "o", progress=False)
    assert info.value.errno == errno.EACCES
    assert not (tmp_path / "o").exists() and not (tmp_path / "locked" / "o").exists()


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning runs: checkpoint directories and exports


def test_train_checkpoints_take_relative_and_tilde_paths(tmp_path, monkeypatch):
    from llama32_jax.training.base_models import export_model, load_base_model
    from llama32_jax.training.state import RunSpec, TrainCheckpointer, read_run, read_state
    from llama32_jax.training.train import TrainConfig, Trainer

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    model = load_base_model("tiny-text")
    cfg = TrainConfig(mode="lora", total_steps=2)
    run = RunSpec("tiny-text", cfg)
    trainer = Trainer(model.module, cfg)
    with TrainCheckpointer("runs/ft", run, save_every=1) as ckpt:
        assert ckpt.directory == tmp_path / "runs" / "ft"
        assert ckpt.save(trainer, force=True)
    assert read_run("runs/ft") == run
    shutil.move(tmp_path / "runs", home / "runs")
    assert read_run("~/runs/ft") == run and read_state("~/runs/ft")[0] == 0
    with TrainCheckpointer("~/runs/ft") as ckpt:
        assert ckpt.latest_step() == 0
    # A file, or a missing directory to resume from: typed errors naming it, and nothing is created.
    Path("a-file").write_text("x")
    with pytest.raises(CheckpointError, match=r"a-file' is a file"):
        TrainCheckpointer("a-file", run)
    with pytest.raises(CheckpointError, match=r"nope' holds no checkpoint to resume from"):
        TrainCheckpointer("nope")
    assert not Path("nope").exists()
    # A full disk while saving a step.
    with TrainCheckpointer("runs2", run, save_every=1) as ckpt:
        import orbax.checkpoint as ocp

        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
        with pytest.raises(StorageError, match=r"saving step 0 under '.*runs2' failed: \[Errno 28\]"):
            ckpt.save(trainer, force=True)
    # The export: relative output, then an existing foreign directory is refused.
    out = export_model(trainer, model, "ft-hf", dtype="float32")
    assert out == tmp_path / "ft-hf" and (out / EXPORT_MARKER).is_file() and (out / "finetune.json").is_file()
    assert lj.load("ft-hf").tokenizer is not None
    export_model(trainer, model, "ft-hf", overwrite=True)
    Path("foreign").mkdir()
    Path("foreign/x").write_text("mine")
    with pytest.raises(UnsafePathError, match="not an output of llama32_jax"):
        export_model(trainer, model, "foreign", overwrite=True)
    assert Path("foreign/x").is_file()
    assert safety.real_path("~") == home
