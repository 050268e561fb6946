"""ControlNetModel: the UNet's encoder half steered by a control image (edges, depth, pose...), NHWC.

A ControlNet is a trainable copy of the UNet's conv_in, time embedding, down blocks and mid block, plus
  - `controlnet_cond_embedding`: a small conv stack taking the control image [B, H, W, 3] in [0, 1] down to the
    latent size, added to the conv_in output;
  - zero convolutions (1x1, zero-initialised in training): `controlnet_down_blocks_{i}`, one per skip connection
    of the UNet, and `controlnet_mid_block`.
Its outputs are residuals the UNet adds to its skip connections and its mid-block output (diffusers
`down_block_additional_residuals` / `mid_block_additional_residual`).

Reference: diffusers `models/controlnets/controlnet.py` (`ControlNetModel`, `ControlNetConditioningEmbedding`).
The UNet blocks are sdjax.unet's own, reused: a ControlNet's down/mid blocks are the UNet's, key for key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax import configs, convert, io
from sdjax.io import CheckpointError
from sdjax.layers import AttentionConfig, conv
from sdjax.unet import DOWN_BLOCKS, DownBlock, MidBlock, TimeEmbedding, UNetConfig, timestep_embedding

STEM = "diffusion_pytorch_model"  # diffusers' weights file stem, as for the UNet
CHANNEL_ORDERS = ("rgb", "bgr")

# Fields whose value must be exactly this for sdjax to build the architecture the checkpoint describes
# (the SD 1.x/2.x ControlNets; SDXL's `addition_embed_type: text_time` ones are another model).
_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
}
_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a diffusers ControlNetModel (the SD 1.x/2.x ones); the defaults are SD1.5's."""

    in_channels: int = 4
    conditioning_channels: int = 3
    # The control image's conv stack: conv_in to [0], then (conv, stride-2 conv) per step to the next entry,
    # so the image is 2**(len - 1) times the latent size (8x for SD, as the VAE).
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"  # diffusers `controlnet_conditioning_channel_order`; "bgr" flips the image's channels
    global_pool_conditions: bool = False  # residuals averaged over space (e.g. control_v11e_sd15_shuffle)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)  # see UNetConfig.heads (diffusers' misnamed `attention_head_dim`)
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    @classmethod
    def sd15(cls) -> ControlNetConfig:
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> ControlNetConfig:
        """Matches `UNetConfig.tiny()`; the control image is 8x the latent size, as with `VAEConfig.tiny()`."""
        base = cls.from_unet(UNetConfig.tiny(), conditioning_embedding_out_channels=(8, 8, 16, 16))
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **overrides) -> ControlNetConfig:
        """The ControlNet for `unet` (diffusers `ControlNetModel.from_unet`: the same encoder architecture)."""
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(cls) if hasattr(unet, f.name)}
        shared["in_channels"] = unet.out_channels  # the latents, also for a 9-channel inpainting UNet
        return cls(**{**shared, **overrides})

    def unet_config(self) -> UNetConfig:
        """The UNetConfig whose down and mid blocks this ControlNet copies (sdjax.unet's blocks read it)."""
        return UNetConfig(
            in_channels=self.in_channels, out_channels=self.in_channels, block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types, up_block_types=tuple(_UP[t] for t in self.down_block_types[::-1]),
            layers_per_block=self.layers_per_block, heads=self.heads, transformer_layers=self.transformer_layers,
            cross_attention_dim=self.cross_attention_dim, use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention, norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            downsample_padding=self.downsample_padding, mid_block_scale_factor=self.mid_block_scale_factor)

    @property
    def num_down_residuals(self) -> int:
        """One per UNet skip connection: conv_in, each resnet(+attention), each downsampler."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1)

    @property
    def image_scale(self) -> int:
        """Control image size / latent size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> ControlNetConfig:
        """A diffusers ControlNetModel config.json dict -> ControlNetConfig; raises ValueError naming the field
        (`configs.UnsupportedConfigError` / `configs.ConfigFieldError`, as `UNetConfig.from_diffusers`)."""
        c = "controlnet"
        d = configs.require_object(d, c)
        configs.check_fixed(d, _FIXED, c)
        configs.check_false_or_all_false(d, "only_cross_attention", c)
        chans = configs.channels(d, "block_out_channels", c)
        n = len(chans)
        # diffusers' ControlNetModel defaults down_block_types to SD's (3 cross-attention blocks, 1 plain)
        down = configs.block_types(d, "down_block_types", DOWN_BLOCKS, n, c, cls.down_block_types)
        head_field = "num_attention_heads" if d.get("num_attention_heads") else "attention_head_dim"
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in CHANNEL_ORDERS:
            raise configs.bad_field(c, "controlnet_conditioning_channel_order", order, "'rgb' or 'bgr'")
        emb_field = "conditioning_embedding_out_channels"
        emb = configs.channels(d, emb_field, c) if emb_field in d else cls.conditioning_embedding_out_channels
        cfg = cls(
            in_channels=configs.single_int(d, "in_channels", 4, c),
            conditioning_channels=configs.single_int(d, "conditioning_channels", 3, c),
            conditioning_embedding_out_channels=emb,
            channel_order=order,
            global_pool_conditions=configs.boolean(d, "global_pool_conditions", False, c),
            block_out_channels=chans,
            down_block_types=down,
            layers_per_block=configs.single_int(d, "layers_per_block", 2, c),
            heads=configs.per_block(d.get(head_field, 8), n, head_field, c),
            transformer_layers=configs.per_block(d.get("transformer_layers_per_block", 1), n,
                                                 "transformer_layers_per_block", c),
            # diffusers' ControlNetModel default is 1280 (not the UNet's 768): every real config sets it
            cross_attention_dim=configs.single_int(d, "cross_attention_dim", 1280, c),
            use_linear_projection=configs.boolean(d, "use_linear_projection", False, c),
            upcast_attention=configs.boolean(d, "upcast_attention", False, c),
            norm_num_groups=configs.single_int(d, "norm_num_groups", 32, c),
            norm_eps=configs.number(d, "norm_eps", 1e-5, c, positive=True),
            flip_sin_to_cos=configs.boolean(d, "flip_sin_to_cos", True, c),
            freq_shift=configs.number(d, "freq_shift", 0, c),
            downsample_padding=configs.single_int(d, "downsample_padding", 1, c, minimum=0),
            mid_block_scale_factor=configs.number(d, "mid_block_scale_factor", 1.0, c),
        )
        _check_shapes(cfg, head_field)
        return cfg

    def to_diffusers(self) -> dict[str, Any]:
        # The encoder's fields are the UNet's (`unet_config`); only the decoder-side ones are left out.
        shared = {k: v for k, v in self.unet_config().to_diffusers().items() if k not in _UNET_ONLY_FIELDS}
        return {
            **shared,
            "_class_name": "ControlNetModel",
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": self.channel_order,
            "global_pool_conditions": self.global_pool_conditions,
        }


