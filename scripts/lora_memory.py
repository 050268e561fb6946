"""Peak memory of one LoRA training step on the full SD1.5 architecture, and the LoRA state's size next to a full
fine-tune's AdamW state (2 x UNet params x 4 bytes).

    flock /tmp/sd15.lock python scripts/lora_memory.py [--model bench_cache/sd15-random] [--resolution 256]
        [--batch-size 1] [--rank 4] [--mode branch|merge] [--json OUT.json]

Reports XLA's buffer accounting of the compiled step (arguments, outputs, temporaries) and host RSS (from
/proc/self/status): after loading the pipeline, after compiling the step, and the peak while running steps
(VmHWM reset after compiling through /proc/self/clear_refs, so the compiler's own peak is not counted). On an
accelerator the RSS numbers describe the host side only. On CPU, XLA runs bfloat16 convolutions in float32, so
its temporaries include float32 copies of the weights that a GPU or TPU would not make; `--conv onednn` (the
default where the cpu extra is installed) runs them, and the input gradients, in bf16 through oneDNN instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tree_bytes(tree) -> int:
    import jax

    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def memory_analysis(compiled) -> dict[str, int] | None:
    """XLA's own accounting of the step's buffers (arguments, outputs, temporaries), where the backend has it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)} if m is not None else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "bench_cache" / "sd15-random"))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", nargs="+", default=["unet"])
    p.add_argument("--mode", choices=("branch", "merge"), default="branch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--conv", default=None, choices=("xla", "onednn"),
                   help="convolution kernel (default: sdjax's choice, oneDNN's on CPU where installed)")
    p.add_argument("--steps", type=int, default=2, help="steps run after compiling (default: %(default)s)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from sdjax import pipeline, train

    report: dict = {"device": str(jax.devices()[0]), "resolution": args.resolution, "batch_size": args.batch_size,
                    "rank": args.rank, "mode": args.mode, "dtype": args.dtype, "rss_start_mib": rss_mib()}
    report["conv"] = args.conv
    t0 = time.perf_counter()
    pipe = pipeline.load_pipeline(args.model, dtype=args.dtype, compilation_cache="off", conv=args.conv)
    report["conv"] = pipe.models.unet.attention.choose_conv(pipe.dtype)
    report["load_s"] = time.perf_counter() - t0
    report["rss_after_load_mib"] = rss_mib()
    cfg = train.TrainConfig(rank=args.rank, alpha=args.rank, targets=tuple(args.targets),
                            batch_size=args.batch_size, resolution=args.resolution, dtype=args.dtype,
                            lora_mode=args.mode)
    opt = train.make_optimizer(cfg)
    state = train.initial_state(cfg, pipe, opt)
    unet_params = sum(math.prod(a.shape) for a in jax.tree.leaves(pipe.params["unet"]))
    lora_params = sum(math.prod(a.shape) for a in jax.tree.leaves(state.lora))
    full_adamw = 2 * unet_params * 4
    lora_state = tree_bytes(state.lora) + tree_bytes(state.opt_state)
    report.update(unet_params=unet_params, lora_params=lora_params, lora_entries=len(state.lora.targets),
                  lora_params_bytes=tree_bytes(state.lora), lora_opt_state_bytes=tree_bytes(state.opt_state),
                  lora_state_bytes=lora_state, full_finetune_adamw_state_bytes=full_adamw,
                  lora_state_fraction_of_full_adamw=lora_state / full_adamw)

    step = train.make_train_step(pipe.models, cfg, opt, pipe.mesh, pipe.scheduler_config)
    rng = np.random.default_rng(0)
    b = args.batch_size
    host = {"pixels": rng.uniform(-1, 1, (b, args.resolution, args.resolution, 3)).astype(np.float32),
            "caption": ["a photo of a cat"] * b}
    batch = train._device_batch(host, pipe)
    t0 = time.perf_counter()
    compiled = step.lower(state.lora, state.opt_state, pipe.params, batch, jax.random.key(0)).compile()
    report["compile_s"] = time.perf_counter() - t0
    report["xla_memory_analysis"] = memory_analysis(compiled)
    report["rss_after_compile_mib"] = rss_mib()
    report["peak_reset"] = reset_peak()
    times, losses = [], []
    lo, opt_state = state.lora, state.opt_state
    for i in range(args.steps):
        t0 = time.perf_counter()
        lo, opt_state, metrics = compiled(lo, opt_state, pipe.params, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    report.update(step_s=times, losses=losses, rss_after_steps_mib=rss_mib())
    report["step_peak_rss_mib"] = report["rss_after_steps_mib"]["VmHWM"]
    report["base_params_bytes"] = tree_bytes(pipe.params)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    assert report["lora_state_fraction_of_full_adamw"] < 0.01, "LoRA state is not under 1% of full AdamW's"
    return report


if __name__ == "__main__":
    main()
