"""The ``sdjax`` command line: ``sdjax generate|img2img|inpaint "PROMPT" [options]``, ``sdjax train-lora``.

Every argument is checked before anything heavy happens (no model load, no output folder, no files on a
bad argument). Exit status: 0 success, 2 bad arguments, 1 model loading or writing failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from sdjax import convert, images, pipeline, pngmeta, process
from sdjax.layers import IMPLEMENTATIONS
from sdjax.pipeline import DEFAULT_MODEL, MAX_SEED
from sdjax.schedulers import SCHEDULER_NAMES

DEFAULT_OUT = "outputs"
_NUMBERED = re.compile(r"^(\d+)-")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sdjax generate: error: argument --steps: ... (see ... --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class UsageError(Exception):
    """A bad argument found after argparse (exit 2, one line naming the flag)."""


class LoadError(Exception):
    """The model could not be loaded (exit 1)."""


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {value}")
        return value
    return parse


def _size(text: str) -> int:
    """An argparse type: image height or width in pixels, a positive multiple of 8."""
    value = _int_at_least(1)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def _finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _text(text: str) -> str:
    """An argparse type: text that can be stored as UTF-8 (argv may carry undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return text


def _seed(text: str) -> int:
    return _int_at_least(0, MAX_SEED)(text)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --variant, --cache-dir: which weights to load and how."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_ID",
                   help="local diffusers-format folder or Hugging Face hub id (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=tuple(convert.DTYPES),
                   help="compute dtype (default: %(default)s)")
    g.add_argument("--variant", default=None, help='weights variant to load, e.g. "fp16"')
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (peft/diffusers or kohya safetensors) at SCALE (default 1); repeatable")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="XLA compilation cache folder (default: $SDJAX_CACHE_DIR or ~/.cache/sdjax/xla; "
                        '"off" disables)')


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every task that runs the denoising loop (txt2img, img2img, inpaint)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", default="", type=_text, metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", default=50, type=_int_at_least(1), help="denoising steps (default: %(default)s)")
    g.add_argument("--guidance-scale", default=7.5, type=_finite_float, metavar="CFG",
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: %(default)s)")
    g.add_argument("--seed", default=None, type=_seed,
                   help=f"seed of the first image, in [0, {MAX_SEED}]; image i gets seed+i "
                        "(default: a random first seed)")
    g.add_argument("--num-images", default=1, type=_int_at_least(1), metavar="N", help="images to make (default: 1)")
    g.add_argument("--batch-size", default=None, type=_int_at_least(1), metavar="B",
                   help="images per device call (default: all at once)")
    g.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="sampler (default: the checkpoint's own scheduler)")


def add_size_options(p: argparse.ArgumentParser, default: int | None = 512) -> None:
    """--height/--width; tasks that start from an image default to its size (default=None)."""
    g = p.add_argument_group("size")
    what = f"default: {default}" if default else "default: the input image's, rounded down to a multiple of 8"
    g.add_argument("--height", default=default, type=_size, help=f"image height in pixels, multiple of 8 ({what})")
    g.add_argument("--width", default=default, type=_size, help=f"image width in pixels, multiple of 8 ({what})")


