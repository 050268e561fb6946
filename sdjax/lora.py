"""LoRA for the UNet and the text encoder: pure functions over params pytrees, in the optax manner.

    lora = sdjax.lora.init(jax.random.key(0), pipe.params, rank=8, alpha=4)      # trainable pytree
    loss = lambda lora: ...model(sdjax.lora.merge(params, lora))...                 # jax.grad(loss)(lora)
    sdjax.lora.save("my_lora.safetensors", lora)                                   # diffusers/peft format
    params = sdjax.lora.apply_files(pipe.params, [("my_lora.safetensors", 0.8)])  # inference, zero overhead

Training: `opt_state = optax.adamw(1e-4).init(lora)`; `grads = jax.grad(loss)(lora)` is a LoRA of the same
structure; `optax.apply_updates(lora, updates)` keeps the static `targets`. `concat(unet_lora, te_lora)` joins
LoRAs of different ranks/alphas over disjoint paths; `merge_many` adds several with their own scales.

The `LoRA` pytree. `lora.weights` maps the '/'-joined path of each adapted kernel to its two factors:

    {"unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel":
        {"down": [in, r] (conv: [kh, kw, in, r]), "up": [r, out] (conv: [1, 1, r, out])}, ...}

These arrays are the only leaves: `jax.grad` w.r.t. a LoRA gives a LoRA of gradients and optax state covers
exactly them. `lora.targets` is static (part of the treedef, hashable): one `Target(path, module, alpha,
rank)` per entry, `module` being the checkpoint module name the rule tables (`sdjax.convert`) give the path,
e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" (text encoder: "encoder.layers.0.self_attn.
q_proj", no `text_model.`). The adapted kernel is W + scale * (alpha / rank) * down @ up; conv LoRA is kohya's
LoCon / peft's Conv2d LoRA: a down conv with the base kernel size, stride and padding, then a 1x1 up conv,
i.e. the kernel-shaped product sum_r down[h, w, i, r] * up[0, 0, r, o].

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
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from sdjax import convert, io
from sdjax.clip import CLIPConfig
from sdjax.unet import UNetConfig

COMPONENTS = ("unet", "text_encoder")

# Regexes over '/'-joined kernel paths (components first); only `.../kernel` leaves of Dense/Conv are candidates.
UNET_ATTENTION_TARGETS = (r"^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$",)
TEXT_ENCODER_TARGETS = (
    r"^text_encoder/layers_\d+/self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$",
    r"^text_encoder/layers_\d+/(mlp_fc1|mlp_fc2)/kernel$",
)
UNET_EXTRA_TARGETS = (
    r"^unet/.*/attentions_\d+/(proj_in|proj_out)/kernel$",
    r"^unet/.*/transformer_blocks_\d+/ff/(net_0/proj|net_2)/kernel$",
    r"^unet/.*/resnets_\d+/(conv1|conv2|time_emb_proj)/kernel$",
)
DEFAULT_TARGETS = UNET_ATTENTION_TARGETS
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "unet": UNET_ATTENTION_TARGETS,
    "unet+te": UNET_ATTENTION_TARGETS + TEXT_ENCODER_TARGETS,
    "unet_full": UNET_ATTENTION_TARGETS + UNET_EXTRA_TARGETS,
    "all": UNET_ATTENTION_TARGETS + UNET_EXTRA_TARGETS + TEXT_ENCODER_TARGETS,
}
FORMATS = ("peft", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry for peft LoraConfig kwargs


class LoRAError(ValueError):
    """A LoRA does not fit the params (unknown or mis-shaped key, unsupported file, targets that match nothing)."""


class Target(NamedTuple):
    """Static description of one adapted kernel."""

    path: str  # '/'-joined params path of the kernel, e.g. "unet/mid_block/.../to_q/kernel"
    module: str  # checkpoint module name inside the component, e.g. "mid_block.attentions.0....to_q"
    alpha: float
    rank: int


@struct.dataclass
class LoRA:
    """Trainable factors (`weights`, the only pytree leaves) + static `targets` (alpha, rank, module names)."""

    weights: dict[str, dict[str, jax.Array]]  # path -> {"down": [..., in, r], "up": [..., r, out]}
    targets: tuple[Target, ...] = struct.field(pytree_node=False)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(t.path for t in self.targets)

    def target(self, path: str) -> Target:
        return next(t for t in self.targets if t.path == path)


def init(key: jax.Array, params: Mapping, rank: int, alpha: float | None = None,
         targets: Sequence[str] | str = DEFAULT_TARGETS, *, dtype: Any = jnp.float32,
         configs: Mapping[str, Any] | None = None) -> LoRA:
    """A fresh LoRA for every kernel of `params` whose path matches one of `targets` (regexes, or a name from
    TARGET_SETS). `params` = {"unet": ..., "text_encoder": ..., ...} (arrays or ShapeDtypeStructs).

    down ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming-uniform(a=sqrt(5)), fan_in = kh*kw*in), up = 0,
    so `merge(params, init(...))` is exactly `params`. alpha defaults to rank (factor 1). `configs` ({"unet":
    UNetConfig, "text_encoder": CLIPConfig}) is only needed for params sdjax cannot read the architecture from.
    Raises LoRAError if a target regex matches no kernel (listing example paths).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise LoRAError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    paths = select(params, targets)
    modules = module_table(params, configs)
    flat = _flat(params)
    shapes = tuple(tuple(flat[p].shape) for p in paths)  # [in, out] or [kh, kw, in, out]
    factors = _init_factors(key, shapes, int(rank), jnp.dtype(dtype))
    weights = {p: {"down": down, "up": up} for p, (down, up) in zip(paths, factors)}
    return LoRA(weights, tuple(Target(p, modules[p], alpha, int(rank)) for p in paths))


