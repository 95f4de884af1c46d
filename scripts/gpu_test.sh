#!/usr/bin/env bash
# One device command: build and install our wheels, run the GPU tests and the transfer benchmark from the
# installed kernel wheel with nvcc hidden from PATH, and copy the results to $OUT.
#   bash scripts/gpu_test.sh            on the GPU machine, from the repo root (the device `run` command)
# Steps:
#  1. scripts/device/build_kernel_wheel.sh --target $SITE (kernel wheel + package wheel, no network);
#  2. builds the benchmark's own bf16 stand-in kernels (benchmark/bf16_baseline.cu) while nvcc is there;
#  3. hides nvcc (PATH without it, CUDA_HOME unset) and checks that it is gone;
#  4. pytest -m gpu test/gpu (parallel when pytest-xdist is there, PYTEST_WORKERS, default 8);
#  5. benchmark/bench_transfer.py (BENCH_ARGS, default --quick --pages 1,2,4,16,64,256 --no-sweep --backup-sweep) with SGLang's own
#     bf16 kernels (AOT and JIT) side by side when .stage (scripts/device/make_bundle.sh) was carried;
#  6. with --backup-sweep, benchmark/backup_defaults.py: the small-backup thresholds the sweep supports;
#  7. copies bench_transfer.json/.md, backup_defaults.json, the pytest log and the build log to $OUT.
# Env: SITE (/tmp/kvtq-site), STAGE (.stage; $STAGE/deps/*.whl are installed into SITE too), SGLANG_RELEASE (the
#      release whose bf16 kernels the benchmark times; default the newest staged overlay), KVTQ_ARCHS (e.g.
#      "90-real": build for one arch only, faster), SKIP_BENCH=1, SKIP_TESTS=1. Extra args go to pytest.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=$(command -v "${PYTHON:-python3}")  # absolute: nvcc's directory may leave PATH below
SITE=${SITE:-/tmp/kvtq-site}
STAGE=${STAGE:-.stage}
OUT=${OUT:-$REPO/.cache/gpu_out}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # the CPU reference runs in every worker
t0=$(date +%s)
step() { echo "[gpu_test] +$(( $(date +%s) - t0 )) s: $*"; }

step "build and install the wheels"
rm -rf "$SITE"
bash scripts/device/build_kernel_wheel.sh --target "$SITE" ${KVTQ_ARCHS:+--archs "$KVTQ_ARCHS"} 2>&1 | tee "$OUT/build.log" | grep -v "^  " || true
[ -f "$SITE/kvtuner_hicache_kernel/_kvtq_ops.so" ] || { echo "[gpu_test] kernel wheel build FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1; }
cp dist/*.whl "$OUT/" 2>/dev/null || true
# runtime dependencies the GPU image lacks (e.g. crc32c for page format 2), carried as wheels in $STAGE/deps
if compgen -G "$STAGE/deps/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$STAGE"/deps/*.whl && echo "[gpu_test] installed $(ls "$STAGE"/deps/*.whl | xargs -n1 basename | tr '\n' ' ')"
fi

step "benchmark bf16 stand-in kernels (built by the benchmark, not shipped)"
PYTHONPATH="$SITE" "$PY" -c "import sys; sys.path.insert(0, 'benchmark'); import bf16_baseline; print(bf16_baseline.prebuild())" \
  > "$OUT/bench_baseline_build.log" 2>&1 || echo "[gpu_test] bf16 stand-in build failed (the benchmark leaves those fields out)"

step "hide nvcc"
FULL_PATH=$PATH
NOCC=""
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do [ -x "$d/nvcc" ] || NOCC="${NOCC:+$NOCC:}$d"; done
export PATH="$NOCC"
unset CUDA_HOME CUDA_PATH CUDA_ROOT
export KVTQ_EXPECT_NO_NVCC=1
if command -v nvcc >/dev/null; then echo "[gpu_test] nvcc still on PATH"; exit 1; fi
unset KVTQ_JIT_BUILD
export PYTHONPATH="$SITE"
"$PY" - <<'PYEOF' || exit 1
import torch
from kvtuner_hicache.quant import native
ok = native.available()
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"[gpu_test] torch {torch.__version__} (CUDA {torch.version.cuda}), {dev}; native kernels: "
      f"{native.build_name() if ok else 'UNAVAILABLE: ' + str(native.unavailable_reason())}", flush=True)
raise SystemExit(0 if ok else 1)
PYEOF

rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "GPU tests"
  workers=()
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
  "$PY" -m pytest -m gpu test/gpu -q -p no:cacheprovider -rfE --junitxml "$OUT/pytest_gpu.xml" "${workers[@]}" "$@" 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -40
  rc=${PIPESTATUS[0]}
  # one counted line whatever pytest's verbosity (callers grep the [gpu_test] lines; run 16's summary got lost)
  "$PY" scripts/junit_counts.py "$OUT/pytest_gpu.xml" | sed 's/^/[gpu_test] GPU tests: /'
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  bench_path="$SITE"
  if [ -f "$STAGE/sglang-site.tar.xz" ]; then
    # the release we serve (SGLANG_RELEASE, else the newest staged overlay): its AOT and JIT bf16 kernels
    # shellcheck source=scripts/device/release_site.sh
    . scripts/device/release_site.sh
    rel=${SGLANG_RELEASE:-$(staged_releases | head -1)}
    step "SGLang $rel site for its bf16 kernels"
    SGL_SITE=$(release_site "$rel") || exit 1
    bench_path="$SITE:$SGL_SITE"
  else
    echo "[gpu_test] no $STAGE/sglang-site.tar.xz: SGLang's bf16 kernels are not timed (carry .stage to add them)"
  fi
  # nvcc back on PATH: SGLang's JIT load kernel (its serving path when nvcc is there) builds for the baseline;
  # ours still load from the installed wheel (the benchmark prints the build it loaded)
  step "transfer benchmark"
  # shellcheck disable=SC2086
  PATH="$FULL_PATH" KVTQ_PRESETS_DIR="${KVTQ_PRESETS_DIR:-$STAGE/presets}" PYTHONPATH="$bench_path" "$PY" \
    benchmark/bench_transfer.py ${BENCH_ARGS:---quick --pages 1,2,4,16,64,256 --no-sweep --backup-sweep} \
    --json "$OUT/bench_transfer.json" --md "$OUT/bench_transfer.md" 2>&1 | tee "$OUT/bench_transfer.log" | tail -90
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  if grep -q '"backup-variant"' "$OUT/bench_transfer.json" 2>/dev/null; then  # the small-backup thresholds it supports
    "$PY" benchmark/backup_defaults.py "$OUT/bench_transfer.json" --json "$OUT/backup_defaults.json" | sed 's/^/[gpu_test] /'
  fi
fi
step "done (rc=$rc); results in $OUT"
exit $rc
