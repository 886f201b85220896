"""Key tables: source checkpoint names -> our parameter paths, with the transform each tensor needs.

These are data. A rule's ``source`` may contain ``{i}`` (a layer index); its ``target`` is our path in the
per-layer layout, with ``"{i}"`` in the same place. ``transform`` names an entry of :data:`TRANSFORMS`, a pure
function ``(array, TextConfig) -> array`` that turns torch's ``(out, in)`` Linear weights into our einsum kernels
(and for Meta's ``wq``/``wk`` also permutes RoPE rows from interleaved to half-split, docs/model-facts.md §2.3). Each
transform has an inverse in :data:`INVERSE_TRANSFORMS`, used to export back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llama32_jax.configs.base import TextConfig
from llama32_jax.nn.rope import half_split_to_interleaved, interleaved_to_half_split

Array = np.ndarray


@dataclass(frozen=True)
class Rule:
    source: str
    target: tuple[str, ...]
    transform: str
    only_if: str | None = None  # "untied": the rule exists only when the head is not tied


# Our kernels keep torch's (out, in) orientation, split into named axes (see layers.py for why), so the
# transforms are reshapes, plus the RoPE row permutation for Meta's wq/wk.
# Shapes below: D dim, N heads, K kv heads, H head dim, F ffn, V vocab (dims.py).
TRANSFORMS: dict[str, Callable[[Array, TextConfig], Array]] = {
    "identity": lambda w, c: w,
    # (N*H, D) -> (N, H, D)
    "q": lambda w, c: w.reshape(c.n_heads, c.head_dim, c.dim),
    # (K*H, D) -> (K, H, D)
    "kv": lambda w, c: w.reshape(c.n_kv_heads, c.head_dim, c.dim),
    # Meta: RoPE rows interleaved -> half-split, then as above
    "meta_q": lambda w, c: interleaved_to_half_split(w, c.n_heads).reshape(c.n_heads, c.head_dim, c.dim),
    "meta_k": lambda w, c: interleaved_to_half_split(w, c.n_kv_heads).reshape(c.n_kv_heads, c.head_dim, c.dim),
    # (D, N*H) -> (D, N, H)
    "o": lambda w, c: w.reshape(c.dim, c.n_heads, c.head_dim),
}

INVERSE_TRANSFORMS: dict[str, Callable[[Array, TextConfig], Array]] = {
    "identity": lambda w, c: w,
    "q": lambda w, c: w.reshape(c.n_heads * c.head_dim, c.dim),
    "kv": lambda w, c: w.reshape(c.n_kv_heads * c.head_dim, c.dim),
    "meta_q": lambda w, c: half_split_to_interleaved(w.reshape(c.n_heads * c.head_dim, c.dim), c.n_heads),
    "meta_k": lambda w, c: half_split_to_interleaved(w.reshape(c.n_kv_heads * c.head_dim, c.dim), c.n_kv_heads),
    "o": lambda w, c: w.reshape(c.dim, c.n_heads * c.head_dim),
}

_LAYER = ("layers", "{i}")

HF_TEXT: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), "identity"),
    Rule("model.layers.{i}.input_layernorm.weight", (*_LAYER, "attention_norm", "weight"), "identity"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", (*_LAYER, "attention", "wq", "kernel"), "q"),
    Rule("model.layers.{i}.self_attn.k_proj.weight", (*_LAYER, "attention", "wk", "kernel"), "kv"),
    Rule("model.layers.{i}.self_attn.v_proj.weight", (*_LAYER, "attention", "wv", "kernel"), "kv"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", (*_LAYER, "attention", "wo", "kernel"), "o"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", (*_LAYER, "ffn_norm", "weight"), "identity"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", (*_LAYER, "feed_forward", "w1", "kernel"), "identity"),
    Rule("model.layers.{i}.mlp.up_proj.weight", (*_LAYER, "feed_forward", "w3", "kernel"), "identity"),
    Rule("model.layers.{i}.mlp.down_proj.weight", (*_LAYER, "feed_forward", "w2", "kernel"), "identity"),
    Rule("model.norm.weight", ("norm", "weight"), "identity"),
    Rule("lm_head.weight", ("lm_head",), "identity", only_if="untied"),
)

META_TEXT: tuple[Rule, ...] = (
    Rule("tok_embeddings.weight", ("embed", "embedding"), "identity"),
    Rule("layers.{i}.attention_norm.weight", (*_LAYER, "attention_norm", "weight"), "identity"),
    Rule("layers.{i}.attention.wq.weight", (*_LAYER, "attention", "wq", "kernel"), "meta_q"),
    Rule("layers.{i}.attention.wk.weight", (*_LAYER, "attention", "wk", "kernel"), "meta_k"),
    Rule("layers.{i}.attention.wv.weight", (*_LAYER, "attention", "wv", "kernel"), "kv"),
    Rule("layers.{i}.attention.wo.weight", (*_LAYER, "attention", "wo", "kernel"), "o"),
    Rule("layers.{i}.ffn_norm.weight", (*_LAYER, "ffn_norm", "weight"), "identity"),
    Rule("layers.{i}.feed_forward.w1.weight", (*_LAYER, "feed_forward", "w1", "kernel"), "identity"),
    Rule("layers.{i}.feed_forward.w3.weight", (*_LAYER, "feed_forward", "w3", "kernel"), "identity"),
    Rule("layers.{i}.feed_forward.w2.weight", (*_LAYER, "feed_forward", "w2", "kernel"), "identity"),
    Rule("norm.weight", ("norm", "weight"), "identity"),
    Rule("output.weight", ("lm_head",), "identity", only_if="untied"),
)

# Source keys that carry no parameter of ours (derivable buffers), dropped on purpose.
IGNORED = {"meta": ("rope.freqs",), "hf": ()}
# The output-layer key of each format; when the config ties the head it must equal the embedding.
TIED_HEAD_KEY = {"meta": "output.weight", "hf": "lm_head.weight"}
EMBED_KEY = {"meta": "tok_embeddings.weight", "hf": "model.embed_tokens.weight"}
TABLES = {"meta": META_TEXT, "hf": HF_TEXT}

# llama.cpp GGUF tensor names -> Meta names. GGUF keeps Meta's layout, including the interleaved RoPE order of the
# q/k rows (llama.cpp's converter permutes HF checkpoints back to it; verified by logit parity with transformers in
# tests/checkpoint/test_gguf.py), so a renamed GGUF state dict converts with the Meta rules. Shapes are torch's
# ``(out, in)`` once the reader has reversed GGUF's innermost-first dimension order. No output.weight: tied head.
GGUF_TO_META: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "tok_embeddings.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("blk.{i}.attn_q.weight", "layers.{i}.attention.wq.weight"),
    ("blk.{i}.attn_k.weight", "layers.{i}.attention.wk.weight"),
    ("blk.{i}.attn_v.weight", "layers.{i}.attention.wv.weight"),
    ("blk.{i}.attn_output.weight", "layers.{i}.attention.wo.weight"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("blk.{i}.ffn_up.weight", "layers.{i}.feed_forward.w3.weight"),
    ("blk.{i}.ffn_down.weight", "layers.{i}.feed_forward.w2.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "output.weight"),
)


def gguf_tensor_names(text: TextConfig) -> dict[str, str]:
    """Every GGUF tensor a llama file for ``text`` must hold, in file order: GGUF name -> Meta name."""
    out = {}
    for gguf_name, meta_name in GGUF_TO_META:
        if gguf_name == "output.weight" and text.tie_embeddings:
            continue
        for layer in range(text.n_layers) if "{i}" in gguf_name else [None]:
            out[gguf_name.replace("{i}", str(layer))] = meta_name.replace("{i}", str(layer))
    return out


def source_shape(rule: Rule, text: TextConfig) -> tuple[int, ...]:
    """The torch-layout shape a source tensor for ``rule`` must have, from the parameter it fills."""
    d, v, f = text.dim, text.vocab_size, text.ffn_dim
    q, kv = text.n_heads * text.head_dim, text.n_kv_heads * text.head_dim
    leaf = rule.target[-2] if rule.target[-1] in ("kernel", "weight", "embedding") else rule.target[-1]
    shapes = {
        "embed": (v, d),
        "attention_norm": (d,),
        "ffn_norm": (d,),
        "norm": (d,),
        "wq": (q, d),
        "wk": (kv, d),
        "wv": (kv, d),
        "wo": (d, q),
        "w1": (f, d),
        "w3": (f, d),
        "w2": (d, f),
        "lm_head": (v, d),
    }
    return shapes[leaf]


def _compile(rule: Rule) -> re.Pattern:
    return re.compile("^" + re.escape(rule.source).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = {fmt: [(_compile(r), r) for r in table] for fmt, table in TABLES.items()}


def match(fmt: str, key: str) -> tuple[Rule, int | None] | None:
    """The rule for a source key and its layer index, or None if no rule names it."""
    for pattern, rule in _COMPILED[fmt]:
        m = pattern.match(key)
        if m:
            return rule, (int(m.group("i")) if "i" in m.groupdict() else None)
    return None


def target_path(rule: Rule, layer: int | None) -> tuple:
    return tuple(layer if part == "{i}" else part for part in rule.target)


def source_key(rule: Rule, layer: int | None) -> str:
    return rule.source.replace("{i}", str(layer)) if layer is not None else rule.source
