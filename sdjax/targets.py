"""Compile targets: TPU slices and GPU boxes as compile-only devices, for checking programs without the hardware.

A target is named `tpu:<chip>-<n>` (Cloud TPU names: v5e/v6e count chips, v4/v5p count TensorCores) or
`gpu:<chip>[x<n>]`. `devices(name)` returns compile-only devices from XLA's topology descriptions: TPU ones need
`libtpu` (the `tpu` extra), GPU ones the CUDA plugin (`cuda12` extra). Nothing here needs the chip itself, and
`jax.jit(f).lower(...).compile()` over a mesh of these devices gives the target's executable, memory use and HLO.

GPU device descriptions are XLA `GpuTargetConfigProto` text written from each card's public specifications
(SM count, shared memory, L2, clocks, memory size, compute capability); the cuDNN version is the one the CUDA
extra installs, so the fused-attention and convolution choices are those a real box would make.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuChip:
    topology: str  # the chip's name in XLA's topology strings, e.g. "v5e"
    hbm_bytes: int  # per device (a v4/v5p megacore device is one chip)
    slices: dict[int, tuple[str, tuple[int, int, int]]]  # name suffix -> (chip grid, chips per host)
    megacore: bool = False


TPU_CHIPS = {
    "v5e": TpuChip("v5e", 16 * GIB, {1: ("1x1", (1, 1, 1)), 4: ("2x2", (2, 2, 1)), 8: ("2x4", (2, 4, 1))}),
    "v6e": TpuChip("v6e", 32 * GIB, {1: ("1x1", (1, 1, 1)), 4: ("2x2", (2, 2, 1)), 8: ("2x4", (2, 4, 1))}),
    "v4": TpuChip("v4", 32 * GIB, {8: ("2x2x1", (2, 2, 1))}, megacore=True),
    "v5p": TpuChip("v5p", 95 * GIB, {8: ("2x2x1", (2, 2, 1))}, megacore=True),
}


@dataclasses.dataclass(frozen=True)
class GpuCard:
    device_kind: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_bytes: int
    clock_ghz: float
    bandwidth_bytes_s: int
    fpus_per_sm: int

    def target_config(self, cudnn: tuple[int, int, int]) -> str:
        """XLA's GpuTargetConfigProto, text format."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.bandwidth_bytes_s}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}
device_description_str: "{self.device_kind}"
"""


GPU_CARDS = {
    # H100 SXM5 80 GB: sm_90, 132 SMs, 228 KiB shared memory per SM (227 KiB per block opt-in), 50 MiB L2.
    "h100": GpuCard("NVIDIA H100 80GB HBM3", (9, 0), 132, 81559 << 20, 233472, 232448, 50 << 20, 1.98,
                    3_352_000_000_000, 128),
    # A100 SXM4 40 GB / 80 GB: sm_80, 108 SMs, 164 KiB shared memory per SM (163 KiB opt-in), 40 MiB L2.
    "a100-40gb": GpuCard("NVIDIA A100-SXM4-40GB", (8, 0), 108, 40536 << 20, 167936, 166912, 40 << 20, 1.41,
                         1_555_000_000_000, 64),
    "a100-80gb": GpuCard("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81920 << 20, 167936, 166912, 40 << 20, 1.41,
                         2_039_000_000_000, 64),
}
GPU_COUNTS = (1, 2, 4, 8)
# JAX's GPU client takes 75% of the card by default (XLA_PYTHON_CLIENT_MEM_FRACTION); TPU programs get the HBM.
GPU_USABLE_FRACTION = 0.75


def names() -> list[str]:
    """Every target name `devices` accepts."""
    tpu = [f"tpu:{chip}-{n}" for chip, c in TPU_CHIPS.items() for n in c.slices]
    gpu = [f"gpu:{card}" + (f"x{n}" if n > 1 else "") for card in GPU_CARDS for n in GPU_COUNTS]
    return tpu + gpu


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "gpu"
    chip: str
    size: int  # the name's count: chips (v5e, v6e, GPUs) or TensorCores (v4, v5p)
    num_devices: int  # JAX devices (a v4/v5p megacore chip is one device)
    memory_bytes: int  # what one device's program may use

    def devices(self) -> list[jax.Device]:
        return list(_devices(self.name))

    def mesh(self, axis: str = "data") -> Mesh:
        return Mesh(np.array(self.devices()), (axis,))


def parse(name: str) -> Target:
    """`tpu:v5e-8`, `gpu:h100x8`, ... -> Target; a ValueError lists the names allowed."""
    m = re.fullmatch(r"tpu:(\w+)-(\d+)", name) or re.fullmatch(r"gpu:([\w-]+?)(?:x(\d+))?", name)
    if m and name.startswith("tpu:") and m[1] in TPU_CHIPS and int(m[2]) in TPU_CHIPS[m[1]].slices:
        chip = TPU_CHIPS[m[1]]
        grid, _ = chip.slices[int(m[2])]
        n = int(np.prod([int(x) for x in grid.split("x")]))
        return Target(name, "tpu", m[1], int(m[2]), n, chip.hbm_bytes)
    if m and name.startswith("gpu:") and m[1] in GPU_CARDS and int(m[2] or 1) in GPU_COUNTS:
        card = GPU_CARDS[m[1]]
        n = int(m[2] or 1)
        return Target(name, "gpu", m[1], n, n, int(card.memory_bytes * GPU_USABLE_FRACTION))
    raise ValueError(f"target {name!r} is not known; choose one of {', '.join(names())}")


@functools.cache
def _devices(name: str) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    t = parse(name)
    try:
        if t.platform == "tpu":
            chip = TPU_CHIPS[t.chip]
            grid, per_host = chip.slices[t.size]
            kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
            topo = topologies.get_topology_desc(f"{chip.topology}:{grid}", platform="tpu",
                                                chips_per_host_bounds=per_host, **kwargs)
        else:
            config = GPU_CARDS[t.chip].target_config(cudnn_version())
            topo = topologies.get_topology_desc(t.chip, "cuda", target_config=config,
                                                topology=f"1x1x{t.num_devices}")
    except (ImportError, RuntimeError, ValueError) as err:
        extra = "tpu" if t.platform == "tpu" else "cuda12"
        hint = ("another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before the first TPU call"
                if "lockfile" in str(err) else f"is the {t.platform.upper()} plugin installed? "
                f"pip install -e \".[{extra}]\"")
        raise RuntimeError(f"cannot make compile-only devices for target {name!r}: {err} ({hint})") from err
    return tuple(topo.devices)


def cudnn_version() -> tuple[int, int, int]:
    """The cuDNN the CUDA plugin installed (its wheel's version), e.g. (9, 8, 0)."""
    from importlib import metadata

    for dist in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13"):
        try:
            parts = [int(p) for p in metadata.version(dist).split(".")[:3]]
            return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return (9, 8, 0)


def describe(devices: Sequence[jax.Device] | np.flatiter) -> str:
    return f"{len(devices)} x {devices[0].device_kind}"
