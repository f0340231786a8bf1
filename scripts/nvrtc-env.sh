# Sourced by the scripts: puts NVIDIA's runtime compiler (libnvrtc.so.13) on LD_LIBRARY_PATH.
# Building needs no CUDA toolkit; NVRTC alone (a PyPI wheel, no GPU needed) compiles kernels.
# Order: an NVRTC already loadable, a CUDA toolkit's, a wheel already installed for python3
# (PyTorch's CUDA wheels bring one), then a project-local install into .cache/nvrtc (git-ignored).
nvrtc_loadable() {
  python3 - <<'PY' 2>/dev/null
import ctypes, sys
try:
    ctypes.CDLL("libnvrtc.so.13")
except OSError:
    sys.exit(1)
PY
}
nvrtc_dir_of_python() {
  python3 - "$@" <<'PY' 2>/dev/null
import glob, os, site, sys
roots = sys.argv[1:] + site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for lib in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so.13")):
        print(os.path.dirname(lib)); sys.exit(0)
sys.exit(1)
PY
}
nvrtc_dir_of_toolkit() {
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu; do
    if [ -e "$d/libnvrtc.so.13" ]; then echo "$d"; return 0; fi
  done
  return 1
}
if ! command -v python3 >/dev/null; then
  echo "note: python3 not found; cannot locate NVRTC (install it with: pip install nvidia-cuda-nvrtc)" >&2
elif ! nvrtc_loadable; then
  dir=$(nvrtc_dir_of_toolkit || nvrtc_dir_of_python "$PWD/.cache/nvrtc" || true)
  # NVRTC_NO_INSTALL=1 (the GPU machine has no network): only look, never pip install.
  if [ -z "$dir" ] && [ "${NVRTC_NO_INSTALL:-0}" != 1 ]; then
    echo "NVRTC not found: installing the nvidia-cuda-nvrtc wheel into .cache/nvrtc" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target .cache/nvrtc 'nvidia-cuda-nvrtc>=13,<14' >&2
    dir=$(nvrtc_dir_of_python "$PWD/.cache/nvrtc")
  fi
  if [ -n "$dir" ]; then
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "note: libnvrtc.so.13 not found (CUDA toolkit, or pip install nvidia-cuda-nvrtc)" >&2
  fi
fi
# NVIDIA's disassembler, for the performance model's SASS facts (src/model/sass.rs: FFMA share
# of each kernel's loop, 128-bit loads, tensor-core instructions). Optional: without it the
# model takes the tile loop's FFMA share from the source. A PyPI wheel, like NVRTC.
if ! command -v nvdisasm >/dev/null; then
  nvdisasm_bin=$(ls -d "$PWD"/.cache/cudatools/nvidia/*/bin 2>/dev/null | head -1 || true)
  if [ -z "$nvdisasm_bin" ] && [ "${NVRTC_NO_INSTALL:-0}" != 1 ] && command -v python3 >/dev/null; then
    echo "nvdisasm not found: installing the nvidia-cuda-nvdisasm wheel into .cache/cudatools" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target .cache/cudatools 'nvidia-cuda-nvdisasm>=13,<14' >&2 \
      || echo "note: nvdisasm could not be installed; the model's SASS facts are left out" >&2
    nvdisasm_bin=$(ls -d "$PWD"/.cache/cudatools/nvidia/*/bin 2>/dev/null | head -1 || true)
  fi
  if [ -n "$nvdisasm_bin" ]; then
    export PATH="$nvdisasm_bin:$PATH"
  fi
fi
# CUDA's own headers for the half and bfloat16 types (cuda_fp16.h, cuda_bf16.h and what they
# include: the runtime's headers, crt/ and CCCL's nv/target), which NVRTC does not build in.
# The project's kernels do not include them; the emulator's tests of half and bfloat16 warp
# shuffles do, compiled by NVRTC and by the host compiler from the same text. PyPI wheels
# (about 7 MB) into .cache/cudaheaders, or a CUDA toolkit's include folder.
if [ -z "${VAECUDA_CUDA_INCLUDE:-}" ]; then
  for d in /usr/local/cuda/include "$PWD/.cache/cudaheaders/nvidia/cu13/include"; do
    if [ -e "$d/cuda_bf16.h" ] && [ -e "$d/crt/host_defines.h" ]; then VAECUDA_CUDA_INCLUDE=$d; break; fi
  done
  if [ -z "${VAECUDA_CUDA_INCLUDE:-}" ] && [ "${NVRTC_NO_INSTALL:-0}" != 1 ] && command -v python3 >/dev/null; then
    echo "CUDA headers not found: installing the nvidia-cuda-runtime, -crt and -cccl wheels into .cache/cudaheaders" >&2
    if python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target .cache/cudaheaders \
      'nvidia-cuda-runtime>=13,<14' 'nvidia-cuda-crt>=13,<14' 'nvidia-cuda-cccl>=13,<14' >&2; then
      VAECUDA_CUDA_INCLUDE="$PWD/.cache/cudaheaders/nvidia/cu13/include"
    else
      echo "note: the CUDA headers could not be installed; the half and bfloat16 shuffle tests cannot run" >&2
    fi
  fi
  if [ -n "${VAECUDA_CUDA_INCLUDE:-}" ]; then export VAECUDA_CUDA_INCLUDE; fi
fi