def concat(*loras: LoRA) -> LoRA:
    """One LoRA from several over disjoint paths (e.g. a UNet one and a text-encoder one of another rank)."""
    targets = sorted((t for lora in loras for t in lora.targets), key=lambda t: t.path)
    dup = sorted({a.path for a, b in itertools.pairwise(targets) if a.path == b.path})
    if dup:
        raise LoRAError(f"concat: paths in more than one LoRA: {_few(dup)} (use merge_many to add them)")
    return LoRA({p: w for lora in loras for p, w in lora.weights.items()}, tuple(targets))


def select(params: Mapping, targets: Sequence[str] | str) -> list[str]:
    """The sorted '/'-joined kernel paths (Dense [in, out] or Conv [kh, kw, in, out]) matching any regex."""
    if isinstance(targets, str):
        targets = TARGET_SETS.get(targets, (targets,))
    kernels = sorted(p for p, leaf in _flat(params).items()
                     if p.endswith("/kernel") and len(leaf.shape) in (2, 4) and p.split("/")[0] in COMPONENTS)
    chosen = set()
    for pattern in targets:
        hits = [p for p in kernels if re.search(pattern, p)]
        if not hits:
            raise LoRAError(f"LoRA target {pattern!r} matches no kernel of params (components "
                            f"{sorted(params)}); kernels look like: {_examples(kernels)}")
        chosen.update(hits)
    return sorted(chosen)


def delta(lora: LoRA, path: str, scale: Any = 1.0) -> jax.Array:
    """scale * alpha/rank * down @ up, shaped like the kernel ([in, out] or [kh, kw, in, out]), float32."""
    return _delta(lora.weights[path], lora.target(path), scale)


def _delta(w: Mapping[str, jax.Array], t: Target, scale: Any) -> jax.Array:
    return _product(w["down"], w["up"]) * (scale * (t.alpha / t.rank))


def merge(params: Mapping, lora: LoRA, scale: Any = 1.0) -> dict:
    """params with W + scale * alpha/rank * down @ up at every LoRA path; other leaves are the same objects.

    Jit-friendly (`scale` may be traced). Merging into half-precision weights adds in float32 and rounds once.
    """
    return merge_many(params, [(lora, scale)])


def merge_many(params: Mapping, loras: Iterable[tuple[LoRA, Any]]) -> dict:
    """Several (lora, scale) pairs at once: their deltas are summed per kernel, then added once."""
    flat = _flat(params)
    terms: dict[str, list] = collections.defaultdict(list)  # path -> [(down, up, scale * alpha / rank), ...]
    for lora, scale in loras:
        _check_fits(flat, lora)
        for t in lora.targets:
            w = lora.weights[t.path]
            terms[t.path].append((w["down"], w["up"], jnp.asarray(scale, jnp.float32) * (t.alpha / t.rank)))
    return _replace(params, _merged_kernels({path: flat[path] for path in terms}, dict(terms)))


@jax.jit
def _merged_kernels(kernels: dict[str, jax.Array], terms: dict[str, list]) -> dict[str, jax.Array]:
    """kernel + sum of factor * down @ up per path, added in (at least) float32, cast back to the kernel's dtype.

    One jitted function for the whole merge: eager callers compile once per LoRA layout instead of dispatching
    op by op; inside an outer jit it is inlined."""
    out = {}
    for path, kernel in kernels.items():
        wide = jnp.promote_types(kernel.dtype, jnp.float32)
        total = kernel.astype(wide)
        for down, up, factor in terms[path]:
            total = total + _product(down, up).astype(wide) * factor
        out[path] = total.astype(kernel.dtype)
    return out


