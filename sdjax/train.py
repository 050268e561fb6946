"""LoRA fine-tuning of Stable Diffusion: the training loop around `sdjax.train_step` (the step, its loss and
`TrainConfig`), with resumable orbax checkpoints, SIGTERM/SIGINT handling, metrics and sample images.

    cfg = TrainConfig(rank=8, steps=1000, batch_size=4, resolution=512)
    result = train_lora("my_images/", "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/me", cfg)
    # runs/me/checkpoints/<step>/ (orbax), runs/me/samples/*.png, runs/me/lora.safetensors, runs/me/metrics.jsonl

The objective and the precision are `sdjax.train_step`'s. The command line (`sdjax train-lora`, parsed in
`sdjax.cli`) runs `run_train_lora`.

Steps: `cfg.steps` counts optimizer updates; each update averages `cfg.grad_accum` micro-batches
(`optax.MultiSteps`). Checkpoints are numbered by micro-step (`state.step`, = updates x grad_accum).

Randomness: everything comes from `cfg.seed`. The LoRA init uses fold_in(key(seed), 0); micro-step s uses
fold_in(fold_in(key(seed), 1), s) and example b of its global batch fold_in(that, b), so results do not
depend on the device count, and a resumed run (which restores LoRA, optimizer state, step, key and data
position) is bitwise the same as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from sdjax import data, parallel, sampling
from sdjax import lora as lora_lib

# TrainConfig, make_optimizer and make_train_step are also used as train.X (scripts/lora_memory.py).
from sdjax.train_step import (
    TAG_INIT,
    TAG_POSTERIOR,
    TAG_STEPS,
    TrainConfig,
    init_lora,
    learning_rate,
    make_optimizer,
    make_train_step,
    merge,
)
from sdjax.vae import VAE


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

    def __exit__(self, *exc) -> Literal[False]:
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
    pipe = pipe.astype(cfg.dtype)
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
            # The run key folded with 2 (TAG_POSTERIOR's number, taken by neither TAG_INIT nor TAG_STEPS); its
            # fold_in(., example id) then draws that example's posterior sample.
            key = jax.random.fold_in(jax.random.key(cfg.seed), TAG_POSTERIOR)
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
    view = pipe.with_params(merge(pipe.params, lo))  # the same jitted functions: nothing recompiles
    gen = view.txt2img(list(prompts), steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                       height=cfg.resolution, width=cfg.resolution, seeds=cfg.seed, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"update-{update:06d}-{i}.png" for i in range(len(gen.images))]
    for img, p in zip(gen.images, paths):
        img.save(p)
    return paths


def run_train_lora(args: argparse.Namespace) -> int:
    """`sdjax train-lora`: 0 when finished or stopped by a signal after saving, 2 on a bad setting, 1 when the
    data, the model or the output cannot be used."""
    from sdjax.cli import config_from_args  # the flags are parsed beside the others

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"sdjax train-lora: error: {e}", file=sys.stderr)
        return 2
    from sdjax import process

    process.enable_compilation_cache()  # on by default for the CLI ($SDJAX_CACHE_DIR or ~/.cache/sdjax/xla)
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


