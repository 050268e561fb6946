"""LoRA fine-tuning of Stable Diffusion: one jitted, data-parallel step; resumable orbax checkpoints.

    cfg = TrainConfig(rank=8, steps=1000, batch_size=4, resolution=512)
    result = train_lora("my_images/", "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/me", cfg)
    # runs/me/checkpoints/<step>/ (orbax), runs/me/samples/*.png, runs/me/lora.safetensors, runs/me/metrics.jsonl

The objective is DDPM's noise prediction (Ho et al. 2020): latents z0 = VAE posterior sample (or cached
latents) x scaling_factor, t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and
the UNet (base params with the LoRA merged in) regresses eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0
for v-prediction checkpoints, with mean squared error; optionally weighted per example by min-SNR-gamma
(Hang et al. 2023): min(snr, gamma) / snr for eps, min(snr, gamma) / (snr + 1) for v.

Precision: the frozen base params and the compute are `cfg.dtype` (bfloat16 by default: the pipeline is
loaded in it); the LoRA params, their gradients and the optimizer state are float32.

Steps: `cfg.steps` counts optimizer updates; each update averages `cfg.grad_accum` micro-batches
(`optax.MultiSteps`). Checkpoints are numbered by micro-step (`state.step`, = updates x grad_accum).

Randomness: everything comes from `cfg.seed`. The LoRA init uses fold_in(key(seed), 0); micro-step s uses
fold_in(fold_in(key(seed), 1), s) and example b of its global batch fold_in(that, b), so results do not
depend on the device count, and a resumed run (which restores LoRA, optimizer state, step, key and data
position) is bitwise the same as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Self, Sequence

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from sdjax import convert, data, parallel, sampling, schedulers
from sdjax import lora as lora_lib
from sdjax.vae import VAE

PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_MODES = ("branch", "merge")
TAG_INIT, TAG_STEPS = 0, 1  # fold_in tags of the run key
TAG_T, TAG_NOISE, TAG_POSTERIOR = 0, 1, 2  # fold_in tags of an example's key


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
        positive = {"rank": self.rank, "steps": self.steps, "grad_accum": self.grad_accum,
                    "batch_size": self.batch_size, "resolution": self.resolution, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "checkpoint_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.prediction_type not in (None, *PREDICTION_TYPES):
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        convert.parse_dtype(self.dtype)
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None), got {self.min_snr_gamma}")
        if self.cache_latents is not None and (self.crop == "random" or self.random_flip):
            raise ValueError("cache_latents fixes the latents once, so random crops and flips cannot be applied "
                             "per epoch: use crop='center' and random_flip=False, or do not cache")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: LoRA params, optimizer state, micro-step, run key and data position."""

    lora: Any
    opt_state: Any
    step: int
    key: jax.Array
    position: data.DataPosition


@dataclasses.dataclass
class TrainResult:
    lora: Any
    step: int
    losses: list[float]  # per micro-step of this process's run
    stopped: bool  # ended early by SIGTERM/SIGINT (after saving)
    out: Path
    export: Path | None


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


