"""Prompts (sdjax.prompts, issue 14 parts 2-5): A1111's attention grammar, 75-token chunks, weighting, clip skip
and textual inversion, against A1111's documented behaviour and diffusers on the tiny model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch

from sdjax import cli, embeddings, io, pipeline, pngmeta, sampling
from sdjax import prompts as P
from sdjax.prompts import BREAK, PromptSyntaxError, PromptSyntaxWarning
from sdjax.tokenizer import ClipTokenizer
from tests import reference as ref
from tests.reference import count_compiles, torch_scheduler

TOL = 2e-3  # decoded pixels in [0, 1], as tests/test_pipeline.py
ENC_TOL = 1e-5  # text-encoder states
SQ = 1 / 1.1
LONG = " ".join(["a photo of a big red cat sitting on a wooden chair in the sunny garden"] * 7)  # ~105 tokens


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.sd15()


# ------------------------------------------------------------------------------------------------- grammar

# (prompt, A1111's parse_prompt_attention result); the first six are the examples of its docstring.
GRAMMAR = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[word]", [("word", SQ)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[[word]]", [("word", SQ * SQ)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word:0.5) rest", [("word", 0.5), (" rest", 1.0)]),
    ("(word: 1.3 )", [("word", 1.3)]),  # spaces around the number
    ("(word:-1)", [("word", -1.0)]),
    ("(word:+1.5)", [("word", 1.5)]),
    ("(word:.5)", [("word", 0.5)]),
    ("(word:0)", [("word", 0.0)]),
    ("(word:abc)", [("word:abc", 1.1)]),  # not a number: the colon is text, the brackets x1.1
    ("(a:1.2e3)", [("a:1.2e3", 1.1)]),  # no exponents in A1111's number pattern
    ("((a:1.5))", [("a", 1.5 * 1.1)]),  # nesting multiplies, innermost first
    ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
    ("[a (b) c]", [("a ", SQ), ("b", 1.1 * SQ), (" c", SQ)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # equal weights merge
    ("a (b:1.2) (c:1.2)", [("a ", 1.0), ("b", 1.2), (" ", 1.0), ("c", 1.2)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a BREAKfast", [("a BREAKfast", 1.0)]),  # a whole upper-case word only
    ("a break b", [("a break b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # deviation: A1111 would weight the word BREAK -1.1
    ("\\\\", [("\\", 1.0)]),  # an escaped backslash
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[a", [("a", SQ)]),  # unbalanced: closed at the end
    ("((a) b", [("a", 1.1 * 1.1), (" b", 1.1)]),
    ("(a:1.5", [("a:1.5", 1.1)]),  # no ")" after the number: not a weight
    ("a)", [("a)", 1.0)]),  # stray closers are text
    ("a]", [("a]", 1.0)]),
    ("(a]", [("a]", 1.1)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight without its "(" is text
    ("[a:b:0.5]", [("a:b:0.5", SQ)]),  # prompt editing is not part of this grammar: text
]
WARNS = {"(unbalanced", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "[a", "((a) b", "(a:1.5", "a)", "a]",
         "(a]", "a:1.5) b"}


@pytest.mark.parametrize("text, want", GRAMMAR, ids=[f"{i:02d}:{t!r}" for i, (t, _) in enumerate(GRAMMAR)])
def test_grammar_as_a1111(text, want):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = P.parse(text)
    assert got == want
    assert bool(caught) == (text in WARNS), [str(w.message) for w in caught]
    assert all(w.category is PromptSyntaxWarning and "position" in str(w.message) for w in caught)


@pytest.mark.parametrize("text, pos", [("(a:1.2.3)", 3), ("x (a:.)", 5), ("((b:1..5))", 4)])
def test_bad_weight_is_an_error_naming_the_position(text, pos):
    with pytest.raises(PromptSyntaxError, match=rf"prompt: the weight '[^']+' at position {pos} is not a number"):
        P.parse(text)


def test_unbalanced_warning_names_the_position():
    with pytest.warns(PromptSyntaxWarning, match=r"prompts\[0\]: unbalanced '\(' at position 2 .*closed at the end"):
        P.parse("a (b c", "prompts[0]")
    with pytest.warns(PromptSyntaxWarning, match=r"unbalanced '\]' at position 1 .*kept as text"):
        P.parse("a] b")


# ------------------------------------------------------------------------------------------------ chunking

@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    return ref.tokenizer()


def _hf_ids(tok, text):
    """transformers' CLIPTokenizer ids of `text` (no bos/eos), the reference the chunks are held to."""
    return _hf_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _chunk(tok, ids):
    return [tok.bos_id, *ids, tok.eos_id] + [tok.pad_id] * (75 - len(ids))


