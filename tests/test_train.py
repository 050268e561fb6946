"""sdjax.train and sdjax.train_step: the loss falls, base params stay untouched, SIGKILL/SIGTERM + resume is
bitwise exact, one step on 8 simulated devices equals one on 1 device; optimizer, min-SNR weights, the LoRA side
branch, checkpoints, signals and the CLI parser.

The runs share one small model (the tiny test UNet with two levels, to keep compiling short), one synthetic
data set (coloured circles and squares with captions) and one XLA cache (subprocesses reuse the compiled step).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageDraw

from sdjax import cli, data, lora, pipeline, schedulers, train, train_step
from sdjax.unet import UNetConfig
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("unet", r"^unet/conv_(in|out)/kernel$")
STEPS = 200
# The CLI flags of the reference configuration (the in-process run below uses the same TrainConfig).
FLAGS = ["--rank", "8", "--lr", "3e-3", "--warmup-steps", "10", "--steps", str(STEPS), "--batch-size", "8",
         "--resolution", "64", "--random-crop", "--random-flip", "--targets", *TARGETS, "--seed", "0",
         "--checkpoint-every", "10", "--keep-last", "3", "--no-progress"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def config(**overrides) -> train_step.TrainConfig:
    base = {"rank": 8, "alpha": 8, "lr": 3e-3, "warmup_steps": 10, "steps": STEPS, "batch_size": 8, "resolution": 64,
            "crop": "random", "random_flip": True, "targets": TARGETS, "seed": 0, "checkpoint_every": 10,
            "keep_last": 3}
    return train_step.TrainConfig(**{**base, **overrides})


def make_shapes(folder: Path) -> Path:
    """8 images 80x64: a red/green/blue/yellow circle or square on white, captioned "a <colour> <shape>"."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(list(COLOURS) * 2):
        shape = "circle" if i < 4 else "square"
        img = Image.new("RGB", (80, 64), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((20, 12, 60, 52), fill=COLOURS[colour])
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {colour} {shape}")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    unet = UNetConfig.tiny(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, heads=(2, 2),
                           transformer_layers=(1, 1))
    folder = tmp_path_factory.mktemp("train_model") / "model"
    ref.tiny_pipeline(unet_config=unet).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("train_data") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("train_xla"))


@pytest.fixture(scope="module")
def reference_run(model, shapes, cache_dir, tmp_path_factory):
    """The uninterrupted in-process run of the reference configuration, with the base params before it."""
    pipe = pipeline.load_pipeline(model, dtype="bfloat16", compilation_cache=cache_dir)
    before = jax.tree.map(np.array, pipe.params)
    out = tmp_path_factory.mktemp("train_ref") / "run"
    result = train.train_lora(shapes, pipe, out, config(), progress=False)
    return pipe, before, result


