"""Tokenizers: Meta's Llama 3 ``tokenizer.model`` through tiktoken, and Hugging Face ``tokenizer.json`` directories.

Both classes share one small interface (:class:`Tokenizer`): ``encode(text, *, bos, eos, allow_special)`` returns
plain ids -- nothing is added unless asked, and special-token strings inside ``text`` are ordinary text unless
``allow_special=True`` -- and ``decode(ids)`` returns the string. :func:`load_tokenizer` picks the class from what a
directory holds. Chat formatting lives in ``llama32_jax.inputs.chat_format``.

Facts (docs/model-facts.md §7.1-7.2): ``tokenizer.model`` holds one ``<base64 token bytes> <rank>`` pair per line,
128000 lines, ranks = ids; 256 special tokens follow from id 128000, so the vocabulary has 128256 entries.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import operator
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from llama32_jax.errors import InvalidInputError, TokenizerError

__all__ = [
    "LLAMA3_PAT_STR",
    "LLAMA3_SPECIAL_TOKENS",
    "HFTokenizer",
    "LlamaTokenizer",
    "Tokenizer",
    "default_llama3_tokenizer_path",
    "load_tokenizer",
]

# Pre-tokenizer regex of Llama 3 (docs/model-facts.md §7.1); the same pattern is in Meta's code and HF's tokenizer.json.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_SPECIAL = 256
# Ids 128000..128011 by name; ids 128012..128255 are <|reserved_special_token_2|> .. <|reserved_special_token_245|>.
_NAMED_SPECIAL = tuple(
    f"<|{name}|>"
    for name in "begin_of_text end_of_text reserved_special_token_0 reserved_special_token_1 finetune_right_pad_id "
    "step_id start_header_id end_header_id eom_id eot_id python_tag image".split()
)
# The 256 special-token names in id order (Meta's names; docs/model-facts.md §7.2, "Meta" column).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _NUM_SPECIAL - len(_NAMED_SPECIAL))
)

# Meta splits the input before tiktoken (a workaround for a tiktoken panic, openai/tiktoken#195): first into
# chunks of this many characters, then so that no piece holds a run longer than _MAX_RUN_CHARS of consecutive
# whitespace or of consecutive non-whitespace characters. Pieces are encoded independently.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def _long_runs(max_run: int) -> re.Pattern[str]:
    # Only matches a maximal run (the lookbehind rejects starting inside one), so the scan stays linear. Python's
    # `\s` and `str.isspace` agree on every code point (the unit tests check it).
    return re.compile(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}")


_LONG_RUNS = _long_runs(_MAX_RUN_CHARS)


def split_long_runs(text: str, max_run: int = _MAX_RUN_CHARS) -> Iterator[str]:
    """Cut ``text`` inside every run of more than ``max_run`` whitespace (or non-whitespace) characters.

    A run of length L starting at ``p`` is cut at ``p + k * max_run`` for ``k = 1, 2, ...`` (< p + L), which is
    where Meta's character loop cuts. Always yields at least one (possibly empty) piece.
    """
    pattern = _LONG_RUNS if max_run == _MAX_RUN_CHARS else _long_runs(max_run)
    start = 0
    for m in pattern.finditer(text):
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _as_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError(f"token ids must be a sequence of integers, got {type(ids).__name__} {ids[:40]!r}")
    try:
        out = [operator.index(i) for i in ids]
    except TypeError as e:
        raise InvalidInputError(f"token ids must be a sequence of integers, got {type(ids).__name__}: {e}") from e
    flags = [i for i in ids if isinstance(i, bool)]
    if flags:
        raise InvalidInputError(f"token ids must be integers, not bools, got {flags[:5]}")
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise InvalidInputError(f"token ids must lie in [0, {vocab_size}), got {bad[:5]}")
    return out


def _check_token_str(token: Any) -> None:
    if not isinstance(token, str):
        raise InvalidInputError(f"token must be a str (e.g. '<|eot_id|>'), got {type(token).__name__} {token!r}")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of llama32_jax needs from a tokenizer; :class:`LlamaTokenizer` and :class:`HFTokenizer` have it.

    ``encode`` adds BOS/EOS only when asked; ``decode`` renders special tokens by name; ``token_to_id`` gives the id
    of one token (typically a special-token name) or None; ``id_to_piece`` the text of one id.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: tuple[int, ...]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_piece(self, token_id: int) -> str: ...


# --------------------------------------------------------------------------------------------- Meta / tiktoken


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file strictly: every line ``<base64> <rank>``, ranks exactly 0..n-1."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"{path} is not a Llama 3 tiktoken BPE file (lines of '<base64 token> <rank>'); it holds binary data "
            "(a SentencePiece model?)"
        ) from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 fields, got {len(fields)}")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path} is not a Llama 3 tiktoken BPE file: line {lineno} ({line[:60]!r}) is not "
                f"'<base64 token> <rank>': {e}"
            ) from e
        if rank != len(ranks) or token in ranks:
            raise TokenizerError(f"{path}: line {lineno} (rank {rank}): ranks must number distinct tokens 0, 1, 2, ...")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path} is empty: a tiktoken BPE file needs one '<base64 token> <rank>' per line")
    return ranks


def default_llama3_tokenizer_path() -> Path:
    """The ``tokenizer.model`` that the installed ``llama-models`` package ships (``llama_models/llama3/``)."""
    try:
        res = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    except ModuleNotFoundError as e:
        raise TokenizerError(
            "the default Llama 3 tokenizer comes from the 'llama-models' package "
            "(llama_models/llama3/tokenizer.model), which is not installed; install it (pip install llama-models) "
            "or pass a tokenizer.model path"
        ) from e
    path = Path(str(res))
    if not path.is_file():
        raise TokenizerError(f"llama_models is installed but has no tokenizer file at {path}")
    return path


class LlamaTokenizer:
    """Meta's Llama 3 tokenizer: byte-level BPE over ``tokenizer.model`` ranks plus 256 special tokens.

    ``encode`` follows Meta's ``Tokenizer.encode`` exactly (including its input chunking); special-token strings
    in the text stay plain text unless ``allow_special=True``.
    """

    # Read-only by convention (plain attributes, as in Meta's class).
    vocab_size: int  # Meta's n_words: 128256
    special_tokens: dict[str, int]  # name -> id, Meta's names (LLAMA3_SPECIAL_TOKENS)
    bos_id: int  # <|begin_of_text|> 128000
    eos_id: int  # <|end_of_text|> 128001
    eot_id: int  # 128009
    eom_id: int  # 128008
    python_tag_id: int  # 128010
    image_id: int  # <|image|> 128011 (tokenizer id; the model-side id is configs.IMAGE_TOKEN_ID = 128256)
    pad_id: int  # <|finetune_right_pad_id|> 128004
    stop_ids: tuple[int, ...]  # Meta stop_tokens: end_of_text, eom, eot
    add_bos = True  # plain prompts for Llama 3 start with BOS
    chat_template = None  # no Jinja template: the chat format is llama32_jax.inputs.chat_format.Llama3ChatFormat

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = "llama3") -> None:
        import tiktoken

        n_base = len(mergeable_ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._model = tiktoken.Encoding(
            name=name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = n_base + len(LLAMA3_SPECIAL_TOKENS)
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}
        sp = self.special_tokens
        self.bos_id, self.eos_id = sp["<|begin_of_text|>"], sp["<|end_of_text|>"]
        self.eot_id, self.eom_id, self.python_tag_id = sp["<|eot_id|>"], sp["<|eom_id|>"], sp["<|python_tag|>"]
        self.image_id, self.pad_id = sp["<|image|>"], sp["<|finetune_right_pad_id|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)

    @classmethod
    def from_file(cls, path: str | Path) -> LlamaTokenizer:
        """Load a Llama 3 ``tokenizer.model`` (tiktoken BPE ranks); :class:`TokenizerError` names a bad file."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"Llama 3 tokenizer file not found: {path} (expected a tokenizer.model file)")
        return cls(_read_bpe_ranks(path), name=path.name)

    @classmethod
    def default(cls) -> LlamaTokenizer:
        """The tokenizer shipped by the installed ``llama-models`` package."""
        return cls.from_file(default_llama3_tokenizer_path())

    def token_to_id(self, token: str) -> int | None:
        """Id of a special-token name, or of a string that is exactly one vocabulary entry; else None."""
        _check_token_str(token)
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._model.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (special tokens as their UTF-8 name)."""
        (token_id,) = _as_ids([token_id], self.vocab_size)
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode("utf-8")
        return self._model.decode_single_token_bytes(token_id)

    def id_to_piece(self, token_id: int) -> str:
        """The text of one id (a special-token name, or its bytes decoded with U+FFFD for partial UTF-8)."""
        return self.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Encode ``text`` to ids; prepend BOS / append EOS when asked.

        With ``allow_special=False`` (default) a string such as ``"<|eot_id|>"`` is encoded as the characters it
        spells; with ``True`` it becomes the special token.
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        for c in range(0, max(len(text), 1), _MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[c : c + _MAX_ENCODE_CHARS]):
                if allow_special:
                    ids.extend(self._model.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text (special tokens render as their names; invalid UTF-8 becomes U+FFFD)."""
        return self._model.decode(_as_ids(ids, self.vocab_size))

    def __repr__(self) -> str:
        return f"LlamaTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------- Hugging Face


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"  # where recent transformers save it
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read chat template {jinja}: {e}") from e
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"chat_template in {directory} must be a string, got {type(template).__name__}")
    return template


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizers.Tokenizer``) behind the :class:`Tokenizer` interface.

    ``encode`` never lets the tokenizer's post-processor add tokens (Llama's adds BOS); BOS/EOS come only from the
    ``bos``/``eos`` flags. The wrapped ``tokenizers.Tokenizer`` is owned by this object: ``encode`` toggles its
    ``encode_special_tokens`` flag (under a lock) to honour ``allow_special``.
    """

    # Read-only by convention (plain attributes).
    vocab_size: int  # ids including added tokens (128257 for the HF Llama 3.2 Vision tokenizer)
    special_tokens: dict[str, int]  # special added-token name -> id
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: tuple[int, ...]  # eos_token_id of generation_config.json when given, else (eos_id,)
    add_bos: bool  # whether plain prompts start with BOS (add_bos_token, else what the post-processor does)
    chat_template: str | None  # the Jinja chat template, if the tokenizer ships one
    backend: Any  # the wrapped tokenizers.Tokenizer

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        stop_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        name: str = "tokenizer.json",
    ) -> None:
        self.backend, self._name, self._lock = tokenizer, name, threading.Lock()
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        named = [("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), *(("stop_ids", i) for i in stop_ids or ())]
        for what, i in named:
            if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise TokenizerError(f"{name}: {what} {i!r} is not an id in [0, {self.vocab_size})")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_ids = tuple(stop_ids) if stop_ids else ((eos_id,) if eos_id is not None else ())
        self.chat_template = chat_template
        if add_bos is None:  # what the tokenizer's own post-processor does
            add_bos = bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        self.add_bos = bool(add_bos)
        decoder = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {t.content: int(i) for i, t in decoder.items() if getattr(t, "special", False)}

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HFTokenizer:
        """Load an HF tokenizer directory (``tokenizer.json`` + optional configs); see the module docstring."""
        path = Path(directory)
        directory, tok_path = (path.parent, path) if path.is_file() else (path, path / "tokenizer.json")
        if not tok_path.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory}")
        from tokenizers import Tokenizer as _HFTok

        try:
            tok = _HFTok.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"cannot load {tok_path} as a Hugging Face tokenizer.json: {e}") from e

        def optional_json(name: str) -> dict[str, Any]:
            return _read_json(directory / name) if (directory / name).is_file() else {}

        config, special_map = optional_json("tokenizer_config.json"), optional_json("special_tokens_map.json")
        gen = optional_json("generation_config.json")

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key)) or _token_content(special_map.get(key))
            if content is None:
                gid = gen.get(f"{key}_id")
                return gid if isinstance(gid, int) else None
            tid = tok.token_to_id(content)
            if tid is None:
                raise TokenizerError(f"{directory}: {key} {content!r} is not a token of {tok_path.name}")
            return tid

        eos_gen = gen.get("eos_token_id")
        stop = [eos_gen] if isinstance(eos_gen, int) else eos_gen
        if stop is not None and not (isinstance(stop, list) and all(isinstance(i, int) for i in stop)):
            raise TokenizerError(f"{directory / 'generation_config.json'}: eos_token_id must be an int or int list")
        add_bos = config.get("add_bos_token")
        return cls(
            tok,
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            stop_ids=stop,
            chat_template=_chat_template_of(directory, config),
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            name=str(tok_path),
        )

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary or added-token string (as spelled in tokenizer.json), or None."""
        _check_token_str(token)
        return self.backend.token_to_id(token)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one id (byte-level BPE spells bytes as printable characters)."""
        (token_id,) = _as_ids([token_id], self.vocab_size)
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Encode ``text``; BOS/EOS only when asked; special-token strings are plain text unless ``allow_special``."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        for flag, tid, what in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
            if flag and tid is None:
                raise TokenizerError(f"{self._name} has no {what.upper()} token, so encode({what}=True) is impossible")
        with self._lock:
            self.backend.encode_special_tokens = not allow_special
            ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, special tokens included."""
        return self.backend.decode(_as_ids(ids, self.vocab_size), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self._name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> LlamaTokenizer | HFTokenizer:
    """Load the tokenizer at ``path``: a directory, a ``tokenizer.json`` or a Llama 3 ``tokenizer.model``.

    In a directory, ``tokenizer.json`` (HF; it comes with the chat template and generation config) is preferred
    over ``tokenizer.model`` (Meta, tiktoken format). Pass a file to choose explicitly.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer.from_pretrained(p)
        if (p / "tokenizer.model").is_file():
            return LlamaTokenizer.from_file(p / "tokenizer.model")
        raise TokenizerError(
            f"no tokenizer in {p}: looked for tokenizer.json (Hugging Face) and tokenizer.model (Meta Llama 3)"
        )
    if p.is_file():
        if p.suffix == ".json":
            return HFTokenizer.from_pretrained(p)
        return LlamaTokenizer.from_file(p)
    raise TokenizerError(
        f"tokenizer path {p} does not exist; expected a directory holding tokenizer.json or tokenizer.model, or one "
        "of those files"
    )
