"""UNet2DConditionModel: the SD 1.x/2.x denoiser (including the 9-channel inpainting variant), NHWC."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax import configs
from sdjax.layers import AttentionConfig, Downsample, ResnetBlock, SpatialTransformer, Upsample, conv, group_norm

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Fields whose value must be exactly this for sdjax to build the architecture the checkpoint describes.
_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a diffusers UNet2DConditionModel (the subset SD 1.x/2.x use)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # diffusers' `attention_head_dim` is really the number of heads per block for SD configs (a known
    # misnomer it keeps for compatibility); `num_attention_heads` overrides it when set.
    heads: tuple[int, ...] = (8, 8, 8, 8)
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
    center_input_sample: bool = False
    sample_size: int = 64

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        return cls(in_channels=9)

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        base = dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            heads=(2, 2, 2),
            transformer_layers=(1, 1, 1),
            cross_attention_dim=32,
            norm_num_groups=8,
            sample_size=16,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> UNetConfig:
        """A diffusers UNet2DConditionModel config.json dict -> UNetConfig; raises ValueError naming the field
        (`configs.UnsupportedConfigError` for what sdjax does not build, `configs.ConfigFieldError` for a wrong
        type or value out of range) and what is allowed."""
        d = configs.require_object(d, "unet")
        configs.check_fixed(d, _FIXED, "unet")
        configs.check_false_or_all_false(d, "only_cross_attention", "unet")
        chans = configs.channels(d, "block_out_channels", "unet")
        n = len(chans)
        down = configs.block_types(d, "down_block_types", DOWN_BLOCKS, n, "unet")
        up = configs.block_types(d, "up_block_types", UP_BLOCKS, n, "unet")
        # diffusers: `num_attention_heads` when set, else the (misnamed) `attention_head_dim`
        head_field = "num_attention_heads" if d.get("num_attention_heads") else "attention_head_dim"
        cfg = cls(
            in_channels=configs.single_int(d, "in_channels", 4, "unet"),
            out_channels=configs.single_int(d, "out_channels", 4, "unet"),
            block_out_channels=chans,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=configs.single_int(d, "layers_per_block", 2, "unet"),
            heads=configs.per_block(d.get(head_field, 8), n, head_field, "unet"),
            transformer_layers=configs.per_block(d.get("transformer_layers_per_block", 1), n,
                                                 "transformer_layers_per_block", "unet"),
            cross_attention_dim=configs.single_int(d, "cross_attention_dim", 768, "unet"),
            use_linear_projection=configs.boolean(d, "use_linear_projection", False, "unet"),
            upcast_attention=configs.boolean(d, "upcast_attention", False, "unet"),
            norm_num_groups=configs.single_int(d, "norm_num_groups", 32, "unet"),
            norm_eps=configs.number(d, "norm_eps", 1e-5, "unet", positive=True),
            flip_sin_to_cos=configs.boolean(d, "flip_sin_to_cos", True, "unet"),
            freq_shift=configs.number(d, "freq_shift", 0, "unet"),
            downsample_padding=configs.single_int(d, "downsample_padding", 1, "unet", minimum=0),
            mid_block_scale_factor=configs.number(d, "mid_block_scale_factor", 1.0, "unet"),
            center_input_sample=configs.boolean(d, "center_input_sample", False, "unet"),
            sample_size=configs.single_int(d, "sample_size", 64, "unet") if d.get("sample_size") is not None else 64,
        )
        _check_shapes(cfg, head_field)
        return cfg

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.heads),
            "transformer_layers_per_block": list(self.transformer_layers),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "center_input_sample": self.center_input_sample,
            "sample_size": self.sample_size,
            "act_fn": "silu",
        }


def _check_shapes(cfg: UNetConfig, head_field: str) -> None:
    """Fields that must fit each other: norm groups and attention heads divide the channels they split."""
    chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
    configs.check_groups(cfg.norm_num_groups, chans, "unet")
    if chans[0] % 2:
        raise configs.ConfigFieldError(f"unet config field 'block_out_channels' must start with an even number (the "
                                       f"sinusoidal timestep embedding has that many dims), got {list(chans)}")
    for i, ch in enumerate(chans):
        attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D" or cfg.up_block_types[n - 1 - i] == \
            "CrossAttnUpBlock2D" or i == n - 1  # the mid block attends at the last block's channels
        if attention and ch % cfg.heads[i]:
            raise configs.ConfigFieldError(
                f"unet config field '{head_field}' gives block {i} {cfg.heads[i]} attention heads, which must "
                f"divide its block_out_channels[{i}] = {ch} (each head gets channels / heads)")


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps t: [B] -> [B, dim], float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))  # [half]
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: (resnet [+ transformer]) x layers, then an optional downsampler.

    Returns the output and the skip activations it hands to the up path.
    """

    channels: int
    layers: int
    with_attention: bool
    with_downsample: bool
    heads: int
    transformer_layers: int
    config: UNetConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.config
        skips = []
        for j in range(self.layers):
            h = ResnetBlock(self.channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                            attention=self.attention, name=f"resnets_{j}")(h, temb)
            if self.with_attention:
                h = _transformer(cfg, self.channels, self.heads, self.transformer_layers, self.dtype, self.attention,
                                 f"attentions_{j}")(h, context)
            skips.append(h)
        if self.with_downsample:
            h = Downsample(self.channels, cfg.downsample_padding, self.dtype, self.attention,
                           name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet)."""

    channels: int
    heads: int
    transformer_layers: int
    config: UNetConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.config

        def resnet(j):
            return ResnetBlock(self.channels, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                               dtype=self.dtype, attention=self.attention, name=f"resnets_{j}")

        h = resnet(0)(h, temb)
        h = _transformer(cfg, self.channels, self.heads, self.transformer_layers, self.dtype, self.attention,
                         "attentions_0")(h, context)
        return resnet(1)(h, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: (concat skip, resnet [+ transformer]) x layers, optional upsampler."""

    channels: int
    layers: int
    with_attention: bool
    with_upsample: bool
    heads: int
    transformer_layers: int
    config: UNetConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, h, skips, temb, context, upsample_size=None):
        cfg = self.config
        for j in range(self.layers):
            h = jnp.concatenate([h, skips[-1 - j]], axis=-1)  # [B, H, W, C + Cskip]
            h = ResnetBlock(self.channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                            attention=self.attention, name=f"resnets_{j}")(h, temb)
            if self.with_attention:
                h = _transformer(cfg, self.channels, self.heads, self.transformer_layers, self.dtype, self.attention,
                                 f"attentions_{j}")(h, context)
        if self.with_upsample:
            h = Upsample(self.channels, self.dtype, self.attention, name="upsamplers_0")(h, upsample_size)
        return h


