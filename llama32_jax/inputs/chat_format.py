"""Chat formatting: Meta's Llama 3 dialog format, and Jinja chat templates for other HF tokenizers.

A message is a dict ``{"role": ..., "content": ...}``; content is a string or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image", ...}`` (the image payload itself travels separately; the
part only marks where ``<|image|>`` goes).

:class:`Llama3ChatFormat` follows Meta's ``ChatFormat`` (docs/model-facts.md §7.3)::

    <|begin_of_text|> ( <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> )*
    [ <|start_header_id|>assistant<|end_header_id|>\\n\\n ]

Content is always encoded as plain text, so a user who types ``<|eot_id|>`` cannot end a turn.
:class:`TemplateChatFormat` renders a tokenizer's Jinja ``chat_template`` the way transformers'
``apply_chat_template`` does and encodes the result with special tokens recognised (transformers' default).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama32_jax.errors import InvalidInputError, TokenizerError
from llama32_jax.inputs.tokenizer import Tokenizer

__all__ = ["ROLES", "Llama3ChatFormat", "TemplateChatFormat", "chat_format_for", "knowledge_date_preamble"]

ROLES = ("system", "user", "assistant", "ipython")
_ROLE_ALIASES = {"tool": "ipython"}  # Meta's Role.tool is rendered "ipython"
# Roles a Jinja chat template is given; anything else is a typo the template would render without complaint.
TEMPLATE_ROLES = ("system", "user", "assistant", "tool", "ipython")
_MESSAGE_KEYS = ("role", "content", "stop_reason", "python_tag")
_STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
# Tokens without which a tokenizer cannot carry the Llama 3 dialog format.
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# English month names, so the date does not depend on the process locale (strftime %B does).
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def knowledge_date_preamble(date: _dt.date) -> str:
    """The date-stamped system preamble of Llama 3.2 instruct prompts (``"%d %B %Y"``, English month names)."""
    if not isinstance(date, _dt.date):
        raise InvalidInputError(f"system_date must be a datetime.date, got {type(date).__name__}")
    return (
        f"Cutting Knowledge Date: December 2023\nToday Date: {date.day:02d} {_MONTHS[date.month - 1]} {date.year}\n\n"
    )


def _check_messages(messages: Any, *, template: bool = False) -> Sequence[Mapping[str, Any]]:
    """The dialog's shape: a non-empty list of dicts, each with a string role and content (a str or a list of parts;
    templates also take None, as for tool calls), a system message only first."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidInputError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidInputError("messages must be a non-empty list of message dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise InvalidInputError(f"messages[{i}] needs a string 'role', got {m.get('role')!r}")
        if m["role"] == "system" and i > 0:
            raise InvalidInputError(f"messages[{i}] is a system message; a system message may only come first")
        if "content" not in m and not (template and "tool_calls" in m):
            raise InvalidInputError(f"messages[{i}] has no 'content'")
        content = m.get("content")
        if template and content is not None and not isinstance(content, str):
            if not isinstance(content, (list, tuple)) or not all(isinstance(p, Mapping) for p in content):
                raise InvalidInputError(
                    f"messages[{i}]['content'] must be a str or a list of part dicts, got {type(content).__name__}"
                )
        elif not template:
            _content_parts(i, content)
    return messages


def _check_options(options: Mapping[str, Any], valid: Sequence[str], what: str) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvalidInputError(f"unknown chat option(s) {unknown} for {what}; valid options are {list(valid)}")


