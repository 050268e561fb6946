"""Blocks shared by the CLIP text encoder, the UNet and the VAE, and the one attention function.

Everything is NHWC. Submodule names follow the diffusers/transformers checkpoint names with `.N` written
as `_N` (e.g. `to_out.0` -> `to_out_0`), so `convert.py` can state its rule table plainly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sdjax import onednn, parallel

Dtype = Any


IMPLEMENTATIONS = ("xla", "blocked", "cudnn", "pallas_tpu", "onednn")
PLATFORMS = ("cpu", "gpu", "tpu")

# Blocked attention: keys per block of the online softmax, and the most bytes of float32 scores one step of it
# may hold (queries are chunked beyond that, so memory stays flat in batch size and image size).
KEY_BLOCK = 512
SCORE_BUDGET_BYTES = 256 << 20
# Below this many keys the plain XLA form (one score matrix) is as fast and has nothing to win by blocking.
BLOCKED_MIN_KEYS = 1024
# The Pallas TPU flash-attention kernel tiles sequences by 128 and takes head_dim <= 128 or a multiple of 128.
PALLAS_TILE = 128


CONV_KERNELS = ("xla", "onednn")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention kernel each layer runs (and, on CPU, which convolution and dot), decided from the devices
    the program is compiled for.

    Resolved once at the edge (`for_mesh`, when a pipeline or a train step is built) and carried by the models
    as a field, so tracing reads nothing from the environment or `jax.default_backend()`: compiling for
    compile-only TPU/GPU devices from a CPU host picks the target's kernels, and jit's cache sees every input.

    platform: "cpu", "gpu" or "tpu" (of the target devices).
    implementation: one of IMPLEMENTATIONS for every layer (an override), or None to choose per layer (`choose`).
    mesh, axis: the data-parallel mesh and its batch axis. A kernel XLA cannot partition (Pallas/Mosaic, oneDNN)
        runs per shard under `shard_map` over that axis; None runs it unpartitioned (one device).
    conv: one of CONV_KERNELS for every convolution (an override), or None to choose per layer (`choose_conv`).
    onednn: whether the oneDNN kernels (convolution and attention) are loaded for this program (CPU only;
        `onednn.load`, done by `for_mesh`).
    """

    platform: str = "cpu"
    implementation: str | None = None
    mesh: Mesh | None = None
    axis: str = "data"
    conv: str | None = None
    onednn: bool = False

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"attention platform {self.platform!r} is not one of {PLATFORMS}")
        if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {self.implementation!r} is not one of "
                             f"{', '.join(IMPLEMENTATIONS)} (or None: chosen per layer for the devices)")
        check_conv(self.conv)
        if (self.conv == "onednn" or self.onednn) and self.platform != "cpu":
            raise ValueError(f"conv='onednn' is a CPU kernel; these devices are {self.platform!r} (use 'xla')")
        if self.conv == "onednn" and not self.onednn:
            raise ValueError("conv='onednn' needs the kernel loaded (AttentionConfig.for_mesh does it)")
        if self.implementation == "onednn" and self.platform != "cpu":
            raise ValueError(f"attention 'onednn' is a CPU kernel; these devices are {self.platform!r}")

    @classmethod
    def for_mesh(cls, mesh: Mesh, implementation: str | None = None, axis: str = "data", conv: str | None = None,
                 dtype: Any = None) -> AttentionConfig:
        """The config for programs running on `mesh` (its devices' platform; compile-only devices included) with
        models of `dtype`. On CPU, the oneDNN kernels are loaded (built on first use, `onednn.load`) when
        `conv` or `implementation` asks for them (an error saying what is missing if they cannot be) or when
        `conv` is None and the models are bfloat16 or float32 (where they cannot be: XLA's convolution and
        attention, with a warning for bfloat16)."""
        platform = parallel.platform(mesh)
        check_conv(conv)
        loaded = False
        dtype = jnp.dtype(dtype or jnp.float32)
        explicit = conv == "onednn" or implementation == "onednn"
        if platform == "cpu" and (explicit or (conv is None and dtype in onednn.DTYPES)):
            if explicit:
                onednn.load()
                loaded = True
            else:
                why = onednn.reason_unavailable()
                loaded = why is None
                if why is not None and dtype == jnp.bfloat16:
                    warnings.warn(f"bfloat16 convolutions on CPU run at float32 speed without the oneDNN kernel: "
                                  f"{why}", stacklevel=3)
        return cls(platform, implementation, mesh, axis, conv, loaded)

    def choose_conv(self, dtype: Any) -> str:
        """The convolution kernel a layer computing in `dtype` runs: the override, else oneDNN's for bfloat16 and
        float32 where it is loaded (XLA:CPU converts bf16 convolutions to float32; oneDNN runs them in bf16, ~3x
        faster, and its float32 kernels are 1.1-3x XLA's), else XLA's (float16: oneDNN has no fast path on CPUs
        without AVX512-FP16)."""
        if self.conv is not None:
            return self.conv
        return "onednn" if self.onednn and jnp.dtype(dtype) in onednn.DTYPES else "xla"

    def choose(self, q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype: Any) -> str:
        """The implementation a layer with q [B, Lq, H, D], k [B, Lk, H, D] of `dtype` runs (a pure function
        of this config and the shapes)."""
        b, lq, _, d = q_shape
        lk = k_shape[1]
        long = lk >= BLOCKED_MIN_KEYS
        impl = self.implementation
        if impl is None:
            if self.platform == "gpu":
                # cuDNN's fused flash attention: half precision, head_dim a multiple of 8 up to 128 (SD: 40..160).
                ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
                impl = "cudnn" if ok else ("blocked" if long else "xla")
            elif self.platform == "tpu":
                impl = "pallas_tpu" if long else "xla"
            else:
                # oneDNN's kernel (bf16 1.8x, fp32 1.4x the blocked form at 4096 tokens) where it is loaded
                impl = "onednn" if long and self.onednn else ("blocked" if long else "xla")
        if impl == "pallas_tpu" and (lq % PALLAS_TILE or lk % PALLAS_TILE or b % self._shards()):
            impl = "blocked"  # lengths the kernel cannot tile, or a batch that does not split over the mesh
        if impl == "onednn" and not (self.onednn and jnp.dtype(dtype) in onednn.DTYPES and b % self._shards() == 0):
            impl = "blocked" if long else "xla"  # not loaded, float16, or a batch that does not split over the mesh
        return impl

    def _shards(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[self.axis]


def check_conv(conv: str | None) -> str | None:
    if conv is not None and conv not in CONV_KERNELS:
        raise ValueError(f"conv={conv!r} is not one of {', '.join(CONV_KERNELS)} (or None: oneDNN's for bf16 "
                         "and fp32 on CPU where it is installed, else XLA's)")
    return conv


# While `record_attention()` is active, each traced attention call appends what it chose (for reports such as
# `sdjax compile-check`); nothing reads it back into the computation.
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("sdjax_attention_record", default=None)


@contextlib.contextmanager
def record_attention():
    """Collects {"layer", "implementation", "q", "k", "causal"} for every attention traced inside the block."""
    log: list[dict[str, Any]] = []
    token = _RECORD.set(log)
    try:
        yield log
    finally:
        _RECORD.reset(token)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              config: AttentionConfig = AttentionConfig(), implementation: str | None = None,
              layer: str = "") -> jax.Array:
    """Scaled dot-product attention; every attention in sdjax goes through here.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D]. Scores and softmax are computed in float32
    whatever the input dtype (what the reference's upcast paths do); the result has q's dtype. `causal` masks
    key j > query i (top-left aligned, as CLIP's mask).

    config: the target's choice (`AttentionConfig.choose`); `implementation` overrides it for this call:
      "xla": one [B, H, Lq, Lk] score matrix (the plain form; the reference the others are tested against),
      "blocked": flash-attention style online softmax over key blocks (`lax.scan`), queries chunked so the
          live scores stay under SCORE_BUDGET_BYTES: memory O(Lq * KEY_BLOCK), not O(Lq * Lk),
      "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, float16/bfloat16),
      "pallas_tpu": the Pallas TPU flash-attention kernel, per shard of config.mesh (lengths multiple of 128,
          else "blocked"; head_dim > 128 zero-padded to a multiple of 128),
      "onednn": oneDNN matmuls with a float32 softmax per block of queries (`onednn.attention`, CPU, bfloat16
          or float32, not causal; else "blocked"), per shard of config.mesh; gradients by the blocked form.
    layer: the calling module's path, for `record_attention`.
    """
    if implementation is not None:
        config = dataclasses.replace(config, implementation=implementation)
    impl = config.choose(q.shape, k.shape, q.dtype)
    if impl == "cudnn":
        try:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            # a shape/dtype/version this cuDNN build does not take (checked while tracing): the portable path
            impl = "blocked" if k.shape[1] >= BLOCKED_MIN_KEYS else "xla"
    if impl == "xla":
        out = _attention_xla(q, k, v, causal)
    elif impl == "blocked":
        out = _attention_blocked(q, k, v, causal)
    elif impl == "pallas_tpu":
        out = _attention_pallas_tpu(q, k, v, causal, config)
    elif impl == "onednn" and causal:
        impl = "blocked"
        out = _attention_blocked(q, k, v, causal)
    elif impl == "onednn":
        out = _attention_onednn(q, k, v, config.mesh, config.axis)
    log = _RECORD.get()
    if log is not None:
        log.append({"layer": layer, "implementation": impl, "q": list(q.shape), "k": list(k.shape),
                    "causal": causal})
    return out


