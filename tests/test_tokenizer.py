"""Tests of sdjax.tokenizer.ClipTokenizer: known ids, padding, truncation, folder round trips, and parity with
transformers' CLIPTokenizer (the reference: same ids, same decoded text) on a prompt corpus and every folder layout."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken

from sdjax import tokenizer as tok

ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
LONG_PROMPT = ", ".join(["a highly detailed matte painting of a castle on a hill at sunset"] * 16)  # ~220 tokens
PROMPTS = [
    ASTRONAUT,
    "",
    "   ",
    "A PHOTO OF AN ASTRONAUT",
    "Hello, world! What's up?? (masterpiece:1.2), [best quality]",
    "café crème brûlée, naïve façade, Ångström",
    "一只猫坐在窗台上",
    "東京の夜景、ネオン",
    "🚀🐱‍👤 emoji party 🎉🎉",
    "numbers 1234567890 and 3.14159, 2024-01-01",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "it's they're we've I'm you'll he'd",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "über-straße / σ ∑ π ≈ 3",
    "snake_case, camelCase, kebab-case, #hashtag @user",
    "Ελληνικά και русский текст",
    "a" * 300,
    LONG_PROMPT,
    "portrait of a woman, 85mm, f/1.8, bokeh, 8k, trending on artstation",
    "html &amp; entities &lt;tag&gt; and ~`|\\^ symbols",
]
# PROMPTS and the odd cases of each pipeline step: whitespace kinds (normalizer), contractions and digits (CLIP's
# split), composed vs decomposed accents (NFC), special and added tokens written in the text (added vocabulary)
CORPUS = PROMPTS + [
    "MiXeD CaSe WoRdS, CamelCase and ALLCAPS",
    "non\u00a0breaking\u00a0space, ideographic\u3000space, thin\u2009space, line\u2028separator, \x0bvt \x0cff",
    "...!!! ??? ---> ((( ))) [[[ ]]] ;;; :: ,,,, '''' \"\"\" ***",
    "8k 4K 1080p v1.5 x2 3d 2.5d 1,000,000 ½ ² ٣ 四",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D ISN'T",
    "it’s curly ‘quotes’ and “double” ones, rock'n'roll, 'quoted'",
    "cafe\u0301 cre\u0300me bru\u0302le\u0301e, A\u030angstro\u0308m",  # decomposed: NFC composes them
    "ﬁne ligature, Ⅻ roman, ｆｕｌｌｗｉｄｔｈ, ℌ𝔢𝔩𝔩𝔬",  # NFC keeps compatibility characters
    "한국어 텍스트, עברית, العربية, हिन्दी, ไทย",
    "👍🏽 🇯🇵 👨‍👩‍👧 ❤️ ©®™",
    "a<|endoftext|>b <|startoftext|><|endoftext|>",
    "<|ENDOFTEXT|> and <|StartOfText|> in capitals",
    "end</w>of a word</w>",
    "<cat-toy> on a table",
    "an <extra> token",
    "a <CAT-TOY>, a<cat-toy>b and <cat-toy><cat-toy> ! !!",
    "(masterpiece:1.2), [best quality], ((detailed:0.8)), {curly}, a \\(literal\\) paren, AND, BREAK, "
    "<lora:name:0.8>, embedding:x, [a|b], [from:to:0.5]",
    "\x00\x01 control chars \ufeff bom \u200b zwsp \u200d zwj",
]
ADDED = "<cat-toy>"
# tokens whose ids `token_id` gives, as transformers' convert_tokens_to_ids
TOKENS = [",</w>", "a</w>", "!", tok.CLIP_BOS, tok.CLIP_EOS, ADDED]


def _transformers_sd15():
    """transformers' CLIPTokenizer from the same vocabulary and merges (what sd15() wrapped before)."""
    from transformers import CLIPTokenizer

    vocab, merges = tok.clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=tok.CLIP_EOS, model_max_length=77)


@pytest.fixture(scope="module")
def sd15():
    """The tokenizer built from the vocabulary shipped with sdjax."""
    return tok.ClipTokenizer.sd15()


@pytest.fixture(scope="module")
def hf_sd15():
    return _transformers_sd15()


