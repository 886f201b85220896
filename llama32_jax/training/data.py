"""Fine-tuning input pipelines (grain): chat tokenisation with prompt masking, packing, checkpointable batches.

An **example** is one of

- a dialog: a list of messages ``[{"role": ..., "content": ...}, ...]`` (roles as the chat format allows), or the
  same list under ``{"messages": [...]}``;
- plain text ``{"text": "..."}``: BOS (when the tokenizer adds one to plain prompts) + text + EOS, all trained.

:func:`encode_example` turns it into ``tokens [n] int32`` and ``loss_mask [n] bool``: ``loss_mask[j]`` says whether
token ``j`` is a training *target*. In a dialog only what the model writes is trained: each assistant turn's content
and the token that closes it (``<|eot_id|>``, or ``<|eom_id|>`` for a pending tool call, after an optional
``<|python_tag|>``); BOS, headers and system/user/tool turns are masked.

Training rows (every field ``[L]``, ``L = seq_len``) are built by shifting each sequence *before* packing: a sequence
of ``n`` tokens contributes ``n - 1`` positions with ``inputs = tokens[:-1]``, ``targets = tokens[1:]``,
``loss_mask = mask[1:]``. So every position's target is the next token of its own sequence and no position is wasted
on a segment's last token (which has no successor); a sequence of more than ``L + 1`` tokens is truncated to
``L + 1`` (a logged warning says so, never a silent drop). Row fields:

- ``inputs`` int32, ``targets`` int32 (0 on padding);
- ``loss_mask`` float32: 1 where the target is trained, 0 on masked prompt tokens and padding;
- ``segment_ids`` int32: 1, 2, ... per packed sequence, 0 on padding (attention stays within a segment);
- ``positions`` int32: 0, 1, ... restarting in each segment (RoPE positions), 0 on padding.

:func:`pack_sequences` and :func:`pad_sequences` build rows from ``(tokens, loss_mask)`` pairs. :func:`make_dataset`
returns a ``grain.IterDataset`` of batches (the same fields, ``[batch_size, L]``); its iterator's ``get_state()`` /
``set_state()`` resume training exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llama32_jax.errors import InvalidInputError, TokenizerError
from llama32_jax.inputs.chat_format import Llama3ChatFormat, TemplateChatFormat, chat_format_for
from llama32_jax.inputs.tokenizer import Tokenizer

__all__ = ["FIELDS", "JsonlSource", "encode_example", "make_dataset", "pack_sequences", "pad_sequences"]

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32}
_log = logging.getLogger(__name__)
ChatFormat = Llama3ChatFormat | TemplateChatFormat


# --------------------------------------------------------------------------------------------- tokenisation


def _messages_of(example: Any) -> list[Mapping[str, Any]] | None:
    """The dialog of an example, or None for a plain-text example. Raises on anything else."""
    if isinstance(example, Mapping):
        keys = set(example)
        if keys == {"text"}:
            if not isinstance(example["text"], str):
                raise InvalidInputError(f"example['text'] must be a str, got {type(example['text']).__name__}")
            return None
        if keys == {"messages"}:
            example = example["messages"]
        else:
            raise InvalidInputError(
                f"an example dict must have exactly one key, 'messages' (a dialog) or 'text' (plain text); "
                f"got keys {sorted(keys)}"
            )
    if isinstance(example, (str, bytes)) or not isinstance(example, Sequence):
        raise InvalidInputError(
            f"an example must be a list of messages, {{'messages': [...]}} or {{'text': ...}}; got {type(example)}"
        )
    messages = list(example)
    if not messages:
        raise InvalidInputError("an example dialog must hold at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        content = m.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            if any(isinstance(p, Mapping) and p.get("type") == "image" for p in content):
                raise InvalidInputError(
                    f"messages[{i}] has an image part; the fine-tuning pipeline builds text-only batches, so content "
                    "must be text (a str or text parts)"
                )
    return messages


def _llama3_spans(fmt: Llama3ChatFormat, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
    # The same pieces, in the same order, as Llama3ChatFormat.encode_dialog(add_generation_prompt=False).
    tokens, mask = [fmt.tokenizer.token_to_id("<|begin_of_text|>")], [False]
    for i, m in enumerate(messages):
        ids = fmt.encode_message(m, index=i)
        n_header = len(fmt.encode_header(m["role"]))
        trained = m["role"] == "assistant"
        tokens.extend(ids)
        mask.extend([False] * n_header + [trained] * (len(ids) - n_header))
    return tokens, mask


def _template_spans(fmt: TemplateChatFormat, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
    """Assistant spans by rendering prefixes: turn i spans ``enc(m[:i+1])`` minus ``enc(m[:i]) + assistant header``."""
    tokens = fmt.encode_dialog(messages, add_generation_prompt=False)
    mask = [False] * len(tokens)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InvalidInputError(
                "messages[0] is an assistant turn; with a chat template the assistant span is found by rendering "
                "the messages before it, so a dialog must start with a system or user message"
            )
        prompt = fmt.encode_dialog(messages[:i], add_generation_prompt=True)
        upto = fmt.encode_dialog(messages[: i + 1], add_generation_prompt=False)
        if upto[: len(prompt)] != prompt or tokens[: len(upto)] != upto:
            raise InvalidInputError(
                f"messages[{i}]: the chat template does not render this dialog prefix-stably (the tokens of the "
                "dialog up to this turn are not a prefix of the whole dialog's), so the assistant span cannot be found"
            )
        mask[len(prompt) : len(upto)] = [True] * (len(upto) - len(prompt))
    return tokens, mask


def _check_tokenizer(tokenizer: Any) -> None:
    if not isinstance(tokenizer, Tokenizer):
        raise InvalidInputError(
            f"tokenizer must be a llama32_jax tokenizer (LlamaTokenizer, HFTokenizer or lj.load(...).tokenizer), "
            f"got {type(tokenizer).__name__}"
        )


def encode_example(
    example: Any, tokenizer: Tokenizer, *, chat_format: ChatFormat | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise one example -> ``(tokens [n] int32, loss_mask [n] bool)``; ``loss_mask[j]``: token j is trained.

    Dialogs use ``chat_format`` (default :func:`chat_format_for(tokenizer) <chat_format_for>`). With
    :class:`Llama3ChatFormat` the tokens equal ``encode_dialog(messages, add_generation_prompt=False)``; with a
    :class:`TemplateChatFormat` they equal the rendered template's encoding and each assistant span is everything the
    template writes after the assistant header up to the end of that turn. An example without any trained token (a
    dialog with no assistant turn) is an error: it is almost always a data mistake, and it would only waste compute.
    """
    _check_tokenizer(tokenizer)
    messages = _messages_of(example)
    if messages is None:
        bos = bool(getattr(tokenizer, "add_bos", True)) and tokenizer.bos_id is not None
        ids = tokenizer.encode(example["text"], bos=bos, eos=tokenizer.eos_id is not None)
        mask = [not (bos and j == 0) for j in range(len(ids))]
    else:
        fmt = chat_format if chat_format is not None else chat_format_for(tokenizer)
        if isinstance(fmt, Llama3ChatFormat):
            ids, mask = _llama3_spans(fmt, messages)
        elif isinstance(fmt, TemplateChatFormat):
            ids, mask = _template_spans(fmt, messages)
        else:
            raise InvalidInputError(f"chat_format must be a Llama3ChatFormat or TemplateChatFormat, got {fmt!r}")
    # Token 0 is never a target (nothing precedes it), so it cannot count as trainable.
    if not any(mask[1:]):
        what = "plain text of fewer than 2 tokens" if messages is None else "a dialog without an assistant turn"
        raise InvalidInputError(f"the example has no trainable token ({what}); every example must train something")
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