_UNET_ONLY_FIELDS = ("out_channels", "up_block_types", "center_input_sample", "sample_size")


def _check_shapes(cfg: ControlNetConfig, head_field: str) -> None:
    """Norm groups and attention heads divide the channels they split (as `unet._check_shapes`)."""
    chans = cfg.block_out_channels
    configs.check_groups(cfg.norm_num_groups, chans, "controlnet")
    if chans[0] % 2:
        raise configs.ConfigFieldError(f"controlnet config field 'block_out_channels' must start with an even number "
                                       f"(the sinusoidal timestep embedding has that many dims), got {list(chans)}")
    for i, ch in enumerate(chans):
        attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D" or i == len(chans) - 1  # mid block: last
        if attention and ch % cfg.heads[i]:
            raise configs.ConfigFieldError(
                f"controlnet config field '{head_field}' gives block {i} {cfg.heads[i]} attention heads, which must "
                f"divide its block_out_channels[{i}] = {ch} (each head gets channels / heads)")


def check_compatible(controlnet: ControlNetConfig, unet: UNetConfig, *, source: str | os.PathLike = "controlnet"
                     ) -> None:
    """Raises CheckpointError naming the field (and `source`, e.g. the ControlNet's config.json) when the
    ControlNet's residuals or inputs do not fit `unet` (a ControlNet for another base model, e.g. SD 2.x's
    cross_attention_dim 1024 against SD1.5's 768)."""
    fields = [
        # field, ControlNet value, the UNet's, what it decides
        ("cross_attention_dim", controlnet.cross_attention_dim, unet.cross_attention_dim, "the text embedding width"),
        ("block_out_channels", controlnet.block_out_channels, unet.block_out_channels, "the residuals' channels"),
        ("layers_per_block", controlnet.layers_per_block, unet.layers_per_block, "the number of residuals"),
        # diffusers' inpaint ControlNet pipeline feeds the ControlNet the 4-channel latents, not the UNet's 9 inputs
        ("in_channels", controlnet.in_channels, unet.out_channels, "the latent channels"),
    ]
    for field, ours, theirs, what in fields:
        if ours != theirs:
            other = "the UNet's latent channels (out_channels)" if field == "in_channels" else f"the UNet's {field}"
            raise CheckpointError(
                f"{os.fspath(source)}: controlnet config field '{field}' = {_show(ours)} does not match "
                f"{other} = {_show(theirs)} ({what}): this ControlNet was made for another base model")


