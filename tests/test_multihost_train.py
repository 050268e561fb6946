"""Multi-process LoRA training on localhost: `sdjax train-lora` in 2 processes x 2 simulated CPU devices joined by
`jax.distributed` trains the same LoRA as 1 process with 4 devices and the same global batch; process 0 alone
writes the metrics, samples, latent cache and export; each process loads only its own rows of every global
batch; the 2-process run resumes from its mid-run checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sdjax import io
from sdjax.unet import UNetConfig
from tests import reference as ref
from tests.test_multihost import ROOT, env_with, free_port
from tests.test_train import make_shapes

STEPS = 4
FLAGS = ["--rank", "2", "--lr", "1e-2", "--steps", str(STEPS), "--batch-size", "4", "--resolution", "32",
         "--seed", "1", "--cache-latents", "mean", "--checkpoint-every", "2", "--keep-last", "3",
         "--sample-every", str(STEPS), "--sample-prompt", "a red circle", "--no-progress"]

# `sdjax train-lora` with the writers that only process 0 may call wrapped to record their calls, and the
# training data's loads wrapped to record the example ids loaded, in a JSON object {"calls": [...], "rows": [...]}
# at argv[1] (written when the command returns).
RUNNER = textwrap.dedent("""
    import json, sys
    import PIL.Image
    from sdjax import cli, data, io, train

    calls, rows = [], []

    def spy(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, call)

    spy(io, "write_safetensors")  # the latent cache and the exported LoRA
    spy(PIL.Image.Image, "save")  # sample images
    spy(train._MetricsLog, "write")
    # The training steps' loads (not the cache's encoding); CachedDataset.fetch is its item.
    for cls, name in ((data.CachedDataset, "item"), (data.ImageCaptionDataset, "item"),
                      (data.ImageCaptionDataset, "fetch")):
        def load(self, i, epoch, original=getattr(cls, name)):
            rows.append(int(i))
            return original(self, i, epoch)

        setattr(cls, name, load)
    code = cli.main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump({"calls": calls, "rows": rows}, f)
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """tests/test_train.py's model: the tiny pipeline with a two-level UNet, quicker to compile than the default
    tiny one (each of the 5 processes below compiles the train step; the persistent cache is off: see
    `train.train_lora`)."""
    unet = UNetConfig.tiny(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, heads=(2, 2),
                           transformer_layers=(1, 1))
    folder = tmp_path_factory.mktemp("multihost_train_model") / "model"
    ref.tiny_pipeline(unet_config=unet).save_pretrained(folder, safe_serialization=True)
    return folder


def start(args: list[str], report: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(report), "train-lora", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_processes(common: list[str], out: Path, reports: Path) -> list[subprocess.Popen]:
    """Process 0 joins with flags, process 1 with $SDJAX_*; one shared out folder, as orbax needs."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        start([*common, "--out", str(out), "--coordinator", coordinator, "--num-processes", "2", "--process-id", "0"],
              reports / "p0.json", env_with(2, SDJAX_CACHE_DIR="off")),
        start([*common, "--out", str(out)], reports / "p1.json",
              env_with(2, SDJAX_CACHE_DIR="off", SDJAX_COORDINATOR=coordinator, SDJAX_NUM_PROCESSES="2",
                       SDJAX_PROCESS_ID="1")),
    ]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in results]


def calls(report: Path) -> list[str]:
    return json.loads(report.read_text())["calls"]


def loaded(report: Path) -> list[int]:
    """The example ids the process loaded for its training steps, in order."""
    return json.loads(report.read_text())["rows"]


def assert_own_rows(reports: Path, single: list[int], steps: range) -> None:
    """Each of the 2 processes loaded exactly its devices' rows of every step's global batch (process 0 rows
    0-1, process 1 rows 2-3 of 4: 2 devices each), the global batches being those of 1 process (`single`)."""
    per_step = [single[4 * s:4 * s + 4] for s in steps]
    assert loaded(reports / "p0.json") == [i for b in per_step for i in b[:2]]
    assert loaded(reports / "p1.json") == [i for b in per_step for i in b[2:]]


def assert_same_lora(a: Path, b: Path, atol: float) -> None:
    ta, tb = io.read_safetensors(a), io.read_safetensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_allclose(np.asarray(ta[k], np.float32), np.asarray(tb[k], np.float32), rtol=0, atol=atol,
                                   err_msg=k)


@pytest.mark.slow
def test_two_processes_train_the_same_lora_as_one(model, tmp_path):
    shapes = make_shapes(tmp_path / "shapes")
    common = ["--data", str(shapes), "--model", str(model), *FLAGS]
    two, single, resumed = tmp_path / "two", tmp_path / "single", tmp_path / "resumed"
    procs = two_processes(common, two, tmp_path)
    procs.append(start([*common, "--out", str(single)], tmp_path / "single.json", env_with(4, SDJAX_CACHE_DIR="off")))
    stdout = finish(procs)
    # process 0 reports (gloo's C++ logs "[Gloo] ..." lines on stdout too)
    assert f"trained {STEPS} steps" in stdout[0] and "trained" not in stdout[1]

    export = two / "lora.safetensors"
    assert_same_lora(export, single / "lora.safetensors", atol=1e-5)
    ups = {k: v for k, v in io.read_safetensors(export).items() if "lora_B" in k or "lora_up" in k}
    assert ups and max(float(np.max(np.abs(v))) for v in ups.values()) > 1e-4  # moved from init (up = 0)

    # Process 0 alone wrote: the latent cache and the export, one sample, one metrics line per step; process 1
    # found the cache process 0 had written (a shared disk) and wrote nothing.
    assert sorted(calls(tmp_path / "p0.json")) == sorted(["write_safetensors"] * 2 + ["save"] + ["write"] * STEPS)
    assert calls(tmp_path / "p1.json") == []
    assert calls(tmp_path / "single.json") == calls(tmp_path / "p0.json")
    single_rows = loaded(tmp_path / "single.json")
    assert len(single_rows) == 4 * STEPS
    assert_own_rows(tmp_path, single_rows, range(STEPS))
    lines = [json.loads(ln) for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    single_lines = [json.loads(ln) for ln in (single / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in lines], [r["loss"] for r in single_lines], rtol=1e-5)
    assert [p.name for p in (two / "samples").iterdir()] == ["update-000004-0.png"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]

    # Resume in 2 processes from the mid-run checkpoint (as if killed after step 2): the same LoRA. (Without
    # samples this time, a setting a resumed run may change: one compilation less.)
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("4", "lora.safetensors", "samples"))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2"]
    finish(two_processes([*common, "--sample-every", "0"], resumed, tmp_path))
    assert_same_lora(resumed / "lora.safetensors", export, atol=1e-6)
    assert [json.loads(ln)["step"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, STEPS + 1))
    assert sorted(calls(tmp_path / "p0.json")) == sorted(["write_safetensors"] + ["write"] * (STEPS - 2))
    assert calls(tmp_path / "p1.json") == []
    assert_own_rows(tmp_path, single_rows, range(2, STEPS))  # from the checkpoint's (global) data position