def _attention_pallas_tpu(q, k, v, causal, config: AttentionConfig):
    """The Pallas TPU flash-attention kernel. A Mosaic kernel cannot be partitioned by XLA, so on a mesh it runs
    per batch shard (`shard_map` over config.axis; attention is independent per example). head_dim above 128
    that is not a multiple of 128 (SD's 160 in the 1280-channel blocks) is zero-padded: zero columns add
    nothing to q.k and give zero output columns, sliced off, with the scale of the true head_dim."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    d = q.shape[-1]
    pad = (-d) % PALLAS_TILE if d > PALLAS_TILE else 0
    scale = float(1.0 / np.sqrt(d))

    def kernel(q, k, v):  # [b, L, H, D] per shard
        qt, kt, vt = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3) for x in (q, k, v))
        out = tpu_flash.flash_attention(qt, kt, vt, causal=causal, sm_scale=scale)  # [b, H, Lq, D + pad]
        return out.transpose(0, 2, 1, 3)[..., :d].astype(q.dtype)

    if config.mesh is None:
        return kernel(q, k, v)
    spec = P(config.axis)
    return jax.shard_map(kernel, mesh=config.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_onednn(q, k, v, mesh, axis):
    return onednn.attention(q, k, v, mesh, axis)


def _attention_onednn_fwd(q, k, v, mesh, axis):
    return _attention_onednn(q, k, v, mesh, axis), (q, k, v)


def _attention_onednn_bwd(mesh, axis, saved, g):
    """The gradient of the blocked form (recomputed: the kernel keeps no softmax statistics), which the kernel's
    forward equals up to summation order."""
    _, vjp = jax.vjp(lambda q, k, v: _attention_blocked(q, k, v, False), *saved)
    return vjp(g)


_attention_onednn.defvjp(_attention_onednn_fwd, _attention_onednn_bwd)


def _attention_xla(q, k, v, causal):
    b, lq, h, d = q.shape
    scale = 1.0 / np.sqrt(d).astype(np.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if causal:
        lk = k.shape[1]
        allowed = jnp.tril(jnp.ones((lq, lk), dtype=bool))  # [Lq, Lk]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, H, Lq, Lk]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _attention_blocked(q, k, v, causal):
    """Online-softmax attention (FlashAttention's recurrence) in plain JAX.

    [B, H, L, D] layout; keys padded to a multiple of the block and masked; the running max, the running sum
    and the unnormalised output are the carry of a `lax.scan` over key blocks, normalised once at the end.
    When B*H*Lq*block float32 scores exceed SCORE_BUDGET_BYTES, queries go in chunks through `lax.map`.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    out_dtype = q.dtype
    scale = np.float32(1.0 / np.sqrt(d))
    # Scores in float32: upcast q and k (exact for half-precision inputs; fp32 accumulation).
    qt = q.astype(jnp.float32).transpose(0, 2, 1, 3) * scale  # [B, H, Lq, D]
    kt = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, Lk, D]
    vt = v.transpose(0, 2, 1, 3)  # [B, H, Lk, D]
    blk = min(KEY_BLOCK, lk)
    nk = -(-lk // blk)
    pad = nk * blk - lk
    if pad:
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, pad), (0, 0)))
    kb = kt.reshape(b, h, nk, blk, d).transpose(2, 0, 1, 3, 4)  # [nk, B, H, blk, D]
    vb = vt.reshape(b, h, nk, blk, d).transpose(2, 0, 1, 3, 4)
    neg = jnp.finfo(jnp.float32).min

    def one_chunk(qc, q0):
        """qc [B, H, Cq, D] (queries q0 .. q0+Cq-1) against every key block -> [B, H, Cq, D] float32."""
        cq = qc.shape[2]
        rows = q0 + jnp.arange(cq)[:, None]  # [Cq, 1]

        def step(carry, xs):
            m, l, o = carry
            kj, vj, j = xs
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, kj)  # [B, H, Cq, blk] float32
            if pad or causal:
                cols = j * blk + jnp.arange(blk)[None, :]  # [1, blk]
                ok = cols < lk
                if causal:
                    ok = ok & (cols <= rows)
                s = jnp.where(ok, s, neg)
            m_new = jnp.maximum(m, s.max(-1, keepdims=True))
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(-1, keepdims=True)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return (m_new, l, o * alpha + pv), None

        init = (jnp.full((b, h, cq, 1), neg, jnp.float32), jnp.zeros((b, h, cq, 1), jnp.float32),
                jnp.zeros((b, h, cq, d), jnp.float32))
        if nk == 1:
            (m, l, o), _ = step(init, (kb[0], vb[0], 0))
        else:
            (m, l, o), _ = lax.scan(step, init, (kb, vb, jnp.arange(nk)))
        return o / l

    per_query = b * h * blk * 4
    cq = lq if lq * per_query <= SCORE_BUDGET_BYTES else max(1, SCORE_BUDGET_BYTES // per_query)
    if cq >= lq:
        out = one_chunk(qt, 0)
    else:
        cq = _largest_divisor_at_most(lq, cq)
        nq = lq // cq
        qc = qt.reshape(b, h, nq, cq, d).transpose(2, 0, 1, 3, 4)  # [nq, B, H, cq, D]
        out = lax.map(lambda xs: one_chunk(xs[0], xs[1] * cq), (qc, jnp.arange(nq)))
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, lq, d)
    return out.transpose(0, 2, 1, 3).astype(out_dtype)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for c in range(min(n, cap), 0, -1):
        if n % c == 0:
            return c
    return 1


