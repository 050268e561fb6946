"""scripts/bench.py records which jax accelerator runtimes its environment holds: jax maps their libraries into a
CPU process too, so CPU memory figures depend on them (the `bench` extra makes an environment without them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"

PROBE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench", {str(BENCH)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
print(json.dumps({{"plugins": bench.jax_plugins(), "jax_imported": "jax" in sys.modules}}))
"""


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jax_plugins_finds_the_test_extras_runtimes_without_importing_jax():
    """The test extra installs jax[cuda12] (a PJRT plugin) and jax[tpu] (libtpu) for the compile-only checks."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "libtpu" in r["plugins"] and any("cuda12" in p for p in r["plugins"]), r
    assert r["jax_imported"] is False


def _result(machine: dict) -> dict:
    return {"machine": {"cpu": "test cpu", "cores": 2, "mem_gib": 24, "platform": "linux", **machine},
            "command": "python scripts/bench.py --size 64",
            "args": {"size": 64, "steps": 2, "batch": 1, "dtype": "float32", "scheduler": None},
            "summary": {"unet_s": {"unit": "s", "sdjax": 1.0, "torch": 2.0, "ratio": 0.5}}}


@pytest.mark.parametrize("machine, expected", [
    ({"jax_plugins": ["jax-cuda12-pjrt", "libtpu"]}, "jax accelerator runtimes installed: jax-cuda12-pjrt, libtpu."),
    ({"jax_plugins": []}, "jax accelerator runtimes installed: none."),
    ({}, "jax accelerator runtimes installed: not recorded."),  # JSON from before the field existed
])
def test_readme_section_names_the_runtimes(tmp_path, machine, expected):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nafter\n")
    _bench().write_readme(_result(machine), readme)
    text = readme.read_text()
    assert expected in text and "old" not in text and text.endswith("after\n")
    assert "| unet_s (s) | 1 | 2 | 0.5 |" in text