def _content_parts(i: int, content: Any) -> list[str | None]:
    """Message content -> list of text strings and ``None`` (an image) in order."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        parts: list[str | None] = []
        for j, part in enumerate(content):
            where = f"messages[{i}]['content'][{j}]"
            if not isinstance(part, Mapping):
                raise InvalidInputError(f"{where} must be a dict with a 'type', got {type(part).__name__}")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidInputError(
                        f"{where} is a text part and needs a string 'text', got {part.get('text')!r}"
                    )
                parts.append(part["text"])
            elif kind == "image":
                parts.append(None)
            else:
                raise InvalidInputError(f"{where} has type {kind!r}; valid part types are 'text' and 'image'")
        return parts
    raise InvalidInputError(
        f"messages[{i}]['content'] must be a str or a list of text/image parts, got {type(content).__name__}"
    )


def dialog_images(messages: Any, *, text_model: str | None = None) -> list:
    """The image payloads of a dialog's ``{"type": "image", "image": ...}`` parts, in order.

    ``text_model``: the name of a text-only model, for which any image part is an error naming the message."""
    out = []
    for i, message in enumerate(messages if isinstance(messages, (list, tuple)) else []):
        content = message.get("content") if isinstance(message, Mapping) else None
        for j, part in enumerate(content if isinstance(content, (list, tuple)) else []):
            if isinstance(part, Mapping) and part.get("type") == "image":
                if text_model is not None:
                    raise InvalidInputError(
                        f"messages[{i}]['content'][{j}] is an image, but {text_model} is a text model; images need "
                        "a Llama 3.2 Vision model"
                    )
                if part.get("image") is None:
                    raise InvalidInputError(
                        f"messages[{i}]['content'][{j}] is an image part without its image: "
                        '{"type": "image", "image": <PIL image, uint8 array or path>}'
                    )
                out.append(part["image"])
    return out


class Llama3ChatFormat:
    """Meta's Llama 3 chat format over any tokenizer that has the Llama 3 special tokens (Meta's or HF's)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in _LLAMA3_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"{tokenizer!r} lacks the Llama 3 chat tokens {missing}; it cannot use Llama3ChatFormat"
            )
        self.tokenizer = tokenizer
        self._bos, self._start, self._end, self._eot = (tokenizer.token_to_id(t) for t in _LLAMA3_TOKENS)
        newlines = tokenizer.encode("\n\n")
        # Meta encodes the role name as text: "ipython" is two tokens, the others one.
        self._headers = {role: [self._start, *tokenizer.encode(role), self._end, *newlines] for role in ROLES}

    options = ("system_date",)  # keyword options of encode_dialog besides add_generation_prompt

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse keyword options this format does not have (``Model.chat(**options)``), listing the valid ones."""
        _check_options(options, self.options, "the Llama 3 chat format")

    def _special(self, name: str, why: str) -> int:
        tid = self.tokenizer.token_to_id(name)
        if tid is None:
            raise InvalidInputError(f"{why} needs the token {name}, which {self.tokenizer!r} does not have")
        return tid

    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` (``"tool"`` is rendered ``"ipython"``)."""
        role = _ROLE_ALIASES.get(role, role)
        if role not in self._headers:
            valid = ", ".join(repr(r) for r in (*ROLES, *_ROLE_ALIASES))
            raise InvalidInputError(f"unknown chat role {role!r}; valid roles are {valid}")
        return list(self._headers[role])

    def _encode_parts(self, parts: Sequence[str | None], where: str) -> list[int]:
        ids: list[int] = []
        for part in parts:  # each part is encoded on its own, as Meta does
            if part is None:
                ids.append(self._special("<|image|>", f"the image part in {where}"))
            else:
                ids.extend(self.tokenizer.encode(part))
        return ids

    def encode_message(self, message: Mapping[str, Any], *, index: int = 0) -> list[int]:
        """One message: header, content, then ``<|eot_id|>`` (or ``<|eom_id|>``, see the module docstring)."""
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidInputError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        unknown = sorted(set(message) - set(_MESSAGE_KEYS))
        if unknown:
            raise InvalidInputError(f"{where} has unknown keys {unknown}; valid keys are {list(_MESSAGE_KEYS)}")
        if "content" not in message:
            raise InvalidInputError(f"{where} has no 'content'")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidInputError(f"{where} needs a string 'role', got {role!r}")
        try:
            ids = self.encode_header(role)
        except InvalidInputError as e:
            raise InvalidInputError(f"{where}: {e}") from None
        stop, python_tag = message.get("stop_reason"), message.get("python_tag", False)
        if stop is not None and stop not in _STOP_REASONS:
            raise InvalidInputError(
                f"{where}['stop_reason'] is {stop!r}; valid values are {list(_STOP_REASONS)} or None"
            )
        if not isinstance(python_tag, bool):
            raise InvalidInputError(f"{where}['python_tag'] must be a bool, got {python_tag!r}")
        if role != "assistant" and (stop is not None or python_tag):
            raise InvalidInputError(f"{where}: 'stop_reason' and 'python_tag' apply to assistant messages only")
        if python_tag:  # a builtin tool call (code interpreter) follows
            ids.append(self._special("<|python_tag|>", f"{where}['python_tag']"))
        ids.extend(self._encode_parts(_content_parts(index, message["content"]), where))
        if stop == "end_of_message":  # a tool call is pending: end of message, not of turn
            ids.append(self._special("<|eom_id|>", f"{where}['stop_reason']"))
        else:
            ids.append(self._eot)
        return ids

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        system_date: _dt.date | None = None,
    ) -> list[int]:
        """Encode a dialog: BOS, every message, then (by default) the open assistant header.

        ``system_date`` adds the date-stamped system preamble (:func:`knowledge_date_preamble`), merged into the
        dialog's leading system message if it has one, else as a system message of its own.
        """
        messages = list(_check_messages(messages))
        ids = [self._bos]
        if system_date is not None:
            preamble = knowledge_date_preamble(system_date)
            if messages[0]["role"] == "system" and "content" in messages[0]:
                first = dict(messages[0])
                if isinstance(first["content"], str):
                    first["content"] = preamble + first["content"]
                else:  # parts: the preamble joins a leading text part, else goes in front
                    parts = _content_parts(0, first["content"])
                    if parts and parts[0] is not None:
                        parts[0] = preamble + parts[0]
                    else:
                        parts.insert(0, preamble)
                    first["content"] = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
                messages[0] = first
            else:
                ids.extend(self.encode_message({"role": "system", "content": preamble}))
        for i, message in enumerate(messages):
            ids.extend(self.encode_message(message, index=i))
        if add_generation_prompt:
            ids.extend(self._headers["assistant"])
        return ids