def group_norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - mean^2.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding=None,
         config: AttentionConfig = AttentionConfig()) -> nn.Module:
    """nn.Conv (NHWC, HWIO kernel named as the checkpoint's) running `config.choose_conv(dtype)`'s kernel."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    if config.choose_conv(dtype) == "onednn":
        return OnednnConv(features, kernel, stride, pad, dtype, config, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class OnednnConv(nn.Module):
    """nn.Conv's parameters (kernel [K, K, C, O], lecun-normal; bias [O], zeros) and result, computed by the oneDNN
    kernel with the bias added inside it (`onednn.conv2d`): XLA then has one result buffer to hand to every consumer,
    where a bias added after the custom call was fused into each consumer as a copy of its own (see
    csrc/onednn_conv.cc)."""

    features: int
    kernel: int
    stride: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    dtype: Dtype
    config: AttentionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H', W', O]
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return onednn.conv2d(x, kernel, bias, (self.stride, self.stride), self.padding, self.config.mesh,
                             self.config.axis)


def _dot_f32_accumulate(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general of half-precision operands accumulated in float32 and rounded once to their dtype (what
    cuBLAS, the TPU and torch's CPU kernels do). On XLA:CPU this form reaches the AVX512-BF16 dot kernels: a
    2048^3 bf16 matmul takes 20 ms this way and 54 ms as a plain bf16 dot (torch: 21-36 ms)."""
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)


