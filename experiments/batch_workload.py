"""The workload of experiments/bench_batch.py and the figures it reports, kept free of absl flags so tests can
import them.

A workload is ``n`` requests ``(prompt token ids, max_new_tokens)`` whose lengths follow a long-tailed mix: each
length is drawn from a log-normal distribution (``median * exp(sigma * z)``, ``z`` standard normal), rounded and
clipped to ``[low, high]``; prompts and outputs are drawn independently, from one ``numpy`` generator seeded with
``seed``. Prompt tokens are real English: slices of the tokenized prose corpus of experiments/quant_metrics.py
(CPython's ``pydoc_data.topics`` paragraphs) starting at a drawn offset, wrapping around at its end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from experiments.quant_metrics import corpus_text

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class LengthMix:
    """One clipped log-normal length distribution: ``clip(round(median * exp(sigma * z)), low, high)``."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raw = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(raw), self.low, self.high).astype(np.int64)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"law": "clip(round(median * exp(sigma * z)), low, high), z ~ N(0, 1)"}


# The defaults: a long tail within prompts 20..1500 / outputs 10..400 tokens (see experiments/README.md).
PROMPT_MIX = LengthMix(median=160.0, sigma=0.9, low=20, high=1500)
OUTPUT_MIX = LengthMix(median=64.0, sigma=0.8, low=10, high=400)


def draw_lengths(
    n: int, seed: int, prompt_mix: LengthMix = PROMPT_MIX, output_mix: LengthMix = OUTPUT_MIX
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt lengths, output lengths)``, ``n`` each, deterministic for ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for name, mix in (("prompt_mix", prompt_mix), ("output_mix", output_mix)):
        if not (1 <= mix.low <= mix.high and mix.median > 0 and mix.sigma >= 0):
            raise ValueError(f"{name} needs 1 <= low <= high, median > 0 and sigma >= 0, got {mix}")
    rng = np.random.default_rng(seed)
    return prompt_mix.draw(rng, n), output_mix.draw(rng, n)


def make_workload(
    encode: Callable[[str], list[int]],
    n: int = 512,
    seed: int = 0,
    prompt_mix: LengthMix = PROMPT_MIX,
    output_mix: LengthMix = OUTPUT_MIX,
    corpus: str | None = None,
) -> list[tuple[list[int], int]]:
    """``n`` requests ``(prompt token ids, max_new_tokens)`` in random (drawn) order, deterministic for ``seed``.

    ``encode(text) -> ids`` is the model's tokenizer; ``corpus`` defaults to experiments/quant_metrics.py's prose.
    Each prompt is a slice of the tokenized corpus of its drawn length, from a drawn offset (wrapping around)."""
    prompt_lens, output_lens = draw_lengths(n, seed, prompt_mix, output_mix)
    ids = np.asarray(encode(corpus if corpus is not None else corpus_text()), np.int64)
    if ids.size == 0:
        raise ValueError("the corpus encodes to no tokens")
    offsets = np.random.default_rng([seed, 1]).integers(0, ids.size, size=n)
    work = []
    for length, new, offset in zip(prompt_lens, output_lens, offsets, strict=True):
        take = np.arange(offset, offset + length) % ids.size
        work.append((ids[take].tolist(), int(new)))
    return work


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation between the closest ranks: the
    value at fractional rank ``q / 100 * (n - 1)`` of the sorted values (numpy's default method)."""
    if not len(values):
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    v = sorted(float(x) for x in values)
    rank = q / 100 * (len(v) - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def summary(values: Sequence[float], digits: int = 3) -> dict:
    """min, median, mean, p90, p99, max and total of ``values``, rounded to ``digits``."""
    out = {
        "min": min(values),
        "p50": percentile(values, 50),
        "mean": float(np.mean(values)),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "total": float(np.sum(values)),
    }
    return {k: round(float(x), digits) for k, x in out.items()}


def workload_summary(work: Sequence[tuple[Sequence[int], int]]) -> dict:
    """The drawn length distribution: summaries of the prompt and output lengths."""
    return {
        "requests": len(work),
        "prompt_tokens": summary([len(p) for p, _ in work], 1),
        "output_tokens": summary([m for _, m in work], 1),
    }


def chunks(n: int, size: int) -> list[range]:
    """Consecutive index ranges of ``size`` (the last may be shorter) covering ``range(n)``: static batches."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def run_figures(output_tokens: int, wall_s: float, latencies_s: Sequence[float]) -> dict:
    """Throughput and request-latency percentiles of one run: ``latencies_s`` are completion times since its start."""
    out = {
        "output_tokens": int(output_tokens),
        "wall_s": round(wall_s, 3),
        "output_tok_s": round(output_tokens / wall_s, 2),
    }
    for q in PERCENTILES:
        out[f"latency_p{q}_s"] = round(percentile(latencies_s, q), 3)
    out["latency_mean_s"] = round(float(np.mean(latencies_s)), 3)
    return out
