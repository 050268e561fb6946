"""Multi-process runs on localhost: 2 processes x 2 simulated CPU devices joined by `jax.distributed` (JAX's CPU
collectives), against one process with 4 devices (the same program per device, so the same bits)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import parallel

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(devices: int, **extra: str) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_distributed_settings_from_flags_and_env():
    env = {"SDJAX_COORDINATOR": "10.0.0.1:1234", "SDJAX_NUM_PROCESSES": "4", "SDJAX_PROCESS_ID": "3"}
    assert parallel.distributed_from(None, None, None, {}) is None  # a single-process run
    assert parallel.distributed_from(None, None, None, {}, auto=True) == parallel.Distributed()  # JAX detects
    assert parallel.distributed_from(None, None, None, env) == parallel.Distributed("10.0.0.1:1234", 4, 3)
    assert parallel.distributed_from("h:1", 2, 0, env) == parallel.Distributed("h:1", 2, 0)  # flags win
    with pytest.raises(ValueError, match="process_id must be an integer in"):
        parallel.distributed_from(None, None, 4, env)
    with pytest.raises(ValueError, match="SDJAX_NUM_PROCESSES must be an integer"):
        parallel.distributed_from(None, None, None, {"SDJAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="HOST:PORT"):
        parallel.distributed_from("localhost", 2, 0, {})


@pytest.mark.slow
def test_two_processes_batch_equals_one_process(tiny_sd_folder, tmp_path):
    """`sdjax batch` in 2 processes (flags in one, $SDJAX_* in the other), each writing to its own folder as on
    hosts without a shared disk: their images are disjoint, together they are the job, pixel for pixel as one
    process makes them, and process 0's manifest (listing both processes' images) is the one process's."""
    lines = [{"prompt": "a red cube", "num_images": 3}, {"prompt": "a blue sphere", "negative_prompt": "blurry"},
             {"prompt": "a fox", "seed": 5}, {"prompt": "a lighthouse", "guidance_scale": 5.0}]
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps(r) + "\n" for r in lines))
    common = [sys.executable, "-m", "sdjax", "batch", str(job), "--model", str(tiny_sd_folder), "--steps", "2",
              "--height", "64", "--width", "64", "--seed", "3", "--cache-dir", "off", "--no-progress"]
    coordinator = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / "p0", tmp_path / "p1", tmp_path / "single"]
    procs = [
        subprocess.Popen([*common, "--out", str(outs[0]), "--coordinator", coordinator, "--num-processes", "2",
                          "--process-id", "0"], env=env_with(2), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True),
        subprocess.Popen([*common, "--out", str(outs[1])], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env_with(2, SDJAX_COORDINATOR=coordinator, SDJAX_NUM_PROCESSES="2",
                                                 SDJAX_PROCESS_ID="1")),
        subprocess.Popen([*common, "--out", str(outs[2])], env=env_with(4), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True),
    ]
    try:
        results = [p.communicate(timeout=500) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    # process 0 reports (gloo's C++ logs "[Gloo] ..." lines on stdout too)
    assert "wrote 6 of 6 images" in results[0][0] and "wrote" not in results[1][0]
    files = [{f.name for f in out.glob("*.png")} for out in outs]
    assert files[0] and files[1] and not files[0] & files[1]  # both worked, no image twice
    assert files[0] | files[1] == files[2] and len(files[2]) == 6
    for name in sorted(files[2]):
        mine = outs[0] / name if name in files[0] else outs[1] / name
        np.testing.assert_array_equal(pixels(mine), pixels(outs[2] / name), err_msg=name)
    assert not np.array_equal(pixels(outs[2] / "000001-000.png"), pixels(outs[2] / "000001-001.png"))
    assert (outs[0] / "manifest.jsonl").read_text() == (outs[2] / "manifest.jsonl").read_text()
    assert not (outs[1] / "manifest.jsonl").exists()
    assert [json.loads(m)["seed"] for m in (outs[2] / "manifest.jsonl").read_text().splitlines()] == \
        [3, 4, 5, 6, 5, 8]
