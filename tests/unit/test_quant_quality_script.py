"""experiments/quant_quality.py's definitions (experiments/quant_metrics.py): the free-running agreement figures
on replies written here, and the prose corpus (paragraphs of CPython's pydoc_data.topics, with code and grammar
blocks left out)."""

from __future__ import annotations

import pytest

from experiments.quant_metrics import corpus_text, free_running


def test_free_running_agreement_counts_to_the_first_difference_and_by_position():
    ref = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    got = [[1, 2, 9, 4], [5, 6], [0, 8, 9]]  # differs at index 2; identical; differs at 0 and stops early
    r = free_running(ref, got)
    assert r["first_divergence_fraction_per_prompt"] == [0.5, 1.0, 0.0]
    assert r["prefix_agreement"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # same token at the same index: 3 of 4, 2 of 2, 2 of 4 (the missing last token counts as different)
    assert r["positional_agreement"] == pytest.approx(7 / 10)
    assert r["identical_replies"] == pytest.approx(1 / 3)


def test_corpus_is_prose_paragraphs():
    text = corpus_text()
    paragraphs = text.split("\n\n")
    assert len(text) > 100_000 and len(paragraphs) > 300
    assert all(len(p) >= 200 and "\n" not in p and "::=" not in p for p in paragraphs)
    assert not any(p.startswith((" ", "\t")) for p in paragraphs)