def lora_branch(lo: lora_lib.LoRA, component: str):
    """A flax method interceptor adding the LoRA side branch y += alpha/rank * (x @ down) @ up (in the
    layer's compute dtype) to every adapted Dense of `component`; the base kernel is used as it is."""
    entries = {tuple(t.path.split("/")[1:-1]): t for t in lo.targets if t.path.startswith(component + "/")}

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        t = entries.get(context.module.path) if context.method_name == "__call__" else None
        if t is None or not isinstance(context.module, nn.Dense):
            return y
        w, dtype = lo.weights[t.path], y.dtype
        h = jnp.dot(args[0].astype(dtype), w["down"].astype(dtype))
        return y + (jnp.dot(h, w["up"].astype(dtype)) * (t.alpha / t.rank)).astype(dtype)

    return nn.intercept_methods(intercept)


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
    (the same function) merges only conv entries and runs Dense ones as a side branch, which keeps small
    updates visible in half precision and materialises no merged kernels.
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
    return lora_branch(lo, component) if lo is not None and lo.targets else contextlib.nullcontext()


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
                    mesh, scheduler_config: schedulers.SchedulerConfig) -> Callable:
    """`train_step(lora, opt_state, base_params, batch, key) -> (lora, opt_state, metrics)`, jitted once.

    The batch is sharded over the mesh's "data" axis, everything else replicated; lora and opt_state buffers
    are donated; base_params are only read. metrics: {"loss", "grad_norm"} (before clipping).
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
                   out_shardings=(rep, rep, rep))


class Checkpointer:
    """Orbax checkpoints of a `TrainState` in `directory/<step>/`, the last `keep_last` kept.

    Saves are synchronous (a LoRA state is small) and atomic: orbax writes `<step>.orbax-checkpoint-tmp-*`
    and renames it when complete, and only finalized steps are listed, so a save killed half-way is never
    picked up (its leftovers are removed when the next manager opens). A checkpoint that still fails to
    restore is skipped with a warning in favour of the one before it.
    """

    def __init__(self, directory: str | Path, keep_last: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.restored_config: dict[str, Any] = {}

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, cfg: TrainConfig) -> None:
        if state.step in self.manager.all_steps():
            return
        arrays = {"lora": state.lora, "opt_state": state.opt_state, "key": jax.random.key_data(state.key)}
        meta = {"step": state.step, "position": state.position.to_dict(), "config": cfg.to_dict()}
        self.manager.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                              meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, like: TrainState) -> TrainState | None:
        """The newest restorable checkpoint, with `like`'s structure and shardings; None if there is none."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                {"lora": like.lora, "opt_state": like.opt_state, "key": jax.random.key_data(like.key)})
        for step in reversed(self.steps()):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
                warnings.warn(f"checkpoint {self.directory / str(step)} could not be restored ({e}); "
                              "trying an older one", stacklevel=2)
                continue
            arrays, meta = got.state, got.meta
            self.restored_config = meta.get("config", {})
            return TrainState(arrays["lora"], arrays["opt_state"], int(meta["step"]),
                              jax.random.wrap_key_data(arrays["key"]), data.DataPosition.from_dict(meta["position"]))
        return None

    def close(self) -> None:
        self.manager.close()


