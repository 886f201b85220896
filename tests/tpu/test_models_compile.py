"""Llama 3.2 1B, 3B, 11B-Vision and 90B-Vision compiled by XLA:TPU (libtpu, ahead of time, on this CPU host) under
every TPU plan in ``sharding/``: a prefill, a decode step and a training step, each with ``attention_impl="pallas"``
(the Mosaic kernels) and ``"xla"``, checked against what the plan implies in the optimized per-device HLO
(``experiments/tpu_checks.py``: :class:`~experiments.tpu_checks.Expected` says what and why).

The models are the real ones (widths, head counts, vocabulary, vision tower and cross-attention layers), with scanned
layers (``scan_layers=True``: the scan body compiles once, so compile time is nearly flat in depth): 1B, 3B and
11B-Vision at full depth, 90B-Vision at 2 of its 20 groups (8 self-attention + 2 cross-attention layers), because
XLA:TPU refuses a program whose buffers exceed the chip's HBM (``RESOURCE_EXHAUSTED``) and 90B-Vision's bf16 weights
alone are 22 GB per chip under 8-way tensor parallelism (a v5e has 16 GB; its training step, with the optimiser
state, exceeds a v6e's 32 GB too). The expected collectives are per scanned group, so the depth changes only the
trip counts, which the checks derive from the config. The steps are ``experiments.scaling_steps.build``'s, at a
small batch (2 rows per data replica) and sequence (256 tokens; prefill's cache has 16 more slots; the vision
models' prefill and decode read one 4-tile image's cross-attention K/V; training is text only, as in the scaling
study, so it has no cross-attention).

The full product (4 models x 4 plans x 2 impls x 3 phases = 96 compiles, at full depth where it fits) is
``experiments/tpu_models.py``'s, with results in ``experiments/results/tpu/models_compile.*``. Here a covering set
of 24: every model with both impls in all three phases, the plan rotating so that every plan compiles every phase
with both impls (each plan x impl x phase once, on a different model each time).
"""

from __future__ import annotations

import pytest

from experiments import hlo_text, tpu_checks
from llama32_jax import sharding
from tests.tpu.conftest import plan_mesh

MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision")
PLANS = ("tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16")
IMPLS = ("pallas", "xla")
PHASES = ("prefill", "decode", "train")
SEQ_LEN = 256
DECODE_SLOTS = 16
ROWS = 2  # per data replica
DEPTH = {"Llama-3.2-90B-Vision": 2}  # scan groups; the others at full depth


def covering_cases() -> list[tuple[str, str, str, str]]:
    """(model, plan, impl, phase): each model x impl x phase once, on plan ``(model + impl + phase) % 4``, so that
    for each impl and phase the four models take the four plans (every plan x impl x phase once)."""
    out = []
    for p, phase in enumerate(PHASES):
        for m, model in enumerate(MODELS):
            for i, impl in enumerate(IMPLS):
                out.append((model, PLANS[(m + i + p) % len(PLANS)], impl, phase))
    return out


def test_covering_set_covers():
    cases = covering_cases()
    assert len(set(cases)) == len(cases) == len(MODELS) * len(IMPLS) * len(PHASES)
    assert {(m, i, ph) for m, _, i, ph in cases} == {(m, i, ph) for m in MODELS for i in IMPLS for ph in PHASES}
    assert {(pl, ph) for _, pl, _, ph in cases} == {(pl, ph) for pl in PLANS for ph in PHASES}
    assert {(pl, i, ph) for _, pl, i, ph in cases} == {(pl, i, ph) for pl in PLANS for i in IMPLS for ph in PHASES}
    # every multi-chip TPU plan (tpu-v5e-1, one chip, has no collectives to check)
    assert set(PLANS) == {p for p in sharding.tpu.tpu_plans() if sharding.load_plan(p).size > 1}


def _id(case: tuple[str, str, str, str]) -> str:
    model, plan, impl, phase = case
    return "-".join((model.removeprefix("Llama-3.2-"), plan.removeprefix("tpu-"), impl, phase))


@pytest.mark.parametrize(("model", "plan", "impl", "phase"), covering_cases(), ids=[_id(c) for c in covering_cases()])
def test_model_compiles_with_the_plans_collectives(model, plan, impl, phase):
    compiled, expected, _ = tpu_checks.compile_step(
        model, plan, plan_mesh(plan), impl, phase, SEQ_LEN, ROWS, DECODE_SLOTS, DEPTH.get(model)
    )
    module = hlo_text.Module(compiled.as_text())
    problems = tpu_checks.check(module, expected)
    listing = "\n".join(
        f"  {c.kind} {' '.join(map(str, c.results))} group={c.group_size} x{c.trips} in {c.computation}"
        for c in module.collectives()
    )
    assert not problems, "\n".join(problems) + "\ncollectives:\n" + listing
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 0 and mem.output_size_in_bytes > 0


# A hand-written optimized-HLO module in XLA's text format: a scan (while loop, trip count in its condition) whose
# body calls a fusion holding an all-reduce, a Pallas kernel in the body, and at the top level an async all-gather
# pair and all-reduces in each replica-group spelling XLA:TPU prints.
_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[8,4]{1,0})->bf16[2,1,16]{2,1,0}}

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %add.1 = bf16[] add(%x, %y)
}

%fused_ar (p: bf16[2,1,16]) -> bf16[2,1,16] {
  %p = bf16[2,1,16]{2,1,0:T(2,128)} parameter(0)
  ROOT %all-reduce.7 = bf16[2,1,16]{2,1,0:T(2,128)S(1)} all-reduce(%p), channel_id=3, \
replica_groups=[2,8]<=[16], to_apply=%add
}

