"""The ``sdjax`` command line: ``sdjax generate|img2img|inpaint "PROMPT" [options]``, ``sdjax train-lora``.

Every argument is checked before anything heavy happens (no model load, no output folder, no files on a
bad argument). Exit status: 0 success, 2 bad arguments, 1 model loading or writing failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from sdjax import controls as control_lib
from sdjax import convert, images, pipeline, pngmeta, process
from sdjax.layers import CONV_KERNELS, IMPLEMENTATIONS
from sdjax.pipeline import DEFAULT_MODEL, MAX_BATCH, MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_SEED, MAX_SIZE, MAX_STEPS
from sdjax.schedulers import SCHEDULER_NAMES

DEFAULT_OUT = "outputs"
DEFAULT_SIZE = 512  # generate's height and width without --height/--width or a control image
_NUMBERED = re.compile(r"^(\d+)-")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sdjax generate: error: argument --steps: ... (see ... --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class UsageError(Exception):
    """A bad argument found after argparse (exit 2, one line naming the flag)."""


class LoadError(Exception):
    """The model could not be loaded (exit 1)."""


def _int_at_least(low: int, high: int | None = None, note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]; `note` says why the bound is what it is."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}{note}, got {value}")
        return value
    return parse


def _size(text: str) -> int:
    """An argparse type: image height or width in pixels, a positive multiple of 8 (its upper bound,
    MAX_SIZE, is checked after parsing, where --no-limits is known)."""
    value = _int_at_least(1)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (at most {MAX_SIZE} without "
                                         f"--no-limits), got {value}")
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


def _effort(text: str) -> float:
    """An argparse type: XLA's optimization effort, a number in [-1, 1]."""
    from sdjax import parallel

    value = _finite_float(text)
    try:
        return parallel.check_effort(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{parallel.EFFORT_RULE}, got {text}") from None


def add_effort_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--optimization-effort", default=0.0, type=_effort, metavar="E",
                   help="XLA's effort at making the compiled program fast, -1 to 1 (default: 0, XLA's). Lower "
                        "compiles faster and runs slower: at -0.5 SD1.5 compiles for TPU about 6x faster and XLA's "
                        "cost model expects about 1.7x the run time (README, 'Compile time against run time')")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --variant, --vae, --cache-dir: which weights to load and how."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_ID",
                   help="local diffusers-format folder, single-file SD1.x .safetensors checkpoint or Hugging Face "
                        "hub id (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=tuple(convert.DTYPES),
                   help="compute dtype (default: %(default)s)")
    g.add_argument("--variant", default=None, help='weights variant to load, e.g. "fp16"')
    g.add_argument("--vae", default=None, metavar="PATH",
                   help="use this VAE instead of the model's: a diffusers VAE folder or a single-file VAE "
                        "(e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (peft/diffusers or kohya safetensors) at SCALE (default 1); repeatable")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="XLA compilation cache folder (default: $SDJAX_CACHE_DIR or ~/.cache/sdjax/xla; "
                        '"off" disables)')
    g.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the checkpoint's safety checker (default: run it when the model folder has "
                        "safety_checker/; flagged images are written black)")
    g.add_argument("--conv", default=None, choices=CONV_KERNELS,
                   help="convolution kernel for every layer (default: oneDNN's on CPU where the cpu extra is "
                        "installed, bf16 ~3x XLA's speed; XLA's elsewhere); xla also keeps attention on XLA "
                        "unless --attention onednn")
    add_effort_option(g)


def add_sampling_options(p: argparse.ArgumentParser, prompt_options: bool = True) -> None:
    """Options shared by every task that runs the denoising loop (txt2img, img2img, inpaint); prompt_options:
    also --prompt-syntax, --clip-skip and --embedding."""
    if prompt_options:
        add_prompt_options(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", default="", type=_text, metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", default=50, type=_int_at_least(1, MAX_STEPS, " (a schedule has at most the "
                                                                 "scheduler's training timesteps)"),
                   help=f"denoising steps, at most {MAX_STEPS} (default: %(default)s)")
    g.add_argument("--guidance-scale", default=7.5, type=_finite_float, metavar="CFG",
                   help=f"classifier-free guidance scale, in [-{MAX_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}]; <= 1 "
                        "turns guidance off (default: %(default)s)")
    g.add_argument("--seed", default=None, type=_seed,
                   help=f"seed of the first image, in [0, {MAX_SEED}]; image i gets seed+i "
                        "(mod 2**32) (default: a random first seed)")
    g.add_argument("--num-images", default=1, type=_int_at_least(1), metavar="N",
                   help=f"images to make, at most {MAX_IMAGES} (default: 1)")
    g.add_argument("--batch-size", default=None, type=_int_at_least(1), metavar="B",
                   help=f"images per device call, at most {MAX_BATCH} (default: all at once, {MAX_BATCH} at a time "
                        "beyond that)")
    g.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="sampler (default: the checkpoint's own scheduler)")
    g.add_argument("--no-limits", action="store_true",
                   help=f"lift the bounds that catch typos: --height/--width (at most {MAX_SIZE}), --num-images "
                        f"({MAX_IMAGES}), --batch-size ({MAX_BATCH}) and --guidance-scale (+-{MAX_GUIDANCE_SCALE:g}); "
                        "--steps stays at most the scheduler's training timesteps")


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """--prompt-syntax, --clip-skip, --embedding: how prompts become the UNet's context (`sdjax.prompts`)."""
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt-syntax", default="a1111", choices=("a1111", "plain"),
                   help="a1111: AUTOMATIC1111's (word:1.3), (word), [word], \\( escapes and BREAK; plain: the text "
                        "as it is (A1111's 'Emphasis: None'). Either way prompts over 75 tokens are encoded in "
                        "75-token chunks (default: %(default)s)")
    g.add_argument("--clip-skip", default=1, type=_int_at_least(1), metavar="N",
                   help="A1111's Clip skip: 1 uses CLIP's last layer, 2 the penultimate (at most the text "
                        "encoder's layers, 12 for SD1.5) (default: %(default)s)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors: A1111 or diffusers layout) triggered by TOKEN "
                        "in prompts (default: diffusers' token in the file, else the file name without "
                        ".safetensors, as A1111); repeatable")


def add_size_options(p: argparse.ArgumentParser, default: int | None = 512, what: str | None = None) -> None:
    """--height/--width; tasks that start from an image default to its size (default=None); `what` words a
    default decided later (generate's: 512, or the control image's size)."""
    g = p.add_argument_group("size")
    if what is None:
        what = f"default: {default}" if default else "default: the input image's, rounded down to a multiple of 8"
    g.add_argument("--height", default=default, type=_size,
                   help=f"image height in pixels, multiple of 8, at most {MAX_SIZE} ({what})")
    g.add_argument("--width", default=default, type=_size,
                   help=f"image width in pixels, multiple of 8, at most {MAX_SIZE} ({what})")


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


