"""The scaling study's TPU compile target (``scaling_study --target=tpu``): XLA:TPU's cost analysis turned into step
time estimates, and what is known about where it goes wrong.

What the compiler reports. ``compiled.cost_analysis()`` of an XLA:TPU executable (libtpu 0.0.42.1, jax 0.10.2)
has ``flops``, ``bytes accessed`` and ``optimal_seconds``, the compiler's own estimate of the step time. Two
things make ``optimal_seconds`` unusable raw:

1. It is negative for real programs. Bisected with small programs (a matmul, elementwise ops, reductions, gathers,
   scatters, sorts, rng, collectives across 8 chips, while loops, conditionals, optimisation barriers, remat: all
   positive and close to the roofline), then with the 1B model's steps at depth 1: every ``ConcatBitcast`` custom
   call (an XLA:TPU-internal op that joins the pieces of a weight that memory-space assignment prefetched as
   several async slices: a no-copy bitcast) adds exactly -1 s. The counts match to the millisecond: 1B on
   tpu-v5e-8, depth 1, XLA attention: decode 2 ConcatBitcasts, optimal_seconds -1.99948; prefill (B=8, T=2048) 10,
   -9.99454; train 42, -41.95231; with Pallas attention decode 4, -3.99943; prefill 9, -8.99578. A Pallas kernel
   (``tpu_custom_call``) itself counts 0 s, 0 flops and only its operands' bytes: its cost is invisible, not
   negative (the "-1 s per Pallas call site" seen before is the ConcatBitcasts that the Pallas rewrite moves).
   So ``corrected = optimal_seconds + #ConcatBitcast`` (:data:`UNCOSTED`) is the compiler's estimate with those
   sentinels removed (a ConcatBitcast moves no data: its true cost is ~0).
2. Like ``flops`` / ``bytes accessed``, it counts a while loop's body once. The depth fit (``scaling_study``)
   compiles the model unrolled at 1 and 2 layers (vision: groups) and extrapolates; on this target those fit
   compiles also run attention unblocked (:func:`unblocked_queries`: no ``lax.map`` over 1024-query blocks, the same
   arithmetic in one piece), so nothing is left inside a loop.

Which estimate a row uses (``estimate_source``): the corrected, depth-fitted ``optimal_seconds`` when both fit
compiles pass a sanity check (corrected >= 0.95 x the roofline of their own flops and bytes: the compiler's model
sums per-op costs, each at least that op's roofline, so the total cannot be below the program's roofline); else the
roofline ``max(flops / peak, bytes / bandwidth)`` of the depth-fitted flops and bytes. Rows with Pallas kernels say
that the kernels are not costed. Every such number is a compiler estimate, not a measurement.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from llama32_jax.sharding import tpu

UNCOSTED = ("ConcatBitcast",)  # custom calls whose cost XLA:TPU's model reports as -1 s each
INVISIBLE = ("tpu_custom_call",)  # Pallas / Mosaic kernels: 0 s and 0 flops in the cost analysis
SOURCE_XLA = "XLA:TPU optimal_seconds + 1 s per ConcatBitcast, depth fit"
SOURCE_ROOFLINE = "roofline max(flops/peak, bytes/bandwidth) of XLA:TPU's cost analysis, depth fit"
LABEL = "XLA:TPU compiler estimate, not a measurement"

COLUMNS = (
    *("topology", "xla_optimal_s", "uncosted_ops", "pallas_calls", "est_optimal_s_fit", "roofline_s"),
    *("estimate_source", "est_step_s", "est_tokens_per_s", "est_mfu", "hbm_read_s", "est_hbm_util"),
)
CONVENTION = (
    "--target=tpu rows (platform tpu-aot): compiled by XLA:TPU (libtpu) for the plan's TPU slice on a CPU host, "
    "nothing executed. xla_optimal_s: cost_analysis()['optimal_seconds'] of the full (scanned) step, raw; "
    "uncosted_ops: its ConcatBitcast custom calls, -1 s each in that sum; pallas_calls: tpu_custom_call sites "
    "(costed 0). est_optimal_s_fit: optimal_seconds + uncosted_ops, extrapolated in depth from unrolled 1- and "
    "2-layer compiles with attention unblocked (no loop left). roofline_s: max(xla_flops_fit / peak, xla_bytes_fit "
    "/ bandwidth) per chip. est_step_s: est_optimal_s_fit when its fit compiles pass the check corrected >= 0.95 x "
    "their own roofline, else roofline_s (estimate_source says which). est_tokens_per_s = tokens / est_step_s; "
    "est_mfu = analytic_flops / est_step_s / (chips x peak); hbm_read_s = read_gb / bandwidth (the decode HBM "
    "roofline); est_hbm_util = hbm_read_s / est_step_s. Peaks from llama32_jax.sharding.tpu.CHIPS. " + LABEL + "."
)


def count_calls(hlo: str, targets: tuple[str, ...]) -> int:
    """Custom-call instructions in optimized HLO text whose ``custom_call_target`` is one of ``targets``."""
    names = "|".join(re.escape(t) for t in targets)
    return len(re.findall(rf'custom_call_target="(?:{names})"', hlo))


def cost(compiled) -> dict:
    """One chip's cost analysis: flops, bytes, raw ``optimal_seconds``, the uncosted and Pallas call counts and the
    corrected seconds."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    hlo = compiled.as_text()
    raw = float(ca.get("optimal_seconds", float("nan")))
    uncosted = count_calls(hlo, UNCOSTED)
    return dict(
        flops=float(ca.get("flops", 0.0)),
        bytes=float(ca.get("bytes accessed", 0.0)),
        optimal_s=raw,
        uncosted=uncosted,
        pallas=count_calls(hlo, INVISIBLE),
        corrected_s=raw + uncosted,
    )