%body (t: (s32[], bf16[2,1,16])) -> (s32[], bf16[2,1,16]) {
  %t = (s32[]{:T(128)}, bf16[2,1,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %h = bf16[2,1,16]{2,1,0} get-tuple-element(%t), index=1
  %flash_attention_fwd_tpu.3 = (bf16[2,1,16]{2,1,0}, f32[2,1,1]{2,1,0}) custom-call(%h), \
custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{}}
  %o = bf16[2,1,16]{2,1,0} get-tuple-element(%flash_attention_fwd_tpu.3), index=0
  %fusion.2 = bf16[2,1,16]{2,1,0} fusion(%o), kind=kCustom, calls=%fused_ar
  %all-reduce.8 = bf16[2,1,16]{2,1,0} all-reduce(%fusion.2), channel_id=4, \
replica_groups={{0,1,2,3,4,5,6,7},{8,9,10,11,12,13,14,15}}, to_apply=%add
  ROOT %r = (s32[], bf16[2,1,16]) tuple(%i, %all-reduce.8)
}

%cond (c: (s32[], bf16[2,1,16])) -> pred[] {
  %c = (s32[], bf16[2,1,16]) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %constant.1 = s32[] constant(12)
  ROOT %lt = pred[] compare(%n, %constant.1), direction=LT
}

ENTRY %main.1_spmd (param.1: bf16[8,4], param.2: bf16[2,1,16]) -> bf16[2,1,16] {
  %param.1 = bf16[8,4]{1,0:T(8,128)(2,1)} parameter(0)
  %param.2 = bf16[2,1,16]{2,1,0} parameter(1)
  %all-gather-start = (bf16[8,4]{1,0}, bf16[64,4]{1,0}) all-gather-start(%param.1), \
channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=8], device_ids=([2,8]T(1,0)) {'axis_1'}, dimensions={0}
  %all-gather-done = bf16[64,4]{1,0} all-gather-done(%all-gather-start)
  %one = f32[] constant(1)
  %all-reduce.1 = (bf16[2,1,16]{2,1,0}, f32[]) all-reduce(%param.2, %one), channel_id=6, \
replica_groups=mesh['axis_0'=2,'axis_1'=8] {'axis_0'}, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], bf16[2,1,16]) tuple(%zero, %param.2)
  %while.1 = (s32[], bf16[2,1,16]) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/while"}
  ROOT %out = bf16[2,1,16]{2,1,0} get-tuple-element(%while.1), index=1
}
"""


def test_hlo_reader_on_a_hand_written_module():
    m = hlo_text.Module(_HLO)
    assert m.entry == "main.1_spmd"
    assert m.trip_counts == {"body": 12}
    by_name = {c.name: c for c in m.collectives()}
    assert set(by_name) == {"all-reduce.7", "all-reduce.8", "all-gather-start", "all-reduce.1"}
    fused, body, gather, top = (
        by_name[n] for n in ("all-reduce.7", "all-reduce.8", "all-gather-start", "all-reduce.1")
    )
    assert (fused.computation, fused.loops, fused.trips, fused.group_size) == ("fused_ar", ("body",), 12, 8)
    assert (body.loops, body.trips, body.group_size) == (("body",), 12, 8)
    assert [str(a) for a in body.results] == ["bf16[2,1,16]"] and body.bytes == 2 * 32
    assert (gather.kind, gather.loops, gather.trips, gather.group_size) == ("all-gather", (), 1, 8)
    assert [str(a) for a in gather.operands] == ["bf16[8,4]"] and [str(a) for a in gather.results] == ["bf16[64,4]"]
    assert gather.bytes == 64 * 4 * 2
    assert top.group_size == 2 and [str(a) for a in top.results] == ["bf16[2,1,16]", "f32[]"]
    assert hlo_text.summary(m.collectives()) == {
        "all-reduce": {"sites": 3, "executions": 25, "bytes": 12 * 64 * 2 + 64 + 4},
        "all-gather": {"sites": 1, "executions": 1, "bytes": 512},
    }
    (kernel,) = m.kernels()
    assert (kernel.name, kernel.loops) == ("flash_attention_fwd_tpu.3", ("body",))
    assert [str(a) for a in kernel.results] == ["bf16[2,1,16]", "f32[2,1,1]"]


def test_hlo_check_reports_departures_from_the_plan():
    """``check`` on the hand-written module against a decode step it does not match: every departure named."""
    e = tpu_checks.Expected(
        phase="decode", impl="pallas", batch=2, length=1, keys=64, dim=16, vocab=256, heads=1, head_dim=4,
        tensor=8, data=2, groups=12, self_per_group=1, cross_per_group=0, vision_tokens=0, embed_tables=1,
        trainable_elements=0, tied_elements=0, remat="",
    )  # fmt: skip
    problems = tpu_checks.check(hlo_text.Module(_HLO), e)
    text = "\n".join(problems)
    assert "unexpected all-gather all-gather-start bf16[64,4]" in text
    assert "unexpected data-group collective: all-reduce all-reduce.1" in text
    assert "logits not returned vocab-sharded" in text
    assert (
        "Pallas kernel executions per step {'flash_attention_fwd_tpu': 12}, want {'decode_attention_tpu': 12}" in text
    )
    assert not any("tensor all-reduces per scanned group" in p for p in problems)  # 2 per iteration, as a layer's