class TemplateChatFormat:
    """A Jinja ``chat_template`` (e.g. SmolLM2's ChatML), rendered as transformers' ``apply_chat_template`` does."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise TokenizerError(f"{tokenizer!r} has no chat_template and none was given")
        self.tokenizer = tokenizer
        self.chat_template = template
        try:
            env = _jinja_env()
            self._template = env.from_string(template)
            variables = _jinja2_meta().find_undeclared_variables(env.parse(template))
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TokenizerError(f"the chat template of {tokenizer!r} does not compile: {e}") from e
        # The variables a caller may set: those the template reads, except the ones render() always passes.
        self.template_vars = tuple(sorted(variables - {"messages", "add_generation_prompt", "raise_exception"}))

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options of ``encode_dialog`` / ``render`` besides ``add_generation_prompt``."""
        return ("system_date", *self.template_vars)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse options the template never reads (they would be ignored silently), listing the valid ones."""
        _check_options(options, self.options, "this chat template")

    def _special_token_vars(self) -> dict[str, str]:
        out = {}
        for var, tid in (
            ("bos_token", self.tokenizer.bos_id),
            ("eos_token", self.tokenizer.eos_id),
            ("pad_token", getattr(self.tokenizer, "pad_id", None)),
        ):
            if tid is not None:
                out[var] = self.tokenizer.id_to_piece(tid)
        return out

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        system_date: _dt.date | None = None,
        **template_vars: Any,
    ) -> str:
        """The rendered prompt string. ``template_vars`` (e.g. ``tools``) reach the template as variables.

        ``system_date`` fixes the date the template sees, through ``strftime_now`` and ``date_string``.
        """
        import jinja2

        self.check_options(template_vars)
        messages = [{k: v for k, v in m.items() if v is not None} for m in _check_messages(messages, template=True)]
        for i, m in enumerate(messages):
            if m["role"] not in TEMPLATE_ROLES:
                valid = ", ".join(repr(r) for r in TEMPLATE_ROLES)
                raise InvalidInputError(f"messages[{i}] has unknown chat role {m['role']!r}; valid roles are {valid}")
        context: dict[str, Any] = {**self._special_token_vars(), **template_vars}
        if system_date is not None:
            if not isinstance(system_date, _dt.date):
                raise InvalidInputError(f"system_date must be a datetime.date, got {type(system_date).__name__}")
            fixed = _dt.datetime(system_date.year, system_date.month, system_date.day)
            context.setdefault("strftime_now", fixed.strftime)
            context.setdefault("date_string", f"{fixed.day:02d} {_MONTHS[fixed.month - 1][:3]} {fixed.year}")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:  # includes raise_exception(...) from the template
            raise InvalidInputError(f"the chat template rejected the messages: {e}") from e

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        system_date: _dt.date | None = None,
        **template_vars: Any,
    ) -> list[int]:
        """Render, then encode with special tokens recognised. No BOS is added: the template writes its own."""
        text = self.render(
            messages, add_generation_prompt=add_generation_prompt, system_date=system_date, **template_vars
        )
        return self.tokenizer.encode(text, allow_special=True)


def _jinja2_meta() -> Any:
    import jinja2.meta

    return jinja2.meta


def _jinja_env() -> Any:
    """A sandboxed Jinja environment with the extras HF chat templates rely on."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders.
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # Jinja's own tojson escapes HTML characters, which chat templates do not want.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    return env


def chat_format_for(tokenizer: Tokenizer) -> Llama3ChatFormat | TemplateChatFormat:
    """Llama3ChatFormat when the tokenizer has the Llama 3 header tokens, else its Jinja template if it has one."""
    if all(tokenizer.token_to_id(t) is not None for t in _LLAMA3_TOKENS):
        return Llama3ChatFormat(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return TemplateChatFormat(tokenizer)
    raise TokenizerError(
        f"no chat format for {tokenizer!r}: it has neither the Llama 3 tokens {list(_LLAMA3_TOKENS)} nor a "
        "chat_template (pass one to TemplateChatFormat)"
    )
