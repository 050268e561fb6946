"""`sdjax generate` (and img2img / inpaint) end to end on the tiny model.

The A1111 parameters chunk itself (`sdjax.pngmeta`) is tested in tests/test_pngmeta.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli, pngmeta

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--height", "64", "--width", "64", "--steps", "3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One XLA cache for the module, so later runs (and the subprocess) skip most compiling."""
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def first_run(tiny_sd_folder, cache_dir, tmp_path_factory):
    """One in-process generation of 2 images with seed 1234, shared by several tests."""
    out = tmp_path_factory.mktemp("run") / "outputs"
    argv = ["generate", "a red cube, studio light: \"best\"", "--negative-prompt", "blurry, low quality",
            "--seed", "1234", "--num-images", "2", "--guidance-scale", "6.5", "--model", str(tiny_sd_folder),
            "--out", str(out), "--cache-dir", cache_dir, "--no-progress", *TINY]
    return argv, out, cli.main(argv)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_generate_writes_pngs_with_parameters(first_run, capsys):
    argv, out, status = first_run
    assert status == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-1234.png", "00001-1235.png"]
    for seed, path in zip((1234, 1235), files, strict=True):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
        settings = pngmeta.generation_settings(pngmeta.read_parameters(path))
        assert settings == {
            "prompt": 'a red cube, studio light: "best"', "negative_prompt": "blurry, low quality", "steps": 3,
            "guidance_scale": 6.5, "seed": seed, "width": 64, "height": 64, "scheduler": "pndm",
            "model": Path(argv[argv.index("--model") + 1]).name,
        }
        assert pngmeta.read_parameters(path)["Sampler"] == "PLMS"


def test_same_seed_same_pixels_and_numbering_continues(first_run, capsys):
    argv, out, _ = first_run
    capsys.readouterr()
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    new = [out / "00002-1234.png", out / "00003-1235.png"]
    assert stdout[-1] == f"wrote 2 images: {new[0]}, {new[1]}"
    np.testing.assert_array_equal(pixels(new[0]), pixels(out / "00000-1234.png"))
    np.testing.assert_array_equal(pixels(new[1]), pixels(out / "00001-1235.png"))
    assert not np.array_equal(pixels(new[0]), pixels(new[1]))
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_subprocess_random_seed_in_batches(tiny_sd_folder, cache_dir, tmp_path):
    out = tmp_path / "sub"
    cmd = [sys.executable, "-m", "sdjax.cli", "generate", "a blue sphere", "--model", str(tiny_sd_folder),
           "--out", str(out), "--cache-dir", cache_dir, "--num-images", "2", "--batch-size", "1", *TINY]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.iterdir())
    assert proc.stdout.strip().splitlines()[-1] == f"wrote 2 images: {files[0]}, {files[1]}"
    seeds = [int(f.stem.split("-")[1]) for f in files]
    assert [pngmeta.generation_settings(pngmeta.read_parameters(f))["seed"] for f in files] == seeds
    assert seeds[1] == (seeds[0] + 1) % 2**32
    assert "Negative prompt" not in pngmeta.read_text(files[0])


