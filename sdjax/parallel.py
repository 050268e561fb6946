"""Data parallelism: a 1-D mesh over every device (all hosts), batch sharded, params replicated.

Multi-host: call `jax.distributed.initialize()` (or `sdjax.parallel.initialize()`) in every process before
loading a pipeline; `jax.devices()` then lists every host's devices and the same jitted call runs on all of
them. Each process must pass the same prompts and seeds (each gets the whole batch back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize(**kwargs) -> None:
    """Multi-host start-up: `jax.distributed.initialize(**kwargs)` (coordinator, process count and id come
    from the environment on TPU pods and SLURM; pass them on other clusters)."""
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def padded_size(batch: int, mesh: Mesh) -> int:
    """The batch rounded up to a multiple of the device count."""
    n = mesh.devices.size
    return math.ceil(batch / n) * n


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to `size` by repeating the last row (padding rows are computed, then trimmed)."""
    if x.shape[0] == size:
        return x
    fill = np.repeat(x[-1:], size - x.shape[0], axis=0)
    return np.concatenate([x, fill], axis=0)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def put_batch(tree: Any, mesh: Mesh) -> Any:
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
                        if jax.process_count() > 1 else jax.device_put(jnp.asarray(a), sharding), tree)


# XLA:GPU in jax 0.10.2 fails to compile SD1.5 programs with "Couldn't find output tile sizes" for Triton GEMM
# fusions of the attention projections: txt2img on A100 at any batch, the LoRA train step on H100 from 2 examples
# per GPU ([512..8192, 320..1280] bf16 dots; found by `sdjax compile-check` on compile-only devices). With Triton
# GEMMs off those dots go to cuBLAS and every job compiles. Options are per platform, so they are chosen from
# the mesh's devices, once, where a job is jitted.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def platform(mesh: Mesh) -> str:
    """"cpu", "gpu" or "tpu": the kind of the mesh's devices (compile-only devices included; CUDA/ROCm -> gpu,
    anything else unknown -> cpu)."""
    name = mesh.devices.flat[0].platform
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    return name if name in ("cpu", "gpu", "tpu") else "cpu"


def compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """XLA options for programs compiled for `mesh`'s devices (None: XLA's defaults)."""
    return dict(GPU_COMPILER_OPTIONS) if platform(mesh) == "gpu" else None
