"""The denoising loop: text encoding, initial latents, every UNet step with classifier-free guidance, VAE decode.

Each job (`txt2img`, `img2img`, `inpaint`) is one pure function of (models, params, schedule, batch, guidance
scale[, first call]), jitted once per shape (image size, batch, step count, scheduler) by `pipeline.jit_job`.
Prompts (as token ids and per-token weights), seeds, images, strength (as the first call index) and the guidance
scale are traced arguments, so changing them never recompiles; the number of 77-token prompt chunks is a shape
and clip skip a static argument (it decides how many CLIP layers the program holds), each compiling once.

ControlNets (`Models.controlnets`, params["controlnets"]): each job takes their control images in the batch
("control_0", ... [B, H, W, 3] in [0, 1]) and a traced `control` dict: "scales" [N] and "keep" [N, num_calls]
(1.0 where ControlNet n acts at call i: the start/end fractions, resolved on the host by `controls.keep_table`),
so new scales, start or end never recompile; guess mode is static (it changes what the ControlNets see).

Randomness: image b's key is `jax.random.key(seeds[b])`; its initial noise uses `fold_in(key, 0)` and the
noise of step i (ancestral samplers) uses `fold_in(fold_in(key, 1), i)`. Nothing depends on the batch size,
the position in the batch or the number of devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from sdjax import schedulers
from sdjax.clip import TextEncoder
from sdjax.controlnet import ControlNet, Residuals, combine
from sdjax.layers import AttentionConfig
from sdjax.unet import UNet
from sdjax.vae import VAE

NOISE_INIT, NOISE_STEPS = 0, 1  # fold_in tags of an image's key
TEXTUAL_INVERSION = "textual_inversion"  # params key of the added token vectors [E, D], when any are loaded


@dataclasses.dataclass(frozen=True)
class Models:
    """The modules (static: configs, dtype, kernels); their params travel separately ("text_encoder", "unet",
    "vae", and "controlnets": one params tree per ControlNet, in this order)."""

    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    controlnets: tuple[ControlNet, ...] = ()

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def for_mesh(self, mesh: Mesh, implementation: str | None = None, conv: str | None = None) -> Models:
        """The models with attention (and, on CPU, convolution) kernels chosen for `mesh`'s devices and the models'
        dtype (`layers.AttentionConfig.for_mesh`); implementation and conv override the choice for every layer
        (None keeps the models' own override, if any)."""
        implementation = implementation or self.unet.attention.implementation
        conv = conv or self.unet.attention.conv
        config = AttentionConfig.for_mesh(mesh, implementation, conv=conv, dtype=self.unet.dtype)
        return Models(self.text_encoder.clone(attention=config), self.unet.clone(attention=config),
                      self.vae.clone(attention=config), tuple(c.clone(attention=config) for c in self.controlnets))

    def astype(self, dtype: Any) -> Models:
        """The same models computing in `dtype` (params are cast separately)."""
        return Models(self.text_encoder.clone(dtype=dtype), self.unet.clone(dtype=dtype), self.vae.clone(dtype=dtype),
                      tuple(c.clone(dtype=dtype) for c in self.controlnets))

    def with_controlnets(self, controlnets: tuple[ControlNet, ...]) -> Models:
        """The same models with these ControlNets (given the UNet's dtype and attention kernels)."""
        unet = self.unet
        nets = tuple(c.clone(dtype=unet.dtype, attention=unet.attention) for c in controlnets)
        return dataclasses.replace(self, controlnets=nets)


def image_keys(seeds: jax.Array) -> jax.Array:
    """seeds [B] uint32 -> one PRNG key per image [B]."""
    return jax.vmap(jax.random.key)(seeds)


def normal_per_image(keys: jax.Array, tag: int, shape: tuple[int, ...], i=None) -> jax.Array:
    """Standard normal noise [B, *shape], image b's drawn from its own key only."""

    def draw(key):
        key = jax.random.fold_in(key, tag)
        if i is not None:
            key = jax.random.fold_in(key, i)
        return jax.random.normal(key, shape, jnp.float32)

    return jax.vmap(draw)(keys)


def encode_text(models: Models, params: dict, ids: jax.Array, weights: jax.Array | None = None,
                clip_skip: int = 1) -> jax.Array:
    """Token ids [B, 77] or chunks [B, K, 77] (`prompts.encode_batch`) -> the UNet's context [B, 77*K, D].

    Each 77-token chunk is encoded on its own and the chunks' states are concatenated (A1111's long prompts).
    clip_skip (static, A1111's numbering: 1 = the last layer) picks the layer (`TextEncoder.encode`); weights
    [B, K, 77] (traced: new values never recompile) scale the states as A1111's emphasis does (`emphasize`).
    params["textual_inversion"] [E, D], when present, holds the added token vectors (`Pipeline.load_embedding`)."""
    b, length = ids.shape[0], ids.shape[-1]
    chunks = ids.reshape(-1, length)  # [B*K, 77]
    z: jax.Array = models.text_encoder.apply({"params": params["text_encoder"]}, chunks,
                                             params.get(TEXTUAL_INVERSION), clip_skip,
                                             method=TextEncoder.encode)  # type: ignore[assignment]  # [B*K, 77, D]
    if weights is not None:
        z = emphasize(z, weights.reshape(-1, length))
    return z.reshape(b, -1, z.shape[-1])  # [B, 77*K, D]


def emphasize(z: jax.Array, weights: jax.Array) -> jax.Array:
    """A1111's "Original" emphasis: each chunk's states z [N, 77, D] times its tokens' weights [N, 77], then
    rescaled so that the chunk's mean is what it was. A1111 takes the mean over the whole batch of prompts of a
    chunk; here it is per prompt (the same for A1111's usual batch of one prompt repeated), so an image never
    depends on the others in its batch. In float32; a chunk whose weights are all 1 is returned unchanged
    (exactly: the plain path), where A1111 multiplies by a ratio of two equal means."""
    zf = z.astype(jnp.float32)
    scaled = zf * weights[..., None]
    ratio = zf.mean(axis=(1, 2), keepdims=True) / scaled.mean(axis=(1, 2), keepdims=True)  # [N, 1, 1]
    plain = jnp.all(weights == 1.0, axis=1)[:, None, None]
    return jnp.where(plain, zf, scaled * ratio).astype(z.dtype)


def to_vae_latents(models: Models, z: jax.Array) -> jax.Array:
    cfg = models.vae.config
    z = z / cfg.scaling_factor
    return z + cfg.shift_factor if cfg.shift_factor else z


def from_vae_latents(models: Models, z: jax.Array) -> jax.Array:
    cfg = models.vae.config
    if cfg.shift_factor:
        z = z - cfg.shift_factor
    return z * cfg.scaling_factor


def decode(models: Models, params: dict, z: jax.Array) -> jax.Array:
    """Diffusion latents [B, h, w, 4] -> pixels [B, 8h, 8w, 3] in [0, 1] (float32)."""
    x = models.vae.apply({"params": params["vae"]}, to_vae_latents(models, z), method=VAE.decode)
    return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class Controls(NamedTuple):
    """A job's ControlNet inputs (traced): images, one [B, H, W, 3] in [0, 1] per ControlNet (from the batch's
    "control_n"); scales [N]; keep [N, num_calls], 1.0 where ControlNet n acts at call i, else 0.0."""

    images: tuple[jax.Array, ...]
    scales: jax.Array
    keep: jax.Array


def _controls(models: Models, batch: dict[str, jax.Array], control: dict[str, jax.Array] | None) -> Controls | None:
    if not models.controlnets:
        return None
    if control is None:
        raise ValueError("these models hold ControlNets: the job needs `control` (scales and keep)")
    images = tuple(batch[f"control_{n}"] for n in range(len(models.controlnets)))
    return Controls(images, control["scales"], control["keep"])


def control_residuals(models: Models, params: dict, controls: Controls, i: jax.Array, x: jax.Array, t: jax.Array,
                      context: jax.Array, use_cfg: bool, guess_mode: bool) -> Residuals:
    """The ControlNets' residuals for UNet call i on latents x [B, h, w, 4] (scaled model input), summed, in the
    UNet's batch layout (with CFG the interleaved [uncond_0, cond_0, ...] rows of `guided_eps`).

    As diffusers' StableDiffusionControlNetPipeline: under CFG the ControlNets see both halves (the control image
    repeated), in guess mode only the conditional half, the unconditional rows getting zero residuals. Each
    ControlNet runs with scale = scales[n] * keep[n, i] (`controlnet_keep`); where that is 0 its residuals are
    exactly zero, so it is skipped (`lax.cond`: the step does not pay for it).
    """
    if use_cfg and guess_mode:
        x_c, ctx_c = x, context[1::2]  # the conditional rows only: [B, h, w, 4], [B, L, D]
    elif use_cfg:
        x_c, ctx_c = jnp.repeat(x, 2, axis=0), context  # [2B, h, w, 4], [2B, L, D]
    else:
        x_c, ctx_c = x, context
    out = []
    for n, (net, net_params, image) in enumerate(zip(models.controlnets, params["controlnets"], controls.images,
                                                     strict=True)):
        scale = controls.scales[n] * controls.keep[n, i]
        if use_cfg and not guess_mode:
            image = jnp.repeat(image, 2, axis=0)  # [2B, H, W, 3], both rows of an image see its control

        def run(net=net, net_params=net_params, image=image, scale=scale) -> Residuals:
            return net.apply({"params": net_params}, x_c, t, ctx_c, image, scale, guess_mode)  # type: ignore[return-value]

        def skip(run=run) -> Residuals:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))

        out.append(lax.cond(scale != 0, run, skip))
    r = combine(out)
    if use_cfg and guess_mode:  # zeros for the unconditional rows, interleaved as the UNet's batch
        def interleave(a):
            return jnp.stack([jnp.zeros_like(a), a], axis=1).reshape(-1, *a.shape[1:])  # [2B, ...]

        r = Residuals(tuple(interleave(d) for d in r.down), interleave(r.mid))
    return r


