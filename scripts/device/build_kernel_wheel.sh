#!/usr/bin/env bash
# Build our two wheels without network, on a machine with the torch they will run with:
#   dist/kvtuner_hicache_kernel-<v>-py3-none-linux_x86_64.whl  the CUDA kernels (sgl-kernel/: scikit-build-core +
#                                                            CMake + ninja, nvcc >= 12.8 for sm100; fat binary
#                                                            sm80/sm90/sm100 + PTX), torch.ops.kvtq
#   dist/sglang_kvtuner_hicache-<v>-py3-none-any.whl         the Python package (python/)
# and, with --target DIR, install both there (pip --no-deps --no-index --target), for PYTHONPATH=DIR use.
# The GPU machine (Python 3.12, torch 2.11.0+cu130, nvcc 13.0, CMake, ninja, scikit-build-core, no network)
# is the reference; docker/Dockerfile installs exactly these two files.
#
# Usage: bash scripts/device/build_kernel_wheel.sh [--target DIR] [--kernel-only] [--archs "90-real;90-virtual"]
# Env:   PYTHON (python3), DIST (<repo>/dist), CMAKE_BUILD_PARALLEL_LEVEL.
# Incremental: the CMake build dir is sgl-kernel/build/ (git-ignored), so a warm machine rebuilds only what changed.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
DIST=${DIST:-$REPO/dist}
TARGET="" KERNEL_ONLY=0 ARCHS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET=$2; shift 2 ;;
    --kernel-only) KERNEL_ONLY=1; shift ;;
    --archs) ARCHS=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
command -v nvcc >/dev/null || { echo "build_kernel_wheel: nvcc not on PATH (building needs the CUDA toolkit)" >&2; exit 1; }
"$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "scikit_build_core") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"build_kernel_wheel: {', '.join(missing)} missing in {sys.executable} (no build isolation: they must be installed)")
PYEOF
echo "[build_kernel_wheel] $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'), $(nvcc --version | tail -1), $(cmake --version | head -1), ninja $(ninja --version)"
mkdir -p "$DIST"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
cfg=()
[ -n "$ARCHS" ] && cfg=(--config-settings=cmake.define.KVTQ_CUDA_ARCHITECTURES="$ARCHS")
t0=$(date +%s)
rm -f "$DIST"/kvtuner_hicache_kernel-*.whl
"$PY" -m pip wheel --no-build-isolation --no-deps --no-index "${cfg[@]}" -w "$DIST" "$REPO/sgl-kernel"
echo "[build_kernel_wheel] kernel wheel in $(( $(date +%s) - t0 )) s: $(ls "$DIST"/kvtuner_hicache_kernel-*.whl)"
if [ "$KERNEL_ONLY" != 1 ]; then
  rm -f "$DIST"/sglang_kvtuner_hicache-*.whl
  "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -w "$DIST" "$REPO/python"
  echo "[build_kernel_wheel] package wheel: $(ls "$DIST"/sglang_kvtuner_hicache-*.whl)"
fi
if [ -n "$TARGET" ]; then
  mkdir -p "$TARGET"
  wheels=("$DIST"/kvtuner_hicache_kernel-*.whl)
  [ "$KERNEL_ONLY" = 1 ] || wheels+=("$DIST"/sglang_kvtuner_hicache-*.whl)
  "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$TARGET" "${wheels[@]}"
  echo "[build_kernel_wheel] installed into $TARGET: $(cd "$TARGET" && ls -d kvtuner_hicache* 2>/dev/null | tr '\n' ' ')"
fi
