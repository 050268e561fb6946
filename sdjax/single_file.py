"""Single-file SD1.x checkpoints (the original CompVis/LDM layout) and separate VAEs -> sdjax params.

A single file such as `v1-5-pruned-emaonly.safetensors` holds the three models under the names of the original
`ldm` code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*`
(CLIP text model). The tables here map every parameter key of `convert`'s diffusers-named rule tables to its
original key, so `convert.to_params` loads the file with the same strict checks as a diffusers folder: every key
used or explicitly ignored (`IGNORED`), every shape checked, errors naming the file and the original key.

The key facts follow diffusers' own converter (`diffusers/loaders/single_file_utils.py`:
`DIFFUSERS_TO_LDM_MAPPING`, `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`), cited per table below; the tables themselves are written from the architecture.

Full (training) checkpoints also hold `model_ema.*`, an exponential moving average of the UNet under flattened
names. As diffusers' `from_single_file` (`extract_ema=False` by default) and AUTOMATIC1111 do, the
`model.diffusion_model.*` weights are used and the EMA copy is ignored unless `ema=True`.

Configs: detection tells SD1.x (4 UNet input channels) from SD1.x inpainting (9) by `conv_in`'s shape, and checks
the model's size against SD1.5's; the SD1.5 configs (UNet, inpainting UNet, VAE, text encoder, scheduler) ship in
`sdjax/assets/`, the tokenizer is the bundled CLIP BPE one. `config=` names a preset or a diffusers folder whose
configs (and tokenizer/scheduler, when present) describe the file instead. Only safetensors files are read.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sdjax import checkpoint, convert, io
from sdjax.io import CheckpointError

ASSETS = pathlib.Path(__file__).parent / "assets"
COMPONENTS = ("text_encoder", "unet", "vae")

# Component prefixes of the original layout (single_file_utils: LDM_UNET_KEY, LDM_VAE_KEYS[0],
# LDM_CLIP_PREFIX_TO_REMOVE[0]).
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
EMA_PREFIX = "model_ema."  # ldm's LitEma: "model_ema." + the UNet key under "model." with its dots removed

# Known presets: the config assets of each component (sd15-inpaint differs in the UNet's in_channels only).
PRESETS: dict[str, dict[str, str]] = {
    "sd15": {"unet": "sd15_unet_config.json", "vae": "sd15_vae_config.json",
             "text_encoder": "sd15_text_encoder_config.json", "scheduler": "sd15_scheduler_config.json"},
    "sd15-inpaint": {"unet": "sd15_inpaint_unet_config.json", "vae": "sd15_vae_config.json",
                     "text_encoder": "sd15_text_encoder_config.json", "scheduler": "sd15_scheduler_config.json"},
}
PRESET_BY_IN_CHANNELS = {4: "sd15", 9: "sd15-inpaint"}  # single_file_utils.infer_diffusers_model_type

# Entries of a full checkpoint that are no weights sdjax uses, each named: ldm's DDPM registers its noise
# schedule as buffers (ldm/models/diffusion/ddpm.py `register_schedule`), LitEma its decay and update count,
# and CLIPTextModel (transformers < 4.31) saved its `position_ids` buffer (the positions are 0..76 anyway).
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights")
IGNORED = (
    re.compile("^(" + "|".join(_SCHEDULE_BUFFERS) + ")$"),
    re.compile(r"^model_ema\.(decay|num_updates)$"),
    re.compile(r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$"),
)
_EMA_WEIGHTS = re.compile(r"^model_ema\.(?!decay$|num_updates$)")
_UNET_WEIGHTS = re.compile(r"^model\.diffusion_model\.")
# A VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) may carry LitEma's two counters as well.
VAE_IGNORED = (re.compile(r"^model_ema\.(decay|num_updates)$"),)

# Keys only other model families have: refused with their name rather than as a pile of unexpected keys.
_OTHER_FAMILIES = (("conditioner.embedders.", "an SDXL checkpoint"),
                   ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP text encoder)"))

# --- UNet: diffusers module -> original module ------------------------------------------------------------------
# single_file_utils.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]: the stem and the output head.
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# update_unet_resnet_ldm_to_diffusers: ResBlock children.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# --- VAE --------------------------------------------------------------------------------------------------------
# DIFFUSERS_TO_LDM_MAPPING["vae"]: stem, head and quant convs.
_VAE_TOP = {"encoder.conv_in": "encoder.conv_in", "encoder.conv_norm_out": "encoder.norm_out",
            "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
            "decoder.conv_norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out",
            "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
# update_vae_resnet_ldm_to_diffusers: only the shortcut is renamed.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# update_vae_attentions_ldm_to_diffusers; the projections are 1x1 convs there (conv_attn_to_linear squeezes them).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_CONV1X1 = ("to_q", "to_k", "to_v", "to_out.0")


def unet_modules(cfg) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers UNet module -> (original module, child renames; None: children keep their names).

    convert_ldm_unet_checkpoint: `input_blocks.0` is conv_in; then each down block's layers_per_block
    (ResBlock, SpatialTransformer) pairs `input_blocks.k.{0,1}` and its downsampler `input_blocks.k.0.op`
    (block i, layer j at k = 1 + i * (layers_per_block + 1) + j); the mid block is `middle_block.{0,1,2}`
    (resnet, attention, resnet); up block i, layer j is `output_blocks.{i * (layers_per_block + 1) + j}.{0,1}`,
    and its upsampler the last layer's `.1.conv`, or `.2.conv` after an attention."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block + 1
    table: dict[str, tuple[str, dict[str, str] | None]] = {k: (v, None) for k, v in _UNET_TOP.items()}
    for i in range(n):
        attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        for j in range(cfg.layers_per_block):
            k = 1 + i * per + j
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
            if attn:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", None)
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{1 + i * per + per - 1}.0.op", None)
    table["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
    table["mid_block.attentions.0"] = ("middle_block.1", None)
    table["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    for i in range(n):
        attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        for j in range(per):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * per + j}.0", _UNET_RESNET)
            if attn:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * per + j}.1", None)
        if i < n - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * per + per - 1}.{2 if attn else 1}.conv",
                                                         None)
    return table


def vae_modules(cfg) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers VAE module -> (original module, child renames). convert_ldm_vae_checkpoint: encoder block i is
    `encoder.down.i` (resnets `block.j`, `downsample.conv`); decoder up block i is `decoder.up.{n-1-i}` (the
    original numbers them from the lowest resolution up); mid blocks are `mid.block_1`, `mid.attn_1`,
    `mid.block_2`."""
    n = len(cfg.block_out_channels)
    table: dict[str, tuple[str, dict[str, str] | None]] = {k: (v, None) for k, v in _VAE_TOP.items()}
    for i in range(n):
        for j in range(cfg.layers_per_block):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
        for j in range(cfg.layers_per_block + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", None)
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    return table


def _original_key(key: str, table: Mapping[str, tuple[str, dict[str, str] | None]]) -> str:
    """A diffusers parameter key -> its original key, through the innermost module of `table` holding it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in table:
            original, children = table[module]
            rest = ".".join(parts[cut:])
            if children is not None:
                child = next((c for c in children if rest.startswith(c + ".")), None)
                if child is None:
                    raise AssertionError(f"single-file table has no rename for {key!r}")  # an sdjax bug
                rest = children[child] + rest[len(child):]
            return f"{original}.{rest}"
    raise AssertionError(f"single-file table has no module for {key!r}")  # an sdjax bug


def _ema_key(key: str) -> str:
    """`model.diffusion_model.X.Y` -> `model_ema.diffusion_modelXY` (LitEma; single_file_utils'
    convert_ldm_unet_checkpoint reads the EMA weights under these names)."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def rules(kind: str, cfg: Any, *, prefix: str | None = None, ema: bool = False) -> list[convert.Rule]:
    """The rule table of a component in the original layout: `convert`'s rules (same pytree paths and
    transforms) under the original keys, with `prefix` (default: the component's prefix in a full checkpoint).

    text_encoder: the keys after the prefix are transformers' CLIPTextModel ones, `text_model.` first
    (convert_ldm_clip_checkpoint only strips the prefix); files without `text_model.` are accepted as an alias."""
    prefix = PREFIXES[kind] if prefix is None else prefix
    out: list[convert.Rule] = []
    if kind == "text_encoder":
        for r in convert.clip_rules(cfg):
            out.append(dataclasses.replace(r, key=f"{prefix}text_model.{r.key}", aliases=(prefix + r.key,)))
        return out
    table = unet_modules(cfg) if kind == "unet" else vae_modules(cfg)
    base = convert.unet_rules(cfg) if kind == "unet" else convert.vae_rules(cfg)
    for r in base:
        key = prefix + _original_key(r.key, table)
        transform = r.transform
        if kind == "vae" and ".mid_block.attentions." in r.key and r.key.endswith(".weight") \
                and any(f".{c}.weight" in r.key for c in _VAE_CONV1X1):
            transform = "conv1x1_linear"  # [O, I, 1, 1] in the file
        if kind == "unet" and ema:
            key = _ema_key(key)
        out.append(dataclasses.replace(r, key=key, transform=transform, aliases=()))
    if len({r.key for r in out}) != len(out):
        raise AssertionError(f"single-file {kind} table maps two parameters to one key")  # an sdjax bug
    return out


# --- configs ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Configs:
    """What a single file's weights need beside them: component configs, the scheduler config, the tokenizer."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler_path: pathlib.Path  # scheduler_config.json: the config folder's, else SD1.5's asset
    tokenizer_folder: pathlib.Path | None  # None: the SD1.5 tokenizer shipped with sdjax
    name: str  # the preset's name or the config folder

    def __getitem__(self, kind: str) -> Any:
        return getattr(self, kind)

    def tokenizer(self):
        from sdjax.tokenizer import ClipTokenizer

        if self.tokenizer_folder is None:
            return ClipTokenizer.sd15()
        return ClipTokenizer.from_folder(self.tokenizer_folder)


def preset_configs(name: str) -> Configs:
    """The configs of a known preset ("sd15", "sd15-inpaint"), from the JSON assets shipped with sdjax."""
    if name not in PRESETS:
        raise ValueError(f"config={name!r} is not a known preset ({', '.join(PRESETS)}) nor a folder")
    files = PRESETS[name]
    parsed = {kind: checkpoint.KINDS[kind].parse(io.read_json(ASSETS / files[kind])) for kind in COMPONENTS}
    return Configs(**parsed, scheduler_path=ASSETS / files["scheduler"], tokenizer_folder=None, name=name)


def folder_configs(folder: str | os.PathLike) -> Configs:
    """The configs of a diffusers folder (unet/, vae/, text_encoder/ config.json; scheduler/ and tokenizer/ when
    present, else SD1.5's); no weights are read."""
    folder = pathlib.Path(folder)
    parsed = {kind: checkpoint.read_config(folder / kind, kind) for kind in COMPONENTS}
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        warnings.warn(f"config folder {str(folder)!r} has no scheduler/scheduler_config.json: using SD1.5's",
                      stacklevel=3)
        sched_path = ASSETS / PRESETS["sd15"]["scheduler"]
    tokenizer = folder / "tokenizer"
    return Configs(**parsed, scheduler_path=sched_path, tokenizer_folder=tokenizer if tokenizer.is_dir() else None,
                   name=str(folder))


def detect(state: io.LazyTensors, path: pathlib.Path) -> str:
    """The preset a single file's tensors fit (by their names and shapes, no tensor read); raises CheckpointError
    naming the file when it is no SD1.x checkpoint in the original layout, or not one of SD1.5's size."""
    keys = list(state)
    for prefix, what in _OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{path}: this is {what} (keys '{prefix}*'); sdjax runs SD1.x models only")
    conv_in = PREFIXES["unet"] + "input_blocks.0.0.weight"
    if conv_in not in state:
        if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys) and \
                not any(k.startswith(PREFIXES["unet"]) for k in keys):
            raise CheckpointError(f"{path}: this holds only a VAE (no '{conv_in}'); load it with vae=PATH "
                                  "(CLI: --vae PATH) beside a model")
        raise CheckpointError(f"{path}: not a single-file SD1.x checkpoint in the original (CompVis) layout: it "
                              f"has no '{conv_in}' (diffusers-format weights belong in a diffusers folder)")
    shape, _, _ = state.spec(conv_in)
    if len(shape) != 4 or shape[1] not in PRESET_BY_IN_CHANNELS:
        raise CheckpointError(f"{path}: '{conv_in}' has shape {tuple(shape)}: a UNet with "
                              f"{shape[1] if len(shape) == 4 else '?'} input channels is neither SD1.x (4) nor SD1.x "
                              "inpainting (9); pass config= naming a diffusers folder with the model's configs")
    context = PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context_dim = state.spec(context)[0][1] if context in state and len(state.spec(context)[0]) == 2 else None
    if shape[0] != 320 or context_dim != 768:
        raise CheckpointError(
            f"{path}: not SD1.5's size ('{conv_in}' has {shape[0]} output channels, SD1.5's 320; cross-attention "
            f"width {context_dim}, SD1.5's 768); pass config= naming a diffusers folder with the model's configs")
    return PRESET_BY_IN_CHANNELS[shape[1]]


def _configs_for(config: str | os.PathLike | None, state: io.LazyTensors, path: pathlib.Path) -> Configs:
    if config is None:
        return preset_configs(detect(state, path))
    if isinstance(config, str) and config in PRESETS:
        return preset_configs(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a preset name ({', '.join(PRESETS)}) or a diffusers folder, got {config!r}")
    if not pathlib.Path(config).is_dir():
        raise ValueError(f"config={os.fspath(config)!r} is neither a known preset ({', '.join(PRESETS)}) nor an "
                         "existing diffusers folder")
    return folder_configs(config)


# --- a whole checkpoint -------------------------------------------------------------------------------------------

class SingleFile:
    """A single-file SD1.x checkpoint, opened and checked: configs found, every key and shape checked against the
    rule tables (from the header; no tensor read yet). `load(kind, dtype)` reads one component's params."""

    def __init__(self, path: str | os.PathLike, *, config: str | os.PathLike | None = None, ema: bool = False):
        self.path = pathlib.Path(path)
        if self.path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{self.path}: only .safetensors single-file checkpoints are read")
        self.state = io.LazyTensors(self.path)  # the safetensors library validates the file here
        self.configs = _configs_for(config, self.state, self.path)
        keys = list(self.state)
        has_ema = any(_EMA_WEIGHTS.match(k) for k in keys)
        if ema and not has_ema:
            raise CheckpointError(f"{self.path}: ema=True, but the file has no EMA weights ('{EMA_PREFIX}*')")
        self.ema = ema
        self.rules = {kind: rules(kind, self.configs[kind], ema=ema and kind == "unet") for kind in COMPONENTS}
        # Each key belongs to one component (by prefix) or is explicitly ignored; anything else is refused now.
        unet_weights = _EMA_WEIGHTS if ema else _UNET_WEIGHTS
        self.ignored = IGNORED + ((_UNET_WEIGHTS,) if ema else (_EMA_WEIGHTS,))
        self.parts: dict[str, list[str]] = {kind: [] for kind in COMPONENTS}
        unknown = []
        for key in keys:
            if unet_weights.match(key):
                self.parts["unet"].append(key)
            elif key.startswith(PREFIXES["vae"]):
                self.parts["vae"].append(key)
            elif key.startswith(PREFIXES["text_encoder"]):
                self.parts["text_encoder"].append(key)
            elif not any(p.search(key) for p in self.ignored):
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"{self.path}: unexpected key(s) {convert._few(sorted(unknown))} (not part of an "
                                  "SD1.x single-file checkpoint)")
        for kind in COMPONENTS:
            convert.check_state(self._view(kind), self.rules[kind], checkpoint.abstract_params(kind, self.configs[kind]),
                                source=str(self.path), ignored=self.ignored)

    def _view(self, kind: str) -> Mapping[str, np.ndarray]:
        return convert.Renamed(self.state, {k: k for k in self.parts[kind]})

    def load(self, kind: str, dtype: Any = "float32") -> Any:
        """One component's params (jnp arrays of `dtype`), each tensor checked finite as it is converted."""
        dtype = convert.parse_dtype(dtype)
        abstract = checkpoint.abstract_params(kind, self.configs[kind])
        return convert.to_params(self._view(kind), self.rules[kind], abstract, source=str(self.path),
                                 ignored=self.ignored, dtype=dtype, finalize=jax.device_put)


# --- a separate VAE -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAESource:
    """A VAE to swap in, opened and checked (config and tensor names/shapes; no tensor read yet)."""

    path: pathlib.Path
    config: Any
    name: str  # as AUTOMATIC1111 records it: the file's (or folder's) name
    _state: Mapping[str, np.ndarray]
    _rules: list[convert.Rule]

    def load(self, dtype: Any = "float32") -> Any:
        dtype = convert.parse_dtype(dtype)
        return convert.to_params(self._state, self._rules, checkpoint.abstract_params("vae", self.config),
                                 source=str(self.path), ignored=VAE_IGNORED, dtype=dtype,
                                 finalize=jax.device_put)


def read_vae(path: str | os.PathLike, base: Any) -> VAESource:
    """A VAE to replace a pipeline's whose VAE config is `base`: a diffusers VAE folder (config.json + weights, or a
    model folder's vae/), or a single safetensors file in the original layout (`encoder.down.0...`, with or without
    the `first_stage_model.` prefix, e.g. vae-ft-mse-840000-ema-pruned.safetensors; its architecture is `base`'s)
    or in diffusers' layout. With the prefix only the prefixed keys are read, so a whole single-file checkpoint
    lends its VAE (as diffusers' `AutoencoderKL.from_single_file`, which reads only those). Its latent space must
    be the pipeline's (latent channels and downsampling)."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        folder = path if (path / "config.json").is_file() or not (path / "vae").is_dir() else path / "vae"
        config = checkpoint.read_config(folder, "vae")
        state: Mapping[str, np.ndarray] = io.LazyTensors(io.find_weights(folder, checkpoint.KINDS["vae"].stem))
        vae_rules = convert.vae_rules(config)
    elif path.is_file():
        if path.suffix.lower() in io.PICKLE_SUFFIXES:
            raise io.PickledWeightsError(io.pickled_file_message(path))
        config = base
        state = io.LazyTensors(path)
        keys = list(state)
        prefix = PREFIXES["vae"] if any(k.startswith(PREFIXES["vae"]) for k in keys) else ""
        if prefix:  # a VAE file with the prefix, or a whole checkpoint: its VAE (as AutoencoderKL.from_single_file)
            state = convert.Renamed(state, {k: k for k in keys if k.startswith(prefix)})
        if any(k.startswith(prefix + "encoder.down_blocks.") for k in keys):  # diffusers' names in one file
            vae_rules = [dataclasses.replace(r, key=prefix + r.key, aliases=tuple(prefix + a for a in r.aliases))
                         for r in convert.vae_rules(config)]
        else:
            vae_rules = rules("vae", config, prefix=prefix)
    else:
        raise FileNotFoundError(f"VAE {str(path)!r} does not exist (pass a diffusers VAE folder or a .safetensors "
                                "file)")
    if config.latent_channels != base.latent_channels or \
            len(config.block_out_channels) != len(base.block_out_channels):
        raise CheckpointError(
            f"{path}: this VAE's latents ({config.latent_channels} channels, downsampling "
            f"{2 ** (len(config.block_out_channels) - 1)}x) are not the model's ({base.latent_channels} channels, "
            f"{2 ** (len(base.block_out_channels) - 1)}x)")
    source = str(path)
    convert.check_state(state, vae_rules, checkpoint.abstract_params("vae", config), source=source,
                        ignored=VAE_IGNORED)
    return VAESource(path, config, path.name, state, vae_rules)