def guided_eps(models: Models, params: dict, x: jax.Array, t: jax.Array, context: jax.Array,
               guidance_scale: jax.Array, use_cfg: bool, extra: jax.Array | None = None,
               residuals: Residuals | None = None) -> jax.Array:
    """The UNet's prediction at x [B, h, w, C]; with CFG one call on the interleaved [uncond, cond] batch
    (context [2B, L, D], from `_context`).

    `extra` [B, h, w, E] is concatenated to the UNet input after x (the inpainting model's mask and image);
    `residuals` (from `control_residuals`, in the UNet's batch layout) are added to its skips and mid block.
    """
    inp = x if extra is None else jnp.concatenate([x, extra.astype(x.dtype)], axis=-1)
    unet = {"params": params["unet"]}
    if not use_cfg:
        return models.unet.apply(unet, inp, t, context, residuals).astype(jnp.float32)
    # Rows interleaved [uncond_0, cond_0, uncond_1, ...] (as `_context` builds the context): each device's
    # shard of the CFG batch holds both halves of its own images, so nothing moves between devices.
    out = models.unet.apply(unet, jnp.repeat(inp, 2, axis=0), t, context, residuals)  # [2B, h, w, C]
    out = out.astype(jnp.float32).reshape(x.shape[0], 2, *out.shape[1:])
    uncond, cond = out[:, 0], out[:, 1]
    return uncond + guidance_scale * (cond - uncond)


