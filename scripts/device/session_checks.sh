#!/bin/bash
# One device call for the kernel and release checks (run ON THE GPU MACHINE from the repo root, .stage carried):
#   1. scripts/gpu_test.sh: build the kernel wheel (fat binary) and the package wheel, install them, hide nvcc,
#      run the GPU tests and the transfer benchmark (SGLang's own bf16 kernels timed in the same run);
#   2. scripts/device/try_releases.sh --serve: which newer SGLang release imports and serves on this machine.
# Leaves in $OUT: bench_transfer.json/.md, releases.json, the kernel wheel, logs.tgz (every log of both steps).
# Env: GPU_TIMEOUT (300 s), REL_TIMEOUT (270 s), RELEASES (for step 2, default "0.5.23 0.5.22").
set -u
FINAL=${OUT:-/tmp/kvtq_out}
W=/tmp/kvtq_session
rm -rf "$W" && mkdir -p "$W/gpu" "$W/rel" "$FINAL"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpu/nvidia_smi.csv" 2>&1
cat "$W/gpu/nvidia_smi.csv"
echo "=== gpu_test.sh"
OUT=$W/gpu timeout "${GPU_TIMEOUT:-300}" bash scripts/gpu_test.sh 2>&1 | tail -60
echo "=== try_releases.sh"
OUT=$W/rel RELEASES="${RELEASES:-0.5.23 0.5.22}" timeout "${REL_TIMEOUT:-270}" bash scripts/device/try_releases.sh --serve 2>&1 | tail -30
cp "$W"/gpu/bench_transfer.json "$W"/gpu/bench_transfer.md "$W"/rel/releases.json "$FINAL"/ 2>/dev/null
cp "$W"/gpu/kvtuner_hicache_kernel-*.whl "$FINAL"/ 2>/dev/null
rm -f "$W"/gpu/*.whl
tar -czf "$FINAL/logs.tgz" -C "$W" .
ls -la "$FINAL"
