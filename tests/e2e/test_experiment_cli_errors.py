"""The experiment scripts answer a bad flag value with one typed line and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *flags], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("module", "flag"),
    [("demo", "--checkpoint"), ("generate", "--checkpoint"), ("chat", "--checkpoint"), ("finetune", "--model")],
)
def test_missing_checkpoint_is_one_typed_line(tmp_path, module, flag):
    proc = _run(module, f"{flag}={tmp_path / 'no-such-checkpoint'}")
    assert proc.returncode == 2, proc.stderr
    assert "error: CheckpointError: " in proc.stderr and "no-such-checkpoint" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_file_that_is_no_checkpoint_is_one_typed_line():
    proc = _run("generate", f"--checkpoint={ROOT / 'README.md'}")
    assert proc.returncode == 2, proc.stderr
    assert "error: CheckpointError: " in proc.stderr and "is not a checkpoint" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
