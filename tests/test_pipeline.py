"""txt2img end to end against diffusers' StableDiffusionPipeline; seeds; recompilation; input validation."""

from __future__ import annotations

import numpy as np
import pytest

from tests import reference as ref
from tests.reference import PROMPTS, count_compiles, torch_scheduler

TOL = 2e-3  # decoded pixels in [0, 1]
NEGATIVE = ["blurry, low quality", "text, watermark"]
SCHEDULERS = ["pndm", "ddim", "euler", "dpmpp_2m_karras"]  # diffusers' references: tests.reference.TORCH_SCHEDULERS


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_txt2img_matches_diffusers(scheduler, pipe, tiny_torch_pipe):
    torch_pipe = tiny_torch_pipe
    torch_pipe.scheduler = torch_scheduler(scheduler)
    latents = np.random.default_rng(7).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = {}
    for negative in (None, NEGATIVE):
        got = pipe.txt2img(PROMPTS, negative, steps=12, guidance_scale=7.5, height=64, width=64,
                           scheduler=scheduler, latents=latents, progress=False)
        want = torch_pipe(PROMPTS, negative_prompt=negative, num_inference_steps=12, guidance_scale=7.5,
                          height=64, width=64, latents=ref.nchw(latents), output_type="np").images
        err = ref.max_err(got.pixels, want)
        print(f"[e2e] {scheduler} negative={negative is not None}: max abs err {err:.3g}")
        assert err <= TOL
        ours[negative is None] = got.pixels
    # The tiny model's images visibly depend on the prompt and the negative prompt (same starting latents).
    assert np.abs(ours[True][0] - ours[True][1]).mean() > 25 * TOL
    assert np.abs(ours[True] - ours[False]).mean() > 5 * TOL


def test_no_guidance_runs_conditional_only(pipe, tiny_torch_pipe):
    tiny_torch_pipe.scheduler = torch_scheduler("ddim")
    latents = np.random.default_rng(8).standard_normal((1, 8, 8, 4)).astype(np.float32)
    got = pipe.txt2img(PROMPTS[:1], steps=5, guidance_scale=1.0, height=64, width=64, scheduler="ddim",
                       latents=latents, progress=False)
    want = tiny_torch_pipe(PROMPTS[:1], num_inference_steps=5, guidance_scale=1.0, height=64, width=64,
                           latents=ref.nchw(latents), output_type="np").images
    assert ref.max_err(got.pixels, want) <= TOL


def test_image_depends_only_on_its_own_seed(pipe):
    prompts = PROMPTS + ["a red cube", "an old lighthouse at dusk"]
    seeds = [11, 22, 33, 44]
    batch = pipe.txt2img(prompts, steps=4, height=64, width=64, seeds=seeds, scheduler="euler_a", progress=False)
    for i in range(4):
        alone = pipe.txt2img(prompts[i], steps=4, height=64, width=64, seeds=[seeds[i]], scheduler="euler_a",
                             progress=False)
        assert ref.max_err(alone.pixels[0], batch.pixels[i]) <= 1e-4  # float rounding only
    assert np.abs(batch.pixels[0] - batch.pixels[1]).mean() > 25 * TOL
    again = pipe.txt2img(prompts[0], steps=4, height=64, width=64, seeds=[seeds[1]], scheduler="euler_a",
                         progress=False)
    assert np.abs(again.pixels[0] - batch.pixels[0]).mean() > 25 * TOL  # the seed matters too


def test_prompt_seed_and_guidance_changes_do_not_recompile(pipe):
    kw = dict(steps=3, height=64, width=64, scheduler="ddim", progress=False)
    pipe.txt2img(["one prompt", "another"], seeds=[1, 2], guidance_scale=7.5, **kw)
    jitted = pipe._jitted("txt2img")
    size = jitted._cache_size()
    with count_compiles() as compiles:
        a = pipe.txt2img(["a different prompt", "and more"], ["neg", ""], seeds=[3, 4], guidance_scale=5.0, **kw)
        b = pipe.txt2img(["a different prompt", "and more"], ["neg", ""], seeds=[5, 6], guidance_scale=9.0, **kw)
    assert compiles == [] and jitted._cache_size() == size
    assert np.abs(a.pixels - b.pixels).mean() > TOL
    with count_compiles() as compiles:  # a shape change does compile: the counter works
        pipe.txt2img(["one prompt", "another"], seeds=[1, 2], **{**kw, "steps": 4})
    assert compiles


