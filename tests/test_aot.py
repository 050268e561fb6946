"""Ahead-of-time compiles for TPU and GPU targets on compile-only devices (libtpu and the CUDA plugin, no chips).

Tiny models at 256x256: the UNet's first block then has 32x32 = 1024 latent positions, long enough for the
flash kernels (Pallas on TPU, cuDNN on GPU), and the VAE's mid-block attention too.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import aot, cli, layers, targets
from sdjax.aot import JOBS

SIZE = 256
LONG = 1024  # keys of the tiny UNet's first block at SIZE: (256 / 8) ** 2


def check(job: str, target: str, **kw) -> aot.Report:
    model = "tiny-inpaint" if job == "inpaint" else "tiny"
    return aot.compile_check(job, target, model=model, size=SIZE, steps=3, **kw)


def kernels(report: aot.Report) -> dict[tuple[int, int], set[str]]:
    """(query length, key length) -> the implementations chosen for layers of those lengths."""
    out: dict[tuple[int, int], set[str]] = {}
    for rec in report.attention:
        out.setdefault((rec["q"][1], rec["k"][1]), set()).add(rec["implementation"])
    return out


@pytest.mark.parametrize("target", ["tpu:v5e-4", "tpu:v5e-1"])
@pytest.mark.parametrize("job", JOBS)
def test_tpu_jobs_compile_with_the_pallas_kernel(job, target):
    report = check(job, target)
    n = targets.parse(target).num_devices
    assert report.devices == f"{n} x TPU v5 lite"
    assert report.batch == n and report.fits
    assert 0 < report.argument_bytes and 0 < report.per_device_bytes < report.capacity_bytes
    chosen = kernels(report)
    # every self-attention over 1024 positions (UNet first block, VAE mid block) runs the Pallas kernel ...
    long = {impl for (lq, lk), impls in chosen.items() if lq == LONG and lk == LONG for impl in impls}
    assert long == {"pallas_tpu"}
    # ... and the short ones (77 text tokens, 16x16 and 8x8 blocks) the plain form
    assert all(impls == {"xla"} for (lq, lk), impls in chosen.items() if lk < layers.BLOCKED_MIN_KEYS)
    # the kernel is really in the executable, as a TPU custom call (not silently replaced)
    assert "tpu_custom_call" in report.custom_calls


@pytest.mark.parametrize("job", JOBS)
def test_gpu_jobs_compile_with_cudnn_attention(job):
    report = check(job, "gpu:h100x2")
    assert report.devices == "2 x NVIDIA H100 80GB HBM3" and report.fits
    # bf16 and head_dim <= 128 everywhere: cuDNN's fused attention, except where this cuDNN build refuses the
    # shapes while tracing: the training step's 77-key cross-attention (its backward pass), which then runs the
    # plain form and is reported as such
    for rec in report.attention:
        want = {"cudnn", "xla"} if job == "train-lora" and rec["k"][1] == 77 else {"cudnn"}
        assert rec["implementation"] in want, rec
    assert any(r["implementation"] == "cudnn" and r["k"][1] == LONG for r in report.attention)
    assert "__cudnn$fmhaSoftmax" in report.custom_calls
    assert report.estimated_cycles is None  # XLA:GPU writes no cycle estimates into the HLO


@pytest.mark.parametrize("target", ["tpu:v5e-4", "gpu:h100x2"])
@pytest.mark.parametrize("job", ["txt2img", "inpaint"])
def test_controlnet_jobs_compile(job, target):
    """Two ControlNets in the loop (each under lax.cond) compile for a 4-chip TPU mesh with the Pallas kernel
    and for 2 GPUs with cuDNN attention; the ControlNets' own long attention gets the same kernel."""
    plain = check(job, target)
    report = check(job, target, controlnets=2)
    assert report.controlnets == 2 and report.fits and "2 ControlNet(s)" in report.format()
    kernel = "pallas_tpu" if target.startswith("tpu") else "cudnn"
    long = [r for r in report.attention if r["k"][1] == LONG]
    # the UNet's long self-attention layers, and as many again per ControlNet (its copy of the down blocks)
    plain_long = [r for r in plain.attention if r["k"][1] == LONG]
    assert len(long) > len(plain_long) and {r["implementation"] for r in long} == {kernel}
    assert report.argument_bytes > plain.argument_bytes  # the ControlNets' params are arguments
    assert ("tpu_custom_call" if kernel == "pallas_tpu" else "__cudnn$fmhaSoftmax") in report.custom_calls


def test_compiler_options_follow_the_mesh():
    from sdjax import parallel

    assert parallel.compiler_options(targets.parse("gpu:h100").mesh()) == {"xla_gpu_enable_triton_gemm": False}
    assert parallel.compiler_options(targets.parse("tpu:v5e-1").mesh()) is None
    assert parallel.compiler_options(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))) is None


