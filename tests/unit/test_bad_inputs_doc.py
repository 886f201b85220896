"""docs/bad-inputs.md stays true: every row cites a test that exists, the rows are numbered without gaps, each
input is listed once, and the table keeps at least 60 distinct bad inputs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| (\d+) \| (.+?) \| (.+?) \| (tests/[\w/]+\.py)(?:::(\w+))? \|$")


def _rows() -> list[tuple[int, str, str, str, str | None]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\| \d+ \|", line):
            m = ROW.match(line)
            assert m, f"malformed row in {DOC.name}: {line}"
            rows.append((int(m[1]), m[2], m[3], m[4], m[5]))
    return rows


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_row_cites_an_existing_test():
    rows = _rows()
    missing = []
    for number, _, _, path, name in rows:
        file = ROOT / path
        if not file.is_file():
            missing.append(f"row {number}: {path} does not exist")
        elif name is not None and name not in _test_names(file):
            missing.append(f"row {number}: {path} has no test {name}")
        elif name is None and not _test_names(file):
            missing.append(f"row {number}: {path} holds no tests")
    assert not missing, missing


def test_rows_are_numbered_distinct_and_at_least_sixty():
    rows = _rows()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    inputs = [r[1] for r in rows]
    assert len(set(inputs)) == len(inputs), "an input is listed twice"
    assert len(rows) >= 60
