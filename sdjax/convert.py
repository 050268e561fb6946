"""Checkpoint keys <-> parameter pytrees, through explicit rule tables checked against `jax.eval_shape(init)`.

A rule says: checkpoint key K holds the leaf at pytree path P, of shape S in the pytree, after transform T (conv
kernels OIHW -> HWIO, linear weights [out, in] -> [in, out], everything else as is). The tables are written from
the architecture (the config), never guessed from names or ranks. Loading is strict: a key no rule claims, a rule
whose key is absent, or a tensor of the wrong shape raises and names the key.

The shapes make a table its module's parameter list: `abstract(rules)` is what `jax.eval_shape(module.init)` gives
(tests/test_convert_shapes.py holds every table to that), without tracing the module (1.5 s for SD1.5's three).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax import io
from sdjax.clip import CLIPConfig
from sdjax.io import CheckpointError  # raised here; also convert.CheckpointError
from sdjax.unet import UNetConfig
from sdjax.vae import VAEConfig

# Threads that convert a checkpoint's tensors (`to_params`): the cores, up to 4 (reading is memory-bound beyond).
LOAD_THREADS = min(4, os.cpu_count() or 1)

# What a parameter may be stored as: every sdjax parameter is floating point. F8 is refused too: diffusers and
# transformers never save SD weights in F8, and the F8 checkpoints in circulation ("fp8 scaled") carry
# per-tensor scales beside the weights that a plain cast would silently drop.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str  # the checkpoint key sdjax writes (the canonical one)
    path: tuple[str, ...]  # where the tensor lives in the params pytree
    transform: str  # "conv", "linear" or "copy"
    shape: tuple[int, ...]  # the leaf's shape in the params pytree (HWIO, [in, out])
    aliases: tuple[str, ...] = ()  # other names the same tensor has in older checkpoints


_TO_PYTREE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # [O, I, kh, kw] -> [kh, kw, I, O]
    "linear": lambda w: np.transpose(w),  # [O, I] -> [I, O]
    # Old VAE checkpoints store the attention projections as 1x1 convs: [O, I, 1, 1] -> [I, O].
    "conv1x1_linear": lambda w: np.transpose(w.reshape(w.shape[:2])),
    "copy": lambda w: w,
}
_TO_CHECKPOINT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (3, 2, 0, 1)),
    "linear": lambda w: np.transpose(w),
    # The original (CompVis) VAE attention projections are 1x1 convs: [I, O] -> [O, I, 1, 1] (sdjax.single_file).
    "conv1x1_linear": lambda w: np.transpose(w)[:, :, None, None],
    "copy": lambda w: w,
}


def _path(prefix: str) -> tuple[str, ...]:
    """`down_blocks.0.resnets.1.conv1` -> ("down_blocks_0", "resnets_1", "conv1")."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", prefix).split("."))


def conv(prefix: str, cin: int, cout: int, kernel: int = 3, path: tuple[str, ...] | None = None,
         bias: bool = True) -> list[Rule]:
    p = path or _path(prefix)
    rules = [Rule(f"{prefix}.weight", p + ("kernel",), "conv", (kernel, kernel, cin, cout))]
    return rules + [Rule(f"{prefix}.bias", p + ("bias",), "copy", (cout,))] if bias else rules


def linear(prefix: str, din: int, dout: int, path: tuple[str, ...] | None = None, bias: bool = True,
           aliases=()) -> list[Rule]:
    p = path or _path(prefix)
    rules = [Rule(f"{prefix}.weight", p + ("kernel",), "linear", (din, dout), tuple(f"{a}.weight" for a in aliases))]
    if bias:
        rules.append(Rule(f"{prefix}.bias", p + ("bias",), "copy", (dout,), tuple(f"{a}.bias" for a in aliases)))
    return rules


def norm(prefix: str, channels: int, path: tuple[str, ...] | None = None) -> list[Rule]:
    p = path or _path(prefix)
    return [Rule(f"{prefix}.weight", p + ("scale",), "copy", (channels,)),
            Rule(f"{prefix}.bias", p + ("bias",), "copy", (channels,))]


def embedding(prefix: str, path: tuple[str, ...], rows: int, dim: int) -> list[Rule]:
    return [Rule(f"{prefix}.weight", path + ("embedding",), "copy", (rows, dim))]


