"""Llama Guard 3 (1B, 11B-Vision): the moderation prompt and its verdict.

Llama Guard 3 is a Llama 3.2 model fine-tuned to classify the last turn of a conversation as safe or unsafe under
the MLCommons hazard taxonomy. The two published guards share the Llama 3.2 1B and 11B-Vision architectures, so
any model this library loads runs it; only the prompt and the parsing are specific.

The prompt follows the chat template Meta ships with the HF checkpoints (``meta-llama/Llama-Guard-3-1B`` and
``-11B-Vision``; the two are identical), which the model cards and Meta's cookbook use:

- one user turn: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>`` + ``"\\n\\n"``;
- with an image (vision guard, at most one): ``<|image|>`` and a space, before the task;
- the task sentence naming the role judged (``'User'``, or ``'Agent'`` when the conversation ends with the
  assistant's reply), the category list ``S1: Violent Crimes.`` ... (13 by default: both 3.2 guards were trained
  on S1-S13; ``S14: Code Interpreter Abuse.`` belongs to the 8B guard), the conversation as ``User: ...`` /
  ``Agent: ...`` paragraphs (each text part trimmed), and the two answer-format lines;
- ``" <|eot_id|><|start_header_id|>assistant<|end_header_id|>"``, with nothing after the header (the model
  writes ``"\\n\\n"`` first, then its verdict).

The verdict is ``safe``, or ``unsafe`` and a second line of comma-separated category codes (``S1,S10``); it ends
with ``<|eot_id|>``. :func:`parse_verdict` accepts surrounding whitespace and spaces after commas, and raises
:class:`ModerationError` (carrying the raw text) for anything else.

User text is tokenized as plain text: a message containing ``<|eot_id|>`` cannot inject special tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from llama32_jax.errors import InvalidInputError, LlamaJaxError

# The hazard categories of Llama Guard 3's prompt (the short names the model was trained with, not the longer
# titles of the model-card tables, e.g. "Sex Crimes." rather than "Sex-Related Crimes").
HAZARD_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
}
# The 8B guard's 14th category; not in the 3.2 guards' default prompt (pass it in ``categories`` to use it).
CODE_INTERPRETER_ABUSE = {"S14": "Code Interpreter Abuse."}

_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
    "with the below categories."
)
_INSTRUCTIONS = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)
_SPEAKERS = {"user": "User", "assistant": "Agent"}
# Enough for "\n\n" + "unsafe" + "\n" + every code: the cookbook uses 20 (1B) and 50 (11B-Vision).
DEFAULT_MAX_NEW_TOKENS = 32


class ModerationError(LlamaJaxError, ValueError):
    """The guard model's output is not a verdict (``safe`` / ``unsafe`` + codes); ``raw`` holds what it wrote."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


@dataclasses.dataclass(frozen=True)
class ModerationResult:
    """Llama Guard's verdict on the last message of a conversation.

    ``safe``: the verdict. ``categories``: the violated codes (``("S1", "S10")``; empty when safe), in the model's
    order. ``names``: their prompt names (``"Violent Crimes."``; ``None`` for a code not in the prompt).
    ``role``: whose message was judged, ``"User"`` or ``"Agent"``. ``raw``: the model's text.
    """

    safe: bool
    categories: tuple[str, ...]
    names: tuple[str | None, ...]
    role: Literal["User", "Agent"]
    raw: str

    @property
    def verdict(self) -> str:
        return "safe" if self.safe else "unsafe"

    def __bool__(self) -> bool:  # `if result:` would not mean "is safe"
        raise TypeError("use result.safe (a ModerationResult is not a boolean)")


@dataclasses.dataclass(frozen=True)
class GuardPrompt:
    """The prompt as segments: ``str`` pieces are plain text, :class:`Special` ones are special tokens."""

    segments: tuple[Any, ...]
    role: Literal["User", "Agent"]
    images: tuple[Any, ...]
    categories: Mapping[str, str]

    def text(self) -> str:
        """The prompt as one string (special tokens written out), as the HF chat template renders it."""
        return "".join(s.name if isinstance(s, Special) else s for s in self.segments)

    def token_ids(self, tokenizer) -> list[int]:
        """Token ids: each special token by id, each text run (user text included) as plain text."""
        ids: list[int] = []
        for s in self.segments:
            if isinstance(s, Special):
                token = tokenizer.token_to_id(s.name)
                if token is None:
                    raise InvalidInputError(f"the tokenizer has no {s.name} token; Llama Guard 3 needs a Llama 3 one")
                ids.append(token)
            elif s:
                ids.extend(tokenizer.encode(s, allow_special=False))
        return ids


@dataclasses.dataclass(frozen=True)
class Special:
    name: str


