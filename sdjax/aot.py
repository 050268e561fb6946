"""Ahead-of-time checks: compile a job's jitted function for a TPU/GPU target from parameter shapes alone.

    report = sdjax.compile_check("txt2img", "tpu:v5e-8", model="sd15", size=512, batch=8, dtype="bfloat16")
    print(report.fits, report.per_device_bytes, report.attention_summary())

The job is the very function the pipeline (or the LoRA train step) jits, built over a mesh of compile-only
devices (`targets`) with `jax.ShapeDtypeStruct` params (`jax.eval_shape` of each module's init: no weights, no
FLOPs), lowered and compiled by XLA for the target. The report has the compile time on this machine, XLA's
per-device memory (arguments, temporaries, outputs), whether that fits the chip, which attention kernel each
layer got, and XLA's FLOP count. `sdjax compile-check` prints it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sdjax import checkpoint, convert, io, layers, parallel, pipeline, sampling, schedulers, targets
from sdjax.clip import CLIPConfig, TextEncoder
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig

JOBS = ("txt2img", "img2img", "inpaint", "train-lora")
# Architectures by name (configs only; `model=` also takes a diffusers folder holding just the config files).
MODELS = {
    "sd15": lambda: (CLIPConfig.sd15(), UNetConfig.sd15(), VAEConfig.sd15()),
    "sd15-inpaint": lambda: (CLIPConfig.sd15(), UNetConfig.sd15_inpaint(), VAEConfig.sd15()),
    "tiny": lambda: (CLIPConfig.tiny(), UNetConfig.tiny(), VAEConfig.tiny()),
    "tiny-inpaint": lambda: (CLIPConfig.tiny(), UNetConfig.tiny(in_channels=9), VAEConfig.tiny()),
}
TOKENS = 77


@dataclasses.dataclass
class Report:
    """What one compile gave. Bytes are per device, as XLA's `memory_analysis()` reports them."""

    job: str
    target: str
    devices: str
    model: str
    size: int
    batch: int  # images (train-lora: examples) per call, over all devices
    dtype: str
    steps: int
    compile_s: float  # lowering + XLA compile on this machine
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    capacity_bytes: int
    attention: list[dict[str, Any]]
    flops: float | None  # XLA's cost analysis of the whole program (a loop body counted once), per device
    custom_calls: list[str]
    controlnets: int = 0  # ControlNets in the sampling loop (generation jobs)
    optimization_effort: float = 0.0  # XLA's exec_time_optimization_effort the program was compiled with
    # The TPU backend's own run-time estimate: the sum of its per-fusion `estimated_cycles` (a loop body counted
    # once, as for flops); None where the compiled HLO carries none (GPU, CPU). A cost model, not a measurement.
    estimated_cycles: int | None = None

    @property
    def per_device_bytes(self) -> int:
        """Peak estimate: arguments + outputs not aliased to arguments + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.capacity_bytes

    def attention_summary(self) -> list[str]:
        """One line per (kernel, shapes) with the count and the first layer, in trace order."""
        groups: dict[tuple, list[str]] = collections.OrderedDict()
        for rec in self.attention:
            key = (rec["implementation"], tuple(rec["q"][1:]), tuple(rec["k"][1:]), rec["causal"])
            groups.setdefault(key, []).append(rec["layer"])
        lines = []
        for (impl, q, k, causal), where in groups.items():
            shape = f"q {'x'.join(map(str, q))} k {'x'.join(map(str, k))}" + (" causal" if causal else "")
            lines.append(f"{impl:<10} {shape:<34} x{len(where):<3} e.g. {where[0]}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(per_device_bytes=self.per_device_bytes, fits=self.fits)
        return d

    def format(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines = [
            f"job {self.job} on {self.target} ({self.devices}): model {self.model}, {self.size}x{self.size}, "
            f"batch {self.batch}, {self.dtype}" + (f", {self.steps} steps" if self.job != "train-lora" else "")
            + (f", {self.controlnets} ControlNet(s)" if self.controlnets else ""),
            f"compile: {self.compile_s:.1f} s on this machine"
            + (f" (optimization effort {self.optimization_effort:g})" if self.optimization_effort else ""),
            f"memory per device: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"outputs {gib(self.output_bytes)} (aliased {gib(self.alias_bytes)}), code {gib(self.code_bytes)}",
            f"total {gib(self.per_device_bytes)} of {gib(self.capacity_bytes)}: "
            + ("fits" if self.fits else "DOES NOT FIT"),
        ]
        if self.estimated_cycles:
            lines.append(f"XLA's run-time estimate: {self.estimated_cycles / 1e6:.1f} M cycles per device (its cost "
                         "model, loop bodies counted once)")
        if self.flops:
            per = self.flops * int(self.devices.split(" x ")[0]) / max(self.batch, 1)
            lines.append(f"XLA FLOPs per image: {per / 1e12:.2f} TFLOP (loop bodies counted once)")
        lines.append("attention (kernel, shapes [L, H, D], layers):")
        lines += ["  " + line for line in self.attention_summary()]
        return "\n".join(lines)


def compile_check(job: str = "txt2img", target: str = "tpu:v5e-8", *, model: str = "sd15", size: int = 512,
                  batch: int | None = None, dtype: Any = "bfloat16", steps: int = 50, scheduler: str | None = None,
                  attention: str | None = None, lora_rank: int = 8, controlnets: int = 0,
                  optimization_effort: float = 0.0) -> Report:
    """Compiles `job` for `target` with `model`'s shapes; see the module docstring.

    batch: images (or training examples) over all devices; default one per device. steps and scheduler:
    the sampling loop's length and sampler (default: the model's scheduler, PNDM for SD1.5). attention:
    an implementation for every layer (default: chosen per layer for the target). lora_rank: train-lora's.
    controlnets: generation jobs with this many ControlNets of the model's architecture in the loop
    (`ControlNetConfig.from_unet`, as lllyasviel's SD1.5 ones). optimization_effort: XLA's, in [-1, 1]
    (`parallel.EFFORT_RANGE`: lower compiles faster and runs slower; on TPU `estimated_cycles` shows by how much
    by XLA's cost model).
    """
    if job not in JOBS:
        raise ValueError(f"job {job!r} is not known; choose one of {', '.join(JOBS)}")
    tgt = targets.parse(target)  # names the allowed targets on a typo, before anything is built
    dt = convert.parse_dtype(dtype)
    if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 64:
        raise ValueError(f"size must be a multiple of 64 (>= 64), got {size!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(controlnets, bool) or not isinstance(controlnets, int) or not 0 <= controlnets <= 8:
        raise ValueError(f"controlnets must be an integer in [0, 8], got {controlnets!r}")
    if controlnets and job == "train-lora":
        raise ValueError("controlnets: the train-lora job has no ControlNets (generation jobs only)")
    if attention is not None and attention not in layers.IMPLEMENTATIONS:
        raise ValueError(f"attention {attention!r} is not one of {', '.join(layers.IMPLEMENTATIONS)}")
    effort = parallel.check_effort(optimization_effort)
    (clip_cfg, unet_cfg, vae_cfg), sched_dict = model_configs(model)
    if job == "inpaint" and unet_cfg.in_channels != 9:
        raise ValueError(f"job 'inpaint' compiles the 9-channel inpainting UNet; model {model!r} has "
                         f"{unet_cfg.in_channels} input channels (use sd15-inpaint)")
    if scheduler is not None and scheduler not in schedulers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler {scheduler!r} is not one of {', '.join(schedulers.SCHEDULER_NAMES)}")

    mesh = tgt.mesh()
    batch = batch or tgt.num_devices
    models = sampling.Models(TextEncoder(clip_cfg, dtype=dt), UNet(unet_cfg, dtype=dt),
                             VAE(vae_cfg, dtype=dt)).for_mesh(mesh, attention)
    params = abstract_params({"text_encoder": clip_cfg, "unet": unet_cfg, "vae": vae_cfg}, dt,
                             parallel.replicated(mesh))
    if controlnets:
        from sdjax import controlnet

        cn_cfg = controlnet.ControlNetConfig.from_unet(unet_cfg)
        models = models.with_controlnets((controlnet.ControlNet(cn_cfg),) * controlnets)
        cast = lambda a: jax.ShapeDtypeStruct(a.shape, dt, sharding=parallel.replicated(mesh))  # noqa: E731
        params["controlnets"] = (jax.tree.map(cast, controlnet.abstract_params(cn_cfg)),) * controlnets
    sched_cfg = schedulers.SchedulerConfig.from_dict(sched_dict)
    with layers.record_attention() as log:
        start = time.perf_counter()
        if job == "train-lora":
            lowered = _lower_train_step(models, params, sched_cfg, mesh, batch, size, dtype, lora_rank, effort)
        else:
            name = scheduler or schedulers.from_diffusers_config(sched_dict)
            lowered = _lower_generation(job, models, params, schedulers.create(name, sched_cfg, steps), mesh,
                                        batch, size, effort)
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and cost.get("flops") else None
    text = compiled.as_text()
    calls = sorted(set(_custom_call_targets(text)))
    return Report(job, target, targets.describe(mesh.devices.flat), model if isinstance(model, str) else str(model),
                  size, batch, jnp.dtype(dt).name, steps, seconds, int(mem.argument_size_in_bytes),
                  int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes),
                  int(mem.generated_code_size_in_bytes), tgt.memory_bytes, list(log), flops, calls, controlnets,
                  effort, estimated_cycles(text))


def model_configs(model: str | Path) -> tuple[tuple[CLIPConfig, UNetConfig, VAEConfig], dict]:
    """A known name (MODELS) or a diffusers folder's config files -> ((clip, unet, vae) configs, scheduler dict)."""
    if str(model) in MODELS:
        return MODELS[str(model)](), dict(pipeline.SD15_SCHEDULER)
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"model {str(model)!r} is neither a known name ({', '.join(MODELS)}) nor a folder")
    cfgs = tuple(checkpoint.KINDS[kind].parse(io.read_json(folder / kind / "config.json"))
                 for kind in ("text_encoder", "unet", "vae"))
    sched = folder / "scheduler" / "scheduler_config.json"
    return cfgs, io.read_json(sched) if sched.exists() else dict(pipeline.SD15_SCHEDULER)  # type: ignore[return-value]


def abstract_params(configs: dict[str, Any], dtype: Any, sharding) -> dict:
    """{component: params as ShapeDtypeStructs of `dtype` placed by `sharding`} (floating leaves cast)."""
    def leaf(a):
        d = dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
        return jax.ShapeDtypeStruct(a.shape, d, sharding=sharding)

    return {kind: jax.tree.map(leaf, checkpoint.abstract_params(kind, cfg)) for kind, cfg in configs.items()}


def _shaped(tree: Any, sharding) -> Any:
    """Arrays (numpy, jax) or ShapeDtypeStructs -> ShapeDtypeStructs placed by `sharding`."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _lower_generation(job: str, models: sampling.Models, params: dict, schedule: schedulers.Schedule, mesh,
                      batch: int, size: int, effort: float):
    b = parallel.padded_size(batch, mesh)
    shard, rep = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)  # noqa: E731
    # prompts of one 77-token chunk, as `Pipeline._batch` gives them ([B, K, 77]; longer prompts: K > 1)
    inputs = {"ids": spec((b, 1, TOKENS), jnp.int32), "neg_ids": spec((b, 1, TOKENS), jnp.int32),
              "seeds": spec((b,), jnp.uint32)}
    static: dict[str, Any] = {}
    if job == "txt2img":
        static = {"height": size, "width": size}
    else:
        inputs["pixels"] = spec((b, size, size, 3), jnp.float32)
    if job == "inpaint":
        inputs["masks"] = spec((b, size, size), jnp.float32)
        static = {"dedicated": models.unet.config.in_channels == 9, "paste_back": False}
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)  # noqa: E731
    control = None
    n = len(models.controlnets)
    if n:  # as `Pipeline._generate` passes them: images in the batch, traced scales and keep table
        inputs.update({f"control_{i}": spec((b, size, size, 3), jnp.float32) for i in range(n)})
        control = {"scales": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rep),
                   "keep": jax.ShapeDtypeStruct((n, schedule.num_calls), jnp.float32, sharding=rep)}
    fn = pipeline.jit_job(models, mesh, job, effort)
    first = (scalar(jnp.int32),) if pipeline.JOBS[job].from_image else ()
    return fn.lower(params, _shaped(schedule, rep), inputs, scalar(jnp.float32), *first, control, use_cfg=True,
                    progress=None, **static)


def _lower_train_step(models: sampling.Models, params: dict, sched_cfg, mesh, batch: int, size: int, dtype,
                      rank: int, effort: float):
    from sdjax import train_step

    b = parallel.padded_size(batch, mesh)
    cfg = train_step.TrainConfig(rank=rank, alpha=float(rank), resolution=size, batch_size=b,
                                 dtype=jnp.dtype(convert.parse_dtype(dtype)).name)
    optimizer = train_step.make_optimizer(cfg)
    rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    lora = train_step.init_lora(cfg, params, jax.random.key(0))  # reads only the params' shapes; small (rank r)
    opt_state = jax.eval_shape(optimizer.init, lora)
    key = jax.eval_shape(lambda: jax.random.key(0))
    inputs = {"pixels": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=shard),
              "ids": jax.ShapeDtypeStruct((b, TOKENS), jnp.int32, sharding=shard)}
    step = train_step.make_train_step(models, cfg, optimizer, mesh, sched_cfg, optimization_effort=effort)
    return step.lower(_shaped(lora, rep), _shaped(opt_state, rep), params, inputs,
                      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))


def estimated_cycles(hlo_text: str) -> int | None:
    """The sum of the `estimated_cycles` the TPU compiler writes into each fusion's backend config of a compiled
    program's HLO text (None when there are none). No API exposes XLA's cost model, so its output is read here."""
    found = re.findall(r'"estimated_cycles":"?(\d+)', hlo_text)
    return sum(map(int, found)) if found else None


def _custom_call_targets(hlo_text: str) -> list[str]:
    out = []
    for part in hlo_text.split('custom_call_target="')[1:]:
        out.append(part.split('"', 1)[0])
    return out


def write_json(reports: list[Report], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.to_dict() for r in reports], indent=1) + "\n")
