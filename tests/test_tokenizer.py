"""Tests of sdjax.tokenizer.ClipTokenizer: known ids, padding, truncation, and folder round trips."""

import json
import re
import warnings

import numpy as np
import pytest

from sdjax import tokenizer as tok

ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
LONG_PROMPT = ", ".join(["a highly detailed matte painting of a castle on a hill at sunset"] * 8)
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


@pytest.fixture(scope="module")
def sd15():
    """The tokenizer built from the vocabulary shipped with sdjax."""
    return tok.ClipTokenizer.sd15()


def _encode_quietly(tokenizer, prompts):
    """Token ids, with truncation warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


def _hf_reference(tokenizer, prompts):
    """What transformers' own padding/truncation gives (as diffusers calls it)."""
    return tokenizer.hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")[
        "input_ids"]


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


def test_matches_transformers_truncation(sd15):
    """Padding and truncation agree with transformers' padding='max_length', truncation=True."""
    np.testing.assert_array_equal(_encode_quietly(sd15, PROMPTS), _hf_reference(sd15, PROMPTS))


def test_saved_tokenizer_json_folder(sd15, tmp_path):
    """A tokenizer saved by transformers (tokenizer.json) loads and matches sd15() on varied prompts."""
    sd15.hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = tok.ClipTokenizer.from_folder(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.max_length) == (49406, 49407, 49407, 77)
    np.testing.assert_array_equal(_encode_quietly(loaded, PROMPTS), _encode_quietly(sd15, PROMPTS))


def test_vocab_merges_folder(sd15, tmp_path):
    """An older-style folder with hand-written vocab.json + merges.txt matches sd15()."""
    vocab, merges = tok.clip_vocab_and_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = tok.ClipTokenizer.from_folder(tmp_path)
    assert len(loaded.hf) == 49408 and loaded.max_length == 77
    np.testing.assert_array_equal(_encode_quietly(loaded, PROMPTS), _encode_quietly(sd15, PROMPTS))


def test_truncation_warning_counts_dropped(sd15):
    """A 100-token prompt keeps bos + 75 tokens + eos and warns that 25 tokens were dropped."""
    prompt = " ".join(["a"] * 100)
    with pytest.warns(UserWarning, match=r"25 tokens were dropped") as record:
        ids_bl = sd15([prompt])
    assert ids_bl[0, 0] == 49406 and ids_bl[0, 76] == 49407
    assert (ids_bl[0, 1:76] == 320).all()
    assert "a a a" in str(record[0].message)


def test_truncation_warning_dropped_text(sd15):
    """The warning's count and text are what falls past the 77th token."""
    untruncated = sd15.hf(LONG_PROMPT)["input_ids"]
    with pytest.warns(UserWarning) as record:
        sd15([LONG_PROMPT])
    message = str(record[0].message)
    count = int(re.search(r"(\d+) tokens were dropped", message).group(1))
    assert count == len(untruncated) - 77 > 0
    assert sd15.decode(untruncated[76:-1]) in message


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
    sd15.hf.save_pretrained(tmp_path / "tokenizer")
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
    """A corrupt tokenizer.json is a CheckpointError (a ValueError) naming the file, before transformers reads it."""
    from sdjax.io import CheckpointError

    sd15.hf.save_pretrained(tmp_path / "tokenizer")
    path = tmp_path / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        tok.load_tokenizer(tmp_path)