# --------------------------------------------------------------------------------------------- rows


class _ShiftTruncate:
    """``(tokens [n], mask [n])`` -> ``{inputs, targets, loss_mask}`` of length ``min(n - 1, seq_len)``.

    Counts truncated sequences in ``num_truncated`` (per process) and logs the first few, then every 1000th.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.num_truncated, self._lock = seq_len, 0, threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain worker processes
        return {"seq_len": self.seq_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["seq_len"])

    def __call__(self, element: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, mask = element
        n = len(tokens)
        if n - 1 > self.seq_len:
            with self._lock:
                self.num_truncated += 1
                count = self.num_truncated
            if count <= 10 or count % 1000 == 0:
                lost = int(mask[self.seq_len + 1 :].sum())
                _log.warning(
                    "truncated a sequence of %d tokens to seq_len + 1 = %d (%d trained tokens dropped); "
                    "%d sequence(s) truncated so far in this process",
                    n,
                    self.seq_len + 1,
                    lost,
                    count,
                )
            tokens, mask = tokens[: self.seq_len + 1], mask[: self.seq_len + 1]
        return {
            "inputs": tokens[:-1].astype(np.int32),
            "targets": tokens[1:].astype(np.int32),
            "loss_mask": mask[1:].astype(np.float32),
        }


def _as_iter(sequences: Any) -> grain.IterDataset:
    if isinstance(sequences, grain.IterDataset):
        return sequences
    if isinstance(sequences, grain.MapDataset):
        return sequences.to_iter_dataset()
    if isinstance(sequences, Sequence):
        return grain.MapDataset.source(list(sequences)).to_iter_dataset()
    raise InvalidInputError(
        f"sequences must be a grain MapDataset/IterDataset or a list of (tokens, loss_mask) pairs, got {sequences!r}"
    )


def _check_seq_len(seq_len: Any) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise InvalidInputError(f"seq_len must be an int >= 2, got {seq_len!r}")
    return int(seq_len)


def _from_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: packed[k].astype(_DTYPES[k]) for k in ("inputs", "targets", "loss_mask")}
    row["segment_ids"] = packed["inputs_segment_ids"].astype(np.int32)
    row["positions"] = packed["inputs_positions"].astype(np.int32)
    return row


def pack_sequences(sequences: Any, seq_len: int, *, num_bins: int = 1) -> grain.IterDataset:
    """Pack ``(tokens, loss_mask)`` sequences into rows of ``seq_len`` positions (fields: module docstring).

    ``sequences`` is a grain ``MapDataset``/``IterDataset`` or a list of ``(tokens [n] int, mask [n] bool)`` pairs.
    Packing is grain's first-fit over ``num_bins`` open rows, bins emitted in order (no shuffling): deterministic,
    and with ``num_bins=1`` purely sequential. The iterator is checkpointable.
    """
    seq_len = _check_seq_len(seq_len)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise InvalidInputError(f"num_bins must be an int >= 1, got {num_bins!r}")
    ds = _as_iter(sequences).map(_ShiftTruncate(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False
    )
    return ds.map(_from_packed)


def _pad_row(fields: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    n = len(fields["inputs"])
    row = {k: np.zeros(seq_len, dt) for k, dt in _DTYPES.items()}
    for k in ("inputs", "targets", "loss_mask"):
        row[k][:n] = fields[k]
    row["segment_ids"][:n] = 1
    row["positions"] = np.zeros(seq_len, np.int32)
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    return row


def pad_sequences(sequences: Any, seq_len: int) -> grain.IterDataset:
    """One row per sequence, right-padded to ``seq_len`` (``segment_ids`` 1 on real positions); no packing."""
    seq_len = _check_seq_len(seq_len)
    return _as_iter(sequences).map(_ShiftTruncate(seq_len)).map(functools.partial(_pad_row, seq_len=seq_len))


def _collate(rows: Sequence[dict[str, np.ndarray]], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Stack rows to ``[batch_size, seq_len]``; a short final batch is filled with all-padding rows (loss_mask 0)."""
    empty = {k: np.zeros(seq_len, _DTYPES.get(k, np.int32)) for k in FIELDS}
    rows = list(rows) + [empty] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


