#!/usr/bin/env bash
# Builds, here, everything the GPU machine runs (it has a CUDA 13 driver and NVRTC but no Rust
# and no network) into the git-ignored dist/: the release `vae` binary (skipped while it does
# not build yet) and the test executables of the GPU suite (gpu_vs_cpu, nvrtc_compile,
# gradcheck). Generic x86-64 code (no -C target-cpu=native), stripped, < 60 MiB in all.
# Then copy the repository (or just dist/ and scripts/) over and run scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
rm -rf dist && mkdir -p dist

if cargo build --release --bin vae --quiet 2>dist/.vae-build.log; then
  cp "$target/release/vae" dist/vae
else
  echo "note: the vae binary does not build yet; dist/ has the test executables only:" >&2
  tail -n 5 dist/.vae-build.log >&2 || true
fi
rm -f dist/.vae-build.log

# Test executables: cargo prints each built artifact as JSON; keep the three suites.
cargo test --release --no-run --message-format=json --test gpu_vs_cpu --test nvrtc_compile --test gradcheck \
  | python3 -c '
import json, shutil, sys
want = {"gpu_vs_cpu", "nvrtc_compile", "gradcheck"}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        shutil.copy(m["executable"], "dist/" + m["target"]["name"])
        want.discard(m["target"]["name"])
if want:
    sys.exit("missing test executables: " + ", ".join(sorted(want)))
'
if command -v strip >/dev/null; then strip dist/* 2>/dev/null || true; fi
ls -l dist
total=$(du -cb dist/* | tail -n1 | cut -f1)
echo "dist/: $((total / 1024 / 1024)) MiB"
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
  echo "error: dist/ is over 60 MiB" >&2
  exit 1
fi
