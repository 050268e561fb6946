"""The PyTorch reference side of the tests: random-initialised diffusers/transformers models saved in diffusers layout,
SD1.5's scheduler config and the diffusers scheduler each sdjax sampler is held to; and helpers shared by test modules.

Default initialisation hides mapping mistakes (zero-initialised output projections, unit norms, tiny
weights), so every parameter is drawn afresh: norm gains near 1, biases small, weights ~ N(0, 1/fan_in).

The reference data here is written out, not taken from sdjax: it is what sdjax is checked against.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from sdjax.lora import LoRA

torch.set_grad_enabled(False)

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a watercolor painting of a fox in the snow"]

# SD1.5's scheduler config, written out here rather than taken from sdjax.pipeline.SD15_SCHEDULER.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# sdjax sampler name -> (diffusers scheduler class name, extra from_config arguments): the reference for each sampler.
TORCH_SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def torch_scheduler(name: str, **overrides):
    """diffusers' scheduler for sdjax sampler `name`, always built from SD1.5's scheduler config (plus overrides).

    Never from a previous scheduler's config: that carries its options along (e.g. use_karras_sigmas from DPM++
    would silently turn Euler into Euler-Karras)."""
    import diffusers

    cls, kwargs = TORCH_SCHEDULERS[name]
    return getattr(diffusers, cls).from_config({**SD15_SCHEDULER_CONFIG, **overrides}, **kwargs)


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
    """The SD1.5 CLIP tokenizer as a transformers object, built from the vocabulary sdjax ships (what
    `sdjax.tokenizer.ClipTokenizer.sd15()` matches, tests/test_tokenizer.py)."""
    from transformers import CLIPTokenizer

    from sdjax.tokenizer import CLIP_EOS, CLIP_MAX_LENGTH, clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    # transformers annotates merges as list[str]; its tokenizers BPE takes the (a, b) pairs passed here
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=CLIP_EOS, model_max_length=CLIP_MAX_LENGTH)


def tiny_pipeline(seed: int = 0, scheduler: str = "PNDMScheduler", unet_config=None):
    """A random tiny diffusers StableDiffusionPipeline (fp32, CPU) on the real SD1.5 tokenizer/scheduler."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sdjax.clip import CLIPConfig
    from sdjax.unet import UNetConfig
    from sdjax.vae import VAEConfig

    sched = getattr(diffusers, scheduler).from_config(SD15_SCHEDULER_CONFIG)
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


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block."""
    import jax

    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def randomized(lora: LoRA, seed: int, std: float = 0.5) -> LoRA:
    """The same LoRA with a random `up` too, so that it changes the model."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    weights = {p: {"down": w["down"], "up": jnp.asarray(std * rng.standard_normal(w["up"].shape, np.float32))}
               for p, w in lora.weights.items()}
    return lora.replace(weights=weights)
