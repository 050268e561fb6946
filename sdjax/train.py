"""LoRA fine-tuning of Stable Diffusion: the training loop around `sdjax.train_step` (the step, its loss and
`TrainConfig`), with resumable orbax checkpoints, SIGTERM/SIGINT handling, metrics and sample images.

    cfg = TrainConfig(rank=8, steps=1000, batch_size=4, resolution=512)
    result = train_lora("my_images/", "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/me", cfg)
    # runs/me/checkpoints/<step>/ (orbax), runs/me/samples/*.png, runs/me/lora.safetensors, runs/me/metrics.jsonl

Every setting, the data, the out folder and the model's configs are checked before the model loads and
before anything is written (`check_run`). The objective and the precision are `sdjax.train_step`'s. The
command line (`sdjax train-lora`, parsed in `sdjax.cli`) runs `run_train_lora`.

Steps: `cfg.steps` counts optimizer updates; each update averages `cfg.grad_accum` micro-batches
(`optax.MultiSteps`). Checkpoints are numbered by micro-step (`state.step`, = updates x grad_accum).

Randomness: everything comes from `cfg.seed`. The LoRA init uses fold_in(key(seed), 0); micro-step s uses
fold_in(fold_in(key(seed), 1), s) and example b of its global batch fold_in(that, b), so results do not
depend on the device count, and a resumed run (which restores LoRA, optimizer state, step, key and data
position) is bitwise the same as an uninterrupted one.

Multi-process (multi-host) runs: every process makes the same `train_lora` call (same data, settings and `out`,
`out` on a file system that all of them see: orbax writes each checkpoint collectively, every process its own
part) after joining the run (`parallel.initialize`, or `distributed=`: the CLI's --coordinator/--num-processes/
--process-id/--distributed, joined once the checks that need no device have passed). The LoRA, its optimizer
state and the run key are replicated global arrays. Data, sharded by process: every process draws the same
global batches and positions (the order depends on the seed only; the data position in checkpoints is global),
but reads and decodes only the rows of each global batch that its own devices hold (`parallel.process_rows`;
a contiguous block per process with the default mesh) and puts them into the global batch
(`parallel.put_rows`), so each image of a step is decoded by one process. A bad image found while loading is
agreed on by all processes (one small all-gather per batch, only with raw images) and skipped alike (or stops
all of them with bad_images="error"). The up-front data check (`check_run`, before joining) still decodes
every image once in every process, and so does making the latent cache (see below); with cache_latents a row
is an index into the cached arrays. A
SIGTERM/SIGINT received by any process stops all of them after the same step (they agree after every step;
a process that stopped alone would hang the others in the next collective). Process 0 alone writes
metrics.jsonl, the sample PNGs (every process runs the sampling: it is a collective) and the exported LoRA;
the latent cache file is written by process 0, and the others reuse it, or write their own copy where they do
not see process 0's disk. The result is that of one process with the same devices and global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from sdjax import data, parallel, sampling
from sdjax import lora as lora_lib

# TrainConfig, make_optimizer and make_train_step are also used as train.X (scripts/lora_memory.py).
from sdjax.train_step import (
    TAG_INIT,
    TAG_POSTERIOR,
    TAG_STEPS,
    ConfigError,
    TrainConfig,
    init_lora,
    learning_rate,
    make_optimizer,
    make_train_step,
    merge,
    target_patterns,
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
    stop_signal: int | None = None  # the signal that stopped it (signal.SIGTERM or signal.SIGINT), if stopped


class InputError(ValueError):
    """The data or the model named by an argument of `train_lora` cannot be used (no such folder, no images,
    a missing caption, an unreadable image, a model that does not load). `field` names the argument ("data_dir"
    or "model"); the message names the file; the original error is the __cause__."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


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
    loop can finish its step, save and return. A second SIGINT goes to the handler installed before (the CLI's
    exit-now, Python's KeyboardInterrupt in a notebook), or raises KeyboardInterrupt when that is not a Python
    function (SIG_DFL, SIG_IGN). Handlers are installed only on the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            previous = self._previous.get(signal.SIGINT)
            if callable(previous):
                previous(signum, frame)
                return
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
               export: bool = True, compilation_cache: str | os.PathLike | None = None,
               distributed: parallel.Distributed | None = None,
               optimization_effort: float | None = None) -> TrainResult:
    """Trains a LoRA on a folder of captioned images (see `sdjax.data`) and writes into `out`:
    checkpoints/ (orbax; resumed from when resume=True), samples/ (every cfg.sample_every updates),
    metrics.jsonl (one line per micro-step) and lora.safetensors (`lora.save`, cfg.lora_format) at the end.

    model: a diffusers folder or hub id (loaded in cfg.dtype), or a loaded `Pipeline` (its params are cast to
    cfg.dtype once; they are never modified). SIGTERM/SIGINT stop after the current step with a checkpoint.
    max_steps: stop (with a checkpoint, without the export) after this many micro-steps in total, e.g. to
    run a schedule for cfg.steps in several pieces.
    compilation_cache: as `load_pipeline`'s (turned on after the checks have passed).
    distributed: a multi-process run to join (`parallel.initialize`) once the checks that need no device have
    passed (see `check_run`); None: join nothing here (a single process, or one that joined already).
    optimization_effort: XLA's effort at making the train step fast, in [-1, 1] (`parallel.EFFORT_RANGE`;
    lower compiles faster); None: the pipeline's (0, XLA's default, for a model loaded here).

    Everything is checked before the model loads and before anything is written (`check_run`): ConfigError
    (a ValueError) names a bad setting or argument, InputError (a ValueError) data or a model that cannot be
    used; `out` is created only after every check has passed.
    """
    from sdjax import pipeline as pipeline_lib

    out = Path(out)
    if optimization_effort is not None:
        try:
            parallel.check_effort(optimization_effort)
        except ValueError:
            raise ConfigError("optimization_effort", f"{parallel.EFFORT_RULE}, got {optimization_effort!r}") from None
    checked = check_run(data_dir, model, out, cfg, resume=resume, max_steps=max_steps, distributed=distributed)
    # No process writes (out/, checkpoints, the latent cache) before every process has passed its checks, so a
    # process still checking `out` never sees another's first writes.
    parallel.sync("sdjax.train: checked")
    if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
        # Seen with jax 0.10.2 on CPU (gloo collectives): a 2-process run whose train step came from the
        # persistent cache (a rerun, to resume) failed in its first step; compiled afresh it runs.
        compilation_cache = None
    try:
        pipe = model if isinstance(model, pipeline_lib.Pipeline) else pipeline_lib.load_pipeline(
            model, dtype=cfg.dtype, compilation_cache=compilation_cache,
            optimization_effort=optimization_effort or 0.0)
    except (OSError, ValueError) as e:
        raise InputError("model", f"could not load {str(model)!r}: {e}") from e
    pipe = pipe.astype(cfg.dtype)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last)
    try:
        optimizer = make_optimizer(cfg)
        state = initial_state(cfg, pipe, optimizer)
        dataset = make_dataset(data_dir, cfg, pipe, out / "latent_cache.safetensors", folder=checked)
        state = (ckpt.restore_latest(state) if resume else None) or state
        _warn_changed(ckpt.restored_config, cfg)
        effort = pipe.optimization_effort if optimization_effort is None else optimization_effort
        step_fn = make_train_step(pipe.models, cfg, optimizer, pipe.mesh, pipe.scheduler_config,
                                  optimization_effort=effort)
        state, losses, stopped_by = _loop(step_fn, state, pipe, dataset, ckpt, cfg, out, progress, max_steps)
    finally:
        ckpt.close()
    path = None
    if export and stopped_by is None and state.step >= cfg.steps * cfg.grad_accum and jax.process_index() == 0:
        path = out / "lora.safetensors"
        lora_lib.save(path, parallel.local_copy(state.lora), format=cfg.lora_format)
    return TrainResult(state.lora, state.step, losses, stopped_by is not None, out, path, stopped_by)