class StopSignals:
    """Context manager: SIGTERM/SIGINT set `self.received` instead of killing the process, so the training
    loop can finish its step, save and return. A second SIGINT raises KeyboardInterrupt at once. Handlers are
    installed only on the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def train_lora(data_dir: str | Path, model: Any, out: str | Path, cfg: TrainConfig = TrainConfig(), *,
               resume: bool = True, progress: bool | None = None, max_steps: int | None = None,
               export: bool = True) -> TrainResult:
    """Trains a LoRA on a folder of captioned images (see `sdjax.data`) and writes into `out`:
    checkpoints/ (orbax; resumed from when resume=True), samples/ (every cfg.sample_every updates),
    metrics.jsonl (one line per micro-step) and lora.safetensors (`lora.save`, cfg.lora_format) at the end.

    model: a diffusers folder or hub id (loaded in cfg.dtype), or a loaded `Pipeline` (its params are cast to
    cfg.dtype once; they are never modified). SIGTERM/SIGINT stop after the current step with a checkpoint.
    max_steps: stop (with a checkpoint, without the export) after this many micro-steps in total, e.g. to
    run a schedule for cfg.steps in several pieces.
    """
    from sdjax import pipeline as pipeline_lib

    out = Path(out)
    pipe = model if isinstance(model, pipeline_lib.Pipeline) else pipeline_lib.load_pipeline(model, dtype=cfg.dtype)
    pipe = _in_dtype(pipe, cfg.dtype)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last)
    try:
        if not resume and ckpt.steps():
            raise ValueError(f"{ckpt.directory} already holds checkpoints {ckpt.steps()}: resume, or use another out")
        optimizer = make_optimizer(cfg)
        state = initial_state(cfg, pipe, optimizer)
        if cfg.cache_latents and any(p.startswith("text_encoder/") for p in state.lora.paths):
            raise ValueError("cache_latents fixes the text embeddings, so a text-encoder LoRA would not train; "
                             "target only the UNet or do not cache")
        dataset = make_dataset(data_dir, cfg, pipe, out / "latent_cache.safetensors")
        state = (ckpt.restore_latest(state) if resume else None) or state
        _warn_changed(ckpt.restored_config, cfg)
        step_fn = make_train_step(pipe.models, cfg, optimizer, pipe.mesh, pipe.scheduler_config)
        state, losses, stopped = _loop(step_fn, state, pipe, dataset, ckpt, cfg, out, progress, max_steps)
    finally:
        ckpt.close()
    path = None
    if export and not stopped and state.step >= cfg.steps * cfg.grad_accum:
        path = out / "lora.safetensors"
        lora_lib.save(path, state.lora, format=cfg.lora_format)
    return TrainResult(state.lora, state.step, losses, stopped, out, path)


# Settings a resumed run may change without breaking exact continuation.
_FREE_TO_CHANGE = ("checkpoint_every", "keep_last", "sample_every", "sample_prompts", "sample_steps",
                   "sample_guidance", "lora_format", "bad_images")


def _warn_changed(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Warns when a resumed run's settings differ from its checkpoint's (it then no longer reproduces a run)."""
    now = cfg.to_dict()
    changed = sorted(k for k in saved if k not in _FREE_TO_CHANGE and saved[k] != now.get(k))
    if changed:
        warnings.warn("resuming with settings that differ from the checkpoint's: " + ", ".join(
            f"{k}={saved[k]!r} -> {now.get(k)!r}" for k in changed), stacklevel=3)


def _in_dtype(pipe, dtype: Any):
    """The pipeline with params and modules in `dtype` (a shallow copy when they are not already)."""
    dtype = convert.parse_dtype(dtype)
    if pipe.models.unet.dtype == dtype and all(a.dtype == dtype for a in jax.tree.leaves(pipe.params)
                                               if jnp.issubdtype(a.dtype, jnp.floating)):
        return pipe
    view = copy.copy(pipe)
    view.models = pipe.models.astype(dtype)
    view.params = cast_params(pipe.params, dtype)
    view.dtype = dtype
    view._compiled = {}
    return view


def make_dataset(data_dir: str | Path, cfg: TrainConfig, pipe,
                 cache_file: str | Path | None = None) -> data.ImageCaptionDataset | data.CachedDataset:
    """The training data of a run: raw images, or their cached latents and text embeddings (kept in
    `cache_file` when given, and reused from it while the images, captions, model and settings match)."""
    ds = data.ImageCaptionDataset(data_dir, cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip,
                                  seed=cfg.seed, bad_images=cfg.bad_images)
    if cfg.cache_latents is None:
        return ds
    images, captions = cache_encoders(pipe, cfg)
    model = f"{pipe.source}|{cfg.dtype}|seed={cfg.seed}"
    return ds.cache(images, captions, mode=cfg.cache_latents, path=cache_file, batch_size=cfg.batch_size,
                    fingerprint=model)


def cache_encoders(pipe, cfg: TrainConfig) -> tuple[Callable, Callable]:
    """(encode_images(pixels, ids), encode_captions(texts)) for `data.ImageCaptionDataset.cache`: the VAE
    posterior mean, or one sample from fold_in(key(seed), example id) (mode "sample"), x scaling_factor."""
    models, params = pipe.models, pipe.params
    sample = cfg.cache_latents == "sample"

    @jax.jit
    def images(pixels, ids):
        mean, logvar = models.vae.apply({"params": params["vae"]}, pixels, method=VAE.encode)
        z = mean.astype(jnp.float32)
        if sample:
            key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
            eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), z.shape[1:]))(ids)
            z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
        return sampling.from_vae_latents(models, z)

    text = jax.jit(lambda ids: sampling.encode_text(models, params, ids).astype(jnp.float32))
    return images, lambda captions: text(pipe.tokenizer(captions))


