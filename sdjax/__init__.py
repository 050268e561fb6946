"""sdjax: Stable Diffusion v1.5 in JAX/Flax, data-parallel over every device, matching the PyTorch reference.

    import sdjax
    pipe = sdjax.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # or a local diffusers folder
    result = pipe.txt2img(["a photo of an astronaut riding a horse on mars"], seeds=[0])
    result.images[0].save("astronaut.png")
"""

from sdjax.aot import compile_check
from sdjax.checkpoint import load as load_component
from sdjax.checkpoint import save as save_component
from sdjax.clip import CLIPConfig, TextEncoder
from sdjax.io import resolve_model
from sdjax.pipeline import Generation, Pipeline, load_pipeline
from sdjax.process import enable_compilation_cache
from sdjax.schedulers import SCHEDULER_NAMES
from sdjax.tokenizer import ClipTokenizer, load_tokenizer
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig

__version__ = "0.1.0"

__all__ = [
    "CLIPConfig", "ClipTokenizer", "Generation", "Pipeline", "SCHEDULER_NAMES", "TextEncoder", "UNet", "UNetConfig",
    "VAE", "VAEConfig", "compile_check", "enable_compilation_cache", "load_component", "load_pipeline", "load_tokenizer",
    "resolve_model", "save_component",
]
