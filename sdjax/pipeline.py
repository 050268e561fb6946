"""`load_pipeline` and `Pipeline`: validated inputs in, images out; one jitted call per job and shape."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
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

from sdjax import checkpoint, convert, io, parallel, process, safety, sampling, schedulers
from sdjax import controls as control_lib
from sdjax import images as sdimages
from sdjax import prompts as prompt_lib
from sdjax.clip import TextEncoder
from sdjax.controlnet import ControlNet
from sdjax.layers import IMPLEMENTATIONS, check_conv
from sdjax.tokenizer import ClipTokenizer, load_tokenizer
from sdjax.unet import UNet
from sdjax.vae import VAE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAX_SEED = 2**32 - 1

# Upper bounds on a request, checked before any work (here for the API, by the CLI for its flags). They catch
# typos that would otherwise load, compile and run for minutes, or exhaust memory; `allow_large=True` (CLI:
# --no-limits) lifts the size, count and guidance bounds, never MAX_STEPS.
MAX_SIZE = 2048  # pixels per side. SD1.5 is trained at 512; at 2048 its first attention layers already see
#                  256x256 = 65536 latent tokens (a 16 GiB score matrix per head and image without flash
#                  attention) and the VAE decoder's activations take several GiB per image.
MAX_STEPS = 1000  # a schedule cannot have more steps than the scheduler's training timesteps (num_train_timesteps,
#                   1000 for SD); a hard bound, checked against the loaded scheduler config too
MAX_BATCH = 256  # images in one call (API: prompts per call; CLI: --batch-size), 32 per chip on a v5e-8
MAX_IMAGES = 10_000  # images in one CLI run (--num-images), made MAX_BATCH or --batch-size at a time
MAX_GUIDANCE_SCALE = 100.0  # |guidance_scale|: 7.5 is usual, A1111 stops at 30; larger only oversaturates
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # guidance_scale runs as float32: beyond this it is inf
LIFT = "allow_large=True lifts the bound"

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
    # Per image, whether the safety checker flagged it (its image and pixels are then black, as diffusers'
    # `nsfw_content_detected`); None when no checker ran.
    nsfw: list[bool] | None = None


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

    # Textual-inversion embeddings (`load_embedding`): their triggers, and (token, vectors [N, D]) in row order
    # of params["textual_inversion"]. Immutable, rebound on each load (views made before keep theirs).
    triggers: tuple[prompt_lib.Trigger, ...] = ()
    _embedding_vectors: tuple[tuple[str, np.ndarray], ...] = ()

    def __init__(self, models: sampling.Models, params: dict, tokenizer: ClipTokenizer,
                 scheduler_config: dict, *, mesh=None, source: str = "", attention: str | None = None,
                 safety_checker: Any = None, optimization_effort: float = 0.0, conv: str | None = None):
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        # Attention and convolution kernels chosen once, here, for the mesh's devices and the dtype (`attention`
        # and `conv` override for every layer; on CPU this loads the oneDNN kernel for bfloat16 and float32).
        self.models = models.for_mesh(self.mesh, attention, conv)
        # XLA's run time vs compile time trade for every job this pipeline compiles (`parallel.EFFORT_RANGE`).
        self.optimization_effort = parallel.check_effort(optimization_effort)
        self.params = parallel.put_replicated(params, self.mesh)
        self.base_params = self.params  # without LoRAs; `set_loras` merges into a copy of these
        self.tokenizer = tokenizer
        self.scheduler_config = schedulers.SchedulerConfig.from_dict(scheduler_config)
        self.default_scheduler = schedulers.from_diffusers_config(scheduler_config)  # the checkpoint's own sampler
        self.source = source
        self.dtype = models.unet.dtype
        self._progress = _Progress()
        self._compiled: dict = {}
        self._signatures: set = set()  # (jitted function, argument shapes and statics) compiled ahead (`_compile`)
        # ControlNet params as the jobs take them (this pipeline's dtype, replicated), by id of the ControlNetModel
        # (kept in the value, so an id is never reused while cached).
        self._control_params: dict[int, tuple[Any, Any]] = {}
        # A `safety.Checker` run on every result (flagged images turn black), or None; set it to None to turn
        # the checker off.
        self.safety_checker = safety_checker

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
        view.models = self.models.astype(dtype).for_mesh(self.mesh)  # the kernels for the new dtype
        view.dtype = dtype
        view._compiled = {}  # other modules: their own jitted functions
        view._signatures = set()
        view._control_params = {}  # ControlNet params are cast to the pipeline's dtype: a cache per dtype
        return view

    def _jitted(self, job: str, controls: control_lib.Prepared | None = None):
        """One jitted function per job (and set of ControlNet architectures); jax caches its compilations per
        shape and static argument."""
        key: Any = job
        models = self.models
        if controls is not None:
            configs = tuple(net.config for net in controls.nets)
            key = (job, configs)
            models = models.with_controlnets(tuple(ControlNet(c) for c in configs))
        key = (key, self.optimization_effort)
        if key not in self._compiled:
            self._compiled[key] = jit_job(models, self.mesh, job, self.optimization_effort)
        return self._compiled[key]

    def _compile(self, fn, args: tuple, options: dict) -> None:
        """Compiles `fn` for these arguments ahead of the call when it is the first call of its kind, then hands the
        compiler's freed memory back to the OS (`process.release_free_heap`); jit's call reuses the executable.

        Why: XLA's compile leaves a few hundred MB freed in malloc's arenas, resident all through the run that
        follows. Returning it before the run lowers the process's peak (fp32 SD1.5 txt2img at 512x512: 5.53 ->
        5.36 GiB, measured with /proc's VmHWM); the call itself is unchanged."""
        leaves, tree = jax.tree.flatten(args)
        signature = (id(fn), tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a))), getattr(a, "sharding", None))
                                         for a in leaves), tuple(sorted(options.items(), key=lambda kv: kv[0])))
        if signature in self._signatures:
            return
        fn.lower(*args, **options).compile()
        process.release_free_heap()
        self._signatures.add(signature)

    def _controlnet_params(self, controls: control_lib.Prepared) -> tuple:
        """The ControlNets' params in this pipeline's dtype, replicated on the mesh (placed once per model)."""
        out = []
        for net in controls.nets:
            cached = self._control_params.get(id(net))
            if cached is None or cached[0] is not net:
                cast = jax.tree.map(lambda a: a.astype(self.dtype), net.params)
                cached = (net, parallel.put_replicated(cast, self.mesh))
                self._control_params[id(net)] = cached
            out.append(cached[1])
        return tuple(out)

    vae_name: str | None = None  # the swapped-in VAE's file or folder name (`set_vae`), as A1111's "VAE:"

    def set_vae(self, path: str | os.PathLike) -> Pipeline:
        """Replaces the VAE: a diffusers VAE folder (config.json + weights, or a model folder's vae/) or a
        single-file VAE (.safetensors, original layout with or without `first_stage_model.`, e.g.
        vae-ft-mse-840000-ema-pruned; the model's VAE architecture). Its latent space must be the model's. The
        params take this pipeline's dtype; only a VAE of another config recompiles."""
        from sdjax import single_file

        source = single_file.read_vae(path, self.models.vae.config)  # config, keys and shapes first
        vae = parallel.put_replicated(source.load(self.dtype), self.mesh)
        if source.config != self.models.vae.config:
            self.models = sampling.Models(self.models.text_encoder, self.models.unet,
                                          self.models.vae.clone(config=source.config))
            self._compiled, self._signatures = {}, set()
        self.params = {**self.params, "vae": vae}
        self.base_params = {**self.base_params, "vae": vae}
        self.vae_name = source.name
        return self

    def set_loras(self, loras: Sequence[str | tuple[str | os.PathLike, float]]) -> Pipeline:
        """Merges LoRA files (peft/diffusers or kohya safetensors) into the base weights at their scales:
        [(path, scale), ...] or "FILE[:SCALE]" strings; [] restores the base. Shapes don't change, so nothing
        recompiles, and inference runs at the base model's speed."""
        from sdjax import lora

        specs = _lora_specs(loras)  # finite scales, existing files
        base = {k: v for k, v in self.base_params.items() if k in lora.COMPONENTS}
        cfgs = {"unet": self.models.unet.config, "text_encoder": self.models.text_encoder.config}
        merged = lora.apply_files(base, specs, configs=cfgs) if specs else base
        self.params = parallel.put_replicated({**self.base_params, **merged}, self.mesh)
        return self

    def load_embedding(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Loads a textual-inversion embedding (safetensors: A1111's ``emb_params`` / ``string_to_param`` layouts
        or diffusers' ``{token: vector}``, see `embeddings.read_embedding`) and binds it to `token`, returned:
        None takes diffusers' key, else the file's stem (A1111's name). Wherever the trigger's CLIP tokens appear
        in a prompt (either syntax) they are replaced by the embedding's N vectors (N tokens, one chunk), as A1111
        and diffusers' ``load_textual_inversion`` do. Loading a token again replaces its vectors.

        The vectors are rows added to CLIP's token table (params["textual_inversion"] [E, D], ids vocab_size..):
        each new set of shapes compiles the jobs once; the prompts' ids stay traced."""
        from sdjax import embeddings

        cfg = self.models.text_encoder.config
        token, vectors = embeddings.read_embedding(path, cfg.hidden_size, token)  # [N, D] float32
        loaded = dict(self._embedding_vectors)
        loaded.pop(token, None)
        loaded[token] = vectors
        triggers: list[prompt_lib.Trigger] = []
        first = cfg.vocab_size
        for name, vecs in loaded.items():
            ids = tuple(self.tokenizer.encode([name])[0])
            if not ids:
                raise embeddings.EmbeddingError(f"embedding token {name!r} has no CLIP tokens; give a word")
            clash = next((t.token for t in triggers if t.ids == ids), None)
            if clash is not None:
                raise embeddings.EmbeddingError(f"embedding token {name!r} is the same CLIP tokens as the loaded "
                                                f"embedding {clash!r}; give another token")
            triggers.append(prompt_lib.Trigger(name, ids, first, len(vecs)))
            first += len(vecs)
        dtype = self.params["text_encoder"]["token_embedding"]["embedding"].dtype
        table = parallel.put_replicated(jnp.asarray(np.concatenate(list(loaded.values())), dtype), self.mesh)
        self.params = {**self.params, sampling.TEXTUAL_INVERSION: table}  # [E, D]
        self.base_params = {**self.base_params, sampling.TEXTUAL_INVERSION: table}
        self.triggers, self._embedding_vectors = tuple(triggers), tuple(loaded.items())
        return token

    def schedule(self, name: str | None, steps: int) -> schedulers.Schedule:
        return schedulers.create(name or self.default_scheduler, self.scheduler_config, steps)

    def txt2img(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                width: int | None = None, seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, progress: bool | None = None,
                allow_large: bool = False, clip_skip: int = 1, prompt_syntax: str = "plain",
                controls: Sequence[control_lib.Control] | None = None, guess_mode: bool = False) -> Generation:
        """Text to image. One image per prompt; `seeds` is one int per image (an int s in [0, MAX_SEED] gives
        s, s+1, ... mod 2**32; None draws random seeds, returned in the result). `latents` [B, h/8, w/8, 4]
        replaces the seeded starting noise (unscaled standard normal, like the reference's `latents=`).
        allow_large=True lifts the MAX_SIZE / MAX_BATCH / MAX_GUIDANCE_SCALE bounds.

        clip_skip: A1111's "Clip skip" (1: CLIP's last layer, 2: the penultimate; diffusers' clip_skip + 1).
        prompt_syntax: "plain" (the text as it is, the reference's ids) or "a1111" (``(word:1.3)``, ``[word]``,
        BREAK, ...; `sdjax.prompts`). Either way prompts longer than 75 tokens are encoded in 75-token chunks.
        controls: ControlNets steering the layout (`sdjax.Control(controlnet, images, scale, start, end)`, several
        at once add up), as diffusers' StableDiffusionControlNetPipeline; guess_mode: its guess mode (the
        ControlNets see only the conditional half of CFG, residuals ramped from 0.1 to 1 down the skips).
        height, width: 512 unless given; with controls, the first control image's size (multiples of 8).
        Returns a `Generation`: PIL images, pixels [B, H, W, 3] float32 in [0, 1], latents [B, H/8, W/8, 4]
        float32 (the denoised latents in the UNet's space, before `to_vae_latents`), and the prompts, seeds and
        settings used."""
        _check_bools(progress=progress, allow_large=allow_large)
        height, width = control_lib.output_size(controls, height, width, self.models.vae_scale,
                                                None if allow_large else MAX_SIZE)
        req = self._validate(prompts, negative_prompts, seeds, steps, guidance_scale,
                             512 if height is None else height, 512 if width is None else width, scheduler,
                             latents=latents, allow_large=allow_large, clip_skip=clip_skip,
                             prompt_syntax=prompt_syntax)
        prepared = self._controls(controls, guess_mode, req)
        return self._generate("txt2img", req, self._batch(req), progress, prepared, height=req.height,
                              width=req.width)

    def img2img(self, images, prompts: str | Sequence[str], strength: float = 0.8,
                negative_prompts: str | Sequence[str] | None = None, *, steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, progress: bool | None = None,
                allow_large: bool = False, clip_skip: int = 1, prompt_syntax: str = "plain",
                controls: Sequence[control_lib.Control] | None = None, guess_mode: bool = False) -> Generation:
        """Image to image, as diffusers' img2img: the last int(steps * strength) steps run from the image's
        latents noised to that level. strength 0 returns the input unchanged; 1 starts from (almost) pure noise.
        images: PIL images or arrays [H, W, 3] (one per prompt); sizes follow `sdjax.images`' rules.
        latents: optional [B, h/8, w/8, 4] standard-normal noise replacing the seeded draw.
        clip_skip, prompt_syntax, controls, guess_mode: as `txt2img`'s (as diffusers'
        StableDiffusionControlNetImg2ImgPipeline with controls: start/end count the steps that run)."""
        _check_bools(progress=progress, allow_large=allow_large)
        arrays, req = self._validate_images(images, prompts, negative_prompts, seeds, steps, guidance_scale, height,
                                            width, scheduler, strength, latents, allow_large, clip_skip,
                                            prompt_syntax)
        prepared = self._controls(controls, guess_mode, req)
        pixels = sdimages.fit_images(arrays, req.height, req.width)
        return self._generate("img2img", req, {**self._batch(req), "pixels": pixels}, progress, prepared)

    def inpaint(self, images, masks, prompts: str | Sequence[str], strength: float = 1.0,
                negative_prompts: str | Sequence[str] | None = None, *, steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                seeds: int | Sequence[int] | None = None, scheduler: str | None = None,
                latents: np.ndarray | None = None, paste_back: bool = False, blend: bool | None = None,
                progress: bool | None = None, allow_large: bool = False, clip_skip: int = 1,
                prompt_syntax: str = "plain", controls: Sequence[control_lib.Control] | None = None,
                guess_mode: bool = False) -> Generation:
        """Repaints the white (1) part of each mask. A 9-channel inpainting UNet is used as such (blend=False,
        the default for it); a 4-channel UNet inpaints by mask blending (see `sampling.inpaint`). paste_back
        copies the original pixels back outside the mask. masks: single-channel, each of its image's size.
        clip_skip, prompt_syntax, controls, guess_mode: as `txt2img`'s (diffusers'
        StableDiffusionControlNetInpaintPipeline with controls; the ControlNets see the 4-channel latents)."""
        _check_bools(paste_back=paste_back, blend=blend, progress=progress, allow_large=allow_large)
        dedicated = self.models.unet.config.in_channels == 9
        if blend is None:
            blend = not dedicated
        if dedicated == blend:
            raise ValueError(f"blend={blend} does not fit this UNet ({self.models.unet.config.in_channels} input "
                             "channels): mask blending needs a 4-channel UNet, blend=False a 9-channel one")
        arrays, req = self._validate_images(images, prompts, negative_prompts, seeds, steps, guidance_scale, height,
                                            width, scheduler, strength, latents, allow_large, clip_skip,
                                            prompt_syntax)
        mask_arr = sdimages.prepare_masks(masks, images, req.height, req.width)
        prepared = self._controls(controls, guess_mode, req)
        pixels = sdimages.fit_images(arrays, req.height, req.width)
        batch = {**self._batch(req), "pixels": pixels, "masks": mask_arr}
        return self._generate("inpaint", req, batch, progress, prepared, dedicated=dedicated,
                              paste_back=bool(paste_back))

    def _validate(self, prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                  strength=None, latents=None, allow_large=False, clip_skip=1, prompt_syntax="plain") -> Request:
        return validate_request(prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                                self.models.vae_scale, strength=strength, latents=latents,
                                latent_channels=self.models.latent_channels,
                                max_steps=self.scheduler_config.num_train_timesteps, allow_large=allow_large,
                                clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                                max_clip_skip=self.models.text_encoder.config.num_layers)

    def _controls(self, controls, guess_mode, req: Request) -> control_lib.Prepared | None:
        return control_lib.prepare(controls, guess_mode, len(req.prompts), req.height, req.width,
                                   self.models.unet.config, self.models.vae_scale)

    def _validate_images(self, images, prompts, negative_prompts, seeds, steps, guidance_scale, height, width,
                         scheduler, strength, latents, allow_large, clip_skip=1,
                         prompt_syntax="plain") -> tuple[list[np.ndarray], Request]:
        """img2img/inpaint: the checked input images (not yet resized) and the request at their output size."""
        if strength is None:  # validate_request's None means "no strength" (txt2img)
            raise TypeError("strength must be a number in [0, 1], got None")
        arrays = sdimages.image_arrays(images)
        height, width = sdimages.output_size(arrays[0], height, width, self.models.vae_scale,
                                             None if allow_large else MAX_SIZE)
        req = self._validate(_per_image(prompts, arrays), negative_prompts, seeds, steps, guidance_scale, height,
                             width, scheduler, strength, latents, allow_large, clip_skip, prompt_syntax)
        _check_count("images", len(arrays), len(req.prompts))
        return arrays, req

    def _batch(self, req: Request) -> dict[str, np.ndarray]:
        """The host arrays every job starts from: token ids "ids", "neg_ids" [B, K, 77] (K chunks, the same for
        every prompt and negative prompt), per-token "weights", "neg_weights" [B, K, 77] with the a1111 syntax
        (`prompts.encode_batch`), seeds, and the caller's starting noise if any."""
        batch = {**prompt_lib.encode_batch(self.tokenizer, req.prompts, req.negative_prompts, req.prompt_syntax,
                                           self.triggers),
                 "seeds": np.asarray(req.seeds, np.uint32)}
        if req.latents is not None:
            batch["latents"] = req.latents
        return batch

    def _generate(self, job: str, req: Request, batch: dict[str, np.ndarray], progress: bool | None,
                  controls: control_lib.Prepared | None = None, **static) -> Generation:
        """Pads and shards the batch, runs the job's jitted function, returns the trimmed result."""
        schedule = self.schedule(req.scheduler, req.steps)
        first = 0
        if req.strength is not None:
            if int(req.steps * req.strength) == 0:  # strength 0, or too small for one step: nothing to denoise
                return self._result(batch["pixels"], None, req, schedule, **req.text_settings)
            # First call index from strength on the host, in float64 exactly as the reference; traced in the loop.
            first = schedulers.first_call_index(schedule, req.strength)
        b = len(req.prompts)
        params, control, extra = self.params, None, {}
        if controls is not None:
            batch = {**batch, **{f"control_{n}": images for n, images in enumerate(controls.images)}}
            params = {**params, "controlnets": self._controlnet_params(controls)}
            control = parallel.put_replicated({"scales": np.asarray(controls.scales, np.float32),
                                               "keep": controls.keep(first, schedule.num_calls)}, self.mesh)
            static = {**static, "guess_mode": controls.guess_mode}
            extra = controls.settings()
        size = parallel.padded_size(b, self.mesh)
        batch = parallel.put_batch({k: parallel.pad_batch(v, size) for k, v in batch.items()}, self.mesh)
        show = _want_progress(progress)
        args = (jnp.int32(first),) if JOBS[job].from_image else ()
        fn = self._jitted(job, controls)
        call = (params, parallel.put_replicated(schedule, self.mesh), batch, jnp.float32(req.guidance_scale), *args,
                control)
        options = dict(use_cfg=req.use_cfg, clip_skip=req.clip_skip, progress=self._progress if show else None,
                       **static)
        self._compile(fn, call, options)
        with _progress_bar(self._progress, schedule.num_calls, first, show):
            out, final = fn(*call, **options)
        # Multi-process: every process made this same call and gets the whole batch back (an all-gather).
        pixels, final = parallel.to_host(out)[:b], parallel.to_host(final)[:b]
        return self._result(pixels, final, req, schedule, **req.text_settings, **extra,
                            **({"paste_back": static["paste_back"]} if "paste_back" in static else {}))

    def _result(self, pixels, final, req: Request, schedule, **extra) -> Generation:
        settings = dict(steps=req.steps, guidance_scale=float(req.guidance_scale), height=int(pixels.shape[1]),
                        width=int(pixels.shape[2]), scheduler=schedule.name, model=self.source,
                        dtype=jnp.dtype(self.dtype).name,
                        **({"strength": req.strength} if req.strength is not None else {}), **extra)
        images, nsfw = to_pil(pixels), None
        if self.safety_checker is not None:  # after decode, as diffusers' run_safety_checker
            nsfw = [bool(f) for f in self.safety_checker.check(images).nsfw]
            if any(nsfw):
                pixels = np.where(np.asarray(nsfw)[:, None, None, None], np.float32(0), pixels)
                images = [Image.new("RGB", im.size) if f else im for im, f in zip(images, nsfw, strict=True)]
        return Generation(images, pixels, final, req.prompts, req.negative_prompts, req.seeds, settings, nsfw)


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


def jit_job(models: sampling.Models, mesh, job: str, optimization_effort: float = 0.0):
    """The jitted function of a generation job (one of JOBS), as the pipeline runs it and `aot.compile_check`
    compiles it: (params, schedule, batch, guidance_scale[, first], *, use_cfg, clip_skip, progress, **static) ->
    (pixels, final latents), both sharded over the mesh's batch axis. optimization_effort: XLA's
    (`parallel.compiler_options`)."""
    return jax.jit(functools.partial(JOBS[job].fn, models),
                   static_argnames=("use_cfg", "clip_skip", "guess_mode", "progress", *JOBS[job].static),
                   out_shardings=parallel.batch_sharded(mesh),
                   compiler_options=parallel.compiler_options(mesh, optimization_effort))


def _per_image(prompts, images: Sequence):
    """A single prompt string stands for every image."""
    return [prompts] * len(images) if isinstance(prompts, str) else prompts


def _check_count(name: str, n: int, b: int) -> None:
    if n != b:
        raise ValueError(f"{name} must be one per prompt: got {n} for {b} prompt(s)")


def _check_bools(**flags) -> None:
    """Switches (progress, paste_back, ...) are True/False (None where that means "the default")."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False{' (or None)' if name in ('progress', 'blend') else ''}, "
                            f"got {value!r}")


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
    latents: np.ndarray | None = None  # float32 [B, height/8, width/8, C]: the caller's starting noise, if any
    clip_skip: int = 1  # A1111's numbering: 1 = CLIP's last layer (static: the program's layer count)
    prompt_syntax: str = "plain"  # one of prompts.SYNTAXES

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance runs only above 1 (a static choice: it changes the UNet batch)."""
        return self.guidance_scale > 1.0

    @property
    def text_settings(self) -> dict[str, Any]:
        """The text-encoding settings of the result (`Generation.settings`, written by `pngmeta.infotext`)."""
        return {"clip_skip": self.clip_skip, "prompt_syntax": self.prompt_syntax}


def _integer(value) -> int | None:
    """value as an int if it is one (Python/numpy integer or a 0-d integer array; never a bool), else None."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def _real(value) -> float | None:
    """value as a float if it is a real number (int, float, numpy scalar or 0-d array; never a bool), else None."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf
    return None


def _texts(value, name: str) -> list[str]:
    """A list of prompts: a list/tuple (any non-string Sequence) of str, each storable as UTF-8."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    texts = list(value)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name} must be a string or a list of strings, got {type(t).__name__} at {name}[{i}]")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name}[{i}] is not valid UTF-8 text (it holds a lone surrogate)") from None
    return texts


def _seed_list(seeds, b: int) -> list[int]:
    """seeds -> one int per image. A scalar s in [0, MAX_SEED] gives s, s+1, ... (mod 2**32, so the last
    seeds wrap around to 0: the CLI's documented S..S+N-1); None draws random seeds."""
    allowed = f"an integer in [0, {MAX_SEED}], a list of {b} such integers (one per prompt), or None"
    if seeds is None:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(b)]
    scalar = _integer(seeds)
    if scalar is not None:
        if not 0 <= scalar <= MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {scalar}")
        return [(scalar + i) % (MAX_SEED + 1) for i in range(b)]
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, np.ndarray)) \
            or (isinstance(seeds, np.ndarray) and seeds.ndim != 1):
        raise TypeError(f"seeds must be {allowed}, got {_describe(seeds)}")
    if len(seeds) != b:
        raise ValueError(f"seeds must be an int or a list of {b} ints (one per prompt), got {len(seeds)}")
    out = []
    for s in seeds:
        value = _integer(s)
        if value is None:
            raise TypeError(f"seeds must be integers in [0, {MAX_SEED}], got {s!r}")
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {value}")
        out.append(value)
    return out


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)} and dtype {value.dtype}"
    return f"{value!r}" if isinstance(value, (int, float, str)) else type(value).__name__


