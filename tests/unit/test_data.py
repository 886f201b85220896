"""Fine-tuning data pipeline: prompt masking against the chat formats (ours and Meta's), packing, resume, sharding."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.chat_format import Llama3ChatFormat, TemplateChatFormat
from llama32_jax.inputs.tokenizer import LlamaTokenizer
from llama32_jax.training.data import FIELDS, JsonlSource, encode_example, make_dataset, pack_sequences, pad_sequences

DIALOGS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one?"},
        {"role": "assistant", "content": "Two is the only even prime."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"name": "weather", "parameters": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ],
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> LlamaTokenizer:
    return LlamaTokenizer.default()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _replies(dialog) -> list[str]:
    return [m["content"] for m in dialog if m["role"] == "assistant"]


def test_llama3_masking_matches_chat_format_and_meta(tok):
    """Tokens equal ``Llama3ChatFormat.encode_dialog(add_generation_prompt=False)`` and Meta's ``encode_dialog_prompt``
    minus its last 4 tokens: Meta always appends the open assistant header ``<|start_header_id|>assistant
    <|end_header_id|>\\n\\n`` (4 tokens) for generation. The trained spans decode to each reply + ``<|eot_id|>``."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    meta = ChatFormat(Tokenizer.get_instance())
    fmt = Llama3ChatFormat(tok)
    header = fmt.encode_header("assistant")
    for dialog in DIALOGS:
        tokens, mask = encode_example(dialog, tok)
        assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape
        assert tokens.tolist() == fmt.encode_dialog(dialog, add_generation_prompt=False)
        meta_ids = meta.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in dialog]).tokens
        assert meta_ids[-len(header) :] == header and tokens.tolist() == meta_ids[: -len(header)]
        spans = [tok.decode(tokens[a:b].tolist()) for a, b in _runs(mask)]
        assert spans == [r + "<|eot_id|>" for r in _replies(dialog)]
        assert encode_example({"messages": dialog}, tok)[0].tolist() == tokens.tolist()


def test_tool_call_turn_trains_python_tag_and_eom(tok):
    dialog = [
        {"role": "user", "content": "Compute 2**10."},
        {"role": "assistant", "content": "print(2**10)", "python_tag": True, "stop_reason": "end_of_message"},
        {"role": "ipython", "content": "1024"},
        {"role": "assistant", "content": "1024."},
    ]
    tokens, mask = encode_example(dialog, tok)
    spans = [tok.decode(tokens[a:b].tolist()) for a, b in _runs(mask)]
    assert spans == ["<|python_tag|>print(2**10)<|eom_id|>", "1024.<|eot_id|>"]


def test_template_format_spans(tok):
    # A Jinja version of the Llama 3 format gives exactly the Llama3ChatFormat tokens and mask.
    llama3_jinja = TemplateChatFormat(tok, chat_template=LLAMA3_TEMPLATE)
    for dialog in DIALOGS[:2]:
        got = encode_example(dialog, tok, chat_format=llama3_jinja)
        want = encode_example(dialog, tok)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    # ChatML: what closes the assistant turn (here "<|im_end|>\n", plain text for this tokenizer) is trained.
    chatml = TemplateChatFormat(tok, chat_template=CHATML_TEMPLATE)
    tokens, mask = encode_example(DIALOGS[0], tok, chat_format=chatml)
    assert tokens.tolist() == chatml.encode_dialog(DIALOGS[0], add_generation_prompt=False)
    spans = [tok.decode(tokens[a:b].tolist()) for a, b in _runs(mask)]
    assert spans == [r + "<|im_end|>\n" for r in _replies(DIALOGS[0])]
    # A template that renders a turn differently once later turns follow cannot be split into spans.
    unstable = TemplateChatFormat(tok, chat_template=CHATML_TEMPLATE.replace("<|im_end|>", "{{ loop.length }}"))
    with pytest.raises(InvalidInputError, match=r"messages\[2\].*prefix"):
        encode_example(DIALOGS[0], tok, chat_format=unstable)
    with pytest.raises(InvalidInputError, match="must start with a system or user"):
        encode_example([{"role": "assistant", "content": "x"}], tok, chat_format=chatml)


