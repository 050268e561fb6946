"""LoRA files: peft/diffusers and kohya/A1111 key names, the original LDM UNet naming, state dicts, save/load.

The `LoRA` pytree and its transformations (init, merge, ...) are in `sdjax.lora`, which also re-exports the
public names of this module (`sdjax.lora.save`, `sdjax.lora.load`, `sdjax.lora.apply_files`, ...).

Key names in files (both map through the rule tables, never by guessing from names or shapes):
- peft/diffusers: `unet.<module>.lora_A.weight` [r, in] (conv [r, in, kh, kw]) and `.lora_B.weight` [out, r]
  (conv [out, r, 1, 1]); text encoder `text_encoder.text_model.<module>...` (read with or without
  `text_model.`). Alpha lives in the safetensors metadata `lora_adapter_metadata` (recent diffusers, 0.42 here, read it
  as peft `LoraConfig` kwargs: `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, ...);
  a file without it means alpha = rank, the peft/diffusers convention.
- kohya/A1111: `lora_unet_<module with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, text encoder
  `lora_te_text_model_<module>...`; same torch layouts. Reading also accepts the original LDM UNet naming
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `..._in_layers_2`, `..._emb_layers_1`).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import checkpoint, convert, io
from sdjax.lora import COMPONENTS, LoRA, LoRAError, Target, _few, _flat, _infer_config, merge_many, module_table
from sdjax.unet import UNetConfig

FORMATS = ("peft", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry for peft LoraConfig kwargs


def save(path: str | os.PathLike, lora: LoRA, format: str = "peft", *, dtype: Any = None,
         fold_alpha: bool = False) -> Path:
    """Writes a safetensors file torch diffusers' `pipe.load_lora_weights(path)` loads with the same effect.

    format "peft" (diffusers/peft keys, alpha in the `lora_adapter_metadata` metadata) or "kohya" (A1111 keys,
    per-module `.alpha`). dtype: e.g. "float16" to halve the size (default: as the arrays are).
    fold_alpha=True multiplies `up` by alpha/rank and records alpha = rank, for readers that ignore metadata.
    """
    tensors, metadata = to_state_dict(lora, format, fold_alpha=fold_alpha)
    if dtype is not None:
        np_dtype = np.dtype(convert.parse_dtype(dtype))
        tensors = {k: v if k.endswith(".alpha") else v.astype(np_dtype) for k, v in tensors.items()}
    io.write_safetensors(tensors, path, metadata=metadata)
    return Path(path)


def load(path: str | os.PathLike, params: Mapping, *, configs: Mapping[str, Any] | None = None,
         strict: bool = True) -> LoRA:
    """Reads a peft/diffusers or kohya/A1111 LoRA file (auto-detected) for `params` (arrays or abstract).

    Every key maps through the rule tables to a kernel of `params` and its shapes are checked. A key that maps
    to nothing raises LoRAError naming it (strict=False: warns with the names and ignores those keys instead);
    a mis-shaped tensor always raises.
    """
    tensors, file_meta = _read(path)
    return from_state_dict(tensors, params, metadata=file_meta, configs=configs, strict=strict, source=str(path))


def check(path: str | os.PathLike, configs: Mapping[str, Any]) -> None:
    """Checks a LoRA file against the model whose configs these are ({"unet": UNetConfig, "text_encoder":
    CLIPConfig}; others ignored), without the model's weights: exactly what `load` checks, against the params'
    shapes (`checkpoint.abstract_params`). Raises FileNotFoundError for a missing file and LoRAError naming the
    file (and the key) for a pickle, a corrupt file, a key that maps to no module, a wrong shape (e.g. a LoRA
    for another model size), a non-float dtype or a NaN/inf value."""
    configs = {kind: cfg for kind, cfg in configs.items() if kind in COMPONENTS}
    abstract = {kind: _abstract_params(kind, cfg) for kind, cfg in configs.items()}
    tensors, file_meta = _read(path)
    _parse(tensors, abstract, metadata=file_meta, configs=configs, strict=True, source=str(path))


@functools.lru_cache(maxsize=4)
def _abstract_params(kind: str, config: Any) -> Any:
    """`checkpoint.abstract_params`, traced once per config (several LoRA files are checked against one model)."""
    return checkpoint.abstract_params(kind, config)


def _read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file; pickles are refused unread, corrupt files name the fault."""
    path = Path(path)
    if path.suffix in io.PICKLE_SUFFIXES:
        raise LoRAError(f"LoRA file {str(path)!r} is a pickle ({path.suffix}); sdjax never unpickles files (loading "
                        "one can run arbitrary code): use the .safetensors version of this LoRA")
    try:
        _, metadata, _ = io.read_safetensors_header(path)
        return io.read_safetensors(path), metadata
    except io.SafetensorsError as err:
        raise LoRAError(f"LoRA file {err}") from err


