"""`load_pipeline` and `Pipeline`: validated inputs in, images out; one jitted call per job and shape."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import secrets
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import checkpoint, convert, io, parallel, process, sampling, schedulers
from sdjax import images as sdimages
from sdjax.clip import TextEncoder
from sdjax.layers import IMPLEMENTATIONS
from sdjax.tokenizer import ClipTokenizer, load_tokenizer
from sdjax.unet import UNet
from sdjax.vae import VAE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAX_SEED = 2**32 - 1

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "clip_sample": False,
}


@dataclasses.dataclass
class Generation:
    """What a generation call returns; `pixels` [B, H, W, 3] float32 in [0, 1] are the raw arrays."""

    images: list[Image.Image]
    pixels: np.ndarray
    latents: np.ndarray
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any]


class _Progress:
    """Host side of the progress callback ticked from inside the jitted loop (once per device per step)."""

    def __init__(self):
        self.bar = None
        self.last = -1

    def start(self, bar, first: int) -> None:
        self.bar, self.last = bar, first - 1

    def __call__(self, i) -> None:
        i = int(i)
        if self.bar is not None and i > self.last:
            self.bar.update(i - self.last)
            self.last = i


class Pipeline:
    """Stable Diffusion over every device: `txt2img` (and the tasks built on the same loop)."""

    def __init__(self, models: sampling.Models, params: dict, tokenizer: ClipTokenizer,
                 scheduler_config: dict, *, mesh=None, source: str = "", attention: str | None = None):
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        # Attention kernels chosen once, here, for the mesh's devices (`attention` overrides for every layer).
        self.models = models.for_mesh(self.mesh, attention)
        self.params = parallel.put_replicated(params, self.mesh)
        self.base_params = self.params  # without LoRAs; `set_loras` merges into a copy of these
        self.tokenizer = tokenizer
        self.scheduler_config = schedulers.SchedulerConfig.from_dict(scheduler_config)
        self.default_scheduler = schedulers.from_diffusers_config(scheduler_config)  # the checkpoint's own sampler
        self.source = source
        self.dtype = models.unet.dtype
        self._progress = _Progress()
        self._compiled: dict = {}

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def with_params(self, params: dict) -> Pipeline:
        """A pipeline sharing everything with this one but the (full) params, e.g. base params with a LoRA
        merged; replicated on the mesh. It shares the jitted functions (params are their arguments), so
        params of the same shapes and dtypes compile nothing new."""
        view = copy.copy(self)
        view.params = parallel.put_replicated(params, self.mesh)
        return view

    def astype(self, dtype: Any) -> Pipeline:
        """This pipeline computing in `dtype` with its params cast to it (itself when they already are)."""
        dtype = convert.parse_dtype(dtype)
        floats = [a for a in jax.tree.leaves(self.params) if jnp.issubdtype(a.dtype, jnp.floating)]
        if self.dtype == dtype and all(a.dtype == dtype for a in floats):
            return self
        cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, self.params)
        view = self.with_params(cast)
        view.base_params = view.params
        view.models = self.models.astype(dtype)
        view.dtype = dtype
        view._compiled = {}  # other modules: their own jitted functions
        return view

    def _jitted(self, job: str):
        """One jitted function per job; jax caches its compilations per shape and static argument."""
        if job not in self._compiled:
            self._compiled[job] = jit_job(self.models, self.mesh, job)
        return self._compiled[job]

    def set_loras(self, loras: Sequence[str | tuple[str | os.PathLike, float]]) -> Pipeline:
        """Merges LoRA files (peft/diffusers or kohya safetensors) into the base weights at their scales:
        [(path, scale), ...] or "FILE[:SCALE]" strings; [] restores the base. Shapes don't change, so nothing
        recompiles, and inference runs at the base model's speed."""
        from sdjax import lora

        base = {k: v for k, v in self.base_params.items() if k in lora.COMPONENTS}
        cfgs = {"unet": self.models.unet.config, "text_encoder": self.models.text_encoder.config}
        merged = lora.apply_files(base, list(loras), configs=cfgs) if loras else base
        self.params = parallel.put_replicated({**self.base_params, **merged}, self.mesh)
        return self

    def schedule(self, name: str | None, steps: int) -> schedulers.Schedule:
        return schedulers.create(name or self.default_scheduler, self.scheduler_config, steps)

    def txt2img(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                steps: int = 50, guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, progress: bool | None = None) -> Generation:
        """Text to image. One image per prompt; `seeds` is one int per image (an int s gives s, s+1, ...;
        None draws random seeds, returned in the result). `latents` [B, h/8, w/8, 4] replaces the seeded
        starting noise (unscaled standard normal, like the reference's `latents=`)."""
        req = self._validate(prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler)
        return self._generate("txt2img", req, self._batch(req, latents), progress, height=req.height,
                              width=req.width)

    def img2img(self, images, prompts: str | Sequence[str], strength: float = 0.8,
                negative_prompts: str | Sequence[str] | None = None, *, steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, progress: bool | None = None) -> Generation:
        """Image to image, as diffusers' img2img: the last int(steps * strength) steps run from the image's
        latents noised to that level. strength 0 returns the input unchanged; 1 starts from (almost) pure noise.
        images: PIL images or arrays [H, W, 3] (one per prompt); sizes follow `sdjax.images`' rules.
        latents: optional [B, h/8, w/8, 4] standard-normal noise replacing the seeded draw."""
        strength = _check_strength(strength)
        pixels, height, width = sdimages.prepare_images(images, height, width, self.models.vae_scale)
        req = self._validate(_per_image(prompts, pixels), negative_prompts, seeds, steps, guidance_scale, height,
                             width, scheduler, strength=strength)
        _check_count("images", len(pixels), len(req.prompts))
        return self._generate("img2img", req, {**self._batch(req, latents), "pixels": pixels}, progress)

    def inpaint(self, images, masks, prompts: str | Sequence[str], strength: float = 1.0,
                negative_prompts: str | Sequence[str] | None = None, *, steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, paste_back: bool = False, blend: bool | None = None,
                progress: bool | None = None) -> Generation:
        """Repaints the white (1) part of each mask. A 9-channel inpainting UNet is used as such (blend=False,
        the default for it); a 4-channel UNet inpaints by mask blending (see `sampling.inpaint`). paste_back
        copies the original pixels back outside the mask. masks: single-channel, each of its image's size."""
        strength = _check_strength(strength)
        dedicated = self.models.unet.config.in_channels == 9
        if blend is None:
            blend = not dedicated
        if dedicated == blend:
            raise ValueError(f"blend={blend} does not fit this UNet ({self.models.unet.config.in_channels} input "
                             "channels): mask blending needs a 4-channel UNet, blend=False a 9-channel one")
        pixels, height, width = sdimages.prepare_images(images, height, width, self.models.vae_scale)
        mask_arr = sdimages.prepare_masks(masks, images, height, width)
        req = self._validate(_per_image(prompts, pixels), negative_prompts, seeds, steps, guidance_scale, height,
                             width, scheduler, strength=strength)
        _check_count("images", len(pixels), len(req.prompts))
        batch = {**self._batch(req, latents), "pixels": pixels, "masks": mask_arr}
        return self._generate("inpaint", req, batch, progress, dedicated=dedicated, paste_back=bool(paste_back))

    def _validate(self, prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                  strength=None) -> Request:
        return validate_request(prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                                self.models.vae_scale, strength=strength)

    def _batch(self, req: Request, latents) -> dict[str, np.ndarray]:
        """The host arrays every job starts from: token ids, seeds, and the caller's starting noise if any."""
        batch = {"ids": self.tokenizer(req.prompts), "neg_ids": self.tokenizer(req.negative_prompts),
                 "seeds": np.asarray(req.seeds, np.uint32)}
        if latents is not None:
            s = self.models.vae_scale
            shape = (len(req.prompts), req.height // s, req.width // s, self.models.latent_channels)
            batch["latents"] = np.asarray(latents, np.float32)
            if batch["latents"].shape != shape:
                raise ValueError(f"latents must have shape {list(shape)} for {shape[0]} image(s) at "
                                 f"{req.height}x{req.width}, got {list(batch['latents'].shape)}")
        return batch

    def _generate(self, job: str, req: Request, batch: dict[str, np.ndarray], progress: bool | None,
                  **static) -> Generation:
        """Pads and shards the batch, runs the job's jitted function, returns the trimmed result."""
        schedule = self.schedule(req.scheduler, req.steps)
        first = 0
        if req.strength is not None:
            if int(req.steps * req.strength) == 0:  # strength 0, or too small for one step: nothing to denoise
                return self._result(batch["pixels"], None, req, schedule)
            # First call index from strength on the host, in float64 exactly as the reference; traced in the loop.
            first = schedulers.first_call_index(schedule, req.strength)
        b = len(req.prompts)
        size = parallel.padded_size(b, self.mesh)
        batch = parallel.put_batch({k: parallel.pad_batch(v, size) for k, v in batch.items()}, self.mesh)
        show = _want_progress(progress)
        args = (jnp.int32(first),) if JOBS[job].from_image else ()
        with _progress_bar(self._progress, schedule.num_calls, first, show):
            out, final = self._jitted(job)(self.params, parallel.put_replicated(schedule, self.mesh), batch,
                                           jnp.float32(req.guidance_scale), *args, use_cfg=req.use_cfg,
                                           progress=self._progress if show else None, **static)
        pixels, final = np.asarray(jax.device_get(out))[:b], np.asarray(jax.device_get(final))[:b]
        return self._result(pixels, final, req, schedule, **({"paste_back": static["paste_back"]}
                                                            if "paste_back" in static else {}))

    def _result(self, pixels, final, req: Request, schedule, **extra) -> Generation:
        settings = dict(steps=req.steps, guidance_scale=float(req.guidance_scale), height=int(pixels.shape[1]),
                        width=int(pixels.shape[2]), scheduler=schedule.name, model=self.source,
                        dtype=jnp.dtype(self.dtype).name,
                        **({"strength": req.strength} if req.strength is not None else {}), **extra)
        return Generation(to_pil(pixels), pixels, final, req.prompts, req.negative_prompts, req.seeds, settings)


@dataclasses.dataclass(frozen=True)
class Job:
    """A generation job: its function in `sampling` (models, params, schedule, batch, guidance_scale[, first],
    *, use_cfg, progress, **static) and the static arguments it compiles for."""

    fn: Any
    static: tuple[str, ...] = ()
    from_image: bool = False  # takes the traced first call index (img2img, inpaint)


JOBS = {
    "txt2img": Job(sampling.txt2img, ("height", "width")),
    "img2img": Job(sampling.img2img, from_image=True),
    "inpaint": Job(sampling.inpaint, ("dedicated", "paste_back"), from_image=True),
}


def jit_job(models: sampling.Models, mesh, job: str):
    """The jitted function of a generation job (one of JOBS), as the pipeline runs it and `aot.compile_check`
    compiles it: (params, schedule, batch, guidance_scale[, first], *, use_cfg, progress, **static) ->
    (pixels, final latents), both sharded over the mesh's batch axis."""
    return jax.jit(functools.partial(JOBS[job].fn, models), static_argnames=("use_cfg", "progress", *JOBS[job].static),
                   out_shardings=parallel.batch_sharded(mesh), compiler_options=parallel.compiler_options(mesh))


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
            or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def _per_image(prompts, pixels: np.ndarray):
    """A single prompt string stands for every image."""
    return [prompts] * len(pixels) if isinstance(prompts, str) else prompts


def _check_count(name: str, n: int, b: int) -> None:
    if n != b:
        raise ValueError(f"{name} must be one per prompt: got {n} for {b} prompt(s)")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, validated once (`validate_request`) and passed down whole."""

    prompts: list[str]
    negative_prompts: list[str]  # one per prompt ("" = the empty-prompt embedding)
    seeds: list[int]  # one per prompt
    scheduler: str | None  # None: the checkpoint's own
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    strength: float | None = None  # img2img / inpaint; None for txt2img

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance runs only above 1 (a static choice: it changes the UNet batch)."""
        return self.guidance_scale > 1.0


def validate_request(prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                     multiple: int = 8, *, strength: float | None = None) -> Request:
    """Checks every argument before any heavy work; errors name the argument and what is allowed."""
    if isinstance(prompts, str):
        prompts = [prompts] * (len(seeds) if isinstance(seeds, (list, tuple)) else 1)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    b = len(prompts)
    if negative_prompts is None:
        negative_prompts = [""] * b
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * b
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != b or not all(isinstance(p, str) for p in negative_prompts):
        raise ValueError(f"negative_prompts must be a string or a list of {b} strings (one per prompt), "
                         f"got {len(negative_prompts)} entries")
    if seeds is None:
        seeds = [secrets.randbelow(MAX_SEED + 1) for _ in range(b)]
    elif isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [(int(seeds) + i) % (MAX_SEED + 1) for i in range(b)]
    seeds = list(seeds)
    if len(seeds) != b:
        raise ValueError(f"seeds must be an int or a list of {b} ints (one per prompt), got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {s!r}")
    seeds = [int(s) for s in seeds]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) \
            or not np.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < multiple \
                or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    if scheduler is not None and scheduler not in schedulers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler={scheduler!r} is not known; choose one of "
                         f"{', '.join(schedulers.SCHEDULER_NAMES)}")
    return Request(prompts, negative_prompts, seeds, scheduler, int(steps), float(guidance_scale), int(height),
                   int(width), strength)


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL images (rounded as the reference does)."""
    return [Image.fromarray(img) for img in (np.asarray(pixels) * 255).round().astype(np.uint8)]


def _want_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


class _progress_bar:
    def __init__(self, hook: _Progress, total: int, first: int, show: bool):
        self.hook, self.total, self.first, self.show = hook, total, first, show

    def __enter__(self):
        if self.show:
            from tqdm.auto import tqdm

            self.hook.start(tqdm(total=self.total - self.first, desc="denoising", unit="step"), self.first)
        return self

    def __exit__(self, *exc):
        jax.effects_barrier()
        if self.hook.bar is not None:
            self.hook.bar.close()
        self.hook.start(None, 0)
        return False


def load_pipeline(path_or_id: str | os.PathLike = DEFAULT_MODEL, *, dtype: Any = "float32",
                  variant: str | None = None, devices: Sequence[jax.Device] | None = None,
                  compilation_cache: str | os.PathLike | None = None, attention: str | None = None) -> Pipeline:
    """A diffusers-format folder or hub id -> Pipeline with params of `dtype` replicated on every device.

    compilation_cache: a folder for JAX's persistent compilation cache (`process.enable_compilation_cache`, a
    process-wide setting); None leaves the process's setting as it is ("off" or "" too).
    attention: one of `layers.IMPLEMENTATIONS` for every attention layer; None chooses per layer for the
    devices' platform (`layers.AttentionConfig`)."""
    dtype = convert.parse_dtype(dtype)
    if attention is not None and attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(IMPLEMENTATIONS)} (or None: chosen "
                         "per layer for the devices)")
    folder = io.resolve_model(path_or_id, variant=variant)
    if compilation_cache is not None:
        process.enable_compilation_cache(compilation_cache)
    cfgs, params = {}, {}
    for kind in ("text_encoder", "unet", "vae"):
        cfgs[kind], params[kind] = checkpoint.load(folder / kind, kind, dtype=dtype, variant=variant)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.exists():
        sched = io.read_json(sched_path)
    else:
        warnings.warn(f"{folder} has no scheduler/scheduler_config.json: using SD1.5's (PNDM, scaled-linear betas)",
                      stacklevel=2)
        sched = dict(SD15_SCHEDULER)
    models = sampling.Models(TextEncoder(cfgs["text_encoder"], dtype=dtype), UNet(cfgs["unet"], dtype=dtype),
                             VAE(cfgs["vae"], dtype=dtype))
    mesh = parallel.make_mesh(devices)
    return Pipeline(models, params, load_tokenizer(folder), sched, mesh=mesh, source=str(path_or_id),
                    attention=attention)
