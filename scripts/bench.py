"""sdjax against the PyTorch reference (diffusers' StableDiffusionPipeline), side by side, on one checkpoint.

    python scripts/bench.py                       # 512x512, 20 steps, batch 1, fp32, on whatever backend is here
    python scripts/bench.py --size 256 --steps 4 --repeats 2 --parts unet   # quick UNet-forward loop
    python scripts/bench.py --dtype bfloat16 --size 512 --steps 50 --batch 8 # accelerator run (see bench_gpu.sh)
    python scripts/bench.py --controlnets 1 --parts txt2img                  # txt2img with a ControlNet

Both frameworks get the same checkpoint (a random-initialised SD1.5-architecture one built with diffusers and
cached on disk, `scripts/make_random_sd15.py`; `--model` takes a real diffusers folder instead), prompt, size,
steps, scheduler, guidance scale and dtype. Each framework runs in its own worker subprocess (so peak RSS does
not mix and neither pays for the other's imports); the parent drives both and interleaves them, measurement by
measurement, so load from other processes on the machine falls on both alike. Medians over `--repeats`.

Measured per framework:
  load        checkpoint -> pipeline ready in memory (both workers idle, the files in the page cache)
  first_call  the first whole txt2img call (sdjax: trace + compile + run, with an empty compilation cache)
  compile     sdjax: trace + lower + XLA compile time of that first call (jax.monitoring events)
  clip        text encoding of the batch's prompts and negative prompts (tokenising included)
  unet        one UNet forward on the CFG batch (2 x batch)
  vae         VAE decode of the batch's latents
  txt2img     the whole call, warm (medians over --full-repeats)
  warm_ready  a second, fresh process: time from its start until the txt2img executable is ready (imports, load,
              compile served from the persistent cache); warm_first_image: until its first image is ready
  peak_rss    VmHWM of the worker during steady txt2img calls (reset before each), during the first call, and
              of the whole worker process; on GPUs also the device's peak bytes
With --controlnets N, txt2img runs with N ControlNets (a random SD1.5 ControlNet, `make_random_sd15.py
--controlnet`, used N times, on one control image) against diffusers' StableDiffusionControlNetPipeline.
Printed too: the model's FLOPs per image from XLA's cost analysis (CLIP + steps x UNet + VAE, attention counted
as the plain form) and, on a GPU listed in PEAK_TFLOPS, the achieved fraction of the chip's dense peak.

Environment: on CPU, run it where nothing but a CPU install and the reference is installed,
    python -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]" && .venv-bench/bin/python scripts/bench.py
The test extra's jax[cuda12] and jax[tpu] runtimes are mapped into sdjax's worker even on CPU (0.3-0.4 GiB
resident; `jax_plugins`); the bench warns when it finds them and records them with the results.

Writes JSON (`--json`) with every raw time and the sdjax/torch ratios; `--write-readme` replaces the README
section between <!-- bench:start --> and <!-- bench:end --> with the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's sdjax, installed or not
DEFAULT_MODEL = ROOT / "bench_cache" / "sd15-random"
DEFAULT_CONTROLNET = ROOT / "bench_cache" / "sd15-random-controlnet"
PROMPT = "a photo of an astronaut riding a horse on mars"
PARTS = ("clip", "unet", "vae", "txt2img")
MSG = "@@bench "  # prefix of protocol lines on a worker's stdout (libraries may print other lines)

# Dense (no sparsity) peak TFLOP/s per chip, by dtype: vendor datasheets (SXM parts; PCIe H100 ~ 756 bf16).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}
# sdjax sampler name -> diffusers scheduler class, so both run the same sampler.
SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler", "ddpm": "DDPMScheduler",
}


# ---------------------------------------------------------------------------------------------------------------
# Worker side: one framework per process, commands as JSON lines on stdin, answers as MSG-prefixed JSON lines.


_PEAK_SO_FAR = [0.0]  # the process's peak across resets (a reset also clears ru_maxrss on Linux)


def _rss_reset() -> None:
    _PEAK_SO_FAR[0] = max(_PEAK_SO_FAR[0], _rss_peak())
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_peak() -> float:
    """VmHWM in bytes (since the last reset), or ru_maxrss where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss()


