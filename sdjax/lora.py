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

The file formats (peft/diffusers and kohya/A1111 key names, the LDM UNet naming, state dicts, `save`, `load`,
`apply_files`, `parse_spec`, `check`) are in `sdjax.lora_files`; their names stay reachable here, as
`sdjax.lora.save`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from sdjax import convert
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

# The file formats live in sdjax.lora_files, which imports this module; their names are reachable here too
# (`sdjax.lora.save(...)`, `from sdjax.lora import load`), imported on first use.
_FILE_API = ("FORMATS", "METADATA_KEY", "apply_files", "check", "from_state_dict", "kohya_name", "ldm_module",
             "load", "parse_spec", "save", "to_state_dict")

if TYPE_CHECKING:
    pass


def __getattr__(name: str) -> Any:
    if name in _FILE_API:
        from sdjax import lora_files

        value = globals()[name] = getattr(lora_files, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FILE_API})


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
    children: collections.defaultdict[str, dict[str, Any]] = collections.defaultdict(dict)
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


def _examples(paths: list[str], n: int = 6) -> str:
    if not paths:
        return "(none)"
    step = max(1, len(paths) // n)
    return ", ".join(repr(p) for p in paths[::step][:n])


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def branch(lora: LoRA, component: str):
    """A context manager running `lora` as a side branch of `component`'s ("unet" or "text_encoder") Dense
    layers while the model is applied inside it: a flax method interceptor adds y += alpha/rank * (x @ down)
    @ up (in the layer's compute dtype) to the output of every adapted Dense; the base kernel is used as it is.

        with lora.branch(lo, "unet"):
            out = unet.apply({"params": params["unet"]}, x, t, context)

    The same function as `merge` for Dense entries (down [in, r]); conv entries cannot run this way (merge
    them). When the block ends without an exception, raises LoRAError (a ValueError) naming the entries of
    `component` that matched no Dense called inside it (under jit: while tracing), instead of silently
    leaving them out.
    """
    import contextlib  # local: this block is appended to the module (its imports are left as they are)

    from flax import linen as nn

    entries = {tuple(t.path.split("/")[1:-1]): t for t in lora.targets if t.path.startswith(component + "/")}
    applied: set[str] = set()

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        t = entries.get(context.module.path) if context.method_name == "__call__" else None
        if t is None or not isinstance(context.module, nn.Dense):
            return y
        applied.add(t.path)
        w, dtype = lora.weights[t.path], y.dtype
        h = jnp.dot(args[0].astype(dtype), w["down"].astype(dtype))
        return y + (jnp.dot(h, w["up"].astype(dtype)) * (t.alpha / t.rank)).astype(dtype)

    @contextlib.contextmanager
    def run():
        with nn.intercept_methods(intercept):
            yield
        missing = sorted(t.path for t in entries.values() if t.path not in applied)
        if missing:
            shown = ", ".join(f"'{p}'" for p in missing[:8]) + (f" and {len(missing) - 8} more"
                                                                 if len(missing) > 8 else "")
            raise LoRAError(f"LoRA side branch: {len(missing)} {component} entries match no Dense layer the "
                            f"{component} called: {shown} (a path that names no module, or a conv entry: merge "
                            "those with lora.merge)")

    return run()
