"""ControlNets in the sampling loop against diffusers' ControlNet pipelines (txt2img, img2img, inpaint; one and
two ControlNets; conditioning scale, guidance start/end, guess mode), no recompiles, 8 devices, input checks.

Tiny random models; the reference gets the same starting latents (`latents=`; img2img/inpaint: its first
generator draw, handed to sdjax, and the VAE posterior's mean, as in tests/test_tasks.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import controls as control_lib
from sdjax import pipeline as sdp
from sdjax.controlnet import ControlNetConfig
from sdjax.io import CheckpointError
from sdjax.unet import UNetConfig
from tests import reference as ref
from tests.reference import PROMPTS, count_compiles, torch_scheduler
from tests.test_controlnet import torch_controlnet
from tests.test_tasks import make_image, posterior_mean, square_mask, torch_noise

TOL = 2e-3  # on pixels in [0, 1], as the other end-to-end parity tests
MOVES = 10 * TOL  # what each knob must move the output by (mean absolute change)


def control_image(seed: int, size: int = 64) -> Image.Image:
    """A control-like image: white strokes (lines and a ring) on black, as a canny or scribble map."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[np.abs(a * (xx - size / 2) + b * (yy - size / 2) - rng.uniform(-8, 8)) < 1.5] = 255
    r = np.hypot(xx - rng.uniform(16, 48), yy - rng.uniform(16, 48))
    img[np.abs(r - rng.uniform(6, 14)) < 1.2] = 255
    return Image.fromarray(np.repeat(img[..., None], 3, axis=-1))


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny random ControlNets: (torch models, sdjax ControlNetModels, folders)."""
    torch_models, ours, folders = [], [], []
    for i, seed in enumerate((30, 31)):
        model = torch_controlnet(ControlNetConfig.tiny(), seed=seed)
        folder = ref.save(model, tmp_path_factory.mktemp(f"cn{i}") / f"control_tiny_{i}")
        torch_models.append(model)
        ours.append(sdjax.load_controlnet(folder))
        folders.append(folder)
    return torch_models, ours, folders


def torch_pipe(cls, base, controlnet):
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def torch_kw(scale, start, end) -> dict:
    return dict(controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end)


def test_txt2img_one_controlnet_matches_diffusers(pipe, tiny_torch_pipe, nets):
    """Defaults, conditioning scale, start/end on exact step boundaries and guess mode, each against the
    reference, and each moving the image."""
    torch_models, (cn, _), _ = nets
    theirs = torch_pipe(diffusers.StableDiffusionControlNetPipeline, tiny_torch_pipe, torch_models[0])
    images = [control_image(1), control_image(2)]
    latents = np.random.default_rng(7).standard_normal((2, 8, 8, 4)).astype(np.float32)
    cases = {
        "default": (dict(), False, "pndm"),
        "scale": (dict(scale=0.4), False, "pndm"),
        # DDIM with 8 steps: 8 calls, so start 0.25 / end 0.75 fall exactly on step boundaries (j/n == start)
        "start_end": (dict(start=0.25, end=0.75), False, "ddim"),
        "guess": (dict(), True, "pndm"),
        "guess_scale_end": (dict(scale=1.5, end=0.5), True, "euler"),
    }
    got = {}
    for name, (kw, guess, scheduler) in cases.items():
        theirs.scheduler = torch_scheduler(scheduler)
        out = pipe.txt2img(PROMPTS, steps=8, latents=latents, scheduler=scheduler, guess_mode=guess,
                           controls=[sdjax.Control(cn, images, **kw)], progress=False)
        want = theirs(PROMPTS, image=images, num_inference_steps=8, latents=ref.nchw(latents), guess_mode=guess,
                      output_type="np", **torch_kw(kw.get("scale", 1.0), kw.get("start", 0.0),
                                                   kw.get("end", 1.0))).images
        err = ref.max_err(out.pixels, want)
        print(f"[controlnet txt2img] {name}: max abs err {err:.3g}")
        assert err <= TOL, name
        assert out.settings["controls"] == [{"model": "control_tiny_0", "scale": kw.get("scale", 1.0),
                                             "start": kw.get("start", 0.0), "end": kw.get("end", 1.0)}]
        assert out.settings["guess_mode"] is guess
        got[name] = out.pixels
    plain = pipe.txt2img(PROMPTS, steps=8, latents=latents, height=64, width=64, progress=False).pixels
    moved = {"control": np.abs(got["default"] - plain).mean(),
             "scale": np.abs(got["scale"] - got["default"]).mean(),
             "guess": np.abs(got["guess"] - got["default"]).mean()}
    ddim_full = pipe.txt2img(PROMPTS, steps=8, latents=latents, scheduler="ddim", progress=False,
                             controls=[sdjax.Control(cn, images)]).pixels
    moved["start_end"] = np.abs(got["start_end"] - ddim_full).mean()
    other_images = pipe.txt2img(PROMPTS, steps=8, latents=latents, progress=False,
                                controls=[sdjax.Control(cn, images[::-1])]).pixels
    moved["images"] = np.abs(other_images - got["default"]).mean()
    print(f"[controlnet txt2img] mean change: {moved}")
    assert all(v > MOVES for v in moved.values()), moved


def test_txt2img_two_controlnets_match_diffusers(pipe, tiny_torch_pipe, nets):
    torch_models, (cn0, cn1), _ = nets
    theirs = torch_pipe(diffusers.StableDiffusionControlNetPipeline, tiny_torch_pipe, list(torch_models))
    theirs.scheduler = torch_scheduler("pndm")
    images0, images1 = [control_image(3), control_image(4)], [control_image(5), control_image(6)]
    latents = np.random.default_rng(8).standard_normal((2, 8, 8, 4)).astype(np.float32)
    got = {}
    for guess in (False, True):
        out = pipe.txt2img(PROMPTS, steps=6, latents=latents, guess_mode=guess, progress=False, controls=[
            sdjax.Control(cn0, images0, scale=0.8), sdjax.Control(cn1, images1, scale=1.3, start=0.2, end=0.8)])
        # diffusers takes nested image lists per prompt ([[prompt 0's image for each ControlNet], ...])
        per_prompt = [list(t) for t in zip(images0, images1, strict=True)]
        want = theirs(PROMPTS, image=per_prompt, num_inference_steps=6, latents=ref.nchw(latents),
                      guess_mode=guess, output_type="np", **torch_kw([0.8, 1.3], [0.0, 0.2], [1.0, 0.8])).images
        err = ref.max_err(out.pixels, want)
        print(f"[controlnet txt2img x2] guess={guess}: max abs err {err:.3g}")
        assert err <= TOL
        got[guess] = out.pixels
    only_first = pipe.txt2img(PROMPTS, steps=6, latents=latents, progress=False,
                              controls=[sdjax.Control(cn0, images0, scale=0.8)]).pixels
    assert np.abs(got[False] - only_first).mean() > MOVES  # the second ControlNet counts
    assert np.abs(got[True] - got[False]).mean() > MOVES


def test_img2img_controlnet_matches_diffusers(pipe, tiny_torch_pipe, nets):
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

    torch_models, (cn, _), _ = nets
    theirs = torch_pipe(diffusers.StableDiffusionControlNetImg2ImgPipeline, tiny_torch_pipe, torch_models[0])
    theirs.scheduler = torch_scheduler("ddim")
    images, controls = [make_image(1), make_image(2)], [control_image(7), control_image(8)]
    got = {}
    # strength 0.75 of 10 steps runs 7 calls: start/end count those (diffusers' trimmed timesteps)
    for name, (strength, kw) in {"full": (0.75, {}), "window": (0.75, dict(start=0.3, end=0.7, scale=1.2)),
                                 "strength": (0.5, {})}.items():
        g, noise = torch_noise(100, 2)
        out = pipe.img2img(images, PROMPTS, strength, steps=10, scheduler="ddim", latents=noise, progress=False,
                           controls=[sdjax.Control(cn, controls, **kw)])
        with posterior_mean(module):
            want = theirs(PROMPTS, image=images, control_image=controls, strength=strength, num_inference_steps=10,
                          generator=g, output_type="np", **torch_kw(kw.get("scale", 1.0), kw.get("start", 0.0),
                                                                    kw.get("end", 1.0))).images
        err = ref.max_err(out.pixels, want)
        print(f"[controlnet img2img] {name}: max abs err {err:.3g}")
        assert err <= TOL, name
        got[name] = out.pixels
    _, noise = torch_noise(100, 2)
    plain = pipe.img2img(images, PROMPTS, 0.75, steps=10, scheduler="ddim", latents=noise, progress=False).pixels
    assert np.abs(got["full"] - plain).mean() > MOVES
    assert np.abs(got["window"] - got["full"]).mean() > MOVES


@pytest.fixture(scope="module")
def inpaint_pair(tmp_path_factory):
    """A tiny 9-channel inpainting model: (sdjax pipeline, torch base pipeline)."""
    torch_base = ref.tiny_pipeline(seed=5, unet_config=UNetConfig.tiny(in_channels=9))
    folder = tmp_path_factory.mktemp("inpaint_cn") / "model"
    torch_base.save_pretrained(folder, safe_serialization=True)
    return sdp.load_pipeline(folder, compilation_cache="off"), torch_base


@pytest.mark.parametrize("model", ["blend", "dedicated"])
def test_inpaint_controlnet_matches_diffusers(model, pipe, tiny_torch_pipe, inpaint_pair, nets):
    """The 4-channel model (mask blending) and the 9-channel one, as StableDiffusionControlNetInpaintPipeline
    (masks on 8-pixel cells: its nearest-neighbour mask downscale and sdjax's area mean agree there)."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as module

    ours, base = (pipe, tiny_torch_pipe) if model == "blend" else inpaint_pair
    torch_models, (cn, _), _ = nets
    theirs = torch_pipe(diffusers.StableDiffusionControlNetInpaintPipeline, base, torch_models[0])
    theirs.scheduler = torch_scheduler("ddim")
    images, masks = [make_image(3), make_image(4)], [square_mask(), square_mask(lo=8, hi=40)]
    controls = [control_image(9), control_image(10)]
    got = {}
    for strength, kw in ((1.0, {}), (0.8, dict(scale=0.7, end=0.6))):
        g, noise = torch_noise(7, 2)
        out = ours.inpaint(images, masks, PROMPTS, strength, steps=8, scheduler="ddim", latents=noise,
                           progress=False, controls=[sdjax.Control(cn, controls, **kw)])
        with posterior_mean(module):
            want = theirs(PROMPTS, image=images, mask_image=masks, control_image=controls, strength=strength,
                          num_inference_steps=8, generator=g, height=64, width=64, output_type="np",
                          **torch_kw(kw.get("scale", 1.0), kw.get("start", 0.0), kw.get("end", 1.0))).images
        err = ref.max_err(out.pixels, want)
        print(f"[controlnet inpaint {model}] strength={strength} {kw}: max abs err {err:.3g}")
        assert err <= TOL
        got[strength] = out.pixels
    _, noise = torch_noise(7, 2)
    plain = ours.inpaint(images, masks, PROMPTS, 1.0, steps=8, scheduler="ddim", latents=noise, progress=False)
    assert np.abs(got[1.0] - plain.pixels).mean() > MOVES


def test_scales_start_end_and_images_do_not_recompile(pipe, nets):
    _, (cn0, cn1), _ = nets
    images = [control_image(11), control_image(12)]
    kw = dict(steps=5, seeds=[1, 2], scheduler="ddim", progress=False)
    first = pipe.txt2img(PROMPTS, controls=[sdjax.Control(cn0, images), sdjax.Control(cn1, images)], **kw)
    with count_compiles() as compiles:
        other = pipe.txt2img(PROMPTS[::-1], controls=[sdjax.Control(cn0, images[::-1], scale=0.3, start=0.4),
                                                      sdjax.Control(cn1, images, scale=2.0, end=0.2)], **kw)
        again = pipe.txt2img(PROMPTS, controls=[sdjax.Control(cn0, images), sdjax.Control(cn1, images)], **kw)
    assert compiles == []
    assert np.abs(other.pixels - first.pixels).mean() > MOVES
    assert np.array_equal(again.pixels, first.pixels)


def test_output_size_follows_the_control_image(pipe, nets):
    _, (cn, _), _ = nets
    wide = control_image(13, size=80).crop((0, 0, 80, 60))  # 80x60 -> 80x56 (multiples of 8)
    out = pipe.txt2img(PROMPTS[0], steps=2, seeds=[1], progress=False, controls=[sdjax.Control(cn, wide)])
    assert out.pixels.shape == (1, 56, 80, 3)
    sized = pipe.txt2img(PROMPTS[0], steps=2, seeds=[1], height=64, width=64, progress=False,
                         controls=[sdjax.Control(cn, wide)])  # given sizes win; the control image is fitted
    assert sized.pixels.shape == (1, 64, 64, 3)


EIGHT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    import sdjax

    folder, cn_folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    prompts = ["a red cube", "a blue sphere", "a green cone", "a lighthouse", "a fox"]
    controls = list(rng.integers(0, 2, (5, 64, 64, 1)).repeat(3, -1).astype(np.uint8) * 255)
    images = list(rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8))
    cn = sdjax.load_controlnet(cn_folder)
    kw = dict(steps=3, seeds=[5, 6, 7, 8, 9], scheduler="euler_a", progress=False)
    res = {}
    for name, devices in (("eight", None), ("one", jax.devices()[:1])):
        p = sdjax.load_pipeline(folder, devices=devices, compilation_cache="off")
        control = [sdjax.Control(cn, controls, scale=0.9, end=0.7)]
        res[name] = p.txt2img(prompts, controls=control, **kw).pixels
        res[name + "_i2i"] = p.img2img(images, prompts, 0.6, controls=control, guess_mode=True, **kw).pixels
    np.savez(out, **res)
