#!/usr/bin/env bash
# CPU benchmarks side by side: `vae bench` and the same kernels and training steps in PyTorch
# (if `import torch` works), then the ratio table last. Logs and JSON go to $OUT (default
# bench/results/cpu-<date>). Needs cargo (it builds the release binary first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/cpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
cargo build --release --quiet
{
  echo "date: $(date -u +%FT%TZ)"; echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  echo "command: scripts/bench-cpu.sh"
} | tee "$OUT/env.txt"
target/release/vae bench --device cpu --json "$OUT/vaecuda.json" "$@" | tee "$OUT/vaecuda.txt"
if python3 -c 'import torch' 2>/dev/null; then
  python3 bench/pytorch/torch_bench.py --device cpu --threads "$(nproc)" --no-compile --json "$OUT/pytorch.json" | tee "$OUT/pytorch.txt"
  python3 bench/compare.py "$OUT/vaecuda.json" "$OUT/pytorch.json" | tee "$OUT/ratio.txt"
else
  echo "PyTorch is not importable here: only vaecuda was measured" | tee "$OUT/ratio.txt"
fi