@pytest.mark.parametrize("args, flag", [
    (["--height", "60"], "--height"),
    (["--width", "100"], "--width"),
    (["--steps", "0"], "--steps"),
    (["--scheduler", "nope"], "--scheduler"),
    (["--dtype", "float64"], "--dtype"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "4294967296"], "--seed"),
    (["--num-images", "0"], "--num-images"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--optimization-effort", "-1.5"], "--optimization-effort"),
    (["--conv", "winograd"], "--conv"),
])
def test_bad_arguments_exit_2_and_write_nothing(tiny_sd_folder, tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    assert cli.main(["generate", "x", "--model", str(tiny_sd_folder), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
    assert not out.exists()


def test_missing_model_exits_1_without_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_model"
    assert cli.main(["generate", "x", "--model", str(missing), "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err and "Traceback" not in err
    assert not out.exists()


def test_offline_hub_id_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    assert cli.main(["generate", "x", "--model", "nobody/nothing", "--out", str(out), *TINY]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not out.exists()


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file.txt"
    out.write_text("keep")
    assert cli.main(["generate", "x", "--out", str(out), *TINY]) == 2
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "keep"


def test_help_and_missing_command(capsys):
    assert cli.main(["generate", "--help"]) == 0
    assert "--guidance-scale" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_exclusive_write_never_replaces(tmp_path):
    path = tmp_path / "00000-1.png"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        pngmeta.write_png(path, Image.new("RGB", (8, 8)), "text", exclusive=True)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["00000-1.png"]
    assert cli.next_number(tmp_path) == 1
    (tmp_path / "00041-7.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert cli.next_number(tmp_path) == 42
    written = cli.write_numbered(tmp_path, 9, Image.new("RGB", (8, 8)), "text")
    assert written.name == "00042-9.png"


@pytest.fixture(scope="module")
def input_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((72, 80), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask, mode="L").save(folder / "mask.png")
    Image.fromarray(mask[:40], mode="L").save(folder / "small_mask.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_img2img_and_inpaint_commands(tiny_sd_folder, cache_dir, input_files, tmp_path, capsys):
    common = ["--model", str(tiny_sd_folder), "--cache-dir", cache_dir, "--no-progress", "--steps", "4",
              "--seed", "9"]
    out = tmp_path / "out"
    assert cli.main(["img2img", "a cat", "--image", str(input_files / "in.png"), "--strength", "0.5",
                     "--out", str(out), *common]) == 0
    assert cli.main(["inpaint", "a dog", "--image", str(input_files / "in.png"), "--mask",
                     str(input_files / "mask.png"), "--paste-back", "--out", str(out), *common]) == 0
    assert "wrote 1 image" in capsys.readouterr().out
    first, second = sorted(out.iterdir())
    with Image.open(first) as img:
        assert img.size == (80, 72)  # the input's size (already a multiple of 8)
        params = pngmeta.parse_parameters(img.info["parameters"])
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "9" and params["prompt"] == "a cat"
    kept = np.asarray(Image.open(input_files / "mask.png")) == 0
    assert np.array_equal(pixels(second)[kept], pixels(input_files / "in.png")[kept])  # pasted back


@pytest.mark.parametrize("args,flag", [
    (["img2img", "x", "--image", "{d}/in.png", "--strength", "1.5"], "--strength"),
    (["img2img", "x", "--image", "{d}/missing.png"], "--image"),
    (["img2img", "x", "--image", "{d}/broken.png"], "--image"),
    (["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/small_mask.png"], "--mask"),
    (["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/in.png"], "--mask"),
    (["inpaint", "x", "--image", "{d}/in.png"], "--mask"),
])
def test_bad_image_arguments_exit_2_and_write_nothing(tiny_sd_folder, input_files, tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    argv = [a.format(d=input_files) for a in args] + ["--model", str(tiny_sd_folder), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


def test_generate_with_lora(tiny_sd_folder, cache_dir, tmp_path, capsys):
    import jax

    from sdjax import lora, pipeline

    pipe = pipeline.load_pipeline(tiny_sd_folder, compilation_cache="off")
    adapter = lora.init(jax.random.key(0), pipe.params, rank=4, alpha=4)
    adapter = adapter.replace(weights=jax.tree.map(lambda w: w + 0.3, adapter.weights))  # up != 0: it has effect
    path = tmp_path / "style.safetensors"
    lora.save(path, adapter, format="kohya")
    base = ["generate", "a cat", "--model", str(tiny_sd_folder), "--cache-dir", cache_dir, "--no-progress",
            "--seed", "3", *TINY]
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "lora"), "--lora", f"{path}:0.7"]) == 0
    (plain,), (styled,) = sorted((tmp_path / "plain").iterdir()), sorted((tmp_path / "lora").iterdir())
    assert np.abs(pixels(plain).astype(float) - pixels(styled)).mean() > 1.0
    with Image.open(styled) as img:
        assert pngmeta.parse_parameters(img.info["parameters"])["LoRA"] == "style:0.7"
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err and not (tmp_path / "bad").exists()