def denoise(models: Models, params: dict, schedule: schedulers.Schedule, x: jax.Array, context: jax.Array,
            keys: jax.Array, guidance_scale: jax.Array, use_cfg: bool, first: Any = 0,
            extra: jax.Array | None = None, after_step: Callable | None = None,
            progress: Callable | None = None, controls: Controls | None = None,
            guess_mode: bool = False) -> jax.Array:
    """Runs calls first .. num_calls-1 of the sampler on latents x [B, h, w, 4] (first may be traced).

    after_step(i, x) -> x rewrites the latents after each step (inpainting by mask blending uses it);
    progress(i) is called on the host after each step (it must tolerate repeats: one per device);
    controls: the ControlNets' inputs (`control_residuals`), None without ControlNets.
    """
    state = schedulers.init_state(schedule, x)
    dtype = models.unet.dtype

    def body(i, carry):
        x, state = carry
        x_in = schedulers.scale_model_input(schedule, x, i).astype(dtype)
        t = schedule.timesteps[i]
        residuals = None
        if controls is not None:
            residuals = control_residuals(models, params, controls, i, x_in, t, context, use_cfg, guess_mode)
        eps = guided_eps(models, params, x_in, t, context, guidance_scale, use_cfg, extra, residuals)
        noise = normal_per_image(keys, NOISE_STEPS, x.shape[1:], i)
        x, state = schedulers.step(schedule, state, eps, i, x, noise=noise)
        if after_step is not None:
            x = after_step(i, x)
        if progress is not None:
            jax.debug.callback(progress, i)
        return x, state

    x, _ = lax.fori_loop(first, schedule.num_calls, body, (x, state))
    return x


