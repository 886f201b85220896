"""Every Pallas TPU kernel compiled for real (Mosaic and XLA:TPU, from libtpu) for v5e, v5p and v6e, in bf16 and fp32.

A covering design, not the full product: each kernel (flash forward; flash backward = forward + dq + dk/dv; decode;
cross-attention forward; cross-attention backward) x generation x dtype compiles once, and the per-device head
shapes of the Llama 3.2 models (1B: H=64, 32/8 heads; 3B: 128, 24/8; 11B: 128, 32/8; 90B: 128, 64/8; a group-1
"mha" shape), unsharded and under 8-way tensor parallelism, and the lengths (flash prefill at 2K/8K and a chunk
into a 128K cache, training at 2K-8K, decode against 32K and 128K caches, cross-attention over 1 and 4 images of
4 x 1601 vision tokens with 1 or prefill-many text rows) are rotated across the 30 cells. The full product is
``experiments/tpu_kernels.py``'s sweep (results in ``experiments/results/tpu/kernels_compile.md``).

Each compiled program is checked, not just compiled: the optimized HLO holds the expected number of Mosaic kernels
(``tpu_custom_call``) under their names; every kernel configuration's VMEM estimate (``vmem_bytes`` next to each
kernel) fits the generation's default scoped VMEM; XLA's temporaries are bounded by the data (never the
``[T, S]`` score matrix); head-dim-128 K/V reach the kernel without a relayout copy. One over-budget block is
compiled on purpose: the compiler refuses it (scoped VMEM) and our estimate says so too.
"""

from __future__ import annotations

import re

import jax
import pytest

from llama32_jax.kernels import aot
from llama32_jax.sharding import tpu
from tests.tpu.conftest import GENERATIONS, chip_mesh

DTYPES = ("bfloat16", "float32")

# Per kernel, six shapes (model, tensor-parallel, batch, T, S or images), one per (generation, dtype) cell.
SHAPES = {
    "flash_fwd": [
        ("1B", True, 2, 2048, 2048),
        ("3B", False, 1, 2048, 8192),  # a 2K chunk written at the end of an 8K cache
        ("11B", True, 1, 8192, 8192),
        ("90B", True, 1, 2048, 131072),  # a 2K chunk into a 128K cache
        ("mha", True, 1, 2048, 8192),
        ("1B", False, 1, 2048, 131072),
    ],
    "flash_bwd": [
        ("1B", True, 1, 2048, 2048),
        ("3B", True, 1, 4096, 4096),
        ("11B", False, 1, 2048, 2048),
        ("90B", True, 1, 8192, 8192),
        ("mha", True, 2, 2048, 2048),
        ("1B", False, 1, 8192, 8192),
    ],
    "decode": [
        ("1B", True, 8, 1, 32768),
        ("3B", False, 8, 1, 131072),
        ("11B", True, 8, 1, 131072),
        ("90B", True, 4, 4, 32768),  # 4 new tokens per step (speculative)
        ("mha", False, 8, 1, 32768),
        ("1B", False, 8, 1, 131072),
    ],
    "cross_fwd": [
        ("11B", True, 1, 1, 1),  # a decode step over one image
        ("90B", True, 8, 1, 4),
        ("11B", False, 1, 2048, 1),
        ("90B", True, 1, 2048, 4),
        ("mha", True, 1, 512, 4),
        ("90B", False, 1, 1, 4),
    ],
    "cross_bwd": [
        ("11B", True, 1, 2048, 1),
        ("90B", True, 1, 2048, 4),
        ("11B", False, 1, 512, 4),
        ("mha", True, 1, 2048, 1),
        ("90B", False, 1, 1024, 1),
        ("11B", True, 1, 4096, 4),
    ],
}


def _case(kernel: str, generation: str, dtype: str) -> aot.Case:
    model, sharded, batch, t, n = SHAPES[kernel][GENERATIONS.index(generation) * len(DTYPES) + DTYPES.index(dtype)]
    lengths = dict(images=n) if kernel.startswith("cross") else dict(keys=n)
    return aot.Case(kernel, generation, dtype, model, sharded, batch, t, **lengths)


CASES = [_case(k, g, d) for k in aot.KERNELS for g in GENERATIONS for d in DTYPES]


def test_the_design_covers_every_kernel_generation_dtype_and_shape():
    cells = {(c.kernel, c.generation, c.dtype) for c in CASES}
    assert cells == {(k, g, d) for k in aot.KERNELS for g in GENERATIONS for d in DTYPES}
    assert {c.model for c in CASES} == set(aot.HEADS)
    assert {c.sharded for c in CASES} == {True, False}
    assert {c.groups for c in CASES} >= {1, 3, 4, 8}
    assert {c.keys for c in CASES if c.kernel == "flash_fwd"} >= {2048, 8192, 131072}
    assert {c.keys for c in CASES if c.kernel == "decode"} == {32768, 131072}
    assert {c.images for c in CASES if c.kernel.startswith("cross")} == {1, 4}
    assert {c.queries for c in CASES if c.kernel == "cross_fwd"} >= {1, 2048}


