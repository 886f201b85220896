"""Shared by the conversion safety tests (``test_paths_and_safety.py``, ``test_failed_writes_and_bad_inputs.py``):
the convert CLI in a subprocess and its one-line refusal, "nothing left behind", and two fixtures: a tiny HF source
with a tokenizer (``hf_src``) and its converted checkpoint (``converted``). A test module using the fixtures also
imports ``hf_untied`` (tests/checkpoint/test_convert.py), which they build on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llama32_jax as lj

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return env


def convert_cli(*args: str, cwd: Path = ROOT, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``python -m llama32_jax.convert`` in a subprocess; ``fsize``: RLIMIT_FSIZE in bytes (SIGXFSZ ignored, so a
    write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    limit = ""
    if fsize is not None:
        limit = (
            "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
        )
    code = f"{limit}import runpy; runpy.run_module('llama32_jax.convert', run_name='__main__', alter_sys=True)"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-progress", *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )


def assert_refused(proc: subprocess.CompletedProcess, error: str, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert f"error: {error}: " in proc.stderr and match in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def byte_tokenizer_json(path: Path) -> None:
    from llama32_jax.training.base_models import byte_tokenizer

    byte_tokenizer().backend.save(str(path))


@pytest.fixture
def hf_src(tmp_path, hf_untied):
    """A copy of the tiny HF model with a tokenizer.json, in ``tmp_path / "src"``."""
    src = shutil.copytree(hf_untied[0], tmp_path / "src")
    byte_tokenizer_json(src / "tokenizer.json")
    return src


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_untied):
    root = tmp_path_factory.mktemp("converted")
    src = shutil.copytree(hf_untied[0], root / "src")
    return lj.convert(src, root / "ckpt", dtype="float32", progress=False)


def nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []
