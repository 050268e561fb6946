"""The README's "what fits" table: the largest batch per chip for txt2img and LoRA training at 512 (bf16), per target.

    python scripts/compile_table.py --json bench_cache/compile_table.json [--targets tpu:v5e-8,gpu:h100x8 ...]

Every number comes from `sdjax.aot.compile_check` (compile-only devices, full SD1.5 shapes). Per-device memory is
affine in the batch per device (replicated params, batch-sharded activations), so each (target, job) is compiled
at 1 and 2 images per device, the line through those two points gives the largest batch per device that fits,
and that batch is compiled once more to confirm it (stepping down until it fits). Each compile takes minutes on
a 2-core machine; results are appended to the JSON file as they come, and finished rows are not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

from sdjax import aot, targets  # noqa: E402

TARGETS = ("tpu:v5e-1", "tpu:v5e-8", "tpu:v4-8", "tpu:v6e-8", "gpu:h100x8", "gpu:a100-40gbx8")
JOBS = ("txt2img", "train-lora")
CAP = 64  # per device: a ceiling for the search


def run(job: str, target: str, per_device: int, size: int) -> dict:
    n = targets.parse(target).num_devices
    try:
        r = aot.compile_check(job, target, model="sd15", size=size, batch=per_device * n,
                                        dtype="bfloat16", steps=50, lora_rank=8)
    except Exception as err:  # noqa: BLE001 -- the TPU compiler refuses a program larger than HBM
        oom = "memory" in str(err).lower() or "RESOURCE_EXHAUSTED" in str(err)
        why = "out of memory at compile time" if oom else f"does not compile: {str(err)[:300]}"
        print(f"  {job} {target} batch/device {per_device}: {why}", flush=True)
        return {"per_device": per_device, "bytes": None, "fits": False, "compile_s": None,
                "capacity": targets.parse(target).memory_bytes, "error": None if oom else str(err)[:300]}
    print(f"  {job} {target} batch/device {per_device}: {r.per_device_bytes / 2**30:.2f} GiB "
          f"({'fits' if r.fits else 'does not fit'}), compile {r.compile_s:.0f} s", flush=True)
    return {"per_device": per_device, "bytes": r.per_device_bytes, "fits": r.fits, "compile_s": r.compile_s,
            "capacity": r.capacity_bytes}


def largest(job: str, target: str, size: int) -> dict:
    one, two = run(job, target, 1, size), run(job, target, 2, size)
    runs = [one, two]
    if not one["fits"]:
        return {"max_per_device": 0, "runs": runs}
    if two["bytes"] is None:
        return {"max_per_device": 1, "bytes_at_max": one["bytes"], "capacity": one["capacity"],
                "compile_s_batch1": one["compile_s"], "runs": runs}
    slope = max(two["bytes"] - one["bytes"], 1)
    guess = min(CAP, 1 + int((one["capacity"] - one["bytes"]) // slope))
    best = one if not two["fits"] else two
    while guess > best["per_device"]:
        r = run(job, target, guess, size)
        runs.append(r)
        if r["fits"]:
            best = r
            break
        guess -= max(1, guess // 8)
    return {"max_per_device": best["per_device"], "bytes_at_max": best["bytes"], "capacity": one["capacity"],
            "compile_s_batch1": one["compile_s"], "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json", default="bench_cache/compile_table.json")
    a = p.parse_args(argv)
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else {}
    for target in a.targets.split(","):
        for job in a.jobs.split(","):
            key = f"{target} {job} {a.size}"
            if key in rows:
                continue
            print(f"{key}:", flush=True)
            rows[key] = largest(job, target, a.size)
            path.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows, a.size))
    return 0


def markdown(rows: dict, size: int) -> str:
    lines = [f"| target | txt2img {size}: images/chip (GiB/chip) | LoRA train {size}: examples/chip (GiB/chip) | "
             "compile txt2img, batch 1/chip (s) |", "|---|---:|---:|---:|"]
    for target in dict.fromkeys(k.split()[0] for k in rows):
        cells = []
        for job in JOBS:
            r = rows.get(f"{target} {job} {size}")
            if r is None or not r["max_per_device"]:
                cells.append("-" if r is None else "none")
                continue
            # The line through batch 1 and 2 overestimates the growth (fixed costs show up at 2), so the confirmed
            # batch can be far below the chip's memory: then it is a lower bound, marked ">=".
            low = r["max_per_device"] >= CAP or r["bytes_at_max"] < 0.9 * r["runs"][0]["capacity"]
            most = f">={r['max_per_device']}" if low else str(r["max_per_device"])
            cells.append(f"{most} ({r['bytes_at_max'] / 2**30:.1f} of {r['runs'][0]['capacity'] / 2**30:.1f})")
        t = rows.get(f"{target} txt2img {size}")
        cells.append("-" if t is None else f"{t['runs'][0]['compile_s']:.0f}")
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