def _transformer(cfg: UNetConfig, channels: int, heads: int, layers: int, dtype, attention: AttentionConfig,
                 name: str):
    # `upcast_attention` needs nothing here: layers.attention always computes scores in float32.
    return SpatialTransformer(heads, channels // heads, layers, cfg.norm_num_groups, cfg.use_linear_projection,
                              dtype=dtype, attention=attention, name=name)


class TimeEmbedding(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t_emb))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h)


class UNet(nn.Module):
    """Predicts noise (or v) for latents x: [B, H, W, Cin] at timesteps t: [B] or [] given context [B, L, Dctx]."""

    config: UNetConfig
    dtype: Any = jnp.float32
    # Kernel choices for the target devices (not architecture): set by the pipeline / train step for its mesh.
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, residuals: Any = None) -> jax.Array:
        """residuals: a ControlNet's output (`controlnet.Residuals`: `.down`, one per skip connection in the
        order the down path makes them, and `.mid`), added to the skips and to the mid block's output as
        diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`; None adds nothing."""
        cfg, d = self.config, self.dtype
        b = x.shape[0]
        x = x.astype(d)
        context = context.astype(d)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        c0 = cfg.block_out_channels[0]
        t_emb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(d)  # [B, C0]
        temb = TimeEmbedding(4 * c0, dtype=d, name="time_embedding")(t_emb)  # [B, 4*C0]

        h = conv(c0, 3, "conv_in", d, config=self.attention)(x)
        skips = [h]
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            h, block_skips = DownBlock(
                ch, cfg.layers_per_block, cfg.down_block_types[i] == "CrossAttnDownBlock2D", i < n - 1,
                cfg.heads[i], cfg.transformer_layers[i], cfg, d, self.attention, name=f"down_blocks_{i}")(
                h, temb, context)
            skips += block_skips

        if residuals is not None:
            if len(residuals.down) != len(skips):
                raise ValueError(f"residuals.down has {len(residuals.down)} entries; this UNet has {len(skips)} skip "
                                 "connections (a ControlNet for another architecture)")
            skips = [s + r.astype(d) for s, r in zip(skips, residuals.down)]

        h = MidBlock(cfg.block_out_channels[-1], cfg.heads[-1], cfg.transformer_layers[-1], cfg, d, self.attention,
                     name="mid_block")(h, temb, context)
        if residuals is not None:
            h = h + residuals.mid.astype(d)

        up_channels = cfg.block_out_channels[::-1]
        for i, ch in enumerate(up_channels):
            block = n - 1 - i  # the down block this up block mirrors (for per-block heads/layers)
            taken = cfg.layers_per_block + 1
            block_skips, skips = skips[-taken:], skips[:-taken]
            # Latents whose size is not a multiple of 2**(n-1) upsample to the next skip's exact size.
            size = skips[-1].shape[1:3] if i < n - 1 else None
            h = UpBlock(ch, taken, cfg.up_block_types[i] == "CrossAttnUpBlock2D", i < n - 1,
                        cfg.heads[block], cfg.transformer_layers[block], cfg, d, self.attention,
                        name=f"up_blocks_{i}")(h, block_skips, temb, context, size)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", d)(h))
        return conv(cfg.out_channels, 3, "conv_out", d, config=self.attention)(h)