def initial_state(cfg: TrainConfig, pipe, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: fresh LoRA (replicated), its optimizer state, the run key, the data's first position."""
    key = jax.random.key(cfg.seed)
    lo = parallel.put_replicated(init_lora(cfg, pipe.params, jax.random.fold_in(key, TAG_INIT)), pipe.mesh)
    opt_state = parallel.put_replicated(optimizer.init(lo), pipe.mesh)
    return TrainState(lo, opt_state, 0, key, data.DataPosition())


def _device_batch(batch: dict, pipe) -> dict:
    """Host batch -> the step's inputs (captions tokenized), sharded over the mesh."""
    if "latents" in batch:
        arrays = {"latents": batch["latents"], "context": batch["context"]}
    else:
        arrays = {"pixels": batch["pixels"], "ids": pipe.tokenizer(batch["caption"])}
    return parallel.put_batch(arrays, pipe.mesh)


def _loop(step_fn, state: TrainState, pipe, dataset, ckpt: Checkpointer, cfg: TrainConfig, out: Path,
          progress: bool | None, max_steps: int | None) -> tuple[TrainState, list[float], bool]:
    """Runs micro-steps until cfg.steps updates (or max_steps), a signal, saving and sampling on the way."""
    total = cfg.steps * cfg.grad_accum
    stop_at = total if max_steps is None else min(total, max_steps)
    if cfg.batch_size % pipe.mesh.devices.size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the device count "
                         f"{pipe.mesh.devices.size}")
    every, sample_every = cfg.checkpoint_every * cfg.grad_accum, cfg.sample_every * cfg.grad_accum
    step_keys = jax.random.fold_in(state.key, TAG_STEPS)
    prompts = list(cfg.sample_prompts) or _first_caption(dataset)
    losses: list[float] = []
    bar = _bar(progress, total, state.step)
    log = _MetricsLog(out / "metrics.jsonl", state.step)
    stopped = False
    with StopSignals() as signals:
        batches = dataset.batches(cfg.batch_size, state.position)
        while state.step < stop_at:
            batch, position = next(batches)
            t0 = time.perf_counter()
            lo, opt_state, metrics = step_fn(state.lora, state.opt_state, pipe.params, _device_batch(batch, pipe),
                                             jax.random.fold_in(step_keys, state.step))
            state = TrainState(lo, opt_state, state.step + 1, state.key, position)
            loss = float(metrics["loss"])
            losses.append(loss)
            lr = float(learning_rate(cfg)(state.step // cfg.grad_accum))
            seconds = time.perf_counter() - t0
            log.write(state.step, loss=loss, grad_norm=float(metrics["grad_norm"]), lr=lr, seconds=seconds)
            _tick(bar, loss, seconds)
            if signals.received is not None:
                stopped = True
                break
            if every and state.step % every == 0:
                ckpt.save(state, cfg)
            if sample_every and state.step % sample_every == 0:
                save_samples(pipe, state.lora, prompts, cfg, out / "samples", state.step // cfg.grad_accum)
    ckpt.save(state, cfg)
    if bar is not None:
        bar.close()
    return state, losses, stopped


def _first_caption(dataset) -> list[str]:
    examples = getattr(dataset, "examples", None)
    return [examples[0].caption] if examples else [""]


class _MetricsLog:
    """metrics.jsonl: one JSON line per micro-step (lines past `start`, left by a killed run, are dropped)."""

    def __init__(self, path: Path, start: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and _line_step(ln) <= start]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


def _bar(progress: bool | None, total: int, initial: int):
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="lora", unit="step")


def _tick(bar, loss: float, seconds: float) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{1.0 / max(seconds, 1e-9):.2f}", refresh=False)
        bar.update(1)


def save_samples(pipe, lo: Any, prompts: Sequence[str], cfg: TrainConfig, folder: Path, update: int) -> list[Path]:
    """txt2img with the LoRA merged into the pipeline's params -> folder/update-<n>-<i>.png."""
    view = copy.copy(pipe)
    view.params = merge(pipe.params, lo)
    gen = view.txt2img(list(prompts), steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                       height=cfg.resolution, width=cfg.resolution, seeds=cfg.seed, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"update-{update:06d}-{i}.png" for i in range(len(gen.images))]
    for img, p in zip(gen.images, paths):
        img.save(p)
    return paths


def add_train_lora_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`sdjax train-lora --data DIR --model M --rank R --steps N --out DIR ...` (run with `run_train_lora`)."""
    d = TrainConfig()
    p = subparsers.add_parser("train-lora", help="train a LoRA on a folder of captioned images",
                              description="LoRA fine-tuning on images with captions (name.txt beside each image, "
                              "or metadata.jsonl). Resumes from OUT/checkpoints; SIGTERM/Ctrl-C save and stop.")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images and captions")
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="diffusers-format folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoints, samples and the exported LoRA")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", nargs="+", default=None,
                   help=f"a target set ({', '.join(lora_lib.TARGET_SETS)}) or kernel-path regexes (default: unet)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer updates (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 turns clipping off")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--bad-images", choices=data.BAD_IMAGE_POLICIES, default=d.bad_images)
    p.add_argument("--cache-latents", choices=data.CACHE_MODES, default=None)
    p.add_argument("--min-snr-gamma", type=float, default=None)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=tuple(convert.DTYPES),
                   help="compute dtype of the frozen model (LoRA and optimizer state stay float32)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--sample-prompt", action="append", default=None, dest="sample_prompts")
    p.add_argument("--format", default=d.lora_format, dest="lora_format", help="LoRA export format")
    p.add_argument("--no-resume", action="store_true", help="fail if OUT already has checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_train_lora, parser=p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from `train-lora`'s arguments (ValueError names the bad setting)."""
    return TrainConfig(
        rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
        targets=_targets(args.targets), lr=args.lr, warmup_steps=args.warmup_steps,
        steps=args.steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        grad_accum=args.grad_accum, batch_size=args.batch_size, resolution=args.resolution,
        crop="random" if args.random_crop else "center", random_flip=args.random_flip, bad_images=args.bad_images,
        cache_latents=args.cache_latents, min_snr_gamma=args.min_snr_gamma, prediction_type=args.prediction_type,
        seed=args.seed, dtype=args.dtype, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
        sample_every=args.sample_every, sample_prompts=tuple(args.sample_prompts or ()), lora_format=args.lora_format)


def run_train_lora(args: argparse.Namespace) -> int:
    """`sdjax train-lora`: 0 when finished or stopped by a signal after saving, 2 on a bad setting, 1 when the
    data, the model or the output cannot be used."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"sdjax train-lora: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train_lora(args.data, args.model, args.out, cfg, resume=not args.no_resume,
                            progress=False if args.no_progress else None)
    except (OSError, ValueError) as e:  # missing data or model, bad images with --bad-images error, bad targets
        print(f"sdjax train-lora: error: {e}", file=sys.stderr)
        return 1
    if result.stopped:
        print(f"stopped at step {result.step}; checkpoint saved in {result.out / 'checkpoints'}", file=sys.stderr)
    else:
        print(f"trained {result.step} steps; LoRA: {result.export}")
    return 0


def _targets(values: list[str] | None) -> str | tuple[str, ...]:
    return tuple(values) if values else TrainConfig.targets
