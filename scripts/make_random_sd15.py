"""Builds a random-initialised SD1.5-architecture checkpoint in diffusers layout with torch diffusers.

Real weights can't be downloaded everywhere sdjax is developed; the architecture (and so the speed and memory)
is the same. Usage: python scripts/make_random_sd15.py OUT_DIR [--seed 0] [--controlnet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(out: Path, seed: int = 0) -> Path:
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sdjax.clip import CLIPConfig
    from sdjax.pipeline import SD15_SCHEDULER
    from sdjax.unet import UNetConfig
    from sdjax.vae import VAEConfig
    from tests import reference as ref

    if (out / "model_index.json").exists():
        return out
    sched = diffusers.PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(
        vae=ref.vae(VAEConfig.sd15().to_diffusers(), seed=seed + 1),
        text_encoder=ref.text_encoder(CLIPConfig.sd15().to_transformers(), seed=seed + 2),
        tokenizer=ref.tokenizer(),
        unet=ref.unet(UNetConfig.sd15().to_diffusers(), seed=seed + 3),
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def build_controlnet(out: Path, seed: int = 0) -> Path:
    """A random SD1.5 ControlNet (diffusers ControlNetModel, the shapes of lllyasviel's control_v11 models)."""
    from sdjax.controlnet import ControlNetConfig
    from tests import reference as ref
    from tests.test_controlnet import torch_controlnet

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    ref.save(torch_controlnet(ControlNetConfig.sd15(), seed=seed + 4), tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controlnet", action="store_true", help="build a random SD1.5 ControlNet at OUT instead")
    args = parser.parse_args()
    print(build_controlnet(args.out, args.seed) if args.controlnet else build(args.out, args.seed))