def _kernel_names(hlo: str) -> list[str]:
    """The Mosaic kernels of the optimized HLO, by the name the kernel gave its ``pallas_call``."""
    return re.findall(r"%([a-z_]+)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"", hlo)


def _copies_of(hlo: str, params: tuple[str, ...]) -> list[str]:
    """Copy instructions whose operand is one of the entry parameters ``params`` (a relayout of the whole array)."""
    return [line for line in hlo.splitlines() if re.search(r" copy\(%(" + "|".join(params) + r")\.\d+\)", line)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_compiles_for_tpu(case: aot.Case):
    chip = tpu.CHIPS[case.generation]
    result = aot.compile_case(case, chip_mesh(case.generation))

    # The compiled program runs our Mosaic kernels, one per estimated configuration, under their own names.
    assert result.custom_calls == aot.KERNEL_CALLS[case.kernel]
    names = _kernel_names(result.hlo)  # e.g. "jvp_flash_attention_fwd_tpu_" under grad
    assert all(sum(want in name for name in names) == 1 for want in result.vmem), (names, list(result.vmem))

    # Blocks respect the generation's VMEM: every kernel configuration fits Mosaic's default scoped limit.
    for name, need in result.vmem.items():
        assert 0 < need <= chip.scoped_vmem_bytes, (name, need, chip.scoped_vmem_bytes)

    # XLA's temporaries are the op's XLA-side arrays (regrouped rows, split partials, K/V relayouts at most, and up
    # to four fp32 [B, K, R, 1] row vectors, which TPU tiling pads to 128 lanes): bounded by the data, and far below
    # the fp32 [T, S] score matrix that attention without a flash kernel materialises.
    h, n, _ = case.heads
    mem = result.memory
    assert mem["argument"] > 0 and mem["output"] > 0
    bound = 2 * (mem["argument"] + mem["output"]) + 4 * aot.row_vector_bytes(case) + (1 << 20)
    assert mem["temp"] <= bound, (mem, bound)
    score_matrix = case.batch * n * case.queries * case.key_length * 4
    if case.queries >= 512:
        assert mem["temp"] < score_matrix, (mem, score_matrix)
    if h == 128 and case.key_length % 16 == 0:
        # Lane-dense K/V are read in place: no relayout copy of the cache / vision tokens. (XLA lays out a K/V
        # parameter with H = 64, or bf16 with a length that is not a multiple of 16 such as one image's 6404
        # tokens, differently from the kernel's operand layout, and copies it first.)
        assert _copies_of(result.hlo, ("k", "v")) == []
    assert result.cost.get("flops", 0) > 0


def _scoped_oom(error: Exception) -> int | None:
    """The scoped allocation (bytes) from XLA:TPU's ``CompileTimeScopedVmemOom`` error, or None for another error."""
    found = re.search(r"Scoped allocation with size ([\d.]+)([KMG])", str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or not found:
        return None
    return int(float(found.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[found.group(2)])


def test_over_budget_blocks_are_refused_by_the_compiler():
    """A deliberately large key block: fp32, 4096 keys x H=128 (2 MiB per K/V buffer, double-buffered, plus the
    fp32 (256, 4096) score tiles), estimated at 25 MiB. Over v5e's 16 MiB default scoped VMEM the compiler refuses
    it at compile time (it does not spill or clip), reporting an allocation over the limit that our estimate is
    not below; under v6e's 32 MiB the same kernel compiles; half the block (13 MiB) compiles on v5e."""

    def case(generation, block_k):
        return aot.Case("flash_fwd", generation, "float32", "11B", True, 1, 2048, 32768, block_q=256, block_k=block_k)

    big = case("v5e", 4096)
    estimate = aot.vmem_estimates(big)["flash_attention_fwd_tpu"]
    assert tpu.CHIPS["v5e"].scoped_vmem_bytes < estimate <= tpu.CHIPS["v6e"].scoped_vmem_bytes
    with pytest.raises(jax.errors.JaxRuntimeError) as refused:
        aot.compile_case(big, chip_mesh("v5e"))
    reported = _scoped_oom(refused.value)
    assert reported is not None and reported > tpu.CHIPS["v5e"].scoped_vmem_bytes, str(refused.value)[:2000]
    assert estimate >= reported  # the estimate is not optimistic

    assert aot.compile_case(case("v6e", 4096), chip_mesh("v6e")).custom_calls == 1
    half = case("v5e", 2048)
    assert aot.vmem_estimates(half)["flash_attention_fwd_tpu"] <= tpu.CHIPS["v5e"].scoped_vmem_bytes
    assert aot.compile_case(half, chip_mesh("v5e")).custom_calls == 1