""")


def test_eight_devices_give_the_images_of_one(tiny_sd_folder, nets, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", EIGHT, str(tiny_sd_folder), str(nets[2][0]), str(out)], env=env,
                   check=True, timeout=600)
    r = np.load(out)
    for task in ("", "_i2i"):
        assert r["eight" + task].shape == (5, 64, 64, 3)
        # float rounding only: far below one 8-bit level (3.9e-3)
        assert np.max(np.abs(r["eight" + task] - r["one" + task])) <= 1e-4
        assert np.abs(r["eight" + task][0] - r["eight" + task][1]).mean() > 0.01


def test_keep_table_counts_the_calls_that_run():
    # 10 calls from call 0: start 0.2 skips calls 0-1, end 0.5 stops after call 4
    assert control_lib.keep_table(0.2, 0.5, 0, 10).tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    # img2img from call 6 of 10: 4 calls run, fractions count those
    assert control_lib.keep_table(0.25, 0.75, 6, 10).tolist() == [0] * 6 + [0, 1, 1, 0]
    assert control_lib.keep_table(0.0, 1.0, 3, 5).tolist() == [0, 0, 0, 1, 1]


def bad_cases(cn, cn_other):
    ok = [control_image(1), control_image(2)]
    return [
        (dict(controls=cn), TypeError, r"controls must be a list of sdjax.Control"),
        (dict(controls=[ok]), TypeError, r"controls\[0\] must be an sdjax.Control"),
        (dict(controls=[sdjax.Control("path/to/cn", ok)]), TypeError, r"controls\[0\].controlnet must be a ControlNet"),
        (dict(controls=[sdjax.Control(cn, ok, scale=float("nan"))]), ValueError,
         r"controls\[0\].scale must be a finite number, got nan"),
        (dict(controls=[sdjax.Control(cn, ok, scale="1")]), TypeError, r"controls\[0\].scale must be a number"),
        (dict(controls=[sdjax.Control(cn, ok, start=0.6, end=0.4)]), ValueError, r"controls\[0\]: start and end"),
        (dict(controls=[sdjax.Control(cn, ok, end=1.5)]), ValueError, r"0 <= start < end <= 1"),
        (dict(controls=[sdjax.Control(cn, ok * 2)]), ValueError, r"controls\[0\].images must be one image per "
                                                                 r"prompt \(2\) or one for all, got 4"),
        (dict(controls=[sdjax.Control(cn, None)]), TypeError, r"controls\[0\].images must be a PIL image"),
        (dict(controls=[sdjax.Control(cn, [np.zeros((64, 64, 4), np.uint8)] * 2)]), ValueError,
         r"controls\[0\].images\[0\]: each image must be \[H, W, 3\]"),
        (dict(controls=[sdjax.Control(cn, [np.full((64, 64, 3), 2.0)] * 2)]), ValueError,
         r"controls\[0\].images\[0\]: float images must be in \[0, 1\]"),
        (dict(controls=[sdjax.Control(cn, [np.zeros((4, 64, 3), np.uint8)] * 2)]), ValueError, r"at least 8x8"),
        (dict(controls=[sdjax.Control(cn, ok), sdjax.Control(cn_other, ok)]), CheckpointError,
         r"controlnet config field 'cross_attention_dim' = 48 does not match"),
        (dict(guess_mode=True), ValueError, r"guess_mode=True needs at least one ControlNet"),
        (dict(guess_mode=1, controls=[sdjax.Control(cn, ok)]), TypeError, r"guess_mode must be True or False"),
        (dict(controls=[sdjax.Control(cn, ok)] * 9), ValueError, r"at most 8 ControlNets"),
    ]


def test_bad_controls_are_refused_before_any_work(pipe, nets, tmp_path):
    _, (cn, _), _ = nets
    cfg = ControlNetConfig.tiny(cross_attention_dim=48)  # made for another base model
    folder = ref.save(torch_controlnet(cfg, seed=3), tmp_path / "sd2_like")
    cn_other = sdjax.load_controlnet(folder)
    cases = bad_cases(cn, cn_other)
    with count_compiles() as compiles:
        for kwargs, error, pattern in cases:
            with pytest.raises(error, match=pattern):
                pipe.txt2img(PROMPTS, steps=2, seeds=[1, 2], height=64, width=64, progress=False, **kwargs)
        with pytest.raises(CheckpointError, match=r"sd2_like.*cross_attention_dim"):
            pipe.img2img([make_image(1)] * 2, PROMPTS, controls=[sdjax.Control(cn_other, control_image(1))])
        with pytest.raises(TypeError, match=r"controls\[0\].images"):
            pipe.inpaint([make_image(1)] * 2, [square_mask()] * 2, PROMPTS, controls=[sdjax.Control(cn, "x.png")])
    assert compiles == []
    # the same calls with good controls get through (the checks are not simply refusing everything)
    pipe.txt2img(PROMPTS, steps=2, seeds=[1, 2], progress=False, controls=[sdjax.Control(cn, control_image(1))])


def test_canny_preprocessor():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 200  # one vertical step edge at x = 32
    edges = np.asarray(control_lib.canny(img))
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) <= {0, 255}
    cols = np.nonzero(edges[..., 0].any(axis=0))[0]
    assert set(cols) <= {31, 32} and len(cols) >= 1  # the edge, and nothing else
    assert edges[..., 0].sum(axis=0)[cols].max() >= 60 * 255  # a full-height line
    # thresholds matter: a weak edge shows with low thresholds only
    weak = np.zeros((64, 64, 3), np.uint8)
    weak[:, 32:] = 30
    assert np.asarray(control_lib.canny(weak, 10, 20)).any()
    assert not np.asarray(control_lib.canny(weak, 200, 400)).any()
    assert np.array_equal(np.asarray(control_lib.preprocess("canny", Image.fromarray(img))), edges)
    for low, high in ((200, 100), (-1, 10), (1.5, 10)):
        with pytest.raises(ValueError, match="canny thresholds"):
            control_lib.canny(img, low, high)
    with pytest.raises(ValueError, match="'sobel' is not one of none, canny"):
        control_lib.preprocess("sobel", img)


def test_controlnet_params_follow_the_pipeline_dtype(pipe, nets):
    """A float32 ControlNet in a bfloat16 pipeline runs in bfloat16 (its params cast once, per pipeline view)."""
    import jax
    import jax.numpy as jnp

    _, (cn, _), _ = nets
    images = [control_image(14), control_image(15)]
    kw = dict(steps=3, seeds=[1, 2], scheduler="ddim", progress=False)
    full = pipe.txt2img(PROMPTS, controls=[sdjax.Control(cn, images)], **kw)
    half = pipe.astype("bfloat16")
    low = half.txt2img(PROMPTS, controls=[sdjax.Control(cn, images)], **kw)
    (_, placed), = half._control_params.values()
    assert {a.dtype for a in jax.tree.leaves(placed)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(cn.params)} == {jnp.dtype(jnp.float32)}  # the model is untouched
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(next(iter(pipe._control_params.values()))[1]))
    assert 0 < np.abs(low.pixels - full.pixels).mean() < 0.05  # bf16 rounding, not another image