def _show(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class Residuals(NamedTuple):
    """What a ControlNet adds to the UNet (a pytree).

    `down[i]` is added to the UNet's i-th skip connection in the order the down path produces them (sdjax.unet's
    `skips` list: conv_in, then each down block's resnet outputs and downsampler), which is diffusers'
    `down_block_additional_residuals` order; the up path consumes them from the end. `mid` is added to the mid
    block's output. Both are scaled already.
    """

    down: tuple[jax.Array, ...]  # [B, h_i, w_i, C_i] each (or [B, 1, 1, C_i] with global_pool_conditions)
    mid: jax.Array  # [B, h/2**(n-1), w/2**(n-1), C_last]


def combine(residuals: Sequence[Residuals]) -> Residuals:
    """Several ControlNets at once: their residuals summed (diffusers `MultiControlNetModel`)."""
    first, *rest = residuals
    down, mid = list(first.down), first.mid
    for r in rest:
        down = [a + b for a, b in zip(down, r.down)]
        mid = mid + r.mid
    return Residuals(tuple(down), mid)


class ConditioningEmbedding(nn.Module):
    """diffusers `ControlNetConditioningEmbedding`: control image [B, H, W, 3] -> [B, H/2**k, W/2**k, features]."""

    features: int
    channels: tuple[int, ...]
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()  # the kernels (convolutions)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, k = self.dtype, self.attention
        h = nn.silu(conv(self.channels[0], 3, "conv_in", d, config=k)(x))  # [B, H, W, c0]
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            h = nn.silu(conv(c_in, 3, f"blocks_{2 * i}", d, config=k)(h))
            h = nn.silu(conv(c_out, 3, f"blocks_{2 * i + 1}", d, stride=2, config=k)(h))  # halves H, W (pad 1)
        return conv(self.features, 3, "conv_out", d, config=k)(h)  # no activation after the zero-initialised conv_out


class ControlNet(nn.Module):
    """Residuals for the UNet from latents x: [B, h, w, 4], timesteps t: [B] or [], context [B, L, Dctx] and the
    control image cond: [B, 8h, 8w, 3] in [0, 1] (RGB, as the reference pipeline's `prepare_image`)."""

    config: ControlNetConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, cond: jax.Array,
                 conditioning_scale: jax.Array | float = 1.0, guess_mode: jax.Array | bool = False) -> Residuals:
        """`conditioning_scale` and `guess_mode` may be traced (changing them does not recompile)."""
        cfg, d = self.config, self.dtype
        ucfg = cfg.unet_config()
        b = x.shape[0]
        x, context, cond = x.astype(d), context.astype(d), cond.astype(d)
        if cfg.channel_order == "bgr":
            cond = cond[..., ::-1]  # diffusers: torch.flip(controlnet_cond, dims=[1])
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        c0 = cfg.block_out_channels[0]
        t_emb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(d)  # [B, C0]
        temb = TimeEmbedding(4 * c0, dtype=d, name="time_embedding")(t_emb)  # [B, 4*C0]

        h = conv(c0, 3, "conv_in", d, config=self.attention)(x)  # [B, h, w, C0]
        emb = ConditioningEmbedding(c0, cfg.conditioning_embedding_out_channels, d, self.attention,
                                    name="controlnet_cond_embedding")(cond)  # [B, h, w, C0]
        if emb.shape != h.shape:
            raise ValueError(
                f"the control image ({cond.shape[1]}x{cond.shape[2]}, batch {cond.shape[0]}) embeds to "
                f"{emb.shape[1]}x{emb.shape[2]}, batch {emb.shape[0]}, but the latents are {h.shape[1]}x{h.shape[2]}, "
                f"batch {h.shape[0]}: the control image must be {cfg.image_scale}x the latent size, one per latent")
        h = h + emb
        skips = [h]
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            h, block_skips = DownBlock(
                ch, cfg.layers_per_block, cfg.down_block_types[i] == "CrossAttnDownBlock2D", i < n - 1,
                cfg.heads[i], cfg.transformer_layers[i], ucfg, d, self.attention, name=f"down_blocks_{i}")(
                h, temb, context)
            skips += block_skips
        h = MidBlock(cfg.block_out_channels[-1], cfg.heads[-1], cfg.transformer_layers[-1], ucfg, d, self.attention,
                     name="mid_block")(h, temb, context)  # [B, h/2**(n-1), w/2**(n-1), C_last]

        # The zero convolutions: one 1x1 conv per skip connection and one for the mid block.
        down = [conv(s.shape[-1], 1, f"controlnet_down_blocks_{i}", d, config=self.attention)(s)
                for i, s in enumerate(skips)]
        mid = conv(h.shape[-1], 1, "controlnet_mid_block", d, config=self.attention)(h)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scales = jnp.broadcast_to(scale, (len(down) + 1,))  # [len(down) + 1]
        if not cfg.global_pool_conditions:
            # Guess mode, diffusers: scales = torch.logspace(-1, 0, len(down) + 1) * conditioning_scale, 0.1 for the
            # first skip up to 1.0 for the mid block (not for globally pooled ControlNets).
            logspace = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32)
            scales = jnp.where(jnp.asarray(guess_mode), logspace * scale, scales)
        down = [(r * scales[i]).astype(d) for i, r in enumerate(down)]
        mid = (mid * scales[-1]).astype(d)
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]  # [B, 1, 1, C_i]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return Residuals(tuple(down), mid)


