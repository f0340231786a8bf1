#!/usr/bin/env bash
# The CelebA benchmark on a generated CelebA-like folder (issue 14): writes N 178×218 JPEGs
# (default 20,000; `cargo bench --bench celeba_like`), then times with peak RSS:
#   cold  - `vae train` (conv-bn, 64×64, MSE, KL weight 0.00025: the data pipeline's load, not the
#           CelebA tutorial's recipe, which bench/recipes.sh runs) for one epoch
#           on an empty cache: decodes every image (the decode rate) and writes the cache;
#   warm  - the same run again: reads the cache (the cache load time);
#   small - the same on 256 + 128..255 images: the model and its activations without the data;
#   mnist - one MLP and one conv epoch on the bundled MNIST (peak RSS, before/after u8).
# Logs go to $OUT (default bench/results/cpu-celeba-<date>); the folder to $DATA (default
# /tmp/celeba-like, kept for reruns; delete it after) and the cache to $OUT/cache (deleted at
# the end); MNIST=0 skips MNIST. Usage: bench/celeba.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
OUT=${OUT:-bench/results/cpu-celeba-$(date -u +%Y%m%d)}
DATA=${DATA:-/tmp/celeba-like}
mkdir -p "$OUT"
export VAECUDA_DATA_CACHE="$(cd "$OUT" && pwd)/cache"
rm -rf "$VAECUDA_DATA_CACHE"
cargo build --release --quiet
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse --short HEAD)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "command: bench/celeba.sh $N"
} | tee "$OUT/env.txt"

# Runs a command and appends its peak RSS (kB) to the log: /usr/bin/time when present, else
# the process's VmHWM, polled until it exits.
peak() {
  local log=$1; shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v "$@" >"$log" 2>&1 || { cat "$log"; return 1; }
    grep 'Maximum resident' "$log" | awk '{print "peak RSS kB: " $NF}' >>"$log"
  else
    "$@" >"$log" 2>&1 & local pid=$! hwm=0
    while kill -0 $pid 2>/dev/null; do
      hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo "$hwm"); sleep 0.2
    done
    wait $pid || { cat "$log"; return 1; }
    echo "peak RSS kB: $hwm" >>"$log"
  fi
  grep -E 'decoded|from the cache|^epoch|peak RSS' "$log"
}

if [ "$(ls "$DATA/img_align_celeba" 2>/dev/null | wc -l)" -ne "$N" ]; then
  rm -rf "$DATA"
  cargo bench --quiet --bench celeba_like -- "$DATA" "$N" | tee "$OUT/generate.txt"
fi
du -sh "$DATA" | tee -a "$OUT/generate.txt"
VAE=target/release/vae
RECIPE=(--arch conv-bn --recon mse --kl-weight 0.00025 --image-size 64 --epochs 1)
echo "== cold (decode + cache write + one epoch)"
peak "$OUT/cold.txt" $VAE --device cpu train --data "$DATA" "${RECIPE[@]}" --out "$OUT/run" --overwrite
echo "== warm (cache load + one epoch)"
peak "$OUT/warm.txt" $VAE --device cpu train --data "$DATA" "${RECIPE[@]}" --out "$OUT/run" --overwrite
# The same batch shapes as the full run (whole batches of 128 in training, the test set's last
# batch as long), since the CPU backend keeps buffers of every batch size it has seen.
TEST_N=$(awk '$2 == 2' "$DATA/list_eval_partition.txt" | wc -l)
SMALL_TEST=$((128 + TEST_N % 128))
echo "== small (256 + $SMALL_TEST images: the model and activations)"
peak "$OUT/small.txt" $VAE --device cpu train --data "$DATA" "${RECIPE[@]}" --limit-train 256 \
  --limit-test "$SMALL_TEST" --out "$OUT/run-small" --overwrite
ls -l "$VAECUDA_DATA_CACHE" | tee "$OUT/cache-files.txt"
rm -rf "$VAECUDA_DATA_CACHE" "$OUT/run" "$OUT/run-small"
[ "${MNIST:-1}" = 1 ] || exit 0
for arch in mlp conv; do
  echo "== MNIST $arch, one epoch"
  peak "$OUT/mnist-$arch.txt" $VAE --device cpu train --arch $arch --epochs 1 --out "$OUT/run-mnist" --overwrite
  rm -rf "$OUT/run-mnist"
done
