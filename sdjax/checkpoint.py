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
from sdjax.io import CheckpointError  # raised here; also checkpoint.CheckpointError
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
    """The params pytree's shapes, from the rule table (`convert.abstract`: no tracing, no memory); the same
    as `traced_abstract_params`, which the tests hold it to."""
    return convert.abstract(KINDS[kind].rules(config))


def traced_abstract_params(kind: str, config: Any) -> Any:
    """The params pytree's shapes from tracing the module's `init` (no FLOPs, no memory; about 1 s for the SD1.5
    UNet): what `abstract_params` must equal."""
    k = KINDS[kind]
    return jax.eval_shape(k.module(config).init, jax.random.key(0), *k.dummy(config))["params"]


def read_config(folder: str | os.PathLike, kind: str) -> Any:
    """A component folder's config.json -> its config (UNetConfig, VAEConfig or CLIPConfig), no weights read.

    Raises FileNotFoundError when the file is missing, CheckpointError naming the file and the field when it is
    not JSON, not a JSON object, or has a field of the wrong type, out of range or unsupported."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a model component; use one of {', '.join(KINDS)}")
    path = Path(folder) / "config.json"
    try:
        return KINDS[kind].parse(io.read_json(path))
    except ValueError as err:  # the parsers' ConfigFieldError / UnsupportedConfigError, read_json's bad JSON
        message = str(err)
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from err
    except (TypeError, KeyError, AttributeError) as err:  # a shape of value the parsers' checks did not foresee
        raise CheckpointError(f"{path}: not a valid {kind} config ({type(err).__name__}: {err})") from err


def load(folder: str | os.PathLike, kind: str, *, dtype: Any = "float32", variant: str | None = None,
         abstract: Any = None):
    """A component folder (config.json + safetensors) -> (config, params), params as jnp arrays of `dtype`.

    Everything is checked before any tensor is read: the config (`read_config`), the safetensors files (by the
    safetensors library), then every tensor's name, dtype (floating point) and shape against the architecture;
    then each tensor is checked to be finite as it is converted. Errors name the file (and field or tensor).
    abstract: `abstract_params(kind, config)` when the caller has it already."""
    dtype = convert.parse_dtype(dtype)
    k = KINDS[kind]
    folder = Path(folder)
    config = read_config(folder, kind)
    files = io.find_weights(folder, k.stem, variant=variant)
    state: Mapping[str, np.ndarray] = io.LazyTensors(files)  # one tensor in host memory at a time
    if k.prefixes:
        state = convert.strip_prefixes(state, k.prefixes)
    source = ", ".join(str(f) for f in files)

    if abstract is None:
        abstract = abstract_params(kind, config)
    params = convert.to_params(state, k.rules(config), abstract, source=source, ignored=k.ignored,
                               dtype=dtype, finalize=jax.device_put)
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
