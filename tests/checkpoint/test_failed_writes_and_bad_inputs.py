"""Failed writes, damaged checkpoints and bad inputs for conversion, export and loading.

A failed write (disk full, file too large, read-only ...) is a ``StorageError`` (CLI exit 2) that leaves nothing
behind; a damaged converted checkpoint is a short ``CheckpointError`` naming the file; bad command-line arguments
exit 2 naming the argument; a bad tokenizer file in the source is a ``TokenizerError`` before anything is written.
(Paths, overlap and what ``overwrite`` may replace: test_paths_and_safety.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import llama32_jax as lj
from llama32_jax.checkpoint import hf_export, pipeline
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.checkpoint.orbax_ckpt import MANIFEST, read_manifest, restore_params
from llama32_jax.convert import main as cli_main
from llama32_jax.errors import (
    CheckpointError,
    InvalidInputError,
    StorageError,
    TokenizerError,
)
from tests.checkpoint.convert_paths import assert_refused, convert_cli, converted, hf_src, nothing_left  # noqa: F401  (fixtures)
from tests.checkpoint.test_convert import hf_untied  # noqa: F401  (a fixture)
from tests.checkpoint.test_meta_dir import PARAMS, _write

# --------------------------------------------------------------------------------------------------------------
# Disk full and other failed writes: StorageError, exit 2, nothing left behind


def test_file_size_limit_during_convert_and_export(tmp_path, hf_src, converted):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse writes past 64 KB with EFBIG."""
    proc = convert_cli("--source", str(hf_src), "--output", str(tmp_path / "out"), fsize=64 * 1024)
    assert_refused(proc, "StorageError", "File too large")
    assert f"{tmp_path}" in proc.stderr and len(proc.stderr) < 1500
    nothing_left(tmp_path, "out")
    proc = convert_cli("--source", str(converted), "--output", str(tmp_path / "hf"), "--to", "hf", fsize=64 * 1024)
    assert_refused(proc, "StorageError", "[Errno 27] File too large")
    nothing_left(tmp_path, "hf")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_os_errors_while_writing_become_storage_errors(tmp_path, monkeypatch, hf_src, converted, code):
    def failing(path, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pipeline, "write_manifest", failing)  # after the arrays and tokenizer were written
    with pytest.raises(StorageError, match=rf"out'.*\[Errno {code}\] {os.strerror(code)}") as info:
        lj.convert(hf_src, tmp_path / "out", progress=False)
    assert info.value.errno == code
    nothing_left(tmp_path, "out")
    monkeypatch.setattr(hf_export, "write_safetensors", failing)
    with pytest.raises(StorageError, match=rf"hf'.*\[Errno {code}\]"):
        export_hf(lj.load(converted), tmp_path / "hf")
    nothing_left(tmp_path, "hf")


