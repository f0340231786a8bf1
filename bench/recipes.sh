#!/usr/bin/env bash
# The recipes' records (bench/results/<date>-cpu-recipes.md):
#   celeba  - `vae train --recipe celeba` for one epoch on N generated CelebA-like images
#             (default 2,000; all of them train, as the recipe says), its epoch time
#             extrapolated to CelebA's 202,599 images, and samples from it;
#   mnist   - the CelebA objective on MNIST (conv-bn, 2 epochs), two ways: the flags this
#             project used to give for it (--recon mse --kl-weight 0.00025: the weight against
#             a squared error summed over pixels) and the tutorial's reductions (mean over
#             values, KL mean over images); the KL per image and samples from each.
# Logs and pictures go to $OUT (default bench/results/cpu-recipes-<date>); the folder to
# $DATA (default /tmp/celeba-like-recipe, kept for reruns). Usage: bench/recipes.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
OUT=${OUT:-bench/results/cpu-recipes-$(date -u +%Y%m%d)}
DATA=${DATA:-/tmp/celeba-like-recipe}
mkdir -p "$OUT"
export VAECUDA_DATA_CACHE=off
cargo build --release --quiet
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse --short HEAD)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "command: bench/recipes.sh $N"
} | tee "$OUT/env.txt"
VAE=target/release/vae
if [ "$(ls "$DATA/img_align_celeba" 2>/dev/null | wc -l)" -ne "$N" ]; then
  rm -rf "$DATA"
  cargo bench --quiet --bench celeba_like -- "$DATA" "$N" | tee "$OUT/generate.txt"
fi
echo "== celeba recipe, one epoch on $N images"
$VAE --device cpu train --recipe celeba --data "$DATA" --epochs 1 --out "$OUT/celeba" --overwrite 2>&1 \
  | grep -v '^memory' | tee "$OUT/celeba.txt"
$VAE --device cpu sample --checkpoint "$OUT/celeba" --out "$OUT/celeba-samples.png" >/dev/null
for how in summed tutorial; do
  if [ $how = summed ]; then FLAGS=(); else FLAGS=(--recon-reduction mean --kl-reduction batch-mean); fi
  echo "== MNIST, conv-bn, the CelebA objective with the KL weighed against the $how error"
  $VAE --device cpu train --arch conv-bn --recon mse --kl-weight 0.00025 "${FLAGS[@]}" --epochs 2 \
    --out "$OUT/mnist-$how" --overwrite 2>&1 | grep -v '^memory' | tee "$OUT/mnist-$how.txt"
  $VAE --device cpu sample --checkpoint "$OUT/mnist-$how" --out "$OUT/mnist-$how-samples.png" >/dev/null
done
rm -rf "$OUT"/celeba/*.safetensors "$OUT"/mnist-*/*.safetensors
