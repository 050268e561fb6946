"""The PyTorch reference side of the tests: random-initialised diffusers/transformers models saved in diffusers layout.

Default initialisation hides mapping mistakes (zero-initialised output projections, unit norms, tiny
weights), so every parameter is drawn afresh: norm gains near 1, biases small, weights ~ N(0, 1/fan_in).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

torch.set_grad_enabled(False)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_params = set()
    for module in model.modules():
        if isinstance(module, norm_types):
            if module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                norm_params.add(id(module.weight))
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                norm_params.add(id(module.bias))
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            continue
        if "embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel.from_config(config), seed)


def vae(config: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL.from_config(config), seed)


def text_encoder(config: dict, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize_(CLIPTextModel(CLIPTextConfig(**config)), seed)


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.detach().float().numpy(), (0, 2, 3, 1))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tokenizer():
    """The SD1.5 CLIP tokenizer as a transformers object (built from the vocabulary sdjax ships)."""
    from sdjax.tokenizer import ClipTokenizer

    return ClipTokenizer.sd15().hf


def tiny_pipeline(seed: int = 0, scheduler: str = "PNDMScheduler", unet_config=None):
    """A random tiny diffusers StableDiffusionPipeline (fp32, CPU) on the real SD1.5 tokenizer/scheduler."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sdjax.clip import CLIPConfig
    from sdjax.pipeline import SD15_SCHEDULER
    from sdjax.unet import UNetConfig
    from sdjax.vae import VAEConfig

    sched_cfg = {k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"}
    sched = getattr(diffusers, scheduler).from_config(sched_cfg)
    pipe = StableDiffusionPipeline(
        vae=vae(VAEConfig.tiny().to_diffusers(), seed=seed + 1),
        text_encoder=text_encoder(CLIPConfig.tiny().to_transformers(), seed=seed + 2),
        tokenizer=tokenizer(),
        unet=unet((unet_config or UNetConfig.tiny()).to_diffusers(), seed=seed + 3),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
