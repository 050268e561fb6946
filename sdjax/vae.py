"""AutoencoderKL: images [B, H, W, 3] in [-1, 1] <-> latents [B, H/8, W/8, 4], NHWC."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax import configs
from sdjax.layers import AttentionConfig, Downsample, ResnetBlock, Upsample, attention, conv, group_norm

_FIXED = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> VAEConfig:
        base = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)
        return cls(**{**base, **overrides})

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
        """A diffusers AutoencoderKL config.json dict -> VAEConfig; raises ValueError naming the field and what is
        allowed (see `UNetConfig.from_diffusers`)."""
        d = configs.require_object(d, "vae")
        configs.check_fixed(d, _FIXED, "vae")
        chans = configs.channels(d, "block_out_channels", "vae")
        n = len(chans)
        configs.block_types(d, "down_block_types", ("DownEncoderBlock2D",), n, "vae", ("DownEncoderBlock2D",) * n)
        configs.block_types(d, "up_block_types", ("UpDecoderBlock2D",), n, "vae", ("UpDecoderBlock2D",) * n)
        groups = configs.single_int(d, "norm_num_groups", 32, "vae")
        configs.check_groups(groups, chans, "vae")
        return cls(
            in_channels=configs.single_int(d, "in_channels", 3, "vae"),
            out_channels=configs.single_int(d, "out_channels", 3, "vae"),
            block_out_channels=chans,
            layers_per_block=configs.single_int(d, "layers_per_block", 2, "vae"),
            latent_channels=configs.single_int(d, "latent_channels", 4, "vae"),
            norm_num_groups=groups,
            scaling_factor=configs.number(d, "scaling_factor", 0.18215, "vae", positive=True),
            shift_factor=configs.optional_number(d, "shift_factor", "vae"),
            use_quant_conv=configs.boolean(d, "use_quant_conv", True, "vae"),
            use_post_quant_conv=configs.boolean(d, "use_post_quant_conv", True, "vae"),
            mid_block_add_attention=configs.boolean(d, "mid_block_add_attention", True, "vae"),
            sample_size=configs.single_int(d, "sample_size", 512, "vae") if d.get("sample_size") is not None else 512,
        )

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all H*W positions, residual."""

    groups: int
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, 1e-6, "group_norm", self.dtype)(x).reshape(b, h * w, c)  # [B, HW, C]

        def proj(name):
            return nn.Dense(c, dtype=self.dtype, name=name)(y).reshape(b, h * w, 1, c)  # [B, HW, 1, C]

        y = attention(proj("to_q"), proj("to_k"), proj("to_v"), config=self.attention, layer="/".join(self.path))
        y = y.reshape(b, h * w, c)
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y)
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    channels: int
    groups: int
    with_attention: bool
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, attention=self.attention,
                        name="resnets_0")(h)
        if self.with_attention:
            h = SpatialSelfAttention(self.groups, self.dtype, self.attention, name="attentions_0")(h)
        return ResnetBlock(self.channels, self.groups, 1e-6, dtype=self.dtype, attention=self.attention,
                           name="resnets_1")(h)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then a down- or upsampler (or neither)."""

    channels: int
    layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()  # the kernels (convolutions)

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d, k = self.dtype, self.attention
        for j in range(self.layers):
            h = ResnetBlock(self.channels, self.groups, 1e-6, dtype=d, attention=k, name=f"resnets_{j}")(h)
        if self.resample == "down":
            h = Downsample(self.channels, padding=0, dtype=d, attention=k, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample(self.channels, dtype=d, attention=k, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d = self.config, self.dtype
        n = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[0], 3, "conv_in", d, config=self.attention)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            h = ResnetStack(ch, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < n - 1 else None,
                            dtype=d, attention=self.attention, name=f"down_blocks_{i}")(h)
        h = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, d,
                     self.attention, name="mid_block")(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", d)(h))
        return conv(2 * cfg.latent_channels, 3, "conv_out", d, config=self.attention)(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, d = self.config, self.dtype
        n = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[-1], 3, "conv_in", d, config=self.attention)(z)
        h = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, d,
                     self.attention, name="mid_block")(h)
        for i, ch in enumerate(cfg.block_out_channels[::-1]):
            h = ResnetStack(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < n - 1 else None,
                            dtype=d, attention=self.attention, name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", d)(h))
        return conv(cfg.out_channels, 3, "conv_out", d, config=self.attention)(h)


class VAE(nn.Module):
    """`encode(x) -> (mean, logvar)` of the diagonal Gaussian posterior; `decode(z) -> x`.

    x: [B, H, W, 3] in [-1, 1] (NHWC); mean, logvar, z: [B, H/8, W/8, latent_channels] (4 for SD), float of
    the module's dtype; decode returns [B, H, W, 3], about [-1, 1] (pipelines clip to it).

    Latents here are the autoencoder's own; pipelines multiply by `config.scaling_factor` (after subtracting
    `shift_factor`, if any) to get the diffusion model's latents, and undo it before `decode`.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    def setup(self):
        cfg, d = self.config, self.dtype
        self.encoder = Encoder(cfg, d, self.attention)
        self.decoder = Decoder(cfg, d, self.attention)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, "quant_conv", d, config=self.attention)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, "post_quant_conv", d, config=self.attention)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(x.astype(self.dtype))  # [B, h, w, 2L]
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)