def _ru_maxrss() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r) * (1 if sys.platform == "darwin" else 1024)


def _process_peak() -> float:
    """Peak resident memory of the whole worker (loading included), across the per-call resets."""
    return max(_PEAK_SO_FAR[0], _rss_peak())


class SdjaxWorker:
    def __init__(self, a):
        self.a = a
        self.events: list[tuple[str, float, float]] = []  # (event, duration, wall time at its end)
        self.ahead: set[str] = set()  # micro parts compiled ahead of their first timed call
        import jax

        jax.monitoring.register_event_duration_secs_listener(
            lambda ev, d, **kw: self.events.append((ev, d, time.time())))
        self.jax = jax

    def load(self):
        import sdjax

        devices = self.jax.devices()[: self.a.devices] if self.a.devices else None
        self.pipe = sdjax.load_pipeline(self.a.model, dtype=self.a.dtype, devices=devices,
                                        compilation_cache=self.a.cache_dir, conv=self.a.conv)
        self.controls = None
        if self.a.controlnets:
            net = sdjax.load_controlnet(self.a.controlnet, dtype=self.a.dtype)
            self.controls = [sdjax.Control(net, control_image(self.a.size))] * self.a.controlnets
        return {"backend": self.jax.default_backend(), "devices": [str(d) for d in self.pipe.mesh.devices.flat],
                "conv": self.pipe.models.unet.attention.choose_conv(self.pipe.dtype),
                "device_kind": self.jax.devices()[0].device_kind}

    def _micro_inputs(self):
        import jax.numpy as jnp
        import numpy as np


        jax, pipe, a = self.jax, self.pipe, self.a
        m = pipe.models
        b = a.batch
        h, w = a.size // m.vae_scale, a.size // m.vae_scale
        rng = np.random.default_rng(0)
        params = jax.device_put(jax.tree.map(lambda x: x, pipe.params), jax.devices()[0])
        self.params = params
        self.fns = self._make_fns()
        self.args = {
            "unet": (jnp.asarray(rng.standard_normal((2 * b, h, w, m.latent_channels)), pipe.dtype),
                     jnp.full((2 * b,), 801.0, jnp.float32),
                     jnp.asarray(rng.standard_normal((2 * b, 77, m.text_encoder.config.hidden_size)), pipe.dtype)),
            "vae": (jnp.asarray(rng.standard_normal((b, h, w, m.latent_channels)), jnp.float32),),
        }

    def _make_fns(self, attention=None, conv=None, mesh=None):
        """Fresh jitted functions (new lambdas, so nothing is reused from an earlier trace); `attention` and
        `conv` override the attention and convolution kernels of every layer, `mesh` the devices they are for."""
        from sdjax import sampling

        jax, m = self.jax, self.pipe.models
        if attention is not None or conv is not None or mesh is not None:
            m = m.for_mesh(self.pipe.mesh if mesh is None else mesh, attention, conv)
        return {
            "clip": jax.jit(lambda p, ids: sampling.encode_text(m, p, ids)),
            "unet": jax.jit(lambda p, x, t, c: m.unet.apply({"params": p["unet"]}, x, t, c)),
            "vae": jax.jit(lambda p, z: sampling.decode(m, p, z)),
        }

    def _part_args(self, part):
        if part == "clip":
            return (self.params, self.pipe.tokenizer([PROMPT] * self.a.batch + [""] * self.a.batch))
        return (self.params, *self.args[part])

    def clip(self):
        return self.fns["clip"](*self._part_args("clip"))

    def unet(self):
        return self.fns["unet"](*self._part_args("unet"))

    def vae(self):
        return self.fns["vae"](*self._part_args("vae"))

    def txt2img(self):
        a = self.a
        return self.pipe.txt2img([PROMPT] * a.batch, steps=a.steps, guidance_scale=7.5, height=a.size,
                                 width=a.size, seeds=0, scheduler=a.scheduler, progress=False,
                                 controls=self.controls)

    def run(self, part):
        """Times one call of `part` (results synchronised); the first call of a micro part also compiles it."""
        if part != "txt2img" and not hasattr(self, "fns"):
            self._micro_inputs()
        if part != "txt2img" and part not in self.ahead:
            # Compiled before the first timed call, then malloc's free memory handed back, as the pipeline does for
            # its jobs (`Pipeline._compile`): the bench's own programs would otherwise add their compilers'
            # leftovers (about 0.3 GiB in fp32) to the worker's peak resident memory, which the txt2img path has not.
            from sdjax import process

            self.fns[part].lower(*self._part_args(part)).compile()
            process.release_free_heap()
            self.ahead.add(part)
        t0 = time.perf_counter()
        out = getattr(self, part)()
        if part != "txt2img":
            self.jax.block_until_ready(out)
        return time.perf_counter() - t0

    def first_call(self):
        self.events.clear()
        t0 = time.perf_counter()
        self.txt2img()
        first = time.perf_counter() - t0
        sums = {}
        for ev, d, _ in self.events:
            sums[ev] = sums.get(ev, 0.0) + d
        compile_s = sum(sums.get(f"/jax/core/compile/{k}", 0.0) for k in
                        ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration"))
        return {"first_call_s": first, "compile_s": compile_s, "compile_events": sums}

    def flops(self):
        """FLOPs per image from XLA's cost analysis of each component, attention in its plain form (a blocked
        attention's `scan` body would be counted once, not once per key block).

        Always counted on the CPU's lowering of the same programs, whatever the backend: custom calls carry no
        FLOP count, and a GPU executable's analysis leaves out every cuDNN convolution (jax 0.11 on an H200 gave
        0.17 TFLOP for a UNet call of 1.58), while the program's arithmetic does not depend on the device."""
        import jax.numpy as jnp

        from sdjax import parallel

        jax = self.jax
        if not hasattr(self, "fns"):
            self._micro_inputs()
        a = self.a
        cpu = jax.devices("cpu")[0]
        fns = self._make_fns(attention="xla", conv="xla", mesh=parallel.make_mesh([cpu]))

        def on_cpu(tree):
            sharding = jax.sharding.SingleDeviceSharding(cpu)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

        ids = jnp.asarray(self.pipe.tokenizer([PROMPT] * 2 * a.batch))
        out = {}
        for part, args in (("clip", (ids,)), ("unet", self.args["unet"]), ("vae", self.args["vae"])):
            cost = _first(fns[part].lower(*on_cpu((self.params, *args))).cost_analysis()) or {}
            out[part] = float(cost.get("flops", 0.0))
        calls = _unet_calls(a.scheduler or "pndm", a.steps)
        per_image = (out["clip"] + calls * out["unet"] + out["vae"]) / a.batch
        return {"flops_components": out, "unet_calls": calls, "flops_per_image": per_image}

    def device_peak(self):
        try:
            return float(self.jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0.0))
        except Exception:  # CPU devices have no memory stats
            return None