def _product(down: jax.Array, up: jax.Array) -> jax.Array:
    """down [..., in, r] @ up [..., r, out] -> [..., in, out] in float32."""
    up = up.reshape(up.shape[-2:])  # [r, out]
    return jnp.tensordot(down.astype(jnp.float32), up.astype(jnp.float32), axes=1,
                         precision=jax.lax.Precision.HIGHEST)


def unmerge(params: Mapping, lora: LoRA, scale: Any = 1.0) -> dict:
    """Undoes `merge(params, lora, scale)` (exact up to floating-point rounding)."""
    return merge(params, lora, -scale)


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
    _, file_meta, _ = io.read_safetensors_header(path)
    return from_state_dict(io.read_safetensors(path), params, metadata=file_meta, configs=configs,
                           strict=strict, source=str(path))


def apply_files(params: Mapping, files: Iterable[tuple[str | os.PathLike, float] | str],
                *, configs: Mapping[str, Any] | None = None) -> dict:
    """params with every LoRA file merged at its scale: [(path, scale), ...] or "FILE[:SCALE]" strings."""
    loras = []
    for item in files:
        file, scale = parse_spec(item) if isinstance(item, str) else item
        loras.append((load(file, params, configs=configs), float(scale)))
    return merge_many(params, loras)


def parse_spec(spec: str) -> tuple[str, float]:
    """"FILE[:SCALE]" (the CLI's `--lora`) -> (FILE, SCALE); the scale defaults to 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
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
    peft_config = _read_metadata(metadata)
    weights, targets = {}, []
    for (path, module), parts in sorted(groups.items()):
        down, up = _from_torch(parts, tuple(flat[path].shape), source)
        rank = down.shape[-1]
        component = path.split("/")[0]
        if "alpha" in parts:
            alpha = float(np.asarray(parts["alpha"][1], np.float64).reshape(()))
        else:
            alpha = _peft_alpha(peft_config.get(component), module, rank)
        weights[path] = {"down": jnp.asarray(down), "up": jnp.asarray(up)}
        targets.append(Target(path, module, alpha, int(rank)))
    if not targets:
        raise LoRAError(f"{source}: no LoRA weights for this model")
    return LoRA(weights, tuple(targets))


def kohya_name(component: str, module: str) -> str:
    """("unet", "down_blocks.0.attentions.0.proj_in") -> "lora_unet_down_blocks_0_attentions_0_proj_in";
    text encoder modules get kohya's `lora_te_text_model_` prefix."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + f"{_te_prefix(component)}{module}".replace(".", "_")


def module_table(params: Mapping, configs: Mapping[str, Any] | None = None) -> dict[str, str]:
    """'/'-joined kernel path -> checkpoint module name, for every Dense/Conv kernel of the unet and
    text_encoder components, from the rule tables of their configs (read from the params' structure unless
    given, and checked: the rules must cover exactly the component's leaves)."""
    table = {}
    for component in COMPONENTS:
        if component not in params:
            continue
        cfg = (configs or {}).get(component) or _infer_config(component, params[component])
        for path, module in _kernel_modules(component, cfg).items():
            table[f"{component}/{path}"] = module
        _check_rules(component, cfg, params[component])
    return table


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


def _init_factors(key: jax.Array, shapes: tuple[tuple[int, ...], ...], rank: int, dtype: Any) -> list:
    """(down [..., in, r] ~ U(+-1/sqrt(fan_in)), up [..., r, out] = 0) per kernel shape.

    One random draw for all of them (one small compilation, however many kernels), cut up on the host."""
    sizes = [math.prod(shape[:-1]) * rank for shape in shapes]
    noise = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        down = (noise[start:start + size] * bound).reshape(shape[:-1] + (rank,))
        up = np.zeros((1, 1, rank, shape[-1]) if len(shape) == 4 else (rank, shape[-1]))
        out.append((jnp.asarray(down, dtype), jnp.asarray(up, dtype)))
        start += size
    return out


def _flat(params: Mapping) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _replace(params: Mapping, updates: Mapping[str, Any]) -> dict:
    """A copy of the nested dicts along the updated paths; every other leaf and subtree is the same object."""
    out = dict(params)
    children = collections.defaultdict(dict)
    for path, value in updates.items():
        head, _, rest = path.partition("/")
        if rest:
            children[head][rest] = value
        else:
            out[head] = value
    for head, sub in children.items():
        out[head] = _replace(params[head], sub)
    return out


