"""``lj.load(..., quantize=...)``: bad values are typed errors raised before any checkpoint is read, and int4 on a
real model whose dimensions the group size does not divide names the weight and a group size that would work."""

from __future__ import annotations

import pytest

import llama32_jax as lj
from llama32_jax.errors import QuantizationError


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("int3", r"quantize must be one of \('int8', 'int4'\).*'int3'"),
        ("INT8", r"quantize must be one of .*'INT8'"),
        (8, r"quantize must be one of .*got int"),
        (True, r"quantize must be one of .*got bool"),
        ({"mode": "int4", "group": 64}, r"takes 'mode' and optionally 'group_size', 'skip'"),
        ({"mode": "int4", "group_size": 96}, r"group_size must be a power of two"),
        ({"mode": "int8", "skip": ["embeddings"]}, r"skip names unknown parts \['embeddings'\]"),
        ({"mode": "int8", "skip": "vision"}, r"skip must be a tuple of names"),
    ],
)
def test_bad_quantize_values_are_named_before_any_read(tmp_path, value, pattern):
    missing = tmp_path / "no-such-checkpoint"  # never reached: the argument is checked first
    with pytest.raises(QuantizationError, match=pattern):
        lj.load(missing, quantize=value)


def test_quantize_is_listed_among_the_valid_keywords(tmp_path):
    with pytest.raises(lj.errors.InvalidInputError, match=r"quantise.*valid ones are .*'quantize'"):
        lj.load(tmp_path, quantise="int8")


def test_int4_group_that_does_not_divide_a_real_model_is_named(gguf_file):
    # SmolLM2-135M: hidden size 576 = 4.5 x 128, so the default int4 group of 128 cannot cover its projections.
    with pytest.raises(
        QuantizationError, match=r"int4 group size 128 does not divide the input dimension 576.*e\.g\. 64"
    ):
        lj.load(gguf_file, dtype="float32", quantize="int4")
    model = lj.load(gguf_file, dtype="float32", quantize=lj.QuantConfig("int4", group_size=64))
    assert model.module.quant_config == lj.QuantConfig("int4", group_size=64)
    assert model.module.layers[0].feed_forward.w1.kernel.dtype.name == "int4"