def roofline_s(flops: float, nbytes: float, chip: tpu.TpuChip) -> float:
    return max(flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth)


def plausible(c: dict, chip: tpu.TpuChip) -> bool:
    """The corrected seconds of one compile are at least (95% of) the roofline of its own flops and bytes."""
    return c["corrected_s"] >= 0.95 * roofline_s(c["flops"], c["bytes"], chip)


def estimate(full: dict, fits: list[dict] | None, depth: int, chip: tpu.TpuChip) -> dict:
    """The row's estimate columns from the full compile's cost and the 1- and 2-unit fit compiles' (``fits``; None:
    no depth fit, loop bodies counted once)."""

    def fit(key):
        if fits is None:
            return full[key]
        a, b = fits[0][key], fits[1][key]
        return a + (depth - 1) * (b - a)

    roof = roofline_s(fit("flops"), fit("bytes"), chip)
    use_xla = all(plausible(c, chip) for c in (fits or [full]))
    out = dict(
        xla_optimal_s=full["optimal_s"],
        uncosted_ops=full["uncosted"],
        pallas_calls=full["pallas"],
        est_optimal_s_fit=fit("corrected_s"),
        roofline_s=roof,
    )
    source = SOURCE_XLA if use_xla else SOURCE_ROOFLINE
    if fits is None:
        source = source.replace("depth fit", "no depth fit: loop bodies counted once")
    if full["pallas"]:
        source += f"; {full['pallas']} Pallas kernel call sites not costed"
    out.update(estimate_source=source, est_step_s=out["est_optimal_s_fit"] if use_xla else roof)
    return out


@contextlib.contextmanager
def unblocked_queries() -> Iterator[None]:
    """Within: XLA attention takes all its queries at once (``nn.attention``'s ``q_chunk`` default raised), so a
    compile has no query-block loop for the cost analysis to count once."""
    from llama32_jax.nn import attention

    defaults = attention.attention.__kwdefaults__
    saved = defaults["q_chunk"]
    defaults["q_chunk"] = 1 << 40
    try:
        yield
    finally:
        defaults["q_chunk"] = saved


def is_out_of_memory(e: Exception) -> bool:
    """XLA:TPU refuses to compile a program whose buffers exceed the chip's HBM."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def oom_summary(e: Exception) -> str:
    """The compiler's out-of-memory message, first lines, on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:3])[:400]