@pytest.mark.parametrize("text", ["", "a cat", "(a cat) [on] a mat, BREAK", " ".join(["word"] * 75)])
def test_plain_short_prompts_are_the_reference_ids(tok, text):
    chunks = P.tokenize(tok, text, "plain")
    np.testing.assert_array_equal(chunks.ids, tok([text]))
    assert (chunks.weights == 1).all()


def test_long_prompts_split_in_75_token_chunks(tok):
    ids = _hf_ids(tok, " ".join(["word"] * 76))
    got = P.tokenize(tok, " ".join(["word"] * 76), "plain")
    np.testing.assert_array_equal(got.ids, [_chunk(tok, ids[:75]), _chunk(tok, ids[75:])])
    assert P.tokenize(tok, " ".join(["word"] * 150), "a1111").ids.shape == (2, 77)
    assert P.tokenize(tok, " ".join(["word"] * 151), "a1111").ids.shape == (3, 77)


def test_comma_near_the_end_moves_the_rest_to_the_next_chunk(tok):
    # A1111's "Prompt word wrap length limit" (20): the words after a comma at most 20 tokens back move on
    text = " ".join(["a"] * 70) + ", " + " ".join(["b"] * 10)
    got = P.tokenize(tok, text, "plain")
    a, comma, b = _hf_ids(tok, "a")[0], _hf_ids(tok, ",")[0], _hf_ids(tok, "b")[0]
    np.testing.assert_array_equal(got.ids, [_chunk(tok, [a] * 70 + [comma]), _chunk(tok, [b] * 10)])
    far = " ".join(["a"] * 50) + ", " + " ".join(["b"] * 30)  # comma 25 tokens back: a plain split
    assert P.tokenize(tok, far, "plain").ids[0, 1:76].tolist() == [a] * 50 + [comma] + [b] * 24
    assert P.tokenize(tok, text, "plain", backtrack=0).ids[0, 1:76].tolist() == [a] * 70 + [comma] + [b] * 4


def test_break_and_weights_per_token(tok):
    got = P.tokenize(tok, "(red:1.5) cat BREAK [dog]", "a1111")
    red, cat, dog = (_hf_ids(tok, w)[0] for w in ("red", "cat", "dog"))
    np.testing.assert_array_equal(got.ids, [_chunk(tok, [red, cat]), _chunk(tok, [dog])])
    np.testing.assert_allclose(got.weights[0, :4], [1, 1.5, 1, 1])
    np.testing.assert_allclose(got.weights[1, :3], [1, SQ, 1])
    assert (got.weights[:, 4:] == 1).all()
    assert P.tokenize(tok, "(red:1.5) cat BREAK [dog]", "plain").ids.shape == (1, 77)  # plain: all text


def test_triggers_expand_and_never_split(tok):
    trig = P.Trigger("tinystyle", tuple(_hf_ids(tok, "tinystyle")), 49408, 3)
    assert len(trig.ids) == 2
    got = P.tokenize(tok, "a tinystyle cat", "a1111", [trig])
    a, cat = _hf_ids(tok, "a")[0], _hf_ids(tok, "cat")[0]
    assert got.ids[0, :7].tolist() == [tok.bos_id, a, 49408, 49409, 49410, cat, tok.eos_id]
    near_end = P.tokenize(tok, " ".join(["a"] * 73) + " (tinystyle:1.2)", "a1111", [trig])
    assert near_end.ids.shape == (2, 77) and near_end.ids[1, 1:4].tolist() == [49408, 49409, 49410]
    np.testing.assert_allclose(near_end.weights[1, 1:4], 1.2)


def test_batch_pads_to_the_same_chunk_count(tok):
    batch = P.encode_batch(tok, [LONG, "a cat"], ["", "blurry"], "a1111")
    k = P.tokenize(tok, LONG, "a1111").ids.shape[0]
    assert k == 2 and all(batch[key].shape == (2, k, 77) for key in ("ids", "neg_ids", "weights", "neg_weights"))
    empty = P.empty_chunk(tok).ids[0]
    for row in (batch["ids"][1, 1], batch["neg_ids"][0, 1], batch["neg_ids"][1, 1]):
        np.testing.assert_array_equal(row, empty)
    assert set(P.encode_batch(tok, ["a"], [""], "plain")) == {"ids", "neg_ids"}  # plain: no weights


# ------------------------------------------------------------------------------------- encoding vs torch

