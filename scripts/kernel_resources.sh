#!/usr/bin/env bash
# Registers, shared memory, stack and spills of every kernel in sgl-kernel/csrc/kvtq_kernels.cu, on a machine
# with no GPU and no CUDA toolkit (this CPU machine, CI): ptxas's resource report, from NVIDIA's PyPI wheels.
#   bash scripts/kernel_resources.sh [ARCH ...]        ARCH as in sm_ARCH; default 90
# Installs nvcc, nvvm, crt, the runtime headers and CCCL (CUDA 13.0, the GPU machine's nvcc) into
# .cache/cuda-wheels once (about 150 MB, git-ignored), compiles with the flags of sgl-kernel/CMakeLists.txt
# (-O3 -fmad=false) to a cubin that nothing uses, and prints one line per kernel. Occupancy follows from the
# registers: 65,536 per SM, so 100 registers x 256 threads allow 2 blocks of 256 per SM. Then compiles the whole
# file (host code too) as the wheel's build does, and fails if that does not build.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=$REPO/.cache/cuda-wheels
CU=$D/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ] || [ ! -x "$CU/nvvm/bin/cicc" ] || [ ! -f "$CU/include/crt/host_config.h" ]; then
  rm -rf "$D"
  # one install: a second `pip install --target` into the same folder replaces its nvidia/ tree
  python3 -m pip install -q --no-deps --target "$D" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 2>&1 | { grep -v WARNING || true; }
fi
archs=("${@:-90}")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for a in "${archs[@]}"; do
  "$CU/bin/nvcc" -std=c++20 -arch="sm_$a" -cubin --resource-usage -O3 -fmad=false -I"$CU/include" \
    -o "$out/kvtq_sm$a.cubin" "$REPO/sgl-kernel/csrc/kvtq_kernels.cu" 2> "$out/ptxas_$a.txt"
  echo "sm_$a:"
  # "Compiling entry function 'NAME'" is followed by "Function properties for NAME" (stack, spills) and "Used ..."
  awk '/Compiling entry function/ {match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2); frame = ""}
       /bytes stack frame/ {frame = $0; sub(/.*ptxas info *: */, "", frame)}
       /Used [0-9]+ registers/ && name != "" {u = $0; sub(/.*Used/, "Used", u); print name "\t" u "\t" frame; name = ""; frame = ""}' \
    "$out/ptxas_$a.txt" | c++filt | sed -E 's/kvtq::\(anonymous namespace\):://g' | sort | column -t -s $'\t'
done
# The cubin above is device code only. The wheel's build also runs the host compiler over the file, which rejects
# device-only intrinsics that reach host code (a __device__ constructor's initialisers did, in run 14): compile
# the whole translation unit once, with the build's language standard.
if "$CU/bin/nvcc" -std=c++20 -arch="sm_${archs[0]}" -c -O3 -fmad=false -Xcompiler=-fPIC -I"$CU/include" \
    -o "$out/kvtq_kernels.o" "$REPO/sgl-kernel/csrc/kvtq_kernels.cu" 2> "$out/host.txt"; then
  echo "host + device compile (-c, c++20): ok"
else
  cat "$out/host.txt"; echo "host + device compile (-c, c++20): FAILED"; exit 1
fi
