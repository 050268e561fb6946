"""Data parallelism: a 1-D mesh over every device (all hosts), batch sharded, params replicated.

Multi-process (multi-host) runs use JAX's own runtime: `initialize()` (`jax.distributed.initialize`) in every
process before anything touches a device; `jax.devices()` then lists every process's devices, the mesh spans
them all and the same jitted call runs on all of them as one program. The API's rule across processes: every
process makes the same calls with the same arguments (prompts, seeds, sizes), each puts the rows of the global
batch that its own devices hold (`put_batch`), and each gets the whole batch back (`to_host` gathers the rows
of the other processes). `sdjax.batch` builds on that: each process writes only the images its devices made.
Calls that differ between processes, or that only some processes make, hang in the first collective.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


ENV_COORDINATOR = "SDJAX_COORDINATOR"  # host:port of process 0's coordinator service
ENV_NUM_PROCESSES = "SDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SDJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How to join a multi-process run; None fields are left to JAX's cluster auto-detection (Cloud TPU pod
    slices, SLURM, Open MPI, Kubernetes: `jax.distributed.initialize()` with no arguments)."""

    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if self.coordinator is not None and (":" not in self.coordinator
                                             or not self.coordinator.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"coordinator must be HOST:PORT (process 0's address), got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be an integer >= 1, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or (
                self.num_processes is not None and self.process_id >= self.num_processes)):
            raise ValueError(f"process_id must be an integer in [0, num_processes), got {self.process_id}")


def distributed_from(coordinator: str | None, num_processes: int | None, process_id: int | None,
                     environ: Mapping[str, str], auto: bool = False) -> Distributed | None:
    """The multi-process settings from flags, falling back to $SDJAX_COORDINATOR, $SDJAX_NUM_PROCESSES and
    $SDJAX_PROCESS_ID in `environ` (resolved once, by the CLI, never while tracing). None: a single-process run
    (nothing given and not `auto`); auto=True with nothing given leaves all three to JAX's auto-detection."""
    def number(value: int | None, name: str) -> int | None:
        if value is not None or not environ.get(name, "").strip():
            return value
        try:
            return int(environ[name])
        except ValueError:
            raise ValueError(f"${name} must be an integer, got {environ[name]!r}") from None

    coordinator = coordinator or environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = number(num_processes, ENV_NUM_PROCESSES)
    process_id = number(process_id, ENV_PROCESS_ID)
    if not auto and coordinator is None and num_processes is None and process_id is None:
        return None
    return Distributed(coordinator, num_processes, process_id)


def initialize(config: Distributed | None = None) -> None:
    """Joins this process to a multi-process run: `jax.distributed.initialize` with `config`'s fields (None ones,
    or config=None, are auto-detected by JAX on TPU pod slices, SLURM, Open MPI and Kubernetes). Call it in every
    process before anything touches a device (loading a pipeline does). A second call is a no-op. On CPU, JAX's
    default collectives (gloo in jax 0.10) carry the cross-process traffic."""
    if jax.distributed.is_initialized():
        return
    config = config or Distributed()
    jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                               process_id=config.process_id)


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


