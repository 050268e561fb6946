"""One LoRA training step for Stable Diffusion: its settings (`TrainConfig`), the loss and the jitted,
data-parallel update (`make_train_step`). The loop around it (checkpoints, signals, metrics, samples) is
`sdjax.train`.

    cfg = TrainConfig(rank=8, steps=1000, batch_size=4, resolution=512)
    optimizer = make_optimizer(cfg)
    step = make_train_step(pipe.models, cfg, optimizer, pipe.mesh, pipe.scheduler_config)
    lora, opt_state, metrics = step(lora, opt_state, pipe.params, batch, key)

The objective is DDPM's noise prediction (Ho et al. 2020): latents z0 = VAE posterior sample (or cached
latents) x scaling_factor, t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and
the UNet (base params with the LoRA merged in) regresses eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0
for v-prediction checkpoints, with mean squared error; optionally weighted per example by min-SNR-gamma
(Hang et al. 2023): min(snr, gamma) / snr for eps, min(snr, gamma) / (snr + 1) for v.

Precision: the frozen base params and the compute are `cfg.dtype` (bfloat16 by default: the pipeline is
loaded in it); the LoRA params, their gradients and the optimizer state are float32.

Steps: `cfg.steps` counts optimizer updates; each update averages `cfg.grad_accum` micro-batches
(`optax.MultiSteps`).

Randomness: the step's key is split per example of the global batch, fold_in(key, b), and example b's
timestep, noise and posterior sample use fold_in(that, TAG_T / TAG_NOISE / TAG_POSTERIOR), so results do
not depend on the device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sdjax import convert, data, lora_files, parallel, sampling, schedulers
from sdjax import lora as lora_lib
from sdjax.vae import VAE

PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_MODES = ("branch", "merge")
TAG_INIT, TAG_STEPS = 0, 1  # fold_in tags of the run key
TAG_T, TAG_NOISE, TAG_POSTERIOR = 0, 1, 2  # fold_in tags of an example's key
MAX_SEED = 2**32 - 1  # as the CLI's --seed everywhere (pipeline.MAX_SEED)
# Larger than any sensible SD1.5 training size (it was trained at 512), and compile-check's own bound, so that
# `sdjax compile-check --job train-lora --size 4096` can still ask what such a run would need.
MAX_RESOLUTION = 4096


class ConfigError(ValueError):
    """A bad setting of a LoRA run. `field` names it: a TrainConfig field, or an argument of `train.train_lora`
    ("data_dir", "out", "resume", ...); `message` says what is allowed; str() is "field: message"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a LoRA run (saved with each checkpoint)."""

    rank: int = 4
    alpha: float = 4.0
    targets: str | tuple[str, ...] = "unet"  # a lora.TARGET_SETS name or kernel-path regexes
    lr: float = 1e-4
    warmup_steps: int = 0
    steps: int = 1000  # optimizer updates
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 1  # global, per micro-step (split over the devices)
    resolution: int = 512
    crop: str = "center"  # or "random"
    random_flip: bool = False
    bad_images: str = "skip"  # or "error"
    cache_latents: str | None = None  # None, "mean" or "sample" (see data.ImageCaptionDataset.cache)
    min_snr_gamma: float | None = None
    prediction_type: str | None = None  # None: the checkpoint's scheduler config
    seed: int = 0
    dtype: str = "bfloat16"  # compute and base params; LoRA params and optimizer state are float32
    checkpoint_every: int = 500  # optimizer updates; 0: only on signals and at the end
    keep_last: int = 3
    sample_every: int = 0  # optimizer updates; 0: no periodic samples
    sample_prompts: tuple[str, ...] = ()  # default: the dataset's first caption
    sample_steps: int = 25
    sample_guidance: float = 7.5
    lora_format: str = "peft"  # the final export, lora.save(format=...)
    lora_mode: str = "branch"  # how the step applies the LoRA: "branch" or "merge" (see diffusion_loss)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks every setting (run on construction, so a TrainConfig is always valid); ConfigError names
        the field and says what is allowed."""
        for name, low in (("rank", 1), ("steps", 1), ("grad_accum", 1), ("batch_size", 1), ("keep_last", 1),
                          ("sample_steps", 1), ("warmup_steps", 0), ("checkpoint_every", 0), ("sample_every", 0)):
            _check_int(name, getattr(self, name), low)
        _check_int("seed", self.seed, 0, MAX_SEED)
        r = self.resolution
        if not _is_int(r) or r % 8 or not 8 <= r <= MAX_RESOLUTION:  # the VAE downsamples by 8
            raise ConfigError("resolution", f"must be a positive multiple of 8 in [8, {MAX_RESOLUTION}], got {r!r}")
        if self.warmup_steps > self.steps:
            raise ConfigError("warmup_steps", f"must be <= steps ({self.steps}), got {self.warmup_steps}: the "
                                              "learning rate would never reach lr")
        _check_number("alpha", self.alpha, above=0)
        _check_number("lr", self.lr, above=0)
        _check_number("weight_decay", self.weight_decay, at_least=0)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, at_least=0, extra=" (0 or None: no clipping)")
        if self.min_snr_gamma is not None:
            _check_number("min_snr_gamma", self.min_snr_gamma, above=0, extra=" (or None: no weighting)")
        _check_number("sample_guidance", self.sample_guidance)
        _check_targets(self.targets)
        _check_texts("sample_prompts", self.sample_prompts)
        _check_choice("crop", self.crop, data.CROPS)
        if not isinstance(self.random_flip, bool):
            raise ConfigError("random_flip", f"must be True or False, got {self.random_flip!r}")
        _check_choice("bad_images", self.bad_images, data.BAD_IMAGE_POLICIES)
        _check_choice("cache_latents", self.cache_latents, (None, *data.CACHE_MODES))
        _check_choice("prediction_type", self.prediction_type, (None, *PREDICTION_TYPES))
        _check_choice("dtype", self.dtype, tuple(convert.DTYPES))
        _check_choice("lora_format", self.lora_format, lora_files.FORMATS)
        _check_choice("lora_mode", self.lora_mode, LORA_MODES)
        if self.cache_latents is not None and (self.crop == "random" or self.random_flip):
            raise ConfigError("cache_latents", "cached latents are computed once, so random crops and flips cannot "
                                               "be applied per epoch: use crop='center' and random_flip=False, or "
                                               "do not cache")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

