"""Every bad input to the public model API is a typed error naming it: token ids, sampling arguments, stop ids,
the stream callback, chat options and dialogs, moderation, images, ``lj.load`` arguments, tokenizer calls.

One tiny text model with a tiny byte-level tokenizer that has the Llama 3 chat tokens, and one tiny vision model,
shared by the module (generation compiles a few small programs once).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama32_jax as lj
from llama32_jax.api import Model
from llama32_jax.configs import TINY_TEXT, TINY_VISION
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.inputs.chat_format import TemplateChatFormat
from llama32_jax.inputs.tokenizer import HFTokenizer
from llama32_jax.models.build import forward, init_model

V = TINY_TEXT.text.vocab_size
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|image|>",
]
CUSTOM_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if custom_flag %}FLAG{% endif %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NEW = 8  # every generation here uses 8 new tokens and prompts of <= 16 tokens: one compiled shape


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello there, how are you today?", "The user asks; the assistant answers."] * 20, trainer)
    # Filler tokens up to the tiny model's vocabulary, so that every id the model generates decodes.
    tok.add_tokens([f"<filler_{i}>" for i in range(V - tok.get_vocab_size(with_added_tokens=True))])
    assert tok.get_vocab_size(with_added_tokens=True) == V
    return tok


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    backend = _bpe(LLAMA3_SPECIALS)
    ids = {t: backend.token_to_id(t) for t in LLAMA3_SPECIALS}
    return HFTokenizer(
        backend,
        bos_id=ids["<|begin_of_text|>"],
        eos_id=ids["<|eot_id|>"],
        stop_ids=[ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        name="tiny-llama3",
    )


@pytest.fixture(scope="module")
def model(tok) -> Model:
    return Model(init_model(TINY_TEXT, param_dtype=jnp.float32, seed=1), tok)


@pytest.fixture(scope="module")
def bare(model) -> Model:
    """The same weights without a tokenizer."""
    return Model(model.module)


@pytest.fixture(scope="module")
def vision() -> Model:
    return Model(init_model(TINY_VISION, param_dtype=jnp.float32, seed=2))


IMG = TINY_VISION.image_token_id


# ------------------------------------------------------------------------------------------------ token ids


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([[1, 1.5, 2.7]], r"prompt 0 position 1 is float 1.5; token ids must be ints"),
        ([[1, 2.0]], r"prompt 0 position 1 is float 2.0"),  # integral floats are refused too, never rounded
        ([np.array([1.0, 2.0])], r"prompt 0 must hold integer token ids, got an array of dtype float64"),
        ([np.array([True, False])], r"prompt 0 must hold integer token ids, got an array of dtype bool"),
        ([[True, 2]], r"prompt 0 position 0 is True"),
        ([[np.bool_(True), 2]], r"prompt 0 position 0 is bool"),
        ([[[1, 2]]], r"prompt 0 is nested: position 0 holds a list"),
        ([[1, 2], [3, [4]]], r"prompt 1 is nested: position 1"),
        ([[1, "2"]], r"prompt 0 position 1 is str '2'"),
        ([[1, None]], r"prompt 0 position 1 is None"),
        ([1, 2, 3], r"flat list of ints; each prompt is a string or a list of token ids: wrap one as \[\[...\]\]"),
        ([[1, 2], []], r"prompt 1 is empty"),
        ([], r"non-empty list"),
        (np.zeros((0, 3), np.int32), r"non-empty list"),
        ([[1, V]], rf"prompt 0 has token id {V} at position 1, outside \[0, {V}\)"),
        ([[-1, 2]], rf"prompt 0 has token id -1 at position 0, outside \[0, {V}\)"),
        ([[1, 2**70]], r"prompt 0 has token id 1180591620717411303424 at position 1"),
        ([np.array([[1, 2]])], r"prompt 0 must be a 1-D sequence of token ids, got an array of shape \(1, 2\)"),
        ([{1, 2}], r"prompt 0 must be a string or a list of token ids, got set"),
    ],
)
def test_bad_token_id_prompts(model, prompts, match):
    with pytest.raises(InvalidInputError, match=match):
        model.generate(prompts, max_new_tokens=NEW)


def test_ragged_prompts_and_integer_arrays_are_accepted(model, bare):
    ragged = model.generate([[5, 6], [7, 8, 9, 10, 11]], max_new_tokens=NEW, return_details=True)
    assert [c.prompt_tokens for c in ragged] == [2, 5]
    as_arrays = model.generate([np.array([5, 6], np.int16), (7, 8, 9, 10, 11)], max_new_tokens=NEW, return_details=True)
    assert [c.tokens for c in as_arrays] == [c.tokens for c in ragged]
    two_d = bare.generate(np.array([[5, 6, 7], [8, 9, 10]]), max_new_tokens=NEW, return_details=True)
    assert len(two_d) == 2 and all(len(c.tokens) == NEW for c in two_d)
    as_jax = bare.generate(jnp.asarray([[5, 6, 7], [8, 9, 10]]), max_new_tokens=NEW, return_details=True)
    assert [c.tokens for c in as_jax] == [c.tokens for c in two_d]


def test_generate_tokens_shares_the_id_checks(model):
    for prompts, match in (([[1, 2.5]], "position 1 is float 2.5"), ([[1, V + 3]], "outside"), ([[]], "is empty")):
        with pytest.raises(InvalidInputError, match=match):
            generate_tokens(model.module, prompts, max_new_tokens=NEW)


@pytest.mark.parametrize(
    ("token_ids", "match"),
    [
        ([[1, 2], [3]], r"token_ids rows have different lengths \[1, 2\]"),
        ([[1, 2.5]], r"prompt 0 position 1 is float 2.5"),
        (np.array([[1.0, 2.0]]), r"dtype float64"),
        (np.array([[True, False]]), r"dtype bool"),
        ([[1, True]], r"position 1 is True"),
        (np.array([1, 2]), r"non-empty integer array \[batch, length\]"),
        ([1, 2], r"token_ids is a flat list of ints; a batch \[batch, length\] is a list of rows"),
        (np.zeros((1, 0), np.int32), r"non-empty integer array"),
        ([[1, V]], rf"outside \[0, {V}\)"),
    ],
)
def test_bad_logits_inputs(model, token_ids, match):
    with pytest.raises(InvalidInputError, match=match):
        model.logits(token_ids)


def test_forward_range_checks_concrete_ids_only(model):
    module = model.module
    for tokens in (np.array([[1, V]]), jnp.asarray([[1, V + 100]]), [[1, -2]]):
        with pytest.raises(InvalidInputError, match=rf"must lie in \[0, {V}\)|outside \[0, {V}\)"):
            forward(module, tokens)
    with pytest.raises(InvalidInputError, match=r"position 1 is float 2.5"):
        forward(module, [[1, 2.5]])
    with pytest.raises(InvalidInputError, match=r"integer array \[batch, length\]"):
        forward(module, np.array([[True, False]]))
    # Inside jit the ids are traced: no check, no host sync, no error (in-range ids give the usual logits).
    ids = jnp.asarray([[3, 4, 5]])
    traced = jax.jit(lambda t: forward(module, t)[0])(ids)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(forward(module, ids)[0]), atol=1e-5)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(stop_ids="abc"), r"stop_ids must be None, an int, a list of ints, or one list per prompt; got str"),
        (dict(stop_ids=b"ab"), r"stop_ids must be None, an int"),
        (dict(stop_ids=[2**40]), rf"stop_ids holds 1099511627776, outside the model's output vocabulary \[0, {V}\)"),
        (dict(stop_ids=[V]), rf"stop_ids holds {V}, outside"),
        (dict(stop_ids=[-1]), r"stop_ids holds -1, outside"),
        (dict(stop_ids=[1.5]), rf"stop_ids holds float 1.5; stop ids must be ints in \[0, {V}\)"),
        (dict(stop_ids=[True]), r"stop_ids holds True"),
        (dict(stop_ids=[[1], 2]), r"stop_ids mixes ids and lists"),
        (dict(stop_ids=[[1], [2], [3]]), r"stop_ids has 3 lists for 2 prompts"),
        (dict(stop_ids=[[1], [V + 1]]), rf"stop_ids\[1\] \(prompt 1\) holds {V + 1}"),
        (dict(stop_ids={1, 2}), r"stop_ids must be None, an int"),
        (dict(temperature=None), r"temperature must be a finite number >= 0 \(0 = greedy\), got None"),
        (dict(temperature="hot"), r"temperature must be a finite number"),
        (dict(temperature=float("inf")), r"temperature must be a finite number"),
        (dict(temperature=[0.0, None]), r"temperature \(prompt 1\) must be a finite number"),
        (dict(temperature=[0.0]), r"temperature has 1 entries for 2 prompts"),
        (dict(top_k=-1), r"top_k must be an int >= 0"),
        (dict(top_k=2.0), r"top_k must be an int >= 0"),
        (dict(top_k=None), r"top_k must be an int >= 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=None), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=[1.0, 1.01]), r"top_p \(prompt 1\) must be a number in \(0, 1\]"),
        (dict(seed=1.5), r"seed must be an int \(any size; seed mod 2\*\*32 is used\), got float 1.5"),
        (dict(seed=None), r"seed must be an int"),
        (dict(seed=[1, "2"]), r"seed \(prompt 1\) must be an int"),
        (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 1, got True"),
        (dict(max_new_tokens=2.0), r"max_new_tokens must be an int >= 1, got float 2.0"),
        (dict(max_new_tokens=[NEW, 0]), r"max_new_tokens \(prompt 1\) must be an int >= 1, got int 0"),
        (dict(max_new_tokens=[NEW, NEW, NEW]), r"max_new_tokens has 3 entries for 2 prompts"),
        (dict(max_new_tokens=131072), r"prompt 0 has 2 tokens; with max_new_tokens=131072 it exceeds the model"),
        (dict(logprobs="yes"), r"logprobs must be True or False, got str 'yes'"),
        (dict(return_details=1), r"return_details must be True or False, got int 1"),
        (dict(add_bos="no"), r"add_bos must be True, False or None, got str 'no'"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, match):
    kwargs = {"max_new_tokens": NEW, **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        model.generate([[5, 6], [7, 8, 9]], **kwargs)


def test_sampling_edge_values_that_are_accepted(model):
    prompts = [[5, 6], [7, 8, 9]]

    def tokens(**kw):
        return [c.tokens for c in model.generate(prompts, max_new_tokens=NEW, return_details=True, **kw)]

    greedy = tokens(stop_ids=[])
    # One bare stop id means [id]; a numpy array of per-prompt values works like a list.
    stop = greedy[0][2]
    assert tokens(stop_ids=stop) == tokens(stop_ids=[stop])
    assert tokens(temperature=np.array([0.0, 0.0]), stop_ids=[]) == greedy
    # top_k beyond the vocabulary keeps every token (same samples as top_k=0).
    assert tokens(temperature=1.0, top_k=2**40, seed=3, stop_ids=[]) == tokens(temperature=1.0, seed=3, stop_ids=[])
    # Any int seed: only seed mod 2**32 matters, as in jax.random.PRNGKey.
    big = tokens(temperature=1.0, seed=2**70 + 7, stop_ids=[])
    assert big == tokens(temperature=1.0, seed=7, stop_ids=[])
    assert tokens(temperature=1.0, seed=-1, stop_ids=[]) == tokens(temperature=1.0, seed=2**32 - 1, stop_ids=[])


# ------------------------------------------------------------------------------------------------ streaming


class _Abort(BaseException):
    """Like KeyboardInterrupt: not an Exception."""


def test_stream_must_be_callable_and_needs_a_tokenizer(model, bare):
    with pytest.raises(InvalidInputError, match=r"stream must be a callable stream\(prompt_index, text_delta\)"):
        model.generate([[5, 6]], max_new_tokens=NEW, stream="print")
    with pytest.raises(InvalidInputError, match=r"stream receives text, but this model has no tokenizer"):
        bare.generate([[5, 6]], max_new_tokens=NEW, stream=print)
    with pytest.raises(InvalidInputError, match=r"on_step must be a callable"):
        generate_tokens(model.module, [[5, 6]], max_new_tokens=NEW, on_step=3)


@pytest.mark.parametrize("error", [ValueError("boom"), _Abort("stop now")], ids=["ValueError", "BaseException"])
def test_a_raising_stream_callback_re_raises_the_users_exception(model, error):
    calls = []

    def stream(i, delta):
        calls.append((i, delta))
        if len(calls) == 3:
            raise error

    with pytest.raises(type(error)) as info:
        model.generate(["Hello there"], max_new_tokens=NEW, stop_ids=[], stream=stream)
    assert info.value is error  # the user's own object, not a JaxRuntimeError
    assert any(frame.name == "stream" for frame in info.traceback)  # with the callback's frame
    assert len(calls) == 3  # not called again after it raised
    # The model is still usable, with or without a stream.
    again: list[str] = []
    text = model.generate(["Hello there"], max_new_tokens=NEW, stop_ids=[], stream=lambda i, d: again.append(d))[0]
    assert "".join(again) == text == model.generate(["Hello there"], max_new_tokens=NEW, stop_ids=[])[0]


def test_a_raising_on_step_re_raises_from_generate_tokens(model):
    steps = []

    def on_step(step, tokens, done):
        steps.append(step)
        if step == 3:
            raise ValueError("boom at step 3")

    with pytest.raises(ValueError, match="boom at step 3"):
        generate_tokens(model.module, [[5, 6], [7]], max_new_tokens=NEW, on_step=on_step)
    assert steps == [0, 1, 2, 3]
    assert len(generate_tokens(model.module, [[5, 6]], max_new_tokens=NEW)[0].tokens) == NEW


# ------------------------------------------------------------------------------------------------ chat


USER = {"role": "user", "content": "Hello there"}


def _template_model(model) -> Model:
    backend = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = HFTokenizer(
        backend, bos_id=None, eos_id=backend.token_to_id("<|im_end|>"), chat_template=CUSTOM_TEMPLATE, name="chatml"
    )
    return Model(model.module, tok)


def test_unknown_chat_options_are_named(model):
    with pytest.raises(InvalidInputError, match=r"unknown chat option\(s\) \['bogus'\] for the Llama 3 chat format; "):
        model.chat([USER], max_new_tokens=NEW, bogus=1)
    with pytest.raises(InvalidInputError, match=r"\['add_generation_prompt'\].*valid options are \['system_date'\]"):
        model.chat([USER], max_new_tokens=NEW, add_generation_prompt=False)
    templated = _template_model(model)
    with pytest.raises(InvalidInputError, match=r"\['bogus'\] for this chat template; valid options are "):
        templated.chat([USER], max_new_tokens=NEW, bogus=1)
    fmt = templated._get_chat_format()
    assert isinstance(fmt, TemplateChatFormat) and "custom_flag" in fmt.options
    assert "FLAG" in fmt.render([USER], custom_flag=True) and "FLAG" not in fmt.render([USER])
    with pytest.raises(InvalidInputError, match=r"valid options are \['system_date', 'custom_flag'\]"):
        fmt.render([USER], tools=[])


@pytest.mark.parametrize(
    ("dialogs", "match"),
    [
        ("hello", r"dialogs must be a non-empty list"),
        ([], r"dialogs must be a non-empty list"),
        ([[]], r"messages must be a non-empty list"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"content": "x"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]: unknown chat role 'robot'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str or a list"),
        ([USER, {"role": "system", "content": "late"}], r"messages\[1\] is a system message; .* only come first"),
        (
            [{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4, 3), np.uint8)}]}],
            r"messages\[0\]\['content'\]\[0\] is an image, but tiny-text is a text model",
        ),
        ([[USER], [USER, "hi"]], r"dialog 1: messages\[1\] must be a dict"),
        ([[USER], "hi"], r"dialog 1: messages must be a list of message dicts, got str"),
    ],
)
def test_malformed_dialogs_name_the_message(model, dialogs, match):
    with pytest.raises(InvalidInputError, match=match):
        model.chat(dialogs, max_new_tokens=NEW)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str or a list of part dicts"),
        ([{"role": "user", "content": ["x"]}], r"messages\[0\]\['content'\] must be a str or a list of part dicts"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([USER, {"role": "system", "content": "x"}], r"messages\[1\] is a system message"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\] has unknown chat role 'robot'"),
    ],
)
def test_malformed_dialogs_in_template_formats(model, messages, match):
    fmt = _template_model(model)._get_chat_format()
    with pytest.raises(InvalidInputError, match=match):
        fmt.encode_dialog(messages)
    # A tool-call message without content stays valid for templates.
    fmt.render([USER, {"role": "assistant", "tool_calls": [], "content": None}])


def test_moderation_inputs_are_named(model):
    with pytest.raises(InvalidInputError, match=r"categories must be None or a mapping of code -> description"):
        model.moderate([USER], categories=["S1"])
    with pytest.raises(InvalidInputError, match=r"excluded_categories must be a list of category codes .* got 'S6'"):
        model.moderate([USER], excluded_categories="S6")
    with pytest.raises(InvalidInputError, match=r"conversation 1: message 0 must be a mapping with 'role'"):
        model.moderate([[USER], ["hi"]])
    with pytest.raises(InvalidInputError, match=r"conversation 1: message 0 has role 'assistant'"):
        model.moderate([[USER], [{"role": "assistant", "content": "x"}]])
    with pytest.raises(InvalidInputError, match=r"message 0 must be a mapping .*, got \['role'\]"):
        model.moderate([{"role": "user"}])
    with pytest.raises(InvalidInputError, match=r"max_new_tokens must be an int >= 1, got int 0"):
        model.moderate([USER], max_new_tokens=0)


# ------------------------------------------------------------------------------------------------ images


def test_image_tokens_need_images(vision):
    with pytest.raises(InvalidInputError, match=r"prompt 1 has 1 <\|image\|> token\(s\) but 0 image\(s\); pass"):
        vision.generate([[5, 6], [IMG, 5, 6]], max_new_tokens=NEW)
    with pytest.raises(InvalidInputError, match=r"prompt 0 has 2 <\|image\|> token\(s\) but 0 image\(s\)"):
        vision.logits([[IMG, 5, IMG]])


def test_bad_image_arguments(vision, model, tmp_path):
    pixels = np.zeros((28, 28, 3), np.uint8)
    cases = [
        (dict(images=[[pixels]]), [[5, 6]], r"prompt 0 has 0 <\|image\|> token\(s\) but 1 image\(s\)"),
        (dict(images=[[pixels, pixels]]), [[IMG, 6]], r"prompt 0 has 1 <\|image\|> token\(s\) but 2 image\(s\)"),
        (dict(images=[[pixels]]), [[IMG], [5]], r"one list of images per prompt \(2 prompts\), got 1 entries"),
        (dict(images=pixels), [[IMG]], r"one list of images per prompt \(1 prompts\), got ndarray"),
        (dict(images=[pixels]), [[IMG]], r"images\[0\] must be a list of images \(prompt 0's\)"),
        (dict(images=[[], [pixels]]), [[IMG], [IMG]], r"prompt 0 has 1 <\|image\|> token\(s\) but 0 image\(s\)"),
        (dict(images=[[None]]), [[IMG]], r"images\[0\]\[0\] has type NoneType"),
        (dict(images=[[str(tmp_path / "missing.png")]]), [[IMG]], r"images\[0\]\[0\]: no such file"),
        (dict(images=[[np.zeros(28, np.uint8)]]), [[IMG]], r"images\[0\]\[0\] is a numpy array of shape \(28,\)"),
    ]
    for kwargs, prompts, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            vision.generate(prompts, max_new_tokens=NEW, **kwargs)
    with pytest.raises(InvalidInputError, match=r"tiny-text is a text model; images are not accepted"):
        model.generate([[5, 6]], max_new_tokens=NEW, images=[[pixels]])
    with pytest.raises(InvalidInputError, match=r"tiny-text is a text model; images are not accepted"):
        model.logits([[5, 6]], images=[[pixels]])


# ------------------------------------------------------------------------------------------------ load, tokenizer


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((None,), {}, r"path must be a str or os.PathLike naming a checkpoint directory or .gguf file, got None"),
        ((5,), {}, r"path must be a str or os.PathLike .* got int 5"),
        (("",), {}, r"path is an empty string"),
        (("  ",), {}, r"path is an empty string"),
        (("x",), dict(dtype="int8"), r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
        (("x",), dict(dtype=["bfloat16"]), r"dtype must be one of"),
        (("x",), dict(dtype=None), r"dtype must be one of"),
        (("x",), dict(attention_impl="fast"), r"attention_impl must be one of \('auto', 'xla', 'pallas'\)"),
        (("x",), dict(attention_impl=None), r"attention_impl must be one of"),
        (("x",), dict(scan_layers="yes"), r"scan_layers must be True or False, got str 'yes'"),
        (("x",), dict(bogus=1), r"unknown keyword argument\(s\) \['bogus'\]; valid ones are \['path', 'mesh'"),
    ],
)
def test_bad_load_arguments(args, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        lj.load(*args, **kwargs)


def test_load_expands_user_and_takes_dtype_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    # A dtype object is as good as its name; "~" is the home directory (the path does not exist: CheckpointError).
    with pytest.raises(CheckpointError, match=str(tmp_path / "no_such_checkpoint")):
        lj.load("~/no_such_checkpoint", dtype=jnp.float32)
    with pytest.raises(CheckpointError, match="no_such_checkpoint"):
        lj.load(Path("~") / "no_such_checkpoint", dtype=np.dtype("float16"))
    assert os.path.expanduser("~") == str(tmp_path)


def test_tokenizer_inputs(tok):
    with pytest.raises(InvalidInputError, match=r"text must be a str, got int"):
        tok.encode(5)
    with pytest.raises(InvalidInputError, match=r"token ids must be a sequence of integers, got str 'abc'"):
        tok.decode("abc")
    with pytest.raises(InvalidInputError, match=r"token ids must be integers, not bools"):
        tok.decode([True, 5])
    with pytest.raises(InvalidInputError, match=r"token ids must be a sequence of integers"):
        tok.decode([1.0])
    with pytest.raises(InvalidInputError, match=rf"token ids must lie in \[0, {V}\)"):
        tok.decode([5, V])
    with pytest.raises(InvalidInputError, match=r"token must be a str"):
        tok.token_to_id(5)
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])
