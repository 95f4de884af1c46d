#!/usr/bin/env bash
# Stage a reference kernel for an A/B device call (HERE, on the CPU machine; the device copy has no .git):
#   bash scripts/device/stage_ref_kernel.sh [REF]          REF: a git ref (default main)
# Writes .ref/ (git-ignored): REF's sgl-kernel/, python/ and scripts/device/build_kernel_wheel.sh, plus this tree's
# benchmark/bench_quantize.py and bench_transfer.py, so that both kernels are timed by the same benchmark code.
# Carry it with the call: run(command="bash scripts/device/session_quantize_ab.sh", carry=[".stage", ".ref"]).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REF=${1:-main}
cd "$REPO"
rm -rf .ref && mkdir -p .ref/benchmark
git archive "$REF" sgl-kernel python scripts/device/build_kernel_wheel.sh | tar -x -C .ref
cp benchmark/bench_quantize.py benchmark/bench_transfer.py benchmark/bf16_baseline.py benchmark/bf16_baseline.cu .ref/benchmark/
git rev-parse --short "$REF" > .ref/REF
echo "staged $REF ($(cat .ref/REF)) in .ref: $(du -sh .ref | cut -f1)"
