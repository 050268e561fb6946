"""`sdjax batch` / `sdjax.batch`: prompt files checked line by line before anything loads; a job's images equal
the API's; a job killed part-way (SIGKILL) and run again ends exactly as an uninterrupted one.

The 2-process run is in tests/test_multihost.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import batch, cli, pngmeta, tempfiles
from sdjax.batch import BatchJob, Defaults, PromptFileError

ROOT = Path(__file__).resolve().parents[1]
TINY = Defaults(steps=2, height=64, width=64)

# Two call shapes (64x64 x 2 steps with guidance; 48x64 x 3 steps), 7 images, seeds from --seed 10 except line 3.
JOB_LINES = [
    {"prompt": "a red cube", "num_images": 2},
    {"prompt": "a blue sphere", "seed": 77, "negative_prompt": "blurry"},
    {"prompt": "a green cone"},
    {"prompt": "a fox", "size": "48x64", "steps": 3, "num_images": 2},
    {"prompt": "a lighthouse"},
]


def write_job(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in JOB_LINES), encoding="utf-8")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def folder_state(out: Path) -> tuple[list[str], dict[str, bytes], str]:
    """(file names, decoded pixels of each PNG, manifest text): what two runs must agree on."""
    names = sorted(os.listdir(out))
    return names, {n: pixels(out / n).tobytes() for n in names if n.endswith(".png")}, \
        (out / batch.MANIFEST).read_text(encoding="utf-8")


# -- the prompt file (no model) ----------------------------------------------------------------------------------

def test_text_file_blank_lines_and_derived_seeds(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red cube\n\n  a blue sphere  \r\n{not json in a text file}\n", encoding="utf-8")
    job = BatchJob.from_file(f, Defaults(seed=4294967295, num_images=2))
    assert [(s.line, s.index, s.prompt, s.seed) for s in job.images] == [
        (1, 0, "a red cube", 4294967295), (1, 1, "a red cube", 0), (3, 0, "a blue sphere", 1),
        (3, 1, "a blue sphere", 2), (4, 0, "{not json in a text file}", 3), (4, 1, "{not json in a text file}", 4)]
    assert job.images[2].file == "000003-000.png"


def test_jsonl_fields_and_seeds(tmp_path):
    job = BatchJob.from_file(write_job(tmp_path / "job.jsonl"), Defaults(seed=10, steps=2, height=64, width=64))
    assert [(s.line, s.index, s.seed) for s in job.images] == [
        (1, 0, 10), (1, 1, 11), (2, 0, 77), (3, 0, 13), (4, 0, 14), (4, 1, 15), (5, 0, 16)]
    fox = job.images[4]
    assert (fox.height, fox.width, fox.steps, fox.negative_prompt) == (64, 48, 3, "")
    assert job.images[2].negative_prompt == "blurry"
    # grouped by call shape in order of first appearance, at most batch_size per call, file order within
    assert batch.calls(job.images, 2) == [[0, 1], [2, 3], [6], [4, 5]]


def test_bad_lines_reported_with_line_numbers(tmp_path):
    f = tmp_path / "job.jsonl"
    f.write_text("\n".join([
        '{"prompt": "fine"}',
        '{"prompt": "x", "sizee": 64}',
        "not json",
        '{"prompt": "y", "size": "64x63"}',
        "",
        '{"prompt": "z", "size": "big"}',
        '{"negative_prompt": "no prompt"}',
        '{"prompt": "s", "seed": -1}',
        '{"prompt": "t", "steps": 0}',
        '["a list"]',
        '{"prompt": "n", "num_images": 0}',
        '{"prompt": "g", "guidance_scale": "7"}',
        '{"prompt": "w", "size": 64, "width": 64}',
        '{"prompt": "fine too", "size": 64}',
    ]) + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        BatchJob.from_file(f, TINY)
    lines = [line for line, _ in info.value.errors]
    assert lines == [2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13]
    text = str(info.value).splitlines()
    assert text[0].endswith("job.jsonl:2: unknown field(s) 'sizee'; allowed: prompt, negative_prompt, seed, steps, "
                            "guidance_scale, size, height, width, scheduler, num_images")
    assert text[1].endswith(":3: invalid JSON: Expecting value (column 1)")
    assert "height must be a positive multiple of 8, got 63" in text[2]
    assert 'size must be an integer or "WIDTHxHEIGHT"' in text[3]
    assert text[4].endswith(':7: missing field "prompt"')
    assert "seed must be integers in [0, 4294967295], got -1" in text[5]
    assert "steps must be an integer >= 1" in text[6]
    assert "guidance_scale must be a finite number" in text[9]


def test_cli_reports_bad_lines_before_loading(tmp_path, capsys):
    f = tmp_path / "job.txt"
    f.write_bytes(b"fine\n\xff\xfe bad bytes\n")
    out = tmp_path / "out"
    # a model that does not exist: a status of 2 (not 1, a load failure) shows the file was checked first
    assert cli.main(["batch", str(f), "--out", str(out), "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"sdjax batch: error: {f}:2: not UTF-8 text (invalid start byte at byte 0)\n"
    assert not out.exists()


# -- runs on the tiny model --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    return write_job(tmp_path_factory.mktemp("job") / "job.jsonl")


@pytest.fixture(scope="module")
def label(tiny_sd_folder):
    return cli.model_label(str(tiny_sd_folder))


@pytest.fixture(scope="module")
def full_run(pipe, job_file, label, tmp_path_factory):
    """The uninterrupted reference run (API, 2 images per call on the 1 test device)."""
    from tests import reference as ref

    out = tmp_path_factory.mktemp("full") / "out"
    job = BatchJob.from_file(job_file, Defaults(seed=10, steps=2, height=64, width=64))
    with ref.count_compiles() as compiles:
        result = batch.run_batch(pipe, job, out, batch_size=2, model=label, progress=False)
    return job, out, result, len(compiles)


def test_batch_equals_per_image_txt2img(pipe, full_run, label):
    job, out, result, _ = full_run
    assert (result.skipped, result.total, len(result.written)) == (0, 7, 7)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [s.file for s in job.images] == sorted(p.name for p in result.written)
    for spec in job.images:
        gen = pipe.txt2img(spec.prompt, spec.negative_prompt, steps=spec.steps, guidance_scale=spec.guidance_scale,
                           height=spec.height, width=spec.width, seeds=[spec.seed], progress=False)
        got = pixels(out / spec.file)
        want = np.asarray(gen.images[0])
        # the same image made in a call of 2 instead of 1: float rounding may move a few values by one level
        assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 1e-3, spec.file
        assert pngmeta.read_text(out / spec.file) == pngmeta.infotext(gen, 0, model=label)
    assert not np.array_equal(pixels(out / "000001-000.png"), pixels(out / "000001-001.png"))  # seeds 10, 11
    manifest = [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]
    assert [m["file"] for m in manifest] == names
    assert manifest[2] == {"file": "000002-000.png", "line": 2, "image": 0, "prompt": "a blue sphere",
                           "negative_prompt": "blurry", "seed": 77, "steps": 2, "guidance_scale": 7.5, "width": 64,
                           "height": 64, "scheduler": "pndm", "model": label}


def test_each_shape_compiles_once(full_run):
    *_, compiles = full_run
    # 4 calls of 2 shapes (the 64x64 group's last call padded to 2): 2 sampling programs, and small helper
    # programs (no more than the first call of a shape compiles); a second compile per shape would add >= 2
    assert compiles <= 2 * 2 + 6


def test_rerun_repairs_a_damaged_folder(pipe, full_run, label, tmp_path):
    """A missing image in the middle of a call, a cut and duplicated manifest, a stale temp file: the rerun makes
    exactly the missing image (its call runs whole) and rebuilds the manifest."""
    job, out, _, _ = full_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "000003-000.png").unlink()  # second row of the second call
    lines = (copy / batch.MANIFEST).read_text().splitlines(keepends=True)
    (copy / batch.MANIFEST).write_text(lines[0] + lines[0] + lines[1][:20])
    # a temp file of a killed writer on this host (pid 999999999 is beyond any pid_max)
    stale = copy / f".000004-000.png.sdjax-999999999-{tempfiles._host()}-0123456789ab.tmp"
    stale.write_bytes(b"partial")
    result = batch.run_batch(pipe, job, copy, batch_size=2, model=label, progress=False)
    assert [p.name for p in result.written] == ["000003-000.png"] and result.skipped == 6
    assert folder_state(copy) == folder_state(out)


def test_other_job_in_folder_is_an_error(pipe, full_run, label, tmp_path):
    job, out, _, _ = full_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    other = BatchJob.from_file(batch.pathlib.Path(job.source), Defaults(seed=11, steps=2, height=64, width=64))
    with pytest.raises(batch.BatchConflictError, match="000001-000.png"):
        batch.run_batch(pipe, other, copy, batch_size=2, model=label, progress=False)
    assert folder_state(copy) == folder_state(out)  # nothing written


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(pipe, full_run, job_file, tiny_sd_folder, tmp_path):
    """`sdjax batch` killed with SIGKILL after its first image, then run again: the same folder as the
    uninterrupted run: names, pixels, manifest; no duplicates, no temp files."""
    _, reference, _, _ = full_run
    out = tmp_path / "out"
    argv = ["batch", str(job_file), "--out", str(out), "--model", str(tiny_sd_folder), "--seed", "10",
            "--steps", "2", "--height", "64", "--width", "64", "--batch-size", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # its own empty compilation cache: the second shape compiles for seconds, so the kill lands part-way
    cmd = [sys.executable, "-m", "sdjax", *argv, "--cache-dir", str(tmp_path / "xla")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    done = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(done) < 7, done  # really part-way
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "xla")]) == 0  # the same command again
    assert folder_state(out) == folder_state(reference)
    names, _, manifest = folder_state(out)
    assert not [n for n in names if n.startswith(".")]
    assert len(set(manifest.splitlines())) == len(manifest.splitlines()) == 7