def _context(models: Models, params: dict, batch: dict[str, jax.Array], use_cfg: bool, clip_skip: int) -> jax.Array:
    """The UNet's context from batch "ids"/"neg_ids" [B, K, 77] (and "weights"/"neg_weights" [B, K, 77] with the
    a1111 prompt syntax): [B, 77*K, D], or with CFG [2B, 77*K, D] interleaved [uncond_0, cond_0, uncond_1, ...]."""
    ids, weights = batch["ids"], batch.get("weights")
    if not use_cfg:
        return encode_text(models, params, ids, weights, clip_skip)  # [B, 77*K, D]
    # One text-encoder call on [uncond_0, cond_0, uncond_1, cond_1, ...] (the order `guided_eps` expects): one
    # copy of CLIP in the compiled program instead of two.
    both = jnp.stack([batch["neg_ids"], ids], axis=1).reshape(-1, *ids.shape[1:])  # [2B, K, 77]
    if weights is not None:
        weights = jnp.stack([batch["neg_weights"], weights], axis=1).reshape(-1, *weights.shape[1:])
    return encode_text(models, params, both, weights, clip_skip)  # [2B, 77*K, D]


def txt2img(models: Models, params: dict, schedule: schedulers.Schedule, batch: dict[str, jax.Array],
            guidance_scale: jax.Array, control: dict[str, jax.Array] | None = None, *, height: int, width: int,
            use_cfg: bool, clip_skip: int = 1, guess_mode: bool = False,
            progress: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (pixels [B, H, W, 3] in [0, 1], final latents [B, H/8, W/8, 4]).

    batch: "ids", "neg_ids" [B, K, 77] token ids (K chunks; [B, 77] is one), optionally "weights", "neg_weights"
    [B, K, 77] (the a1111 prompt syntax, `_context`), "seeds" [B] uint32, optionally "latents" [B, H/8, W/8, 4]
    unscaled standard-normal starting noise (as the reference's `latents=`) replacing the seeded draw, and with
    ControlNets "control_0", ... [B, H, W, 3] (`control`: see the module docstring).
    """
    context = _context(models, params, batch, use_cfg, clip_skip)
    keys = image_keys(batch["seeds"])
    shape = (height // models.vae_scale, width // models.vae_scale, models.latent_channels)
    latents = batch.get("latents")
    if latents is None:
        latents = normal_per_image(keys, NOISE_INIT, shape)
    x = latents.astype(jnp.float32) * schedulers.init_noise_sigma(schedule)
    x = denoise(models, params, schedule, x, context, keys, guidance_scale, use_cfg, progress=progress,
                controls=_controls(models, batch, control), guess_mode=guess_mode)
    return decode(models, params, x), x


def encode_image(models: Models, params: dict, pixels: jax.Array) -> jax.Array:
    """Pixels [B, H, W, 3] in [0, 1] -> diffusion latents [B, H/8, W/8, 4].

    Uses the posterior mean (the reference samples mean + std * eps; the SD VAE's std is ~1e-3 of the mean's
    scale, and the mean keeps the encoding deterministic and independent of any key).
    """
    mean, _ = models.vae.apply({"params": params["vae"]}, pixels * 2.0 - 1.0, method=VAE.encode)
    return from_vae_latents(models, mean.astype(jnp.float32))


def img2img(models: Models, params: dict, schedule: schedulers.Schedule, batch: dict[str, jax.Array],
            guidance_scale: jax.Array, first: jax.Array, control: dict[str, jax.Array] | None = None, *,
            use_cfg: bool, clip_skip: int = 1, guess_mode: bool = False,
            progress: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """Image to image: the image's latents noised to call index `first` (traced), then calls first.. of the
    sampler, as diffusers' StableDiffusionImg2ImgPipeline (strength picks `first` on the host).

    batch: as `txt2img`'s plus "pixels" [B, H, W, 3] in [0, 1]; its optional "latents" [B, h, w, 4] are the
    standard-normal noise replacing the seeded draw.
    """
    context = _context(models, params, batch, use_cfg, clip_skip)
    keys = image_keys(batch["seeds"])
    x0 = encode_image(models, params, batch["pixels"])
    latents = batch.get("latents")
    noise = normal_per_image(keys, NOISE_INIT, x0.shape[1:]) if latents is None else latents
    x = schedulers.add_noise(schedule, x0, noise, first)
    x = denoise(models, params, schedule, x, context, keys, guidance_scale, use_cfg, first=first,
                progress=progress, controls=_controls(models, batch, control), guess_mode=guess_mode)
    return decode(models, params, x), x


def inpaint(models: Models, params: dict, schedule: schedulers.Schedule, batch: dict[str, jax.Array],
            guidance_scale: jax.Array, first: jax.Array, control: dict[str, jax.Array] | None = None, *,
            use_cfg: bool, dedicated: bool, paste_back: bool, clip_skip: int = 1, guess_mode: bool = False,
            progress: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """Repaints where batch["masks"] [B, H, W] (in [0, 1]) are 1, keeps batch["pixels"] [B, H, W, 3] where
    they are 0 (the rest of the batch as `img2img`'s).

    dedicated (a 9-channel inpainting UNet): as diffusers' StableDiffusionInpaintPipeline, the mask is
    binarised at 0.5 and the UNet sees [latents, mask at 1/8 size, latents of the masked image].
    Otherwise (mask blending on a 4-channel UNet): after every step the kept region of the latents is replaced
    by the image's latents noised to the next step's level; the mask is area-averaged to latent size, so grey
    masks blend softly. paste_back puts the original pixels back outside the mask after decoding.
    From strength 1 (first == 0) the start is pure noise; below it, the image's latents noised to `first`.
    """
    context = _context(models, params, batch, use_cfg, clip_skip)
    keys = image_keys(batch["seeds"])
    pixels, masks, latents = batch["pixels"], batch["masks"], batch.get("latents")
    s = models.vae_scale
    b, h, w = masks.shape
    extra, after_step = None, None
    if dedicated:
        binary = (masks >= 0.5).astype(jnp.float32)  # [B, H, W]
        masked = pixels * (1.0 - binary)[..., None] + 0.5 * binary[..., None]  # repainted area -> 0 in [-1, 1]
        # One VAE-encoder call on [image_0, masked_0, image_1, ...] (one encoder in the program, not two).
        both = encode_image(models, params, jnp.stack([pixels, masked], axis=1).reshape(-1, *pixels.shape[1:]))
        both = both.reshape(b, 2, *both.shape[1:])  # [B, 2, h, w, 4]
        x0 = both[:, 0]
        extra = jnp.concatenate([binary[:, ::s, ::s, None], both[:, 1]], axis=-1)
    else:
        x0 = encode_image(models, params, pixels)
    noise = normal_per_image(keys, NOISE_INIT, x0.shape[1:]) if latents is None else latents
    x = jnp.where(first == 0, noise * schedulers.init_noise_sigma(schedule),
                  schedulers.add_noise(schedule, x0, noise, first))
    if not dedicated:
        keep = 1.0 - masks.reshape(b, h // s, s, w // s, s).mean(axis=(2, 4))[..., None]  # [B, h, w, 1]
        last = schedule.num_calls - 1

        def after_step(i, x):
            proper = jnp.where(i < last, schedulers.add_noise(schedule, x0, noise, jnp.minimum(i + 1, last)), x0)
            return keep * proper + (1.0 - keep) * x

    # The ControlNets see the 4-channel latents, never the 9-channel model's extra inputs (as diffusers).
    x = denoise(models, params, schedule, x, context, keys, guidance_scale, use_cfg, first=first, extra=extra,
                after_step=after_step, progress=progress, controls=_controls(models, batch, control),
                guess_mode=guess_mode)
    out = decode(models, params, x)
    if paste_back:
        m = masks[..., None]
        out = m * out + (1.0 - m) * pixels
    return out, x
