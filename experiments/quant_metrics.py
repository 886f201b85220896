"""The definitions behind experiments/quant_quality.py's numbers, kept free of absl flags so tests can import them:
the prose corpus and the free-running agreement figures."""

from __future__ import annotations

import pydoc_data.topics

import numpy as np


def corpus_text() -> str:
    """English prose: the plain paragraphs of CPython's ``pydoc_data.topics`` (the Language Reference and library
    topics ``help()`` shows), in sorted topic order, joined by blank lines.

    Why this text: no package installed in the virtualenv ships an English prose corpus (site-packages holds license
    notices, numeric test data, API listings and READMEs; no nltk / scikit-learn / datasets text), and the
    fine-tuning script's built-in examples are 16 one-line chat answers, far short of the thousands of positions
    needed. The Python reference is human-written expository English, fixed by the interpreter's version, and
    always present. Paragraphs with an indented line (code, grammar, tables) are dropped, so what is scored is
    prose, not code."""
    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        for para in pydoc_data.topics.topics[key].split("\n\n"):
            lines = para.strip("\n").split("\n")
            if not para.strip() or any(line.startswith((" ", "\t")) for line in lines) or "::=" in para:
                continue
            if set(lines[-1].strip()) <= set("*=-~^"):  # a heading underline
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) >= 200:
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def free_running(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Free-running agreement of each quantized reply ``got[i]`` with float's ``ref[i]`` (token ids): the fraction
    of float's tokens before the first difference (per prompt and mean), of float's positions with the same token,
    and of identical replies."""
    prefix, same_pos, total, identical = [], 0, 0, 0
    for r, g in zip(ref, got, strict=True):
        k = 0
        while k < min(len(r), len(g)) and r[k] == g[k]:
            k += 1
        prefix.append(k / len(r))
        same_pos += sum(1 for i in range(min(len(r), len(g))) if r[i] == g[i])
        total += len(r)
        identical += r == g
    return {
        "prefix_agreement": float(np.mean(prefix)),
        "positional_agreement": same_pos / total,
        "identical_replies": identical / len(ref),
        "first_divergence_fraction_per_prompt": [round(p, 4) for p in prefix],
    }
