"""Diffusers-format component folders (`unet/`, `vae/`, `text_encoder/`) <-> (config, module, params)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import convert, io
from sdjax.clip import CLIPConfig, TextEncoder
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig


@dataclasses.dataclass(frozen=True)
class Kind:
    stem: str  # weights file stem: diffusers `diffusion_pytorch_model`, transformers `model`
    parse: Callable[[dict], Any]
    dump: Callable[[Any], dict]
    module: type
    rules: Callable[[Any], list[convert.Rule]]
    dummy: Callable[[Any], tuple]  # smallest inputs that trace the module, for eval_shape
    prefixes: tuple[str, ...] = ()
    ignored: tuple = ()


KINDS = {
    "unet": Kind("diffusion_pytorch_model", UNetConfig.from_diffusers, UNetConfig.to_diffusers, UNet,
                 convert.unet_rules,
                 lambda c: (jnp.zeros((1, 8, 8, c.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, c.cross_attention_dim)))),
    "vae": Kind("diffusion_pytorch_model", VAEConfig.from_diffusers, VAEConfig.to_diffusers, VAE,
                convert.vae_rules, lambda c: (jnp.zeros((1, 8, 8, c.in_channels)),)),
    "text_encoder": Kind("model", CLIPConfig.from_transformers, CLIPConfig.to_transformers, TextEncoder,
                         convert.clip_rules, lambda c: (jnp.zeros((1, c.max_positions), jnp.int32),),
                         prefixes=convert.CLIP_PREFIXES, ignored=convert.CLIP_IGNORED),
}


def abstract_params(kind: str, config: Any) -> Any:
    """The params pytree's shapes, from tracing `init` (no FLOPs, no memory)."""
    k = KINDS[kind]
    shapes = jax.eval_shape(k.module(config).init, jax.random.key(0), *k.dummy(config))
    return shapes["params"]


def load(folder: str | os.PathLike, kind: str, *, dtype: Any = "float32", variant: str | None = None):
    """A component folder (config.json + safetensors) -> (config, params), params as jnp arrays of `dtype`."""
    dtype = convert.parse_dtype(dtype)
    k = KINDS[kind]
    folder = Path(folder)
    config = k.parse(io.read_json(folder / "config.json"))
    files = io.find_weights(folder, k.stem, variant=variant)
    state: Mapping[str, np.ndarray] = io.LazyTensors(files)  # one tensor in host memory at a time
    if k.prefixes:
        state = convert.strip_prefixes(state, k.prefixes)
    source = ", ".join(str(f) for f in files)

    def to_device(a: np.ndarray) -> jax.Array:
        # Half-precision files cast through float32 so e.g. fp16 -> bf16 rounds once, from the exact value.
        return jnp.asarray(np.ascontiguousarray(a, dtype=np.float32), dtype=dtype)

    params = convert.to_params(state, k.rules(config), abstract_params(kind, config), source=source,
                               ignored=k.ignored, finalize=to_device)
    return config, params


def save(folder: str | os.PathLike, kind: str, config: Any, params: Any, *, dtype: Any = None) -> Path:
    """(config, params) -> `folder/config.json` + safetensors that torch diffusers/transformers load as is."""
    k = KINDS[kind]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = convert.from_params(jax.device_get(params), k.rules(config))
    if dtype is not None:
        np_dtype = np.dtype(convert.parse_dtype(dtype))
        tensors = {key: v.astype(np_dtype) for key, v in tensors.items()}
    io.write_safetensors(tensors, folder / f"{k.stem}.safetensors", metadata={"format": "pt"})
    io.write_json(k.dump(config), folder / "config.json")
    return folder