def _first(cost):
    """A cost analysis as one dict (jax returns a dict, a one-element list of dicts, or None)."""
    return cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or None)


def control_image(size: int):
    """A fixed control image: white edges (a grid of circles) on black, size x size RGB."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    ring = np.abs(np.hypot((xx * 4) % 1 - 0.5, (yy * 4) % 1 - 0.5) - 0.3) < 0.02
    return Image.fromarray(np.repeat((ring * 255).astype(np.uint8)[..., None], 3, axis=-1))


def _unet_calls(scheduler: str, steps: int) -> int:
    # diffusers' PNDM with skip_prk_steps makes steps + 1 UNet calls (one extra at the start); the rest `steps`.
    return steps + 1 if scheduler == "pndm" else steps


class TorchWorker:
    def __init__(self, a):
        import torch

        torch.set_grad_enabled(False)
        self.torch, self.a = torch, a
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def load(self):
        import diffusers

        torch, a = self.torch, self.a
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
        extra: dict = {}
        cls = diffusers.StableDiffusionPipeline
        if a.controlnets:
            net = diffusers.ControlNetModel.from_pretrained(a.controlnet, torch_dtype=dtype)
            extra["controlnet"] = net if a.controlnets == 1 else [net] * a.controlnets
            cls = diffusers.StableDiffusionControlNetPipeline
            self.control = control_image(a.size) if a.controlnets == 1 else [control_image(a.size)] * a.controlnets
        pipe = cls.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                                   **extra)
        if a.scheduler:
            cls = getattr(diffusers, SCHEDULERS[a.scheduler])
            extra = {"use_karras_sigmas": True} if a.scheduler == "dpmpp_2m_karras" else {}
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype
        info = {"backend": self.device, "threads": torch.get_num_threads()}
        if self.device == "cuda":
            info["device_kind"] = torch.cuda.get_device_name(0)
        return info

    def _micro_inputs(self):
        torch, a, pipe = self.torch, self.a, self.pipe
        g = torch.Generator().manual_seed(0)
        s = a.size // pipe.vae_scale_factor
        b = a.batch
        self.args = {
            "unet": (torch.randn(2 * b, 4, s, s, generator=g).to(self.device, self.dtype),
                     torch.full((2 * b,), 801.0).to(self.device),
                     torch.randn(2 * b, 77, pipe.text_encoder.config.hidden_size, generator=g).to(
                         self.device, self.dtype)),
            "vae": torch.randn(b, 4, s, s, generator=g).to(self.device, self.dtype),
        }

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def clip(self):
        b = self.a.batch
        return self.pipe.encode_prompt([PROMPT] * b, self.device, 1, True, negative_prompt=[""] * b)

    def unet(self):
        x, t, c = self.args["unet"]
        return self.pipe.unet(x, t, encoder_hidden_states=c).sample

    def vae(self):
        z = self.args["vae"] / self.pipe.vae.config.scaling_factor
        return (self.pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    def txt2img(self):
        a = self.a
        g = self.torch.Generator(self.device).manual_seed(0)
        extra = {"image": self.control} if a.controlnets else {}
        return self.pipe([PROMPT] * a.batch, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size,
                         width=a.size, generator=g, **extra).images

    def run(self, part):
        if part != "txt2img" and not hasattr(self, "args"):
            self._micro_inputs()
        self.sync()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            getattr(self, part)()
        self.sync()
        return time.perf_counter() - t0

    def first_call(self):
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            self.txt2img()
        self.sync()
        return {"first_call_s": time.perf_counter() - t0}

    def device_peak(self):
        return float(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else None


def worker_main(a) -> None:
    """`--worker sdjax|torch`: serve the parent's commands until 'quit'."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to stderr; stdout carries the protocol only

    def reply(obj):
        out.write(MSG + json.dumps(obj) + "\n")
        out.flush()

    w = SdjaxWorker(a) if a.worker == "sdjax" else TorchWorker(a)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                reply({"process_peak_rss": _process_peak(), "device_peak_bytes": w.device_peak()})
                return
            if op == "ping":
                reply({})
            elif op == "load":
                t0 = time.perf_counter()
                info = w.load()
                reply({"load_s": time.perf_counter() - t0, **info})
            elif op == "first_call":
                _rss_reset()
                res = w.first_call()
                reply({**res, "peak_rss": _rss_peak()})
            elif op == "run":
                _rss_reset()
                s = w.run(cmd["part"])
                reply({"s": s, "peak_rss": _rss_peak()})
            elif op == "flops":
                reply(w.flops() if hasattr(w, "flops") else {})
            else:
                reply({"error": f"unknown op {op}"})
        except Exception as e:  # report and keep serving: one failing part should not lose the others
            import traceback

            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"})