def _check_size(name: str, value, multiple: int, allow_large: bool) -> int:
    size = _integer(value)
    if size is None:
        raise TypeError(f"{name} must be an integer (a positive multiple of {multiple}), got {_describe(value)}")
    if size < multiple or size % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {size}"
                         + ("" if allow_large else f" (at most {MAX_SIZE})"))
    if not allow_large and size > MAX_SIZE:
        raise ValueError(f"{name} must be a positive multiple of {multiple} in [{multiple}, {MAX_SIZE}], got {size}; "
                         f"{LIFT}")
    return size


def _check_latents(latents, shape: tuple[int, ...], size: str) -> np.ndarray:
    try:
        dtype = np.asarray(latents).dtype
    except ValueError:  # ragged nested lists
        dtype = np.dtype(object)
    # 'V' covers ml_dtypes' bfloat16 (jax arrays); bool, complex, strings and objects are no noise
    if dtype.kind not in "iufV":
        raise TypeError(f"latents must be a float array, got dtype {dtype}")
    arr = np.asarray(latents, np.float32)
    if arr.shape != shape:
        raise ValueError(f"latents must have shape {list(shape)} for {shape[0]} image(s) at {size}, "
                         f"got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"latents must be finite: {int((~np.isfinite(arr)).sum())} NaN/inf value(s) "
                         "(as float32)")
    return arr