def _is_int(value: Any) -> bool:
    # Python ints only: bools are ints to Python but not counts, and numpy ints would not survive the JSON of
    # the checkpoint's config (`to_dict`).
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(name, f"must be an integer {allowed}, got {value!r}")


def _check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                  extra: str = "") -> None:
    """A finite int or float (not bool), optionally > above or >= at_least."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f" > {above}" if above is not None else f" >= {at_least}" if at_least is not None else ""
        raise ConfigError(name, f"must be a finite number{bound}{extra}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
        raise ConfigError(name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_texts(name: str, values: Any) -> None:
    """A tuple or list of strings storable as UTF-8 (not one bare string, which would iterate by character)."""
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        raise ConfigError(name, f"must be a tuple of strings, got {values!r}")
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(name, f"must hold strings only, got {v!r}")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # e.g. undecodable command-line bytes, kept as surrogates
            raise ConfigError(name, f"{v!r} is not valid UTF-8 text") from None


def _check_targets(targets: Any) -> None:
    """A lora.TARGET_SETS name, or names and kernel-path regexes (that they match the model is checked in
    `train.train_lora`, with the model's parameter shapes)."""
    names = (targets,) if isinstance(targets, str) else targets
    _check_texts("targets", names)
    if not names:
        raise ConfigError("targets", f"must name at least one target set ({', '.join(lora_lib.TARGET_SETS)}) or "
                                     "kernel-path regex")
    for n in names:
        if n in lora_lib.TARGET_SETS:
            continue
        if not n:
            raise ConfigError("targets", "an empty pattern would match every kernel; name a target set "
                                         f"({', '.join(lora_lib.TARGET_SETS)}) or a kernel-path regex")
        try:
            re.compile(n)
        except re.error as e:
            raise ConfigError("targets", f"{n!r} is neither a target set ({', '.join(lora_lib.TARGET_SETS)}) "
                                         f"nor a valid regex: {e}") from None


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 0 over cfg.steps, global-norm clipping, and
    gradient accumulation over cfg.grad_accum micro-batches (the schedule counts optimizer updates)."""
    return optax.MultiSteps(optax.chain(*_clip(cfg), optax.adamw(learning_rate(cfg), weight_decay=cfg.weight_decay)),
                            every_k_schedule=cfg.grad_accum)


def _clip(cfg: TrainConfig) -> list[optax.GradientTransformation]:
    return [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to cfg.lr over warmup_steps, then cosine decay to 0 at cfg.steps."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1))


def init_lora(cfg: TrainConfig, params: dict, key: jax.Array) -> Any:
    """Fresh LoRA params (float32) for the base params."""
    return lora_lib.init(key, params, cfg.rank, cfg.alpha, target_patterns(cfg.targets), dtype=jnp.float32)


def target_patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target set names (lora.TARGET_SETS) expanded; other entries are kernel-path regexes."""
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    return tuple(p for n in names for p in lora_lib.TARGET_SETS.get(n, (n,)))


def merge(base_params: dict, lo: Any) -> dict:
    """Base params with the LoRA deltas added (alpha / rank scaling, scale 1)."""
    return lora_lib.merge(base_params, lo, 1.0)


def split_lora(lo: lora_lib.LoRA) -> tuple[lora_lib.LoRA, lora_lib.LoRA]:
    """(Dense entries, conv entries): the first run as a side branch, the second are merged."""
    dense = tuple(t for t in lo.targets if lo.weights[t.path]["down"].ndim == 2)
    conv = tuple(t for t in lo.targets if lo.weights[t.path]["down"].ndim != 2)
    pick = lambda ts: lora_lib.LoRA({t.path: lo.weights[t.path] for t in ts}, ts)
    return pick(dense), pick(conv)


def cast_params(params: Any, dtype: Any) -> Any:
    """Floating leaves cast to dtype (done once, outside the step)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def example_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per example of the global batch: fold_in(key, b)."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def diffusion_loss(models: sampling.Models, params: dict, batch: dict, key: jax.Array, alphas_cumprod: jax.Array,
                   prediction_type: str, min_snr_gamma: float | None, lo: lora_lib.LoRA | None = None,
                   mode: str = "branch") -> jax.Array:
    """The (optionally min-SNR weighted) mean squared error of the UNet's eps or v prediction.

    batch: {"pixels" [B, H, W, 3] in [-1, 1], "ids" [B, 77]} or cached {"latents" [B, h, w, C] (diffusion
    latents, already scaled), "context" [B, 77, D]}.
    lo: the LoRA applied to params; mode "merge" adds every delta to its kernel (`lora.merge`), "branch"
    (the same function) merges only conv entries and runs Dense ones as a side branch (`lora.branch`), which
    keeps small updates visible in half precision and materialises no merged kernels.
    """
    dense, conv = (split_lora(lo) if mode == "branch" else (None, lo)) if lo is not None else (None, None)
    if conv is not None and conv.targets:
        params = merge(params, conv)
    keys = example_keys(key, _batch_size(batch))
    z0 = _latents(models, params, batch, keys)
    if "context" in batch:
        context = batch["context"]
    else:
        with _maybe_branch(dense, "text_encoder"):
            context = sampling.encode_text(models, params, batch["ids"])
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, TAG_T), (), 0, alphas_cumprod.shape[0]))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, TAG_NOISE), z0.shape[1:]))(keys)
    x_t = schedulers.ddpm_add_noise(alphas_cumprod, z0, noise, t)
    dtype = models.unet.dtype
    with _maybe_branch(dense, "unet"):
        out = models.unet.apply({"params": params["unet"]}, x_t.astype(dtype), t, context.astype(dtype))
    target = schedulers.velocity(alphas_cumprod, z0, noise, t) if prediction_type == "v_prediction" else noise
    mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))
    return jnp.mean(mse * snr_weights(alphas_cumprod, t, prediction_type, min_snr_gamma))


def _maybe_branch(lo: lora_lib.LoRA | None, component: str):
    return lora_lib.branch(lo, component) if lo is not None and lo.targets else contextlib.nullcontext()


def snr_weights(alphas_cumprod: jax.Array, t: jax.Array, prediction_type: str,
                gamma: float | None) -> jax.Array:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023); ones when gamma is None."""
    if gamma is None:
        return jnp.ones(t.shape, jnp.float32)
    snr = schedulers.snr(alphas_cumprod, t)
    clipped = jnp.minimum(snr, gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _batch_size(batch: dict) -> int:
    return (batch["latents"] if "latents" in batch else batch["pixels"]).shape[0]


def _latents(models: sampling.Models, params: dict, batch: dict, keys: jax.Array) -> jax.Array:
    """Diffusion latents z0 [B, h, w, C] float32: cached, or a VAE posterior sample x scaling_factor."""
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    mean, logvar = models.vae.apply({"params": params["vae"]}, batch["pixels"], method=VAE.encode)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, TAG_POSTERIOR), mean.shape[1:]))(keys)
    z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
    return jax.lax.stop_gradient(sampling.from_vae_latents(models, z))