def dense(features: int, name: str, dtype: Dtype, config: AttentionConfig = AttentionConfig(),
          use_bias: bool = True) -> nn.Dense:
    """nn.Dense; on CPU, bfloat16 dots accumulate in float32 (`_dot_f32_accumulate`), elsewhere XLA's default."""
    accumulate = config.platform == "cpu" and jnp.dtype(dtype) == jnp.bfloat16
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    dot_general=_dot_f32_accumulate if accumulate else None)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode="nearest")` to `size` (source index floor(dst * in / out)). x: [B, H, W, C]."""
    _, h, w, _ = x.shape
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)
    cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)
    return x[:, rows][:, :, cols]


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` (default time-scale-shift, SiLU); `temb=None` for the VAE's blocks."""

    out_channels: int
    groups: int
    eps: float
    output_scale: float = 1.0
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()  # the kernels (convolutions, dots)

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        d, k = self.dtype, self.attention
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", d)(x))
        h = conv(self.out_channels, 3, "conv1", d, config=k)(h)
        if temb is not None:
            t = dense(self.out_channels, "time_emb_proj", d, k)(nn.silu(temb))  # [B, C]
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", d)(h))
        h = conv(self.out_channels, 3, "conv2", d, config=k)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", d, config=k)(x)
        out = x + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=0 pads only bottom/right by one, as diffusers does for the VAE."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=pad, config=self.attention)(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size` when the skip connection is odd-sized), then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        x = resize_nearest(x, size or (2 * h, 2 * w))
        return conv(self.channels, 3, "conv", self.dtype, config=self.attention)(x)


