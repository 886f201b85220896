"""Continuous batching (``Engine``): every request gets exactly what it gets alone, with few compiled shapes.

The reference for "alone" is :func:`generate_tokens` on that one prompt (itself checked against HF and Meta in
tests/parity and tests/unit/test_generate.py). Prompt lengths and output lengths are drawn from a few bucket
ranges so that the many solo runs compile a bounded number of shapes; within those ranges they vary freely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax.configs import TINY_TEXT
from llama32_jax.errors import InvalidInputError
from llama32_jax.inference import slot_memory
from llama32_jax.inference import slots as slot_ops
from llama32_jax.inference.continuous import generate_continuous, static_fits
from llama32_jax.inference.engine import Engine, Request, width_bucket
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.models.build import init_model

V = TINY_TEXT.text.vocab_size
# Prompt lengths: three engine widths (16, 32, 64) and five static ones; output lengths: two static step buckets.
PROMPT_RANGES = [(1, 16), (29, 32), (57, 64)]
OUTPUT_CHOICES = [1, 2, 3, 4, 5, 6, 7, 8, 31, 32]


def _scaled(scan: bool):
    m = init_model(TINY_TEXT.replace(scan_layers=scan), param_dtype=jnp.float32, seed=11)
    # Weights ~N(0, 0.15) instead of 0.02: a random model with the default scale just repeats its last token.
    state = nnx.state(m, nnx.Param)
    scaled = jax.tree_util.tree_map_with_path(lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 7.5, state)
    nnx.update(m, scaled)
    return m


@pytest.fixture(scope="module")
def model():
    return _scaled(False)


def _requests(n: int, seed: int) -> list[Request]:
    """Mixed requests: greedy, temperature, top-k, top-p; some with stop tokens that often fire early."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lo, hi = PROMPT_RANGES[int(rng.integers(len(PROMPT_RANGES)))]
        prompt = rng.integers(0, V, int(rng.integers(lo, hi + 1))).tolist()
        kind = i % 4
        stops = rng.integers(0, V, 40).tolist() if i % 3 == 0 else []  # 40 of 512 ids: ~8% per step
        out.append(
            Request(
                prompt,
                max_new_tokens=int(rng.choice(OUTPUT_CHOICES)),
                temperature=0.0 if kind == 0 else 0.9,
                top_k=7 if kind == 2 else 0,
                top_p=0.8 if kind == 3 else 1.0,
                seed=int(rng.integers(0, 2**31)),
                stop_ids=stops,
            )
        )
    return out


def _solo(model, r: Request):
    (out,) = generate_tokens(
        model, [r.tokens], max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
        top_p=r.top_p, seed=r.seed, stop_ids=[list(r.stop_ids)], logprobs=True,
    )  # fmt: skip
    return out


def test_a_few_hundred_mixed_requests_equal_their_solo_runs(model):
    decodes0, admits0 = slot_ops.decode_chunk._cache_size(), slot_ops.admit._cache_size()
    requests = _requests(200, seed=0)
    engine = Engine(model, slots=8, logprobs=True, chunk_steps=8)
    order, results = [], {}
    for r in engine.run(requests):
        order.append(r.index)
        results[r.index] = r
    assert sorted(order) == list(range(len(requests)))
    assert order != sorted(order)  # short requests overtook long ones: slots were refilled
    stats = engine.stats
    assert stats["prefill_calls"] < len(requests)  # several requests per prefill
    assert stats["output_tokens"] == sum(len(r.output.tokens) for r in results.values())
    reasons = {r.output.stop_reason for r in results.values()}
    assert reasons == {"stop", "length"}
    for i, req in enumerate(requests):
        got, want = results[i].output, _solo(model, req)
        assert got.tokens == want.tokens, f"request {i}"
        assert got.stop_reason == want.stop_reason, f"request {i}"
        assert got.prompt_length == len(req.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5, err_msg=f"request {i}")
    # One decode loop, and one prefill per (row bucket, width bucket): at most 4 x 3 programs for any number of
    # requests; a run over other requests of the same buckets adds none beyond those.
    most = 4 * len(PROMPT_RANGES)  # rows 1, 2, 4, 8 x three widths
    assert slot_ops.decode_chunk._cache_size() - decodes0 <= 1
    assert slot_ops.admit._cache_size() - admits0 <= most
    for seed in (1,):
        list(Engine(model, slots=8, logprobs=True, chunk_steps=8).run(_requests(60, seed=seed)))
        assert slot_ops.decode_chunk._cache_size() - decodes0 <= 1
        assert slot_ops.admit._cache_size() - admits0 <= most
    admits = slot_ops.admit._cache_size()
    list(Engine(model, slots=8, logprobs=True, chunk_steps=8).run(_requests(60, seed=1)))  # the same requests
    assert slot_ops.admit._cache_size() == admits


