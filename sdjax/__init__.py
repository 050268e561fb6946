"""sdjax: Stable Diffusion v1.5 in JAX/Flax, data-parallel over every device, matching the PyTorch reference.

    import sdjax
    pipe = sdjax.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # or a local diffusers folder
    result = pipe.txt2img(["a photo of an astronaut riding a horse on mars"], seeds=[0])
    result.images[0].save("astronaut.png")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `import sdjax` stays cheap, so the `sdjax` command installs
# its Ctrl-C handling before jax is imported (`sdjax.__main__`).
_EXPORTS = {
    "compile_check": ("sdjax.aot", "compile_check"),
    "load_component": ("sdjax.checkpoint", "load"),
    "save_component": ("sdjax.checkpoint", "save"),
    "CLIPConfig": ("sdjax.clip", "CLIPConfig"),
    "Control": ("sdjax.controls", "Control"),
    "ControlNet": ("sdjax.controlnet", "ControlNet"),
    "ControlNetConfig": ("sdjax.controlnet", "ControlNetConfig"),
    "load_controlnet": ("sdjax.controlnet", "load_controlnet"),
    "TextEncoder": ("sdjax.clip", "TextEncoder"),
    "resolve_model": ("sdjax.io", "resolve_model"),
    "Generation": ("sdjax.pipeline", "Generation"),
    "Pipeline": ("sdjax.pipeline", "Pipeline"),
    "load_pipeline": ("sdjax.pipeline", "load_pipeline"),
    "enable_compilation_cache": ("sdjax.process", "enable_compilation_cache"),
    "SCHEDULER_NAMES": ("sdjax.schedulers", "SCHEDULER_NAMES"),
    "ClipTokenizer": ("sdjax.tokenizer", "ClipTokenizer"),
    "load_tokenizer": ("sdjax.tokenizer", "load_tokenizer"),
    "UNet": ("sdjax.unet", "UNet"),
    "UNetConfig": ("sdjax.unet", "UNetConfig"),
    "VAE": ("sdjax.vae", "VAE"),
    "VAEConfig": ("sdjax.vae", "VAEConfig"),
}

__all__ = [
    "CLIPConfig", "ClipTokenizer", "Control", "ControlNet", "ControlNetConfig", "Generation", "Pipeline", "SCHEDULER_NAMES",
    "TextEncoder", "UNet", "UNetConfig", "VAE", "VAEConfig", "compile_check", "enable_compilation_cache",
    "load_component", "load_controlnet", "load_pipeline", "load_tokenizer", "resolve_model", "save_component",
]

if TYPE_CHECKING:
    from sdjax.aot import compile_check
    from sdjax.checkpoint import load as load_component
    from sdjax.checkpoint import save as save_component
    from sdjax.clip import CLIPConfig, TextEncoder
    from sdjax.controlnet import ControlNet, ControlNetConfig, load_controlnet
    from sdjax.controls import Control
    from sdjax.io import resolve_model
    from sdjax.pipeline import Generation, Pipeline, load_pipeline
    from sdjax.process import enable_compilation_cache
    from sdjax.schedulers import SCHEDULER_NAMES
    from sdjax.tokenizer import ClipTokenizer, load_tokenizer
    from sdjax.unet import UNet, UNetConfig
    from sdjax.vae import VAE, VAEConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
