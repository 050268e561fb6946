"""Process-wide settings are opt-in: importing sdjax leaves the process alone; the CLI turns them on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sdjax import process

PROBE = """
import json, os, jax
before = os.environ.get("XLA_FLAGS")
import sdjax
print(json.dumps({"cache": jax.config.jax_compilation_cache_dir, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "before": before}))
"""


def test_import_changes_no_process_setting():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SDJAX_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cache"] is None and r["xla_flags"] == r["before"] is None


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