def check_run(data_dir: str | Path, model: Any, out: str | Path, cfg: TrainConfig, *, resume: bool = True,
              max_steps: int | None = None, distributed: parallel.Distributed | None = None
              ) -> data.ImageCaptionDataset:
    """`train_lora`'s checks, all before the model loads and writing nothing: the settings, the out folder
    (a folder or creatable, writable, and without checkpoints unless resuming), the data (every image
    decoded once and captioned), the device count, and the model's configs (read without weights: the targets
    must match its kernels). Cheap checks first; a hub id is downloaded only after the others have passed.
    Returns the checked dataset. Raises ConfigError or InputError (see `train_lora`).
    distributed: joins that multi-process run (`parallel.initialize`) after the settings, out and data checks,
    before the device count is read (the first thing that touches a device, which must come after joining)."""
    from sdjax import pipeline as pipeline_lib

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a sdjax.train_step.TrainConfig, got {type(cfg).__name__}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError("max_steps", f"must be an integer >= 1 (or None), got {max_steps!r}")
    _check_out(Path(out), resume)
    images = _check_data(data_dir, cfg)
    if distributed is not None:
        parallel.initialize(distributed)
    is_pipe = isinstance(model, pipeline_lib.Pipeline)
    devices = model.mesh.devices.size if is_pipe else jax.device_count()
    if cfg.batch_size % devices:
        raise ConfigError("batch_size", f"must be a multiple of the device count {devices}, got {cfg.batch_size}")
    shapes = {c: model.params[c] for c in lora_lib.COMPONENTS} if is_pipe else _model_shapes(model)
    try:
        paths = lora_lib.select(shapes, target_patterns(cfg.targets))
    except lora_lib.LoRAError as e:
        raise ConfigError("targets", str(e)) from None
    if cfg.cache_latents and any(p.startswith("text_encoder/") for p in paths):
        raise ConfigError("cache_latents", "cached text embeddings are fixed, so a text-encoder LoRA would not "
                                           "train: target only the UNet, or do not cache")
    return images


