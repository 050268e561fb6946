#!/usr/bin/env bash
# sdjax vs diffusers on one GPU: 512x512, 50 steps, bf16, batch 1 and batch 8; prints images/s and s/image.
#
#   bash scripts/bench_gpu.sh [OUT_DIR]        # default OUT_DIR: bench_cache/gpu
#
# Self-contained and offline: installs nothing, downloads nothing. Needs, already installed: jax with CUDA
# (jax[cuda12] or a matching plugin), flax, torch with CUDA, diffusers, transformers. The random SD1.5-architecture
# checkpoint is built on the spot with diffusers (same shapes as the real weights, so the same speed) unless
# bench_cache/sd15-random already exists. Budget: under 8 minutes on an H100 (checkpoint ~1 min, each batch size
# ~2-3 min: compile + 1 timed run each + micro-benchmarks); SDJAX_BENCH_BUDGET_S (default 450) stops it early,
# and the batch-1 results are written before batch 8 starts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_cache/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${SDJAX_BENCH_BUDGET_S:-450}
SIZE=${SDJAX_BENCH_SIZE:-512}     # overrides for a smoke test on a CPU: SDJAX_BENCH_SIZE=64 SDJAX_BENCH_STEPS=2
STEPS=${SDJAX_BENCH_STEPS:-50}
DTYPE=${SDJAX_BENCH_DTYPE:-bfloat16}
START=$SECONDS
export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# JAX must not grab 75% of the GPU up front: torch runs in another process at the same time.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
$PY - <<'EOF'
import importlib.metadata as m
for p in ("jax", "jaxlib", "jax-cuda12-plugin", "flax", "torch", "diffusers", "transformers"):
    try:
        print(f"  {p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"  {p} -")
try:
    import jax; print("  jax backend:", jax.default_backend(), jax.devices())
except Exception as e:
    print("  jax:", e)
try:
    import torch; print("  torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("  torch:", e)
EOF

echo "== checkpoint"
timeout 240 $PY scripts/make_random_sd15.py bench_cache/sd15-random || { echo "checkpoint build failed"; exit 1; }

status=0
for BATCH in 1 8; do
  LEFT=$((BUDGET - (SECONDS - START)))
  if [ "$LEFT" -lt 60 ]; then echo "== batch $BATCH skipped: ${LEFT}s of the budget left"; status=1; continue; fi
  echo "== batch $BATCH (${LEFT}s of the budget left)"
  # --repeats 2 micro (clip/unet/vae), one timed warm txt2img after the first (compile) call.
  PARTS=clip,unet,vae,txt2img; [ "$BATCH" = 1 ] && PARTS=$PARTS,warm   # warm start: once, at batch 1
  timeout "$LEFT" $PY scripts/bench.py --size "$SIZE" --steps "$STEPS" --batch "$BATCH" --dtype "$DTYPE" --devices 1 \
      --repeats 2 --full-repeats 1 --parts "$PARTS" --json "$OUT/bench-b$BATCH.json" \
      || { echo "batch $BATCH: bench.py failed or ran out of time (rc $?)"; status=1; }
done

echo "== summary (${SIZE}x${SIZE}, $STEPS steps, $DTYPE)"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("bench-b*.json")):
    r = json.loads(f.read_text()); s = r["summary"]; b = r["args"]["batch"]
    for fw in ("sdjax", "torch"):
        ips, spi = s.get("images_per_s", {}).get(fw), s.get("s_per_image", {}).get(fw)
        frac = s.get("fraction_of_peak", {}).get(fw)
        print(f"batch {b} {fw:6s} images/s {ips if ips is None else round(ips, 3)}  s/image "
              f"{spi if spi is None else round(spi, 3)}" + (f"  {100 * frac:.1f}% of peak" if frac else ""))
    print(f"batch {b} sdjax/torch time ratio {s.get('txt2img_s', {}).get('ratio')}")
EOF
echo "total $((SECONDS - START)) s"
exit $status
