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
        """One step of a static batch: ``tokens [n]``, ``done [n]`` (rows that had already stopped)."""
        for i, (tok, was_done) in enumerate(zip(tokens.tolist(), done.tolist(), strict=True)):
            if not was_done:
                self.feed(i, [tok])

    def feed(self, i: int, tokens: list[int]) -> None:
        """Prompt ``i``'s next tokens (the continuous-batching engine streams them in bursts)."""
        new = []
        for tok in tokens:
            if self.finished[i]:
                break
            if tok in self.stops[i]:
                self.finished[i] = True
                break
            new.append(tok)
        if not new:
            return
        self.tokens[i] += new
        text = self.tokenizer.decode(self.tokens[i])
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        delta, self.sent[i] = text[len(self.sent[i]) :], text
        if delta:
            self.callback(i, delta)
