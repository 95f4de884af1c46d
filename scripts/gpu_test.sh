#!/usr/bin/env bash
# GPU tests: `pytest -m gpu test/gpu` on a machine with an NVIDIA GPU, nvcc and a CUDA torch (the GPU
# machine's image has torch, pytest, pytest-xdist, hypothesis and pyyaml; nothing is installed here).
#  1. builds (or loads from ~/.cache/kvtuner_hicache) the native kernels once, in this process, so that
#     pytest workers do not race to compile; KVTQ_BUILD_VERBOSE=1 prints nvcc/ptxas output;
#  2. runs the GPU tests, in parallel when pytest-xdist is there (PYTEST_WORKERS, default 8).
# The mixed-precision preset tests read ../shared/kvtuner-presets, or KVTQ_PRESETS_DIR (skip if absent).
# Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # the CPU reference runs in every worker
PY=${PYTHON:-python3}
"$PY" - <<'PYEOF'
import sys
import time

import torch

from kvtuner_hicache.quant import native

t = time.time()
ok = native.available()
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"[gpu_test] torch {torch.__version__} (CUDA {torch.version.cuda}), {dev}; native kernels: "
      f"{native.build_name() if ok else 'UNAVAILABLE: ' + str(native.unavailable_reason())} ({time.time() - t:.1f} s)",
      flush=True)
sys.exit(0 if ok or not torch.cuda.is_available() else 1)
PYEOF
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
exec "$PY" -m pytest -m gpu test/gpu -q -p no:cacheprovider "${workers[@]}" "$@"