def validate_request(prompts, negative_prompts, seeds, steps, guidance_scale, height, width, scheduler,
                     multiple: int = 8, *, strength: float | None = None, latents=None, latent_channels: int = 4,
                     max_steps: int = MAX_STEPS, allow_large: bool = False, max_images: int = MAX_BATCH,
                     clip_skip=1, prompt_syntax="plain", max_clip_skip: int = 12) -> Request:
    """Checks every argument before any heavy work; errors name the argument and what is allowed (TypeError
    for a wrong kind of value, ValueError for a value out of range). max_steps: the scheduler's
    num_train_timesteps; allow_large lifts MAX_SIZE, MAX_GUIDANCE_SCALE and the count bound `max_images`
    (MAX_BATCH: one call's; the CLI validates a whole run, up to MAX_IMAGES). max_clip_skip: the text encoder's
    layer count. With prompt_syntax="a1111" every prompt is parsed: bad syntax raises
    `prompts.PromptSyntaxError` (a ValueError) naming the prompt and the position, unbalanced brackets warn."""
    if isinstance(prompts, str):
        prompts = [prompts] * (len(seeds) if isinstance(seeds, (list, tuple)) else 1)
    prompts = _texts(prompts, "prompts")
    if not prompts:
        raise ValueError("prompts must be a string or a non-empty list of strings, got an empty list")
    b = len(prompts)
    if not allow_large and b > max_images:
        raise ValueError(f"prompts: at most {max_images} images per call, got {b}; {LIFT} (or make several calls)")
    if negative_prompts is None:
        negative_prompts = [""] * b
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * b
    negative_prompts = _texts(negative_prompts, "negative_prompts")
    if len(negative_prompts) != b:
        raise ValueError(f"negative_prompts must be a string or a list of {b} strings (one per prompt), "
                         f"got {len(negative_prompts)} entries")
    seeds = _seed_list(seeds, b)
    n_steps = _integer(steps)
    if n_steps is None:
        raise TypeError(f"steps must be an integer in [1, {max_steps}], got {_describe(steps)}")
    if not 1 <= n_steps <= max_steps:
        raise ValueError(f"steps must be an integer >= 1 and <= {max_steps} (the scheduler's num_train_timesteps: "
                         f"a schedule has at most that many steps), got {n_steps}")
    scale = _real(guidance_scale)
    if scale is None:
        raise TypeError(f"guidance_scale must be a finite number, got {_describe(guidance_scale)}")
    if not np.isfinite(scale) or abs(scale) > _FLOAT32_MAX:
        raise ValueError(f"guidance_scale must be a finite number (float32), got {guidance_scale!r}")
    if not allow_large and abs(scale) > MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be a finite number in [-{MAX_GUIDANCE_SCALE:g}, "
                         f"{MAX_GUIDANCE_SCALE:g}], got {guidance_scale!r}; {LIFT}")
    height = _check_size("height", height, multiple, allow_large)
    width = _check_size("width", width, multiple, allow_large)
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in schedulers.SCHEDULER_NAMES):
        raise ValueError(f"scheduler={scheduler!r} is not known; choose one of "
                         f"{', '.join(schedulers.SCHEDULER_NAMES)} (or None: the checkpoint's own)")
    if strength is not None:
        value = _real(strength)
        if value is None or not 0.0 <= value <= 1.0:  # NaN fails the comparison too
            raise (TypeError if value is None else ValueError)(f"strength must be a number in [0, 1], got {strength!r}")
        strength = value
    if latents is not None:
        latents = _check_latents(latents, (b, height // multiple, width // multiple, latent_channels),
                                 f"{height}x{width}")
    skip = _integer(clip_skip)
    if skip is None:
        raise TypeError(f"clip_skip must be an integer in [1, {max_clip_skip}], got {_describe(clip_skip)}")
    if not 1 <= skip <= max_clip_skip:
        raise ValueError(f"clip_skip must be an integer in [1, {max_clip_skip}] (A1111's numbering: 1 uses CLIP's last "
                         f"layer, 2 the penultimate; at most the text encoder's layers), got {skip}")
    if not isinstance(prompt_syntax, str) or prompt_syntax not in prompt_lib.SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(map(repr, prompt_lib.SYNTAXES))}, "
                         f"got {prompt_syntax!r}")
    prompt_lib.check({"prompts": prompts, "negative_prompts": negative_prompts}, prompt_syntax)
    return Request(prompts, negative_prompts, seeds, scheduler, n_steps, scale, height, width, strength, latents,
                   skip, prompt_syntax)


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
                  compilation_cache: str | os.PathLike | None = None, attention: str | None = None,
                  loras: Sequence[str | tuple[str | os.PathLike, float]] = (),
                  safety_checker: bool = True, config: str | os.PathLike | None = None,
                  vae: str | os.PathLike | None = None, optimization_effort: float = 0.0,
                  conv: str | None = None) -> Pipeline:
    """A diffusers-format folder, hub id or single-file `.safetensors` checkpoint -> Pipeline with params of
    `dtype` replicated on every device.

    A single file (the original CompVis layout of e.g. `v1-5-pruned-emaonly.safetensors`, `sdjax.single_file`)
    is detected as SD1.5 or SD1.5 inpainting from its shapes and comes with SD1.5's configs, tokenizer and
    scheduler; config: a preset ("sd15", "sd15-inpaint") or a diffusers folder whose configs (tokenizer,
    scheduler) describe the file instead, where detection cannot tell. vae: a VAE replacing the model's (as
    `Pipeline.set_vae`): a diffusers VAE folder or a single-file VAE (e.g. vae-ft-mse-840000-ema-pruned).

    compilation_cache: a folder for JAX's persistent compilation cache (`process.enable_compilation_cache`, a
    process-wide setting); None leaves the process's setting as it is ("off" or "" too).
    attention: one of `layers.IMPLEMENTATIONS` for every attention layer; None chooses per layer for the
    devices' platform (`layers.AttentionConfig`).
    loras: LoRA files merged into the weights (as `Pipeline.set_loras`): [(path, scale), ...] or "FILE[:SCALE]".
    safety_checker: run the checkpoint's `safety_checker/` (when it ships one) on every image; False skips it.
    optimization_effort: XLA's effort at making the compiled jobs fast, in [-1, 1] (0: XLA's default). Lower
    compiles faster and runs slower: -0.5 compiles SD1.5 txt2img for TPU ~6x faster, with ~1.7x the run time by
    XLA's cost model (`parallel.EFFORT_RANGE`).
    conv: "xla" or "onednn" for every convolution; None: oneDNN's kernel for bfloat16 and float32 on CPU where
    it is installed (`sdjax.onednn`: bf16 ~3x XLA:CPU's speed, which runs bf16 convolutions in float32), else
    XLA's. The oneDNN library also brings its attention kernel (chosen per layer on CPU); conv="xla" leaves
    attention to XLA too, unless attention="onednn".

    Everything cheap is checked before any weights are read: the arguments, the folder, the three component
    configs, the scheduler config, the tokenizer and every LoRA file against the configs (`lora.LoRAError`)."""
    from sdjax import lora_files

    dtype = convert.parse_dtype(dtype)
    if attention is not None and attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(IMPLEMENTATIONS)} (or None: chosen "
                         "per layer for the devices)")
    parallel.check_effort(optimization_effort)
    check_conv(conv)
    lora_list = _lora_specs(loras)
    folder = io.resolve_model(path_or_id, variant=variant, allow_file=True,
                              safety_checker=safety_checker is True)
    single = _single_file(folder, config, variant)  # None for a diffusers folder; keys and shapes checked
    if single is not None:
        cfgs = {kind: single.configs[kind] for kind in ("text_encoder", "unet", "vae")}
        sched_path = single.configs.scheduler_path
    else:
        cfgs = {kind: checkpoint.read_config(folder / kind, kind) for kind in ("text_encoder", "unet", "vae")}
        sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.exists():
        sched = io.read_json(sched_path)
        if not isinstance(sched, dict):
            raise ValueError(f"{sched_path} must hold a JSON object, got {type(sched).__name__}")
    else:
        warnings.warn(f"{folder} has no scheduler/scheduler_config.json: using SD1.5's (PNDM, scaled-linear betas)",
                      stacklevel=2)
        sched = dict(SD15_SCHEDULER)
    try:  # raise on an unsupported schedule, naming the file
        schedulers.SchedulerConfig.from_dict(sched)
        schedulers.from_diffusers_config(sched)
    except ValueError as err:
        where = sched_path if sched_path.exists() else "SD1.5's default scheduler config"
        raise checkpoint.CheckpointError(f"{where}: {err}") from err
    tokenizer = single.configs.tokenizer() if single is not None else load_tokenizer(folder)
    vae_source = None
    if vae is not None:
        from sdjax import single_file

        vae_source = single_file.read_vae(vae, cfgs["vae"])  # its config, keys and shapes: no tensor read
    lora_cfgs = {"unet": cfgs["unet"], "text_encoder": cfgs["text_encoder"]}
    for path, _ in lora_list:
        _check_lora_file(lora_files, path, lora_cfgs)
    if compilation_cache is not None:
        process.enable_compilation_cache(compilation_cache)
    params = {}
    for kind in ("text_encoder", "unet", "vae"):
        if kind == "vae" and vae_source is not None:
            cfgs[kind], params[kind] = vae_source.config, vae_source.load(dtype)
        elif single is not None:
            params[kind] = single.load(kind, dtype)
        else:
            cfgs[kind], params[kind] = checkpoint.load(folder / kind, kind, dtype=dtype, variant=variant)
    models = sampling.Models(TextEncoder(cfgs["text_encoder"], dtype=dtype), UNet(cfgs["unet"], dtype=dtype),
                             VAE(cfgs["vae"], dtype=dtype))
    mesh = parallel.make_mesh(devices)
    pipe = Pipeline(models, params, tokenizer, sched, mesh=mesh, source=str(path_or_id), attention=attention,
                    optimization_effort=optimization_effort, conv=conv)
    pipe.vae_name = vae_source.name if vae_source is not None else None
    _check_bools(safety_checker=safety_checker)
    found = safety.find(folder) if safety_checker else None  # on when the checkpoint ships safety_checker/
    if found is not None:
        pipe.safety_checker = safety.Checker.from_folder(*found, mesh=mesh, dtype=dtype, attention=attention)
    return pipe.set_loras(lora_list) if lora_list else pipe