def put_batch(tree: Any, mesh: Mesh, *, local: bool = False) -> Any:
    """Host arrays -> global arrays sharded over the mesh's batch axis (axis 0).

    local=False: every process passes the same global batch [B, ...] (B a multiple of the device count) and
    each puts only the rows its own devices hold. local=True: each process passes its own rows [B / P, ...]
    (P processes, its devices' share in mesh order), e.g. the examples its data loader read; the global batch
    is their concatenation in process order."""
    sharding = batch_sharded(mesh)

    def put(a):
        if local:
            return jax.make_array_from_process_local_data(sharding, np.asarray(a))
        if jax.process_count() == 1:
            return jax.device_put(jnp.asarray(a), sharding)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def local_copy(tree: Any) -> Any:
    """Fully replicated global arrays -> this process's copy on its first device (no transfer, no collective),
    so that computations on them run on this process alone; other leaves are returned as they are. Use it where
    processes compute the same thing on their own (each one's result is then process-local)."""
    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise ValueError(f"local_copy needs a fully replicated array, got one sharded as {a.sharding}")
            return a.addressable_data(0)
        return a

    return jax.tree.map(local, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A (batch-sharded) global array -> the whole array on this process's host. Rows on other processes'
    devices come by an all-gather, a collective: every process must call this for the same arrays."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def row_processes(mesh: Mesh, size: int) -> np.ndarray:
    """[size] int: the process whose devices hold each row of a batch of `size` (a multiple of the device count)
    sharded over `mesh`; contiguous blocks of size / devices rows per device, in mesh order."""
    n = mesh.devices.size
    if size % n:
        raise ValueError(f"a batch of {size} cannot be split evenly over {n} devices")
    owners = np.array([d.process_index for d in mesh.devices.flat])
    return np.repeat(owners, size // n)


def process_rows(mesh: Mesh, size: int) -> np.ndarray:
    """[rows] int, ascending: the rows of a batch of `size` sharded over `mesh` that this process's devices hold
    (all of them in a single-process run); contiguous where the mesh lists each process's devices together."""
    return np.flatnonzero(row_processes(mesh, size) == jax.process_index())


def put_rows(tree: Any, mesh: Mesh, rows: np.ndarray, size: int) -> Any:
    """This process's rows of a global batch -> global arrays of `size` rows sharded over the mesh's batch axis.
    Each process passes only the rows its devices hold, `rows = process_rows(mesh, size)`, in that order (e.g.
    what its data loader read): `put_batch(..., local=True)` for any order of the mesh's devices."""
    sharding = batch_sharded(mesh)
    where = {int(r): k for k, r in enumerate(np.asarray(rows).tolist())}

    def put(a):
        a = np.asarray(a)
        if a.shape[0] != len(where):
            raise ValueError(f"expected this process's {len(where)} rows, got an array of shape {a.shape}")

        def block(idx):  # a device's rows [start, stop): contiguous in `rows`
            start, stop, _ = idx[0].indices(size)
            k = where[start]
            return a[(slice(k, k + stop - start), *idx[1:])]

        return jax.make_array_from_callback((size, *a.shape[1:]), sharding, block)

    return jax.tree.map(put, tree)


def sync(name: str) -> None:
    """Waits until every process got here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes_max(values: np.ndarray) -> np.ndarray:
    """Element-wise max of an int array over all processes (each passes one of the same shape)."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values))  # [processes, *shape]
    return np.asarray(gathered).max(axis=0)


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


# XLA's `exec_time_optimization_effort` (ExecutableBuildOptions), in [-1, 1]; 0 is XLA's default. Lower trades run
# time for compile time. Measured on compile-only TPU v5e (libtpu of jax 0.10.2): at -0.5 and below the TPU backend
# skips memory-space assignment (no VMEM placement or prefetch: no `copy-start`/`S(1)` in the HLO) and emits ~1/3
# of the code: SD1.5 txt2img at 512 compiles in 48-52 s instead of 297-310 s for 8 chips (-0.4 changes nothing),
# and the TPU compiler's own cost model puts the program at 1.7x the cycles (-1: 25 s, 3.4x). Not measured on a
# TPU; a choice for iterating, so the default stays XLA's. XLA:GPU (jax 0.10.2) compiles the same either way.
EFFORT_RANGE = (-1.0, 1.0)
EFFORT_RULE = (f"must be a number in [{EFFORT_RANGE[0]:g}, {EFFORT_RANGE[1]:g}] (XLA's "
               "exec_time_optimization_effort; 0 is XLA's default, lower compiles faster)")


def check_effort(effort: Any, name: str = "optimization_effort") -> float:
    """`effort` as a float in EFFORT_RANGE; ValueError naming `name` and the range otherwise."""
    low, high = EFFORT_RANGE
    if isinstance(effort, (bool, np.bool_)) or not isinstance(effort, (int, float, np.integer, np.floating)) \
            or not low <= float(effort) <= high:
        raise ValueError(f"{name} {EFFORT_RULE}, got {effort!r}")
    return float(effort)


def compiler_options(mesh: Mesh, optimization_effort: float = 0.0) -> dict[str, Any] | None:
    """XLA options for programs compiled for `mesh`'s devices (None: XLA's defaults); `optimization_effort`:
    see EFFORT_RANGE."""
    options: dict[str, Any] = dict(GPU_COMPILER_OPTIONS) if platform(mesh) == "gpu" else {}
    if check_effort(optimization_effort) != 0.0:
        options["exec_time_optimization_effort"] = float(optimization_effort)
    return options or None
