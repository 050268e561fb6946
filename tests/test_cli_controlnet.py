"""ControlNet on the command line: `sdjax generate|img2img|inpaint --controlnet MODEL --control-image FILE ...`,
the PNG parameters it writes (the sd-webui-controlnet extension's ``ControlNet i`` entries) and --from-png of them.

Runs on the tiny SD model with tiny random ControlNets (saved by diffusers, as tests/test_controlnet.py does),
64x64, 3 steps. The ControlNet sampling loop itself is tested against diffusers elsewhere; here: that the flags
reach it, that what the CLI makes equals what the API makes, and that bad command lines fail first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdjax import checkpoint, cli, controlnet, pngmeta
from sdjax.controlnet import ControlNetConfig
from tests import reference as ref

STEPS = ["--steps", "3"]
PROMPT = "a house on a hill"
SEED = "31"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny ControlNets (other seeds, the same architecture) and control images, outside each test's tmp_path."""
    from tests.test_controlnet import torch_controlnet

    d = tmp_path_factory.mktemp("cli_controlnet")
    for name, seed in (("cn_a", 3), ("cn_b", 4)):
        ref.save(torch_controlnet(ControlNetConfig.tiny(), seed), d / name)
    # 70x67: generate without --height/--width makes 64x64 (the control image's size rounded down to 8s)
    img = Image.new("RGB", (70, 67), (20, 30, 40))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 30, 40, 60), fill=(230, 220, 200))
    draw.polygon([(4, 30), (24, 8), (44, 30)], fill=(180, 40, 30))
    draw.ellipse((48, 6, 64, 22), fill=(250, 240, 90))
    img.save(d / "house.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "noise.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(d / "grey.png")
    Image.new("RGB", (4, 4)).save(d / "tiny.png")
    (d / "notes.png").write_text("not an image")
    shutil.copytree(d / "cn_a", d / "cn_broken")
    (d / "cn_broken" / "config.json").write_text("{not json")
    shutil.copytree(d / "cn_a", d / "cn_other_base")
    config = json.loads((d / "cn_other_base" / "config.json").read_text())
    config["cross_attention_dim"] = 64  # the tiny UNet's is 32: a ControlNet for another base model
    (d / "cn_other_base" / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One XLA cache for the module: the API test and --from-png rerun programs a CLI run compiled."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def generate(tmp_path_factory, folder, cache_dir, *args: str, command: str = "generate") -> list[Path]:
    """Runs the CLI in-process into a new folder; the PNGs it wrote."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = [command, PROMPT, "--seed", SEED, *STEPS, "--model", str(folder), "--out", str(out), "--cache-dir",
            cache_dir, "--no-progress", *args]
    assert cli.main(argv) == 0
    return sorted(out.iterdir())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def canny_run(tiny_sd_folder, files, cache_dir, tmp_path_factory):
    """generate with one canny ControlNet, no --height/--width (the size follows the control image)."""
    return generate(tmp_path_factory, tiny_sd_folder, cache_dir, "--controlnet", str(files / "cn_a"),
                    "--control-image", str(files / "house.png"), "--control-preprocess", "canny")


@pytest.fixture(scope="module")
def plain_run(tiny_sd_folder, cache_dir, tmp_path_factory):
    """The same run without the ControlNet."""
    return generate(tmp_path_factory, tiny_sd_folder, cache_dir, "--height", "64", "--width", "64")


@pytest.fixture(scope="module")
def two_run(tiny_sd_folder, files, cache_dir, tmp_path_factory):
    """Two ControlNets with their own scales and step ranges, in guess mode."""
    return generate(tmp_path_factory, tiny_sd_folder, cache_dir, "--guess-mode",
                    "--controlnet", str(files / "cn_a"), "--control-image", str(files / "house.png"),
                    "--control-preprocess", "canny:50:150", "--control-scale", "0.5", "--control-start", "0.2",
                    "--controlnet", str(files / "cn_b"), "--control-end", "0.6", "--control-scale", "1.5",
                    "--control-image", str(files / "noise.png"))


def test_generate_with_a_canny_controlnet(canny_run, plain_run, files):
    (png,) = canny_run
    assert png.name == f"00000-{SEED}.png"
    with Image.open(png) as img:
        assert img.size == (64, 64)  # 70x67 control image, rounded down
    params = pngmeta.read_parameters(png)
    assert params["ControlNet 0"] == ("Module: canny, Model: cn_a, Weight: 1.0, Threshold A: 100, Threshold B: 200, "
                                      "Guidance Start: 0.0, Guidance End: 1.0")
    assert 'ControlNet 0: "Module: canny, Model: cn_a, ' in pngmeta.read_text(png)  # quoted, as the extension reads it
    assert "Guess Mode" not in params and params["Size"] == "64x64"
    settings = pngmeta.generation_settings(params)
    assert settings["controls"] == [{"model": "cn_a", "module": "canny", "scale": 1.0, "start": 0.0, "end": 1.0}]
    (plain,) = plain_run
    assert "ControlNet" not in pngmeta.read_text(plain)
    assert np.abs(pixels(png).astype(int) - pixels(plain)).mean() > 1  # the ControlNet steered


def test_api_equals_the_cli(canny_run, tiny_sd_folder, files, cache_dir):
    from sdjax import controls, load_controlnet, pipeline

    pipe = pipeline.load_pipeline(tiny_sd_folder, compilation_cache=cache_dir)
    net = load_controlnet(files / "cn_a", unet=pipe.models.unet.config)
    with Image.open(files / "house.png") as img:
        edges = controls.preprocess("canny", img.convert("RGB"))
    gen = pipe.txt2img(PROMPT, "", steps=3, seeds=int(SEED), prompt_syntax="a1111", progress=False,
                       controls=[controls.Control(net, edges)])
    (png,) = canny_run
    np.testing.assert_array_equal(np.asarray(gen.images[0]), pixels(png))
    assert gen.settings["controls"] == [{"model": "cn_a", "scale": 1.0, "start": 0.0, "end": 1.0}]
    # the API's own infotext: the preprocessor is the CLI's knowledge ("none" without it)
    assert "Module: none, Model: cn_a" in pngmeta.infotext(gen, 0)


def test_two_controlnets_with_their_own_settings(two_run, canny_run):
    (png,) = two_run
    params = pngmeta.read_parameters(png)
    assert params["ControlNet 0"] == ("Module: canny, Model: cn_a, Weight: 0.5, Threshold A: 50, Threshold B: 150, "
                                      "Guidance Start: 0.2, Guidance End: 1.0")
    assert params["ControlNet 1"] == "Module: none, Model: cn_b, Weight: 1.5, Guidance Start: 0.0, Guidance End: 0.6"
    assert [c["model"] for c in pngmeta.generation_settings(params)["controls"]] == ["cn_a", "cn_b"]
    assert not np.array_equal(pixels(png), pixels(canny_run[0]))


def test_guess_mode_is_recorded(two_run):
    (png,) = two_run
    params = pngmeta.read_parameters(png)
    assert params["Guess Mode"] == "True"
    assert pngmeta.generation_settings(params)["guess_mode"] is True


def test_img2img_with_a_controlnet(tiny_sd_folder, files, cache_dir, tmp_path_factory):
    common = ["--image", str(files / "noise.png"), "--strength", "0.7"]
    plain = generate(tmp_path_factory, tiny_sd_folder, cache_dir, *common, command="img2img")
    (png,) = generate(tmp_path_factory, tiny_sd_folder, cache_dir, *common, "--controlnet", str(files / "cn_a"),
                      "--control-image", str(files / "house.png"), "--control-preprocess", "canny",
                      "--control-scale", "2", command="img2img")
    params = pngmeta.read_parameters(png)
    assert params["Denoising strength"] == "0.7" and params["Size"] == "64x64"
    assert params["ControlNet 0"].startswith("Module: canny, Model: cn_a, Weight: 2.0, ")
    assert np.abs(pixels(png).astype(int) - pixels(plain[0])).mean() > 1


def test_from_png_notes_the_controlnets_and_runs(canny_run, plain_run, tiny_sd_folder, cache_dir, tmp_path,
                                                 capsys):
    (png,) = canny_run
    capsys.readouterr()
    out = tmp_path / "again"
    assert cli.main(["generate", "--from-png", str(png), "--model", str(tiny_sd_folder), "--out", str(out),
                     "--cache-dir", cache_dir, "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "cn_a (canny, weight 1)" in err[0] and "not restored" in err[0]
    assert "--controlnet MODEL --control-image FILE" in err[0]
    (made,) = sorted(out.iterdir())
    assert "ControlNet" not in pngmeta.read_text(made)
    np.testing.assert_array_equal(pixels(made), pixels(plain_run[0]))  # the same run without the ControlNet


def test_help_shows_the_controlnet_group(capsys):
    for command in ("generate", "img2img", "inpaint"):
        assert cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "controlnet:" in text
        for flag in ("--controlnet MODEL", "--control-image FILE", "--control-scale S", "--control-start F",
                     "--control-end F", "--control-preprocess", "--guess-mode"):
            assert flag in text, (command, flag)


def test_parsing_groups(files):
    args = cli.build_parser().parse_args([
        "inpaint", "x", "--image", "i.png", "--mask", "m.png", "--controlnet", "a", "--control-scale", "0.3",
        "--control-image", "a.png", "--controlnet", "b", "--control-image", "b.png", "--control-preprocess",
        "canny:0:1020"])
    a, b = args.controlnets
    assert (a.model, a.image, a.scale, a.start, a.end, a.preprocess) == ("a", "a.png", 0.3, 0.0, 1.0,
                                                                         ("none", 100, 200))
    assert (b.model, b.image, b.scale, b.preprocess) == ("b", "b.png", 1.0, ("canny", 0, 1020))
    assert args.guess_mode is False and not hasattr(args, "control_image")
    assert cli.build_parser().parse_args(["generate", "x"]).controlnets == []


def test_pngmeta_controlnet_entries_read_back():
    # the extension's own unit (unquoted, a hash after the model), and an odd folder name sdjax quotes
    params = pngmeta.parse_parameters(
        'a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: '
        'canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, Threshold A: '
        '100.0, Threshold B: 200.0, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False", ControlNet 1: '
        f'{pngmeta.quote(pngmeta.controlnet_unit({"model": "odd, name: x", "scale": 0.5, "start": 0, "end": 0.5}))}'
        ', ControlNet 2: "garbage", Guess Mode: True')
    assert pngmeta.generation_settings(params)["controls"] == [
        {"model": "control_v11p_sd15_canny [d14c016b]", "module": "canny", "scale": 1.0, "start": 0.0, "end": 1.0},
        {"model": "odd, name: x", "module": "none", "scale": 0.5, "start": 0.0, "end": 0.5},
        {"model": "", "module": "none"},  # unreadable: kept as far as it goes, never raised on
    ]
    assert pngmeta.generation_settings(params)["guess_mode"] is True


# (id, argv after "generate PROMPT ..." or the command given, exit status, what the one-line message names)
GEN = ["generate", "a cat", "--height", "64", "--width", "64", *STEPS]
CN = ["--controlnet", "{d}/cn_a"]
BAD_LINES = [
    ("image-without-controlnet", GEN + ["--control-image", "{d}/house.png"], 2, "--control-image"),
    ("controlnet-without-image", GEN + CN, 2, "--control-image"),
    ("two-images-in-a-group", GEN + CN + ["--control-image", "{d}/house.png", "--control-image", "{d}/grey.png"], 2,
     "--control-image: given twice"),
    ("scale-nan", GEN + CN + ["--control-image", "{d}/house.png", "--control-scale", "nan"], 2, "--control-scale"),
    ("scale-twice", GEN + CN + ["--control-scale", "1", "--control-image", "{d}/grey.png", "--control-scale", "2"],
     2, "--control-scale: given twice"),
    ("start-after-end", GEN + CN + ["--control-image", "{d}/house.png", "--control-start", "0.8", "--control-end",
                                    "0.2"], 2, "--control-start 0.8 / --control-end 0.2"),
    ("end-above-1", GEN + CN + ["--control-image", "{d}/house.png", "--control-end", "1.5"], 2, "--control-end"),
    ("preprocess-sobel", GEN + CN + ["--control-image", "{d}/house.png", "--control-preprocess", "sobel"], 2,
     "--control-preprocess: must be one of none, canny"),
    ("canny-high-below-low", GEN + CN + ["--control-image", "{d}/house.png", "--control-preprocess",
                                         "canny:200:100"], 2, "--control-preprocess"),
    ("canny-not-integers", GEN + CN + ["--control-image", "{d}/house.png", "--control-preprocess", "canny:a:b"], 2,
     "--control-preprocess"),
    ("image-missing", GEN + CN + ["--control-image", "{d}/missing.png"], 2, "--control-image"),
    ("image-not-an-image", GEN + CN + ["--control-image", "{d}/notes.png"], 2, "--control-image"),
    ("image-too-small", GEN + CN + ["--control-image", "{d}/tiny.png"], 2, "--control-image"),
    ("guess-mode-alone", GEN + ["--guess-mode"], 2, "--guess-mode"),
    ("second-group-without-image", GEN + CN + ["--control-image", "{d}/house.png", "--controlnet", "{d}/cn_b"], 2,
     "--controlnet '{d}/cn_b' has no --control-image"),
    ("controlnet-missing", GEN + ["--controlnet", "{d}/no_such_controlnet", "--control-image", "{d}/house.png"], 1,
     "--controlnet"),
    ("controlnet-broken-config", GEN + ["--controlnet", "{d}/cn_broken", "--control-image", "{d}/house.png"], 1,
     "--controlnet"),
    ("controlnet-other-base-model", GEN + ["--controlnet", "{d}/cn_other_base", "--control-image", "{d}/house.png"],
     2, "'cross_attention_dim' = 64 does not match"),
    ("img2img-image-without-controlnet", ["img2img", "a cat", "--image", "{d}/grey.png", *STEPS, "--control-image",
                                          "{d}/house.png"], 2, "--control-image"),
    ("inpaint-guess-mode-alone", ["inpaint", "a cat", "--image", "{d}/grey.png", "--mask", "{d}/grey.png", *STEPS,
                                  "--guess-mode"], 2, "--guess-mode"),
]


@pytest.fixture
def loads(monkeypatch):
    """Counts weight loads: the base model's (checkpoint.load) and the ControlNets' (controlnet.load)."""
    calls = []
    for module in (checkpoint, controlnet):
        real = module.load
        monkeypatch.setattr(module, "load", lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("args, status, message", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_lines_fail_first(tiny_sd_folder, files, tmp_path, capsys, loads, args, status, message):
    argv = [a.format(d=files) for a in args]
    argv += ["--model", str(tiny_sd_folder), "--out", str(tmp_path / "out"), "--cache-dir", "off", "--no-progress"]
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    print(f"[cli] exit {status}: {err.strip()}")
    assert len(err.strip().splitlines()) == 1 and message.format(d=files) in err and "Traceback" not in err, err
    assert loads == []  # no weights were read
    assert not os.listdir(tmp_path)  # no --out folder


def test_offline_hub_controlnet_exits_1(tiny_sd_folder, files, tmp_path, capsys, monkeypatch):
    """A hub id is fetched when it loads, after the model (as --model's): offline and not cached, exit 1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = [*GEN, "--controlnet", "nobody/nothing", "--control-image", str(files / "house.png"), "--model",
            str(tiny_sd_folder), "--out", str(tmp_path / "out"), "--cache-dir", "off", "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--controlnet 'nobody/nothing'" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()
