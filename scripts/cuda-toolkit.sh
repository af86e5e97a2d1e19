#!/usr/bin/env bash
# Build-time CUDA 13.0 toolchain for machines without a system CUDA (and without a GPU).
#
# Installs nvcc, the CUDA headers, cudart, cuBLAS, cuRAND, NVRTC and NCCL from NVIDIA's PyPI wheels
# into a private virtualenv, arranges them as an ordinary CUDA_HOME (bin/, include/, lib64/,
# nvvm/), and builds a link-time stand-in for the driver library (libcuda.so, soname
# libcuda.so.1) whose symbols come from cuda.h; the real driver is loaded on the GPU machine.
# On stdout it prints only the environment to export, so use it as
#
#   eval "$(scripts/cuda-toolkit.sh)"          # optional argument: install dir
#   cargo build --release --features cuda
#
# Stays on CUDA 13.0 on purpose: PTX from a newer nvcc may be rejected by a 13.0 driver (580).
# Needs python3 with venv, pip access to PyPI, gcc; about 1.6 GB of disk, once. A toolkit
# installed before NCCL was added gets NCCL on the next run.
set -euo pipefail

PREFIX=${1:-${MOE_CUDA_TOOLKIT_DIR:-$HOME/.cache/cuda-13.0}}
log() { echo "cuda-toolkit: $*" >&2; }

if [ -x "$PREFIX/bin/nvcc" ] && [ -e "$PREFIX/lib64/libcuda.so" ]; then
  log "using existing toolkit in $PREFIX"
else
  VENV="$PREFIX-wheels"
  log "installing CUDA 13.0 wheels into $VENV (a few minutes)"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.*' >&2
  # The CUDA 13 wheels share one tree: site-packages/nvidia/cu13/{bin,include,lib,nvvm}.
  CU13=$("$VENV/bin/python" - <<'PY'
import os, nvidia
print(os.path.join(list(nvidia.__path__)[0], "cu13"))
PY
)
  [ -x "$CU13/bin/nvcc" ] || { log "no nvcc under $CU13"; exit 1; }
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX/lib64/stubs"
  for d in bin include nvvm; do ln -s "$CU13/$d" "$PREFIX/$d"; done
  for f in "$CU13"/lib/*; do ln -s "$f" "$PREFIX/lib64/$(basename "$f")"; done
  # Unversioned names for the linker (the wheels ship only libX.so.N).
  for name in cudart cublas cublasLt curand nvrtc; do
    real=$(cd "$PREFIX/lib64" && ls "lib$name.so."* 2>/dev/null | sort | head -n 1 || true)
    [ -n "$real" ] && ln -sf "$real" "$PREFIX/lib64/lib$name.so"
  done
  # Driver stand-in: one empty function per cu* name in cuda.h is enough to link against;
  # nothing here is ever called (the soname makes the loader pick the real driver at run time).
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CU13/include/cuda.h" | sort -u \
    | sed 's/.*/void &(void) {}/' > "$PREFIX/lib64/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 \
    -o "$PREFIX/lib64/stubs/libcuda.so" "$PREFIX/lib64/stubs/libcuda_stub.c"
  ln -sf stubs/libcuda.so "$PREFIX/lib64/libcuda.so"
  log "installed into $PREFIX ($("$PREFIX/bin/nvcc" --version | tail -n 1))"
fi

# NCCL (multi-GPU collectives; the binary links libnccl.so.2, which the GPU machine provides
# through its CUDA toolkit or PyTorch's nvidia-nccl wheel).
if [ ! -e "$PREFIX/lib64/libnccl.so" ]; then
  VENV="$PREFIX-wheels"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >&2
  log "installing NCCL into $VENV"
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
    'nvidia-nccl-cu13==2.28.*' >&2
  NCCL=$("$VENV/bin/python" - <<'PY'
import os, nvidia
print(next(os.path.join(p, "nccl") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "nccl"))))
PY
)
  [ -e "$NCCL/lib/libnccl.so.2" ] || { log "no libnccl.so.2 under $NCCL"; exit 1; }
  ln -sf "$NCCL/lib/libnccl.so.2" "$PREFIX/lib64/libnccl.so.2"
  ln -sf libnccl.so.2 "$PREFIX/lib64/libnccl.so"
fi

cat <<EXPORTS
export CUDA_HOME="$PREFIX"
export CUDA_PATH="$PREFIX"
export PATH="$PREFIX/bin:\$PATH"
export LIBRARY_PATH="$PREFIX/lib64:\${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EXPORTS