def apply_files(params: Mapping, files: Iterable[tuple[str | os.PathLike, float] | str],
                *, configs: Mapping[str, Any] | None = None) -> dict:
    """params with every LoRA file merged at its scale: [(path, scale), ...] or "FILE[:SCALE]" strings."""
    loras = []
    for item in files:
        file, scale = parse_spec(item) if isinstance(item, str) else item
        loras.append((load(file, params, configs=configs), float(scale)))
    return merge_many(params, loras)


def parse_spec(spec: str) -> tuple[str, float]:
    """"FILE[:SCALE]" (the CLI's `--lora`) -> (FILE, SCALE); the scale defaults to 1.0 and must be finite.

    The text after the last ':' is the scale when it reads as a number, or when FILE ends in ".safetensors"
    (then a non-number is an error, not part of the name): "a.safetensors:abc" raises LoRAError naming 'abc'.
    A name with a colon of its own (e.g. "C:/x.safetensors") still works without a scale."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            if head.endswith(".safetensors"):
                raise LoRAError(f"LoRA scale {tail!r} in {spec!r} is not a number (FILE[:SCALE], e.g. "
                                f"{head}:0.8)") from None
        else:
            if not math.isfinite(scale):
                raise LoRAError(f"LoRA scale must be a finite number, got {tail!r} in {spec!r}")
            return head, scale
    return spec, 1.0


def to_state_dict(lora: LoRA, format: str = "peft", *, fold_alpha: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors in torch layout under `format`'s key names, safetensors metadata)."""
    if format not in FORMATS:
        raise LoRAError(f"format={format!r} is not known; use one of {', '.join(FORMATS)}")
    tensors: dict[str, np.ndarray] = {}
    alphas: dict[str, list[tuple[str, int, float]]] = collections.defaultdict(list)
    for t in lora.targets:
        w = jax.device_get(lora.weights[t.path])
        down, up = np.asarray(w["down"]), np.asarray(w["up"])
        alpha = t.alpha
        if fold_alpha:
            up, alpha = (up.astype(np.float32) * (t.alpha / t.rank)).astype(up.dtype), float(t.rank)
        a, b = _to_torch(down), _to_torch(up)  # [r, in(, kh, kw)], [out, r(, 1, 1)]
        component = t.path.split("/")[0]
        if format == "peft":
            name = f"{component}.{_te_prefix(component)}{t.module}"
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            alphas[component].append((t.module, t.rank, alpha))
        else:
            name = kohya_name(component, t.module)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)  # []
    metadata = {"format": "pt"}
    if format == "peft":
        config = {}
        for component, entries in alphas.items():
            config.update({f"{component}.{k}": v for k, v in _peft_config(entries).items()})
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    else:
        ranks = {t.rank for t in lora.targets}
        alphas_set = {t.alpha for t in lora.targets}
        metadata.update({"ss_network_module": "networks.lora",
                         "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                         "ss_network_alpha": str(alphas_set.pop()) if len(alphas_set) == 1 else "Dynamic"})
    return tensors, metadata


def from_state_dict(tensors: Mapping[str, np.ndarray], params: Mapping, *, metadata: Mapping[str, str] | None = None,
                    configs: Mapping[str, Any] | None = None, strict: bool = True, source: str = "LoRA") -> LoRA:
    """A LoRA from tensors in peft/diffusers or kohya/A1111 naming (auto-detected), checked against `params`."""
    weights, targets = _parse(tensors, params, metadata=metadata, configs=configs, strict=strict, source=source)
    return LoRA({path: {"down": jnp.asarray(w["down"]), "up": jnp.asarray(w["up"])} for path, w in weights.items()},
                targets)


def _parse(tensors: Mapping[str, np.ndarray], params: Mapping, *, metadata: Mapping[str, str] | None,
           configs: Mapping[str, Any] | None, strict: bool, source: str
           ) -> tuple[dict[str, dict[str, np.ndarray]], tuple[Target, ...]]:
    """`from_state_dict`'s checks and conversion, on the host: ({path: {"down", "up"}} numpy arrays, targets)."""
    if not tensors:
        raise LoRAError(f"{source}: holds no tensors")
    kohya = all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors):
        raise LoRAError(f"{source}: has SDXL text-encoder keys (lora_te1_/lora_te2_); sdjax is SD 1.x/2.x")
    if any(k.endswith(("dora_scale", "lora_magnitude_vector")) or "lora_magnitude_vector" in k for k in tensors):
        raise LoRAError(f"{source}: is a DoRA file, which sdjax does not support")
    flat = _flat(params)
    names = _name_table(params, configs, kohya)
    groups, unmatched = _group(tensors, names, kohya)
    if unmatched:
        msg = (f"{source}: {len(unmatched)} key(s) match no LoRA-able module of the model: {_few(unmatched)} "
               f"(detected {'kohya' if kohya else 'peft/diffusers'} format; expected names like "
               f"{_few(sorted(names)[:3], 3)})")
        if strict:
            raise LoRAError(msg)
        warnings.warn(msg + "; ignored", stacklevel=3)
    try:
        peft_config = _read_metadata(metadata)
    except LoRAError as err:
        raise LoRAError(f"{source}: {err}") from None
    weights, targets = {}, []
    for (path, module), parts in sorted(groups.items()):
        down, up = _from_torch(parts, tuple(flat[path].shape), source)
        rank = down.shape[-1]
        component = path.split("/")[0]
        if "alpha" in parts:
            alpha = _alpha(*parts["alpha"], source)
        else:
            alpha = _peft_alpha(peft_config.get(component), module, rank)
        weights[path] = {"down": down, "up": up}
        targets.append(Target(path, module, alpha, int(rank)))
    if not targets:
        raise LoRAError(f"{source}: no LoRA weights for this model")
    return weights, tuple(targets)


def _alpha(key: str, value: Any, source: str) -> float:
    """A kohya `.alpha` entry: one finite number (stored as a float or an integer)."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "fiu" or not np.isfinite(value.astype(np.float64)).all():
        raise LoRAError(f"{source}: '{key}' must be one finite number, got dtype {io.dtype_name(value.dtype)} "
                        f"shape {tuple(value.shape)}")
    return float(value.astype(np.float64).reshape(()))


def _check_factor(key: str, value: Any, source: str) -> None:
    """A LoRA factor is floating point (F16/BF16/F32/F64, as model weights) and finite."""
    dtype = io.dtype_name(np.asarray(value).dtype)
    if dtype not in convert.FLOAT_DTYPES:
        raise LoRAError(f"{source}: '{key}' has dtype {dtype}, but LoRA weights must be floating point (allowed: "
                        f"{', '.join(convert.FLOAT_DTYPES)})")
    finite = np.isfinite(value)
    if not finite.all():
        raise LoRAError(f"{source}: '{key}' holds {finite.size - int(np.count_nonzero(finite))} non-finite "
                        "value(s) (NaN or inf); LoRA weights must be finite")


def kohya_name(component: str, module: str) -> str:
    """("unet", "down_blocks.0.attentions.0.proj_in") -> "lora_unet_down_blocks_0_attentions_0_proj_in";
    text encoder modules get kohya's `lora_te_text_model_` prefix."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + f"{_te_prefix(component)}{module}".replace(".", "_")


def ldm_module(module: str, cfg: UNetConfig) -> str | None:
    """A diffusers UNet module name in the original LDM (CompVis / A1111) naming, or None where LDM has no
    Dense/Conv of that name: "down_blocks.1.attentions.0.proj_in" -> "input_blocks.4.1.proj_in"."""
    per = cfg.layers_per_block + 1
    inner = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
             "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}
    if module in fixed:
        return fixed[module]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{i * per + j + 1}" if side == "down" else f"output_blocks.{i * per + j}"
        if kind == "resnets":
            return f"{block}.0.{inner[rest]}" if rest in inner else None
        return f"{block}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        rest = m[3] if m[1] == "attentions" else inner.get(m[3])
        return f"middle_block.{index}.{rest}" if rest else None
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module)
    if m:
        i = int(m[1])
        attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        return f"output_blocks.{i * per + per - 1}.{2 if attn else 1}.conv"
    return None


