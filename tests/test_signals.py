"""Ctrl-C, SIGTERM and SIGKILL against `sdjax generate` in subprocesses: exit 130/143 with one line, at once,
nothing partial left; a killed run's temp files are removed by the next run in that folder.

Each run is a small driver that installs the same signal handling as the `sdjax` command, patches one point
(loading, sampling, writing) to print a mark and wait there, and runs `sdjax.cli.main`. The test waits for the
mark and sends the signal, so it lands at that point every time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdjax import tempfiles

ROOT = Path(__file__).resolve().parents[1]
HOLD_S = 120  # how long the patched point waits; far longer than a test allows for the exit

DRIVER = r"""
import os, sys, time
from sdjax import process
process.exit_on_interrupt()
from sdjax import checkpoint, cli, pipeline, pngmeta

point, hold = sys.argv[1], float(sys.argv[2])

def mark():
    print("MARK", flush=True)
    time.sleep(hold)

if point == "load":
    load = checkpoint.load
    def slow_load(*args, **kwargs):
        mark()
        return load(*args, **kwargs)
    checkpoint.load = slow_load
elif point == "sampling":
    # The progress callback runs on an XLA thread inside the jitted loop: while it holds, the main thread is
    # blocked in C++ waiting for the computation, where Python-level signal handlers never run.
    class Bar:  # a silent progress bar
        update = close = lambda self, *args: None
    pipeline._want_progress = lambda progress: True
    pipeline._progress_bar.__enter__ = lambda self: (self.hook.start(Bar(), self.first), self)[1]
    pipeline._Progress.__call__ = lambda self, i: mark() if int(i) == 1 else None
elif point == "write":
    publish = pngmeta._publish
    def slow_publish(tmp, path, exclusive):
        mark()  # the temp file is complete and fsynced, not yet renamed
        return publish(tmp, path, exclusive)
    pngmeta._publish = slow_publish
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def generate_args(model, out: Path, cache_dir: str) -> list[str]:
    return ["generate", "a cat", "--model", str(model), "--out", str(out), "--cache-dir", cache_dir, "--seed", "3",
            "--height", "64", "--width", "64", "--steps", "4", "--no-progress"]


def start(point: str, argv: list[str], hold: float = HOLD_S) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, point, str(hold), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def signal_at_mark(proc: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    """Waits for the driver's mark, sends `signum`; (exit status, stderr, seconds from signal to exit)."""
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line == "MARK\n", f"driver ended before its mark: {line!r} {proc.stderr.read()}"
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"signal {signum} did not end the process within 30 s") from None
    return proc.returncode, proc.stderr.read(), time.monotonic() - sent


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("point", ["load", "sampling", "write"])
def test_ctrl_c_exits_130_with_one_line_and_nothing_partial(point, tiny_sd_folder, cache_dir, tmp_path):
    out = tmp_path / "out"
    proc = start(point, generate_args(tiny_sd_folder, out, cache_dir))
    status, err, seconds = signal_at_mark(proc, signal.SIGINT)
    assert status == 130, err
    assert err == "sdjax: interrupted\n"  # one line: no traceback, no "Exception ignored", no segfault report
    assert seconds < HOLD_S / 4  # at once: not after the held point returns
    assert listing(out) == []  # no PNG and no temp file (the write case had a complete temp file at the signal)


def test_sigterm_during_sampling_exits_143(tiny_sd_folder, cache_dir, tmp_path):
    out = tmp_path / "out"
    status, err, _ = signal_at_mark(start("sampling", generate_args(tiny_sd_folder, out, cache_dir)), signal.SIGTERM)
    assert (status, err) == (143, "sdjax: terminated\n")
    assert listing(out) == []


def test_sigkill_during_write_leaves_a_temp_file_the_next_run_removes(tiny_sd_folder, cache_dir, tmp_path):
    out = tmp_path / "out"
    argv = generate_args(tiny_sd_folder, out, cache_dir)
    proc = start("write", argv)
    status, _, _ = signal_at_mark(proc, signal.SIGKILL)
    assert status == -signal.SIGKILL
    left = listing(out)
    assert len(left) == 1 and left[0].startswith(".00000-3.png.sdjax-") and left[0].endswith(".tmp"), left
    # The next run in that folder: the dead writer's temp file goes, the numbering is unaffected.
    proc = start("none", argv)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert listing(out) == ["00000-3.png"]


def test_entry_point_handles_ctrl_c_from_the_start(tiny_sd_folder, cache_dir, tmp_path):
    """`python -m sdjax` (the `sdjax` command's code) installs the handling before the heavy imports."""
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sdjax", *generate_args(tiny_sd_folder, out, cache_dir)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    time.sleep(1.0)  # importing jax / loading the model
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr is not None and proc.stderr.read() == "sdjax: interrupted\n"
    assert listing(out) == []


def test_remove_stale_keeps_live_and_foreign_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = tempfiles._host()
    stale = tmp_path / f".a.png.sdjax-{dead_pid}-{host}-{'0' * 12}.tmp"
    running = tmp_path / f".b.png.sdjax-{os.getppid()}-{host}-{'1' * 12}.tmp"  # pytest's parent: alive
    foreign = tmp_path / f".c.png.sdjax-{dead_pid}-{'f' * 8}-{'2' * 12}.tmp"  # another host: age decides
    legacy = tmp_path / f".d.png.{'3' * 12}.tmp"
    other = tmp_path / ".e.tmp"  # not a name sdjax writes
    for p in (stale, running, foreign, legacy, other):
        p.write_bytes(b"x")
    fd, mine = tempfiles.create(tmp_path / "f.png")  # this process's own, live
    os.close(fd)
    assert tempfiles.remove_stale(tmp_path) == [stale]
    day = tempfiles.FOREIGN_MAX_AGE_S
    removed = tempfiles.remove_stale(tmp_path, now=time.time() + day + 60)
    assert sorted(removed) == sorted([foreign, legacy])
    assert sorted(listing(tmp_path)) == sorted([running.name, other.name, Path(mine).name])
    tempfiles.release(mine)
    assert not Path(mine).exists()