def _check_out(out: Path, resume: bool) -> None:
    """`out` is a folder or can be made one, can be written to (probed: os.access says yes to root on a
    read-only or virtual file system), and holds no checkpoints unless resuming."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{str(out)!r} is a file, not a folder")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("out", f"{str(out)!r} cannot be created: {str(existing)!r} is a file")
    try:  # a uniquely named empty folder, removed at once
        os.rmdir(tempfile.mkdtemp(prefix=".sdjax-write-probe-", dir=existing))
    except OSError as e:
        raise ConfigError("out", f"{str(out)!r} cannot be written ({str(existing)!r}: {e.strerror or e})") from None
    folder = out / "checkpoints"
    if folder.exists() and not folder.is_dir():
        raise ConfigError("out", f"{str(out)!r} cannot be used: {str(folder)!r} is a file, not a folder")
    # Listed without opening a CheckpointManager, which would create the folder and clean up in it.
    steps = sorted(ocp.path.step.checkpoint_steps(folder)) if folder.is_dir() else []
    if steps and not resume:
        raise ConfigError("resume", f"{str(folder)!r} already holds checkpoints {steps}: resume from them, or "
                                    "choose another out folder")


def _check_data(data_dir: str | Path, cfg: TrainConfig) -> data.ImageCaptionDataset:
    """The dataset, scanned and every image decoded once (so a bad folder fails before the model loads)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError("data_dir", f"{str(folder)!r} {what}")
    try:
        ds = data.ImageCaptionDataset(folder, cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip,
                                      seed=cfg.seed, bad_images=cfg.bad_images)
        return ds.check()
    except (OSError, ValueError) as e:
        raise InputError("data_dir", str(e)) from e