def resnet(prefix: str, in_ch: int, out_ch: int, temb_dim: int | None) -> list[Rule]:
    """`layers.ResnetBlock`; temb_dim: the time embedding's width (None: the VAE's blocks, which have none)."""
    rules = norm(f"{prefix}.norm1", in_ch) + conv(f"{prefix}.conv1", in_ch, out_ch)
    rules += norm(f"{prefix}.norm2", out_ch) + conv(f"{prefix}.conv2", out_ch, out_ch)
    if temb_dim is not None:
        rules += linear(f"{prefix}.time_emb_proj", temb_dim, out_ch)
    if in_ch != out_ch:
        rules += conv(f"{prefix}.conv_shortcut", in_ch, out_ch, kernel=1)
    return rules


def spatial_transformer(prefix: str, channels: int, layers: int, linear_projection: bool, context_dim: int
                        ) -> list[Rule]:
    """`layers.SpatialTransformer` with heads x head_dim = channels (the UNet's), GEGLU feed-forward of 4x."""
    inner = channels
    if linear_projection:
        rules = linear(f"{prefix}.proj_in", channels, inner) + linear(f"{prefix}.proj_out", inner, channels)
    else:
        rules = conv(f"{prefix}.proj_in", channels, inner, 1) + conv(f"{prefix}.proj_out", inner, channels, 1)
    rules = norm(f"{prefix}.norm", channels) + rules
    for i in range(layers):
        b = f"{prefix}.transformer_blocks.{i}"
        for attn, kv_dim in (("attn1", inner), ("attn2", context_dim)):
            rules += linear(f"{b}.{attn}.to_q", inner, inner, bias=False)
            rules += linear(f"{b}.{attn}.to_k", kv_dim, inner, bias=False)
            rules += linear(f"{b}.{attn}.to_v", kv_dim, inner, bias=False)
            rules += linear(f"{b}.{attn}.to_out.0", inner, inner)
        rules += norm(f"{b}.norm1", inner) + norm(f"{b}.norm2", inner) + norm(f"{b}.norm3", inner)
        rules += linear(f"{b}.ff.net.0.proj", inner, 2 * 4 * inner) + linear(f"{b}.ff.net.2", 4 * inner, inner)
    return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    chans = cfg.block_out_channels
    c0, n, temb, ctx = chans[0], len(chans), 4 * chans[0], cfg.cross_attention_dim
    rules = conv("conv_in", cfg.in_channels, c0)
    rules += linear("time_embedding.linear_1", c0, temb) + linear("time_embedding.linear_2", temb, temb)

    def transformer(prefix: str, ch: int, block: int) -> list[Rule]:
        return spatial_transformer(prefix, ch, cfg.transformer_layers[block], cfg.use_linear_projection, ctx)

    skip_ch = [c0]
    prev = c0
    for i, ch in enumerate(chans):
        attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        for j in range(cfg.layers_per_block):
            rules += resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch, temb)
            if attn:
                rules += transformer(f"down_blocks.{i}.attentions.{j}", ch, i)
            skip_ch.append(ch)
        if i < n - 1:
            rules += conv(f"down_blocks.{i}.downsamplers.0.conv", ch, ch)
            skip_ch.append(ch)
        prev = ch
    rules += resnet("mid_block.resnets.0", chans[-1], chans[-1], temb)
    rules += transformer("mid_block.attentions.0", chans[-1], n - 1)
    rules += resnet("mid_block.resnets.1", chans[-1], chans[-1], temb)
    prev = chans[-1]
    for i, ch in enumerate(chans[::-1]):
        block = n - 1 - i
        attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        for j in range(cfg.layers_per_block + 1):
            rules += resnet(f"up_blocks.{i}.resnets.{j}", prev + skip_ch.pop(), ch, temb)
            prev = ch
            if attn:
                rules += transformer(f"up_blocks.{i}.attentions.{j}", ch, block)
        if i < n - 1:
            rules += conv(f"up_blocks.{i}.upsamplers.0.conv", ch, ch)
    return rules + norm("conv_norm_out", c0) + conv("conv_out", c0, cfg.out_channels)