def test_optimization_effort_reaches_xla():
    """XLA's exec_time_optimization_effort goes with the target's own options; below -0.4 the TPU backend skips
    memory-space assignment and emits much less code (what makes the full SD1.5 compile ~5x faster)."""
    from sdjax import parallel

    tpu, gpu = targets.parse("tpu:v5e-1").mesh(), targets.parse("gpu:h100").mesh()
    assert parallel.compiler_options(tpu, -0.5) == {"exec_time_optimization_effort": -0.5}
    assert parallel.compiler_options(gpu, -1) == {"xla_gpu_enable_triton_gemm": False,
                                                  "exec_time_optimization_effort": -1.0}
    assert parallel.compiler_options(tpu, 0.0) is None
    for bad in (1.5, -2, float("nan"), True, "fast", None):
        with pytest.raises(ValueError, match=r"optimization_effort must be a number in \[-1, 1\]"):
            parallel.compiler_options(tpu, bad)
    default = check("txt2img", "tpu:v5e-1")
    fast = check("txt2img", "tpu:v5e-1", optimization_effort=-0.5)
    assert default.optimization_effort == 0.0 and fast.optimization_effort == -0.5
    assert fast.code_bytes < 0.9 * default.code_bytes and fast.fits
    assert "(optimization effort -0.5)" in fast.format() and "optimization effort" not in default.format()
    # the TPU compiler's own run-time estimate (sum of its per-fusion cycle estimates) is reported for both
    assert default.estimated_cycles > 0 and fast.estimated_cycles > 0
    assert "XLA's run-time estimate:" in fast.format()
    assert fast.to_dict()["optimization_effort"] == -0.5
    train = check("train-lora", "tpu:v5e-1", optimization_effort=-1.0)  # the train step takes it too
    assert train.optimization_effort == -1.0 and train.code_bytes < default.code_bytes + fast.code_bytes


def test_full_precision_gpu_avoids_cudnn_attention():
    report = check("txt2img", "gpu:h100", dtype="float32")
    impls = {(r["k"][1] >= layers.BLOCKED_MIN_KEYS, r["implementation"]) for r in report.attention}
    assert impls == {(True, "blocked"), (False, "xla")}
    assert "__cudnn$fmhaSoftmax" not in report.custom_calls


def test_override_and_report_format(tmp_path):
    report = check("txt2img", "tpu:v5e-1", attention="xla")
    assert {r["implementation"] for r in report.attention} == {"xla"}
    assert "tpu_custom_call" not in report.custom_calls
    text = report.format()
    assert "fits" in text and "compile:" in text and "attention" in text and "xla " in text
    aot.write_json([report], tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved[0]["fits"] is True and saved[0]["per_device_bytes"] == report.per_device_bytes


@pytest.mark.parametrize("kwargs, match", [
    (dict(job="img2vid"), "job 'img2vid' is not known"),
    (dict(target="tpu:v9-8"), "target 'tpu:v9-8' is not known; choose one of tpu:v5e-1"),
    (dict(target="gpu:h100x3"), "target 'gpu:h100x3' is not known"),
    (dict(size=100), "size must be a multiple of 64"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(dtype="float8"), "dtype"),
    (dict(attention="flash"), "attention 'flash' is not one of"),
    (dict(model="no/such/folder"), "neither a known name"),
    (dict(job="inpaint", model="tiny"), "9-channel"),
    (dict(controlnets=9), r"controlnets must be an integer in \[0, 8\]"),
    (dict(job="train-lora", controlnets=1), "generation jobs only"),
    (dict(optimization_effort=-1.5), r"optimization_effort must be a number in \[-1, 1\]"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(job="txt2img", target="tpu:v5e-1", model="tiny", size=SIZE)
    with pytest.raises(ValueError, match=match):
        aot.compile_check(**{**args, **kwargs})


def test_cli_reports_and_exit_status(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    args = ["compile-check", "--model", "tiny", "--size", str(SIZE), "--steps", "2", "--target", "tpu:v5e-1"]
    assert cli.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "job txt2img on tpu:v5e-1" in printed and "fits" in printed and "pallas_tpu" in printed
    assert json.loads(out.read_text())[0]["job"] == "txt2img"
    # a chip too small for the program: reported, exit status 1
    small = dataclasses.replace(targets.TPU_CHIPS["v5e"], hbm_bytes=1 << 20)
    monkeypatch.setitem(targets.TPU_CHIPS, "v5e", small)
    assert cli.main(args) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    # bad names: exit 2 naming the flag, nothing compiled
    assert cli.main(["compile-check", "--target", "tpu:v9"]) == 2
    assert "--target" in capsys.readouterr().err
    assert cli.main(["compile-check", "--job", "bake"]) == 2
    assert "--job" in capsys.readouterr().err
    assert cli.main(["compile-check", "--optimization-effort", "2"]) == 2
    assert "--optimization-effort: must be a number in [-1, 1]" in capsys.readouterr().err


def _reference_kernel(calls):
    """Stands in for the Pallas TPU kernel on CPU: checks what it is handed, computes plain attention."""
    def flash_attention(q, k, v, causal=False, sm_scale=1.0):  # [B, H, L, D]
        calls.append((q.shape, sm_scale))
        assert q.shape[-1] <= 128 or q.shape[-1] % 128 == 0
        s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
    return flash_attention


@pytest.mark.parametrize("head_dim", [40, 160])
def test_pallas_path_pads_head_dim_and_runs_per_shard(monkeypatch, head_dim):
    """Padding (head_dim 160 -> 256), the scale of the true head_dim and the shard_map wrapping are exact:
    checked on CPU with the kernel replaced by plain attention (the kernel itself needs a TPU)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    calls = []
    monkeypatch.setattr(tpu_flash, "flash_attention", _reference_kernel(calls))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 2, head_dim)), jnp.float32) for _ in range(3))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    config = layers.AttentionConfig("tpu", "pallas_tpu", mesh=mesh)
    out = jax.jit(lambda q, k, v: layers.attention(q, k, v, config=config))(q, k, v)
    ref = layers.attention(q, k, v, implementation="xla")
    assert calls and calls[0][0][-1] == (256 if head_dim == 160 else head_dim)
    assert calls[0][1] == pytest.approx(1 / np.sqrt(head_dim))
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-5
    assert np.abs(np.asarray(ref)).max() > 0.1  # the compared output is not trivially zero