def _parts(i: int, content: Any) -> tuple[list[str], list[Any]]:
    """A message's text parts and images: ``content`` is a string or a list of ``{"type": "text"|"image"}``."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, (list, tuple)):
        raise InvalidInputError(
            f"message {i}: content must be a string or a list of text/image parts, got {type(content).__name__}"
        )
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            if part.get("image") is None:
                raise InvalidInputError(f"message {i} part {j}: an image part needs its image under 'image'")
            images.append(part["image"])
        else:
            raise InvalidInputError(
                f"message {i} part {j}: expected {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': ...}}"
            )
    return texts, images


def check_categories(categories: Any, excluded_categories: Any) -> dict[str, str]:
    """The categories the prompt lists: ``categories`` (default: the 13 hazards) without ``excluded_categories``."""
    if categories is not None and not isinstance(categories, Mapping):
        raise InvalidInputError(
            "categories must be None or a mapping of code -> description (e.g. {'S1': 'Violent Crimes.'}), got "
            f"{type(categories).__name__}"
        )
    cats = dict(HAZARD_CATEGORIES if categories is None else categories)
    if not cats or not all(isinstance(k, str) and isinstance(v, str) for k, v in cats.items()):
        raise InvalidInputError("categories must be a non-empty mapping of code -> description strings")
    if isinstance(excluded_categories, str) or not isinstance(excluded_categories, (list, tuple, set, frozenset)):
        raise InvalidInputError(
            f"excluded_categories must be a list of category codes such as ['S6'], got {excluded_categories!r}"
        )
    unknown = [c for c in excluded_categories if c not in cats]
    if unknown:
        raise InvalidInputError(f"excluded_categories {unknown} are not among the categories {list(cats)}")
    cats = {k: v for k, v in cats.items() if k not in set(excluded_categories)}
    if not cats:
        raise InvalidInputError("excluded_categories removes every category; nothing would be checked")
    return cats


def build_prompt(
    conversation: Sequence[Mapping[str, Any]],
    *,
    categories: Mapping[str, str] | None = None,
    excluded_categories: Sequence[str] = (),
) -> GuardPrompt:
    """Llama Guard 3's prompt for ``conversation``: alternating ``{"role": "user"|"assistant", "content"}``
    messages starting with the user (no system message). The last message is judged.

    ``categories`` replaces the 13 default categories (``{"S1": "Violent Crimes.", ...}``; each line is
    ``code: text``). ``excluded_categories`` drops codes from the list without renumbering the rest.
    """
    if isinstance(conversation, Mapping) or not isinstance(conversation, (list, tuple)) or not conversation:
        raise InvalidInputError(
            "conversation must be a non-empty list of {'role', 'content'} messages, got "
            f"{type(conversation).__name__}"
        )
    cats = check_categories(categories, excluded_categories)

    paragraphs, images = [], []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            got = sorted(message) if isinstance(message, Mapping) else type(message).__name__
            raise InvalidInputError(f"message {i} must be a mapping with 'role' and 'content', got {got}")
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InvalidInputError(
                f"message {i} has role {message['role']!r}; Llama Guard conversations alternate user/assistant "
                f"starting with the user (so message {i} must be {expected!r}), with no system message"
            )
        texts, found = _parts(i, message["content"])
        images.extend(found)
        paragraphs.extend(f"{_SPEAKERS[expected]}: {t.strip()}\n\n" for t in texts)
    role: Literal["User", "Agent"] = "Agent" if len(conversation) % 2 == 0 else "User"

    lines = "".join(f"{code}: {text}\n" for code, text in cats.items())
    body = (
        f"{_TASK.format(role=role)}\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{lines}<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{''.join(paragraphs)}<END CONVERSATION>\n\n{_INSTRUCTIONS.format(role=role)} "
    )
    head: list[Any] = [Special("<|begin_of_text|>"), Special("<|start_header_id|>"), "user"]
    head += [Special("<|end_header_id|>"), "\n\n"]
    if images:
        head += [Special("<|image|>"), " " + body]
    else:
        head[-1] += body
    tail = [Special("<|eot_id|>"), Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>")]
    return GuardPrompt(tuple(head + tail), role, tuple(images), cats)


_CODE = re.compile(r"^[A-Za-z0-9_]+$")


def parse_verdict(text: str, *, role: Literal["User", "Agent"] = "User", categories=None) -> ModerationResult:
    """Parse the model's answer: ``safe``, or ``unsafe`` then a line of comma-separated codes (``S1,S10``).

    Surrounding whitespace and an ``<|eot_id|>`` left in the text are ignored; anything else raises
    :class:`ModerationError` with the raw text. ``categories`` (code -> name) fills ``names``.
    """
    cats = HAZARD_CATEGORIES if categories is None else categories
    cleaned = text.replace("<|eot_id|>", "").strip()
    lines = [line.strip() for line in cleaned.splitlines() if line.strip()]
    if lines == ["safe"]:
        return ModerationResult(True, (), (), role, text)
    if len(lines) == 2 and lines[0] == "unsafe":
        codes = tuple(c.strip() for c in lines[1].split(","))
        if codes and all(_CODE.match(c) for c in codes):
            return ModerationResult(False, codes, tuple(cats.get(c) for c in codes), role, text)
    if lines == ["unsafe"]:
        raise ModerationError("the guard answered 'unsafe' without a line of category codes", text)
    raise ModerationError(
        f"the guard's output is not a verdict ('safe', or 'unsafe' and a line of codes): {text[:200]!r}; is this "
        "a Llama Guard 3 checkpoint?",
        text,
    )
