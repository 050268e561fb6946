"""Process-wide settings are opt-in: importing sdjax leaves the process alone; the CLI turns them on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sdjax import process

PROBE = """
import json, os, signal, jax
before = os.environ.get("XLA_FLAGS")
handler = signal.getsignal(signal.SIGINT)
import sdjax, sdjax.cli, sdjax.train  # every module, not only the lazy top level
sdjax.Pipeline
print(json.dumps({"cache": jax.config.jax_compilation_cache_dir, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "before": before, "sigint_kept": signal.getsignal(signal.SIGINT) is handler}))
"""

LIGHT = """
import sys, sdjax, sdjax.__main__
print(sorted(m for m in ("jax", "numpy", "flax", "sdjax.pipeline") if m in sys.modules))
"""


def test_import_changes_no_process_setting():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SDJAX_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cache"] is None and r["xla_flags"] == r["before"] is None and r["sigint_kept"]


def test_import_sdjax_and_the_command_entry_are_light():
    """`import sdjax` imports its public API on first use, so the `sdjax` command (sdjax.__main__) installs its
    Ctrl-C handling before jax is imported."""
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import sdjax

    assert sdjax.load_pipeline is sdjax.pipeline.load_pipeline and "Pipeline" in dir(sdjax)
    assert sorted(sdjax.__all__) == sorted(sdjax._EXPORTS)
    assert all(getattr(sdjax, name) is not None for name in sdjax.__all__)


def test_compilation_cache_opt_in(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "c"))
    assert process.default_cache_dir() == tmp_path / "c"
    assert process.enable_compilation_cache("off") is None and not (tmp_path / "c").exists()
    before = jax.config.jax_compilation_cache_dir
    try:
        assert process.enable_compilation_cache() == tmp_path / "c"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_tune_malloc_reports_what_it_did():
    assert process.tune_malloc() is sys.platform.startswith("linux")
