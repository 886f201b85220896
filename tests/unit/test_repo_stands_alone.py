"""The repository stands alone: no file a user gets points to notes outside it, and every doc it cites exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile(
    r"\.\./"
    + r"shared|shared/"
    + r"(?:SPEC|DESIGN|PERFORMANCE|ENVIRONMENT)"
    + r"|\b(?:SPEC|DESIGN|PERFORMANCE|ENVIRONMENT)"
    + r"(?:\.md|\s*§)"
)
DOC_REF = re.compile(r"docs/([\w.-]+\.md)")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. an installed wheel)")
    suffixes = {".py", ".md", ".toml", ".ipynb", ".cfg", ".txt", ".sh"}
    return [ROOT / p for p in out.splitlines() if Path(p).suffix in suffixes and (ROOT / p).is_file()]


def test_nothing_points_outside_the_repository():
    hits = []
    for path in _tracked():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_cited_docs_exist():
    missing = set()
    for path in _tracked():
        for name in DOC_REF.findall(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / "docs" / name).is_file():
                missing.add(f"{path.relative_to(ROOT)} cites docs/{name}")
    assert not missing, sorted(missing)
