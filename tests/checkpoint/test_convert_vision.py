"""Converting Llama 3.2 Vision checkpoints (Meta, 1 and 2 model-parallel shards; HF as transformers saves it).

The tiny Mllama of Meta's reference (see test_vision_keymap.py, where the key tables are proved by Meta-vs-HF
logit parity) is saved as Meta shards, cut by this file's own column/row split of docs/model-facts.md §8.4 — including
the two tensors Meta's resharder omits, ``learnable_embedding`` and ``vision_projection.bias``, which concatenate — and
transformers' ``MllamaForConditionalGeneration.save_pretrained`` writes the HF directory. Each converts, streaming,
to a tree equal to the key tables' conversion of the reference's state dict.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.checkpoint.orbax_ckpt import read_manifest, restore_params
from llama32_jax.errors import CheckpointError
from llama32_jax.models.build import load_params
from llama32_jax.models.mllama import Mllama
from tests.refs_vision import CFG
from tests.vision_fixtures import hf_model, hf_sd, meta_model, meta_sd, params  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")

COLUMN_SUFFIXES = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "tok_embeddings.weight",
    "learnable_embedding.weight",
    "output.weight",
    "attn.wq.weight",
    "attn.wk.weight",
    "attn.wv.weight",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "conv1._linear.weight",
    "vision_projection.weight",
    "vision_projection.bias",
)
ROW_SUFFIXES = ("attention.wo.weight", "feed_forward.w2.weight", "attn.wo.weight", "mlp.c_proj.weight")


def _shards(state: dict, n: int) -> list[dict]:
    out: list[dict] = [{} for _ in range(n)]
    for key, value in state.items():
        t = torch.as_tensor(np.ascontiguousarray(value))
        if key.endswith(COLUMN_SUFFIXES):
            parts = torch.chunk(t, n, dim=0)
        elif key.endswith(ROW_SUFFIXES):
            parts = torch.chunk(t, n, dim=1)
        else:
            parts = [t] * n
        assert len(parts) == n, key
        for i, p in enumerate(parts):
            out[i][key] = p.clone()
    return out


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


def _assert_tree_equal(got: dict, want: dict) -> None:
    g, w = _flat(got), _flat(want)
    assert g.keys() == w.keys(), sorted(set(g) ^ set(w))[:6]
    for k in w:
        np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=str(k))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_vision_directory_converts(tmp_path, meta_sd, params, n_shards):
    src = tmp_path / "meta"
    src.mkdir()
    # Meta's params.json cannot describe a tiny vision encoder (its size is fixed in Meta's code), so the config
    # is passed; params.json must still be present (it identifies the format).
    (src / "params.json").write_text(json.dumps({"dim": CFG.text.dim, "vision_chunk_size": CFG.vision.image_size}))
    for i, shard in enumerate(_shards(meta_sd, n_shards)):
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    out = lj.convert(src, tmp_path / "orbax", dtype="float32", config=CFG, progress=False)
    record, config = read_manifest(out)
    assert config == CFG and record["source"]["format"] == "meta"
    _, restored = restore_params(out)
    _assert_tree_equal(restored, params)
    _assert_loads_as_the_tree(out, params)


def _assert_loads_as_the_tree(path, params) -> None:
    """``lj.load`` builds the vision model from the checkpoint; its (text-only) logits equal the tree's."""
    model = lj.load(path, dtype="float32")
    assert isinstance(model.module, Mllama)
    want = load_params(CFG, params, param_dtype=jnp.float32)
    tokens = [[1, 2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(
        np.asarray(model.logits(tokens)), np.asarray(lj.forward(want, jnp.asarray(tokens))[0])
    )


def test_hf_vision_directory_converts(tmp_path, hf_model, params):
    hf_model.save_pretrained(tmp_path / "hf")
    out = lj.convert(tmp_path / "hf", tmp_path / "orbax", dtype="float32", progress=False)
    _, config = read_manifest(out)
    assert config.is_vision and config.vision == CFG.vision
    assert config.text.hf_cross_attention_layers == CFG.text.hf_cross_attention_layers
    _, restored = restore_params(out)
    _assert_tree_equal(restored, params)
    _assert_loads_as_the_tree(out, params)
    _assert_loads_as_the_tree(tmp_path / "hf", params)  # the HF directory directly


def test_vision_shard_that_differs_where_replicated_is_named(tmp_path, meta_sd):
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text("{}")
    shards = _shards(meta_sd, 2)
    key = "vision_model.vision_encoder.ln_pre.weight"
    shards[1][key] = shards[1][key] + 1.0
    for i, shard in enumerate(shards):
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError, match=r"ln_pre.weight' should be replicated but differs"):
        lj.convert(src, tmp_path / "orbax", config=CFG, progress=False)
    assert not (tmp_path / "orbax").exists()
