#!/usr/bin/env bash
# The GPU test suite, on the GPU machine (no Rust, no network), from a dist/ made by
# scripts/build-dist.sh: prints nvidia-smi and the date, compiles every kernel through NVRTC
# (must pass, no warnings), then runs every GPU-vs-CPU test one at a time on the real GPU
# (VAECUDA_TEST_DEVICE=gpu: never the emulated device) and the CPU gradient checks. Everything goes to ${OUT:-bench/results}/gpu-check-<date>.log;
# the exit status is non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir"
log="$out_dir/gpu-check-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee -a "$log") 2>&1

echo "date: $(date -u +%FT%TZ)"
echo "host: $(hostname)"
nvidia-smi || echo "warning: nvidia-smi failed"

# NVRTC from the CUDA toolkit, if it is not already on the loader path.
NVRTC_NO_INSTALL=1 source scripts/nvrtc-env.sh

failed=()
run() {
  echo
  echo "== $*"
  local t0=$SECONDS
  if "$@"; then echo "== ok ($((SECONDS - t0)) s): $*"; else echo "== FAILED ($((SECONDS - t0)) s): $*"; failed+=("$*"); fi
}
for exe in nvrtc_compile gpu_vs_cpu gradcheck; do
  [ -x "dist/$exe" ] || { echo "missing dist/$exe: run scripts/build-dist.sh on the build machine"; exit 2; }
done
# CI=1: a missing NVRTC fails the compile test instead of skipping it.
run env CI=1 dist/nvrtc_compile --test-threads=1
run env VAECUDA_TEST_DEVICE=gpu dist/gpu_vs_cpu --test-threads=1
run dist/gradcheck
[ -x dist/vae ] && run dist/vae --help >/dev/null

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  echo "log: $log"
  exit 1
fi
echo "GPU CHECK PASSED"
echo "log: $log"