def test_plain_text_and_bad_examples(tok):
    tokens, mask = encode_example({"text": "The sky is blue."}, tok)
    assert tokens.tolist() == tok.encode("The sky is blue.", bos=True, eos=True)
    assert mask.tolist() == [False] + [True] * (len(tokens) - 1)  # BOS is never a target
    bad = {
        "no trainable token": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "exactly one key": {"text": "x", "id": 3},
        "must be a list of messages": "just a string",
        "at least one message": [],
        "image part": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}],
        "unknown chat role": [{"role": "bot", "content": "x"}],
        r"example\['text'\] must be a str": {"text": 5},
    }
    for match, example in bad.items():
        with pytest.raises(InvalidInputError, match=match):
            encode_example(example, tok)


def _sequences(lengths, seed=0):
    """Token values encode (sequence id, index): seq i holds 1000*(i+1) + j. Random masks."""
    rng = np.random.default_rng(seed)
    return [(1000 * (i + 1) + np.arange(n, dtype=np.int32), rng.random(n) < 0.6) for i, n in enumerate(lengths)]


def _check_rows(rows, seqs, seq_len):
    """Every (truncated) sequence appears exactly once, as one segment, with correct fields."""
    seen = {}
    for row in rows:
        assert {k: (v.shape, v.dtype.name) for k, v in row.items()} == {
            "inputs": ((seq_len,), "int32"),
            "targets": ((seq_len,), "int32"),
            "loss_mask": ((seq_len,), "float32"),
            "segment_ids": ((seq_len,), "int32"),
            "positions": ((seq_len,), "int32"),
        }
        pad = row["segment_ids"] == 0
        assert not pad.any() or pad[np.argmax(pad) :].all()  # padding only at the end
        for k in ("inputs", "targets", "loss_mask", "positions"):
            assert (row[k][pad] == 0).all()
        ids = np.unique(row["segment_ids"][~pad])
        assert ids.tolist() == list(range(1, len(ids) + 1))
        for s in ids:
            where = row["segment_ids"] == s
            inputs, targets = row["inputs"][where], row["targets"][where]
            assert row["positions"][where].tolist() == list(range(where.sum()))
            sid = int(inputs[0]) // 1000 - 1
            assert (targets // 1000 == sid + 1).all()  # no target crosses into another sequence
            tokens, mask = seqs[sid]
            n = min(len(tokens), seq_len + 1)
            assert np.concatenate([inputs, targets[-1:]]).tolist() == tokens[:n].tolist()
            assert (targets == tokens[1:n]).all() and (row["loss_mask"][where] == mask[1:n]).all()
            assert sid not in seen
            seen[sid] = True
    assert sorted(seen) == list(range(len(seqs)))


@pytest.mark.parametrize("num_bins", [1, 3])
def test_packing(num_bins, caplog):
    seq_len = 16
    seqs = _sequences([5, 9, 2, 17, 40, 3, 8, 8, 16, 12, 2, 30])
    with caplog.at_level(logging.WARNING, logger="llama32_jax.training.data"):
        rows = list(pack_sequences(seqs, seq_len, num_bins=num_bins))
    _check_rows(rows, seqs, seq_len)
    assert len(rows) < len(seqs)  # several sequences share rows
    if num_bins == 1:  # sequential packing keeps the order
        order = [int(r["inputs"][r["segment_ids"] == s][0]) // 1000 for r in rows for s in np.unique(r["segment_ids"])]
        assert [o for o in order if o] == list(range(1, len(seqs) + 1))
    # The 40- and 30-token sequences are cut to seq_len + 1 tokens, with a warning, not dropped.
    truncated = [r for r in caplog.records if "truncated a sequence of" in r.getMessage()]
    assert [r.getMessage().split(" tokens")[0][-2:] for r in truncated] == ["40", "30"]
    again = list(pack_sequences(seqs, seq_len, num_bins=num_bins))
    assert all(all(np.array_equal(a[k], b[k]) for k in FIELDS) for a, b in zip(rows, again, strict=True))


def test_unpacked_rows():
    seqs = _sequences([5, 17, 30, 2])
    rows = list(pad_sequences(seqs, 16))
    assert len(rows) == len(seqs)
    _check_rows(rows, seqs, 16)
    assert all(set(np.unique(r["segment_ids"])) <= {0, 1} for r in rows)
    with pytest.raises(InvalidInputError, match="seq_len must be an int >= 2"):
        pad_sequences(seqs, 1)


def _examples(n):
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"text": f"Plain text number {i}. " * (1 + i % 4)})
        else:
            d = DIALOGS[i % len(DIALOGS)]
            out.append([*d[:-1], {"role": "assistant", "content": f"Reply {i}: " + d[-1]["content"]}])
    return out