# --------------------------------------------------------------------------------------------- sources


class JsonlSource:
    """A grain random-access source over a JSONL file: one example per non-blank line, parsed on access.

    Construction scans the file once for line offsets (kept in memory, 16 bytes a line); ``source[i]`` returns
    ``(label, example)`` where label names the file and 1-based line number. A line that is not JSON raises
    :class:`InvalidInputError` naming that line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not os.fspath(path):
            raise InvalidInputError(
                "the JSONL path is an empty string; give the path of a file with one example a line"
            )
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidInputError(f"JSONL path {self.path} is a directory; give a file with one example per line")
        if not self.path.is_file():
            raise InvalidInputError(f"JSONL file not found: {self.path} (expected a file with one example per line)")
        starts, ends, lines = [], [], []
        offset = 0
        try:
            with open(self.path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        starts.append(offset)
                        ends.append(offset + len(line))
                        lines.append(lineno)
                    offset += len(line)
        except OSError as e:
            raise InvalidInputError(f"cannot read JSONL file {self.path}: {e.strerror or e}") from e
        self._starts, self._ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        self._lines = np.asarray(lines, np.int64)
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:  # the file descriptor stays in its process
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self._starts[index]), int(self._ends[index])
        raw = os.pread(self._fd, end - start, start)  # positional read: safe from grain's reader threads
        label = f"{self.path} line {int(self._lines[index])}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInputError(
                f"{label} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); JSONL files are UTF-8"
            ) from e
        try:
            return label, json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{label} is not valid JSON ({e}); each line must be one JSON example") from e

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, {len(self)} examples)"


class _ListSource:
    """A list of examples as a grain source of ``(label, example)``."""

    def __init__(self, examples: Sequence[Any]) -> None:
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return f"examples[{index}]", self._examples[index]


class _Encode:
    """``(label, example)`` -> ``encode_example(example)``; errors are prefixed with the label (file line / index)."""

    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat | None) -> None:
        if chat_format is None:
            try:  # once, not per example (a Jinja template compiles slowly)
                chat_format = chat_format_for(tokenizer)
            except TokenizerError:  # fine for plain text; a dialog then raises the same error from encode_example
                pass
        self.tokenizer, self.chat_format = tokenizer, chat_format

    def __call__(self, labelled: tuple[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        label, example = labelled
        try:
            return encode_example(example, self.tokenizer, chat_format=self.chat_format)
        except InvalidInputError as e:
            raise InvalidInputError(f"{label}: {e}") from e


# --------------------------------------------------------------------------------------------- pipeline


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def make_dataset(
    examples_or_path: Sequence[Any] | str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_by_process: bool = True,
    shard: tuple[int, int] | None = None,
    worker_count: int = 0,
    pack: bool = True,
    num_packing_bins: int | None = None,
    chat_format: ChatFormat | None = None,
) -> grain.IterDataset:
    """A grain pipeline of training batches: dicts of numpy arrays ``[batch_size, seq_len]`` (module docstring).

    Args:
      examples_or_path: a list of examples, or the path of a JSONL file with one example per line.
      tokenizer: tokenises the examples; dialogs use ``chat_format`` or ``chat_format_for(tokenizer)``.
      seq_len: positions per row (>= 2); a sequence of more than ``seq_len + 1`` tokens is truncated.
      batch_size: rows per batch *in this process* (the global batch is ``batch_size * shard count``).
      seed, shuffle: a global, per-epoch reshuffled order of this shard's examples (grain's index shuffle).
      num_epochs: passes over the data; None repeats forever. A finite run's last batch is filled up with
        all-padding rows (``loss_mask`` 0), so every batch has the same shape.
      shard_by_process: give each JAX process the examples ``process_index::process_count``; ``shard=(index,
        count)`` overrides it (tests, or a custom split). Shards differ by at most one example; with packing, their
        batch counts per epoch can differ, so multi-process runs should use ``num_epochs=None`` and a step count.
      worker_count: grain worker processes (0: everything in this process). With workers, packing runs per worker,
        so the batches differ from ``worker_count=0`` (still deterministic). Marks absl flags parsed if they are not
        (grain's worker start-up reads an absl flag).
      pack: pack several sequences per row (first-fit over ``num_packing_bins`` rows, default ``batch_size``);
        False gives one example per row, right-padded.
      chat_format: overrides the tokenizer's chat format for dialogs.

    Returns:
      a ``grain.IterDataset``; ``it = iter(ds)`` has ``it.get_state()`` (a JSON-serialisable dict) and
      ``it.set_state(state)``: after restoring, a fresh iterator yields exactly the batches the saved one would have.
    """
    seq_len = _check_seq_len(seq_len)
    batch_size = _positive_int("batch_size", batch_size)
    _check_tokenizer(tokenizer)
    for name, flag in (("shuffle", shuffle), ("shard_by_process", shard_by_process), ("pack", pack)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InvalidInputError(f"{name} must be True or False, got {flag!r}")
    if num_packing_bins is not None:
        num_packing_bins = _positive_int("num_packing_bins", num_packing_bins)
    if num_epochs is not None:
        num_epochs = _positive_int("num_epochs", num_epochs)
    if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 0:
        raise InvalidInputError(f"worker_count must be an int >= 0, got {worker_count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InvalidInputError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if isinstance(examples_or_path, (str, os.PathLike)):
        source: Any = JsonlSource(examples_or_path)
        what = str(examples_or_path)
    elif isinstance(examples_or_path, Sequence) and not isinstance(examples_or_path, bytes):
        source, what = _ListSource(examples_or_path), "the example list"
    else:
        raise InvalidInputError(
            f"examples_or_path must be a list of examples or a JSONL path, got {type(examples_or_path).__name__}"
        )
    if len(source) == 0:
        raise InvalidInputError(f"the dataset is empty: {what} holds no examples")

    if shard is not None:
        if not (isinstance(shard, tuple) and len(shard) == 2 and all(_is_int(v) for v in shard)):
            raise InvalidInputError(f"shard must be a tuple (index, count) of ints, got {shard!r}")
        index, count = int(shard[0]), int(shard[1])
    elif shard_by_process:
        opts = grain.sharding.ShardByJaxProcess()
        index, count = opts.shard_index, opts.shard_count
    else:
        index, count = 0, 1
    if not (count >= 1 and 0 <= index < count):
        raise InvalidInputError(f"shard (index, count) must have count >= 1 and 0 <= index < count, got {shard!r}")
    ds = grain.MapDataset.source(source)[index::count]
    if len(ds) == 0:
        raise InvalidInputError(f"shard {index} of {count} is empty: {what} holds only {len(source)} examples")
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs).map(_Encode(tokenizer, chat_format))
    sequences = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=256))
    if pack:
        bins = batch_size if num_packing_bins is None else num_packing_bins
        rows = pack_sequences(sequences, seq_len, num_bins=bins)
    else:
        rows = pad_sequences(sequences, seq_len)
    batches = rows.batch(
        batch_size, drop_remainder=False, batch_fn=functools.partial(_collate, batch_size=batch_size, seq_len=seq_len)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return batches
