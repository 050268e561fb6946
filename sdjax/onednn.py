"""Convolutions and attention on CPU through oneDNN (XLA FFI custom calls): built, loaded and called from here.

Why a compiled kernel: XLA:CPU in jax 0.10 runs a bfloat16 convolution by converting it to float32 (bit-identical
results at float32 speed), so sdjax in bf16 was slower than its own float32, while oneDNN, the library torch's CPU
convolutions use, has AVX512-BF16/AMX kernels: a 3x3 320-channel conv on 64x64 latents (CFG batch 2) takes 44 ms
in XLA and 15 ms here, as in torch (measured on a 2-core EPYC with AVX512-BF16). Its float32 kernels beat XLA's
too (31 vs 42 ms), so both dtypes use it by default where it is installed (`layers.AttentionConfig.choose_conv`).
Attention likewise: XLA's batched dots over a head_dim contraction of 40 ran SD's 4096-token self-attention at a
fifth of the FLOP rate of its other layers; oneDNN's matmuls with a float32 softmax per block of queries take
0.17 s where XLA's blocked form takes 0.31 s (bf16; fp32 0.21 vs 0.30 s), chosen by `AttentionConfig.choose`.

The kernels (csrc/*.cc) are compiled on first use with the machine's C++ compiler against the oneDNN that the
`cpu` extra installs (`pip install -e ".[cpu]"`: oneDNN's own wheels, x86-64 Linux) and jaxlib's FFI headers,
into a cache folder keyed by a hash of everything they were built from; nothing happens at import. Gradients
(`jax.custom_vjp`) run oneDNN's backward-data kernel for a convolution's input and XLA's convolution for its
weights; attention's gradient is the blocked form's (`layers`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "onednn_conv.cc", CSRC / "onednn_attention.cc")  # compiled into one library
HEADERS = (CSRC / "onednn_common.h",)
DEFAULT_CACHE = Path.home() / ".cache" / "sdjax" / "kernels"
# FFI target name per (direction, dtype), and the handler symbol the library exports for it.
TARGETS = {("forward", jnp.dtype(jnp.bfloat16)): ("sdjax_onednn_conv_bf16", "SdjaxOnednnConvBF16"),
           ("forward", jnp.dtype(jnp.float32)): ("sdjax_onednn_conv_f32", "SdjaxOnednnConvF32"),
           ("forward_bias", jnp.dtype(jnp.bfloat16)): ("sdjax_onednn_conv_bias_bf16", "SdjaxOnednnConvBiasBF16"),
           ("forward_bias", jnp.dtype(jnp.float32)): ("sdjax_onednn_conv_bias_f32", "SdjaxOnednnConvBiasF32"),
           ("backward_data", jnp.dtype(jnp.bfloat16)): ("sdjax_onednn_conv_bwd_data_bf16",
                                                        "SdjaxOnednnConvBackwardDataBF16"),
           ("backward_data", jnp.dtype(jnp.float32)): ("sdjax_onednn_conv_bwd_data_f32",
                                                       "SdjaxOnednnConvBackwardDataF32"),
           ("attention", jnp.dtype(jnp.bfloat16)): ("sdjax_onednn_attention_bf16", "SdjaxOnednnAttentionBF16"),
           ("attention", jnp.dtype(jnp.float32)): ("sdjax_onednn_attention_f32", "SdjaxOnednnAttentionF32")}
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
INSTALL_HINT = 'pip install -e ".[cpu]" (oneDNN\'s wheels, x86-64 Linux) and a C++ compiler (g++)'
# flax.linen.Conv's dimension numbers for NHWC inputs and HWIO kernels: the only layout the kernel takes.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


class OnednnUnavailable(RuntimeError):
    """The oneDNN kernel cannot be built or loaded here (the message says what is missing)."""


def _find_onednn() -> tuple[Path, Path]:
    """(include folder, lib folder) of an installed oneDNN: the `cpu` extra's wheels put them under the
    environment's prefix; a system install under /usr or /usr/local also works."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, "/usr/local", "/usr"]):
        inc, lib = Path(prefix) / "include", Path(prefix) / "lib"
        if (inc / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and any(lib.glob("libdnnl.so*")):
            return inc, lib
    raise OnednnUnavailable(f"oneDNN (headers and libdnnl.so) is not installed: {INSTALL_HINT}")


def build(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Compiles the kernel library (once per source, jaxlib and oneDNN; later calls find the file) -> its path."""
    import jaxlib

    if sys.platform != "linux":
        raise OnednnUnavailable(f"the oneDNN kernel is built for Linux only (this is {sys.platform})")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OnednnUnavailable(f"no C++ compiler (g++ or c++) on PATH: {INSTALL_HINT}")
    inc, lib = _find_onednn()
    libdnnl = sorted(lib.glob("libdnnl.so*"))[-1]
    digest = hashlib.sha256()
    # -march=native: the library is built on the machine that runs it, so the key holds the CPU's features too
    # (a cache folder shared between machines gets one library per kind of CPU).
    for part in (*(src.read_bytes() for src in SOURCES + HEADERS), jaxlib.__version__.encode(),
                 str(libdnnl.resolve()).encode(), compiler.encode(), _cpu_features().encode()):
        digest.update(part)
    out = Path(cache_dir) / f"libsdjax_onednn-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place: a concurrent build or an interrupted one never
    # leaves a half-written library where a later load would find it.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    # -fopenmp: the attention kernel runs (batch, head) pairs on OpenMP threads (the runtime oneDNN's gomp build
    # uses too); -march=native: its softmax loop vectorises for this CPU.
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
           f"-I{jax.ffi.include_dir()}", f"-I{inc}", *map(str, SOURCES), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
           "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OnednnUnavailable(f"building the oneDNN kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cpu_features() -> str:
    """The CPU's model and feature flags (Linux), for the build's cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


@functools.cache
def _load(cache_dir: Path) -> Path | OnednnUnavailable:
    try:
        path = build(cache_dir)
        library = ctypes.CDLL(str(path))
    except OSError as err:
        return OnednnUnavailable(f"loading the oneDNN kernel failed: {err}")
    except OnednnUnavailable as err:
        return err  # remembered: a process does not retry a build that cannot work
    for target, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return path


def load(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Builds (if needed) and loads the library and registers its FFI targets with XLA, once per process
    (a process-wide effect, made only by the edge that chooses this kernel); raises OnednnUnavailable saying
    what is missing."""
    result = _load(Path(cache_dir))
    if isinstance(result, OnednnUnavailable):
        raise result
    return result


def reason_unavailable(cache_dir: str | Path = DEFAULT_CACHE) -> str | None:
    """None when the kernel can be used here (built and loaded), else what is missing."""
    try:
        load(cache_dir)
    except OnednnUnavailable as err:
        return str(err)
    return None


def _out_hw(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _ffi_call(direction: str, operands: tuple[jax.Array, ...], out_shape: tuple[int, ...], strides, padding):
    a = operands[0]
    target, _ = TARGETS[direction, jnp.dtype(a.dtype)]
    # vmap_method: a batched call (nothing in sdjax vmaps a conv) runs the kernel once per batch element.
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, a.dtype), vmap_method="sequential")
    i64 = np.int64
    return call(*operands, stride_h=i64(strides[0]), stride_w=i64(strides[1]), pad_top=i64(padding[0][0]),
                pad_bottom=i64(padding[0][1]), pad_left=i64(padding[1][0]), pad_right=i64(padding[1][1]))


def _forward(x, w, b, strides, padding):
    """x [N, H, W, C], w [KH, KW, C, O], b [O] or None, of one dtype -> y [N, OH, OW, O]."""
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    shape = (n, _out_hw(h, kh, strides[0], padding[0]), _out_hw(wd, kw, strides[1], padding[1]), o)
    if b is None:
        return _ffi_call("forward", (x, w), shape, strides, padding)
    return _ffi_call("forward_bias", (x, w, b), shape, strides, padding)


def _backward_data(dy, w, x_shape, strides, padding):
    """dy [N, OH, OW, O], w [KH, KW, C, O] -> dx [N, H, W, C] (the gradient through the input)."""
    return _ffi_call("backward_data", (dy, w), x_shape, strides, padding)


def _per_shard(fn, mesh, axis, batched: tuple, replicated: tuple = ()):
    """fn(*batched, *replicated) on `mesh`: XLA cannot partition a custom call (it would gather the batch onto every
    device), so it runs per batch shard under shard_map, `batched` split over `axis` and `replicated` (weights)
    whole on every device, as the Pallas attention does."""
    if mesh is None or mesh.shape[axis] == 1:
        return fn(*batched, *replicated)
    specs = (P(axis),) * len(batched) + (P(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis), check_vma=False)(*batched, *replicated)


def _xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv(x, w, b, strides, padding, mesh, axis):
    """b: the bias [O], added by the kernel, or None."""
    if b is None:
        return _per_shard(lambda xs, ws: _forward(xs, ws, None, strides, padding), mesh, axis, (x,), (w,))
    return _per_shard(lambda xs, ws, bs: _forward(xs, ws, bs, strides, padding), mesh, axis, (x,), (w, b))


def _conv_fwd(x, w, b, strides, padding, mesh, axis):
    return _conv(x, w, b, strides, padding, mesh, axis), (x, w, b)


def _conv_bwd(strides, padding, mesh, axis, saved, g):
    """dx by oneDNN's backward-data kernel (no float32 copy of the weights on XLA:CPU); dw by XLA's transposed
    convolution and db by a sum (XLA drops both when nothing needs them, e.g. frozen weights under LoRA)."""
    x, w, b = saved
    g = g.astype(x.dtype)
    dx = _per_shard(lambda gs, ws: _backward_data(gs, ws, (gs.shape[0],) + x.shape[1:], strides, padding),
                    mesh, axis, (g,), (w,))
    _, vjp = jax.vjp(lambda w: _xla_conv(x, w, strides, padding), w)
    (dw,) = vjp(g)
    db = None if b is None else g.sum((0, 1, 2), dtype=jnp.float32).astype(b.dtype)
    return dx, dw, db


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated_fn(mesh: Mesh | None = None, axis: str = "data"):
    """A drop-in for `lax.conv_general_dilated` as `flax.linen.Conv(conv_general_dilated=...)` calls it, running
    the oneDNN kernel (per batch shard of `mesh`'s `axis`; None: unpartitioned) where it applies: NHWC/HWIO,
    no dilation or groups, bfloat16 or float32, a batch that splits over the mesh; anything else goes to XLA.
    Needs `load()` to have run (the edge that chooses this kernel does it)."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                             preferred_element_type=None) -> Any:
        shards = 1 if mesh is None else mesh.shape[axis]
        plain = (dimension_numbers == _NHWC and feature_group_count == 1 and batch_group_count == 1
                 and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
                 and not isinstance(padding, str) and preferred_element_type is None
                 and lhs.dtype == rhs.dtype and jnp.dtype(lhs.dtype) in DTYPES and lhs.shape[0] % shards == 0
                 and lhs.ndim == rhs.ndim == 4 and lhs.shape[3] == rhs.shape[2])  # else XLA's own error
        if not plain:
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count, precision,
                                            preferred_element_type)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return _conv(lhs, rhs, None, tuple(int(s) for s in window_strides), pads, mesh, axis)

    return conv_general_dilated


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]], mesh: Mesh | None = None, axis: str = "data") -> jax.Array:
    """conv(x, w) + b, NHWC/HWIO, by the oneDNN kernel with the bias added in it (per batch shard of `mesh`'s
    `axis`) where it applies (bfloat16 or float32, one dtype, a batch that splits over the mesh); XLA otherwise.
    x [N, H, W, C], w [KH, KW, C, O], b [O] -> [N, OH, OW, O]. Needs `load()` to have run."""
    shards = 1 if mesh is None else mesh.shape[axis]
    if x.dtype == w.dtype == b.dtype and jnp.dtype(x.dtype) in DTYPES and x.shape[0] % shards == 0:
        return _conv(x, w, b, tuple(strides), tuple(padding), mesh, axis)
    return _xla_conv(x, w, strides, padding) + b


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh | None = None, axis: str = "data") -> jax.Array:
    """softmax(q k^T / sqrt(D)) v by the oneDNN kernel (csrc/onednn_attention.cc), per batch shard of `mesh`'s
    `axis`: q [B, Lq, H, D], k and v [B, Lk, H, D] of one dtype in `DTYPES` -> [B, Lq, H, D]; scores and
    softmax in float32, probabilities rounded once to the input dtype (the arithmetic of the plain XLA form).
    No gradient of its own (`layers` wraps it in a custom_vjp). Needs `load()` to have run."""
    target, _ = TARGETS["attention", jnp.dtype(q.dtype)]

    def kernel(qs, ks, vs):  # one shard: [b, L, H, D]
        out = jax.ShapeDtypeStruct(qs.shape, qs.dtype)
        return jax.ffi.ffi_call(target, out, vmap_method="sequential")(qs, ks, vs)

    return _per_shard(kernel, mesh, axis, (q, k, v))
