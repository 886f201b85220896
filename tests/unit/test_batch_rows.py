"""batch_generate's input rows and resume journal, without a model: which rows are bad and how they are named, the
input kinds, the journal's header check, torn lines, damage, and the atomic final file."""

from __future__ import annotations

import errno
import json
import os
import re

import grain.python as grain
import numpy as np
import pytest

from llama32_jax.batch.journal import RESULT_KEYS, Journal, check_output_path, fingerprint, journal_path, write_atomic
from llama32_jax.batch.rows import BadRow, Row, describe_bad, read_rows, resolve_image
from llama32_jax.errors import InvalidInputError, StorageError, UnsafePathError

GOOD = [
    '{"prompt": "Hello", "id": "a"}',
    '{"messages": [{"role": "user", "content": "Hi"}], "id": 7, "max_new_tokens": 3, "temperature": 0.5}',
    '"just a prompt"',
    '{"prompt": "look <|image|>", "images": ["pics/cat.png"], "top_k": 4, "top_p": 0.9, "seed": 12}',
]
BAD = {
    2: ("{not json", r"invalid JSON \(Expecting property name enclosed in double quotes at column 2\)"),
    4: ('{"prompt": "x", "colour": "red"}', r"unknown key\(s\) \['colour'\]; valid keys are \['id', 'prompt'"),
    5: ('{"prompt": 5}', r"'prompt' must be a non-empty string, got int 5"),
    6: ('{"prompt": "x", "messages": []}', r"exactly one of 'prompt' .* or 'messages' .*; it has both"),
    7: ('{"prompt": "x", "max_new_tokens": -2}', r"max_new_tokens must be an int >= 1, got int -2"),
    8: ('{"id": "only"}', r"it has neither"),
    9: ('{"prompt": "x", "temperature": "hot"}', r"temperature must be a finite number >= 0"),
    10: ('{"prompt": "x", "top_p": 0}', r"top_p must be a number in \(0, 1\]"),
    11: ('{"prompt": "x", "top_k": 1.5}', r"top_k must be an int >= 0"),
    12: ('{"prompt": "x", "seed": null}', r"seed must be an int"),
    13: ('{"prompt": "x", "id": [1]}', r"'id' must be a string or an int, got list"),
    14: ('{"prompt": "x", "images": "a.png"}', r"'images' must be a list of image file paths, got str"),
    15: ('{"prompt": "x", "images": [3]}', r"'images'\[0\] must be an image file path, got int 3"),
    16: ('{"messages": "hi"}', r"'messages' must be a non-empty list"),
    17: ('{"messages": [{"role": "user", "content": "x"}], "images": ["a.png"]}', r"'images' goes with 'prompt'"),
    18: ("[1, 2]", r"a row must be a string \(a prompt\) or an object, got list"),
    19: ('""', r"the prompt is an empty string"),
    20: ('{"prompt": "x", "max_new_tokens": true}', r"max_new_tokens must be an int >= 1, got True"),
}


def _write(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_good_rows_are_read_with_their_settings(tmp_path):
    rows = read_rows(_write(tmp_path / "in.jsonl", GOOD))
    assert rows.bad == [] and rows.name == str(tmp_path / "in.jsonl") and rows.base_dir == str(tmp_path)
    a, b, c, d = rows.rows
    assert (a.index, a.where, a.id, a.prompt, a.settings) == (0, "line 1", "a", "Hello", {})
    assert b.messages == [{"role": "user", "content": "Hi"}] and b.id == 7
    assert b.settings == {"max_new_tokens": 3, "temperature": 0.5}
    assert (c.prompt, c.id) == ("just a prompt", None)
    assert d.images == ["pics/cat.png"] and d.settings == {"top_k": 4, "top_p": 0.9, "seed": 12}
    assert resolve_image(d.images[0], rows.base_dir) == str(tmp_path / "pics" / "cat.png")
    assert resolve_image("/abs/x.png", rows.base_dir) == "/abs/x.png"


def test_each_bad_row_is_named_by_its_line(tmp_path):
    lines = [GOOD[0]] * 20
    for number, (text, _) in BAD.items():
        lines[number - 1] = text
    lines.insert(2, "   ")  # a blank line is no row; later lines keep their own numbers
    rows = read_rows(_write(tmp_path / "in.jsonl", lines))
    bad = {b.where: b for b in rows.bad}
    shifted = {(n + 1 if n >= 3 else n): match for n, (_, match) in BAD.items()}
    assert sorted(bad) == sorted(f"line {n}" for n in shifted)
    for number, match in shifted.items():
        assert isinstance(bad[f"line {number}"], BadRow)
        assert re.search(match, bad[f"line {number}"].error), (number, bad[f"line {number}"].error)
    assert len(rows.rows) == 20 and [r.index for r in rows.rows] == list(range(20))
    assert bad["line 14"].id is None and bad["line 5"].id is None  # (line 14: 'id' [1] is not kept)
    message = describe_bad(rows.bad, rows.name)
    assert message.startswith(f"{len(BAD)} bad row(s) in {tmp_path / 'in.jsonl'}: line 2: invalid JSON")
    assert "line 5: unknown key(s) ['colour']" in message and f"and {len(BAD) - 5} more" in message
    assert "bad_rows='fail'" in message


def test_a_bad_row_keeps_a_valid_id(tmp_path):
    rows = read_rows([{"prompt": "x", "id": "k", "top_p": 2.0}])
    assert rows.bad[0].id == "k" and rows.bad[0].where == "row 0"


def test_non_utf8_lines_are_bad_rows(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    rows = read_rows(path)
    assert isinstance(rows.rows[0], Row) and "not UTF-8" in rows.rows[1].error and rows.rows[1].where == "line 2"


def test_input_kinds(tmp_path):
    listed = read_rows(["a", {"prompt": "b", "id": 1}])
    assert [r.prompt for r in listed.rows] == ["a", "b"] and listed.rows[0].where == "row 0"
    assert read_rows(grain.MapDataset.source(["a", {"prompt": "b", "id": 1}])).rows == listed.rows
    source = grain.InMemoryDataSource(["a", "b"])  # shared memory: strings only
    try:
        assert read_rows(source).rows == read_rows(["a", "b"]).rows
    finally:
        source.close()
        source.unlink()
    arr = np.zeros((4, 4, 3), np.uint8)
    assert read_rows([{"prompt": "<|image|>", "images": [arr]}]).rows[0].images[0] is arr


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (5, r"inputs must be a JSONL file path, a list of rows .* got int 5"),
        ({"prompt": "x"}, r"inputs must be a JSONL file path"),
        ([], r"inputs holds no rows"),
        ("", r"inputs is an empty path"),
    ],
)
def test_bad_inputs_are_typed_errors(inputs, match):
    with pytest.raises(InvalidInputError, match=match):
        read_rows(inputs)


