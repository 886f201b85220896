"""experiments/bench_batch.py's workload and figures (experiments/batch_workload.py): the long-tailed request mix
is fixed by its seed and stays within its bounds, prompts are slices of the tokenized corpus, and the latency
percentiles match values computed by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from experiments.batch_workload import (
    OUTPUT_MIX,
    PROMPT_MIX,
    LengthMix,
    chunks,
    draw_lengths,
    make_workload,
    percentile,
    run_figures,
    summary,
    workload_summary,
)

CORPUS = " ".join(f"w{i}" for i in range(1000))


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per word (``w17`` -> 17)."""
    return [int(w[1:]) for w in text.split()]


def test_default_ranges_are_the_issues():
    assert (PROMPT_MIX.low, PROMPT_MIX.high, OUTPUT_MIX.low, OUTPUT_MIX.high) == (20, 1500, 10, 400)


def test_lengths_are_deterministic_for_a_seed_and_within_bounds():
    p1, o1 = draw_lengths(512, 0)
    p2, o2 = draw_lengths(512, 0)
    p3, _ = draw_lengths(512, 1)
    assert np.array_equal(p1, p2) and np.array_equal(o1, o2)
    assert not np.array_equal(p1, p3)
    assert p1.min() >= 20 and p1.max() <= 1500 and o1.min() >= 10 and o1.max() <= 400
    # long-tailed: the mean is above the median and the 99th percentile far above it
    for x, mix in ((p1, PROMPT_MIX), (o1, OUTPUT_MIX)):
        assert np.mean(x) > np.median(x)
        assert np.percentile(x, 99) > 4 * np.median(x)
        assert abs(np.median(x) / mix.median - 1) < 0.15  # the drawn median is near the law's


def test_clipping_reaches_the_caps():
    p, o = draw_lengths(2000, 3, LengthMix(100, 2.0, 20, 300), LengthMix(50, 2.0, 10, 80))
    assert p.min() == 20 and p.max() == 300 and o.min() == 10 and o.max() == 80


def test_zero_sigma_gives_the_median():
    p, o = draw_lengths(5, 0, LengthMix(33.4, 0.0, 1, 100), LengthMix(7.6, 0.0, 1, 100))
    assert p.tolist() == [33] * 5 and o.tolist() == [8] * 5


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0, "seed": 0}, {"n": 4, "seed": 0, "prompt_mix": LengthMix(10, 1, 30, 20)}],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        draw_lengths(**kwargs)


def test_workload_prompts_are_corpus_slices_of_the_drawn_lengths():
    work = make_workload(encode, n=64, seed=5, prompt_mix=LengthMix(200, 1.0, 20, 1500), corpus=CORPUS)
    assert work == make_workload(encode, n=64, seed=5, prompt_mix=LengthMix(200, 1.0, 20, 1500), corpus=CORPUS)
    p_lens, o_lens = draw_lengths(64, 5, LengthMix(200, 1.0, 20, 1500))
    assert [len(p) for p, _ in work] == p_lens.tolist()
    assert [m for _, m in work] == o_lens.tolist()
    for p, _ in work:  # consecutive corpus words, wrapping around after w999 (1500 > 1000 words)
        assert all(b == (a + 1) % 1000 for a, b in itertools.pairwise(p))
    assert len({p[0] for p, _ in work}) > 50  # drawn offsets


def test_workload_summary():
    work = [([1] * 20, 10), ([1] * 40, 30), ([1] * 60, 20), ([1] * 80, 40)]
    s = workload_summary(work)
    assert s["requests"] == 4
    assert s["prompt_tokens"] == {"min": 20, "p50": 50, "mean": 50, "p90": 74, "p99": 79.4, "max": 80, "total": 200}
    assert s["output_tokens"]["p50"] == 25 and s["output_tokens"]["total"] == 100


def test_percentile_by_hand():
    v = [7.0, 1.0, 3.0, 5.0, 9.0]  # sorted 1 3 5 7 9, ranks 0..4
    assert percentile(v, 50) == 5.0
    assert percentile(v, 0) == 1.0 and percentile(v, 100) == 9.0
    assert percentile(v, 90) == pytest.approx(8.2)  # rank 3.6: 7 + 0.6 * 2
    assert percentile(v, 99) == pytest.approx(8.92)  # rank 3.96
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(v, 101)


def test_run_figures_by_hand():
    # two static batches of two: both requests of a batch complete when it ends (2 s and 6 s)
    r = run_figures(output_tokens=120, wall_s=6.0, latencies_s=[2.0, 2.0, 6.0, 6.0])
    assert r["output_tok_s"] == 20.0
    assert r["latency_p50_s"] == 4.0 and r["latency_p90_s"] == 6.0 and r["latency_mean_s"] == 4.0
    assert summary([1, 2, 3, 4])["mean"] == 2.5


def test_chunks():
    assert chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert chunks(4, 4) == [range(0, 4)]
    with pytest.raises(ValueError):
        chunks(4, 0)
