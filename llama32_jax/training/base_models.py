"""The base models and outputs of fine-tuning runs: the built-in ``tiny-text`` model (a random-weight
``configs.TINY_TEXT`` with a byte-level tokenizer carrying the Llama 3 special tokens, for tests and trials),
loading a run's base model by path or name, and exporting the trained model (LoRA merged) as an HF directory with
the base model's tokenizer files (:mod:`llama32_jax.training.state` saves and resumes the run itself).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama32_jax import configs, sharding
from llama32_jax.api import Model, load
from llama32_jax.checkpoint.hf_export import source_path, write_export_marker, write_hf_files, write_tokenizer_files
from llama32_jax.checkpoint.pipeline import atomic_directory, check_output
from llama32_jax.configs.base import DTYPES
from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.tokenizer import HFTokenizer
from llama32_jax.models.build import init_model
from llama32_jax.training.lora import has_lora, merge_lora
from llama32_jax.training.train import Trainer

__all__ = [
    "BUILTIN_MODELS",
    "BYTE_SPECIAL_TOKENS",
    "byte_tokenizer",
    "export_model",
    "load_base_model",
]

# Built-in base models (no files needed): a tiny random-weight text model (configs.TINY_TEXT, seed 0) with a
# byte-level tokenizer that has the Llama 3 special tokens (so the Llama 3 chat format applies). For tests and trials.
BUILTIN_MODELS = ("tiny-text",)
BYTE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)


def byte_tokenizer():
    """A byte-level tokenizer: ids 0-255 are the bytes (GPT-2's printable byte alphabet, sorted), then
    :data:`BYTE_SPECIAL_TOKENS` (256-262); no merges, so every byte of text is one token. With the Llama 3 special
    tokens, :func:`llama32_jax.inputs.chat_format.chat_format_for` gives it Meta's chat format. BOS is
    ``<|begin_of_text|>`` (added to plain prompts), the stop ids are ``<|end_of_text|>``, ``<|eom_id|>``,
    ``<|eot_id|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    ids = {t: backend.token_to_id(t) for t in BYTE_SPECIAL_TOKENS}
    return HFTokenizer(
        backend,
        bos_id=ids["<|begin_of_text|>"],
        eos_id=ids["<|end_of_text|>"],
        stop_ids=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        add_bos=True,
        name="byte-level tokenizer",
    )


def load_base_model(spec: str, *, dtype: str = "float32", mesh: Any = None, scan_layers: bool = False):
    """The base model of a run as an ``llama32_jax.Model``: :func:`llama32_jax.load` of a path, or a built-in
    (:data:`BUILTIN_MODELS`; ``"tiny-text"``: ``configs.TINY_TEXT`` with random weights, seed 0, and
    :func:`byte_tokenizer`). ``mesh``: a sharding plan or mesh, as for ``load``."""

    if spec not in BUILTIN_MODELS:
        return load(spec, mesh=mesh, dtype=dtype, scan_layers=scan_layers)

    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    module = init_model(configs.TINY_TEXT.replace(scan_layers=scan_layers), param_dtype=DTYPES[dtype], seed=0)
    if mesh is not None:
        plan, placed_mesh = sharding.resolve(mesh)
        sharding.shard_model(module, plan, placed_mesh)
    return Model(module, byte_tokenizer(), source=spec)


# --------------------------------------------------------------------------------------------- export


def export_model(
    trainer: Trainer,
    model: Any,
    output: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    record: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the trained model as a Hugging Face directory, LoRA adapters merged into the weights.

    ``model`` is the base ``llama32_jax.Model`` (for its tokenizer: :func:`write_tokenizer_files`). The directory
    holds ``config.json``, ``model.safetensors`` (``dtype``), the tokenizer files and ``finetune.json`` (``record``
    plus whether LoRA was merged) and the export marker ``llama32_jax_export.json``. It is built under a temporary
    sibling and renamed into place when complete (a failed write, e.g. a full disk, is a
    :class:`~llama32_jax.errors.StorageError` and leaves nothing); an existing ``output`` is refused unless
    ``overwrite`` and it is an earlier llama32_jax output (never a foreign directory), as is one that overlaps the
    base model's directory. ``output`` may be relative or start with ``~``. The trainer is left as it
    was (the merge works on a copy of its variables).
    ``llama32_jax.load(output)`` reads the result; ``python -m llama32_jax.convert`` converts it to Orbax.
    """

    from flax import nnx

    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out = check_output(output, overwrite=overwrite, source=source_path(model))
    # copy=True: nnx.merge would otherwise share Variables with the trainer, and merging would change its state.
    module = nnx.merge(trainer.graphdef, trainer.trainable, trainer.frozen, copy=True)
    merged = has_lora(module)
    if merged:
        merge_lora(module)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_hf_files(Model(module, None), tmp, dtype=dtype, tokenizer_dir=None)
        files = write_tokenizer_files(model, tmp)
        info = {**(record or {}), "lora_merged": merged, "dtype": dtype, "tokenizer_files": files}
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")
        write_export_marker(tmp, dtype=dtype)
    return out