def test_bad_input_files(tmp_path):
    with pytest.raises(InvalidInputError, match=r"input file .*missing.jsonl' does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidInputError, match=r"is not a file"):
        read_rows(tmp_path)
    with pytest.raises(InvalidInputError, match=r"holds no rows"):
        read_rows(_write(tmp_path / "blank.jsonl", ["", "  "]))


# ------------------------------------------------------------------------------------------------ journal


def _row(i: int, text: str = "t") -> dict:
    return {"index": i, "id": None, "status": "ok", "text": text, "prompt_tokens": 3, "output_tokens": 2,
            "stop_reason": "length", "error": None}  # fmt: skip


HEADER = {"fingerprint": fingerprint(["inputs", 1]), "rows": 4, "settings": {"max_new_tokens": 8}}


def test_journal_resumes_what_was_finished(tmp_path):
    out = str(tmp_path / "out.jsonl")
    j = Journal(out, HEADER)
    j.append(_row(2))
    j.append(_row(0))
    j.close()
    lines = open(journal_path(out), encoding="utf-8").read().splitlines()
    assert json.loads(lines[0])["fingerprint"] == HEADER["fingerprint"] and len(lines) == 3
    assert list(json.loads(lines[1])) == list(RESULT_KEYS)
    with open(journal_path(out), "a", encoding="utf-8") as f:
        f.write('{"index": 1, "id": nu')  # a kill in the middle of a write
    j = Journal(out, HEADER)
    assert sorted(j.done) == [0, 2] and j.done[2] == _row(2)
    j.append(_row(1, "after"))  # starts on a clean line: the torn text was cut off
    j.append(_row(3))
    j.finish([_row(0), _row(1, "after"), _row(2), _row(3)])
    assert not os.path.exists(journal_path(out))
    assert [json.loads(x) for x in open(out, encoding="utf-8")] == [_row(0), _row(1, "after"), _row(2), _row(3)]
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left


def test_journal_refusals(tmp_path):
    out = str(tmp_path / "out.jsonl")
    Journal(out, HEADER).close()
    other = {**HEADER, "fingerprint": fingerprint(["other"]), "settings": {"max_new_tokens": 16}}
    with pytest.raises(UnsafePathError, match=r"different inputs or generation settings: settings changed "
                                              r"\(max_new_tokens: 8 then, 16 now\).*overwrite=True"):  # fmt: skip
        Journal(out, other)
    with pytest.raises(UnsafePathError, match=r"the inputs differ"):
        Journal(out, {**HEADER, "fingerprint": "x"})
    with pytest.raises(UnsafePathError, match=r"holds an unfinished run; pass resume=True"):
        Journal(out, HEADER, resume=False)
    Journal(out, other, overwrite=True).close()  # discards the old journal
    assert json.loads(open(journal_path(out)).readline())["fingerprint"] == other["fingerprint"]
    with open(out, "w") as f:
        f.write("finished\n")
    with pytest.raises(UnsafePathError, match=r"already exists \(a finished run\); pass overwrite=True"):
        Journal(out, other)


def test_damaged_journals(tmp_path):
    out = str(tmp_path / "out.jsonl")
    j = Journal(out, HEADER)
    j.append(_row(0))
    j.close()
    text = open(journal_path(out)).read()
    with open(journal_path(out), "w") as f:
        f.write(text + '{"index": 9}\n' + json.dumps(_row(1)) + "\n")  # a bad line before the last
    with pytest.raises(UnsafePathError, match=r"line 3 is not a result row; the journal is damaged"):
        Journal(out, HEADER)
    with open(journal_path(out), "w") as f:
        f.write("something else\n")
    with pytest.raises(UnsafePathError, match=r"is not a journal of batch_generate"):
        Journal(out, HEADER)
    with open(journal_path(out), "w") as f:
        f.write('{"format": "llama32')  # killed while writing the header: nothing to resume
    j = Journal(out, HEADER)
    assert j.done == {}
    j.close()
    assert json.loads(open(journal_path(out)).read())["rows"] == 4


def test_output_paths(tmp_path):
    assert check_output_path(tmp_path / "o.jsonl") == str(tmp_path / "o.jsonl")
    with pytest.raises(UnsafePathError, match=r"is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(InvalidInputError, match=r"its directory .* does not exist"):
        check_output_path(tmp_path / "no" / "o.jsonl")
    with pytest.raises(InvalidInputError, match=r"output must be None or a file path"):
        check_output_path(3)


def test_a_failed_final_write_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=r"cannot write the output .*o.jsonl.*No space left on device"):
        write_atomic(str(tmp_path / "o.jsonl"), [_row(0)])
    assert os.listdir(tmp_path) == []