def _torch_states(text_encoder, ids, clip_skip=1):
    """A1111's clip skip: hidden_states[-clip_skip] then the final layer norm; ids [N, 77] -> [N, 77, D]."""
    with torch.no_grad():
        out = text_encoder(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
        z = out.hidden_states[-clip_skip]
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(z).numpy()


@contextlib.contextmanager
def _text_model_alias(text_encoder):
    """diffusers' clip_skip reaches `text_encoder.text_model.final_layer_norm`; transformers 5 flattened
    CLIPTextModel (no `text_model`): alias it for the call (in the instance dict: not a registered submodule)."""
    added = not hasattr(text_encoder, "text_model")
    if added:
        text_encoder.__dict__["text_model"] = text_encoder
    try:
        yield
    finally:
        if added:
            del text_encoder.__dict__["text_model"]


def _a1111_emphasis(z, w):
    """A1111's "Original" emphasis of one chunk, in numpy: z*w, then the chunk's mean restored."""
    z = np.asarray(z, np.float64)
    zw = z * np.asarray(w, np.float64)[:, None]
    return zw * (z.mean() / zw.mean())


def _encode(pipe, ids, weights=None, clip_skip=1, params=None):
    return np.asarray(sampling.encode_text(pipe.models, params or pipe.params, ids, weights, clip_skip))


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_matches_diffusers(pipe, tiny_torch_pipe, clip_skip):
    prompts = ["a red cube on a table", "an old lighthouse at dusk"]
    # diffusers' clip_skip=k is A1111's (and sdjax's) k + 1: diffusers takes hidden_states[-(k + 1)]
    with _text_model_alias(tiny_torch_pipe.text_encoder):
        want = tiny_torch_pipe.encode_prompt(prompts, "cpu", 1, False,
                                             clip_skip=None if clip_skip == 1 else clip_skip - 1)[0].numpy()
    got = _encode(pipe, pipe.tokenizer(prompts), clip_skip=clip_skip)
    assert ref.max_err(got, want) <= ENC_TOL
    if clip_skip > 1:
        assert ref.max_err(got, _encode(pipe, pipe.tokenizer(prompts))) > 100 * ENC_TOL
        np.testing.assert_allclose(got, _torch_states(tiny_torch_pipe.text_encoder, pipe.tokenizer(prompts), clip_skip),
                                   atol=ENC_TOL)


def test_weights_follow_a1111_and_ones_are_the_plain_path(pipe, tiny_torch_pipe):
    batch = P.encode_batch(pipe.tokenizer, ["a (red:1.4) cube on a [[table]] BREAK (sunny:0.6) sky", LONG],
                           ["", ""], "a1111")
    ids, w = batch["ids"], batch["weights"]  # [2, K, 77]
    got = _encode(pipe, ids, w, clip_skip=2)
    z = _torch_states(tiny_torch_pipe.text_encoder, ids.reshape(-1, 77), 2)
    want = np.stack([_a1111_emphasis(zc, wc) for zc, wc in zip(z, w.reshape(-1, 77), strict=True)])
    assert ref.max_err(got, want.reshape(got.shape)) <= ENC_TOL
    plain = _encode(pipe, ids, None, clip_skip=2)
    assert ref.max_err(got, plain) > 100 * ENC_TOL  # the weights matter...
    np.testing.assert_array_equal(_encode(pipe, ids, np.ones_like(w), clip_skip=2), plain)  # ...ones exactly none


# ----------------------------------------------------------------------------------------- images

def _torch_image(torch_pipe, embeds, neg_embeds, latents, steps=4):
    return torch_pipe(prompt_embeds=torch.from_numpy(np.asarray(embeds, np.float32)),
                      negative_prompt_embeds=torch.from_numpy(np.asarray(neg_embeds, np.float32)),
                      num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                      latents=ref.nchw(latents), output_type="np").images


def test_long_prompt_image_matches_diffusers_with_chunked_embeds(pipe, tiny_torch_pipe, tok):
    """One compile covers the long-prompt path, clip skip and traced weights (the a1111 syntax; LONG has no
    brackets, so its ids are the plain ones and its weights all 1). Emphasis numerics: the test above."""
    tiny_torch_pipe.scheduler = torch_scheduler("ddim")
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(steps=4, height=64, width=64, scheduler="ddim", latents=latents, progress=False,
              prompt_syntax="a1111", clip_skip=2)
    got = pipe.txt2img(LONG, "blurry", **kw)
    # the torch side, built independently: 75-token pieces, each [BOS] .. [EOS] [PAD ..] encoded (clip skip 2:
    # diffusers' clip_skip=1, checked above) and concatenated; the one-chunk negative padded with the empty chunk
    ids = _hf_ids(tok, LONG)
    assert 75 < len(ids) <= 150 and "," not in LONG
    chunks = [_chunk(tok, ids[:75]), _chunk(tok, ids[75:])]
    neg = [_chunk(tok, _hf_ids(tok, "blurry")), _chunk(tok, [])]
    te = tiny_torch_pipe.text_encoder
    embeds, neg_embeds = (_torch_states(te, c, 2).reshape(1, 154, -1) for c in (chunks, neg))
    want = _torch_image(tiny_torch_pipe, embeds, neg_embeds, latents)
    err = ref.max_err(got.pixels, want)
    print(f"[long prompt, clip skip 2] max abs err {err:.3g}")
    assert err <= TOL
    assert got.settings["clip_skip"] == 2 and got.settings["prompt_syntax"] == "a1111"
    with count_compiles() as compiles:  # same chunk count, weights traced: nothing compiles
        tail = pipe.txt2img(LONG.replace("garden", "desert"), "blurry", **kw)  # a word of the second chunk
        weighted = pipe.txt2img(LONG.replace("garden", "(garden:1.6)"), "blurry", **kw)
    assert compiles == []
    assert np.abs(tail.pixels - got.pixels).mean() > 5 * TOL
    assert np.abs(weighted.pixels - got.pixels).mean() > TOL
    # without clip skip, and as diffusers alone gives it (truncated at 77 tokens), the images differ
    assert np.abs(_torch_image(tiny_torch_pipe, _torch_states(te, chunks).reshape(1, 154, -1),
                               _torch_states(te, neg).reshape(1, 154, -1), latents) - want).mean() > 5 * TOL
    truncated = tiny_torch_pipe(LONG, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=64,
                                width=64, latents=ref.nchw(latents), output_type="np").images
    assert np.abs(truncated - want).mean() > 5 * TOL


# ------------------------------------------------------------------------------------ textual inversion

def _write(path, tensors):
    io.write_safetensors({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)
    return path


def test_textual_inversion_matches_diffusers(pipe, tiny_torch_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    d = pipe.models.text_encoder.config.hidden_size
    rng = np.random.default_rng(5)
    multi, single, flat = (rng.standard_normal(s).astype(np.float32) for s in ((3, d), (d,), (2, d)))
    files = [_write(tmp_path / "tinystyle.safetensors", {"emb_params": multi}),  # A1111: the stem is the token
             _write(tmp_path / "learned_embeds.safetensors", {"sdjaxcat": single}),  # diffusers: the key is
             _write(tmp_path / "other.safetensors", {"string_to_param.*": flat})]
    ours = copy.copy(pipe)  # load_embedding rebinds params and triggers on the copy only
    tokens = [ours.load_embedding(files[0]), ours.load_embedding(files[1]), ours.load_embedding(files[2], "oldpaper")]
    assert tokens == ["tinystyle", "sdjaxcat", "oldpaper"]
    assert ours.params[sampling.TEXTUAL_INVERSION].shape == (6, d) and sampling.TEXTUAL_INVERSION not in pipe.params

    c = tiny_torch_pipe.components
    theirs = StableDiffusionPipeline(vae=c["vae"], unet=c["unet"], scheduler=c["scheduler"],
                                     text_encoder=copy.deepcopy(c["text_encoder"]),
                                     tokenizer=copy.deepcopy(c["tokenizer"]), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    for path, token in zip(files, tokens, strict=True):
        theirs.load_textual_inversion(str(path), token=token)
    prompts = ["a tinystyle photo of a sdjaxcat in the snow", "sdjaxcat on oldpaper, tinystyle", "a plain cat"]
    want = theirs.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    ids = P.encode_batch(ours.tokenizer, prompts, [""] * 3, "plain", ours.triggers)["ids"]
    assert (ids >= 49408).sum() == 3 + 1 + 1 + 2 + 3
    got = _encode(ours, ids, params=ours.params)
    assert ref.max_err(got, want) <= ENC_TOL
    # sensitivity: other vectors change the prompts that use them, and only those
    before = got
    ours.load_embedding(_write(tmp_path / "v2.safetensors", {"sdjaxcat": single + 1.0}))
    after = _encode(ours, ids, params=ours.params)
    assert ref.max_err(after[:2], before[:2]) > 100 * ENC_TOL
    np.testing.assert_array_equal(after[2], before[2])
    np.testing.assert_allclose(before[2], _encode(pipe, pipe.tokenizer(prompts[2:]))[0], atol=ENC_TOL)


@pytest.mark.parametrize("tensors, name, pattern", [
    ({"clip_l": np.zeros((1, 32)), "clip_g": np.zeros((1, 64))}, "x.safetensors", "SDXL embedding"),
    ({"a": np.zeros((2, 16))}, "x.safetensors", r"shape \[2, 16\]; this text encoder needs \[N, 32\]"),
    ({"a": np.zeros((76, 32))}, "x.safetensors", "76 vectors"),
    ({"a": np.full((1, 32), np.nan)}, "x.safetensors", "NaN"),
    ({"a": np.zeros((1, 32))}, "x.pt", "only .safetensors"),
])
def test_bad_embedding_files_are_named(tmp_path, tensors, name, pattern):
    path = tmp_path / name
    io.write_safetensors({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)
    with pytest.raises(embeddings.EmbeddingError, match=pattern):
        embeddings.read_embedding(path, 32)


# ------------------------------------------------------------------------------ API, PNG parameters, CLI

@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(prompt_syntax="a1111", prompts="a (b:1.2.3) c"), ValueError,
     r"prompts\[0\]: the weight '1.2.3' at position 5 is not a number"),
    (dict(prompt_syntax="a1111", negative_prompts="(x:..)"), ValueError, r"negative_prompts\[0\]: the weight"),
    (dict(prompt_syntax="markdown"), ValueError, r"prompt_syntax must be one of 'plain', 'a1111'"),
    (dict(clip_skip=0), ValueError, r"clip_skip must be an integer in \[1, 3\]"),
    (dict(clip_skip=4), ValueError, r"clip_skip must be an integer in \[1, 3\]"),
    (dict(clip_skip=1.5), TypeError, r"clip_skip must be an integer"),
])
def test_bad_prompt_arguments_are_named_before_any_work(pipe, kwargs, exc, pattern):
    with count_compiles() as compiles, pytest.raises(exc, match=pattern):
        pipe.txt2img(**{"prompts": "a cat", "steps": 2, "height": 64, "width": 64, **kwargs})
    assert compiles == []


@dataclasses.dataclass
class _Gen:
    prompts: list
    negative_prompts: list
    seeds: list
    settings: dict


def test_infotext_records_clip_skip_and_emphasis():
    base = dict(steps=20, scheduler="euler_a", guidance_scale=7.0, width=512, height=512, model="m")
    text = pngmeta.infotext(_Gen(["a (cat)"], [""], [1], {**base, "clip_skip": 2, "prompt_syntax": "a1111"}), 0)
    assert text.endswith("Model: m, Clip skip: 2") and pngmeta.parse_parameters(text)["Clip skip"] == "2"
    plain = pngmeta.infotext(_Gen(["a (cat)"], [""], [1], {**base, "clip_skip": 1, "prompt_syntax": "plain"}), 0)
    assert plain.endswith("Model: m, Emphasis: None")  # A1111 would weight "(cat)": it must read it as text
    simple = pngmeta.infotext(_Gen(["a cat"], [""], [1], {**base, "clip_skip": 1, "prompt_syntax": "plain"}), 0)
    assert simple.endswith("Model: m")


@pytest.mark.parametrize("args, pattern", [
    (["--clip-skip", "0"], r"--clip-skip: must be an integer >= 1"),
    (["--prompt-syntax", "x"], r"--prompt-syntax: invalid choice"),
    (["--embedding", "missing.safetensors"], r"--embedding 'missing.safetensors': embedding file .* does not exist"),
    (["--embedding", "{bad}:tok"], r"--embedding '.*:tok': .*SDXL embedding"),
])
def test_cli_prompt_flags_are_checked_before_the_model_loads(tmp_path, capsys, args, pattern):
    bad = _write(tmp_path / "sdxl.safetensors", {"clip_l": np.zeros((1, 32)), "clip_g": np.zeros((1, 64))})
    args = [a.replace("{bad}", str(bad)) for a in args]
    out = tmp_path / "out"
    assert cli.main(["generate", "a cat", "--model", str(tmp_path / "no-model"), "--out", str(out), *args]) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert not out.exists()


def test_cli_bad_prompt_syntax_exits_2(tmp_path, capsys):
    assert cli.main(["generate", "a (cat:1.2.3)", "--out", str(tmp_path / "o")]) == 2
    assert "PROMPT[0]: the weight '1.2.3' at position 7 is not a number" in capsys.readouterr().err
    assert pipeline.validate_request("a (cat:1.2.3)", None, 0, 2, 7.5, 64, 64, None).prompt_syntax == "plain"