class Attention(nn.Module):
    """diffusers `Attention` as the UNet uses it: q from x, k/v from `context` (or x), no q/k/v bias."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, lq, c = x.shape  # [B, Lq, C]
        context = x if context is None else context  # [B, Lk, Cc]
        inner = self.heads * self.head_dim

        def proj(name, y):
            y = dense(inner, name, self.dtype, self.attention, use_bias=False)(y)
            return y.reshape(b, y.shape[1], self.heads, self.head_dim)  # [B, L, H, D]

        out = attention(proj("to_q", x), proj("to_k", context), proj("to_v", context), config=self.attention,
                        layer="/".join(self.path))
        out = out.reshape(b, lq, inner)
        return dense(c, "to_out_0", self.dtype, self.attention)(out)


class GEGLU(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(dense(2 * self.features, "proj", self.dtype, self.attention)(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, self.dtype, self.attention, name="net_0")(x)
        return dense(self.dim, "net_2", self.dtype, self.attention)(h)


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        d, a = self.dtype, self.attention
        x = x + Attention(self.heads, self.head_dim, d, a, name="attn1")(layer_norm(1e-5, "norm1", d)(x))
        x = x + Attention(self.heads, self.head_dim, d, a, name="attn2")(layer_norm(1e-5, "norm2", d)(x), context)
        return x + FeedForward(dim, dtype=d, attention=a, name="ff")(layer_norm(1e-5, "norm3", d)(x))


class SpatialTransformer(nn.Module):
    """diffusers `Transformer2DModel` (continuous input): GroupNorm, project in, blocks, project out, residual."""

    heads: int
    head_dim: int
    num_layers: int
    groups: int
    linear_projection: bool
    dtype: Dtype = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        d = self.dtype
        y = group_norm(self.groups, 1e-6, "norm", d)(x)
        if self.linear_projection:
            y = dense(inner, "proj_in", d, self.attention)(y.reshape(b, h * w, c))  # [B, HW, inner]
        else:
            y = conv(inner, 1, "proj_in", d, config=self.attention)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            block = TransformerBlock(self.heads, self.head_dim, d, self.attention, name=f"transformer_blocks_{i}")
            y = block(y, context)
        if self.linear_projection:
            y = dense(c, "proj_out", d, self.attention)(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", d, config=self.attention)(y.reshape(b, h, w, inner))
        return x + y