def warm_main(a) -> None:
    """`--warm sdjax|torch`: a fresh process that loads and makes one image; prints wall-clock milestones."""
    t_start = time.time()
    marks = {"start": t_start}
    out = sys.stdout
    sys.stdout = sys.stderr
    if a.warm == "sdjax":
        events = []
        import jax

        jax.monitoring.register_event_duration_secs_listener(lambda ev, d, **kw: events.append((ev, d, time.time())))
        import sdjax

        marks["imported"] = time.time()
        pipe = sdjax.load_pipeline(a.model, dtype=a.dtype, compilation_cache=a.cache_dir, conv=a.conv,
                                   devices=jax.devices()[: a.devices] if a.devices else None)
        marks["loaded"] = time.time()
        events.clear()
        pipe.txt2img([PROMPT] * a.batch, steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size, seeds=0,
                     scheduler=a.scheduler, progress=False)
        marks["first_image"] = time.time()
        compile_ends = [t for ev, _, t in events if ev.startswith(("/jax/core/compile/", "/jax/compilation_cache/"))]
        marks["ready"] = max(compile_ends) if compile_ends else marks["loaded"]
        extra = {"compile_events": {ev: d for ev, d, _ in events}}
    else:
        import torch

        torch.set_grad_enabled(False)
        import diffusers

        marks["imported"] = time.time()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            a.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        marks["loaded"] = marks["ready"] = time.time()
        if not a.warm_ready_only:
            pipe([PROMPT] * a.batch, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size,
                 generator=torch.Generator(device).manual_seed(0))
            if device == "cuda":
                torch.cuda.synchronize()
        marks["first_image"] = time.time()
        extra = {}
    out.write(MSG + json.dumps({"marks": marks, **extra}) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------------------------------
# Parent side.


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MSG):
                res = json.loads(line[len(MSG):])
                if "error" in res:
                    print(f"[{self.name}] {cmd}: {res['error']}", file=sys.stderr)
                return res
        raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}) during {cmd}")

    def close(self) -> dict:
        try:
            res = self.ask(op="quit")
        except Exception:
            res = {}
        self.proc.wait(timeout=120)
        return res