def _vae_mid(prefix: str, ch: int, attention: bool) -> list[Rule]:
    rules = resnet(f"{prefix}.resnets.0", ch, ch, None) + resnet(f"{prefix}.resnets.1", ch, ch, None)
    if attention:
        a = f"{prefix}.attentions.0"
        rules += norm(f"{a}.group_norm", ch)
        # diffusers < 0.14 named these query/key/value/proj_attn (and single-file exports as 1x1 convs).
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            rules += linear(f"{a}.{new}", ch, ch, aliases=(f"{a}.{old}",))
    return rules


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    chans = cfg.block_out_channels
    n, latent = len(chans), cfg.latent_channels
    rules = conv("encoder.conv_in", cfg.in_channels, chans[0])
    prev = chans[0]
    for i, ch in enumerate(chans):
        for j in range(cfg.layers_per_block):
            rules += resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch, None)
        if i < n - 1:
            rules += conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch, ch)
        prev = ch
    rules += _vae_mid("encoder.mid_block", chans[-1], cfg.mid_block_add_attention)
    rules += norm("encoder.conv_norm_out", chans[-1]) + conv("encoder.conv_out", chans[-1], 2 * latent)

    rules += conv("decoder.conv_in", latent, chans[-1])
    rules += _vae_mid("decoder.mid_block", chans[-1], cfg.mid_block_add_attention)
    prev = chans[-1]
    for i, ch in enumerate(chans[::-1]):
        for j in range(cfg.layers_per_block + 1):
            rules += resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch, None)
        if i < n - 1:
            rules += conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", ch, ch)
        prev = ch
    rules += norm("decoder.conv_norm_out", chans[0]) + conv("decoder.conv_out", chans[0], cfg.out_channels)
    if cfg.use_quant_conv:
        rules += conv("quant_conv", 2 * latent, 2 * latent, 1)
    if cfg.use_post_quant_conv:
        rules += conv("post_quant_conv", latent, latent, 1)
    return rules


def clip_rules(cfg: CLIPConfig) -> list[Rule]:
    d = cfg.hidden_size
    rules = embedding("embeddings.token_embedding", ("token_embedding",), cfg.vocab_size, d)
    rules += embedding("embeddings.position_embedding", ("position_embedding",), cfg.max_positions, d)
    for i in range(cfg.num_layers):
        rules += transformer_layer(f"encoder.layers.{i}", (f"layers_{i}",), d, cfg.intermediate_size)
    return rules + norm("final_layer_norm", d, ("final_layer_norm",))


def transformer_layer(key: str, path: tuple[str, ...], dim: int, hidden: int) -> list[Rule]:
    """A transformers CLIP encoder layer (text or vision): pre-norm self-attention and MLP."""
    rules: list[Rule] = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"{key}.self_attn.{name}", dim, dim, path + ("self_attn", name))
    rules += norm(f"{key}.layer_norm1", dim, path + ("layer_norm1",))
    rules += norm(f"{key}.layer_norm2", dim, path + ("layer_norm2",))
    return rules + linear(f"{key}.mlp.fc1", dim, hidden, path + ("mlp_fc1",)) + linear(
        f"{key}.mlp.fc2", hidden, dim, path + ("mlp_fc2",))


def abstract(rules: list[Rule], dtype: Any = np.float32) -> dict:
    """The params pytree a rule table describes, as `jax.ShapeDtypeStruct` leaves of `dtype` (what
    `jax.eval_shape(module.init)` gives for the module the table was written for)."""
    return traverse_util.unflatten_dict({r.path: jax.ShapeDtypeStruct(r.shape, dtype) for r in rules})


# Checkpoint entries that are buffers, not parameters: present in some files, never needed.
CLIP_IGNORED = (re.compile(r"^embeddings\.position_ids$"),)
# transformers < 5.6 wrote every CLIP text key under `text_model.`; 5.6 and later write none.
CLIP_PREFIXES = ("text_model.",)