def _model_shapes(model: Any) -> dict[str, Any]:
    """The UNet's and text encoder's parameter shapes from the model folder's configs (no weights read)."""
    from sdjax import checkpoint, io

    try:
        folder = io.resolve_model(model)
        configs = {kind: checkpoint.read_config(folder / kind, kind) for kind in lora_lib.COMPONENTS}
    except (OSError, ValueError) as e:  # no such folder, a missing or bad config.json (CheckpointError)
        raise InputError("model", f"could not read {str(model)!r}: {e}") from e
    return {kind: checkpoint.abstract_params(kind, c) for kind, c in configs.items()}


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


def make_dataset(data_dir: str | Path, cfg: TrainConfig, pipe, cache_file: str | Path | None = None, *,
                 folder: data.ImageCaptionDataset | None = None) -> data.ImageCaptionDataset | data.CachedDataset:
    """The training data of a run: raw images, or their cached latents and text embeddings (kept in
    `cache_file` when given, and reused from it while the images, captions, model and settings match).
    folder: the folder's dataset when already made (e.g. checked by `check_run`)."""
    ds = folder if folder is not None else data.ImageCaptionDataset(
        data_dir, cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip, seed=cfg.seed,
        bad_images=cfg.bad_images)
    if cfg.cache_latents is None:
        return ds
    images, captions = cache_encoders(pipe, cfg)
    model, mode = f"{pipe.source}|{cfg.dtype}|seed={cfg.seed}", cfg.cache_latents

    def cache() -> data.CachedDataset:
        return ds.cache(images, captions, mode=mode, path=cache_file, batch_size=cfg.batch_size,
                        fingerprint=model)

    if jax.process_count() == 1 or cache_file is None:
        return cache()
    # Several processes: the encoders run on each process's own device (`cache_encoders`), so process 0 makes
    # (or reuses) the file alone first; the others then find it matching where they see process 0's disk, and
    # encode and write their own copy where they do not: each file is written once.
    cached = cache() if jax.process_index() == 0 else None
    parallel.sync("sdjax.train: latent cache")
    return cached if cached is not None else cache()


def cache_encoders(pipe, cfg: TrainConfig) -> tuple[Callable, Callable]:
    """(encode_images(pixels, ids), encode_captions(texts)) for `data.ImageCaptionDataset.cache`: the VAE
    posterior mean, or one sample from fold_in(key(seed), example id) (mode "sample"), x scaling_factor.
    In a multi-process run they compute on this process's first device only (no collective: processes encode
    independently, see `make_dataset`); in one process on the pipeline's mesh, as every other call."""
    models = pipe.models
    params = pipe.params
    if jax.process_count() > 1:
        params = parallel.local_copy(params)
        # Kernels for that one device: a kernel run per batch shard of the pipeline's (global) mesh would spread
        # this process's encoding over every process (and its result would not be this process's to read).
        models = models.for_mesh(parallel.make_mesh(jax.local_devices()[:1]))
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
    """Step 0: fresh LoRA, its optimizer state and the run key (all replicated over the mesh), the data's first
    position."""
    key = jax.random.key(cfg.seed)
    lo = parallel.put_replicated(init_lora(cfg, pipe.params, jax.random.fold_in(key, TAG_INIT)), pipe.mesh)
    opt_state = parallel.put_replicated(optimizer.init(lo), pipe.mesh)
    # The key as a global array too: orbax saves only global arrays in a multi-process run, and the steps' keys
    # folded from it are then global as the jitted step expects.
    key = jax.random.wrap_key_data(parallel.put_replicated(np.asarray(jax.random.key_data(key)), pipe.mesh))
    return TrainState(lo, opt_state, 0, key, data.DataPosition())


