#!/bin/bash
# One device call of the +-3 % end-to-end benchmark (ON THE GPU MACHINE from the repo root, .stage carried):
#   SCENARIO=l2 bash scripts/device/session_bench_e2e.sh      # arms none, bf16, kv4 (~8 min)
#   SCENARIO=l3 bash scripts/device/session_bench_e2e.sh      # arms bf16, kv4 over the file backend
# Builds and installs our wheels into the release site (run_server.sh setup), optionally runs the GPU tests
# and the quick transfer benchmark first (GPU_CHECKS=1: scripts/gpu_test.sh, ~2 min), then
# benchmark/bench_e2e.py. Leaves in $OUT: bench_e2e_<scenario>.json (one record per pattern x arm x repeat),
# bench_e2e_<scenario>_summary.json, setup.log, run.log, logs.tgz (server logs, start-up lines).
# Env: SCENARIO (l2), SGLANG_RELEASE (0.5.23), BUDGET (s, 430), REPS (3), GPU_CHECKS (0), BENCH_ARGS (bench_e2e),
#      TRANSFER_ARGS (bench_transfer under GPU_CHECKS), GPU_TIMEOUT (300),
#      L3_BACKEND=mooncake (SCENARIO l3): SGLang's mooncake backend, a mooncake_master per server, from .mooncake/
#      (scripts/device/mooncake_bundle.sh; carry [".mooncake"] alone, right after a call that carried .stage:
#      .stage stays on a warm machine, and both together exceed a call's 64 MiB).
set -u
OUT=${OUT:-/tmp/kvtq_out}
WORK=/tmp/kvtq_e2e_work
SCENARIO=${SCENARIO:-l2}
export SGLANG_RELEASE=${SGLANG_RELEASE:-0.5.23}
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
t0=$(date +%s)
if [ "${L3_BACKEND:-file}" = mooncake ]; then
  [ -s .stage/sglang-site.tar.xz ] || { echo "L3_BACKEND=mooncake: no .stage here (the machine was not warm from a call that carried it)"; exit 3; }
  MC=/tmp/kvtq_mooncake
  rm -rf "$MC" && mkdir -p "$MC/lib" "$MC/debs" && tar -C "$MC" -xJf .mooncake/mooncake_cp312.tar.xz || exit 3
  for deb in .mooncake/debs/*.deb; do dpkg -x "$deb" "$MC/debs"; done
  # link only the libraries this image lacks (never shadow its own libssl, libc and the like)
  have=$(ldconfig -p | awk 'NR > 1 {print $1}')
  for so in $(find "$MC/debs" -name 'lib*.so.*' \( -type f -o -type l \)); do
    n=$(basename "$so")
    grep -qxF "$n" <<< "$have" || ln -sf "$so" "$MC/lib/$n"
  done
  export LD_LIBRARY_PATH=$MC/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "mooncake: linked from the debs: $(ls "$MC/lib" | tr '\n' ' ')"
  if ldd "$MC/mooncake/store.so" "$MC/mooncake/mooncake_master" | grep "not found"; then exit 3; fi
  BENCH_ARGS="--l3-backend mooncake --mooncake-dir $MC ${BENCH_ARGS:-}"
fi
if [ "${GPU_CHECKS:-0}" = 1 ]; then
  # gpu_test.sh reads BENCH_ARGS for the transfer benchmark: give it TRANSFER_ARGS (empty: its default)
  OUT=$OUT/gpu BENCH_ARGS="${TRANSFER_ARGS:-}" timeout "${GPU_TIMEOUT:-300}" bash scripts/gpu_test.sh 2>&1 \
    | grep -E "^\[gpu_test\]|passed|failed|FAILED|Error|PASS|MISS|elastic" | tail -60
fi
read -r SGLANG_RELEASE SITE <<< "$(bash scripts/device/run_server.sh release)"
export SGLANG_RELEASE SITE
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "SGLang $SGLANG_RELEASE"
  bash scripts/device/run_server.sh setup; } > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -3 "$OUT/setup.log"
left=$(( ${BUDGET:-430} - ($(date +%s) - t0) ))
PYTHONPATH=$SITE PYTHONUNBUFFERED=1 python3 benchmark/bench_e2e.py --scenario "$SCENARIO" --reps "${REPS:-3}" \
  --budget "$left" --out-dir "$OUT" --work-dir "$WORK" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/run.log" | tail -60
rc=${PIPESTATUS[0]}
for f in "$WORK"/server_*.log; do
  grep -E "kvtuner_hicache|Allocating|Capture cuda graph|error|Error|Traceback" "$f" | head -40 > "$f.head"
done
tar -czf "$OUT/logs.tgz" -C "$WORK" --exclude='l3' . 2>/dev/null
echo "session_bench_e2e: rc=$rc in $(( $(date +%s) - t0 )) s"
exit $rc
