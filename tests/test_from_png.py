"""`sdjax generate --from-png IMAGE`: an image reproduced from its PNG's parameters; flags override them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli, pngmeta


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """The persistent XLA cache tests/test_safety.py shares (the same 64x64, 3-step, one-image program)."""
    return str(tmp_path_factory.getbasetemp() / "xla-tiny-64-3")


@pytest.fixture(scope="module")
def original(tiny_sd_folder, xla_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("from_png") / "first"
    argv = ["generate", "a lighthouse, at dusk: \"moody\"", "--negative-prompt", "blurry", "--seed", "77",
            "--guidance-scale", "6", "--steps", "3", "--height", "64", "--width", "64", "--model",
            str(tiny_sd_folder), "--out", str(out), "--cache-dir", xla_cache, "--no-progress"]
    assert cli.main(argv) == 0
    (png,) = sorted(out.iterdir())
    return png


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def run(png: Path, out: Path, folder: Path, cache: str, *extra: str) -> Path:
    assert cli.main(["generate", "--from-png", str(png), "--model", str(folder), "--out", str(out),
                     "--cache-dir", cache, "--no-progress", *extra]) == 0
    (made,) = sorted(out.iterdir())
    return made


def test_reproduces_the_image_and_flags_override(original, tiny_sd_folder, xla_cache, tmp_path, capsys):
    again = run(original, tmp_path / "again", tiny_sd_folder, xla_cache)
    assert again.name == original.name  # 00000-77.png: the PNG's seed
    np.testing.assert_array_equal(pixels(again), pixels(original))
    assert pngmeta.read_text(again) == pngmeta.read_text(original)
    assert "warning" not in capsys.readouterr().err  # same model, nothing ignored

    other = run(original, tmp_path / "other", tiny_sd_folder, xla_cache, "--seed", "78")
    assert other.name == "00000-78.png"
    assert np.abs(pixels(other).astype(int) - pixels(original)).mean() > 1
    want = pngmeta.generation_settings(pngmeta.read_parameters(original))
    assert pngmeta.generation_settings(pngmeta.read_parameters(other)) == {**want, "seed": 78}


def test_override_parsing_and_warnings(original, tiny_sd_folder, tmp_path, capsys):
    """Which values win (parsed only: no generation), and what is warned about."""
    text = pngmeta.read_text(original).replace("Steps: 3", "Steps: 7").replace("Sampler: PLMS", "Sampler: DDIM")
    text += ", Model: some-other-model, Denoising strength: 0.5, Foo: bar"
    png = tmp_path / "edited.png"
    pngmeta.write_png(png, Image.open(original), text)
    args = cli.build_parser().parse_args(["generate", "my own prompt", "--from-png", str(png), "--model",
                                          str(tiny_sd_folder), "--steps", "50", "--height", "128"])
    cli.apply_png_parameters(args)
    assert (args.prompt, args.negative_prompt, args.steps, args.scheduler) == ("my own prompt", "blurry", 50, "ddim")
    assert (args.seed, args.guidance_scale, args.width, args.height) == (77, 6.0, 64, 128)
    err = capsys.readouterr().err
    for word in ("some-other-model", "Denoising strength", "Foo"):
        assert word in err


@pytest.mark.parametrize("text, message", [
    (None, "has no 'parameters' text chunk"),
    ("a cat\nSteps: many, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64", "field 'Steps' = 'many'"),
    ("a cat\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 60x64", "field 'Size (width)' = '60'"),
    ("a cat\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: -4, Size: 64x64", "field 'Seed'"),
])
def test_bad_pngs_exit_2_naming_the_png(tmp_path, capsys, text, message):
    png = tmp_path / "in.png"
    pngmeta.write_png(png, Image.new("RGB", (8, 8)), text)
    out = tmp_path / "out"
    assert cli.main(["generate", "--from-png", str(png), "--model", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--from-png" in err and str(png) in err and message in err
    assert not out.exists()


def test_prompt_required_without_from_png(tmp_path, capsys):
    assert cli.main(["generate", "--out", str(tmp_path / "out")]) == 2
    assert "PROMPT is required" in capsys.readouterr().err