class Renamed(Mapping):
    """A read-only view of a checkpoint mapping under other key names (tensors are not touched)."""

    def __init__(self, state: Mapping[str, np.ndarray], names: dict[str, str]):
        self._state, self._names = state, names  # new name -> name in `state`

    def __getitem__(self, key: str) -> np.ndarray:
        return self._state[self._names[key]]

    def read(self, key: str, scratch: io.Scratch | None = None) -> np.ndarray:
        """`io.LazyTensors.read` where the underlying mapping has it, else `self[key]`."""
        read = getattr(self._state, "read", None)
        return self[key] if read is None else read(self._names[key], scratch)

    def spec(self, key: str) -> tuple[tuple[int, ...], str, str | None]:
        return _spec(self._state, self._names[key])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def strip_prefixes(state: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> Mapping[str, np.ndarray]:
    prefixes = tuple(prefixes)
    names = {}
    for key in state:
        new = next((key[len(p):] for p in prefixes if key.startswith(p)), key)
        names[new] = key
    return Renamed(state, names)


def to_params(state: Mapping[str, np.ndarray], rules: list[Rule], abstract: Any, *, source: str = "checkpoint",
              ignored: Iterable[re.Pattern] = (), dtype: Any = np.float32, finalize: Callable | None = None) -> dict:
    """Checkpoint tensors -> params pytree of `dtype` shaped like `abstract` (from `jax.eval_shape(model.init)`).

    Names, dtypes and shapes are all checked before any tensor is read (from the headers when `state` has a
    `spec(key)`, see `io.LazyTensors`); then tensors are looked up one at a time, checked to be finite, put in
    the params layout and dtype (`relayout`) and passed through `finalize` (e.g. `jax.device_put`, which adopts
    the aligned host array on CPU) right away, so only a few host copies are alive at once.
    """
    expected = {path: leaf for path, leaf in traverse_util.flatten_dict(abstract).items()}
    covered = {r.path for r in rules}
    if covered != set(expected):
        # The rule table and the module disagree: an sdjax bug, not a bad file.
        missing = sorted("/".join(p) for p in set(expected) - covered)[:5]
        extra = sorted("/".join(p) for p in covered - set(expected))[:5]
        raise AssertionError(f"rule table out of step with the module: unruled {missing}, unknown {extra}")

    names = _match(state, rules, source, ignored)
    for rule, name in names:
        _check_spec(state, rule, name, tuple(expected[rule.path].shape), source)

    dtype = np.dtype(dtype)
    read = getattr(state, "read", None)  # `io.LazyTensors.read`: into a thread's reusable scratch memory
    local = threading.local()

    def convert(item: tuple[Rule, str]) -> Any:
        rule, name = item
        shape, file_dtype, where = _spec(state, name)
        transform = rule.transform
        if transform == "linear" and len(shape) == 4 and name in rule.aliases:
            transform = "conv1x1_linear"
        scratch = None
        if read is not None and (transform != "copy" or io.ST_DTYPES[file_dtype] != dtype):
            # the tensor read is only the source of a cast or transpose: read it into reused memory
            scratch = local.__dict__.setdefault("scratch", io.Scratch())
            tensor = read(name, scratch)
        else:
            tensor = np.asarray(state[name])
        _check_finite(tensor, name, where or source)
        value = relayout(tensor, transform, dtype, scratch)
        return value if finalize is None else finalize(value)

    # Reading (positional reads of the file), the finiteness check, the cast and the layout change (torch's OIHW /
    # [out, in] to HWIO / [in, out]) run in numpy code that releases the GIL, so a few threads use the machine's
    # cores; at most `workers` host copies are alive at once, and errors still come in key order (map yields in
    # order).
    workers = max(1, min(LOAD_THREADS, len(names)))
    if workers == 1:
        values = [convert(item) for item in names]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sdjax-load") as pool:
            values = list(pool.map(convert, names))
    flat = {rule.path: value for (rule, _), value in zip(names, values, strict=True)}
    return traverse_util.unflatten_dict(flat)


def check_state(state: Mapping[str, Any], rules: list[Rule], abstract: Any, *, source: str = "checkpoint",
                ignored: Iterable[re.Pattern] = ()) -> None:
    """`to_params`' checks without reading a tensor: every rule's key present, no key unclaimed (unless
    `ignored`), every tensor floating point and of the shape the architecture needs (from the headers when
    `state` has a `spec(key)`). Raises CheckpointError naming the file and key."""
    expected = {path: leaf for path, leaf in traverse_util.flatten_dict(abstract).items()}
    for rule, name in _match(state, rules, source, ignored):
        _check_spec(state, rule, name, tuple(expected[rule.path].shape), source)


def _match(state: Mapping[str, Any], rules: list[Rule], source: str, ignored: Iterable[re.Pattern]
           ) -> list[tuple[Rule, str]]:
    """(rule, the checkpoint key it reads) for every rule; raises naming missing and unexpected keys."""
    remaining = set(state)
    names, absent = [], []
    for rule in rules:
        name = next((k for k in (rule.key, *rule.aliases) if k in remaining), None)
        if name is None:
            absent.append(rule.key)
            continue
        remaining.discard(name)
        names.append((rule, name))
    leftover = sorted(k for k in remaining if not any(p.search(k) for p in ignored))
    if absent or leftover:
        parts = []
        if absent:
            parts.append(f"missing key(s) {_few(absent)}")
        if leftover:
            parts.append(f"unexpected key(s) {_few(leftover)} (not part of the architecture in config.json)")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    return names


def _spec(state: Mapping[str, Any], key: str) -> tuple[tuple[int, ...], str, str | None]:
    """(shape, safetensors dtype name, file or None) of a tensor, without reading it where `state` can tell."""
    spec = getattr(state, "spec", None)
    if spec is not None:
        shape, dtype, path = spec(key)
        return tuple(shape), dtype, None if path is None else str(path)
    value = state[key]  # an array already in memory
    return tuple(np.shape(value)), io.dtype_name(getattr(value, "dtype", np.asarray(value).dtype)), None


def _check_spec(state: Mapping[str, Any], rule: Rule, name: str, want: tuple[int, ...], source: str) -> None:
    """A parameter's tensor is floating point and has the shape the architecture needs."""
    shape, dtype, path = _spec(state, name)
    where = path or source
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: '{name}' has dtype {dtype}, but it is a floating-point parameter "
                              f"(allowed: {', '.join(FLOAT_DTYPES)})")
    need = _checkpoint_shape(rule, want)
    old_conv = rule.transform == "linear" and name in rule.aliases and shape == need + (1, 1)  # see vae_rules
    if shape != need and not old_conv:
        raise CheckpointError(f"{where}: '{name}' has shape {shape}, but the config's architecture needs {need}")


