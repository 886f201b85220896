"""The public entry points: ``load(path)`` and the ``Model`` it returns (``generate``, ``chat``, ``logits``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax import sharding
from llama32_jax.checkpoint.gguf import read_gguf
from llama32_jax.checkpoint.hf import read_hf_params
from llama32_jax.checkpoint.meta import read_meta_params
from llama32_jax.checkpoint.orbax_ckpt import is_converted_checkpoint, manifest_quant, read_manifest, restore_params
from llama32_jax.configs.base import ATTENTION_IMPLS, DTYPES, ModelConfig
from llama32_jax.errors import CheckpointError, InvalidInputError, QuantizationError
from llama32_jax.inference import guard
from llama32_jax.inference.continuous import generate_continuous, static_fits
from llama32_jax.inference.generate import (
    GenerationOutput,
    encode_images,
    generate_tokens,
    image_tile_mask,
    stops_per_sequence,
)
from llama32_jax.inference.guard import ModerationError, parse_verdict
from llama32_jax.inference.text_stream import TextStreamer
from llama32_jax.inputs.chat_format import chat_format_for, dialog_images
from llama32_jax.inputs.checks import (
    check_bool,
    check_image_lists,
    check_stream,
    input_vocab,
    load_arguments,
    token_array,
    token_row,
)
from llama32_jax.inputs.image import ImageBatch, preprocess
from llama32_jax.inputs.tokenizer import HFTokenizer, load_tokenizer
from llama32_jax.models.build import forward, load_params
from llama32_jax.nn.attend import set_attention_impl
from llama32_jax.quant.config import resolve_quantize
from llama32_jax.sharding.apply import restore_shardings, shard_model, validate
from llama32_jax.sharding.distributed import to_host

IMAGE_MARKER = "<|image|>"  # in a text prompt given with images: where each image goes


@dataclasses.dataclass(frozen=True)
class Completion:
    """A generated continuation: its text (stop token excluded), token ids, why it stopped, optional logprobs."""

    text: str
    tokens: list[int]
    stop_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None


class Model:
    """A loaded model with its tokenizer: ``generate``, ``chat`` and ``logits``.

    Build one with :func:`load`, or directly from an NNX module and a tokenizer.
    """

    def __init__(self, module: nnx.Module, tokenizer: Any | None = None, *, source: str | None = None):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self._chat_format = None

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    def __repr__(self) -> str:
        return f"Model({self.config.name!r}, source={self.source!r})"

    def set_attention_impl(self, impl: str) -> Model:
        """Use ``impl`` for every attention call: ``"auto"`` (Pallas kernels on GPU/TPU, XLA on CPU), ``"xla"`` or
        ``"pallas"`` (our kernels; interpreted on CPU, which is slow but exact). Returns the model."""
        if impl not in ATTENTION_IMPLS:
            raise InvalidInputError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        set_attention_impl(self.module, impl)
        return self

    # ----------------------------------------------------------------------------------------------------------
    def logits(self, token_ids: Any, images: Any = None) -> np.ndarray:
        """Full-sequence logits: ``token_ids [B, T]`` ints (model ids) -> ``[B, T, V]`` float32 numpy.

        ``images`` (vision models): one list of images per row (paths, PIL images or arrays; as many as the row
        has ``config.image_token_id`` tokens, which mark where they are), or an
        :class:`~llama32_jax.inputs.image.ImageBatch` from :func:`~llama32_jax.inputs.image.preprocess`.
        """
        ids = token_array(token_ids, input_vocab(self.config))
        if images is None:
            check_image_lists(self.config, None, ids.shape[0], ids.tolist())
        if ids.shape[1] > self.config.text.max_position_embeddings:
            raise InvalidInputError(
                f"{ids.shape[1]} tokens exceed the model context of {self.config.text.max_position_embeddings}"
            )
        cross = None if images is None else self._cross_inputs(ids, images)
        logits, _ = forward(self.module, jnp.asarray(ids, jnp.int32), cross=cross)
        return to_host(logits)

    def _cross_inputs(self, ids: np.ndarray, images: Any):
        """Encode ``images`` for the rows of ``ids`` (vision tower + cross-attention K/V), as generation does."""
        if not self.config.is_vision:
            raise InvalidInputError(f"{self.config.name} is a text model; images are not accepted")
        if not isinstance(images, ImageBatch):
            check_image_lists(self.config, images, ids.shape[0], ids.tolist())
        batch = images if isinstance(images, ImageBatch) else self._preprocess_images(images, ids.shape[0])
        tile_mask = image_tile_mask(self.config, ids.tolist(), batch, ids.shape[1])
        graphdef, state = nnx.split(self.module)
        dtype = self.module.embed.embedding.dtype
        pixels = jnp.asarray(batch.pixel_values, dtype)
        return encode_images(graphdef, state, pixels, jnp.asarray(batch.aspect_ratio_ids), jnp.asarray(tile_mask))

    # ----------------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] = 0,
        stop_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        logprobs: bool = False,
        stream: Callable[[int, str], None] | None = None,
        return_details: bool = False,
        add_bos: bool | None = None,
        images: Any = None,
        slots: int | None = None,
    ) -> list[str] | list[Completion]:
        """Generate a continuation for each prompt (text, or token ids used as given).

        Text prompts are encoded with the tokenizer, BOS first when ``add_bos`` (default: the tokenizer's own
        convention, e.g. yes for Llama 3, no for SmolLM2). Token-id prompts are ints or integer arrays, of any
        lengths; floats and bools are refused, never rounded.
        Every sampling argument is one value or one per prompt; ``temperature=0`` is greedy; ``top_k`` at least the
        vocabulary size is the same as 0 (off); any int ``seed`` works (``seed mod 2**32`` is used). ``stop_ids``
        (one id, one list, or one list per prompt) defaults to the tokenizer's stop tokens (Llama 3 instruct:
        128001, 128008, 128009). ``stream(i, text_delta)`` receives each prompt's new text as it is generated; an
        exception it raises stops the streaming and is re-raised from here. Returns the texts, or
        :class:`Completion` records with ``return_details=True``. Bad arguments raise
        :class:`~llama32_jax.errors.InvalidInputError` naming them (see :mod:`llama32_jax.inputs.checks`).

        Vision models: ``images`` holds one list of images per prompt (PIL images, uint8 arrays or file paths; a
        prompt may have none), one for each ``<|image|>`` in the prompt, in order.

        Any number of prompts: when there are more than ``slots`` (default: what half the free device memory holds,
        at most 32 on a CPU), they go through continuous batching (:class:`~llama32_jax.inference.engine.Engine`):
        ``slots`` run at once and each finished one is refilled. A prompt's output is the same either way.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if hasattr(prompts, "__array__") and np.ndim(prompts) == 2:  # a [batch, length] numpy / JAX array
            prompts = list(np.asarray(prompts))
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise InvalidInputError("prompts must be a non-empty list of strings or of token-id lists")
        if all(isinstance(p, (int, np.integer)) for p in prompts):
            raise InvalidInputError(
                "prompts is a flat list of ints; each prompt is a string or a list of token ids: wrap one as [[...]]"
            )
        add_bos = check_bool(add_bos, "add_bos", allow_none=True)
        check_image_lists(self.config, images, len(prompts))
        ids = [
            self._model_ids(self._encode_prompt(p, i, add_bos, images=images is not None))
            for i, p in enumerate(prompts)
        ]
        check_image_lists(self.config, images, len(prompts), ids)
        batch = self._preprocess_images(images, len(prompts))
        return self._generate_ids(
            ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, logprobs, stream, return_details, batch,
            slots,
        )  # fmt: skip

    def chat(
        self,
        dialogs: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] = 0,
        stop_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        logprobs: bool = False,
        stream: Callable[[int, str], None] | None = None,
        return_details: bool = False,
        slots: int | None = None,
        **format_options: Any,
    ) -> list[str] | list[Completion]:
        """Reply to one dialog (a list of ``{"role", "content"}`` messages) or a batch of dialogs.

        Llama checkpoints use Meta's chat format (roles system/user/assistant/ipython; ``system_date=`` adds the
        date-stamped system header); other HF tokenizers use their own chat template, whose variables are the
        other valid ``format_options``; an unknown option is an error. Returns one reply each. Any number of
        dialogs: ``slots`` as in :meth:`generate`.
        """
        if isinstance(dialogs, (list, tuple)) and dialogs and isinstance(dialogs[0], dict):
            dialogs = [dialogs]
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise InvalidInputError("dialogs must be a non-empty list of messages, or a list of such lists")

        fmt = self._get_chat_format()
        fmt.check_options(format_options)
        ids, images = [], []
        for k, d in enumerate(dialogs):
            try:
                ids.append(self._model_ids(fmt.encode_dialog(d, add_generation_prompt=True, **format_options)))
                images.append(dialog_images(d, text_model=None if self.config.is_vision else self.config.name))
            except InvalidInputError as e:
                if len(dialogs) == 1:
                    raise
                raise InvalidInputError(f"dialog {k}: {e}") from e
        batch = self._preprocess_images(images if any(images) else None, len(dialogs))
        return self._generate_ids(
            ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, logprobs, stream, return_details, batch,
            slots,
        )  # fmt: skip

    def moderate(
        self,
        conversation: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        categories: dict[str, str] | None = None,
        excluded_categories: Sequence[str] = (),
        max_new_tokens: int | None = None,
        slots: int | None = None,
    ):
        """Llama Guard 3: is the last message of ``conversation`` safe? Returns a
        :class:`~llama32_jax.inference.guard.ModerationResult` (``.safe``, ``.categories`` such as ``("S1",)``), or a
        list of them for a list of conversations (one batch).

        ``conversation``: alternating ``{"role": "user"|"assistant", "content"}`` messages starting with the user;
        the last is judged (``role`` ``"User"`` or ``"Agent"``). Content is a string or a list of
        ``{"type": "text", "text"}`` / ``{"type": "image", "image"}`` parts; Llama Guard 3 11B-Vision judges at
        most one image per conversation. ``categories`` replaces the 13 default hazard categories;
        ``excluded_categories`` (e.g. ``["S6"]``) leaves codes out. Decoding is greedy. Raises
        :class:`~llama32_jax.inference.guard.ModerationError` if the model's answer is not a verdict (e.g. the
        checkpoint is not a guard model). See :mod:`llama32_jax.inference.guard` for the exact prompt. Any number
        of conversations: ``slots`` as in :meth:`generate`.
        """
        single = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], dict)
        conversations = [conversation] if single else conversation
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InvalidInputError("conversation must be a list of messages, or a list of such lists")
        guard.check_categories(categories, excluded_categories)
        prompts = []
        for k, c in enumerate(conversations):
            try:
                prompts.append(guard.build_prompt(c, categories=categories, excluded_categories=excluded_categories))
            except InvalidInputError as e:
                raise InvalidInputError(str(e) if single else f"conversation {k}: {e}") from None
        images = [list(p.images) for p in prompts]
        for k, found in enumerate(images):
            if found and not self.config.is_vision:
                raise InvalidInputError(
                    f"conversation {k} has an image but {self.config.name} is a text model; image moderation needs "
                    "Llama Guard 3 11B-Vision"
                )
            if len(found) > 1:
                raise InvalidInputError(
                    f"conversation {k} has {len(found)} images; Llama Guard 3 Vision judges one image per conversation"
                )
        tokenizer = self._require_tokenizer()
        ids = [self._model_ids(p.token_ids(tokenizer)) for p in prompts]
        batch = self._preprocess_images(images if any(images) else None, len(ids))
        new = guard.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        outs = self._generate_ids(ids, new, 0.0, 0, 1.0, 0, None, False, None, True, batch, slots)
        results = []
        for k, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
            try:
                results.append(parse_verdict(out.text, role=prompt.role, categories=prompt.categories))
            except ModerationError as e:
                where = "" if single else f"conversation {k}: "
                raise ModerationError(f"{where}{e}", e.raw) from None
        return results[0] if single else results

    # ----------------------------------------------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidInputError(
                f"{self.config.name} was loaded without a tokenizer; pass token ids instead of text"
            )
        return self.tokenizer

    def _get_chat_format(self):
        if self._chat_format is None:
            self._chat_format = chat_format_for(self._require_tokenizer())
        return self._chat_format

    def _encode_prompt(self, prompt, i: int, add_bos: bool | None, *, images: bool = False) -> list[int]:
        """Text is encoded as plain text (special-token strings are not parsed), except that with images each
        ``<|image|>`` marks where an image goes."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidInputError(f"prompt {i} is an empty string")
            tok = self._require_tokenizer()
            bos = tok.add_bos if add_bos is None else add_bos
            if bos and tok.bos_id is None:
                raise InvalidInputError("add_bos=True but the tokenizer has no BOS token")
            if not images:
                return tok.encode(prompt, bos=bos)
            ids = [tok.bos_id] if bos else []
            for k, piece in enumerate(prompt.split(IMAGE_MARKER)):
                if k:
                    ids.append(self.config.image_token_id)
                if piece:
                    ids += tok.encode(piece, bos=False)
            return ids
        if isinstance(prompt, (list, tuple, np.ndarray)) or hasattr(prompt, "__array__"):
            return token_row(prompt, f"prompt {i}", input_vocab(self.config))
        raise InvalidInputError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")

    def _preprocess_images(self, images, n: int):
        if images is None:
            return None
        if not self.config.is_vision:
            raise InvalidInputError(f"{self.config.name} is a text model; images are not accepted")

        if not isinstance(images, (list, tuple)) or len(images) != n:
            raise InvalidInputError(f"images must hold one list of images per prompt ({n} prompts)")
        return preprocess(images, self.config.vision)

    def _model_ids(self, ids: list[int]) -> list[int]:
        """Meta's tokenizer writes ``<|image|>`` as 128011; the model's embedding row is ``config.image_token_id``."""
        tokenizer_image = getattr(self.tokenizer, "image_id", None)
        if self.config.is_vision and tokenizer_image is not None and tokenizer_image != self.config.image_token_id:
            return [self.config.image_token_id if t == tokenizer_image else t for t in ids]
        return ids

    def _generate_ids(
        self,
        ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop_ids,
        logprobs,
        stream,
        return_details,
        images=None,
        slots=None,
    ):
        if stop_ids is None:
            stop_ids = list(self.tokenizer.stop_ids) if self.tokenizer is not None else []
        check_bool(logprobs, "logprobs")
        check_bool(return_details, "return_details")
        check_stream(stream, has_tokenizer=self.tokenizer is not None)
        stop_ids = stops_per_sequence(stop_ids, len(ids), self.config.text.vocab_size)
        streamer = None if stream is None else TextStreamer(self.tokenizer, stream, len(ids), stop_ids)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop_ids=stop_ids, logprobs=logprobs, images=images)  # fmt: skip
        if static_fits(self.module, ids, max_new_tokens, slots):
            outs = generate_tokens(self.module, ids, on_step=streamer, **kw)
        else:
            on_tokens = None if streamer is None else streamer.feed
            outs = generate_continuous(self.module, ids, slots=slots, on_tokens=on_tokens, **kw)
        completions = [self._completion(o) for o in outs]
        return completions if return_details else [c.text for c in completions]

    def _completion(self, out: GenerationOutput) -> Completion:
        body = out.tokens[:-1] if out.stop_reason == "stop" else out.tokens
        text = self.tokenizer.decode(body) if self.tokenizer is not None else ""
        return Completion(
            text=text,
            tokens=out.tokens,
            stop_reason=out.stop_reason,
            prompt_tokens=out.prompt_length,
            logprobs=out.logprobs,
        )


# --------------------------------------------------------------------------------------------------------------


def _placed(model: Model, placement, attention_impl: str) -> Model:
    """Shard the model's parameters by ``placement`` (plan, mesh; arrays already in place are not moved) and set
    its attention implementation."""
    model.set_attention_impl(attention_impl)
    if placement is not None:
        shard_model(model.module, *placement)
    return model


def load(
    path: str | os.PathLike,
    mesh: Any = None,
    dtype: str = "bfloat16",
    attention_impl: str = "auto",
    *,
    scan_layers: bool = False,
    quantize: Any = None,
    **unknown: Any,
) -> Model:
    """Load a checkpoint into a :class:`Model`.

    ``path`` is a converted Orbax directory (``llama32_jax.convert``; restored straight to the device), an HF
    model directory (``config.json`` + safetensors + tokenizer files), a Meta directory (``params.json`` +
    ``consolidated.NN.pth`` shards + ``tokenizer.model``; text models) or a llama-architecture ``.gguf`` file
    (dequantized to ``dtype``).

    ``attention_impl``: ``"auto"`` uses our Pallas kernels (:mod:`llama32_jax.kernels`: flash attention for
    prefill, split-K decode attention, the Mllama cross-attention) on GPU and TPU and XLA's attention on CPU;
    ``"pallas"`` forces the kernels (on CPU they run in Pallas' interpreter: exact, slow); ``"xla"`` forces XLA.

    ``mesh``: a sharding plan (a name in ``sharding/`` such as ``"h100x8"``, a ``.toml`` path, a
    :class:`~llama32_jax.sharding.Plan`) or a ``jax.sharding.Mesh`` with axes named ``data`` / ``fsdp`` /
    ``tensor``. A converted checkpoint is restored straight into the plan's shardings (each host reads only its
    shards); other formats are read on the host, then placed. The model's calls then keep activations, the KV
    cache and the cross-attention inputs on the plan.

    ``quantize``: ``"int8"`` (one scale per output channel) or ``"int4"`` (one per 128 inputs) weight-only
    quantization of the projections (text decoder, cross-attention blocks, vision tower, untied head), or a
    :class:`~llama32_jax.quant.QuantConfig` (group size; ``skip=("vision", "head")`` keeps those in ``dtype``).
    Embeddings and norms stay in ``dtype``. Float weights are quantized one at a time on the host, so the device
    never holds them. A checkpoint converted with ``--quantize`` is restored as stored (with ``mesh``: its int
    values and scales straight into the plan's shardings); ``quantize`` may then be None, its own setting or its
    mode's name, anything else is a :class:`~llama32_jax.errors.QuantizationError`. A float converted checkpoint
    loaded with ``quantize`` is restored to host memory and quantized there. ``dtype`` is the float parameters'.

    Bad arguments raise :class:`~llama32_jax.errors.InvalidInputError` naming them (``path`` not a str/PathLike or
    empty, an unknown ``dtype`` -- a name in ``DTYPES`` or the matching dtype object --, ``attention_impl``,
    ``scan_layers`` not a bool, unknown keywords); ``~`` in ``path`` is expanded.
    """
    path, dtype = load_arguments(
        path, dtype, attention_impl, scan_layers, unknown, dtypes=DTYPES, attention_impls=ATTENTION_IMPLS
    )
    quant = resolve_quantize(quantize)
    placement = None
    if mesh is not None:
        placement = sharding.resolve(mesh)
    path = os.path.expanduser(os.fspath(path))  # relative paths are made absolute where they are consumed
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    param_dtype = DTYPES[dtype]
    if os.path.isfile(path) and path.endswith(".gguf"):
        ckpt = read_gguf(path)
        config = ckpt.config.replace(scan_layers=scan_layers)
        tokenizer = HFTokenizer(
            ckpt.tokenizer,
            bos_id=ckpt.bos_id,
            eos_id=ckpt.eos_id,
            pad_id=ckpt.pad_id,
            chat_template=ckpt.chat_template,
            add_bos=ckpt.add_bos,
        )
        return _placed(
            Model(load_params(config, ckpt.params, param_dtype=param_dtype, quant=quant), tokenizer, source=path),
            placement,
            attention_impl,
        )
    if os.path.isdir(path) and is_converted_checkpoint(path):
        return _load_converted(path, placement, param_dtype, quantize, scan_layers, attention_impl)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        config, params = read_hf_params(path)
        config = config.replace(scan_layers=scan_layers)
        tokenizer = _dir_tokenizer(path)
        return _placed(
            Model(load_params(config, params, param_dtype=param_dtype, quant=quant), tokenizer, source=path),
            placement,
            attention_impl,
        )
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "params.json")):
        config, params = read_meta_params(path, scan_layers=scan_layers)
        tok_file = os.path.join(path, "tokenizer.model")
        tokenizer = load_tokenizer(tok_file) if os.path.isfile(tok_file) else None
        return _placed(
            Model(load_params(config, params, param_dtype=param_dtype, quant=quant), tokenizer, source=path),
            placement,
            attention_impl,
        )
    raise CheckpointError(
        f"{path!r} is not a checkpoint llama32_jax can load: expected a converted directory (llama32_jax.json), an "
        "HF directory (config.json), a Meta directory (params.json) or a .gguf file"
    )


def _load_converted(path: str, placement, param_dtype, quantize, scan_layers: bool, attention_impl: str) -> Model:
    """A converted (Orbax) checkpoint, restored straight into the plan's shardings (or onto the first device).

    A quantized checkpoint restores its int values and fp32 scales as stored: ``quantize`` must be None, its own
    :class:`~llama32_jax.quant.QuantConfig` or its mode's name. A float checkpoint loaded with ``quantize`` is
    restored to host memory in its stored dtype, quantized there weight by weight, and only the quantized model
    goes to the devices. The plan is checked against the (quantized) model before anything is read."""
    record, stored = read_manifest(path)
    stored_quant = manifest_quant(record)
    quant = resolve_quantize(quantize)
    if stored_quant is not None:
        if not (quant is None or quant == stored_quant or quantize == stored_quant.mode):
            raise QuantizationError(
                f"{path!r} is a quantized checkpoint ({stored_quant.describe()}) and cannot be loaded with "
                f"quantize={quant.describe()!r}: pass quantize=None or its own setting, or convert the float source "
                "again with the setting you want"
            )
        quant = stored_quant
    if placement is not None:
        validate(stored, placement[0], quant)
    on_host = stored_quant is None and quant is not None
    if on_host:
        target, restore_dtype = _host_sharding(), None
    elif placement is not None:  # each array is read straight into its shards (each host reads only its own)
        target, restore_dtype = restore_shardings(stored, *placement, quant=stored_quant), param_dtype
    else:
        target, restore_dtype = None, param_dtype
    config, params = restore_params(path, param_dtype=restore_dtype, sharding=target)
    if on_host:
        params = jax.tree.map(np.asarray, params)
    config = config.replace(scan_layers=scan_layers)
    tokenizer = _dir_tokenizer(path)
    return _placed(
        Model(load_params(config, params, param_dtype=param_dtype, quant=quant), tokenizer, source=path),
        placement,
        attention_impl,
    )


def _dir_tokenizer(path: str):
    """The tokenizer saved in checkpoint directory ``path`` (``tokenizer.json`` or ``tokenizer.model``), or None."""
    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    return load_tokenizer(path) if has_tok else None


def _host_sharding() -> Callable[[tuple, tuple], Any]:
    """Restore onto the host's CPU device (present beside any accelerator), not onto an accelerator."""
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device is all there is
        device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device)
    return lambda path, shape: host
