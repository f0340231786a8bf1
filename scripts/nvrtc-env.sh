# Sourced by the scripts: puts NVIDIA's runtime compiler (libnvrtc.so.13) on LD_LIBRARY_PATH.
# Building needs no CUDA toolkit; NVRTC alone (a PyPI wheel, no GPU needed) compiles kernels.
# Order: an NVRTC already loadable, then a wheel already installed for python3, then a
# project-local install into .cache/nvrtc (git-ignored).
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
if ! command -v python3 >/dev/null; then
  echo "note: python3 not found; cannot locate NVRTC (install it with: pip install nvidia-cuda-nvrtc)" >&2
elif ! nvrtc_loadable; then
  dir=$(nvrtc_dir_of_python "$PWD/.cache/nvrtc" || true)
  if [ -z "$dir" ]; then
    echo "NVRTC not found: installing the nvidia-cuda-nvrtc wheel into .cache/nvrtc" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target .cache/nvrtc 'nvidia-cuda-nvrtc>=13,<14' >&2
    dir=$(nvrtc_dir_of_python "$PWD/.cache/nvrtc")
  fi
  export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
