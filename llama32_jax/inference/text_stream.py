"""Streaming text: per-step token arrays from the decode loop become text deltas for ``Model.generate(stream=)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class TextStreamer:
    """Calls ``callback(i, text_delta)`` with prompt ``i``'s new text, holding back incomplete UTF-8 sequences.

    ``stops``: one list of stop ids per prompt (a stop token ends the prompt's stream and is not shown). If
    ``callback`` raises, :func:`llama32_jax.inference.generate.generate_tokens` stops calling it and re-raises the
    exception.
    """

    def __init__(self, tokenizer, callback: Callable[[int, str], None], n: int, stops: Sequence[Sequence[int]]):
        self.tokenizer, self.callback = tokenizer, callback
        self.stops = [set(s) for s in stops]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n
        self.finished = [False] * n

    def __call__(self, step: int, tokens: np.ndarray, done: np.ndarray) -> None:
        for i, (tok, was_done) in enumerate(zip(tokens.tolist(), done.tolist(), strict=True)):
            if was_done or self.finished[i]:
                continue
            if tok in self.stops[i]:
                self.finished[i] = True
                continue
            self.tokens[i].append(tok)
            text = self.tokenizer.decode(self.tokens[i])
            if text.endswith("\ufffd"):
                continue  # a multi-byte character is not complete yet
            delta, self.sent[i] = text[len(self.sent[i]) :], text
            if delta:
                self.callback(i, delta)