def test_disk_full_in_cli_is_exit_2(tmp_path, monkeypatch, capsys, hf_src):
    real_copy = shutil.copy2

    def copy_fails(src, dst, *a, **kw):
        if Path(src).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copy2", copy_fails)
    assert cli_main(["--source", str(hf_src), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: StorageError: ") and "No space left on device" in err
    nothing_left(tmp_path, "out")


# --------------------------------------------------------------------------------------------------------------
# Damaged converted checkpoints


def _damaged(tmp_path: Path, converted: Path, how: str) -> Path:
    ckpt = shutil.copytree(converted, tmp_path / "ckpt")
    files = sorted((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest = files[-1]
    if how == "truncated":
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    elif how == "deleted":
        biggest.unlink()
    elif how == "manifest":
        (ckpt / MANIFEST).write_text('{"format": "llama32_jax-orbax", "vers')
    elif how == "no-params":
        shutil.rmtree(ckpt / "params")
    return ckpt


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncated", r"is damaged: its parameter file 'params/.*' has \d+ bytes, expected \d+ \(truncated"),
        ("deleted", r"is damaged: its parameter file 'params/.*' is missing"),
        ("manifest", r"cannot read the manifest '.*llama32_jax\.json' \(damaged\?\)"),
        ("no-params", r"has no params/ directory"),
    ],
)
def test_damaged_checkpoint_is_a_short_checkpoint_error(tmp_path, converted, how, match):
    ckpt = _damaged(tmp_path, converted, how)
    for call in (restore_params, lj.load):
        with pytest.raises(CheckpointError, match=match) as info:
            call(ckpt)
        assert str(ckpt) in str(info.value) and len(str(info.value)) < 600


def test_damage_found_by_orbax_is_short_and_names_the_parameter(tmp_path, converted):
    """A checkpoint whose manifest lists no file sizes (or damage the sizes cannot see): Orbax's error, cut short."""
    ckpt = _damaged(tmp_path, converted, "truncated")
    record = json.loads((ckpt / MANIFEST).read_text())
    del record["files"]
    (ckpt / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"cannot read parameter '[\w.]+' from params/ \(truncated") as info:
        lj.load(ckpt)
    assert str(ckpt) in str(info.value) and len(str(info.value)) < 800
    assert "TensorStore" not in str(info.value) and "'driver'" not in str(info.value)


def test_manifest_fields_are_checked(tmp_path, converted):
    ckpt = shutil.copytree(converted, tmp_path / "ckpt")
    good = json.loads((ckpt / MANIFEST).read_text())
    for field, value, match in [
        ("dtype", "int4", "dtype must be one of"),
        ("params", "../../etc", "'params' must name a sub-directory"),
        ("files", ["x"], "'files' must map file names to sizes"),
        ("config", {"text": 3}, "its config is invalid"),
    ]:
        (ckpt / MANIFEST).write_text(json.dumps({**good, field: value}))
        with pytest.raises(CheckpointError, match=match):
            read_manifest(ckpt)


# --------------------------------------------------------------------------------------------------------------
# Command-line arguments


@pytest.mark.parametrize(
    "args, match",
    [
        (["--flush-mb", "inf"], "argument --flush-mb: must be a finite number of MB > 0, got 'inf'"),
        (["--flush-mb", "nan"], "argument --flush-mb: must be a finite number of MB > 0"),
        (["--flush-mb", "0"], "argument --flush-mb: must be a finite number of MB > 0, got '0'"),
        (["--flush-mb", "-5"], "argument --flush-mb: must be a finite number of MB > 0"),
        (["--flush-mb", "lots"], "argument --flush-mb: must be a number of MB, got 'lots'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--to", "zip"], "argument --to: invalid choice: 'zip'"),
    ],
)
def test_bad_cli_arguments_exit_2(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as info:
        cli_main(["--source", str(tmp_path), "--output", str(tmp_path / "o"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_required_cli_arguments_exit_2(capsys):
    for argv in (["--output", "o"], ["--source", "s"]):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        assert "the following arguments are required" in capsys.readouterr().err


def test_orbax_only_flags_with_to_hf_exit_2(tmp_path, capsys, converted):
    code = cli_main(["--source", str(converted), "--output", str(tmp_path / "o"), "--to", "hf", "--flush-mb", "8"])
    assert code == 2 and "--flush-mb/--compress apply to conversion to orbax" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_flush_bytes_is_validated(tmp_path, hf_src):
    for bad in (float("inf"), float("nan"), -1, "256", True):
        with pytest.raises(InvalidInputError, match="flush_bytes must be"):
            lj.convert(hf_src, tmp_path / "o", flush_bytes=bad, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InvalidInputError, match="overwrite must be True or False"):
        lj.convert(hf_src, tmp_path / "o", overwrite="yes", progress=False)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer files are checked before they are copied


def test_corrupt_tokenizer_json_is_refused_before_writing(tmp_path, hf_src):
    (hf_src / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"src/tokenizer\.json"):
        lj.convert(hf_src, tmp_path / "out", progress=False)
    nothing_left(tmp_path, "out")
    proc = convert_cli("--source", str(hf_src), "--output", str(tmp_path / "out"))
    assert_refused(proc, "TokenizerError", "tokenizer.json")
    nothing_left(tmp_path, "out")


def test_bad_tokenizer_config_and_meta_tokenizer_model_are_refused(tmp_path, hf_src):
    (hf_src / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json must hold a JSON object"):
        lj.convert(hf_src, tmp_path / "out", progress=False)
    from tests.refs import meta_transformer

    meta = tmp_path / "meta"

    ref = meta_transformer(PARAMS, max_seq_len=16, max_batch_size=1, seed=6)
    _write(meta, {k: v.detach().clone() for k, v in ref.state_dict().items()}, 1)
    (meta / "tokenizer.model").write_text("this is not base64 rank\n")
    with pytest.raises(TokenizerError, match=r"meta/tokenizer\.model"):
        lj.convert(meta, tmp_path / "out", progress=False)
    nothing_left(tmp_path, "out")


def test_unreadable_tokenizer_is_a_tokenizer_error(tmp_path, monkeypatch, hf_src):
    import llama32_jax.inputs.tokenizer as tok_module

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(path) / "tokenizer.json"))

    monkeypatch.setattr(tok_module, "load_tokenizer", unreadable)
    with pytest.raises(TokenizerError, match=r"cannot load the source's tokenizer '.*tokenizer\.json'.*Permission"):
        lj.convert(hf_src, tmp_path / "out", progress=False)
    nothing_left(tmp_path, "out")
