#!/usr/bin/env bash
# GPU benchmarks side by side, for the GPU machine (no cargo, no network): runs the prebuilt
# `dist/vae bench` and PyTorch's cuBLAS/cuDNN/torch.compile equivalents, then the ratio table.
# Build dist/ first with scripts/build-dist.sh. Logs go to $OUT (default bench/results/gpu-<date>).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
{
  echo "date: $(date -u +%FT%TZ)"; echo "command: scripts/bench-gpu.sh"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader || true
} | tee "$OUT/env.txt"
dist/vae bench --device cuda --large --json "$OUT/vaecuda.json" "$@" 2>&1 | tee "$OUT/vaecuda.txt"
python3 bench/pytorch/torch_bench.py --device cuda --large --json "$OUT/pytorch.json" 2>&1 | tee "$OUT/pytorch.txt"
python3 bench/compare.py "$OUT/vaecuda.json" "$OUT/pytorch.json" | tee "$OUT/ratio.txt"
