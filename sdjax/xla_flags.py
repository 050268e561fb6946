"""Process settings sdjax applies when it is imported, before JAX's backend starts.

1. XLA CPU flags (`DEFAULT_CPU_FLAGS`) appended to $XLA_FLAGS. A flag the user already set in $XLA_FLAGS (by name)
   is left as the user set it; $SDJAX_XLA_DEFAULTS=0 turns the defaults off. XLA reads $XLA_FLAGS once, when the
   first backend initialises, so this only takes effect if sdjax is imported before any JAX computation ran.
   The list is empty at present: on the 2-core AVX-512 development machine (shared, noisy) none of the CPU flags
   tried -- XNNPACK graph fusion (`--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY`),
   oneDNN (`--xla_cpu_use_onednn=true`), XNN fusion types, fast math -- gave a speed-up on the UNet's convolution,
   matmul, GroupNorm+SiLU and attention that stood out of the run-to-run noise (see the README's benchmark
   section); the win on CPU came from the blocked attention in `layers.py`. Measure with `scripts/bench.py`
   before adding one here.
2. glibc malloc: a fixed mmap threshold (1 MiB), so freed checkpoint tensors (1-32 MiB each) go back to the OS
   instead of staying in malloc's arenas -- about 1 GiB less resident memory after loading SD1.5 in fp32.
   Linux/glibc only; $SDJAX_MALLOC_TUNING=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

DEFAULT_CPU_FLAGS: tuple[str, ...] = ()
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def merge_flags(current: str, defaults: tuple[str, ...]) -> str:
    """`current` XLA_FLAGS plus each default whose flag name `current` does not already set."""
    have = {tok.split("=", 1)[0] for tok in current.split() if tok.startswith("--")}
    extra = [f for f in defaults if f.split("=", 1)[0] not in have]
    return " ".join([current.strip(), *extra]).strip()


def apply_xla_flags() -> None:
    if os.environ.get("SDJAX_XLA_DEFAULTS", "1") == "0" or not DEFAULT_CPU_FLAGS:
        return
    os.environ["XLA_FLAGS"] = merge_flags(os.environ.get("XLA_FLAGS", ""), DEFAULT_CPU_FLAGS)


def tune_malloc() -> bool:
    """Sets glibc's mmap threshold (see the module docstring); True if it did."""
    if os.environ.get("SDJAX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl...): nothing to tune
        return False


apply_xla_flags()
tune_malloc()