def _host_batches(dataset, cfg: TrainConfig, pipe, position: data.DataPosition):
    """The run's host batches from `position`: whole global batches in a single-process run; in a multi-process
    run only the rows of each global batch that this process's devices hold (`parallel.process_rows`), the
    others neither read nor decoded here. Every process draws the same global batches and positions; a bad image
    found while loading is agreed on (`parallel.all_processes_max`, once per batch) so all skip it alike."""
    if jax.process_count() == 1:
        return dataset.batches(cfg.batch_size, position)
    rows = parallel.process_rows(pipe.mesh, cfg.batch_size)
    return dataset.batches(cfg.batch_size, position, rows=rows, agree=parallel.all_processes_max)


def _device_batch(batch: dict, pipe, size: int | None = None) -> dict:
    """Host batch -> the step's inputs (captions tokenized), sharded over the mesh. size=None: `batch` is the
    whole global batch (every process passes the same one); else it holds this process's rows of a global batch
    of `size` rows (`_host_batches`'s in a multi-process run)."""
    if "latents" in batch:
        arrays = {"latents": batch["latents"], "context": batch["context"]}
    else:
        arrays = {"pixels": batch["pixels"], "ids": pipe.tokenizer(batch["caption"])}
    if size is None:
        return parallel.put_batch(arrays, pipe.mesh)
    return parallel.put_rows(arrays, pipe.mesh, parallel.process_rows(pipe.mesh, size), size)


