#!/usr/bin/env bash
# The project's test command: makes sure NVRTC is loadable (so every CUDA kernel is compiled
# by the tests, GPU or not), then runs `cargo test`. The GPU suite (tests/gpu_vs_cpu.rs) runs
# on a GPU when there is one, else on the emulated device, which needs a C++ compiler (g++ or
# clang++). Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc-env.sh
if ! command -v "${CXX:-c++}" >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
  echo "note: no C++ compiler found: the GPU suite cannot use the emulated device (install g++)" >&2
fi
cargo test "$@"
# The numbered examples, with short settings (only for the whole suite, not a filtered run).
if [ $# -eq 0 ]; then
  bash scripts/examples.sh
fi
