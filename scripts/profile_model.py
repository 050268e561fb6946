"""Where a model's time goes on this machine: a `jax.profiler` trace of the UNet forward or the VAE decode,
summed per kind of operation and per operation.

    python scripts/profile_model.py                                  # UNet, 512x512 (CFG batch 2), float32
    python scripts/profile_model.py --part vae --dtype bfloat16      # VAE decode in bf16
    python scripts/profile_model.py --conv xla --trace-dir /tmp/tr   # XLA's convolutions; keep the trace for xprof

The model is the random SD1.5-architecture checkpoint of `scripts/bench.py` (or `--model`). The part is compiled,
run once, then run `--runs` times under `jax.profiler.trace`. Each event of the trace that is an instruction of
the compiled program (XLA:CPU records one per thunk) is matched with the instruction in the program's HLO and
put in the first `CATEGORIES` entry that fits its opcode, custom-call target and `op_name` (the flax module
path); times are per run. The trace itself (`--trace-dir`) opens in TensorBoard's profile plugin / xprof.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "bench_cache" / "sd15-random"

# (category, opcodes or None for any, regex on "opcode target op_name" or None): the first match wins.
CATEGORIES = [
    ("convolution", None, re.compile(r"^convolution|sdjax_onednn_conv|^fusion.*\bconvolution")),
    ("attention: scores, softmax, values", None,
     re.compile(r"/(attn1|attn2|attention)(/|$)(?!.*/(to_q|to_k|to_v|to_out_0)(/|$))")),
    ("dense layers (projections, feed-forward)", None, re.compile(r"^dot|^fusion.*\bdot\b|/dot_general")),
    ("normalization (group/layer norm)", None, re.compile(r"norm", re.IGNORECASE)),
    ("copies and transposes", ("copy", "transpose", "bitcast", "slice", "concatenate", "pad"), None),
    ("other elementwise", None, None),
]

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_FUSED_OPS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_instructions(hlo: str) -> dict[str, str]:
    """Instruction name -> "opcode [custom-call target] [opcodes inside a fusion] op_name", for the entry's
    and every computation's instructions."""
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    info: dict[str, tuple[str, str, str, str]] = {}
    for line in hlo.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        target = _TARGET.search(line)
        op_name = _OP_NAME.search(line)
        called = _FUSED_OPS.search(line) if opcode == "fusion" else None
        info[name] = (opcode, target.group(1) if target else "", op_name.group(1) if op_name else "",
                      called.group(1) if called else "")
        if current is not None:
            computations[current].append(opcode)
    out = {}
    for name, (opcode, target, op_name, called) in info.items():
        inner = " ".join(sorted(set(computations.get(called, ())))) if called else ""
        out[name] = " ".join(x for x in (opcode, inner, target, op_name) if x)
    return out


def category(description: str) -> str:
    opcode = description.split(" ", 1)[0]
    for name, opcodes, pattern in CATEGORIES:
        if opcodes is not None and opcode not in opcodes:
            continue
        if pattern is not None and not pattern.search(description):
            continue
        return name
    return CATEGORIES[-1][0]


def trace_events(trace_dir: Path, names: set[str]) -> collections.Counter:
    """Summed duration (s) of each trace event whose name is an instruction in `names`."""
    from jax.profiler import ProfileData

    totals: collections.Counter = collections.Counter()
    for path in sorted(trace_dir.rglob("*.xplane.pb")):
        data = ProfileData.from_file(str(path))
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in names:
                        totals[event.name] += event.duration_ns * 1e-9
    return totals


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--part", choices=("unet", "vae"), default="unet")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images (the UNet runs on the CFG batch, 2x)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--conv", default=None, choices=("xla", "onednn"))
    p.add_argument("--attention", default=None, help="one of sdjax.layers.IMPLEMENTATIONS (default: per layer)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="the slowest instructions listed")
    p.add_argument("--trace-dir", type=Path, default=None, help="keep the trace here (default: a temp folder)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import sdjax

    if a.model == DEFAULT_MODEL and not (a.model / "model_index.json").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench import ensure_checkpoint

        ensure_checkpoint(a.model)
    pipe = sdjax.load_pipeline(a.model, dtype=a.dtype, conv=a.conv, attention=a.attention)
    m, dtype = pipe.models, jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    s = a.size // 8
    if a.part == "unet":
        fn = jax.jit(lambda p, x, t, c: m.unet.apply({"params": p["unet"]}, x, t, c))
        args = (jnp.asarray(rng.standard_normal((2 * a.batch, s, s, 4)), dtype), jnp.full((2 * a.batch,), 801.0),
                jnp.asarray(rng.standard_normal((2 * a.batch, 77, m.unet.config.cross_attention_dim)), dtype))
    else:
        fn = jax.jit(lambda p, z: sdjax.sampling.decode(m, p, z))
        args = (jnp.asarray(rng.standard_normal((a.batch, s, s, 4)), jnp.float32),)
    compiled = fn.lower(pipe.params, *args).compile()
    jax.block_until_ready(compiled(pipe.params, *args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(pipe.params, *args))
    wall = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = a.trace_dir or Path(tmp)
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(a.runs):
                jax.block_until_ready(compiled(pipe.params, *args))
        described = hlo_instructions(compiled.as_text())
        times = trace_events(trace_dir, set(described))
    if not times:
        raise SystemExit("the trace holds no events named after the program's instructions")
    per_run = {name: t / a.runs for name, t in times.items()}
    total = sum(per_run.values())
    by_category: collections.Counter = collections.Counter()
    for name, t in per_run.items():
        by_category[category(described[name])] += t
    conv = m.unet.attention.choose_conv(pipe.dtype)
    print(f"{a.part}, {a.size}x{a.size}, batch {a.batch}, {a.dtype}, convolutions: {conv}, attention: "
          f"{a.attention or 'per layer'}; one run {wall:.2f} s (untraced); traced instructions sum to {total:.2f} s "
          "per run (more than the run where XLA runs independent instructions at once)")
    print("| category | s per run | share |\n|---|---:|---:|")
    for name, t in by_category.most_common():
        print(f"| {name} | {t:.3f} | {t / total:.1%} |")
    print(f"\nslowest {a.top} instructions (s per run):")
    for name, t in sorted(per_run.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"  {t:7.3f}  {name:24s} {described[name][:150]}")


if __name__ == "__main__":
    main()
