#!/usr/bin/env bash
# Runs every example in examples/ with short settings, so none can rot (scripts/test.sh calls
# it after the tests), and checks that example 04 reaches the loss `vae train` prints for the
# same epoch. Uses the test profile, which `cargo test` has just built.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { cargo run --quiet --profile test --example "$@"; }
run 01_tensors_and_backends
run 02_tape_and_gradcheck
run 03_one_op_end_to_end
out04=$(run 04_vae_in_one_screen 1024 512)
echo "$out04"
ex04=$(echo "$out04" | grep -E '^epoch' | sed -E 's/[0-9.]+ s$//')
run 05_pytorch_interop 300
# The `vae` binary `cargo test` built. Not `cargo run --bin vae`: without the dev-dependencies
# in the build, features resolve differently (criterion and tempfile turn on `std` in `either`,
# `alloc` in `serde`), and that rebuilt rayon, gemm and our crate: 130 s of CI. With `--tests` they
# resolve as in `cargo test`, nothing is recompiled, and target/debug/vae is that binary again.
cargo build --quiet --profile test --bin vae --tests
vae="${CARGO_TARGET_DIR:-target}/debug/vae"
out=$(mktemp -d)
cli=$("$vae" --device cpu train --epochs 1 --limit-train 1024 --limit-test 512 \
  --out "$out/run" | grep -E '^epoch' | sed -E 's/[0-9.]+ s +[0-9]+ img\/s$//')
rm -rf "$out"
if [ "$ex04" != "$cli" ]; then
  echo "example 04 and vae train disagree:" >&2
  echo "  example: $ex04" >&2
  echo "  vae:     $cli" >&2
  exit 1
fi
echo "examples: all five ran; 04 matches vae train: $cli"
