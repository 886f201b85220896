"""Typed errors raised by llama32_jax.

Every public entry point validates its inputs and raises one of these with a message that names the bad input
and says what would be valid. They subclass the matching built-in exception (``ValueError``, ``FileNotFoundError``
...) so callers that already catch those keep working.
"""

from __future__ import annotations


class LlamaJaxError(Exception):
    """Base class of every error raised deliberately by llama32_jax."""


class ConfigError(LlamaJaxError, ValueError):
    """A model configuration (ours, Meta ``params.json`` or HF ``config.json``) is invalid or unsupported."""


class UnsupportedConfigError(ConfigError):
    """A configuration asks for a feature this implementation does not honour (e.g. quantization args)."""


class InvalidInputError(LlamaJaxError, ValueError):
    """An argument to a model call (tokens, cache, lengths, sampling values, ...) is invalid."""


class CheckpointError(LlamaJaxError, ValueError):
    """A checkpoint is malformed: missing/unused keys, shape or dtype mismatches, unreadable files."""


class TokenizerError(LlamaJaxError, ValueError):
    """A tokenizer could not be found or loaded (missing, unreadable or malformed files), or lacks a needed token."""


class QuantizedCheckpointError(UnsupportedConfigError):
    """The checkpoint holds weights quantized by another tool (bitsandbytes, GPTQ, AWQ, compressed-tensors,
    integer tensors, ...).

    llama32_jax reads float checkpoints and its own quantized conversions (``convert --quantize``); the message says
    how to obtain a float checkpoint, which ``lj.load(..., quantize="int8")`` can then quantize.
    """


class NotAModelConfigError(ConfigError):
    """A file given as a model configuration is something else (generation or tokenizer config, LFS pointer, ...)."""


class UnsafePathError(LlamaJaxError, ValueError):
    """An output path would overwrite or overlap something that must not be touched (the source, a foreign
    directory, a file), so nothing was written."""


class StorageError(LlamaJaxError, OSError):
    """Writing an output failed at the operating-system level (disk full, permission denied, read-only file
    system). Whatever was partially written has been removed."""


class TrainingError(LlamaJaxError, RuntimeError):
    """Training cannot go on: e.g. the loss or gradient was non-finite for several steps in a row."""


class QuantizationError(LlamaJaxError, ValueError):
    """A quantization request is invalid: an unknown ``quantize`` mode or option, an int4 group size that does not
    divide a weight's input dimension, or a quantized checkpoint loaded with other quantization settings."""
