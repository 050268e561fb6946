"""Bad input to `sdjax train-lora` and `sdjax.train.train_lora` / `TrainConfig` is refused early: by name (the
flag, argument or field, and what is allowed), with exit status 2 (a bad argument) or 1 (data or a model that
cannot be used), before the model loads (the loaders are replaced by counting stubs) and with nothing written
(the test's folder is listed before and after: no out folder, no checkpoints/).

The valid cases at the end run the same command and calls with the bad values fixed and get as far as the
loader, so each refusal is due to its bad value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from PIL import Image

from sdjax import checkpoint, cli, data, pipeline, train
from sdjax.train_step import ConfigError, TrainConfig

VALID = ["--resolution", "64", "--steps", "2", "--batch-size", "1", "--no-progress"]


class Reached(Exception):
    """Raised by the stub loaders: validation passed and the model would now load."""


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Replaces the model loaders with stubs that record the call and raise Reached."""
    calls: list[str] = []

    def stub(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise Reached(name)
        return load

    monkeypatch.setattr(pipeline, "load_pipeline", stub("load_pipeline"))
    monkeypatch.setattr(checkpoint, "load", stub("checkpoint.load"))
    monkeypatch.setenv("SDJAX_CACHE_DIR", "off")  # the CLI would turn on the process-wide XLA cache
    return calls


def image(path: Path, size=(72, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


def captioned(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        image(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red square {i}")
    return folder


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def save_checkpoint(folder: Path) -> None:
    lo = {"a": jnp.ones((2,))}
    state = train.TrainState(lo, optax.adamw(1e-3).init(lo), 3, jax.random.key(0), data.DataPosition())
    ckpt = train.Checkpointer(folder, keep_last=2)
    ckpt.save(state, TrainConfig())
    ckpt.close()


# Setups: each makes the folders of one case inside tmp and returns replacements for DATA, MODEL and OUT.
def good(tmp, model):
    return {"DATA": captioned(tmp / "data"), "MODEL": model, "OUT": tmp / "out"}


def data_missing(tmp, model):
    return {**good(tmp, model), "DATA": tmp / "nowhere"}


def data_file(tmp, model):
    return {**good(tmp, model), "DATA": image(tmp / "one.png")}


def data_empty(tmp, model):
    (tmp / "empty").mkdir()
    return {**good(tmp, model), "DATA": tmp / "empty"}


def data_no_captions(tmp, model):
    image(tmp / "nocap" / "a.png")
    image(tmp / "nocap" / "b.jpg")
    return {**good(tmp, model), "DATA": tmp / "nocap"}


def data_one_bad_image(tmp, model):
    folder = captioned(tmp / "bad")
    (folder / "1.png").write_bytes(b"not an image")
    return {**good(tmp, model), "DATA": folder}


def data_truncated_image(tmp, model):
    folder = captioned(tmp / "bad")
    raw = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(raw[: len(raw) // 2])
    return {**good(tmp, model), "DATA": folder}


def data_all_bad(tmp, model):
    folder = captioned(tmp / "bad")
    for p in folder.glob("*.png"):
        p.write_bytes(b"junk")
    return {**good(tmp, model), "DATA": folder}


def data_bad_metadata(tmp, model):
    folder = tmp / "meta"
    image(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    return {**good(tmp, model), "DATA": folder}


def data_metadata_outside(tmp, model):
    image(tmp / "outside.png")
    folder = tmp / "meta"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "../outside.png", "text": "x"}) + "\n")
    return {**good(tmp, model), "DATA": folder}


def data_caption_not_utf8(tmp, model):
    folder = captioned(tmp / "latin1")
    (folder / "1.txt").write_bytes(b"caf\xe9")
    return {**good(tmp, model), "DATA": folder}


def out_file(tmp, model):
    (tmp / "out.txt").write_text("x")
    return {**good(tmp, model), "OUT": tmp / "out.txt"}


def out_under_file(tmp, model):
    (tmp / "out.txt").write_text("x")
    return {**good(tmp, model), "OUT": tmp / "out.txt" / "run"}


def out_not_writable(tmp, model):
    return {**good(tmp, model), "OUT": Path("/proc/sdjax-test-run")}  # refuses files even to root


def out_checkpoints_file(tmp, model):
    (tmp / "out").mkdir()
    (tmp / "out" / "checkpoints").write_text("x")
    return good(tmp, model)


def out_has_checkpoints(tmp, model):
    save_checkpoint(tmp / "out" / "checkpoints")
    return good(tmp, model)


def model_missing(tmp, model):
    return {**good(tmp, model), "MODEL": tmp / "no-model"}


def model_file(tmp, model):
    (tmp / "model.safetensors").write_bytes(b"\0" * 16)
    return {**good(tmp, model), "MODEL": tmp / "model.safetensors"}


def model_without_configs(tmp, model):
    (tmp / "hollow" / "unet").mkdir(parents=True)
    return {**good(tmp, model), "MODEL": tmp / "hollow"}


# (id, setup, extra flags, exit status, what stderr must name: a string, or several)
CLI_CASES = [
    ("rank-0", good, ["--rank", "0"], 2, "--rank"),
    ("rank-negative", good, ["--rank", "-1"], 2, "--rank"),
    ("rank-fraction", good, ["--rank", "2.5"], 2, "--rank"),
    ("alpha-nan", good, ["--alpha", "nan"], 2, "--alpha"),
    ("alpha-0", good, ["--alpha", "0"], 2, "--alpha"),
    ("lr-0", good, ["--lr", "0"], 2, "--lr"),
    ("lr-negative", good, ["--lr", "-1"], 2, "--lr"),
    ("lr-nan", good, ["--lr", "nan"], 2, "--lr"),
    ("lr-inf", good, ["--lr", "inf"], 2, "--lr"),
    ("steps-0", good, ["--steps", "0"], 2, "--steps"),
    ("warmup-negative", good, ["--warmup-steps", "-1"], 2, "--warmup-steps"),
    ("warmup-past-steps", good, ["--warmup-steps", "5"], 2, "--warmup-steps"),
    ("weight-decay-negative", good, ["--weight-decay", "-0.1"], 2, "--weight-decay"),
    ("weight-decay-nan", good, ["--weight-decay", "nan"], 2, "--weight-decay"),
    ("max-grad-norm-negative", good, ["--max-grad-norm", "-1"], 2, "--max-grad-norm"),
    ("max-grad-norm-nan", good, ["--max-grad-norm", "nan"], 2, "--max-grad-norm"),
    ("grad-accum-0", good, ["--grad-accum", "0"], 2, "--grad-accum"),
    ("batch-size-0", good, ["--batch-size", "0"], 2, "--batch-size"),
    ("resolution-60", good, ["--resolution", "60"], 2, "--resolution"),
    ("resolution-0", good, ["--resolution", "0"], 2, "--resolution"),
    ("resolution-huge", good, ["--resolution", "8192"], 2, "--resolution"),
    ("min-snr-gamma-0", good, ["--min-snr-gamma", "0"], 2, "--min-snr-gamma"),
    ("min-snr-gamma-nan", good, ["--min-snr-gamma", "nan"], 2, "--min-snr-gamma"),
    ("seed-negative", good, ["--seed", "-1"], 2, "--seed"),
    ("seed-too-big", good, ["--seed", str(2**32)], 2, "--seed"),
    ("checkpoint-every-negative", good, ["--checkpoint-every", "-1"], 2, "--checkpoint-every"),
    ("keep-last-0", good, ["--keep-last", "0"], 2, "--keep-last"),
    ("sample-every-negative", good, ["--sample-every", "-1"], 2, "--sample-every"),
    ("sample-prompt-not-utf8", good, ["--sample-prompt", "caf\udce9"], 2, "--sample-prompt"),
    ("format-bogus", good, ["--format", "bogus"], 2, "--format"),
    ("dtype-bogus", good, ["--dtype", "int8"], 2, "--dtype"),
    ("targets-bad-regex", good, ["--targets", "unet/(to_q"], 2, "--targets"),
    ("targets-empty", good, ["--targets", ""], 2, "--targets"),
    ("targets-match-nothing", good, ["--targets", "^unet/nowhere/kernel$"], 2, "--targets"),
    ("text-encoder-targets-with-cache", good, ["--targets", "unet+te", "--cache-latents", "mean"], 2,
     "--cache-latents"),
    ("cache-with-random-flip", good, ["--cache-latents", "mean", "--random-flip"], 2, "--cache-latents"),
    ("data-missing", data_missing, [], 2, "--data"),
    ("data-is-a-file", data_file, [], 2, "--data"),
    ("data-empty", data_empty, [], 1, ("--data", "no images")),
    ("data-no-captions", data_no_captions, [], 1, ("--data", "no caption file", "a.png")),
    ("data-bad-image-error", data_one_bad_image, ["--bad-images", "error"], 1, ("--data", "1.png")),
    ("data-truncated-image-error", data_truncated_image, ["--bad-images", "error"], 1, ("--data", "1.png")),
    ("data-all-images-bad", data_all_bad, [], 1, ("--data", "no usable examples")),
    ("data-metadata-without-text", data_bad_metadata, [], 1, ("--data", "metadata.jsonl:1", "'text'")),
    ("data-metadata-outside-folder", data_metadata_outside, [], 1, ("--data", "metadata.jsonl:1", "file_name")),
    ("data-caption-not-utf8", data_caption_not_utf8, [], 1, ("--data", "1.txt", "UTF-8")),
    ("out-is-a-file", out_file, [], 2, "--out"),
    ("out-under-a-file", out_under_file, [], 2, "--out"),
    ("out-not-writable", out_not_writable, [], 2, "--out"),
    ("out-checkpoints-is-a-file", out_checkpoints_file, [], 2, ("--out", "checkpoints")),
    ("out-has-checkpoints-no-resume", out_has_checkpoints, ["--no-resume"], 2, "--no-resume"),
    ("optimization-effort-out-of-range", good, ["--optimization-effort", "-2"], 2, "--optimization-effort"),
    ("model-missing", model_missing, [], 1, "--model"),
    ("model-is-a-file", model_file, [], 1, "--model"),
    ("model-without-configs", model_without_configs, [], 1, ("--model", "config.json")),
]


def command(paths: dict, extra: list[str]) -> list[str]:
    return ["train-lora", "--data", str(paths["DATA"]), "--model", str(paths["MODEL"]), "--out", str(paths["OUT"]),
            *VALID, *extra]


@pytest.mark.filterwarnings("ignore:skipping bad image")
@pytest.mark.parametrize("setup, extra, status, names", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(setup, extra, status, names, tiny_sd_folder, tmp_path, loads, capsys):
    if setup is out_not_writable and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    paths = setup(tmp_path, tiny_sd_folder)
    before = listing(tmp_path)
    assert cli.main(command(paths, extra)) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
    for name in (names,) if isinstance(names, str) else names:
        assert name in err, err
    assert loads == []
    assert listing(tmp_path) == before


def test_cli_batch_size_not_a_multiple_of_the_device_count(tiny_sd_folder, tmp_path, loads, capsys, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    paths = good(tmp_path, tiny_sd_folder)
    before = listing(tmp_path)
    assert cli.main(command(paths, ["--batch-size", "3"])) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "device count 2" in err
    assert loads == [] and listing(tmp_path) == before
    with pytest.raises(Reached):  # a multiple of it passes
        cli.main(command(paths, ["--batch-size", "4"]))


def test_cli_missing_required_flag(tmp_path, loads, capsys):
    assert cli.main(["train-lora", "--model", "m", "--out", str(tmp_path / "out")]) == 2
    assert "--data" in capsys.readouterr().err
    assert loads == [] and listing(tmp_path) == []


def test_cli_messages_say_what_is_allowed(tiny_sd_folder, tmp_path, loads, capsys):
    paths = good(tmp_path, tiny_sd_folder)
    cli.main(command(paths, ["--resolution", "60"]))
    assert "--resolution: must be a positive multiple of 8 in [8, 4096], got 60" in capsys.readouterr().err
    cli.main(command(paths, ["--format", "bogus"]))
    assert "'peft', 'kohya'" in capsys.readouterr().err
    cli.main(command(paths, ["--targets", "^unet/nowhere/kernel$"]))
    assert "kernels look like" in capsys.readouterr().err


# train_lora(...) with a bad argument: (id, setup, keyword overrides, exception type, field)
API_CASES = [
    ("data-missing", data_missing, {}, ConfigError, "data_dir"),
    ("data-empty", data_empty, {}, train.InputError, "data_dir"),
    ("data-no-captions", data_no_captions, {}, train.InputError, "data_dir"),
    ("data-bad-image-error", data_one_bad_image, {"cfg": TrainConfig(resolution=64, bad_images="error")},
     train.InputError, "data_dir"),
    ("out-is-a-file", out_file, {}, ConfigError, "out"),
    ("out-has-checkpoints-no-resume", out_has_checkpoints, {"resume": False}, ConfigError, "resume"),
    ("targets-match-nothing", good, {"cfg": TrainConfig(resolution=64, targets=(r"^unet/nowhere/kernel$",))},
     ConfigError, "targets"),
    ("text-encoder-targets-with-cache", good, {"cfg": TrainConfig(resolution=64, targets="unet+te",
                                                                  cache_latents="mean")}, ConfigError, "cache_latents"),
    ("max-steps-0", good, {"max_steps": 0}, ConfigError, "max_steps"),
    ("optimization-effort-2", good, {"optimization_effort": 2.0}, ConfigError, "optimization_effort"),
    ("model-missing", model_missing, {}, train.InputError, "model"),
    ("cfg-not-a-config", good, {"cfg": {"rank": 4}}, TypeError, None),
]


@pytest.mark.parametrize("setup, overrides, error, field", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_train_lora_refuses(setup, overrides, error, field, tiny_sd_folder, tmp_path, loads):
    paths = setup(tmp_path, tiny_sd_folder)
    before = listing(tmp_path)
    kwargs = {"cfg": TrainConfig(resolution=64), **overrides}
    with pytest.raises(error) as caught:
        train.train_lora(paths["DATA"], paths["MODEL"], paths["OUT"], **kwargs)
    if field is not None:
        assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")
    else:
        assert "TrainConfig" in str(caught.value)
    assert loads == [] and listing(tmp_path) == before


# TrainConfig(...) with a bad value: (id, keyword arguments, field)
CONFIG_CASES = [
    ("rank-0", {"rank": 0}, "rank"),
    ("rank-bool", {"rank": True}, "rank"),
    ("rank-float", {"rank": 4.0}, "rank"),
    ("alpha-nan", {"alpha": math.nan}, "alpha"),
    ("lr-0", {"lr": 0.0}, "lr"),
    ("lr-inf", {"lr": math.inf}, "lr"),
    ("lr-text", {"lr": "1e-4"}, "lr"),
    ("steps-0", {"steps": 0}, "steps"),
    ("warmup-negative", {"warmup_steps": -1}, "warmup_steps"),
    ("warmup-past-steps", {"warmup_steps": 11, "steps": 10}, "warmup_steps"),
    ("weight-decay-negative", {"weight_decay": -1.0}, "weight_decay"),
    ("max-grad-norm-nan", {"max_grad_norm": math.nan}, "max_grad_norm"),
    ("grad-accum-0", {"grad_accum": 0}, "grad_accum"),
    ("batch-size-0", {"batch_size": 0}, "batch_size"),
    ("resolution-60", {"resolution": 60}, "resolution"),
    ("resolution-huge", {"resolution": 8192}, "resolution"),
    ("resolution-tuple", {"resolution": (64, 64)}, "resolution"),
    ("min-snr-gamma-negative", {"min_snr_gamma": -5.0}, "min_snr_gamma"),
    ("seed-negative", {"seed": -1}, "seed"),
    ("seed-too-big", {"seed": 2**32}, "seed"),
    ("checkpoint-every-negative", {"checkpoint_every": -1}, "checkpoint_every"),
    ("keep-last-0", {"keep_last": 0}, "keep_last"),
    ("sample-every-negative", {"sample_every": -1}, "sample_every"),
    ("sample-steps-0", {"sample_steps": 0}, "sample_steps"),
    ("sample-guidance-nan", {"sample_guidance": math.nan}, "sample_guidance"),
    ("sample-prompts-bare-string", {"sample_prompts": "a cat"}, "sample_prompts"),
    ("sample-prompts-not-utf8", {"sample_prompts": ("caf\udce9",)}, "sample_prompts"),
    ("targets-bad-regex", {"targets": ("unet/(to_q",)}, "targets"),
    ("targets-none", {"targets": ()}, "targets"),
    ("crop-bogus", {"crop": "left"}, "crop"),
    ("random-flip-not-bool", {"random_flip": "yes"}, "random_flip"),
    ("bad-images-bogus", {"bad_images": "ignore"}, "bad_images"),
    ("cache-latents-bogus", {"cache_latents": "all"}, "cache_latents"),
    ("cache-latents-with-random-crop", {"cache_latents": "mean", "crop": "random"}, "cache_latents"),
    ("prediction-type-bogus", {"prediction_type": "sample"}, "prediction_type"),
    ("dtype-bogus", {"dtype": "int8"}, "dtype"),
    ("lora-format-bogus", {"lora_format": "bogus"}, "lora_format"),
    ("lora-mode-bogus", {"lora_mode": "sideways"}, "lora_mode"),
]


@pytest.mark.parametrize("kwargs, field", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_train_config_refuses(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**kwargs)
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")
    assert isinstance(caught.value, ValueError)  # what callers caught before ConfigError existed


# The same command and calls with the bad values fixed get past validation: to the loader, writing nothing.
def test_valid_command_reaches_the_loader(tiny_sd_folder, tmp_path, loads):
    paths = good(tmp_path, tiny_sd_folder)
    before = listing(tmp_path)
    extra = ["--rank", "2", "--alpha", "2", "--lr", "1e-4", "--warmup-steps", "2", "--weight-decay", "0",
             "--max-grad-norm", "0", "--grad-accum", "2", "--min-snr-gamma", "5", "--seed", str(2**32 - 1),
             "--checkpoint-every", "0", "--keep-last", "1", "--sample-every", "0", "--sample-prompt", "café",
             "--format", "kohya", "--targets", "unet", r"^unet/conv_out/kernel$", "--bad-images", "error"]
    with pytest.raises(Reached):
        cli.main(command(paths, extra))
    assert loads == ["load_pipeline"] and listing(tmp_path) == before


@pytest.mark.parametrize("setup, extra", [(good, ["--cache-latents", "mean"]), (out_has_checkpoints, []),
                                          (good, ["--targets", "unet+te"])],
                         ids=["cache-latents-unet-targets", "out-has-checkpoints-resume", "text-encoder-targets"])
def test_valid_variants_reach_the_loader(setup, extra, tiny_sd_folder, tmp_path, loads):
    paths = setup(tmp_path, tiny_sd_folder)
    before = listing(tmp_path)
    with pytest.raises(Reached):
        cli.main(command(paths, extra))
    assert loads == ["load_pipeline"] and listing(tmp_path) == before


def test_valid_call_reaches_the_loader(tiny_sd_folder, tmp_path, loads):
    paths = good(tmp_path, tiny_sd_folder)
    (paths["DATA"] / "1.png").write_bytes(b"junk")
    # A bad image is skipped (warned about once) by default, as long as one good one is left.
    with pytest.warns(UserWarning, match="1.png"), pytest.raises(Reached):
        train.train_lora(paths["DATA"], paths["MODEL"], paths["OUT"], TrainConfig(resolution=64), max_steps=1)
    assert loads == ["load_pipeline"] and not paths["OUT"].exists()