# ---- checkpoints -------------------------------------------------------------------------------------------------

_SHARED = ("conv_in", "time_embedding", "down_blocks", "mid_block")  # the UNet's keys a ControlNet has too


def controlnet_rules(cfg: ControlNetConfig) -> list[convert.Rule]:
    """diffusers ControlNetModel keys <-> the ControlNet params pytree (see sdjax.convert)."""
    # The UNet's own rules for what the ControlNet copies (its up path and output head dropped).
    ucfg = cfg.unet_config()
    rules = [r for r in convert.unet_rules(ucfg) if r.key.split(".")[0] in _SHARED]
    e, emb, c0 = "controlnet_cond_embedding", cfg.conditioning_embedding_out_channels, ucfg.block_out_channels[0]
    rules += convert.conv(f"{e}.conv_in", cfg.conditioning_channels, emb[0])
    for i, (c_in, c_out) in enumerate(zip(emb[:-1], emb[1:])):
        rules += convert.conv(f"{e}.blocks.{2 * i}", c_in, c_in) + convert.conv(f"{e}.blocks.{2 * i + 1}", c_in, c_out)
    rules += convert.conv(f"{e}.conv_out", emb[-1], c0)
    for i, ch in enumerate(_skip_channels(ucfg)):
        rules += convert.conv(f"controlnet_down_blocks.{i}", ch, ch, 1)
    return rules + convert.conv("controlnet_mid_block", ucfg.block_out_channels[-1], ucfg.block_out_channels[-1], 1)


def _skip_channels(cfg: UNetConfig) -> list[int]:
    """The channels of the UNet's skip connections, in the order the down path makes them."""
    chans = cfg.block_out_channels
    out = [chans[0]]
    for i, ch in enumerate(chans):
        out += [ch] * (cfg.layers_per_block + (i < len(chans) - 1))
    return out


def _dummy(cfg: ControlNetConfig) -> tuple[jax.Array, ...]:
    """The smallest inputs that trace the module (latents 8x8, as checkpoint.KINDS' UNet dummy)."""
    s = 8 * cfg.image_scale
    return (jnp.zeros((1, 8, 8, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.cross_attention_dim)),
            jnp.zeros((1, s, s, cfg.conditioning_channels)))


def abstract_params(cfg: ControlNetConfig) -> Any:
    """The params pytree's shapes (`convert.abstract` of the rule table: no tracing, no memory)."""
    return convert.abstract(controlnet_rules(cfg))


