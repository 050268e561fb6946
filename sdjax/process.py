"""Process-wide settings, all opt-in: importing sdjax changes nothing about the process.

The CLI turns both on (`sdjax generate ...`); library users call them themselves, before loading a model:

    sdjax.process.tune_malloc()            # less resident memory after loading a checkpoint (glibc only)
    sdjax.enable_compilation_cache()       # a second process reads compiled programs instead of compiling
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import jax

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def tune_malloc() -> bool:
    """Sets glibc malloc's mmap threshold to 1 MiB, so freed checkpoint tensors (1-32 MiB each) go back to the
    OS instead of staying in malloc's arenas: about 1 GiB less resident memory after loading SD1.5 in fp32
    (5.65 -> 4.53 GB measured). Linux/glibc only; returns True if it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl...): nothing to tune
        return False


def default_cache_dir() -> Path:
    """$SDJAX_CACHE_DIR, else ~/.cache/sdjax/xla."""
    return Path(os.environ.get("SDJAX_CACHE_DIR", Path.home() / ".cache" / "sdjax" / "xla"))


def enable_compilation_cache(folder: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (a process-wide JAX setting), so a second process with the
    same programs skips compiling. folder: default `default_cache_dir()`; "" or "off" leaves it off."""
    folder = default_cache_dir() if folder is None else folder
    if str(folder) in ("", "off"):
        return None
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