def env_with(cache_dir: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SDJAX_CACHE_DIR=cache_dir, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


CLI = textwrap.dedent("""
    import argparse, sys
    from sdjax import cli
    parser = argparse.ArgumentParser(prog="sdjax")
    cli.add_train_lora_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.run(args))
""")


def smoothed(losses, n: int = 25) -> tuple[float, float]:
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


def test_loss_halves_and_base_params_unchanged(reference_run):
    pipe, before, result = reference_run
    assert result.step == STEPS and not result.stopped and len(result.losses) == STEPS
    start, end = smoothed(result.losses)
    assert end <= 0.5 * start, (start, end)
    after = jax.tree.map(np.asarray, pipe.params)  # still alive: never donated
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint16) if a.dtype.itemsize == 2 else a,
                                                     b.view(np.uint16) if b.dtype.itemsize == 2 else b)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(result.lora))
    assert result.export.is_file()
    loaded = lora.load(result.export, pipe.params)
    for path, w in result.lora.weights.items():
        np.testing.assert_array_equal(loaded.weights[path]["up"], w["up"])
    lines = (result.out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS


def checkpoints(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def start_cli(model, shapes, out, cache_dir) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CLI, "train-lora", "--data", str(shapes), "--model", str(model), "--out", str(out),
           *FLAGS]
    return subprocess.Popen(cmd, env=env_with(cache_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [s for s in checkpoints(out) if s >= at_least]
        if done:
            return done[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def test_sigkill_and_sigterm_then_resume_equals_uninterrupted(reference_run, model, shapes, cache_dir, tmp_path):
    pipe, _, reference = reference_run
    out = tmp_path / "run"
    proc = start_cli(model, shapes, out, cache_dir)
    wait_for_checkpoint(proc, out, 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoints(out)[-1]
    assert killed_at < STEPS

    proc = start_cli(model, shapes, out, cache_dir)  # resumes from killed_at
    wait_for_checkpoint(proc, out, killed_at + 40)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = checkpoints(out)[-1]
    assert killed_at + 40 <= stopped_at < STEPS and f"stopped at step {stopped_at}" in err
    assert not (out / "lora.safetensors").exists()

    proc = start_cli(model, shapes, out, cache_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert checkpoints(out)[-1] == STEPS and len(checkpoints(out)) <= 3
    resumed = lora.load(out / "lora.safetensors", pipe.params)
    for path, w in reference.lora.weights.items():
        for part in ("down", "up"):
            np.testing.assert_allclose(np.asarray(resumed.weights[path][part]), np.asarray(w[part]), rtol=0, atol=1e-6)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS


DATA_PARALLEL = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from sdjax import data, pipeline, train, train_step

    folder, shapes, out = sys.argv[1:4]
    assert jax.device_count() == 8
    cfg = train_step.TrainConfig(rank=4, lr=1e-3, batch_size=8, resolution=32, dtype="float32", crop="random",
                                 random_flip=True, min_snr_gamma=5.0, prediction_type="v_prediction",
                                 targets=("unet", "^unet/conv_out/kernel$"))
    batch, _ = next(data.ImageCaptionDataset(shapes, 32, crop="random", random_flip=True).batches(8))
    results = {}
    for name, devices in (("eight", jax.devices()), ("one", jax.devices()[:1])):
        pipe = pipeline.load_pipeline(folder, dtype="float32", devices=devices, compilation_cache="off")
        opt = train_step.make_optimizer(cfg)
        state = train.initial_state(cfg, pipe, opt)
        step = train_step.make_train_step(pipe.models, cfg, opt, pipe.mesh, pipe.scheduler_config)
        lo, _, metrics = step(state.lora, state.opt_state, pipe.params, train._device_batch(batch, pipe),
                              jax.random.key(7))
        results[name + "_loss"] = np.asarray(metrics["loss"])
        results[name + "_devices"] = np.asarray(len(lo.weights[lo.paths[0]]["up"].sharding.device_set))
        for i, leaf in enumerate(jax.tree.leaves(lo)):
            results[f"{name}_{i}"] = np.asarray(leaf)
    np.savez(out, **results)
""")


def test_one_step_on_eight_devices_equals_one_device(model, shapes, tmp_path):
    out = tmp_path / "dp.npz"
    env = env_with("off", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(model), str(shapes), str(out)], env=env, check=True,
                   timeout=600)
    r = np.load(out)
    assert int(r["eight_devices"]) == 8 and int(r["one_devices"]) == 1
    assert abs(float(r["eight_loss"]) - float(r["one_loss"])) <= 1e-5
    leaves = sorted(k.split("_")[1] for k in r.files if k.startswith("one_") and k[4:].isdigit())
    assert leaves
    moved = 0.0
    for i in leaves:
        assert np.max(np.abs(r[f"eight_{i}"] - r[f"one_{i}"])) <= 1e-5
        moved = max(moved, float(np.max(np.abs(r[f"one_{i}"]))))
    assert moved > 0


def test_make_optimizer_warmup_cosine_clipping_accumulation():
    cfg = train_step.TrainConfig(lr=1.0, warmup_steps=10, steps=110, grad_accum=3, max_grad_norm=1.0, weight_decay=0.0)
    lr = train_step.learning_rate(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5, abs=1e-6) and float(lr(110)) == pytest.approx(0.0, abs=1e-7)
    opt = train_step.make_optimizer(train_step.TrainConfig(lr=1.0, steps=110, grad_accum=3, weight_decay=0.0))
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    for i in range(3):
        updates, state = opt.update({"w": jnp.full(3, 100.0)}, state, params)
        assert np.all(np.asarray(updates["w"]) == 0) == (i < 2)  # applied on every 3rd micro-step only
    adam = optax.tree_utils.tree_get(state.inner_opt_state, "ScaleByAdamState")
    # the mean gradient (100, 100, 100) was clipped to global norm 1 before Adam's first moment (b1 = 0.9)
    np.testing.assert_allclose(adam.mu["w"], 0.1 / np.sqrt(3), rtol=1e-5)
    assert int(adam.count) == 1


def test_min_snr_weights():
    ac = jnp.asarray(schedulers.alphas_cumprod(schedulers.SchedulerConfig()))
    t = jnp.array([0, 100, 500, 999])
    snr = np.asarray(schedulers.snr(ac, t))
    np.testing.assert_allclose(train_step.snr_weights(ac, t, "epsilon", 5.0), np.minimum(snr, 5) / snr, rtol=1e-6)
    np.testing.assert_allclose(train_step.snr_weights(ac, t, "v_prediction", 5.0), np.minimum(snr, 5) / (snr + 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(train_step.snr_weights(ac, t, "epsilon", None), np.ones(4))
    w = np.asarray(train_step.snr_weights(ac, t, "epsilon", 5.0))
    assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)  # low noise (high snr) down-weighted


def test_branch_and_merge_give_the_same_loss(model):
    """The side-branch application of Dense LoRAs (conv ones merged) is the same function as merging them all:
    with every up factor nonzero, a skipped or misplaced entry would change the loss."""
    pipe = pipeline.load_pipeline(model, compilation_cache="off")
    cfg = config(targets=("unet_full", r"^unet/conv_(in|out)/kernel$"), rank=2)
    lo = train_step.init_lora(cfg, pipe.params, jax.random.key(1))
    lo = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(2), a.shape), lo)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.normal(size=(2, 4, 4, 4)).astype(np.float32),
             "context": rng.normal(size=(2, 77, 32)).astype(np.float32)}
    ac = jnp.asarray(schedulers.alphas_cumprod(pipe.scheduler_config))

    @functools.partial(jax.jit, static_argnums=0)
    def loss(mode, lo):
        return train_step.diffusion_loss(pipe.models, pipe.params, batch, jax.random.key(3), ac, "epsilon", None, lo,
                                         mode)

    base = float(loss("merge", train_step.init_lora(cfg, pipe.params, jax.random.key(1))))
    branch, merged = float(loss("branch", lo)), float(loss("merge", lo))
    assert abs(branch - merged) <= 1e-5 * abs(merged) and abs(merged - base) > 1e-2


def test_branch_raises_on_a_lora_path_that_matches_no_module(model):
    """A Dense entry whose path names no module of the UNet would silently do nothing in the side branch."""
    pipe = pipeline.load_pipeline(model, compilation_cache="off")
    lo = train_step.init_lora(config(targets=("unet",), rank=2), pipe.params, jax.random.key(1))
    real = lo.targets[0]
    ghost = real._replace(path=real.path.rsplit("/", 2)[0] + "/to_nowhere/kernel", module="ghost")
    lo = lora.LoRA({**lo.weights, ghost.path: lo.weights[real.path]}, (*lo.targets, ghost))
    batch = {"latents": np.zeros((1, 4, 4, 4), np.float32), "context": np.zeros((1, 77, 32), np.float32)}
    ac = jnp.asarray(schedulers.alphas_cumprod(pipe.scheduler_config))

    def loss(lo, mode):  # traced only (jax.eval_shape): the check runs while tracing
        return train_step.diffusion_loss(pipe.models, pipe.params, batch, jax.random.key(0), ac, "epsilon", None, lo,
                                         mode)

    with pytest.raises(ValueError, match="1 unet entries.*to_nowhere") as err:
        jax.eval_shape(functools.partial(loss, mode="branch"), lo)
    assert real.path not in str(err.value)
    without = lora.LoRA({t.path: lo.weights[t.path] for t in lo.targets[:-1]}, lo.targets[:-1])
    jax.eval_shape(functools.partial(loss, mode="branch"), without)  # every entry applied: no error
    unet = functools.partial(pipe.models.unet.apply, {"params": pipe.params["unet"]})
    with pytest.raises(lora.LoRAError, match="to_nowhere"), lora.branch(lo, "unet"):  # the context manager alone
        jax.eval_shape(unet, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 32)))


def small_state(value: float) -> train.TrainState:
    lo = {"a": jnp.full((2, 3), value), "b": jnp.arange(4.0)}
    opt = optax.adamw(1e-3)
    return train.TrainState(lo, opt.init(lo), int(value), jax.random.key(3), data.DataPosition(1, int(value)))


def test_checkpoints_keep_last_and_skip_unfinished_or_broken(tmp_path):
    cfg = train_step.TrainConfig()
    ckpt = train.Checkpointer(tmp_path / "ck", keep_last=2)
    for v in (1, 2, 3):
        ckpt.save(small_state(v), cfg)
    assert ckpt.steps() == [2, 3]
    ckpt.close()
    # A save killed half-way leaves only orbax's temporary folder: never listed, removed on open.
    (tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    ckpt = train.Checkpointer(tmp_path / "ck", keep_last=2)
    assert ckpt.steps() == [2, 3]
    got = ckpt.restore_latest(small_state(0))
    assert got.step == 3 and got.position == data.DataPosition(1, 3)
    np.testing.assert_array_equal(got.lora["a"], np.full((2, 3), 3.0))
    assert jax.random.key_data(got.key).tolist() == jax.random.key_data(jax.random.key(3)).tolist()
    for f in (tmp_path / "ck" / "3" / "state").rglob("*"):  # a finalized checkpoint damaged afterwards
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="could not be restored"):
        got = ckpt.restore_latest(small_state(0))
    assert got.step == 2
    ckpt.close()


def test_stop_signals_defer_sigterm():
    with train.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_second_sigint_calls_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with train.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT and seen == []  # the first one only asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # not callable: a second SIGINT raises KeyboardInterrupt
        with train.StopSignals():
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # os.kill runs the Python handlers before it returns
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_exit_status_is_130(monkeypatch, tmp_path, capsys):
    stopped = {}

    def fake_train(data_dir, model, out, cfg, **kwargs):
        return train.TrainResult(None, 7, [], True, Path(out), None, stopped["signal"])

    monkeypatch.setattr(train, "train_lora", fake_train)
    monkeypatch.setenv("SDJAX_CACHE_DIR", "off")
    argv = ["train-lora", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--no-progress"]
    stopped["signal"] = signal.SIGINT
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "step 7" in err[0]
    stopped["signal"] = signal.SIGTERM  # a preemption: resumable, not a failure
    assert cli.main(argv) == 0
    assert "stopped at step 7" in capsys.readouterr().err


def test_cli_parser_builds_the_config():
    parser = argparse.ArgumentParser(prog="sdjax")
    cli.add_train_lora_parser(parser.add_subparsers())
    args = parser.parse_args(["train-lora", "--data", "d", "--model", "m", "--out", "o", "--rank", "16",
                              "--steps", "7", "--min-snr-gamma", "5", "--cache-latents", "mean", "--grad-accum", "2",
                              "--targets", "unet+te", "--format", "kohya", "--sample-prompt", "a cat"])
    cfg = cli.config_from_args(args)
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.min_snr_gamma, cfg.cache_latents, cfg.grad_accum) == \
        (16, 16, 7, 5.0, "mean", 2)
    assert cfg.targets == ("unet+te",) and cfg.lora_format == "kohya" and cfg.sample_prompts == ("a cat",)
    assert args.run is train.run_train_lora
    assert len(train_step.target_patterns(cfg.targets)) == len(lora.TARGET_SETS["unet+te"])


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="random crops and flips"):
        train_step.TrainConfig(cache_latents="mean", random_flip=True)
    with pytest.raises(ValueError, match="prediction_type"):
        train_step.TrainConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="grad_accum"):
        train_step.TrainConfig(grad_accum=0)