CANNY_DEFAULTS = (100, 200)  # --control-preprocess canny's thresholds (lllyasviel's annotator's and A1111's)
CANNY_MAX = 255 * 4  # cv2.Canny's gradient magnitude bound (L1 norm of two 8-bit Sobel derivatives), as controls.canny


@dataclasses.dataclass
class ControlSpec:
    """One --controlnet group: the MODEL and the --control-* flags given after it (before the next --controlnet).
    `prepared` is the control image after --control-preprocess (set by `check_controls`)."""

    model: str
    image: str | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: tuple[str, int, int] = ("none", *CANNY_DEFAULTS)
    given: set[str] = dataclasses.field(default_factory=set)  # the group's --control-* flags (fields) seen
    prepared: Any = None

    def preprocessor(self) -> dict[str, Any]:
        """The preprocessor in the PNG parameters, as the sd-webui-controlnet extension records it."""
        name, low, high = self.preprocess
        return {"Module": name, "Threshold A": low, "Threshold B": high} if name == "canny" else {"Module": name}


class _ControlNetAction(argparse.Action):
    """--controlnet MODEL: starts a new ControlNet group (`ControlSpec`) in `args.controlnets`; the --control-*
    flags that follow apply to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        # a new list each time: argparse shares the default list between parses
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), ControlSpec(values)])


class _ControlOptionAction(argparse.Action):
    """A --control-* flag: sets its field (the dest without "control_") of the latest --controlnet group. Given
    before any --controlnet, or twice in one group, it is a usage error naming the flag (exit 2). Its dest is
    never set on the namespace (default=SUPPRESS): the value lives in the group."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = getattr(namespace, "controlnets", None)
        if not groups:
            raise argparse.ArgumentError(self, "must follow the --controlnet MODEL it belongs to (each --controlnet "
                                               "starts a group: --controlnet MODEL --control-image FILE "
                                               "[--control-scale S ...])")
        group = groups[-1]
        field = self.dest.removeprefix("control_")
        if field in group.given:
            raise argparse.ArgumentError(self, f"given twice for --controlnet {group.model!r}; each --controlnet "
                                               "takes one (start another group with --controlnet for another "
                                               "ControlNet)")
        group.given.add(field)
        setattr(group, field, values)


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (a fraction of the denoising steps)."""
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the steps in [0, 1], got {text}")
    return value


def _preprocessor(text: str) -> tuple[str, int, int]:
    """An argparse type: "none", "canny" or "canny:LOW:HIGH" -> (name, low, high)."""
    name, *thresholds = text.split(":")
    allowed = f"one of {', '.join(control_lib.PREPROCESSORS)} or canny:LOW:HIGH"
    if name not in control_lib.PREPROCESSORS:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    if not thresholds:
        return name, *CANNY_DEFAULTS
    if name != "canny" or len(thresholds) != 2:
        raise argparse.ArgumentTypeError(f"must be {allowed} (thresholds are canny's only), got {text!r}")
    try:
        low, high = (int(t) for t in thresholds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"canny's LOW and HIGH must be integers, got {text!r}") from None
    if not 0 <= low <= high <= CANNY_MAX:
        raise argparse.ArgumentTypeError(f"canny's thresholds must be integers with 0 <= LOW <= HIGH <= {CANNY_MAX}, "
                                         f"got {text!r}")
    return name, low, high


def add_controlnet_options(p: argparse.ArgumentParser) -> None:
    """--controlnet MODEL (repeatable) and the --control-* flags of its group; --guess-mode."""
    g = p.add_argument_group("controlnet", "Each --controlnet starts a group; the --control-* flags after it, up "
                                           "to the next --controlnet, apply to it. Several ControlNets add up.")
    g.add_argument("--controlnet", action=_ControlNetAction, default=[], dest="controlnets", metavar="MODEL",
                   help="a ControlNet: local diffusers folder or hub id (e.g. lllyasviel/control_v11p_sd15_canny); "
                        f"repeatable, at most {control_lib.MAX_CONTROLS}")
    g.add_argument("--control-image", action=_ControlOptionAction, default=argparse.SUPPRESS, metavar="FILE",
                   help="the group's control image (edges, depth, pose...); required, one per --controlnet")
    g.add_argument("--control-scale", action=_ControlOptionAction, default=argparse.SUPPRESS, type=_finite_float,
                   metavar="S", help="weight of the ControlNet's residuals (default: 1.0)")
    g.add_argument("--control-start", action=_ControlOptionAction, default=argparse.SUPPRESS, type=_fraction,
                   metavar="F", help="fraction of the steps where the ControlNet starts acting (default: 0)")
    g.add_argument("--control-end", action=_ControlOptionAction, default=argparse.SUPPRESS, type=_fraction,
                   metavar="F", help="fraction of the steps where it stops, > --control-start (default: 1)")
    g.add_argument("--control-preprocess", action=_ControlOptionAction, default=argparse.SUPPRESS,
                   type=_preprocessor, metavar="{none,canny[:LOW:HIGH]}",
                   help="make the control image from --control-image: none (use it as it is) or canny edges, "
                        f"canny:LOW:HIGH for other thresholds (default: none; canny: {CANNY_DEFAULTS[0]}:"
                        f"{CANNY_DEFAULTS[1]})")
    g.add_argument("--guess-mode", action="store_true",
                   help="diffusers' ControlNet guess mode: the ControlNets act on the prompt's half of CFG only, "
                        "steering by the control image even without a prompt (needs --controlnet)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    """`sdjax generate`: text to image."""
    p = sub.add_parser("generate", help="text to image", description="Text to image; writes PNGs with A1111-style "
                       "parameters (readable in A1111's PNG Info tab).")
    p.add_argument("prompt", type=_text, metavar="PROMPT", nargs="?", default=None,
                   help="what to draw (optional with --from-png)")
    p.add_argument("--from-png", default=None, metavar="IMAGE",
                   help="reproduce IMAGE from its A1111-style 'parameters' chunk (prompt, negative prompt, steps, "
                        "sampler, CFG scale, seed, size); PROMPT and flags given here override its values")
    add_sampling_options(p)
    # None: 512, or with --controlnet the first control image's size (resolved in run_generate, as txt2img does)
    add_size_options(p, None, f"default: {DEFAULT_SIZE}, or with --controlnet the first --control-image's size "
                              "rounded down to a multiple of 8")
    add_controlnet_options(p)
    add_model_options(p)
    add_output_options(p)
    _record_given(p)
    p.set_defaults(run=run_generate, parser=p, given=frozenset())


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
    add_controlnet_options(p)
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
    add_batch(sub)
    return parser


def add_train_lora_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`sdjax train-lora --data DIR --model M --rank R --steps N --out DIR ...` (run with `train.run_train_lora`)."""
    from sdjax import data, train  # the training code (train: the loop, its run_train_lora) is loaded only here
    from sdjax import lora as lora_lib
    from sdjax.train_step import MAX_RESOLUTION, PREDICTION_TYPES, TrainConfig

    d = TrainConfig()

    def number(low: float, strict: bool) -> Callable[[str], float]:
        """An argparse type: a finite number > low (strict) or >= low."""
        def parse(text: str) -> float:
            value = _finite_float(text)
            if value < low or (strict and value == low):
                raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, "
                                                 f"got {text}")
            return value
        return parse

    def resolution(text: str) -> int:
        value = _int_at_least(1)(text)
        if value % 8 or value > MAX_RESOLUTION:
            raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 in [8, {MAX_RESOLUTION}], got {value}")
        return value

    def target(text: str) -> str:
        text = _text(text)
        if text not in lora_lib.TARGET_SETS:
            if not text:
                raise argparse.ArgumentTypeError("an empty pattern would match every kernel")
            try:
                re.compile(text)
            except re.error as err:
                raise argparse.ArgumentTypeError(f"{text!r} is neither a target set nor a valid regex: {err}") from None
        return text

    p = subparsers.add_parser("train-lora", help="train a LoRA on a folder of captioned images",
                              description="LoRA fine-tuning on images with captions (name.txt beside each image, "
                              "or metadata.jsonl). Resumes from OUT/checkpoints; SIGTERM/Ctrl-C save and stop.")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images and captions")
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="diffusers-format folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoints, samples and the exported LoRA")
    p.add_argument("--rank", type=_int_at_least(1), default=d.rank)
    p.add_argument("--alpha", type=number(0, strict=True), default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", nargs="+", default=None, type=target,
                   help=f"a target set ({', '.join(lora_lib.TARGET_SETS)}) or kernel-path regexes (default: unet)")
    p.add_argument("--steps", type=_int_at_least(1), default=d.steps, help="optimizer updates (default: %(default)s)")
    p.add_argument("--lr", type=number(0, strict=True), default=d.lr)
    p.add_argument("--warmup-steps", type=_int_at_least(0), default=d.warmup_steps, help="at most --steps")
    p.add_argument("--weight-decay", type=number(0, strict=False), default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=number(0, strict=False), default=d.max_grad_norm,
                   help="0 turns clipping off")
    p.add_argument("--grad-accum", type=_int_at_least(1), default=d.grad_accum)
    p.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size,
                   help="global, a multiple of the device count")
    p.add_argument("--resolution", type=resolution, default=d.resolution,
                   help=f"a multiple of 8 up to {MAX_RESOLUTION} (default: %(default)s)")
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--bad-images", choices=data.BAD_IMAGE_POLICIES, default=d.bad_images)
    p.add_argument("--cache-latents", choices=data.CACHE_MODES, default=None)
    p.add_argument("--min-snr-gamma", type=number(0, strict=True), default=None)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None)
    p.add_argument("--seed", type=_seed, default=d.seed, help=f"in [0, {MAX_SEED}]")
    p.add_argument("--dtype", default=d.dtype, choices=tuple(convert.DTYPES),
                   help="compute dtype of the frozen model (LoRA and optimizer state stay float32)")
    p.add_argument("--checkpoint-every", type=_int_at_least(0), default=d.checkpoint_every)
    p.add_argument("--keep-last", type=_int_at_least(1), default=d.keep_last)
    p.add_argument("--sample-every", type=_int_at_least(0), default=d.sample_every)
    p.add_argument("--sample-prompt", action="append", default=None, dest="sample_prompts", type=_text)
    p.add_argument("--format", default=d.lora_format, dest="lora_format", choices=lora_lib.FORMATS,
                   help="LoRA export format (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="fail if OUT already has checkpoints")
    add_effort_option(p)
    p.add_argument("--no-progress", action="store_true")
    add_distributed_options(p)
    p.set_defaults(run=train.run_train_lora, parser=p)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """train_step.TrainConfig from `train-lora`'s arguments (ValueError names the bad flag)."""
    from sdjax.train import cli_flag
    from sdjax.train_step import ConfigError, TrainConfig

    # The settings that depend on each other, worded with the flags.
    if args.warmup_steps > args.steps:
        raise ValueError(f"--warmup-steps: must be <= --steps ({args.steps}), got {args.warmup_steps}: the learning "
                         "rate would never reach --lr")
    if args.cache_latents is not None and (args.random_crop or args.random_flip):
        raise ValueError("--cache-latents: cached latents are computed once, so random crops and flips cannot be "
                         "applied per epoch: drop --random-crop/--random-flip, or do not cache")
    try:
        return TrainConfig(
            rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
            targets=_targets(args.targets), lr=args.lr, warmup_steps=args.warmup_steps,
            steps=args.steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
            grad_accum=args.grad_accum, batch_size=args.batch_size, resolution=args.resolution,
            crop="random" if args.random_crop else "center", random_flip=args.random_flip,
            bad_images=args.bad_images, cache_latents=args.cache_latents, min_snr_gamma=args.min_snr_gamma,
            prediction_type=args.prediction_type, seed=args.seed, dtype=args.dtype,
            checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, sample_every=args.sample_every,
            sample_prompts=tuple(args.sample_prompts or ()), lora_format=args.lora_format)
    except ConfigError as err:  # what the flags' types let through (e.g. a Namespace built by hand)
        raise ValueError(f"{cli_flag(err.field)}: {err.message}") from None


def _targets(values: list[str] | None) -> str | tuple[str, ...]:
    """--targets' values (None: TrainConfig's default); checked as names or regexes by TrainConfig."""
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
    p.add_argument("--controlnets", default=0, type=_int_at_least(0, 8), metavar="N",
                   help="generation jobs with N ControlNets of the model's architecture in the loop (default: 0)")
    add_effort_option(p)
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
            controlnets = 0 if job == "train-lora" else args.controlnets  # training has none: plain for that job
            try:
                report = aot.compile_check(job, target, model=model, size=args.size, batch=args.batch,
                                           dtype=args.dtype, steps=args.steps, scheduler=args.scheduler,
                                           attention=args.attention, lora_rank=args.lora_rank,
                                           controlnets=controlnets, optimization_effort=args.optimization_effort)
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
    print(f"sdjax: error: {_one_line(message)}", file=sys.stderr)
    return status


def _one_line(message: str) -> str:
    """Errors are one line on stderr (loader messages may carry newlines)."""
    return " ".join(message.split())


def check_out_dir(out: str) -> pathlib.Path:
    """The output folder, proven writable before the model loads: the folder (and its missing parents) is
    created and a probe file written in it, then both are removed again, so a run that fails before its first
    image leaves nothing behind. Trying beats os.access, which says yes to root even on /proc or a read-only mount."""
    return _probe_dir(out, "--out")


def check_cache_dir(cache_dir: str | None) -> None:
    """--cache-dir: "off"/"" or a folder that can be created and written (checked as --out is); without the
    flag, the default folder (so a bad $SDJAX_CACHE_DIR is not blamed on --model later)."""
    if cache_dir is None:
        _probe_dir(str(process.default_cache_dir()), "--cache-dir (default: $SDJAX_CACHE_DIR or ~/.cache/sdjax/xla)")
    elif cache_dir not in ("", "off"):
        _probe_dir(cache_dir, "--cache-dir")


def _probe_dir(text: str, flag: str) -> pathlib.Path:
    import tempfile

    path = pathlib.Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {text!r} is a file, not a folder")
    missing = []
    parent = path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {text!r} cannot be created: {str(parent)!r} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            fd, probe = tempfile.mkstemp(prefix=".sdjax-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        finally:
            for folder in missing:  # deepest first: only the folders created here
                try:
                    folder.rmdir()
                except OSError:
                    pass
    except OSError as err:
        raise UsageError(f"{flag} {text!r} is not writable: {err.strerror or err}") from None
    return path


_FLAGS = {"negative_prompts": "--negative-prompt", "prompts": "PROMPT", "seeds": "--seed", "steps": "--steps",
          "clip_skip": "--clip-skip", "prompt_syntax": "--prompt-syntax",
          "guidance_scale": "--guidance-scale", "height": "--height", "width": "--width", "scheduler": "--scheduler",
          "strength": "--strength", "images": "--image", "masks": "--mask", "num_inference_steps": "--steps"}


def check_counts(args: argparse.Namespace) -> None:
    """--num-images and --batch-size against MAX_IMAGES and MAX_BATCH (unless --no-limits)."""
    if args.no_limits:
        return
    for flag, value, bound in (("--num-images", args.num_images, MAX_IMAGES),
                               ("--batch-size", args.batch_size, MAX_BATCH)):
        if value is not None and value > bound:
            raise UsageError(f"{flag}: must be an integer in [1, {bound}], got {value}; --no-limits lifts the bound")


def validate_generation(args: argparse.Namespace, prompt: str, height: int, width: int) -> Any:
    """`pipeline.validate_request` for the CLI's arguments -> Request with seeds S..S+N-1 (mod 2**32), S from
    --seed or drawn at random, so a run is repeatable with ``--seed S --num-images N``."""
    try:
        convert.parse_dtype(args.dtype)
    except ValueError as err:
        raise UsageError(f"--dtype: {err}") from None
    check_counts(args)
    seed = secrets.randbelow(MAX_SEED + 1) if args.seed is None else args.seed
    try:
        # the whole run as one request: its count bound is --num-images' (checked above), not one call's
        return pipeline.validate_request([prompt] * args.num_images, args.negative_prompt, seed, args.steps,
                                         args.guidance_scale, height, width, args.scheduler,
                                         allow_large=args.no_limits, max_images=MAX_IMAGES, **_prompt_kwargs(args))
    except (TypeError, ValueError) as err:
        raise UsageError(_name_flag(str(err))) from None


def _prompt_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """clip_skip and prompt_syntax from --clip-skip and --prompt-syntax (their defaults where a Namespace lacks
    them, as one built by hand)."""
    return {"clip_skip": getattr(args, "clip_skip", 1), "prompt_syntax": getattr(args, "prompt_syntax", "a1111")}


def check_embeddings(specs: Sequence[str]) -> list[tuple[str, str | None]]:
    """--embedding FILE[:TOKEN] values -> [(path, token or None)]: the files exist and hold an embedding layout
    sdjax reads (checked before the model loads; its hidden size is checked when the pipeline loads them)."""
    from sdjax import embeddings

    out = []
    for spec in specs:
        path, token = spec, None
        if not os.path.isfile(spec) and ":" in spec:
            path, _, token = spec.rpartition(":")
            if not token.strip():
                raise UsageError(f"--embedding {spec!r}: TOKEN after ':' is empty")
        try:
            embeddings.read_embedding(path, None, token)
        except (OSError, ValueError) as err:
            raise UsageError(f"--embedding {spec!r}: {_one_line(str(err))}") from None
        out.append((path, token))
    return out


def load_embeddings(pipe: Any, specs: Sequence[tuple[str, str | None]]) -> list[str]:
    """Binds the checked --embedding files to the loaded pipeline; their trigger tokens."""
    tokens = []
    for path, token in specs:
        try:
            tokens.append(pipe.load_embedding(path, token))
        except (OSError, ValueError) as err:
            raise UsageError(f"--embedding {path!r}: {_one_line(str(err))}") from None
    return tokens


def _cli_words(message: str) -> str:
    """The API's names for a bound's lifter and the size arguments -> the CLI's flags."""
    return message.replace("allow_large=True", "--no-limits").replace("give height and width",
                                                                        "give --height and --width")


def _name_flag(message: str) -> str:
    """A `validate_request` message in the CLI's words: "height must be ..." -> "--height: must be ..."."""
    message = _cli_words(message)
    for name in sorted(_FLAGS, key=len, reverse=True):
        if message.startswith(name):
            rest = message[len(name):]
            if rest.startswith("["):  # "prompts[0] is ...": keep the index
                return f"{_FLAGS[name]}{rest}"
            return f"{_FLAGS[name]}: {rest.lstrip(':=').strip()}"
    return message


def check_loras(specs: Sequence[str]) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values: a finite scale, the files exist and are safetensors (read before the model
    loads; `pipeline.load_pipeline` then checks them against the model's configs before its weights load)."""
    from sdjax import lora

    out = []
    for spec in specs:
        try:
            path, scale = lora.parse_spec(spec)
        except lora.LoRAError as err:
            raise UsageError(f"--lora {spec!r}: {err}") from None
        if not os.path.isfile(path):
            raise UsageError(f"--lora {spec!r}: no such file {path!r}")
        if not path.endswith(".safetensors"):
            raise UsageError(f"--lora {spec!r}: only .safetensors LoRA files are read (never pickles)")
        out.append((path, scale))
    return out


def check_controls(args: argparse.Namespace) -> list[ControlSpec]:
    """The --controlnet groups, checked as a whole (what argparse cannot see group by group): each has one
    --control-image, start < end, at most MAX_CONTROLS groups, --guess-mode only with a ControlNet; every control
    image is opened and preprocessed here, so a bad file fails before anything loads (UsageError, exit 2, naming
    the flag and value). Returns the groups with `prepared` set."""
    specs: list[ControlSpec] = list(getattr(args, "controlnets", None) or [])
    if getattr(args, "guess_mode", False) and not specs:
        raise UsageError("--guess-mode: needs at least one --controlnet MODEL --control-image FILE (it changes how "
                         "ControlNets steer)")
    if len(specs) > control_lib.MAX_CONTROLS:
        raise UsageError(f"--controlnet: at most {control_lib.MAX_CONTROLS} ControlNets per run, got {len(specs)}")
    for spec in specs:
        if spec.image is None:
            raise UsageError(f"--controlnet {spec.model!r} has no --control-image: give --control-image FILE after it "
                             "(one per --controlnet)")
        if not spec.start < spec.end:
            raise UsageError(f"--control-start {spec.start:g} / --control-end {spec.end:g} of --controlnet "
                             f"{spec.model!r}: need 0 <= start < end <= 1 (the steps where it acts)")
    for spec in specs:
        image = _open_image(cast(str, spec.image), "--control-image")
        if min(image.size) < 8:
            raise UsageError(f"--control-image {spec.image!r} is {image.width}x{image.height} pixels; control images "
                             "must be at least 8x8")
        name, low, high = spec.preprocess
        try:
            spec.prepared = control_lib.preprocess(name, image.convert("RGB"), low, high)
        except ImportError as err:  # canny without OpenCV
            raise UsageError(f"--control-preprocess {name}: {err}") from None
        except (TypeError, ValueError) as err:
            raise UsageError(f"--control-preprocess {name} of --control-image {spec.image!r}: {err}") from None
    return specs


def _model_unet_config(model: str) -> Any | None:
    """--model's UNet config when it can be read without loading weights or downloading: a local diffusers
    folder's unet/config.json, or what `load_pipeline` detects from a single file's header. None otherwise
    (a hub id, or a --model that `load` will report as broken): ControlNets are then checked against the UNet
    once the pipeline has loaded."""
    from sdjax import checkpoint, io, single_file

    path = pathlib.Path(model).expanduser()
    try:
        if path.is_dir():
            return checkpoint.read_config(path / "unet", "unet")
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return single_file.preset_configs(single_file.detect(io.LazyTensors(path), path)).unet
    except (OSError, ValueError):
        return None
    return None


def check_controlnets(specs: Sequence[ControlSpec], unet: Any | None) -> list[Any | None]:
    """The configs of the --controlnet values that are local (a folder, or a safetensors file in one; no weights
    read), checked against `unet` (the model's UNet config) when it is known: LoadError (exit 1, as for --model)
    for a missing or unreadable ControlNet, UsageError (exit 2, as a --lora that does not fit) for one made for
    another base model. None for a hub id: it is fetched and checked when it loads (as --model)."""
    from sdjax import controlnet, io

    configs: list[Any | None] = []
    for spec in specs:
        path = pathlib.Path(spec.model).expanduser()
        if not path.exists():
            if not io.looks_like_hub_id(spec.model):
                raise LoadError(f"--controlnet {spec.model!r} does not exist, and it is not a Hugging Face hub id like "
                                "'owner/name' (e.g. 'lllyasviel/control_v11p_sd15_canny')")
            configs.append(None)
            continue
        if path.is_file() and path.suffix != ".safetensors":
            raise LoadError(f"--controlnet {spec.model!r}: a ControlNet is a diffusers folder (config.json + "
                            "diffusion_pytorch_model.safetensors) or a .safetensors file in one; sdjax never "
                            "unpickles files")
        try:
            config = controlnet.read_config(path.parent if path.is_file() else path)
        except (OSError, ValueError) as err:
            raise LoadError(f"could not load --controlnet {spec.model!r}: {err}") from None
        if unet is not None:
            _check_fits(spec, config, unet)
        configs.append(config)
    return configs


def _check_fits(spec: ControlSpec, config: Any, unet: Any) -> None:
    from sdjax import controlnet

    try:
        controlnet.check_compatible(config, unet, source=f"--controlnet {spec.model!r}")
    except ValueError as err:
        raise UsageError(_one_line(str(err))) from None


def load_controlnets(args: argparse.Namespace, specs: Sequence[ControlSpec], configs: Sequence[Any | None],
                     unet: Any) -> list[Any]:
    """The --controlnet models for the loaded pipeline's `unet` config: the local ones are checked against it
    first (no ControlNet weights read before all fit), then each loads in --dtype (a hub id is fetched here;
    one for another base model is refused by `load_controlnet` before its weights are read)."""
    from sdjax import controlnet

    for spec, config in zip(specs, configs, strict=True):
        if config is not None:
            _check_fits(spec, config, unet)
    nets = []
    for spec in specs:
        try:
            nets.append(controlnet.load_controlnet(spec.model, dtype=args.dtype, unet=unet))
        except (OSError, ValueError) as err:
            raise LoadError(f"could not load --controlnet {spec.model!r}: {err}") from err
    return nets


_CONTROL_FIELD = re.compile(r"controls\[(\d+)\](?:\.(\w+)(?:\[\d+\])?)?")
_CONTROL_FLAGS = {"images": "--control-image", "scale": "--control-scale", "start": "--control-start",
                  "end": "--control-end"}


def _control_words(message: str, specs: Sequence[ControlSpec]) -> str:
    """The API's names of a control in the CLI's words: "controls[0].scale ..." -> "--control-scale of
    --controlnet 'NAME' ..." (the checks that need the loaded models)."""
    def words(m: re.Match) -> str:
        i, field = int(m.group(1)), m.group(2)
        group = f"--controlnet {specs[i].model!r}" if i < len(specs) else "--controlnet"
        flag = _CONTROL_FLAGS.get(field or "")
        return f"{flag} of {group}" if flag else group
    return _CONTROL_FIELD.sub(words, message)


def load(args: argparse.Namespace, loras: Sequence[tuple[str, float]] = ()) -> Any:
    """Loads the pipeline with the --lora files merged; raises LoadError with the loader's message on failure,
    UsageError for a LoRA that does not fit the model (found from the configs, before the weights load)."""
    from sdjax import parallel
    from sdjax.lora import LoRAError

    try:
        pipe = pipeline.load_pipeline(args.model, dtype=args.dtype, variant=args.variant,
                                      compilation_cache=args.cache_dir or process.default_cache_dir(),
                                      loras=list(loras), vae=getattr(args, "vae", None),
                                      safety_checker=not getattr(args, "no_safety_checker", False),
                                      optimization_effort=args.optimization_effort, conv=getattr(args, "conv", None))
        kernels = pipe.models.unet.attention
        if args.dtype != "float32" and parallel.platform(pipe.mesh) == "cpu" and kernels.choose_conv(
                pipe.dtype) == "xla":
            # XLA:CPU computes half-precision convolutions in float32, converting weights on the way (README,
            # benchmark section): slower than float32 and no smaller at run time. oneDNN's bf16 kernels are not.
            hint = ' (or install oneDNN: pip install -e ".[cpu]")' if args.dtype == "bfloat16" else ""
            print(f"sdjax: note: --dtype {args.dtype} on a CPU is slower than float32 here (XLA:CPU runs "
                  f"half-precision convolutions in float32); use --dtype float32 for speed{hint}", file=sys.stderr)
        return pipe
    except LoRAError as err:
        raise UsageError(f"--lora: {_one_line(str(err))}") from err
    except (OSError, ValueError) as err:
        raise LoadError(f"could not load --model {args.model!r}: {err}") from err


SAFETY_KEY = "Safety checker"  # PNG parameter of an image the checker replaced by a black one ("flagged")


def _record_given(p: argparse.ArgumentParser) -> None:
    """Makes every option of `p` add its dest to `args.given` when it is on the command line, so that
    --from-png can tell flags given explicitly (which override the PNG's values) from defaults."""
    for action in p._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.__class__ = _given_class(type(action))


_GIVEN_CLASSES: dict[type, type] = {}


def _given_class(base: type) -> type:
    if base not in _GIVEN_CLASSES:
        def __call__(self, parser, namespace, values, option_string=None):
            namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}
            base.__call__(self, parser, namespace, values, option_string)

        _GIVEN_CLASSES[base] = type(f"Given{base.__name__}", (base,), {"__call__": __call__})
    return _GIVEN_CLASSES[base]


# PNG parameters (A1111's keys) -> (the generate flag's dest, the flag, the flag's parser).
_PNG_FIELDS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "Steps": ("steps", "--steps", _int_at_least(1, MAX_STEPS)),
    "CFG scale": ("guidance_scale", "--guidance-scale", _finite_float),
    "Seed": ("seed", "--seed", _seed),
    "Clip skip": ("clip_skip", "--clip-skip", _int_at_least(1)),
}
# Keys that describe the image or the run, not a setting to reproduce: read without a warning.
_PNG_INFO_KEYS = ("Model hash", "Version", "VAE hash", "TI hashes", "Lora hashes", SAFETY_KEY)


def apply_png_parameters(args: argparse.Namespace) -> None:
    """--from-png IMAGE: the PNG's A1111 parameters become the defaults of `sdjax generate` (one image, its
    seed); PROMPT and the flags given on the command line (`args.given`) keep their values. Errors name the
    PNG and the field (UsageError, exit 2); what cannot be reproduced (an unknown sampler, LoRAs, another
    model, img2img's strength, keys sdjax does not know) is warned about on stderr."""
    path = args.from_png
    given: frozenset[str] = getattr(args, "given", frozenset())
    where = f"--from-png {path!r}"
    try:
        params = pngmeta.read_parameters(path)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL: not an image, truncated, ...
        raise UsageError(f"{where} is not a readable PNG: {err}") from None
    if params is None:
        raise UsageError(f"{where} has no '{pngmeta.KEYWORD}' text chunk (generation parameters as sdjax and "
                         "A1111 write them); give PROMPT and the flags instead")
    notes: list[str] = []
    if args.prompt is None:
        args.prompt = _png_text(params["prompt"], where, "prompt")
    if "negative_prompt" not in given:
        args.negative_prompt = _png_text(params["negative_prompt"], where, "Negative prompt")
    settings = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt")}
    if not settings:
        notes.append("it has a prompt but no settings line (Steps, Sampler, ...); the other values are defaults")
    for key, value in settings.items():
        if key in _PNG_FIELDS:
            dest, flag, parse = _PNG_FIELDS[key]
            if not hasattr(args, dest):
                notes.append(f"{key}: {value} is not supported here; ignored")
            elif dest not in given:
                setattr(args, dest, _png_value(parse, value, where, key))
        elif key == "Size":
            m = re.fullmatch(r"(\d+)x(\d+)", value)
            if m is None:
                raise UsageError(f"{where}: field 'Size' = {value!r} must be WIDTHxHEIGHT, e.g. 512x512")
            if "width" not in given:
                args.width = _png_value(_size, m.group(1), where, "Size (width)")
            if "height" not in given:
                args.height = _png_value(_size, m.group(2), where, "Size (height)")
        elif key == "Sampler":
            scheduler = pngmeta.generation_settings(params).get("scheduler")
            if scheduler is None:
                notes.append(f"Sampler {value!r} is not one of sdjax's ({', '.join(SCHEDULER_NAMES)}); using "
                             + ("--scheduler" if "scheduler" in given else "the checkpoint's own scheduler"))
            elif "scheduler" not in given:
                args.scheduler = scheduler
        elif key == "Schedule type":
            pass  # read with Sampler
        elif key == "Model":
            label = model_label(args.model)
            if value != label:
                notes.append(f"it was made with model {value!r}, this run uses {label!r} (--model): the image "
                             "will differ")
        elif key == "LoRA":
            if not args.lora:
                notes.append(f"it was made with LoRA(s) {value}; pass --lora FILE[:SCALE] to use them")
        elif key == "Denoising strength":
            notes.append(f"Denoising strength: {value} belongs to img2img/inpaint; text to image ignores it")
        elif pngmeta.CONTROLNET_KEY.fullmatch(key) or key == pngmeta.GUESS_MODE_KEY:
            pass  # one note for all of them, below
        elif key not in _PNG_INFO_KEYS:
            notes.append(f"{key}: {value!r} is not read by sdjax; ignored")
    controlnet_note = _png_controlnet_note(params, bool(getattr(args, "controlnets", None)))
    if controlnet_note:
        notes.append(controlnet_note)
    for note in notes:
        print(f"sdjax generate: warning: {where}: {note}", file=sys.stderr)


def _png_controlnet_note(params: dict[str, str], flags_given: bool) -> str | None:
    """The one --from-png note for a PNG made with ControlNets (None without): they are not restored, since a
    PNG does not hold its control images; this run uses the --controlnet flags, or none."""
    settings = pngmeta.generation_settings({k: v for k, v in params.items()
                                            if pngmeta.CONTROLNET_KEY.fullmatch(k) or k == pngmeta.GUESS_MODE_KEY})
    units = settings.get("controls", [])
    if not units and not settings.get("guess_mode"):
        return None
    made = ", ".join(f"{u['model'] or '?'} ({u['module']}" + (f", weight {u['scale']:g}" if "scale" in u else "")
                     + ")" for u in units) or "none listed"
    guess = " in guess mode" if settings.get("guess_mode") else ""
    if flags_given:
        return (f"it was made with ControlNet(s) {made}{guess}; their settings are not restored, this run uses the "
                "--controlnet flags given")
    return (f"it was made with ControlNet(s) {made}{guess}; ControlNet settings are not restored (a PNG does not "
            "hold the control images): give --controlnet MODEL --control-image FILE (and --control-scale, "
            "--control-start, --control-end, --control-preprocess, --guess-mode) to use them")


def _png_value(parse: Callable[[str], Any], value: str, where: str, key: str) -> Any:
    try:
        return parse(value.strip())
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{where}: field '{key}' = {value!r} {err}") from None


def _png_text(value: str, where: str, key: str) -> str:
    try:
        return _text(value)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{where}: field '{key}' {err}") from None


def run_generate(args: argparse.Namespace) -> int:
    """`sdjax generate`: validate, load, generate in batches, write numbered PNGs."""
    if getattr(args, "from_png", None) is not None:
        apply_png_parameters(args)
    if args.prompt is None:
        raise UsageError("PROMPT is required (or --from-png IMAGE to take it from a PNG)")
    specs = check_controls(args)
    height, width = args.height, args.width
    if specs and (height is None or width is None):  # the first control image's size, as txt2img's
        try:
            height, width = images.output_size(images.image_arrays([specs[0].prepared])[0], height, width, 8,
                                               None if args.no_limits else MAX_SIZE)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--control-image {specs[0].image!r}: " + _cli_words(str(err))) from None
    request = validate_generation(args, args.prompt, DEFAULT_SIZE if height is None else height,
                                  DEFAULT_SIZE if width is None else width)

    def call(pipe, part, kw):
        return pipe.txt2img(request.prompts[part], request.negative_prompts[part], height=request.height,
                            width=request.width, **kw)

    return _generate(args, request, call, controls=specs)


def run_img2img(args: argparse.Namespace) -> int:
    """`sdjax img2img`: as generate, starting from --image."""
    image = _open_image(args.image, "--image")
    specs = check_controls(args)
    request, height, width = _validate_with_image(args, image)

    def call(pipe, part, kw):
        n = len(request.seeds[part])
        return pipe.img2img([image] * n, request.prompts[part], args.strength, request.negative_prompts[part],
                            height=height, width=width, **kw)

    return _generate(args, request, call, {"Denoising strength": args.strength}, controls=specs)


def run_inpaint(args: argparse.Namespace) -> int:
    """`sdjax inpaint`: as generate, repainting the white part of --mask on --image."""
    image = _open_image(args.image, "--image")
    mask = _open_image(args.mask, "--mask")
    specs = check_controls(args)
    request, height, width = _validate_with_image(args, image)
    try:
        images.mask_arrays([mask], [image])
    except (TypeError, ValueError) as err:
        raise UsageError(f"--mask: {err}".replace("images[0]", "--image")) from None

    def call(pipe, part, kw):
        n = len(request.seeds[part])
        return pipe.inpaint([image] * n, [mask] * n, request.prompts[part], args.strength,
                            request.negative_prompts[part], height=height, width=width,
                            paste_back=args.paste_back, **kw)

    return _generate(args, request, call, {"Denoising strength": args.strength}, controls=specs)


def _open_image(path: str, flag: str):
    """Opens and fully decodes an image file (so a broken file fails before the model loads)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UsageError(f"{flag} {path!r} is not a readable image: {err}") from None


def _validate_with_image(args: argparse.Namespace, image) -> tuple[Any, int, int]:
    """The output size from --height/--width or the image (not resized here: the pipeline does that)."""
    try:
        arrays = images.image_arrays([image])
        height, width = images.output_size(arrays[0], args.height, args.width, 8,
                                           None if args.no_limits else MAX_SIZE)
    except (TypeError, ValueError) as err:
        raise UsageError("--image: " + _cli_words(str(err)).replace("images[0]: ", "")) from None
    return validate_generation(args, args.prompt, height, width), height, width


def _generate(args: argparse.Namespace, request: Any, call: Callable, extra: dict | None = None,
              controls: Sequence[ControlSpec] = ()) -> int:
    """Loads the model (and the ControlNets of `controls`, from `check_controls`), runs `call(pipe, batch_slice,
    common_kwargs)` per batch, writes numbered PNGs."""
    out = check_out_dir(args.out)
    check_cache_dir(args.cache_dir)
    loras = check_loras(args.lora)  # read before the model loads
    embedding_specs = check_embeddings(getattr(args, "embedding", []))
    try:
        control_configs = check_controlnets(controls, _model_unet_config(args.model))
        pipe = load(args, loras)
        nets = load_controlnets(args, controls, control_configs, pipe.models.unet.config)
    except LoadError as err:
        return fail(str(err))
    load_embeddings(pipe, embedding_specs)  # the triggers appear in the prompts (A1111 records them so)
    if loras:
        extra = {**(extra or {}), "LoRA": ", ".join(f"{pathlib.Path(p).stem}:{s:g}" for p, s in loras)}
    if pipe.vae_name:  # a swapped VAE, recorded by name as A1111 does
        extra = {**(extra or {}), "VAE": pipe.vae_name}
    written: list[pathlib.Path] = []
    batch = args.batch_size or (len(request.seeds) if args.no_limits else min(len(request.seeds), MAX_BATCH))
    for start in range(0, len(request.seeds), batch):
        part = slice(start, start + batch)
        kw = dict(steps=args.steps, guidance_scale=args.guidance_scale, seeds=request.seeds[part],
                  scheduler=args.scheduler, progress=_progress(args), allow_large=args.no_limits,
                  **_prompt_kwargs(args))
        if controls:  # one control image per image of the call
            n = len(request.seeds[part])
            kw.update(controls=[control_lib.Control(net, [spec.prepared] * n, spec.scale, spec.start, spec.end)
                                for net, spec in zip(nets, controls, strict=True)],
                      guess_mode=args.guess_mode)
        try:
            gen = call(pipe, part, kw)
        except ValueError as err:  # a check that needs the model (e.g. its own size multiple)
            raise UsageError(_name_flag(_control_words(str(err), controls))) from None
        try:
            paths = save_generation(gen, out, model_label(args.model), extra,
                                    [spec.preprocessor() for spec in controls] if controls else None)
        except OSError as err:
            return fail(f"could not write to --out {args.out!r}: {err}" + (f"; {_wrote(written)}" if written else ""))
        written += paths
        for path, flagged in zip(paths, gen.nsfw or [False] * len(paths), strict=True):
            if flagged:  # diffusers' behaviour: a black image in its place, and a warning
                print(f"sdjax: safety checker flagged {path} (seed {path.stem.split('-', 1)[1]}): written as a "
                      "black image (--no-safety-checker turns the checker off)", file=sys.stderr)
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


def save_generation(gen: Any, out: pathlib.Path, model_name: str, extra: dict | None = None,
                    preprocessors: Sequence[dict[str, Any]] | None = None) -> list[pathlib.Path]:
    """Writes every image of a Generation as ``<number>-<seed>.png`` in `out`, never replacing a file;
    preprocessors: how each ControlNet's control image was made (`pngmeta.infotext`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(gen.images):
        flagged = {SAFETY_KEY: "flagged"} if getattr(gen, "nsfw", None) and gen.nsfw[i] else {}
        text = pngmeta.infotext(gen, i, model=model_name, extra={**(extra or {}), **flagged} or None,
                                preprocessors=preprocessors)
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



def add_batch(sub: argparse._SubParsersAction) -> None:
    """`sdjax batch PROMPTS --out DIR`: a prompt file to a folder of PNGs and a manifest (see `sdjax.batch`)."""
    p = sub.add_parser("batch", help="bulk text to image from a prompt file, restartable, on all hosts",
                       description="Generates every prompt of a text file (one prompt per line) or JSONL file "
                       "(prompt, negative_prompt, seed, steps, guidance_scale, size or height/width, scheduler, "
                       "num_images) into OUT/LLLLLL-KKK.png plus OUT/manifest.jsonl. Running it again skips the "
                       "images that are done. Flags are the defaults of lines that do not set their own. "
                       "Multi-process: run the same command in every process (see docs/multihost.md).")
    p.add_argument("prompts", metavar="PROMPTS", help="prompt file: text, one prompt per line, or JSONL")
    add_sampling_options(p, prompt_options=False)  # batch.run_batch does not pass them on (yet)
    add_size_options(p)
    add_model_options(p)
    add_output_options(p)
    help_of = {a.dest: a for a in p._actions}  # the shared options, in the words of a batch job
    help_of["num_images"].help = "images per prompt line (default: 1; a line's num_images overrides)"
    help_of["seed"].help = (f"base seed in [0, {MAX_SEED}] (default: 0): a line without a seed gets base+k, k the "
                            "number of images before it in the file; image i of a line gets its seed+i")
    help_of["batch_size"].help = ("images per call over all devices of all processes, rounded up to a multiple of "
                                  f"the device count, at most {MAX_BATCH} (default: one per device)")
    add_distributed_options(p)
    p.set_defaults(run=run_batch, parser=p)


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """The flags that join a multi-process run (`parallel.distributed_from` reads them), for `batch` and
    `train-lora`."""
    g = p.add_argument_group("multi-process (flags, else $SDJAX_COORDINATOR, $SDJAX_NUM_PROCESSES, $SDJAX_PROCESS_ID)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address and a free port")
    g.add_argument("--num-processes", default=None, type=_int_at_least(1), metavar="N")
    g.add_argument("--process-id", default=None, type=_int_at_least(0), metavar="I", help="in [0, N)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run detected by JAX (Cloud TPU pod slice, SLURM, Open MPI) without "
                        "the three flags above")


def run_batch(args: argparse.Namespace) -> int:
    """`sdjax batch`: check the prompt file and flags, join the multi-process run, load, run the job."""
    from sdjax import batch, parallel

    try:
        convert.parse_dtype(args.dtype)
    except ValueError as err:
        raise UsageError(f"--dtype: {err}") from None
    if not args.no_limits and args.batch_size is not None and args.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size: must be an integer in [1, {MAX_BATCH}], got {args.batch_size}; --no-limits "
                         "lifts the bound")
    defaults = batch.Defaults(negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                              scheduler=args.scheduler, num_images=args.num_images,
                              seed=0 if args.seed is None else args.seed)
    try:
        job = batch.BatchJob.from_file(args.prompts, defaults, allow_large=args.no_limits)
    except batch.PromptFileError as err:  # every bad line, one per line, before anything loads
        for line in str(err).splitlines():
            print(f"sdjax batch: error: {line}", file=sys.stderr)
        return 2
    except OSError as err:
        raise UsageError(f"PROMPTS {args.prompts!r} cannot be read: {err.strerror or err}") from None
    try:
        dist = parallel.distributed_from(args.coordinator, args.num_processes, args.process_id, os.environ,
                                         auto=args.distributed)
    except ValueError as err:
        raise UsageError(f"--coordinator/--num-processes/--process-id: {err}") from None
    out = check_out_dir(args.out)
    check_cache_dir(args.cache_dir)
    loras = check_loras(args.lora)
    if dist is not None:
        parallel.initialize(dist)  # before anything touches a device
    try:
        pipe = load(args, loras)
    except LoadError as err:
        return fail(str(err))
    extra = {"LoRA": ", ".join(f"{pathlib.Path(p).stem}:{s:g}" for p, s in loras)} if loras else None
    if pipe.vae_name:  # a swapped VAE, recorded by name as A1111 does
        extra = {**(extra or {}), "VAE": pipe.vae_name}
    try:
        result = batch.run_batch(pipe, job, out, batch_size=args.batch_size, model=model_label(args.model),
                                 extra=extra, progress=_progress(args), allow_large=args.no_limits)
    except batch.BatchConflictError as err:
        return fail(str(err))
    except ValueError as err:  # a check that needs the model (its size multiple, its scheduler's step bound)
        raise UsageError(_name_flag(str(err))) from None
    except OSError as err:
        return fail(f"could not write to --out {args.out!r}: {err}")
    import jax

    if jax.process_index() == 0:
        print(f"wrote {result.total - result.skipped} of {result.total} images to {out} "
              f"({result.skipped} already done); manifest: {result.manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