def _loop(step_fn, state: TrainState, pipe, dataset, ckpt: Checkpointer, cfg: TrainConfig, out: Path,
          progress: bool | None, max_steps: int | None) -> tuple[TrainState, list[float], int | None]:
    """Runs micro-steps until cfg.steps updates (or max_steps), a signal, saving and sampling on the way.
    Returns the state, the losses and the signal that stopped it (None: ran to the end)."""
    total = cfg.steps * cfg.grad_accum
    stop_at = total if max_steps is None else min(total, max_steps)
    every, sample_every = cfg.checkpoint_every * cfg.grad_accum, cfg.sample_every * cfg.grad_accum
    step_keys = jax.random.fold_in(state.key, TAG_STEPS)
    prompts = list(cfg.sample_prompts) or _first_caption(dataset)
    losses: list[float] = []
    primary = jax.process_index() == 0  # process 0 alone reports and writes metrics
    bar = _bar(progress, total, state.step) if primary else None
    log = _MetricsLog(out / "metrics.jsonl", state.step) if primary else None
    stopped_by = None
    with StopSignals() as signals:
        batches = _host_batches(dataset, cfg, pipe, state.position)
        rows_of = None if jax.process_count() == 1 else cfg.batch_size  # multi-process: this process's rows only
        while state.step < stop_at:
            batch, position = next(batches)
            t0 = time.perf_counter()
            lo, opt_state, metrics = step_fn(state.lora, state.opt_state, pipe.params,
                                             _device_batch(batch, pipe, rows_of),
                                             jax.random.fold_in(step_keys, state.step))
            state = TrainState(lo, opt_state, state.step + 1, state.key, position)
            loss = float(metrics["loss"])
            losses.append(loss)
            lr = float(learning_rate(cfg)(state.step // cfg.grad_accum))
            seconds = time.perf_counter() - t0
            if log is not None:
                log.write(state.step, loss=loss, grad_norm=float(metrics["grad_norm"]), lr=lr, seconds=seconds)
            _tick(bar, loss, seconds)
            stopped_by = _agreed_signal(signals.received)
            if stopped_by is not None:
                break
            if every and state.step % every == 0:
                ckpt.save(state, cfg)
            if sample_every and state.step % sample_every == 0:
                save_samples(pipe, state.lora, prompts, cfg, out / "samples", state.step // cfg.grad_accum)
    ckpt.save(state, cfg)
    if bar is not None:
        bar.close()
    return state, losses, stopped_by


def _agreed_signal(received: int | None) -> int | None:
    """The stop signal of this step as every process sees it: in a multi-process run the highest signal number
    any process received (SIGTERM over SIGINT), so all stop after the same step; a process that stopped alone
    would hang the others in their next collective. One small all-gather per step, only with several
    processes."""
    if jax.process_count() == 1:
        return received
    agreed = int(parallel.all_processes_max(np.array([received or 0], np.int32))[0])
    return agreed or None


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
    """txt2img with the LoRA merged into the pipeline's params -> folder/update-<n>-<i>.png. Every process of a
    multi-process run must call it (the sampling is a collective); process 0 alone writes (the others return
    [])."""
    view = pipe.with_params(merge(pipe.params, lo))  # the same jitted functions: nothing recompiles
    gen = view.txt2img(list(prompts), steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                       height=cfg.resolution, width=cfg.resolution, seeds=cfg.seed, progress=False)
    if jax.process_index() != 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"update-{update:06d}-{i}.png" for i in range(len(gen.images))]
    for img, p in zip(gen.images, paths):
        img.save(p)
    return paths


# train_lora's arguments and TrainConfig fields -> `sdjax train-lora` flags (others: --field-name).
_FLAGS = {"data_dir": "--data", "resume": "--no-resume", "lora_format": "--format", "sample_prompts": "--sample-prompt",
          "crop": "--random-crop"}


def cli_flag(field: str) -> str:
    """The `sdjax train-lora` flag of a TrainConfig field or train_lora argument (ConfigError.field)."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def run_train_lora(args: argparse.Namespace) -> int:
    """`sdjax train-lora`: 0 when finished or stopped by SIGTERM after saving (a preemption: rerun to resume),
    130 when stopped by Ctrl-C (SIGINT) after saving, 2 on a bad setting or argument (--out included), 1 when
    the data or the model cannot be used. Every check runs before the model loads; on an error nothing is
    written. Multi-process: --coordinator/--num-processes/--process-id (else $SDJAX_COORDINATOR,
    $SDJAX_NUM_PROCESSES, $SDJAX_PROCESS_ID) or --distributed join the run once the checks that need no device
    have passed; every process runs the same command, process 0 reports."""
    from sdjax.cli import config_from_args  # the flags are parsed beside the others

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"sdjax train-lora: error: {e}", file=sys.stderr)
        return 2
    try:  # getattr: a Namespace built by hand may lack the multi-process flags
        dist = parallel.distributed_from(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                         getattr(args, "process_id", None), os.environ,
                                         auto=getattr(args, "distributed", False))
    except ValueError as e:
        print(f"sdjax train-lora: error: --coordinator/--num-processes/--process-id: {e}", file=sys.stderr)
        return 2
    from sdjax import process

    try:  # the compilation cache is on by default for the CLI ($SDJAX_CACHE_DIR or ~/.cache/sdjax/xla)
        # check_run (inside) calls parallel.initialize(dist) after the cheap checks, before any device is used.
        result = train_lora(args.data, args.model, args.out, cfg, resume=not args.no_resume,
                            progress=False if args.no_progress else None,
                            compilation_cache=process.default_cache_dir(), distributed=dist,
                            optimization_effort=getattr(args, "optimization_effort", None))
    except ConfigError as e:
        print(f"sdjax train-lora: error: {cli_flag(e.field)}: {e.message}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"sdjax train-lora: error: {cli_flag(e.field)}: {e.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # during training: a bad image with --bad-images error, a full disk
        print(f"sdjax train-lora: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() != 0:  # process 0 reports for all (they stopped or finished at the same step)
        return 130 if result.stop_signal == signal.SIGINT else 0
    saved = f"checkpoint saved in {result.out / 'checkpoints'}"
    if result.stop_signal == signal.SIGINT:
        print(f"sdjax train-lora: interrupted: stopped at step {result.step}; {saved} (rerun to resume)",
              file=sys.stderr)
        return 130
    if result.stopped:
        print(f"stopped at step {result.step}; {saved}", file=sys.stderr)
    else:
        print(f"trained {result.step} steps; LoRA: {result.export}")
    return 0