def make_train_step(models: sampling.Models, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                    mesh, scheduler_config: schedulers.SchedulerConfig, *,
                    optimization_effort: float = 0.0) -> jax.stages.Wrapped:
    """`train_step(lora, opt_state, base_params, batch, key) -> (lora, opt_state, metrics)`, jitted once.

    The batch is sharded over the mesh's "data" axis, everything else replicated; lora and opt_state buffers
    are donated; base_params are only read. metrics: {"loss", "grad_norm"} (before clipping).
    optimization_effort: XLA's run time vs compile time trade (`parallel.compiler_options`).
    """
    models = models.for_mesh(mesh)  # attention kernels for the mesh's devices (keeps an explicit override)
    prediction_type = cfg.prediction_type or scheduler_config.prediction_type
    alphas_cumprod = jnp.asarray(schedulers.alphas_cumprod(scheduler_config), jnp.float32)

    def step(lo, opt_state, base_params, batch, key):
        def loss_fn(lo):
            return diffusion_loss(models, base_params, batch, key, alphas_cumprod, prediction_type,
                                  cfg.min_snr_gamma, lo, cfg.lora_mode)

        loss, grads = jax.value_and_grad(loss_fn)(lo)
        updates, opt_state = optimizer.update(grads, opt_state, lo)
        lo = optax.apply_updates(lo, updates)
        return lo, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(rep, rep, rep, shard, rep),
                   out_shardings=(rep, rep, rep),
                   compiler_options=parallel.compiler_options(mesh, optimization_effort))