def _name_table(params: Mapping, configs, kohya: bool) -> dict[str, tuple[str, str]]:
    """File module name -> (kernel path, module) for every accepted spelling of every module."""
    names = {}
    ucfg = (configs or {}).get("unet") or (_infer_config("unet", params["unet"]) if "unet" in params else None)
    for path, module in module_table(params, configs).items():
        component = path.split("/")[0]
        if kohya:
            names[kohya_name(component, module)] = (path, module)
            # a unet module implies "unet" in params, so ucfg is set
            ldm = ldm_module(module, cast(UNetConfig, ucfg)) if component == "unet" else None
            if ldm:
                names["lora_unet_" + ldm.replace(".", "_")] = (path, module)
        else:
            names[f"{component}.{module}"] = (path, module)
            if component == "text_encoder":
                names[f"text_encoder.text_model.{module}"] = (path, module)
    return names


_PEFT_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|alpha)$")
_KOHYA_KEY = re.compile(r"^([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PART = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
         "alpha": "alpha"}


def _group(tensors: Mapping[str, np.ndarray], names: Mapping[str, tuple[str, str]], kohya: bool):
    """{(path, module): {"down"|"up"|"alpha": (key, tensor)}} and the keys that match no module."""
    groups: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    unmatched = []
    for key, value in tensors.items():
        m = (_KOHYA_KEY if kohya else _PEFT_KEY).match(key)
        if not m or m[1] not in names:
            unmatched.append(key)
            continue
        groups[names[m[1]]][_PART[m[2]]] = (key, value)
    return groups, sorted(unmatched)