def _read_files(folder: Path) -> None:
    """Reads `folder` (a checkpoint folder or file) once, so that it is in the page cache."""
    for path in [folder] if folder.is_file() else sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def _worker_argv(a) -> list[str]:
    argv = ["--model", str(a.model), "--size", str(a.size), "--steps", str(a.steps), "--batch", str(a.batch),
            "--dtype", a.dtype, "--cache-dir", str(a.cache_dir)]
    if a.conv:
        argv += ["--conv", a.conv]
    if a.devices:
        argv += ["--devices", str(a.devices)]
    if a.scheduler:
        argv += ["--scheduler", a.scheduler]
    if a.controlnets:
        argv += ["--controlnets", str(a.controlnets), "--controlnet", str(a.controlnet)]
    return argv


def _env(a, framework: str) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if framework == "sdjax" and a.devices and a.devices > 1 and a.cpu_devices:
        flags = env.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={a.devices}".strip()
    return env


def ensure_checkpoint(model: Path) -> Path:
    if (model / "model_index.json").exists():
        return model
    print(f"building the random SD1.5 checkpoint at {model} (once; reused afterwards)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_sd15.py"), str(model)], check=True,
                   cwd=ROOT)
    return model


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def jax_plugins() -> list[str]:
    """The accelerator runtimes jax would load in this environment, from package metadata alone (nothing imported):
    PJRT plugins (the `jax_plugins` entry points: jax[cuda12]'s) and libtpu (jax[tpu]). jax maps their libraries
    into every process that initialises a backend, CPU-only ones included: measured on this bench's machine, an
    environment with both resides 0.38 GiB more after `jax.devices()` than a CPU install (0.30 GiB with
    JAX_PLATFORMS=cpu, which skips libtpu but not the CUDA plugin). CPU memory figures from such an environment
    are not what a CPU user's install (`pip install -e ".[cpu]"`) has; the `bench` extra makes one that is."""
    from importlib import metadata

    found = sorted({e.dist.name if e.dist else e.name for e in metadata.entry_points(group="jax_plugins")})
    try:
        metadata.version("libtpu")
        found.append("libtpu")
    except metadata.PackageNotFoundError:
        pass
    return found


def machine_info(workers_info: dict) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    from importlib import metadata

    for pkg in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    info["jax_plugins"] = jax_plugins()
    info.update(workers_info)
    return info