def test_new_shapes_compile_ahead_once_and_return_the_compilers_memory(pipe, monkeypatch):
    """A call with new shapes compiles its job ahead (`Pipeline._compile`), hands malloc's free memory back after
    it, and the call reuses that executable: as many compilations as without the ahead step. A repeated call
    does neither."""
    from sdjax import pipeline as sdp
    from sdjax import process

    kw = dict(steps=2, width=64, scheduler="ddim", progress=False, seeds=1)
    pipe.txt2img("a cube", height=64, **kw)  # the pipeline's other first-time compilations
    released = []
    monkeypatch.setattr(process, "release_free_heap", lambda: released.append(1) or True)
    with count_compiles() as ahead:
        first = pipe.txt2img("a cube", height=72, **kw)
    assert released == [1]
    with count_compiles() as again:
        second = pipe.txt2img("a cube", height=72, **kw)
    assert again == [] and released == [1] and np.array_equal(first.pixels, second.pixels)
    monkeypatch.setattr(sdp.Pipeline, "_compile", lambda self, fn, args, options: None)
    with count_compiles() as plain:
        pipe.txt2img("a cube", height=80, **kw)  # new shapes, compiled by the call alone
    assert len(ahead) == len(plain) > 0 and released == [1]


def test_optimization_effort_reaches_each_job(tiny_sd_folder, pipe, monkeypatch):
    """load_pipeline(optimization_effort=) is checked first and compiles every job with it; on CPU it leaves
    the images as they were."""
    from sdjax import parallel
    from sdjax import pipeline as sdp

    with pytest.raises(ValueError, match=r"optimization_effort must be a number in \[-1, 1\] .*, got 3$"):
        sdp.load_pipeline("no/such/model", optimization_effort=3)  # before the model is looked for
    fast = sdp.load_pipeline(tiny_sd_folder, compilation_cache="off", optimization_effort=-0.5)
    assert fast.optimization_effort == -0.5 and pipe.optimization_effort == 0.0
    seen, real = [], parallel.compiler_options
    monkeypatch.setattr(parallel, "compiler_options",
                        lambda mesh, effort=0.0: seen.append(effort) or real(mesh, effort))
    kw = dict(steps=3, height=64, width=64, scheduler="ddim", seeds=[5], progress=False)
    got = fast.txt2img("a red cube", **kw).pixels
    assert seen == [-0.5]
    want = pipe.txt2img("a red cube", **kw).pixels
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(height=100), r"height must be a positive multiple of 8, got 100"),
    (dict(width=0), r"width must be a positive multiple of 8"),
    (dict(steps=0), r"steps must be an integer >= 1"),
    (dict(scheduler="heun"), r"scheduler='heun' is not known; choose one of pndm, ddim"),
    (dict(negative_prompts=["a", "b", "c"]), r"negative_prompts must be a string or a list of 2 strings"),
    (dict(seeds=[1]), r"seeds must be an int or a list of 2 ints"),
    (dict(seeds=[1, -1]), r"seeds must be integers in \[0, 4294967295\], got -1"),
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number"),
    (dict(latents=np.zeros((2, 4, 4, 4))), r"latents must have shape \[2, 8, 8, 4\]"),
])
def test_bad_arguments_are_named(pipe, kwargs, pattern):
    args = dict(height=64, width=64, steps=2, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        pipe.txt2img(PROMPTS, **args)


def test_generation_result(pipe):
    g = pipe.txt2img("a cat", steps=2, height=64, width=72, seeds=5, progress=False)
    assert g.seeds == [5] and g.prompts == ["a cat"] and g.negative_prompts == [""]
    assert g.images[0].size == (72, 64) and g.pixels.shape == (1, 64, 72, 3) and g.latents.shape == (1, 8, 9, 4)
    assert g.settings["scheduler"] == "pndm" and g.settings["steps"] == 2
    assert np.array_equal(np.asarray(g.images[0]), (g.pixels[0] * 255).round().astype(np.uint8))