def _check_fits(flat: Mapping[str, Any], lora: LoRA) -> None:
    for t in lora.targets:
        if t.path not in flat:
            raise LoRAError(f"LoRA path {t.path!r} is not in params; params kernels look like: "
                            f"{_examples(sorted(p for p in flat if p.endswith('/kernel')))}")
        w, shape = lora.weights[t.path], tuple(flat[t.path].shape)
        want_down, want_up = shape[:-1] + (t.rank,), ((1, 1) if len(shape) == 4 else ()) + (t.rank, shape[-1])
        if tuple(w["down"].shape) != want_down or tuple(w["up"].shape) != want_up:
            raise LoRAError(f"LoRA at {t.path!r}: down {tuple(w['down'].shape)} / up {tuple(w['up'].shape)} do "
                            f"not fit the kernel {shape} (need {want_down} / {want_up})")


def _infer_config(component: str, p: Mapping) -> Any:
    """The config fields the rule tables depend on, read from a component's params structure."""
    try:
        if component == "text_encoder":
            return CLIPConfig(num_layers=_count(p, "layers_"))
        n = _count(p, "down_blocks_")
        blocks = [p[f"down_blocks_{i}"] for i in range(n)]
        ups = [p[f"up_blocks_{i}"] for i in range(n)]

        def depth(block):
            return _count(block["attentions_0"], "transformer_blocks_") if "attentions_0" in block else None

        layers = [depth(blocks[i]) or depth(ups[n - 1 - i]) or 1 for i in range(n)]
        layers[-1] = depth(p["mid_block"])
        return UNetConfig(
            in_channels=int(p["conv_in"]["kernel"].shape[2]),
            out_channels=int(p["conv_out"]["kernel"].shape[3]),
            block_out_channels=tuple(int(b["resnets_0"]["conv1"]["kernel"].shape[-1]) for b in blocks),
            down_block_types=tuple("CrossAttnDownBlock2D" if "attentions_0" in b else "DownBlock2D" for b in blocks),
            up_block_types=tuple("CrossAttnUpBlock2D" if "attentions_0" in b else "UpBlock2D" for b in ups),
            layers_per_block=_count(blocks[0], "resnets_"),
            heads=(1,) * n,
            transformer_layers=tuple(layers),
            use_linear_projection=len(p["mid_block"]["attentions_0"]["proj_in"]["kernel"].shape) == 2,
        )
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise LoRAError(f"params[{component!r}] does not look like an sdjax {component} ({err!r}); pass "
                        f"configs={{{component!r}: ...}}") from None


def _count(tree: Mapping, prefix: str) -> int:
    return sum(1 for k in tree if re.fullmatch(re.escape(prefix) + r"\d+", k))


@functools.lru_cache(maxsize=16)
def _kernel_modules(component: str, cfg: Any) -> dict[str, str]:
    """'/'-joined kernel path (inside the component) -> module name, from the rule table."""
    rules = convert.unet_rules(cfg) if component == "unet" else convert.clip_rules(cfg)
    return {"/".join(r.path): r.key.removesuffix(".weight") for r in rules
            if r.path[-1] == "kernel" and r.transform in ("linear", "conv")}


def _check_rules(component: str, cfg: Any, p: Mapping) -> None:
    rules = convert.unet_rules(cfg) if component == "unet" else convert.clip_rules(cfg)
    ruled = {"/".join(r.path) for r in rules}
    have = set(_flat(p))
    if ruled != have:
        raise LoRAError(f"params[{component!r}] does not match the rule table of its config: unruled "
                        f"{_few(sorted(have - ruled))}, absent {_few(sorted(ruled - have))}; pass configs=")


def _name_table(params: Mapping, configs, kohya: bool) -> dict[str, tuple[str, str]]:
    """File module name -> (kernel path, module) for every accepted spelling of every module."""
    names = {}
    ucfg = (configs or {}).get("unet") or (_infer_config("unet", params["unet"]) if "unet" in params else None)
    for path, module in module_table(params, configs).items():
        component = path.split("/")[0]
        if kohya:
            names[kohya_name(component, module)] = (path, module)
            ldm = ldm_module(module, ucfg) if component == "unet" else None
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
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rank = a.shape[0] if a.ndim else 0
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


def _examples(paths: list[str], n: int = 6) -> str:
    if not paths:
        return "(none)"
    step = max(1, len(paths) // n)
    return ", ".join(repr(p) for p in paths[::step][:n])


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