def _strength(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--out and --no-progress."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default: ./%(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    """`sdjax generate`: text to image."""
    p = sub.add_parser("generate", help="text to image", description="Text to image; writes PNGs with A1111-style "
                       "parameters (readable in A1111's PNG Info tab).")
    p.add_argument("prompt", type=_text, metavar="PROMPT", help="what to draw")
    add_sampling_options(p)
    add_size_options(p)
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(run=run_generate, parser=p)


def add_img2img(sub: argparse._SubParsersAction) -> None:
    """`sdjax img2img`: image to image."""
    p = sub.add_parser("img2img", help="image to image", description="Image to image: the last "
                       "int(steps * strength) steps run from the input image's latents noised to that level.")
    p.add_argument("prompt", type=_text, metavar="PROMPT", help="what to draw")
    p.add_argument("--image", required=True, metavar="FILE", help="input image")
    p.add_argument("--strength", default=0.8, type=_strength,
                   help="0 keeps the image, 1 starts from noise (default: %(default)s)")
    _add_common(p, size_default=None)
    p.set_defaults(run=run_img2img, parser=p)


def add_inpaint(sub: argparse._SubParsersAction) -> None:
    """`sdjax inpaint`: repaint the white part of a mask."""
    p = sub.add_parser("inpaint", help="repaint the masked part of an image",
                       description="Inpainting: a 9-channel inpainting model is used as such; a normal model "
                                   "inpaints by mask blending (grey mask values blend softly).")
    p.add_argument("prompt", type=_text, metavar="PROMPT", help="what to draw in the masked area")
    p.add_argument("--image", required=True, metavar="FILE", help="input image")
    p.add_argument("--mask", required=True, metavar="FILE",
                   help="single-channel mask of the image's size: white repaints, black keeps")
    p.add_argument("--strength", default=1.0, type=_strength,
                   help="how far to re-noise the masked area; 1 starts from noise (default: %(default)s)")
    p.add_argument("--paste-back", action="store_true", help="copy the original pixels back outside the mask")
    _add_common(p, size_default=None)
    p.set_defaults(run=run_inpaint, parser=p)


def _add_common(p: argparse.ArgumentParser, size_default: int | None) -> None:
    add_sampling_options(p)
    add_size_options(p, size_default)
    add_model_options(p)
    add_output_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``sdjax`` parser with one subparser per command."""
    parser = _Parser(prog="sdjax", description="Stable Diffusion v1.5 in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_generate(sub)
    add_img2img(sub)
    add_inpaint(sub)
    add_train_lora_parser(sub)
    add_compile_check(sub)
    return parser


def add_train_lora_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`sdjax train-lora --data DIR --model M --rank R --steps N --out DIR ...` (run with `train.run_train_lora`)."""
    from sdjax import data, train  # the training code (train: the loop, its run_train_lora) is loaded only here
    from sdjax import lora as lora_lib
    from sdjax.train_step import PREDICTION_TYPES, TrainConfig

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
    p.set_defaults(run=train.run_train_lora, parser=p)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """train_step.TrainConfig from `train-lora`'s arguments (ValueError names the bad setting)."""
    from sdjax.train_step import TrainConfig

    return TrainConfig(
        rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
        targets=_targets(args.targets), lr=args.lr, warmup_steps=args.warmup_steps,
        steps=args.steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        grad_accum=args.grad_accum, batch_size=args.batch_size, resolution=args.resolution,
        crop="random" if args.random_crop else "center", random_flip=args.random_flip, bad_images=args.bad_images,
        cache_latents=args.cache_latents, min_snr_gamma=args.min_snr_gamma, prediction_type=args.prediction_type,
        seed=args.seed, dtype=args.dtype, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
        sample_every=args.sample_every, sample_prompts=tuple(args.sample_prompts or ()), lora_format=args.lora_format)


def _targets(values: list[str] | None) -> str | tuple[str, ...]:
    from sdjax.train_step import TrainConfig

    return tuple(values) if values else TrainConfig.targets


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``sdjax`` command line; returns the exit status (argparse's exits are returned too)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return _exit_code(exit_)
    process.tune_malloc()  # the CLI's process settings; the library leaves the process alone
    try:
        return args.run(args)
    except UsageError as err:
        try:
            cast(argparse.ArgumentParser, args.parser).error(str(err))  # error() raises SystemExit
        except SystemExit as exit_:
            return _exit_code(exit_)
    except KeyboardInterrupt:
        print("sdjax: interrupted", file=sys.stderr)
        return 130


def add_compile_check(sub: argparse._SubParsersAction) -> None:
    from sdjax import aot, targets

    p = sub.add_parser("compile-check", help="compile a job for a TPU/GPU target without the hardware",
                       description="Compiles a job's jitted function for compile-only TPU/GPU devices from parameter "
                                   "shapes alone (no weights) and prints the compile time, per-device memory against "
                                   "the chip's, whether it fits, the attention kernel of each layer and XLA's FLOPs. "
                                   "Exit status 1 when it does not compile or does not fit.")
    p.add_argument("--target", action="append", default=None, choices=targets.names(), metavar="TARGET",
                   help="repeatable; one of: " + ", ".join(targets.names()) + " (default: tpu:v5e-8)")
    p.add_argument("--job", action="append", default=None, choices=aot.JOBS,
                   help="repeatable; one of: " + ", ".join(aot.JOBS) + " (default: txt2img)")
    p.add_argument("--model", default="sd15", metavar="NAME_OR_FOLDER",
                   help=f"one of {', '.join(aot.MODELS)} or a diffusers folder with the config files "
                        "(default: %(default)s; inpaint uses a known name's -inpaint variant)")
    p.add_argument("--size", default=512, type=_int_at_least(64, 4096), help="image size (default: %(default)s)")
    p.add_argument("--batch", default=None, type=_int_at_least(1, 4096),
                   help="images (train-lora: examples) per call over all devices (default: one per device)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(convert.DTYPES), help="(default: %(default)s)")
    p.add_argument("--steps", default=50, type=_int_at_least(1, 10000), help="sampling steps (default: %(default)s)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="sampler (default: the model's)")
    p.add_argument("--attention", default=None, choices=IMPLEMENTATIONS,
                   help="one attention implementation for every layer (default: chosen per layer)")
    p.add_argument("--lora-rank", default=8, type=_int_at_least(1, 1024), help="train-lora's rank (default: 8)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON")
    p.set_defaults(run=run_compile_check, parser=p)


def run_compile_check(args: argparse.Namespace) -> int:
    """`sdjax compile-check`: one report per (target, job); exit 1 if any fails to compile or to fit."""
    import jax

    # Only the host backend is needed (the targets' devices are compile-only); an attached accelerator is unused.
    jax.config.update("jax_platforms", "cpu")
    # libtpu takes a machine-wide lock unless told otherwise; compile-only devices need no exclusive chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from sdjax import aot

    if args.size % 64:
        raise UsageError(f"--size must be a multiple of 64, got {args.size}")
    reports, status = [], 0
    for target in args.target or ["tpu:v5e-8"]:
        for job in args.job or ["txt2img"]:
            # a known name's 9-channel variant for the inpaint job (sd15 -> sd15-inpaint, tiny -> tiny-inpaint)
            inpaint_variant = f"{args.model}-inpaint"
            model = inpaint_variant if job == "inpaint" and inpaint_variant in aot.MODELS else args.model
            try:
                report = aot.compile_check(job, target, model=model, size=args.size, batch=args.batch,
                                           dtype=args.dtype, steps=args.steps, scheduler=args.scheduler,
                                           attention=args.attention, lora_rank=args.lora_rank)
            except ValueError as err:
                raise UsageError(str(err)) from None
            except Exception as err:  # noqa: BLE001 -- XLA's compile errors come as several types; report each
                print(f"== {job} on {target}: DOES NOT COMPILE\n{type(err).__name__}: {err}", flush=True)
                status = 1
                continue
            print(f"== {report.format()}\n", flush=True)
            reports.append(report)
            status = status or (0 if report.fits else 1)
    if args.json:
        aot.write_json(reports, args.json)
    return status


def _exit_code(exit_: SystemExit) -> int:
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def fail(message: str, status: int = 1) -> int:
    """Prints ``sdjax: error: <message>`` on stderr and returns `status`."""
    print(f"sdjax: error: {message}", file=sys.stderr)
    return status


def check_out_dir(out: str) -> pathlib.Path:
    """The output folder, checked (not created): not a file, and creatable/writable where it would live."""
    path = pathlib.Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out!r} is not writable ({str(existing)!r} denies writing)")
    return path


_FLAGS = {"negative_prompts": "--negative-prompt", "prompts": "PROMPT", "seeds": "--seed", "steps": "--steps",
          "guidance_scale": "--guidance-scale", "height": "--height", "width": "--width", "scheduler": "--scheduler"}


def validate_generation(args: argparse.Namespace, prompt: str, height: int, width: int) -> Any:
    """`pipeline.validate_request` for the CLI's arguments -> Request with seeds S..S+N-1 (mod 2**32), S from
    --seed or drawn at random, so a run is repeatable with ``--seed S --num-images N``."""
    try:
        convert.parse_dtype(args.dtype)
    except ValueError as err:
        raise UsageError(f"--dtype: {err}") from None
    seed = secrets.randbelow(MAX_SEED + 1) if args.seed is None else args.seed
    try:
        return pipeline.validate_request([prompt] * args.num_images, args.negative_prompt, seed, args.steps,
                                         args.guidance_scale, height, width, args.scheduler)
    except ValueError as err:
        raise UsageError(_name_flag(str(err))) from None


def _name_flag(message: str) -> str:
    """Prefixes a `validate_request` message with the flag it is about."""
    for name in sorted(_FLAGS, key=len, reverse=True):
        if message.startswith(name):
            return f"{_FLAGS[name]}: {message}"
    return message


def check_loras(specs: Sequence[str]) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values: the files exist and are safetensors (read before the model loads)."""
    from sdjax import lora

    out = []
    for spec in specs:
        path, scale = lora.parse_spec(spec)
        if not os.path.isfile(path):
            raise UsageError(f"--lora {spec!r}: no such file {path!r}")
        if not path.endswith(".safetensors"):
            raise UsageError(f"--lora {spec!r}: only .safetensors LoRA files are read (never pickles)")
        out.append((path, scale))
    return out


def load(args: argparse.Namespace, loras: Sequence[tuple[str, float]] = ()) -> Any:
    """Loads the pipeline (and merges --lora files); raises LoadError with the loader's message on failure."""
    try:
        pipe = pipeline.load_pipeline(args.model, dtype=args.dtype, variant=args.variant,
                                      compilation_cache=args.cache_dir or process.default_cache_dir())
    except (OSError, ValueError) as err:
        raise LoadError(f"could not load --model {args.model!r}: {err}") from err
    if loras:
        try:
            pipe.set_loras(list(loras))
        except (OSError, ValueError) as err:
            raise LoadError(f"could not apply --lora: {err}") from err
    return pipe


def run_generate(args: argparse.Namespace) -> int:
    """`sdjax generate`: validate, load, generate in batches, write numbered PNGs."""
    request = validate_generation(args, args.prompt, args.height, args.width)

    def call(pipe, part, kw):
        return pipe.txt2img(request.prompts[part], request.negative_prompts[part], height=args.height,
                            width=args.width, **kw)

    return _generate(args, request, call)


def run_img2img(args: argparse.Namespace) -> int:
    """`sdjax img2img`: as generate, starting from --image."""
    image = _open_image(args.image, "--image")
    request, height, width = _validate_with_image(args, image)

    def call(pipe, part, kw):
        n = len(request.seeds[part])
        return pipe.img2img([image] * n, request.prompts[part], args.strength, request.negative_prompts[part],
                            height=height, width=width, **kw)

    return _generate(args, request, call, {"Denoising strength": args.strength})


def run_inpaint(args: argparse.Namespace) -> int:
    """`sdjax inpaint`: as generate, repainting the white part of --mask on --image."""
    image = _open_image(args.image, "--image")
    mask = _open_image(args.mask, "--mask")
    request, height, width = _validate_with_image(args, image)
    try:
        images.prepare_masks([mask], [image], height, width)
    except ValueError as err:
        raise UsageError(f"--mask: {err}") from None

    def call(pipe, part, kw):
        n = len(request.seeds[part])
        return pipe.inpaint([image] * n, [mask] * n, request.prompts[part], args.strength,
                            request.negative_prompts[part], height=height, width=width,
                            paste_back=args.paste_back, **kw)

    return _generate(args, request, call, {"Denoising strength": args.strength})


def _open_image(path: str, flag: str):
    """Opens and fully decodes an image file (so a broken file fails before the model loads)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"{flag} {path!r} is not a readable image: {err}") from None


def _validate_with_image(args: argparse.Namespace, image) -> tuple[Any, int, int]:
    try:
        _, height, width = images.prepare_images([image], args.height, args.width)
    except ValueError as err:
        raise UsageError(f"--image: {err}") from None
    return validate_generation(args, args.prompt, height, width), height, width


def _generate(args: argparse.Namespace, request: Any, call: Callable, extra: dict | None = None) -> int:
    """Loads the model, runs `call(pipe, batch_slice, common_kwargs)` per batch, writes numbered PNGs."""
    out = check_out_dir(args.out)
    loras = check_loras(args.lora)  # read before the model loads
    try:
        pipe = load(args, loras)
    except LoadError as err:
        return fail(str(err))
    if loras:
        extra = {**(extra or {}), "LoRA": ", ".join(f"{pathlib.Path(p).stem}:{s:g}" for p, s in loras)}
    written: list[pathlib.Path] = []
    batch = args.batch_size or len(request.seeds)
    for start in range(0, len(request.seeds), batch):
        part = slice(start, start + batch)
        kw = dict(steps=args.steps, guidance_scale=args.guidance_scale, seeds=request.seeds[part],
                  scheduler=args.scheduler, progress=_progress(args))
        try:
            gen = call(pipe, part, kw)
        except ValueError as err:  # a check that needs the model (e.g. its own size multiple)
            raise UsageError(_name_flag(str(err))) from None
        try:
            written += save_generation(gen, out, model_label(args.model), extra)
        except OSError as err:
            return fail(f"could not write to --out {args.out!r}: {err}" + (f"; {_wrote(written)}" if written else ""))
    print(_wrote(written))
    return 0


def _wrote(paths: list[pathlib.Path]) -> str:
    """``wrote 2 images: a.png, b.png``."""
    return f"wrote {len(paths)} image{'s' if len(paths) != 1 else ''}: {', '.join(map(str, paths))}"


def _progress(args: argparse.Namespace) -> bool | None:
    """None: a progress bar when stderr is a terminal; False with --no-progress."""
    return False if args.no_progress else None


def model_label(model: str) -> str:
    """The ``Model:`` value: a hub id as is, a local folder by its name (like A1111's checkpoint names)."""
    path = pathlib.Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def save_generation(gen: Any, out: pathlib.Path, model_name: str, extra: dict | None = None) -> list[pathlib.Path]:
    """Writes every image of a Generation as ``<number>-<seed>.png`` in `out`, never replacing a file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(gen.images):
        text = pngmeta.infotext(gen, i, model=model_name, extra=extra)
        paths.append(write_numbered(out, gen.seeds[i], image, text))
    return paths


def next_number(out: pathlib.Path) -> int:
    """One past the highest ``<number>-...`` file name in `out` (0 when there is none)."""
    numbers = [int(m.group(1)) for name in os.listdir(out) if (m := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def write_numbered(out: pathlib.Path, seed: int, image: Any, text: str) -> pathlib.Path:
    """Writes ``<next number:05d>-<seed>.png`` atomically; retries with the next number if another
    process took the name meanwhile."""
    while True:
        path = out / f"{next_number(out):05d}-{seed}.png"
        try:
            return pngmeta.write_png(path, image, text, exclusive=True)
        except FileExistsError:
            continue


if __name__ == "__main__":
    raise SystemExit(main())