def _from_torch(parts: Mapping[str, tuple[str, np.ndarray]], kernel: tuple[int, ...], source: str):
    """Torch-layout (A, B) -> (down [..., in, r], up [..., r, out]) for a kernel [in, out] / [kh, kw, in, out]."""
    for part in ("down", "up"):
        if part not in parts:
            other = next(iter(parts.values()))[0]
            raise LoRAError(f"{source}: '{other}' has no matching {part} ({'lora_A' if part == 'down' else 'lora_B'}"
                            f"/lora_{part}) tensor")
    (a_key, a), (b_key, b) = parts["down"], parts["up"]
    _check_factor(a_key, a, source)
    _check_factor(b_key, b, source)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rank = a.shape[0] if a.ndim else 0
    want_a: tuple[int, ...]
    want_b: tuple[int, ...]
    if len(kernel) == 4:
        kh, kw, cin, cout = kernel
        want_a, want_b = (rank, cin, kh, kw), (cout, rank, 1, 1)
        if a.shape == (rank, cin) and (kh, kw) == (1, 1):
            a = a.reshape(want_a)  # a Linear-style LoRA on a 1x1 conv
        if b.shape == (cout, rank):
            b = b.reshape(want_b)
    else:
        cin, cout = kernel
        want_a, want_b = (rank, cin), (cout, rank)
    if rank < 1 or a.shape != want_a:
        raise LoRAError(f"{source}: '{a_key}' has shape {tuple(a.shape)}, but the model needs (rank, "
                        f"{', '.join(map(str, want_a[1:]))})")
    if b.shape != want_b:
        raise LoRAError(f"{source}: '{b_key}' has shape {tuple(b.shape)}, but the model needs {want_b} "
                        f"(rank {rank} from '{a_key}')")
    return _from_torch_layout(a), _from_torch_layout(b)


def _to_torch(x: np.ndarray) -> np.ndarray:
    """[in, r] -> [r, in]; [kh, kw, in, r] -> [r, in, kh, kw] (and the same for up)."""
    return np.ascontiguousarray(x.T if x.ndim == 2 else np.transpose(x, (3, 2, 0, 1)))


def _from_torch_layout(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T if x.ndim == 2 else np.transpose(x, (2, 3, 1, 0)))


def _te_prefix(component: str) -> str:
    return "text_model." if component == "text_encoder" else ""


def _peft_config(entries: list[tuple[str, int, float]]) -> dict[str, Any]:
    """peft LoraConfig kwargs for one component's (module, rank, alpha) entries."""
    r = collections.Counter(rank for _, rank, _ in entries).most_common(1)[0][0]
    alpha = collections.Counter(a for _, _, a in entries).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(m for m, _, _ in entries),
        "rank_pattern": {m: rank for m, rank, _ in entries if rank != r},
        "alpha_pattern": {m: a for m, _, a in entries if a != alpha},
    }


def _read_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata` -> {component: peft LoraConfig kwargs}."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAError(f"metadata {METADATA_KEY!r} is not valid JSON: {err}") from None
    out: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out[component][field] = value
    for component, config in out.items():
        if config.get("use_dora") or config.get("lora_bias"):
            raise LoRAError(f"{component}: DoRA / LoRA-bias adapters are not supported")
    return dict(out)


def _peft_alpha(config: Mapping[str, Any] | None, module: str, rank: int) -> float:
    """The effective alpha (so that alpha / rank is the scale) peft would use for `module`."""
    if not config:
        return float(rank)
    alpha = float(config.get("lora_alpha", config.get("r", rank)))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # peft scales by alpha / sqrt(r)
    return alpha