def _encode_quietly(tokenizer, prompts):
    """Token ids, with truncation warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


def _hf_reference(hf, prompts, max_length=77):
    """What transformers' own padding/truncation gives (as diffusers calls it)."""
    return hf(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")["input_ids"]


def _backend_json(backend):
    """A tokenizers.Tokenizer as it serialises (vocabulary, merges, added tokens with their flags, normalizer,
    pre-tokenizer, post-processor, decoder), without the truncation/padding transformers sets per call."""
    data = json.loads(backend.to_str())
    data.pop("truncation")
    data.pop("padding")
    return data


def _assert_same_ids(ours, hf):
    """Same ids (raw, and padded/truncated), decoded text and special ids as transformers' tokenizer `hf`."""
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_id == hf.pad_token_id
    assert ours.max_length == (hf.model_max_length if hf.model_max_length < 1_000_000 else 77)
    assert ours.encode(CORPUS) == hf(CORPUS, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(_encode_quietly(ours, CORPUS), _hf_reference(hf, CORPUS, ours.max_length))
    full = hf(CORPUS)["input_ids"]
    assert [ours.decode(ids) for ids in full] == [hf.decode(ids, skip_special_tokens=True) for ids in full]
    hf_vocab = hf.get_vocab()
    assert [ours.token_id(t) for t in TOKENS] == [hf.convert_tokens_to_ids(t) if t in hf_vocab else None
                                                  for t in TOKENS]


def _assert_same(ours, hf):
    """ours (a ClipTokenizer) is transformers' `hf`: same assembled backend, vocabulary size, ids and text."""
    assert _backend_json(ours.backend) == _backend_json(hf.backend_tokenizer)
    assert ours.backend.get_vocab_size(with_added_tokens=True) == len(hf)
    _assert_same_ids(ours, hf)


# ------------------------------------------------------------------------------------------- SD1.5 (shipped)

def test_vocab_sizes():
    """The derived vocabulary has CLIP's 49,408 tokens and 48,894 merges, specials at the end."""
    vocab, merges = tok.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_known_ids(sd15):
    """The SD1.5 ids of the astronaut prompt, padded with eos to 77."""
    ids_bl = sd15([ASTRONAUT])
    assert ids_bl.shape == (1, 77) and ids_bl.dtype == np.int32
    assert ids_bl[0, :12].tolist() == ASTRONAUT_IDS
    assert (ids_bl[0, 12:] == 49407).all()


def test_special_ids(sd15):
    """SD1.5 conventions: bos 49406, eos = pad 49407, length 77."""
    assert (sd15.bos_id, sd15.eos_id, sd15.pad_id, sd15.max_length) == (49406, 49407, 49407, 77)


def test_batch_shapes(sd15):
    """A batch of prompts gives one row each; an empty prompt is bos, eos, pad..."""
    ids_bl = sd15(["", ASTRONAUT, "x"])
    assert ids_bl.shape == (3, 77)
    assert ids_bl[0, :3].tolist() == [49406, 49407, 49407]
    assert sd15([]).shape == (0, 77)
    assert sd15.encode([]) == [] and sd15.encode([""]) == [[]]


def test_sd15_is_transformers(sd15, hf_sd15):
    """sd15() is transformers' CLIPTokenizer(vocab, merges, pad_token=eos, model_max_length=77): the same assembled
    tokenizers backend, and the same ids, padded ids, decoded text and token ids on the whole corpus."""
    _assert_same(sd15, hf_sd15)


def test_matches_transformers_truncation(sd15, hf_sd15):
    """Padding and truncation agree with transformers' padding='max_length', truncation=True."""
    np.testing.assert_array_equal(_encode_quietly(sd15, PROMPTS), _hf_reference(hf_sd15, PROMPTS))


def test_encode_and_token_id_replace_the_transformers_calls(sd15, hf_sd15):
    """`encode` is ``hf(texts, add_special_tokens=False)["input_ids"]`` (prompts.py), ``hf(text, ...)`` for one
    text (pipeline.py), `token_id` is ``convert_tokens_to_ids`` (prompts.py's comma); a token outside the
    vocabulary is None here where transformers gives the unk id (which is eos, so it could match a real token)."""
    texts = ["a, b", "(red:1.2) cat", "", ASTRONAUT]
    assert sd15.encode(texts) == hf_sd15(texts, add_special_tokens=False, verbose=False)["input_ids"]
    assert sd15.encode(["tinystyle"])[0] == hf_sd15("tinystyle", add_special_tokens=False)["input_ids"]
    assert sd15.token_id(",</w>") == hf_sd15.convert_tokens_to_ids(",</w>") == 267
    assert sd15.token_id("no-such-token") is None
    assert hf_sd15.convert_tokens_to_ids("no-such-token") == hf_sd15.unk_token_id == 49407
    ids = sd15([ASTRONAUT])[0]  # bos, tokens, eos, pads
    assert sd15.tokens(ids) == hf_sd15.convert_ids_to_tokens([int(i) for i in ids])
    assert sd15.tokens(ids)[:3] == [tok.CLIP_BOS, "a</w>", "photo</w>"]


def test_the_corpus_tells_prompts_apart(sd15):
    """The comparisons can fail: different prompts give different ids, and nearly every corpus entry its own."""
    a_cat, a_dog = sd15.encode(["a cat", "a dog"])
    assert a_cat != a_dog and len(a_cat) == len(a_dog) == 2
    assert len({tuple(ids) for ids in sd15.encode(CORPUS)}) >= len(CORPUS) - 2  # "" and "   " are both empty
    # NFC: decomposed and composed accents are the same tokens; the digits are split one by one
    assert sd15.encode(["cafe\u0301"]) == sd15.encode(["café"]) != sd15.encode(["cafe"])
    assert len(sd15.encode(["1234567890"])[0]) == 10


def test_decode(sd15, hf_sd15):
    """decode leaves special tokens out and turns word ends into spaces, as transformers' decode."""
    ids = sd15(["a photo, of it's <|endoftext|> ok"])[0]
    assert sd15.decode(ids) == hf_sd15.decode(ids.tolist(), skip_special_tokens=True) == "a photo , of it 's ok"


def test_saved_tokenizer_json_folder(sd15, tmp_path):
    """A tokenizer saved by `save` (tokenizer.json) loads and matches sd15() on varied prompts."""
    sd15.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = tok.ClipTokenizer.from_folder(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.max_length) == (49406, 49407, 49407, 77)
    np.testing.assert_array_equal(_encode_quietly(loaded, CORPUS), _encode_quietly(sd15, CORPUS))
    assert _backend_json(loaded.backend) == _backend_json(sd15.backend)


def test_vocab_merges_folder(sd15, tmp_path):
    """An older-style folder with hand-written vocab.json + merges.txt matches sd15()."""
    _write_vocab_merges(tmp_path)
    loaded = tok.ClipTokenizer.from_folder(tmp_path)
    assert loaded.backend.get_vocab_size(with_added_tokens=True) == 49408 and loaded.max_length == 77
    np.testing.assert_array_equal(_encode_quietly(loaded, CORPUS), _encode_quietly(sd15, CORPUS))


def test_truncation_warning_counts_dropped(sd15):
    """A 100-token prompt keeps bos + 75 tokens + eos and warns that 25 tokens were dropped."""
    prompt = " ".join(["a"] * 100)
    with pytest.warns(UserWarning, match=r"25 tokens were dropped") as record:
        ids_bl = sd15([prompt])
    assert ids_bl[0, 0] == 49406 and ids_bl[0, 76] == 49407
    assert (ids_bl[0, 1:76] == 320).all()
    assert "a a a" in str(record[0].message)


def test_truncation_warning_dropped_text(sd15, hf_sd15):
    """The warning's count and text are what falls past the 77th token (a ~220-token prompt)."""
    untruncated = hf_sd15(LONG_PROMPT)["input_ids"]
    assert len(untruncated) > 200
    with pytest.warns(UserWarning) as record:
        sd15([LONG_PROMPT])
    message = str(record[0].message)
    count = int(re.search(r"(\d+) tokens were dropped", message).group(1))
    assert count == len(untruncated) - 77 > 0
    assert hf_sd15.decode(untruncated[76:-1], skip_special_tokens=True) in message


def test_no_warning_at_exactly_77(sd15):
    """75 tokens + bos + eos fit without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids_bl = sd15([" ".join(["a"] * 75)])
    assert ids_bl[0, 76] == 49407 and ids_bl[0, 75] == 320


def test_load_tokenizer_prefers_folder(sd15, tmp_path):
    """load_tokenizer uses model/tokenizer when present (here with pad '!', as SD2), else sd15() with a warning
    naming the folder."""
    with pytest.warns(UserWarning, match=r"no tokenizer/ folder; using the SD1\.5 CLIP tokenizer") as record:
        assert tok.load_tokenizer(tmp_path).pad_id == 49407
    assert str(tmp_path) in str(record[0].message)
    sd15.save(tmp_path / "tokenizer")
    config_path = tmp_path / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "!"
    config_path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder with a tokenizer/ loads without the fallback warning
        loaded = tok.load_tokenizer(tmp_path)
    assert loaded.pad_id == 0
    assert loaded(["a"])[0, :4].tolist() == [49406, 320, 49407, 0]


def test_from_folder_without_files(tmp_path):
    """A folder without tokenizer files is an error naming it."""
    with pytest.raises(FileNotFoundError, match=str(tmp_path.name)):
        tok.ClipTokenizer.from_folder(tmp_path)


def test_broken_tokenizer_files_name_the_file(sd15, tmp_path):
    """A corrupt tokenizer.json is a CheckpointError (a ValueError) naming the file, before it is built."""
    from sdjax.io import CheckpointError

    sd15.save(tmp_path / "tokenizer")
    path = tmp_path / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        tok.load_tokenizer(tmp_path)


def test_broken_merges_and_tiny_vocab_are_checkpoint_errors(tmp_path):
    """A merges.txt line with three symbols, or a tokenizer.json with a 3-token vocabulary, is a CheckpointError
    naming the folder (transformers refuses the first too)."""
    from sdjax.io import CheckpointError

    _write_vocab_merges(tmp_path / "bad")
    with open(tmp_path / "bad" / "merges.txt", "a", encoding="utf-8") as f:
        f.write("a b c\n")
    with pytest.raises(CheckpointError, match=r"could not be loaded"):
        tok.ClipTokenizer.from_folder(tmp_path / "bad")
    (tmp_path / "tiny").mkdir()
    tok.ClipTokenizer.sd15().save(tmp_path / "tiny")
    data = json.loads((tmp_path / "tiny" / "tokenizer.json").read_text())
    data["model"]["vocab"] = {"a": 0, "b": 1, "ab": 2}
    data["model"]["merges"] = [["a", "b"]]
    data["added_tokens"] = []
    (tmp_path / "tiny" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"only \d+ tokens"):
        tok.ClipTokenizer.from_folder(tmp_path / "tiny")


def test_no_transformers_import(sd15, tmp_path):
    """sdjax's tokenizer (shipped and from a folder) loads in a fresh process without importing transformers."""
    sd15.save(tmp_path / "tokenizer")
    code = ("import sys, sdjax\n"
            "a = sdjax.ClipTokenizer.sd15()([\"a photo\"])\n"
            "b = sdjax.load_tokenizer(sys.argv[1])([\"a photo\"])\n"
            "assert a[0, :4].tolist() == b[0, :4].tolist() == [49406, 320, 1125, 49407], (a, b)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- folder layouts

# SD1.5's tokenizer files on the hub (stable-diffusion-v1-5/stable-diffusion-v1-5, tokenizer/, written by
# transformers 4): vocab.json + merges.txt, the special tokens as AddedTokens with normalized=true.
def _hub_token(content, typed):
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


HUB_CONFIG = {
    "add_prefix_space": False, "bos_token": _hub_token("<|startoftext|>", True), "do_lower_case": True,
    "eos_token": _hub_token("<|endoftext|>", True), "errors": "replace", "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
    "unk_token": _hub_token("<|endoftext|>", True),
}
HUB_SPECIAL_TOKENS_MAP = {"bos_token": _hub_token("<|startoftext|>", False),
                          "eos_token": _hub_token("<|endoftext|>", False), "pad_token": "<|endoftext|>",
                          "unk_token": _hub_token("<|endoftext|>", False)}


def _write_json(path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _edit_json(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    _write_json(path, data)


def _write_vocab_merges(folder, drop_merges=0):
    """vocab.json + merges.txt of CLIP's vocabulary; drop_merges > 0 leaves out the last merges (and their tokens),
    a different vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tok.clip_vocab_and_merges()
    if drop_merges:
        merges = merges[:-drop_merges]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][: 512 + len(merges)]
        vocab = {t: i for i, t in enumerate(tokens + [tok.CLIP_BOS, tok.CLIP_EOS])}
    _write_json(folder / "vocab.json", vocab)
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _saved(folder, change=None):
    """transformers' save_pretrained of its SD1.5 CLIPTokenizer (tokenizer.json + tokenizer_config.json), after
    `change(hf)`."""
    hf = _transformers_sd15()
    if change is not None:
        change(hf)
    hf.save_pretrained(folder)


def _json_only(folder):
    _saved(folder)
    (folder / "tokenizer_config.json").unlink()


def _vocab_merges_only(folder):
    _write_vocab_merges(folder)


def _both(folder):
    """tokenizer.json wins over vocab.json + merges.txt: these hold a smaller, different vocabulary."""
    _saved(folder)
    _write_vocab_merges(folder, drop_merges=20000)


def _small_vocab_merges(folder):
    _write_vocab_merges(folder, drop_merges=20000)


def _hub_sd15(folder):
    _write_vocab_merges(folder)
    _write_json(folder / "tokenizer_config.json", HUB_CONFIG)
    _write_json(folder / "special_tokens_map.json", HUB_SPECIAL_TOKENS_MAP)


def _hub_sd2(folder):
    """SD2's layout: pad '!' (id 0) in both files."""
    _hub_sd15(folder)
    _edit_json(folder / "tokenizer_config.json", pad_token="!")
    _edit_json(folder / "special_tokens_map.json", pad_token="!")


def _v4_textual_inversion(folder):
    """What transformers 4 wrote after ``add_tokens("<cat-toy>")`` (diffusers' textual inversion training):
    added_tokens_decoder in the config (so the legacy files are not read), added_tokens.json."""
    _hub_sd15(folder)
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {k: v for k, v in HUB_CONFIG.items() if k != "special_tokens_map_file"}
    config["added_tokens_decoder"] = {
        "49406": {"content": tok.CLIP_BOS, **flags, "special": True},
        "49407": {"content": tok.CLIP_EOS, **flags, "special": True},
        "49408": {"content": ADDED, **flags, "special": False},
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "added_tokens.json", {ADDED: 49408})


def _legacy_json_special_map(folder):
    """tokenizer.json + special_tokens_map.json + added_tokens.json, no tokenizer_config.json."""
    _saved(folder, lambda hf: hf.add_tokens([ADDED]))
    (folder / "tokenizer_config.json").unlink()
    _write_json(folder / "special_tokens_map.json", {**HUB_SPECIAL_TOKENS_MAP, "pad_token": "!"})
    _write_json(folder / "added_tokens.json", {ADDED: 49408, "<extra>": 49409})


def _config_decoder_over_json(folder):
    """A config with added_tokens_decoder next to tokenizer.json: the config's list wins over tokenizer.json's."""
    _saved(folder, lambda hf: hf.add_tokens([ADDED]))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    _edit_json(folder / "tokenizer_config.json", added_tokens_decoder={
        "49406": {"content": tok.CLIP_BOS, **flags}, "49407": {"content": tok.CLIP_EOS, **flags}})


FOLDERS = {
    "tokenizer.json+config": lambda f: _saved(f),
    "tokenizer.json only": _json_only,
    "vocab.json+merges.txt only": _vocab_merges_only,
    "both: tokenizer.json wins": _both,
    "smaller vocab.json+merges.txt": _small_vocab_merges,
    "sd15 hub layout": _hub_sd15,
    "sd2 hub layout (pad !)": _hub_sd2,
    "transformers 4 textual inversion": _v4_textual_inversion,
    "legacy special_tokens_map + added_tokens.json": _legacy_json_special_map,
    "config added_tokens_decoder over tokenizer.json": _config_decoder_over_json,
    "added token": lambda f: _saved(f, lambda hf: hf.add_tokens([ADDED])),
    "added special token": lambda f: _saved(f, lambda hf: hf.add_special_tokens({"extra_special_tokens": [ADDED]})),
    "added token flagged special": lambda f: _saved(
        f, lambda hf: hf.add_tokens([AddedToken(ADDED, special=True, normalized=False, lstrip=True)])),
    "pad !": lambda f: (_saved(f), _edit_json(f / "tokenizer_config.json", pad_token="!")),
    "model_max_length 64": lambda f: (_saved(f), _edit_json(f / "tokenizer_config.json", model_max_length=64)),
    "no model_max_length": lambda f: (_saved(f), _edit_json(f / "tokenizer_config.json", model_max_length=None)),
    "split_special_tokens": lambda f: (_saved(f), _edit_json(f / "tokenizer_config.json", split_special_tokens=True)),
    "clean_up_tokenization_spaces": lambda f: (_saved(f), _edit_json(
        f / "tokenizer_config.json", clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)),
}


def _load_both(folder):
    from transformers import CLIPTokenizer

    return tok.ClipTokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("layout", FOLDERS)
def test_folder_is_transformers(layout, tmp_path):
    """Every folder layout loads as transformers' CLIPTokenizer.from_pretrained loads it: same backend (vocabulary,
    merges, added tokens and their flags, pipeline), same ids, padding, truncation, decoded text and token ids."""
    FOLDERS[layout](tmp_path)
    ours, hf = _load_both(tmp_path)
    _assert_same(ours, hf)


@pytest.mark.parametrize("layout", FOLDERS)
def test_save_round_trip(layout, tmp_path):
    """`save` writes what transformers' CLIPTokenizer.from_pretrained and `from_folder` load as the same tokenizer."""
    FOLDERS[layout](tmp_path / "src")
    ours = tok.ClipTokenizer.from_folder(tmp_path / "src")
    ours.save(tmp_path / "saved")
    again, hf = _load_both(tmp_path / "saved")
    _assert_same(again, hf)
    assert _backend_json(again.backend) == _backend_json(ours.backend)
    assert (again.config, again.max_length) == (ours.config, ours.max_length)
    np.testing.assert_array_equal(_encode_quietly(again, CORPUS), _encode_quietly(ours, CORPUS))


# (layout a, layout b, a prompt of CORPUS whose ids or text differ between them): each layout's feature shows in
# the corpus' ids or decoded text, so the comparisons above would see it handled wrong
DIFFERENT = [
    ("tokenizer.json+config", "sd15 hub layout", "<|ENDOFTEXT|> and <|StartOfText|> in capitals"),  # normalized
    ("tokenizer.json+config", "smaller vocab.json+merges.txt", ASTRONAUT),
    ("both: tokenizer.json wins", "smaller vocab.json+merges.txt", ASTRONAUT),
    ("tokenizer.json+config", "added token", "<cat-toy> on a table"),
    ("added token", "added special token", "<cat-toy> on a table"),  # decode skips a special token
    ("added token", "added token flagged special", "a <CAT-TOY>, a<cat-toy>b and <cat-toy><cat-toy> ! !!"),
    ("added token", "transformers 4 textual inversion", "<|ENDOFTEXT|> and <|StartOfText|> in capitals"),
    ("added token", "legacy special_tokens_map + added_tokens.json", "an <extra> token"),
    ("tokenizer.json+config", "pad !", ""),
    ("tokenizer.json+config", "model_max_length 64", LONG_PROMPT),
    ("tokenizer.json+config", "split_special_tokens", "a<|endoftext|>b <|startoftext|><|endoftext|>"),
    ("tokenizer.json+config", "clean_up_tokenization_spaces", "it's they're we've I'm you'll he'd"),
    ("added token", "config added_tokens_decoder over tokenizer.json", "<cat-toy> on a table"),
]


@pytest.mark.parametrize("a, b, prompt", DIFFERENT)
def test_layouts_differ_on_the_corpus(a, b, prompt, tmp_path):
    """The parity checks are sensitive: each pair of layouts tokenizes (or decodes) a corpus prompt differently,
    and checking one layout's tokenizer against the other's transformers tokenizer fails on the ids alone."""
    FOLDERS[a](tmp_path / "a")
    FOLDERS[b](tmp_path / "b")
    ours_a, _ = _load_both(tmp_path / "a")
    ours_b, hf_b = _load_both(tmp_path / "b")

    def seen(t):
        ids = _encode_quietly(t, [prompt])[0].tolist()
        return ids, t.decode(ids)

    assert seen(ours_a) != seen(ours_b)
    with pytest.raises(AssertionError):
        _assert_same_ids(ours_a, hf_b)
