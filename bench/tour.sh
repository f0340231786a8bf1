#!/usr/bin/env bash
# Regenerates every picture of the README's tour from real runs on this machine (CPU by
# default), so the pictures never drift from the code. About 3 minutes on the 2-core VM.
#
#   bench/tour.sh                      # writes bench/results/<UTC date>-cpu-tour/
#   bench/tour.sh DIR                  # or into DIR
# Extra flags for every command (e.g. --device cuda) go in VAE_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/$(date -u +%F)-cpu-tour}
flags=${VAE_FLAGS:---device cpu}
cargo build --release --quiet
vae() { target/release/vae "$@" $flags; }
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"

# Two runs: the MLP VAE with a 20-D latent (10 epochs), and one with a 2-D latent (5 epochs)
# for the manifold and the plain latent scatter.
vae train --latent 20 --epochs 10 --seed 0 --out "$runs/mlp-z20"
vae train --latent 2 --epochs 5 --seed 0 --out "$runs/mlp-z2"

vae sample --checkpoint "$runs/mlp-z20" --out "$out/samples.png"
vae reconstruct --checkpoint "$runs/mlp-z20" --out "$out/reconstructions.png"
vae interpolate --checkpoint "$runs/mlp-z20" --out "$out/interpolation.png"
vae manifold --checkpoint "$runs/mlp-z2" --out "$out/manifold-z2.png"
vae latent --checkpoint "$runs/mlp-z2" --out "$out/latent-z2.png"
vae latent --checkpoint "$runs/mlp-z20" --method pca --out "$out/latent-z20-pca.png"
start=$(date +%s.%N)
vae latent --checkpoint "$runs/mlp-z20" --method tsne --perplexity 30 --iterations 1000 --seed 0 \
    --out "$out/latent-z20-tsne.png"
echo "t-SNE of 10,000 test latents (with encoding and drawing): $(echo "$(date +%s.%N) - $start" | bc) s"
vae plot "$runs/mlp-z20" --out "$out/loss.png"
vae plot "$runs/mlp-z20" "$runs/mlp-z2" --log --out "$out/loss-compare.png"
# The CSVs are large and say nothing the pictures do not; keep the PNGs.
rm -f "$out"/*.csv
ls -la "$out"
