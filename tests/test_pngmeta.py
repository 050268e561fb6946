"""The A1111 parameters chunk of `sdjax.pngmeta`: formatting, parsing, sampler names, PNG writing."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from sdjax import pngmeta

TRICKY_PROMPTS = [
    "a cat",
    "",
    "a cat, on a mat: sitting, (masterpiece:1.2), [dog|cat]",
    'she said "hello", then \\"bye\\" \\ end',
    "line one\nline two\n\nline four after a blank",
    "  leading and trailing spaces  ",
    "\nstarts with a newline and ends with one\n",
    "ünïcödé 猫 🐈 emoji, commas: colons",
    "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8",
    "tab\tand\r\ncarriage return",
]


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
@pytest.mark.parametrize("negative", ["", "blurry, ugly: bad", "multi\nline \"neg\""])
def test_parameters_round_trip(prompt, negative):
    text = pngmeta.format_parameters(prompt, negative, steps=20, scheduler="euler_a", guidance_scale=7,
                                     seed=4294967295, width=512, height=768, model='m, "x": y',
                                     extra={"Note": " padded ", "Empty": ""})
    params = pngmeta.parse_parameters(text)
    assert params == {"prompt": prompt, "negative_prompt": negative, "Steps": "20", "Sampler": "Euler a",
                      "CFG scale": "7.0", "Seed": "4294967295", "Size": "512x768", "Model": 'm, "x": y',
                      "Note": " padded "}
    settings = pngmeta.generation_settings(params)
    assert (settings["scheduler"], settings["width"], settings["height"]) == ("euler_a", 512, 768)


def test_negative_prompt_line_in_prompt_is_ambiguous():
    """A1111's format cannot hold a prompt line starting with "Negative prompt:"; it reads as the negative."""
    text = pngmeta.format_parameters("a\nNegative prompt: b", "", steps=1, scheduler="ddim", guidance_scale=1,
                                     seed=0, width=8, height=8)
    assert pngmeta.parse_parameters(text)["negative_prompt"] == "b"


def test_format_matches_a1111_layout():
    text = pngmeta.format_parameters("a cat", "dog", steps=20, scheduler="dpmpp_2m_karras", guidance_scale=7.5,
                                     seed=1, width=512, height=512, model="sd15, v1")
    assert text == ('a cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, '
                    'Size: 512x512, Model: "sd15, v1"')
    assert "Negative prompt" not in pngmeta.format_parameters("a", "", steps=1, scheduler="ddim", guidance_scale=1,
                                                              seed=0, width=8, height=8)


def test_reads_a1111_text():
    text = ("masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 3442, Size: 512x768, Model hash: 6ce0161689, "
            'Model: v1-5-pruned-emaonly, Lora hashes: "foo: 123abc, bar: 456", Version: v1.10.1')
    params = pngmeta.parse_parameters(text)
    assert params["Lora hashes"] == "foo: 123abc, bar: 456" and params["Version"] == "v1.10.1"
    s = pngmeta.generation_settings(params)
    assert s == {"prompt": "masterpiece, 1girl", "negative_prompt": "lowres, bad anatomy", "steps": 28,
                 "guidance_scale": 7.0, "seed": 3442, "width": 512, "height": 768, "scheduler": "dpmpp_2m_karras",
                 "model": "v1-5-pruned-emaonly"}
    assert pngmeta.parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


@pytest.mark.parametrize("name", pngmeta.SAMPLER_NAMES)
def test_sampler_names_round_trip(name):
    assert pngmeta.generation_settings({"Sampler": pngmeta.sampler_name(name)})["scheduler"] == name


@pytest.mark.parametrize("prompt", ["plain latin-1 café", "unicode 猫 🐈, \"q\"\nnew line"])
def test_png_round_trip(tmp_path, prompt):
    text = pngmeta.format_parameters(prompt, "neg", steps=3, scheduler="pndm", guidance_scale=7.5, seed=5,
                                     width=16, height=8)
    path = pngmeta.write_png(tmp_path / "a.png", Image.new("RGB", (16, 8), (10, 20, 30)), text)
    assert pngmeta.read_text(path) == text
    assert pngmeta.read_parameters(path)["prompt"] == prompt
    with Image.open(path) as img:
        assert img.size == (16, 8) and img.info["parameters"] == text  # what A1111's PNG Info reads
    assert os.listdir(tmp_path) == ["a.png"]
    assert pngmeta.read_parameters(pngmeta.write_png(tmp_path / "b.png", Image.new("RGB", (8, 8)))) is None


def test_png_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = pngmeta.write_png(tmp_path / "a.png", Image.new("RGB", (8, 8)), "x\nSteps: 1, Seed: 1, Size: 8x8")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pngmeta.write_png(path, Image.new("RGB", (8, 8)), "text")
    with pytest.raises(OSError, match="disk full"):
        pngmeta.write_png(tmp_path / "new.png", Image.new("RGB", (8, 8)), "text")
    assert os.listdir(tmp_path) == ["a.png"] and path.read_bytes() == b"old"