def test_scanned_layout_and_single_slot(model):
    scanned = _scaled(True)
    requests = _requests(12, seed=2)
    for m, slots in ((scanned, 3), (model, 1)):
        results = {r.index: r.output for r in Engine(m, slots=slots).run(requests)}
        for i, req in enumerate(requests):
            assert results[i].tokens == _solo(m, req).tokens, (slots, i)


def test_generate_continuous_returns_prompt_order_and_streams(model):
    requests = _requests(12, seed=3)
    prompts = [r.tokens for r in requests]
    kw = dict(max_new_tokens=[r.max_new_tokens for r in requests], temperature=0.7, seed=list(range(12)))
    streamed: dict[int, list[int]] = {}
    outs = generate_continuous(
        model, prompts, slots=4, on_tokens=lambda i, t: streamed.setdefault(i, []).extend(t), **kw
    )
    static = generate_tokens(model, prompts, **kw)  # one static batch of all twelve
    assert [o.tokens for o in outs] == [o.tokens for o in static]
    assert all(streamed[i] == outs[i].tokens for i in range(12))
    assert static_fits(model, prompts, 8, slots=12) and not static_fits(model, prompts, 8, slots=11)


def test_request_longer_than_the_cache(model):
    ok = Request([1, 2, 3], max_new_tokens=4)
    long = Request(list(range(40)), max_new_tokens=30)  # needs 69 slots
    engine = Engine(model, slots=2, max_len=48)
    with pytest.raises(InvalidInputError, match=r"request 1: .*69 cache slots.*max_len=48"):
        list(engine.run([ok, long]))
    results = {r.index: r for r in engine.run([ok, long, ok], errors="result")}
    assert not results[1].ok and results[1].output is None and "max_len=48" in results[1].error
    assert results[0].ok and results[0].output.tokens == _solo(model, ok).tokens == results[2].output.tokens


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request([V + 3]), "request 0"),
        (Request([]), "request 0 tokens is empty"),
        (Request([1], max_new_tokens=0), "max_new_tokens"),
        (Request([1], temperature=-1.0), "temperature"),
        (Request([1], images=["x.png"]), "text model"),
        ("not a request", "must be an llama32_jax.inference.engine.Request"),
    ],
)
def test_bad_requests_are_named(model, request_, match):
    with pytest.raises(InvalidInputError, match=match):
        list(Engine(model, slots=1).run([request_]))
    (result,) = Engine(model, slots=1).run([request_], errors="result")
    assert not result.ok and result.index == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(slots=0), "slots must be a positive int"),
        (dict(max_len=10**7), "exceeds the model context"),
        (dict(chunk_steps=0), "chunk_steps"),
        (dict(logprobs=1), "logprobs"),
    ],
)
def test_bad_engine_arguments(model, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        Engine(model, **kwargs)


def test_run_arguments_are_checked_before_anything_runs(model):
    engine = Engine(model, slots=1)
    with pytest.raises(InvalidInputError, match="errors must be"):
        engine.run([Request([1])], errors="ignore")
    with pytest.raises(InvalidInputError, match="on_tokens"):
        engine.run([Request([1])], on_tokens=3)
    with pytest.raises(InvalidInputError, match="sequence of Request"):
        engine.run(Request([1]))


def test_width_buckets():
    assert [width_bucket(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 97, 1500, 1537)] == [
        16, 16, 24, 24, 32, 48, 48, 64, 128, 1536, 2048,
    ]  # fmt: skip


def test_slots_chosen_from_free_memory(model, monkeypatch):
    t = TINY_TEXT.text
    per_slot = 2 * t.n_layers * t.n_kv_heads * 64 * t.head_dim * 4  # K and V, every layer, 64 positions, fp32
    assert slot_memory.cache_bytes_per_slot(model, 64) == per_slot
    monkeypatch.setattr(slot_memory, "free_memory", lambda devices: 10 * per_slot)  # half of it: 5 slots
    assert slot_memory.choose_slots(model, 64, n_requests=100) == 5
    assert slot_memory.choose_slots(model, 64, n_requests=3) == 3  # never more than the run has requests
    monkeypatch.setattr(slot_memory, "free_memory", lambda devices: None)  # unknown: the platform's cap
    assert slot_memory.choose_slots(model, 64, n_requests=1000) == slot_memory.MAX_AUTO_SLOTS["cpu"]
    monkeypatch.setattr(slot_memory, "free_memory", lambda devices: per_slot)  # half a slot
    with pytest.raises(InvalidInputError, match="do not fit"):
        slot_memory.choose_slots(model, 64, n_requests=4)