def _take(it, k):
    return [next(it) for _ in range(k)]


def _equal(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in FIELDS) for x, y in zip(a, b, strict=True))


def test_pipeline_covers_every_trained_token(tok):
    examples = _examples(13)
    ds = make_dataset(examples, tok, seq_len=96, batch_size=4, num_epochs=2, seed=3, shard=(0, 1))
    batches = list(ds)
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            k: ((4, 96), "float32" if k == "loss_mask" else "int32") for k in FIELDS
        }
    trained = sum(int(encode_example(e, tok)[1][1:].sum()) for e in examples)
    assert sum(b["loss_mask"].sum() for b in batches) == 2 * trained
    assert _equal(batches, list(make_dataset(examples, tok, seq_len=96, batch_size=4, num_epochs=2, seed=3)))
    other_seed = list(make_dataset(examples, tok, seq_len=96, batch_size=4, num_epochs=2, seed=4))
    assert not _equal(batches, other_seed)


@pytest.mark.parametrize("pack", [True, False])
def test_iterator_state_resumes_exactly(tok, pack):
    examples = _examples(10)

    def pipeline():
        # 3 packing bins for batches of 2 rows: a saved state can fall inside a group of packed rows.
        kwargs = {"num_packing_bins": 3} if pack else {}
        return make_dataset(examples, tok, seq_len=40, batch_size=2, seed=1, pack=pack, shard=(0, 1), **kwargs)

    it = iter(pipeline())
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # the state survives a JSON round trip
    if pack:  # saved mid-group: the packer's position within its packed rows is part of the state
        assert state["next_row"] != 0
    expected = _take(it, 12)  # crosses epoch boundaries (10 examples, reshuffled each epoch)
    fresh = iter(pipeline())
    fresh.set_state(state)
    assert _equal(_take(fresh, 12), expected)


def test_shard_by_process(tok):
    examples = [{"text": f"item {i}"} for i in range(11)]

    def items(shard):
        ds = make_dataset(examples, tok, seq_len=8, batch_size=1, num_epochs=1, pack=False, shard=shard)
        out = []
        for b in ds:
            inputs, targets = b["inputs"][0][b["segment_ids"][0] == 1], b["targets"][0][b["segment_ids"][0] == 1]
            out.append(tok.decode([*inputs.tolist(), int(targets[-1])]))
        return out

    first, second = items((0, 2)), items((1, 2))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(f"<|begin_of_text|>item {i}<|end_of_text|>" for i in range(11))
    assert len(items(None)) == 11  # a single JAX process gets everything
    with pytest.raises(InvalidInputError, match="shard 3 of 12 is empty"):
        make_dataset(examples[:3], tok, seq_len=8, batch_size=1, shard=(3, 12))
    with pytest.raises(InvalidInputError, match="0 <= index < count"):
        make_dataset(examples, tok, seq_len=8, batch_size=1, shard=(2, 2))