def read_config(folder: str | os.PathLike) -> ControlNetConfig:
    """A ControlNet folder's config.json -> ControlNetConfig, no weights read; errors as `checkpoint.read_config`
    (FileNotFoundError when missing, CheckpointError naming the file and field)."""
    path = Path(folder) / "config.json"
    try:
        return ControlNetConfig.from_diffusers(io.read_json(path))
    except ValueError as err:
        message = str(err)
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from err
    except (TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a valid controlnet config ({type(err).__name__}: {err})") from err


def _weights(path: Path, variant: str | None) -> tuple[Path, list[Path]]:
    """(folder holding config.json, weight files) for a ControlNet folder or one of its safetensors files."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: a ControlNet loads from a diffusers folder (config.json + "
                                  f"{STEM}.safetensors) or a .safetensors file in one; sdjax never unpickles files")
        return path.parent, [path]
    return path, io.find_weights(path, STEM, variant=variant)


def load(path: str | os.PathLike, *, dtype: Any = "float32", variant: str | None = None,
         unet: UNetConfig | None = None) -> tuple[ControlNetConfig, Any]:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model[.fp16].safetensors, or the path
    of one of its safetensors files) -> (config, params), params as jnp arrays of `dtype`.

    Checked as `checkpoint.load` (config fields, then every key's presence, dtype and shape against `eval_shape`
    before any tensor is read, then finiteness), plus `check_compatible` against `unet` when given."""
    dtype = convert.parse_dtype(dtype)
    folder, files = _weights(Path(path), variant)
    config = read_config(folder)
    if unet is not None:
        check_compatible(config, unet, source=folder / "config.json")
    state: Mapping[str, np.ndarray] = io.LazyTensors(files)  # one tensor in host memory at a time
    source = ", ".join(str(f) for f in files)

    params = convert.to_params(state, controlnet_rules(config), abstract_params(config), source=source,
                               dtype=dtype, finalize=jax.device_put)
    return config, params


def save(folder: str | os.PathLike, config: ControlNetConfig, params: Any, *, dtype: Any = None) -> Path:
    """(config, params) -> `folder/config.json` + safetensors that diffusers' `ControlNetModel` loads as is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = convert.from_params(jax.device_get(params), controlnet_rules(config))
    if dtype is not None:
        np_dtype = np.dtype(convert.parse_dtype(dtype))
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    io.write_safetensors(tensors, folder / f"{STEM}.safetensors", metadata={"format": "pt"})
    io.write_json(config.to_diffusers(), folder / "config.json")
    return folder


@dataclasses.dataclass(frozen=True)
class ControlNetModel:
    """A loaded ControlNet: what `sdjax.Control(cn, images, ...)` will take. `params` are device arrays."""

    config: ControlNetConfig
    params: Any
    dtype: Any = jnp.float32
    source: str = ""  # where the weights were read (a folder or file)
    name: str = ""  # what the user named (hub id or path), for the results' settings and PNG parameters

    @property
    def module(self) -> ControlNet:
        return ControlNet(self.config, self.dtype)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, cond: jax.Array,
                 conditioning_scale: jax.Array | float = 1.0, guess_mode: jax.Array | bool = False) -> Residuals:
        """Eager convenience: the residuals (see `ControlNet`); jitted loops call `module.apply` on `params`."""
        out = self.module.apply({"params": self.params}, x, t, context, cond, conditioning_scale, guess_mode)
        return cast(Residuals, out)


def _hub_patterns(variant: str | None) -> list[str]:
    stem = STEM if variant is None else f"{STEM}.{variant}"
    return ["config.json", f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}-*-of-*.safetensors"]


def load_controlnet(path_or_hub_id: str | os.PathLike, *, dtype: Any = "float32", variant: str | None = None,
                    unet: UNetConfig | None = None) -> ControlNetModel:
    """A ControlNet from a local diffusers folder (or a safetensors file in one) or a hub id such as
    `lllyasviel/control_v11p_sd15_canny` (its config.json and safetensors only; never pickled .bin files)."""
    path = Path(path_or_hub_id).expanduser()
    if not path.exists():
        text = os.fspath(path_or_hub_id)
        if not io.looks_like_hub_id(text):
            raise io.ModelNotFoundError(f"ControlNet {text!r} is neither a local folder or file nor a hub id like "
                                        "'owner/name' (e.g. 'lllyasviel/control_v11p_sd15_canny').")
        path = io._snapshot(text, _hub_patterns(variant))
        if variant is not None and not any(path.glob(f"{STEM}.{variant}*.safetensors")):
            path = io._snapshot(text, _hub_patterns(None))  # no such variant: the default weights
    config, params = load(path, dtype=dtype, variant=variant, unet=unet)
    name = os.fspath(path_or_hub_id)
    if Path(name).expanduser().exists():  # a local folder or file: its name, as A1111 shows models
        local = Path(name).expanduser().resolve()
        name = local.parent.name if local.is_file() else local.name
    return ControlNetModel(config, params, convert.parse_dtype(dtype), str(path), name)
