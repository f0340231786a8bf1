#!/usr/bin/env bash
# Everything the GPU bring-up needs, in one call on the GPU machine (no Rust, no network), from
# a dist/ made by scripts/build-dist.sh: the GPU suite (scripts/gpu-check.sh), NVRTC cold and
# warm start, the two 10-epoch MNIST quality runs (mlp, conv; batch 128, Adam 1e-3, seed 0), a
# z = 2 run for the manifold, and sample/reconstruct/manifold pictures. Logs, metrics and
# pictures go to ${OUT:-bench/results/gpu-session-<date>} (checkpoints stay in runs/, they are
# large). Set SKIP_CHECK=1 to skip the suite, EPOCHS=N to shorten the training runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu-session-$(date -u +%Y%m%d)}
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1
epochs=${EPOCHS:-10}
echo "date: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
NVRTC_NO_INSTALL=1 source scripts/nvrtc-env.sh

status=0
step() {
  echo; echo "== $*"
  local t0; t0=$(date +%s%N)
  "$@"; local rc=$?
  echo "== rc=$rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms: $*"
  [ $rc -eq 0 ] || status=1
  return $rc
}

[ "${SKIP_CHECK:-0}" = 1 ] || step env OUT="$out" scripts/gpu-check.sh

# NVRTC cold start (empty kernel cache) and warm start (cached CUBINs): see the `kernels: ready
# in` lines of these two tiny runs.
export VAECUDA_CACHE="$out/.kernel-cache"
rm -rf "$VAECUDA_CACHE"
step dist/vae --device cuda train --limit-train 256 --limit-test 256 --epochs 1 --out runs/gpu-cold
step dist/vae --device cuda train --limit-train 256 --limit-test 256 --epochs 1 --out runs/gpu-warm
rm -rf "$VAECUDA_CACHE"

for arch in mlp conv; do
  if step dist/vae --device cuda train --arch "$arch" --epochs "$epochs" --batch-size 128 --lr 1e-3 --seed 0 \
      --out "runs/gpu-$arch"; then
    cp "runs/gpu-$arch/metrics.csv" "$out/$arch-metrics.csv"
    step dist/vae --device cuda sample --checkpoint "runs/gpu-$arch" --out "$out/$arch-samples.png"
    step dist/vae --device cuda reconstruct --checkpoint "runs/gpu-$arch" --out "$out/$arch-reconstructions.png"
  fi
done
if step dist/vae --device cuda train --arch mlp --latent 2 --epochs "$epochs" --seed 0 --out runs/gpu-mlp-z2; then
  step dist/vae --device cuda manifold --checkpoint runs/gpu-mlp-z2 --out "$out/mlp-z2-manifold.png"
fi
echo; echo "session status: $status (logs in $out)"
exit $status
