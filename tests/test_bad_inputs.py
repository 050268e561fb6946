"""Bad inputs are refused early, by name, saying what is allowed: the generation API and the generation CLI.

API: each case is a base call (which is valid: `test_base_calls_reach_the_job`) with one argument made bad; it
must raise TypeError/ValueError naming the argument before the jitted job is reached or anything compiles.
CLI: each case is a base command line with one flag made bad; it must exit 2 (bad argument) or 1 (bad model),
print one line naming the flag, load no weights and leave no file or folder behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import checkpoint, cli, images, io, pipeline
from tests.reference import count_compiles

RNG = np.random.default_rng(0)
IMG = Image.fromarray(RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8))
MASK = Image.fromarray(np.where(np.arange(64)[:, None] < 32, 255, 0).astype(np.uint8).repeat(64, 1), mode="L")
FLOAT_IMG = np.full((64, 64, 3), 0.5, np.float32)

BASE = {
    "txt2img": dict(prompts=["a cat", "a dog"], steps=2, height=64, width=64, seeds=[1, 2], progress=False),
    "img2img": dict(images=[IMG, IMG], prompts=["a cat", "a dog"], strength=0.5, steps=2, seeds=[1, 2],
                    progress=False),
    "inpaint": dict(images=[IMG, IMG], masks=[MASK, MASK], prompts=["a cat", "a dog"], steps=2, seeds=[1, 2],
                    progress=False),
}


def _with(arr: np.ndarray, index, value) -> np.ndarray:
    arr = arr.copy()
    arr[index] = value
    return arr


def _pil(arr: np.ndarray, mode: str | None = None) -> Image.Image:
    return Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)


LATENTS = np.zeros((2, 8, 8, 4), np.float32)

# (id, job, overrides of BASE[job], exception, regex the message must match: it names the argument)
API_CASES = [
    ("height-huge", "txt2img", dict(height=100000), ValueError, r"^height must .*\[8, 2048\], got 100000; allow_large"),
    ("width-huge", "txt2img", dict(width=2056), ValueError, r"^width must .*2048.*got 2056"),
    ("height-not-multiple", "txt2img", dict(height=100), ValueError, r"^height must be a positive multiple of 8"),
    ("height-zero", "txt2img", dict(height=0), ValueError, r"^height must be a positive multiple of 8"),
    ("height-float", "txt2img", dict(height=64.0), TypeError, r"^height must be an integer"),
    ("height-str", "txt2img", dict(height="64"), TypeError, r"^height must be an integer"),
    ("height-bool", "txt2img", dict(height=True), TypeError, r"^height must be an integer"),
    ("steps-huge", "txt2img", dict(steps=10**9), ValueError, r"^steps must .*<= 1000 .*num_train_timesteps.*got 1000000000"),
    ("steps-1001", "txt2img", dict(steps=1001), ValueError, r"^steps must .*<= 1000"),
    ("steps-zero", "txt2img", dict(steps=0), ValueError, r"^steps must be an integer >= 1"),
    ("steps-float", "txt2img", dict(steps=2.5), TypeError, r"^steps must be an integer"),
    ("prompts-dict", "txt2img", dict(prompts={"a": 1}), TypeError, r"^prompts must be a string or a list of strings, got dict"),
    ("prompts-set", "txt2img", dict(prompts={"a"}), TypeError, r"^prompts must be .*got set"),
    ("prompts-none", "txt2img", dict(prompts=None), TypeError, r"^prompts must be .*got NoneType"),
    ("prompts-bytes", "txt2img", dict(prompts=b"a cat"), TypeError, r"^prompts must be .*got bytes"),
    ("prompts-int", "txt2img", dict(prompts=5), TypeError, r"^prompts must be .*got int"),
    ("prompts-empty", "txt2img", dict(prompts=[], seeds=None), ValueError, r"^prompts must be .*non-empty"),
    ("prompts-entry-int", "txt2img", dict(prompts=["a", 3]), TypeError, r"^prompts must be .*int at prompts\[1\]"),
    ("prompts-surrogate", "txt2img", dict(prompts=["a", "\udcff"]), ValueError, r"^prompts\[1\] is not valid UTF-8"),
    ("prompts-too-many", "txt2img", dict(prompts=["x"] * 257, seeds=0), ValueError, r"^prompts: at most 256 .*allow_large"),
    ("negative-dict", "txt2img", dict(negative_prompts={"a": 1}), TypeError, r"^negative_prompts must be"),
    ("negative-count", "txt2img", dict(negative_prompts=["a", "b", "c"]), ValueError, r"^negative_prompts must .*2 strings"),
    ("seeds-negative-scalar", "txt2img", dict(seeds=-5), ValueError, r"^seeds must be integers in \[0, 4294967295\], got -5"),
    ("seeds-scalar-2**32", "txt2img", dict(seeds=2**32), ValueError, r"^seeds must be integers in \[0, 4294967295\]"),
    ("seeds-float", "txt2img", dict(seeds=1.0), TypeError, r"^seeds must be an integer in \[0, .*got 1.0"),
    ("seeds-0d-float", "txt2img", dict(seeds=np.array(3.0)), TypeError, r"^seeds must be .*shape \[\] and dtype float64"),
    ("seeds-str", "txt2img", dict(seeds="3"), TypeError, r"^seeds must be"),
    ("seeds-bool", "txt2img", dict(seeds=True), TypeError, r"^seeds must be"),
    ("seeds-list-float", "txt2img", dict(seeds=[1.0, 2.0]), TypeError, r"^seeds must be integers .*got 1.0"),
    ("seeds-list-negative", "txt2img", dict(seeds=[1, -1]), ValueError, r"^seeds must be integers .*got -1"),
    ("seeds-count", "txt2img", dict(seeds=[1]), ValueError, r"^seeds must be an int or a list of 2 ints"),
    ("guidance-nan", "txt2img", dict(guidance_scale=float("nan")), ValueError, r"^guidance_scale must be a finite number"),
    ("guidance-inf", "txt2img", dict(guidance_scale=float("-inf")), ValueError, r"^guidance_scale must be a finite"),
    ("guidance-huge", "txt2img", dict(guidance_scale=1e6), ValueError, r"^guidance_scale must .*\[-100, 100\].*allow_large"),
    ("guidance-beyond-float32", "txt2img", dict(guidance_scale=1e300, allow_large=True), ValueError,
     r"^guidance_scale must be a finite number \(float32\)"),
    ("guidance-str", "txt2img", dict(guidance_scale="7.5"), TypeError, r"^guidance_scale must be a finite number"),
    ("scheduler-bogus", "txt2img", dict(scheduler="heun"), ValueError, r"^scheduler='heun' is not known; choose one of"),
    ("scheduler-int", "txt2img", dict(scheduler=5), ValueError, r"^scheduler=5 is not known"),
    ("latents-nan", "txt2img", dict(latents=_with(LATENTS, (0, 1, 1, 1), np.nan)), ValueError, r"^latents must be finite"),
    ("latents-inf", "txt2img", dict(latents=_with(LATENTS, (1, 0, 0, 0), np.inf)), ValueError, r"^latents must be finite"),
    ("latents-float32-overflow", "txt2img", dict(latents=np.full((2, 8, 8, 4), 1e300)), ValueError, r"^latents must be finite"),
    ("latents-shape", "txt2img", dict(latents=np.zeros((2, 4, 4, 4))), ValueError, r"^latents must have shape \[2, 8, 8, 4\]"),
    ("latents-complex", "txt2img", dict(latents=LATENTS.astype(complex)), TypeError, r"^latents must be a float array"),
    ("progress-str", "txt2img", dict(progress="yes"), TypeError, r"^progress must be True or False"),
    ("allow_large-str", "txt2img", dict(allow_large="yes"), TypeError, r"^allow_large must be True or False"),
    ("strength-nan", "img2img", dict(strength=float("nan")), ValueError, r"^strength must be a number in \[0, 1\]"),
    ("strength-1.5", "img2img", dict(strength=1.5), ValueError, r"^strength must be a number in \[0, 1\], got 1.5"),
    ("strength-bool", "img2img", dict(strength=True), TypeError, r"^strength must be a number"),
    ("strength-none", "img2img", dict(strength=None), TypeError, r"^strength must be a number"),
    ("image-nan", "img2img", dict(images=[_with(FLOAT_IMG, (3, 3, 0), np.nan), FLOAT_IMG]), ValueError,
     r"^images\[0\]: float images must be finite"),
    ("image-float-range", "img2img", dict(images=[FLOAT_IMG, FLOAT_IMG * 4]), ValueError,
     r"^images\[1\]: float images must be in \[0, 1\]"),
    ("image-uint16-array", "img2img", dict(images=[FLOAT_IMG.astype(np.uint16)] * 2), ValueError,
     r"^images\[0\]: images must be uint8 or float"),
    ("image-2d", "img2img", dict(images=[np.zeros((64, 64), np.uint8)] * 2), ValueError, r"^images\[0\]: .*\[H, W, 3\]"),
    ("image-4-channels", "img2img", dict(images=[np.zeros((64, 64, 4), np.uint8)] * 2), ValueError,
     r"^images\[0\]: .*\[H, W, 3\]"),
    ("image-tiny", "img2img", dict(images=[np.zeros((4, 4, 3), np.uint8)] * 2), ValueError, r"^images must be at least 8x8"),
    ("images-empty", "img2img", dict(images=[]), ValueError, r"^images must not be empty"),
    ("images-none", "img2img", dict(images=None), TypeError, r"^images must be a PIL image"),
    ("images-object", "img2img", dict(images=[{"a": 1}] * 2), TypeError, r"^images\[0\]: each entry must be"),
    ("image-too-large", "img2img", dict(images=[Image.new("RGB", (2056, 64))] * 2), ValueError,
     r"^images must be .*at most 2048x2048 pixels, got 2056x64; or give height and width.*allow_large"),
    ("image-given-height-huge", "img2img", dict(height=100000), ValueError, r"^height must .*2048"),
    ("images-vs-prompts", "img2img", dict(images=[IMG] * 3), ValueError, r"^images must be one per prompt: got 3 for 2"),
    ("mask-nan", "inpaint", dict(masks=[MASK, _with(np.zeros((64, 64), np.float32), (1, 1), np.nan)]), ValueError,
     r"^masks\[1\]: float masks must be finite"),
    ("mask-F-range", "inpaint", dict(masks=[MASK, _pil(np.full((64, 64), 255.0, np.float32), "F")]), ValueError,
     r"^masks\[1\]: PIL 'F' images must be in \[0, 1\]"),
    ("mask-I-beyond-16-bit", "inpaint", dict(masks=[MASK, _pil(np.full((64, 64), 70000, np.int32))]), ValueError,
     r"^masks\[1\]: a PIL 'I' image is read as 16-bit"),
    ("mask-rgb", "inpaint", dict(masks=[IMG, IMG]), ValueError, r"^masks\[0\] must be single-channel.*'RGB'"),
    ("mask-uint8-array", "inpaint", dict(masks=[np.zeros((64, 64), np.uint8)] * 2), ValueError, r"^masks\[0\] must be bool"),
    ("mask-size", "inpaint", dict(masks=[MASK, MASK.resize((32, 32))]), ValueError, r"^masks\[1\] is 32x32 but images\[1\]"),
    ("masks-count", "inpaint", dict(masks=[MASK]), ValueError, r"^masks must be one per image: got 1"),
    ("paste_back-str", "inpaint", dict(paste_back="yes"), TypeError, r"^paste_back must be True or False"),
    ("blend-str", "inpaint", dict(blend="no"), TypeError, r"^blend must be True or False"),
]


@pytest.fixture
def no_job(pipe, monkeypatch):
    """The pipeline with its job runner replaced: reaching it returns "reached" instead of running anything."""
    monkeypatch.setattr(pipe, "_generate", lambda *a, **k: "reached")
    return pipe


@pytest.mark.parametrize("job, overrides, exc, pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_api_arguments_are_named(no_job, job, overrides, exc, pattern):
    with count_compiles() as compiles:
        with pytest.raises(exc, match=pattern) as info:
            getattr(no_job, job)(**{**BASE[job], **overrides})
    print(f"[api] {type(info.value).__name__}: {info.value}")
    assert compiles == []


@pytest.mark.parametrize("job, overrides", [
    ("txt2img", {}), ("img2img", {}), ("inpaint", {}),
    ("txt2img", dict(height=2056, allow_large=True)),  # allow_large lifts the size bound...
    ("txt2img", dict(prompts=["x"] * 257, seeds=0, guidance_scale=1e6, allow_large=True)),  # ...count, guidance
    ("img2img", dict(images=[Image.new("RGB", (2056, 64))] * 2, allow_large=True)),
    ("txt2img", dict(seeds=np.array(3))),  # a 0-d integer array is an int
    ("txt2img", dict(seeds=pipeline.MAX_SEED)),  # wraps: MAX_SEED, 0
    ("txt2img", dict(prompts=["a cat " * 100, "b"])),  # long prompts are truncated by the tokenizer, not refused
    ("txt2img", dict(steps=1000)),
], ids=["txt2img", "img2img", "inpaint", "allow_large-size", "allow_large-count-guidance", "allow_large-image",
        "seeds-0d-int", "seeds-wrap", "long-prompt", "steps-1000"])
@pytest.mark.filterwarnings("ignore:Prompt truncated")
def test_base_calls_reach_the_job(no_job, job, overrides):
    assert getattr(no_job, job)(**{**BASE[job], **overrides}) == "reached"


def test_seeds_wrap_modulo_2_32():
    req = pipeline.validate_request(["a", "b"], None, pipeline.MAX_SEED, 2, 7.5, 64, 64, None)
    assert req.seeds == [pipeline.MAX_SEED, 0]


def test_base_txt2img_runs(pipe):
    """The base call really generates (one compile): the refusals above are due to their bad argument."""
    g = pipe.txt2img(**BASE["txt2img"])
    assert g.pixels.shape == (2, 64, 64, 3) and np.isfinite(g.pixels).all()


@pytest.mark.parametrize("mode, full", [("I;16", 65535), ("I", 65535)])
def test_wide_masks_and_images_are_scaled(mode, full):
    values = np.zeros((64, 64), np.int64)
    values[:32] = full
    wide = _pil(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert wide.mode == mode
    np.testing.assert_array_equal(images.prepare_masks([wide], [IMG], 64, 64), images.prepare_masks([MASK], [IMG], 64, 64))
    np.testing.assert_array_equal(images.image_to_array(wide), images.image_to_array(MASK))


# ---------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files for the CLI cases (outside each test's tmp_path, which must stay unchanged)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    IMG.save(d / "in.png")
    MASK.save(d / "mask.png")
    MASK.resize((32, 32)).save(d / "small_mask.png")
    wide = np.zeros((64, 64), np.uint16)
    wide[:32] = 65535
    _pil(wide).save(d / "mask16.png")
    Image.new("RGB", (2056, 64)).save(d / "large.png")
    (d / "notes.txt").write_text("not an image")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "a_dir").mkdir()
    (d / "file").write_text("a file")
    (d / "lora.bin").write_bytes(b"pickle")
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    io.write_safetensors({"unet.nothing.here.lora_A.weight": np.zeros((2, 8), np.float32),
                          "unet.nothing.here.lora_B.weight": np.zeros((8, 2), np.float32)}, d / "nothing.safetensors")
    io.write_safetensors({f"unet.{module}.lora_A.weight": np.zeros((2, 7), np.float32),
                          f"unet.{module}.lora_B.weight": np.zeros((7, 2), np.float32)}, d / "misshaped.safetensors")
    io.write_safetensors({"unet.nothing.lora_A.weight": np.zeros((2, 8), np.float32)}, d / "ok-name.safetensors")
    return d


GEN = ["generate", "a cat", "--steps", "2", "--height", "64", "--width", "64"]
I2I = ["img2img", "a cat", "--image", "{d}/in.png", "--steps", "2"]
INP = ["inpaint", "a cat", "--image", "{d}/in.png", "--mask", "{d}/mask.png", "--steps", "2"]

# (id, argv after the command's base, exit status, the flag the one-line message names)
CLI_CASES = [
    ("height-huge", GEN + ["--height", "100000"], 2,
     "--height: must be a positive multiple of 8 in [8, 2048], got 100000; --no-limits lifts the bound"),
    ("width-huge", GEN + ["--width", "2056"], 2, "--width"),
    ("height-not-multiple", GEN + ["--height", "100"], 2, "argument --height: must be a positive multiple of 8"),
    ("height-zero", GEN + ["--height", "0"], 2, "--height"),
    ("height-text", GEN + ["--height", "tall"], 2, "--height"),
    ("steps-huge", GEN + ["--steps", "1000000000"], 2, "argument --steps: must be an integer in [1, 1000]"),
    ("steps-1001-no-limits", GEN + ["--steps", "1001", "--no-limits"], 2, "--steps"),
    ("steps-zero", GEN + ["--steps", "0"], 2, "--steps"),
    ("guidance-nan", GEN + ["--guidance-scale", "nan"], 2, "--guidance-scale"),
    ("guidance-inf", GEN + ["--guidance-scale=-inf"], 2, "--guidance-scale"),
    ("guidance-huge", GEN + ["--guidance-scale", "1000"], 2, "--guidance-scale: must be a finite number in [-100, 100]"),
    ("guidance-beyond-float32", GEN + ["--guidance-scale", "1e300", "--no-limits"], 2, "--guidance-scale"),
    ("seed-negative", GEN + ["--seed", "-1"], 2, "--seed"),
    ("seed-2**32", GEN + ["--seed", "4294967296"], 2, "--seed"),
    ("seed-float", GEN + ["--seed", "1.5"], 2, "--seed"),
    ("num-images-zero", GEN + ["--num-images", "0"], 2, "--num-images"),
    ("num-images-too-many", GEN + ["--num-images", "10001"], 2, "--num-images: must be an integer in [1, 10000]"),
    ("num-images-huge", GEN + ["--num-images", "1000000000"], 2, "--num-images"),
    ("batch-size-zero", GEN + ["--batch-size", "0"], 2, "--batch-size"),
    ("batch-size-too-big", GEN + ["--batch-size", "257"], 2, "--batch-size: must be an integer in [1, 256]"),
    ("scheduler-bogus", GEN + ["--scheduler", "bogus"], 2, "--scheduler"),
    ("dtype-bogus", GEN + ["--dtype", "float64"], 2, "--dtype"),
    ("prompt-not-utf8", ["generate", "a \udcff cat", "--steps", "2"], 2, "PROMPT"),
    ("negative-not-utf8", GEN + ["--negative-prompt", "\udcff"], 2, "--negative-prompt"),
    ("strength-1.5", I2I + ["--strength", "1.5"], 2, "--strength"),
    ("strength-nan", I2I + ["--strength", "nan"], 2, "--strength"),
    ("image-missing", ["img2img", "x", "--image", "{d}/missing.png"], 2, "--image"),
    ("image-not-an-image", ["img2img", "x", "--image", "{d}/notes.txt"], 2, "--image"),
    ("image-broken", ["img2img", "x", "--image", "{d}/broken.png"], 2, "--image"),
    ("image-directory", ["img2img", "x", "--image", "{d}/a_dir"], 2, "--image"),
    ("image-too-large", ["img2img", "x", "--image", "{d}/large.png"], 2, "--image: images must be at least 8x8 and at most"),
    ("image-height-huge", I2I + ["--height", "4096"], 2, "--height"),
    ("mask-wrong-size", ["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/small_mask.png"], 2, "--mask"),
    ("mask-rgb", ["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/in.png"], 2, "--mask"),
    ("mask-missing", ["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/nope.png"], 2, "--mask"),
    ("out-a-file", GEN + ["--out", "{t}/file"], 2, "--out"),
    ("out-under-a-file", GEN + ["--out", "{t}/file/sub/dir"], 2, "--out"),
    ("out-proc", GEN + ["--out", "/proc/sdjax-out"], 2, "--out"),
    ("cache-dir-a-file", GEN + ["--cache-dir", "{t}/file"], 2, "--cache-dir"),
    ("cache-dir-under-a-file", GEN + ["--cache-dir", "{t}/file/xla"], 2, "--cache-dir"),
    ("cache-dir-proc", GEN + ["--cache-dir", "/proc/sdjax-xla"], 2, "--cache-dir"),
    ("lora-missing", GEN + ["--lora", "{d}/missing.safetensors"], 2, "--lora"),
    ("lora-not-safetensors", GEN + ["--lora", "{d}/lora.bin"], 2, "--lora"),
    ("lora-scale-not-a-number", GEN + ["--lora", "{d}/nothing.safetensors:abc"], 2, "scale 'abc' in"),
    ("lora-scale-nan", GEN + ["--lora", "{d}/nothing.safetensors:nan"], 2, "--lora"),
    ("lora-scale-inf", GEN + ["--lora", "{d}/nothing.safetensors:-inf"], 2, "--lora"),
    ("lora-maps-to-nothing", GEN + ["--lora", "{d}/nothing.safetensors"], 2, "--lora"),
    ("lora-misshaped", GEN + ["--lora", "{d}/misshaped.safetensors:0.5"], 2, "--lora"),
    ("lora-corrupt", GEN + ["--lora", "{d}/garbage.safetensors"], 2, "--lora"),
    ("model-missing", GEN + ["--model", "{d}/no_such_model"], 1, "--model"),
    ("model-a-file", GEN + ["--model", "{d}/file"], 1, "--model"),
    ("model-empty-folder", GEN + ["--model", "{d}/a_dir"], 1, "--model"),
]


@pytest.fixture
def loads(monkeypatch):
    """Counts weight loads (checkpoint.load calls)."""
    calls = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _argv(args: list[str], d: Path, t: Path, model: Path) -> list[str]:
    argv = [a.format(d=d, t=t) for a in args]
    defaults = {"--model": str(model), "--out": str(t / "out"), "--cache-dir": "off"}
    return argv + [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)] + ["--no-progress"]


@pytest.mark.parametrize("args, status, flag", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_cli_arguments(tiny_sd_folder, inputs, tmp_path, capsys, loads, args, status, flag):
    (tmp_path / "file").write_text("a file")
    before = _tree(tmp_path)
    assert cli.main(_argv(args, inputs, tmp_path, tiny_sd_folder)) == status
    err = capsys.readouterr().err
    print(f"[cli] exit {status}: {err.strip()}")
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err, err
    assert loads == []  # no weights were read
    assert _tree(tmp_path) == before  # nothing written, no folder created
    assert not os.path.exists("/proc/sdjax-out")


class Reached(Exception):
    pass


@pytest.mark.parametrize("args", [
    GEN, I2I, INP,
    GEN + ["--height", "2056", "--no-limits"],
    GEN + ["--num-images", "10001", "--batch-size", "300", "--guidance-scale", "1000", "--no-limits"],
    ["img2img", "x", "--image", "{d}/large.png", "--no-limits"],
    ["img2img", "x", "--image", "{d}/large.png", "--height", "64", "--width", "64"],
    ["inpaint", "x", "--image", "{d}/in.png", "--mask", "{d}/mask16.png"],  # a 16-bit mask is read, scaled
    GEN + ["--out", "{t}/new/nested/out", "--cache-dir", "{t}/new/xla"],
    GEN + ["--lora", "{d}/nothing.safetensors:0.5"],  # parses; fitting the model is load_pipeline's check
], ids=["generate", "img2img", "inpaint", "no-limits-size", "no-limits-counts", "no-limits-image",
        "large-image-with-size", "mask-16-bit", "new-out-and-cache-folders", "lora-spec"])
def test_good_cli_arguments_reach_the_model(tiny_sd_folder, inputs, tmp_path, capsys, monkeypatch, args):
    """The base command lines (and lifted bounds) pass every check: the refusals above are due to their flag."""
    seen = {}

    def fake_load(model, **kw):
        seen.update(kw)
        raise Reached
    monkeypatch.setattr(pipeline, "load_pipeline", fake_load)
    before = _tree(tmp_path)
    with pytest.raises(Reached):
        cli.main(_argv(args, inputs, tmp_path, tiny_sd_folder))
    assert _tree(tmp_path) == before  # the probed --out and --cache-dir folders are gone again
    assert seen["loras"] == ([(f"{inputs}/nothing.safetensors", 0.5)] if "--lora" in args else [])


def test_bad_default_cache_dir_is_named(tiny_sd_folder, tmp_path, capsys, loads, monkeypatch):
    (tmp_path / "file").write_text("a file")
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "file"))
    before = _tree(tmp_path)
    argv = [*GEN, "--model", str(tiny_sd_folder), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--cache-dir (default: $SDJAX_CACHE_DIR" in err
    assert loads == [] and _tree(tmp_path) == before


@pytest.mark.parametrize("loras, exc, pattern", [
    (["{d}/nothing.safetensors"], ValueError, r"match no LoRA-able module"),
    ([("{d}/misshaped.safetensors", 1.0)], ValueError, r"has shape \(2, 7\)"),
    ([("{d}/nothing.safetensors", float("nan"))], ValueError, r"LoRA scale must be a finite number"),
    (["{d}/nothing.safetensors:inf"], ValueError, r"LoRA scale must be a finite number"),
    (["{d}/nothing.safetensors:abc"], ValueError, r"LoRA scale 'abc' .* is not a number"),
    (["{d}/missing.safetensors"], FileNotFoundError, r"does not exist"),
    ("{d}/nothing.safetensors", TypeError, r"loras must be a list"),
    ([("{d}/nothing.safetensors", "1")], ValueError, r"LoRA scale must be a finite number"),
], ids=["maps-to-nothing", "misshaped", "scale-nan", "spec-inf", "spec-not-a-number", "missing", "a-string",
        "scale-str"])
def test_load_pipeline_checks_loras_before_the_weights(tiny_sd_folder, inputs, loads, loras, exc, pattern):
    from sdjax.lora import LoRAError

    loras = loras.format(d=inputs) if isinstance(loras, str) else \
        [x.format(d=inputs) if isinstance(x, str) else (x[0].format(d=inputs), x[1]) for x in loras]
    with pytest.raises(exc, match=pattern) as info:
        pipeline.load_pipeline(tiny_sd_folder, compilation_cache="off", loras=loras)
    assert loads == []
    assert exc is not ValueError or isinstance(info.value, LoRAError)


def test_set_loras_refuses_a_non_finite_scale(pipe, inputs):
    from sdjax.lora import LoRAError

    with pytest.raises(LoRAError, match="finite"):
        pipe.set_loras([(inputs / "nothing.safetensors", float("inf"))])