def _single_file(path, config, variant):
    """`load_pipeline`'s single-file checkpoint (`single_file.SingleFile`, opened and checked), or None when `path`
    is a diffusers folder (then `config` must be None)."""
    if not path.is_file():
        if config is not None:
            raise ValueError(f"config= describes a single-file checkpoint; {str(path)!r} is a diffusers folder with "
                             "its own configs")
        return None
    from sdjax import single_file

    if variant is not None:
        raise ValueError(f"variant={variant!r} picks weights in a diffusers folder; {str(path)!r} is a single file")
    return single_file.SingleFile(path, config=config)


def _lora_specs(loras) -> list[tuple[str, float]]:
    """`loras` of load_pipeline / set_loras -> [(path, finite scale)]; the files exist (their contents are read
    as safetensors, never unpickled)."""
    from sdjax import lora_files
    from sdjax.lora import LoRAError

    if isinstance(loras, (str, bytes, os.PathLike)) or not isinstance(loras, Sequence):
        raise TypeError(f"loras must be a list of (path, scale) pairs or 'FILE[:SCALE]' strings, got {loras!r}")
    out = []
    for item in loras:
        if isinstance(item, str):
            path, scale = lora_files.parse_spec(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            path, value = os.fspath(item[0]), _real(item[1])
            if value is None or not math.isfinite(value):
                raise LoRAError(f"LoRA scale must be a finite number, got {item[1]!r} for {path!r}")
            scale = value
        else:
            raise TypeError(f"loras entries must be (path, scale) pairs or 'FILE[:SCALE]' strings, got {item!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA file {path!r} does not exist" if not os.path.exists(path)
                                    else f"LoRA file {path!r} is not a file")
        out.append((path, scale))
    return out


def _check_lora_file(lora_files, path: str, configs: dict) -> None:
    """A LoRA file fits the model whose configs these are (`lora_files.check`), before any weights load;
    any problem with the file (unreadable, corrupt, not fitting) is a LoRAError naming it."""
    from sdjax.lora import LoRAError

    try:
        lora_files.check(path, configs)
    except LoRAError:
        raise
    except (OSError, ValueError) as err:
        raise LoRAError(f"LoRA file {path!r}: {err}") from err
