"""img2img and inpainting against diffusers' pipelines; mask blending; strength; seeds; input checks.

sdjax encodes images with the VAE posterior's mean, so the reference pipelines are run with their
`retrieve_latents` patched to the mean as well ("argmax" mode); their starting noise is drawn from a seeded
torch generator, and the same draw is handed to sdjax as `latents`.
"""

from __future__ import annotations

import contextlib

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax import pipeline as sdp
from sdjax.unet import UNetConfig
from tests import reference as ref
from tests.reference import PROMPTS, count_compiles, torch_scheduler

TOL = 2e-3


def make_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth coloured test image (gradients and a disc) with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy + seed)], -1)
    img[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05] = rng.uniform(size=3)
    img = np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def square_mask(size: int = 64, lo: int = 16, hi: int = 48, value: int = 255) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = value
    return Image.fromarray(m, mode="L")


@contextlib.contextmanager
def posterior_mean(module):
    """Makes a diffusers pipeline module encode images with the posterior mean, as sdjax does."""
    original = module.retrieve_latents
    module.retrieve_latents = lambda out, generator=None, sample_mode="sample": original(out, sample_mode="argmax")
    try:
        yield
    finally:
        module.retrieve_latents = original


def torch_noise(seed: int, b: int, size: int = 64) -> tuple[torch.Generator, np.ndarray]:
    """The first draw the reference makes from generator(seed), as NHWC numpy for sdjax's `latents`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((b, 4, size // 8, size // 8), generator=g)
    return torch.Generator().manual_seed(seed), ref.nhwc(noise)


@pytest.fixture(scope="module")
def torch_img2img(tiny_torch_pipe):
    return diffusers.StableDiffusionImg2ImgPipeline(**tiny_torch_pipe.components)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler"])
def test_img2img_matches_diffusers(scheduler, pipe, torch_img2img):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    torch_img2img.scheduler = torch_scheduler(scheduler)
    torch_img2img.set_progress_bar_config(disable=True)
    images = [make_image(1), make_image(2)]
    outs = {}
    for strength in (0.3, 0.75, 1.0):
        g, noise = torch_noise(100, 2)
        got = pipe.img2img(images, PROMPTS, strength, steps=10, scheduler=scheduler, latents=noise, progress=False)
        with posterior_mean(module):
            want = torch_img2img(PROMPTS, image=images, strength=strength, num_inference_steps=10,
                                 generator=g, output_type="np").images
        err = ref.max_err(got.pixels, want)
        print(f"[img2img] {scheduler} strength={strength}: max abs err {err:.3g}")
        assert err <= TOL
        outs[strength] = got.pixels
    # Strength and the prompt both visibly change the result.
    assert np.abs(outs[0.75] - outs[0.3]).mean() > 10 * TOL
    g, noise = torch_noise(100, 2)
    swapped = pipe.img2img(images, PROMPTS[::-1], 0.75, steps=10, scheduler=scheduler, latents=noise,
                           progress=False)
    assert np.abs(swapped.pixels - outs[0.75]).mean() > 10 * TOL


@pytest.fixture(scope="module")
def inpaint_pair(tmp_path_factory):
    torch_pipe = ref.tiny_pipeline(seed=5, unet_config=UNetConfig.tiny(in_channels=9))
    folder = tmp_path_factory.mktemp("inpaint") / "model"
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    torch_inpaint = diffusers.StableDiffusionInpaintPipeline(**torch_pipe.components)
    torch_inpaint.set_progress_bar_config(disable=True)
    return sdp.load_pipeline(folder, compilation_cache="off"), torch_inpaint


@pytest.mark.parametrize("scheduler,strength", [("pndm", 1.0), ("ddim", 1.0), ("euler", 0.75), ("ddim", 0.6)])
def test_inpaint_dedicated_model_matches_diffusers(scheduler, strength, inpaint_pair):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    ours, theirs = inpaint_pair
    theirs.scheduler = torch_scheduler(scheduler)
    images = [make_image(3), make_image(4)]
    masks = [square_mask(), square_mask(lo=8, hi=40)]
    g, noise = torch_noise(7, 2)
    got = ours.inpaint(images, masks, PROMPTS, strength, steps=10, scheduler=scheduler, latents=noise,
                       progress=False)
    with posterior_mean(module):
        want = theirs(PROMPTS, image=images, mask_image=masks, strength=strength, num_inference_steps=10,
                      generator=g, height=64, width=64, output_type="np").images
    err = ref.max_err(got.pixels, want)
    print(f"[inpaint 9ch] {scheduler} strength={strength}: max abs err {err:.3g}")
    assert err <= TOL
    other = ours.inpaint(images, [square_mask(lo=0, hi=8)] * 2, PROMPTS, strength, steps=10, scheduler=scheduler,
                         latents=noise, progress=False)
    assert np.abs(other.pixels - got.pixels).mean() > 10 * TOL  # the mask reaches the model


def test_mask_blending_keeps_the_unmasked_region(pipe):
    """Outside a binary mask the result differs from the input no more than the VAE round trip does."""
    import jax

    from sdjax import sampling

    images = [make_image(5), make_image(6)]
    masks = [square_mask(), square_mask()]
    inp = np.stack([np.asarray(i, np.float32) / 255 for i in images])
    keep = np.asarray(masks[0]) == 0
    got = pipe.inpaint(images, masks, PROMPTS, steps=8, scheduler="ddim", seeds=[1, 2], progress=False)
    z = sampling.encode_image(pipe.models, pipe.params, inp)
    round_trip = np.asarray(jax.jit(lambda p, z: sampling.decode(pipe.models, p, z))(pipe.params, z))
    vae_err = np.abs(round_trip - inp)[:, keep].mean()
    out_err = np.abs(got.pixels - inp)[:, keep].mean()
    inside = np.abs(got.pixels - inp)[:, ~keep].mean()
    print(f"[blend] unmasked: output err {out_err:.4f}, VAE round trip err {vae_err:.4f}; masked change {inside:.4f}")
    assert out_err <= vae_err * 1.05 + 1e-3
    # In latent space the blend is exact: kept cells end as the image's latents, masked cells were repainted.
    # (Pixels can't show it as sharply: the random tiny decoder mixes every latent into every pixel.)
    kept_cells = np.ones((8, 8), bool)
    kept_cells[2:6, 2:6] = False
    z = np.asarray(z)
    assert np.abs(got.latents - z)[:, kept_cells].max() <= 1e-5
    assert np.abs(got.latents - z)[:, ~kept_cells].mean() > 0.1
    pasted = pipe.inpaint(images, masks, PROMPTS, steps=8, scheduler="ddim", seeds=[1, 2], paste_back=True,
                          progress=False)
    assert np.array_equal(np.asarray(pasted.images[0])[keep], np.asarray(images[0])[keep])
    assert np.array_equal(pasted.pixels[:, ~keep], got.pixels[:, ~keep])


def test_soft_masks_are_honoured(pipe):
    images = [make_image(7)]
    grey = pipe.inpaint(images, [square_mask(value=128)], PROMPTS[0], steps=6, seeds=[3], scheduler="ddim",
                        paste_back=True, progress=False)
    full = pipe.inpaint(images, [square_mask()], PROMPTS[0], steps=6, seeds=[3], scheduler="ddim",
                        paste_back=True, progress=False)
    inp = np.asarray(images[0], np.float32) / 255
    region = np.asarray(square_mask()) > 0
    change_grey = np.abs(grey.pixels[0] - inp)[region].mean()
    change_full = np.abs(full.pixels[0] - inp)[region].mean()
    assert 0.2 * change_full < change_grey < 0.8 * change_full  # half a mask: part way, not binarised


def test_strength_zero_returns_input_and_strength_does_not_recompile(pipe):
    images = [make_image(8), make_image(9)]
    same = pipe.img2img(images, PROMPTS, 0.0, steps=5, progress=False)
    for img, out in zip(images, same.images):
        assert np.array_equal(np.asarray(img), np.asarray(out))
    pipe.img2img(images, PROMPTS, 0.5, steps=5, scheduler="ddim", seeds=[1, 2], progress=False)
    pipe.inpaint(images, [square_mask()] * 2, PROMPTS, 0.5, steps=5, scheduler="ddim", seeds=[1, 2], progress=False)
    with count_compiles() as compiles:
        a = pipe.img2img(images, PROMPTS, 0.3, steps=5, scheduler="ddim", seeds=[3, 4], guidance_scale=6.0,
                         progress=False)
        b = pipe.img2img([make_image(10), make_image(11)], PROMPTS, 0.9, steps=5, scheduler="ddim", seeds=[3, 4],
                         progress=False)
        pipe.inpaint(images, [square_mask(lo=0, hi=32)] * 2, PROMPTS, 1.0, steps=5, scheduler="ddim", seeds=[5, 6],
                     progress=False)
    assert compiles == []
    assert np.abs(a.pixels - b.pixels).mean() > 10 * TOL


def test_img2img_and_inpaint_depend_only_on_their_own_seed(pipe):
    images = [make_image(i) for i in range(12, 15)]
    prompts = ["a red cube", "a lighthouse", "a fox"]
    masks = [square_mask(lo=8 * i, hi=8 * i + 24) for i in range(3)]
    kw = dict(steps=4, scheduler="euler_a", progress=False)
    batch = pipe.img2img(images, prompts, 0.7, seeds=[1, 2, 3], **kw)
    batch_in = pipe.inpaint(images, masks, prompts, seeds=[1, 2, 3], **kw)
    for i in range(3):
        alone = pipe.img2img(images[i], prompts[i], 0.7, seeds=[i + 1], **kw)
        assert ref.max_err(alone.pixels[0], batch.pixels[i]) <= 1e-4  # float rounding only
        alone = pipe.inpaint(images[i], masks[i], prompts[i], seeds=[i + 1], **kw)
        assert ref.max_err(alone.pixels[0], batch_in.pixels[i]) <= 1e-4


@pytest.mark.parametrize("call,pattern", [
    (lambda p: p.img2img([make_image(1)], "x", 1.5), r"strength must be a number in \[0, 1\], got 1.5"),
    (lambda p: p.img2img([make_image(1)], "x", -0.1), r"strength must be a number in \[0, 1\]"),
    (lambda p: p.inpaint([make_image(1)], [square_mask(32)], "x"), r"masks\[0\] is 32x32 but images\[0\] is 64x64"),
    (lambda p: p.inpaint([make_image(1)], [make_image(2)], "x"), r"masks must be single-channel.*'RGB'"),
    (lambda p: p.inpaint([make_image(1)], [np.zeros((64, 64), np.uint8)], "x"), r"masks must be bool or float"),
    (lambda p: p.inpaint([make_image(1)], [np.full((64, 64), 2.0)], "x"), r"float masks must be in \[0, 1\]"),
    (lambda p: p.inpaint([make_image(1)], [square_mask()] * 2, "x"), r"masks must be one per image: got 2"),
    (lambda p: p.img2img([make_image(1)] * 2, ["x"] * 3), r"images must be one per prompt: got 2 for 3"),
    (lambda p: p.inpaint([make_image(1)], [square_mask()], "x", blend=False), r"blend=False does not fit"),
    (lambda p: p.img2img([np.zeros((4, 4, 3), np.uint8)], "x"), r"at least 8x8"),
])
def test_bad_inputs_are_named(pipe, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(pipe)


def test_size_rules(pipe):
    wide = make_image(1, size=96).crop((0, 10, 96, 80))  # 96x70
    out = pipe.img2img(wide, "x", 0.5, steps=2, progress=False)
    assert out.images[0].size == (96, 64)  # rounded down to multiples of 8, center-cropped
    out = pipe.inpaint(wide, wide.convert("L"), "x", steps=2, height=48, width=48, progress=False)
    assert out.images[0].size == (48, 48)
