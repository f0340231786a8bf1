#!/usr/bin/env bash
# The project's test command: makes sure NVRTC is loadable (so every CUDA kernel is compiled
# by the tests, GPU or not), then runs `cargo test`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc-env.sh
exec cargo test "$@"