def _has_accelerator() -> bool:
    """An NVIDIA GPU or a TPU on this machine, judged from /dev without importing jax (the parent process stays
    free of it)."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/accel0").exists() or any(Path("/dev").glob("vfio/[0-9]*"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_warm(a, framework: str, ready_only: bool = False) -> dict:
    argv = _worker_argv(a) + (["--warm-ready-only"] if ready_only else [])
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--warm", framework, *argv], stdout=subprocess.PIPE, text=True,
                          env=_env(a, framework), cwd=ROOT)
    res = next((json.loads(line[len(MSG):]) for line in proc.stdout.splitlines() if line.startswith(MSG)), None)
    if res is None:
        return {"error": f"warm {framework} process failed (code {proc.returncode})"}
    marks = res["marks"]
    out = {k + "_s": marks[k] - t0 for k in ("imported", "loaded", "ready", "first_image")}
    out["events"] = res.get("compile_events", {})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="diffusers folder (built if it is the default "
                   "random checkpoint and missing)")
    p.add_argument("--size", type=int, default=512, help="image height and width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--conv", default=None, choices=("xla", "onednn"),
                   help="sdjax's convolution kernel (default: its own choice, oneDNN's on CPU where installed)")
    p.add_argument("--devices", type=int, default=0, help="sdjax devices (0: all); on CPU, >1 simulates devices")
    p.add_argument("--cpu-devices", action="store_true", help="with --devices N on CPU: force N host devices")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="default: the checkpoint's")
    p.add_argument("--controlnets", type=int, default=0, help="txt2img with this many ControlNets (default 0)")
    p.add_argument("--controlnet", type=Path, default=DEFAULT_CONTROLNET,
                   help="the ControlNet folder (built if it is the default random one and missing)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each micro part (clip, unet, vae)")
    p.add_argument("--full-repeats", type=int, default=2, help="timed warm runs of the whole txt2img call")
    p.add_argument("--parts", default="clip,unet,vae,txt2img,warm",
                   help="comma list of clip, unet, vae, txt2img (includes the first call), warm")
    p.add_argument("--frameworks", default="sdjax,torch")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="persistent compilation cache for this run (default: a fresh folder, removed at the end)")
    p.add_argument("--json", type=Path, default=ROOT / "bench_cache" / "bench.json")
    p.add_argument("--write-readme", action="store_true", help="replace the README's bench section")
    p.add_argument("--worker", choices=("sdjax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--warm", choices=("sdjax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--warm-ready-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(a)
    if a.warm:
        return warm_main(a)

    parts = [x for x in a.parts.split(",") if x]
    frameworks = [x for x in a.frameworks.split(",") if x]
    runtimes = jax_plugins()
    if "sdjax" in frameworks and runtimes and not _has_accelerator():
        _log("warning: this environment has jax accelerator runtimes installed (" + ", ".join(runtimes)
             + "): jax maps their libraries into sdjax's worker on CPU too (~0.3-0.4 GiB of its resident memory), "
             "which a CPU install does not have. For CPU memory figures run the bench in an environment of its own: "
             'python -m venv .venv-bench && .venv-bench/bin/pip install -e ".[bench]"')
    if a.model == DEFAULT_MODEL:
        ensure_checkpoint(a.model)
    if a.controlnets and a.controlnet == DEFAULT_CONTROLNET and not (a.controlnet / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_sd15.py"), str(a.controlnet),
                        "--controlnet"], check=True, cwd=ROOT)
    own_cache = a.cache_dir is None
    if own_cache:
        a.cache_dir = ROOT / "bench_cache" / f"xla-cache-{os.getpid()}"
        shutil.rmtree(a.cache_dir, ignore_errors=True)
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                    if k not in ("worker", "warm", "warm_ready_only")},
           "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    times = {fw: {} for fw in frameworks}
    info = {fw: {} for fw in frameworks}
    workers = {}
    try:
        for fw in frameworks:
            workers[fw] = Worker(fw, _worker_argv(a), _env(a, fw))
        # Loads are timed on a quiet machine with the checkpoint in the page cache for both: every worker has
        # finished its imports (the other one's torch or jax import would otherwise run beside the first load),
        # and the files were read once here (the first load would otherwise pay the disk for both).
        for fw in frameworks:
            workers[fw].ask(op="ping")
        _read_files(a.model)
        for fw in frameworks:
            info[fw].update(workers[fw].ask(op="load"))
            _log(f"{fw}: loaded in {info[fw].get('load_s', float('nan')):.1f} s")
        if "txt2img" in parts:
            for fw in frameworks:
                r = workers[fw].ask(op="first_call")
                info[fw].update({k: r.get(k) for k in ("first_call_s", "compile_s")})
                info[fw]["first_call_peak_rss"] = r.get("peak_rss")
                _log(f"{fw}: first txt2img call {r.get('first_call_s', float('nan')):.1f} s"
                     + (f" (compile {r['compile_s']:.1f} s)" if r.get("compile_s") is not None else ""))
        micro = [x for x in parts if x in ("clip", "unet", "vae")]
        for part in micro:  # one untimed call each (sdjax compiles it; torch warms its allocator)
            for fw in frameworks:
                workers[fw].ask(op="run", part=part)
        for r in range(a.repeats):
            for part in micro:
                for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                    x = workers[fw].ask(op="run", part=part)
                    times[fw].setdefault(part, []).append(x.get("s"))
            _log("repeat {} ({}): ".format(r + 1, "/".join(frameworks)) + ", ".join(
                f"{part} " + "/".join(_fmt(times[fw][part][-1]) for fw in frameworks) for part in micro))
        if "txt2img" in parts:
            for r in range(a.full_repeats):
                for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                    x = workers[fw].ask(op="run", part="txt2img")
                    times[fw].setdefault("txt2img", []).append(x.get("s"))
                    info[fw]["peak_rss"] = max(info[fw].get("peak_rss") or 0, x.get("peak_rss") or 0)
                _log(f"txt2img repeat {r + 1}: " + "/".join(_fmt(times[fw]["txt2img"][-1]) for fw in frameworks))
        if "sdjax" in workers and not a.controlnets:
            res["flops"] = workers["sdjax"].ask(op="flops")
    finally:
        for fw, w in workers.items():
            r = w.close()
            info[fw]["process_peak_rss"] = r.get("process_peak_rss")
            info[fw]["device_peak_bytes"] = r.get("device_peak_bytes")
    if "warm" in parts:
        for fw in frameworks:
            # torch has no compilation to cache: its "ready" is imports + load; the image is timed above
            w = run_warm(a, fw, ready_only=(fw == "torch" and "txt2img" in parts))
            if fw == "torch" and "txt2img" in parts and "ready_s" in w:
                w["first_image_s"] = w["ready_s"] + _median(times[fw]["txt2img"])
            info[fw]["warm"] = w
            _log(f"{fw}: warm process ready {w.get('ready_s', float('nan')):.1f} s, "
                 f"first image {w.get('first_image_s', float('nan')):.1f} s")
    if own_cache:
        shutil.rmtree(a.cache_dir, ignore_errors=True)

    res["machine"] = machine_info({f"{fw}_backend": info[fw].get("backend") for fw in frameworks}
                                  | {f"{fw}_device": info[fw].get("device_kind") for fw in frameworks})
    res["times"] = times
    res["info"] = info
    res["summary"] = summarize(a, frameworks, times, info, res.get("flops"))
    print(format_table(res))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {a.json}")
    if a.write_readme:
        write_readme(res)
    return res


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def summarize(a, frameworks, times, info, flops) -> dict:
    rows = {}

    def add(name, unit, per_fw):
        vals = {fw: per_fw.get(fw) for fw in frameworks}
        ratio = None
        if vals.get("sdjax") and vals.get("torch"):
            ratio = vals["sdjax"] / vals["torch"]
        rows[name] = {"unit": unit, **vals, "ratio": ratio}

    for part in PARTS:
        if any(part in times[fw] for fw in frameworks):
            add(f"{part}_s", "s", {fw: _median(times[fw].get(part, [])) for fw in frameworks})
    if any("txt2img" in times[fw] for fw in frameworks):
        add("s_per_image", "s", {fw: _div(_median(times[fw].get("txt2img", [])), a.batch) for fw in frameworks})
        add("images_per_s", "img/s", {fw: _div(a.batch, _median(times[fw].get("txt2img", []))) for fw in frameworks})
    for key, unit in (("load_s", "s"), ("first_call_s", "s"), ("compile_s", "s")):
        if any(info[fw].get(key) is not None for fw in frameworks):
            add(key, unit, {fw: info[fw].get(key) for fw in frameworks})
    if any("warm" in info[fw] for fw in frameworks):
        add("warm_ready_s", "s", {fw: info[fw].get("warm", {}).get("ready_s") for fw in frameworks})
        add("warm_first_image_s", "s", {fw: info[fw].get("warm", {}).get("first_image_s") for fw in frameworks})
    gib = 2**30
    for key in ("peak_rss", "first_call_peak_rss", "process_peak_rss", "device_peak_bytes"):
        if any(info[fw].get(key) for fw in frameworks):
            add(key.replace("_bytes", "") + "_gib", "GiB", {fw: _div(info[fw].get(key), gib) for fw in frameworks})
    if flops and flops.get("flops_per_image") and not a.controlnets:  # FLOPs counted without ControlNets
        rows["tflops_per_image"] = {"unit": "TFLOP", "sdjax": flops["flops_per_image"] / 1e12}
        for fw in frameworks:
            t = _median(times[fw].get("txt2img", []))
            peak = _peak_tflops(info[fw].get("device_kind"), a.dtype)
            if t:
                achieved = flops["flops_per_image"] * a.batch / t / 1e12
                rows.setdefault("achieved_tflops", {"unit": "TFLOP/s"})[fw] = achieved
                if peak:
                    rows.setdefault("fraction_of_peak", {"unit": f"of {peak:g} TFLOP/s"})[fw] = achieved / peak
    return rows


def _peak_tflops(device_kind, dtype):
    for chip, peaks in PEAK_TFLOPS.items():
        if device_kind and chip in str(device_kind).upper():
            return peaks.get(dtype)
    return None


def _div(x, y):
    return None if x is None or y is None or y == 0 else x / y


def format_table(res) -> str:
    a = res["args"]
    m = res["machine"]
    head = (f"sdjax vs torch (diffusers {m.get('diffusers')}): {a['size']}x{a['size']}, {a['steps']} steps, "
            f"batch {a['batch']}, {a['dtype']}, scheduler {a['scheduler'] or 'checkpoint default (pndm)'}"
            + (f", {a['controlnets']} ControlNet(s)" if a.get("controlnets") else ""))
    lines = [head, "| metric | sdjax | torch | sdjax/torch |", "|---|---:|---:|---:|"]
    for name, row in res["summary"].items():
        def f(v):
            if v is None:
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        lines.append(f"| {name} ({row['unit']}) | {f(row.get('sdjax'))} | {f(row.get('torch'))} | "
                     f"{f(row.get('ratio'))} |")
    return "\n".join(lines)


def write_readme(res, path: Path = ROOT / "README.md") -> None:
    m = res["machine"]
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    dev = m.get("sdjax_device") or m.get("torch_device") or ""
    runtimes = m.get("jax_plugins")
    runtimes = ", ".join(runtimes) if runtimes else ("none" if "jax_plugins" in m else "not recorded")
    body = "\n".join([
        start,
        "## Benchmark: sdjax vs the PyTorch reference",
        "",
        "Regenerated by `scripts/bench.py --write-readme` (same checkpoint, prompt, size, steps, scheduler and dtype "
        "for both; each framework in its own process, measurements interleaved; medians; ratio < 1: sdjax is "
        "faster or smaller). The checkpoint is a random-initialised SD1.5-architecture one "
        "(`scripts/make_random_sd15.py`): same shapes, so the same speed and memory as the real weights.",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('mem_gib')} GiB){', ' + dev if dev else ''}; "
        f"{m.get('platform')}. Versions: python {m.get('python')}, jax {m.get('jax')}, jaxlib {m.get('jaxlib')}, "
        f"flax {m.get('flax')}, torch {m.get('torch')}, diffusers {m.get('diffusers')}, "
        f"transformers {m.get('transformers')}. jax accelerator runtimes installed: "
        f"{runtimes}. Date: {m.get('date')}.",
        "",
        f"Command: `{res['command']}`",
        "",
        format_table(res),
        "",
        "Metrics: `clip` encodes the batch's prompts and negative prompts; `unet` is one forward on the CFG batch "
        "(2 x batch); `vae` decodes the batch; `txt2img` is the whole call, warm; `first_call` the first call "
        "(sdjax compiles, cache empty); `warm_ready` a fresh process until its txt2img executable is ready "
        "(sdjax: compiled program read from the persistent cache; torch: imports and load); `peak_rss` the "
        "worker's peak resident memory during steady txt2img calls.",
        end,
    ])
    text = path.read_text()
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
