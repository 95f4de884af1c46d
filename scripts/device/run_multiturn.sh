#!/bin/bash
# Runs ON THE GPU MACHINE from the repo root, .stage/ carried (scripts/device/make_bundle.sh):
#   SGLANG_RELEASE=0.5.23 bash scripts/device/run_multiturn.sh [multiturn_arms.py options, e.g. --plan l2:bf16,l2:kv4
#       --budget 300; MLA model: --model-dir /tmp/dsv2_lite]
# SGLANG_RELEASE: a staged release (.stage/sglang-<ver>.tar.xz) or 0.5.17; default: what try_releases.sh chose on
# this machine, else .stage/release, else 0.5.17 (run_server.sh). Builds and installs our two wheels into that
# release's site /tmp/sgl/<release> (run_server.sh setup), runs every scenario x arm of benchmark/multiturn_arms.py
# (one SGLang server each), checks the captured pages (benchmark/check_capture.py), and leaves in $OUT:
#   run.log, setup.log, results.json, bench_multiturn.json, capture_check.json, logs.tgz (server logs),
#   jit_cache.tgz (SGLang tvm-ffi + Triton + our kernel build caches: copy it to .stage/ for the next run;
#   SAVE_JIT=0 skips it), capture_<scenario>_<arm>.tgz for multiturn_arms.py --capture-sample.
set -u
OUT=${OUT:-/tmp/kvtq_out}
WORK=${WORK:-/tmp/kvtq_work}
mkdir -p "$OUT" "$WORK"
save() {
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  if [ "${SAVE_JIT:-1}" = 1 ]; then  # SAVE_JIT=0: no jit_cache.tgz (frees one of the 8 files that come back)
    (cd ~ && tar -czf "$OUT/jit_cache.tgz" .cache/tvm-ffi .cache/kvtuner_hicache .triton/cache 2>/dev/null)
    if [ "$(stat -c %s "$OUT/jit_cache.tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
      (cd ~ && tar -czf "$OUT/jit_cache.tgz" .cache/tvm-ffi .cache/kvtuner_hicache 2>/dev/null)
    fi
  fi
  ls -la "$OUT"
}
trap save EXIT
read -r SGLANG_RELEASE SITE <<< "$(bash scripts/device/run_server.sh release)"
export SGLANG_RELEASE SITE   # run_server.sh --exec (the launcher) uses the same site
echo "SGLang release $SGLANG_RELEASE, site $SITE"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g | head -2; nproc
  echo "SGLang release $SGLANG_RELEASE"; bash scripts/device/run_server.sh setup; } > "$OUT/setup.log" 2>&1
rc=$?; cat "$OUT/setup.log"; [ $rc = 0 ] || exit 1
PYTHONPATH=$SITE PYTHONUNBUFFERED=1 python3 benchmark/multiturn_arms.py --out-dir "$OUT" --work-dir "$WORK" "$@" 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