def test_jsonl_source(tok, tmp_path):
    examples = _examples(7)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in examples[:3]) + "\n\n" + "\n".join(map(json.dumps, examples[3:])))
    assert len(JsonlSource(path)) == 7 and JsonlSource(path)[3] == (f"{path} line 5", examples[3])
    kwargs = dict(seq_len=32, batch_size=2, num_epochs=1, seed=5)
    assert _equal(list(make_dataset(path, tok, **kwargs)), list(make_dataset(examples, tok, **kwargs)))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(examples[0]) + "\n" + json.dumps(examples[1]) + "\n{not json\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl line 3 is not valid JSON"):
        list(make_dataset(bad, tok, **kwargs))
    bad.write_text(json.dumps(examples[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl line 2: an example dict must have exactly one key"):
        list(make_dataset(bad, tok, **kwargs))
    with pytest.raises(InvalidInputError, match="JSONL file not found"):
        make_dataset(tmp_path / "missing.jsonl", tok, **kwargs)


def test_argument_errors(tok):
    ok = [{"text": "a b c"}]
    cases = {
        "dataset is empty": ([], {}),
        "seq_len must be an int >= 2": (ok, {"seq_len": 1}),
        "batch_size must be an int >= 1": (ok, {"batch_size": 0}),
        "num_epochs must be an int >= 1": (ok, {"num_epochs": 0}),
        "worker_count must be an int >= 0": (ok, {"worker_count": -1}),
        "examples_or_path must be a list": (42, {}),
    }
    for match, (source, kwargs) in cases.items():
        with pytest.raises(InvalidInputError, match=match):
            make_dataset(source, tok, **{"seq_len": 8, "batch_size": 1, **kwargs})
    no_reply = [[{"role": "user", "content": "hi"}]]
    with pytest.raises(InvalidInputError, match=r"examples\[0\]: the example has no trainable token"):
        list(make_dataset(no_reply, tok, seq_len=8, batch_size=1, num_epochs=1))


def test_input_errors_name_the_input(tok, tmp_path):
    kwargs = dict(seq_len=16, batch_size=1, num_epochs=1, shuffle=False)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InvalidInputError, match=r"dir.jsonl is a directory; give a file with one example per line"):
        make_dataset(tmp_path / "dir.jsonl", tok, **kwargs)
    with pytest.raises(InvalidInputError, match="the JSONL path is an empty string"):
        make_dataset("", tok, **kwargs)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidInputError, match=r"the dataset is empty: .*empty.jsonl holds no examples"):
        make_dataset(empty, tok, **kwargs)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidInputError, match=r"latin1.jsonl line 2 is not UTF-8 text \(byte 0xe9 at column 14\)"):
        list(make_dataset(latin1, tok, **kwargs))
    bad_role = [[{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(InvalidInputError, match=r"examples\[0\]: .*unknown chat role"):
        list(make_dataset(bad_role, tok, **kwargs))
    ok = [{"text": "a b c"}]
    cases = {
        "tokenizer must be a llama32_jax tokenizer .*got NoneType": {"tokenizer": None},
        "seq_len must be an int >= 2, got 0": {"seq_len": 0},
        "seq_len must be an int >= 2, got 8.0": {"seq_len": 8.0},
        "batch_size must be an int >= 1, got -1": {"batch_size": -1},
        "num_packing_bins must be an int >= 1, got 0": {"num_packing_bins": 0},
        "shuffle must be True or False, got 'no'": {"shuffle": "no"},
        "pack must be True or False, got 1": {"pack": 1},
        r"shard must be a tuple \(index, count\) of ints, got \(True, 2\)": {"shard": (True, 2)},
    }
    for match, extra in cases.items():
        tokenizer = extra.pop("tokenizer", tok)
        with pytest.raises(InvalidInputError, match=match):
            make_dataset(ok, tokenizer, **{**kwargs, **extra})
    with pytest.raises(InvalidInputError, match="tokenizer must be a llama32_jax tokenizer"):
        encode_example({"text": "x"}, "not a tokenizer")