def relayout(tensor: np.ndarray, transform: str, dtype: Any, scratch: io.Scratch | None = None) -> np.ndarray:
    """A checkpoint tensor -> its params layout (`_TO_PYTREE[transform]`) as a new C-contiguous, 64-byte aligned
    array of `dtype` (`io.empty_aligned`: `jax.device_put` adopts it on CPU without a copy). A tensor already in
    that form (e.g. an fp32 bias read by `io.LazyTensors`) is returned as is. scratch: where a cast that is then
    transposed goes (its slot "cast"); the result never lives there."""
    dtype = np.dtype(dtype)
    if tensor.dtype not in (np.float32, dtype):  # half precision (and f64) through float32: fp16 -> bf16 rounds once
        tensor = tensor.astype(np.float32)
    if tensor.dtype != dtype:  # cast before the layout change, which then moves fewer bytes for 16-bit dtypes
        transposed = transform != "copy"
        cast = (scratch.array("cast", tensor.shape, dtype) if scratch is not None and transposed
                else io.empty_aligned(tensor.shape, dtype))
        cast[...] = tensor
        tensor = cast
    view = _TO_PYTREE[transform](tensor)
    if view is tensor and io.is_aligned(tensor):
        return tensor
    out = io.empty_aligned(view.shape, dtype)
    # The layout change is a transpose. numpy copies a transposed view element by element with a stride of a
    # whole source row (1.3 GB/s here); copying it in slabs of a few output columns, whose source rows stay in
    # the cache, runs at 3-6 GB/s. Unsigned ints of the same width copy the bits faster than bf16's casting loop.
    raw = np.dtype(f"u{dtype.itemsize}")
    dst, src = out.view(raw), view.view(raw)
    if view.ndim < 2 or view.flags.c_contiguous or view.size == 0:
        dst[...] = src
        return out
    row_bytes = dtype.itemsize * (view.size // view.shape[-1])  # bytes of source read per output column
    slab = max(8, min(64, _SLAB_BYTES // row_bytes))
    for start in range(0, view.shape[-1], slab):
        dst[..., start : start + slab] = src[..., start : start + slab]
    return out


# Source bytes per slab in `relayout` (measured on a 2-core EPYC: 8-64 columns of the SD1.5 weights fit the L2).
_SLAB_BYTES = 256 * 1024


def _check_finite(tensor: np.ndarray, name: str, where: str) -> None:
    """Weights hold no NaN or inf (one pass over the tensor, cheap next to reading it)."""
    finite = np.isfinite(tensor)
    if not finite.all():
        bad = finite.size - int(np.count_nonzero(finite))
        raise CheckpointError(f"{where}: '{name}' holds {bad} non-finite value(s) (NaN or inf) of {tensor.size}; "
                              "weights must be finite")


def from_params(params: Any, rules: list[Rule]) -> dict[str, np.ndarray]:
    """Params pytree -> checkpoint tensors under their canonical keys (float arrays keep their dtype)."""
    flat = traverse_util.flatten_dict(params)
    return {r.key: np.ascontiguousarray(_TO_CHECKPOINT[r.transform](np.asarray(flat[r.path]))) for r in rules}


def _checkpoint_shape(rule: Rule, pytree_shape: tuple[int, ...]) -> tuple[int, ...]:
    # a zero-strided view: transposes its shape without allocating the tensor
    return tuple(_TO_CHECKPOINT[rule.transform](np.broadcast_to(np.int8(0), pytree_shape)).shape)


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or the jnp/np dtype) -> jnp dtype; anything else raises."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return DTYPES[dtype]
    else:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = None
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
