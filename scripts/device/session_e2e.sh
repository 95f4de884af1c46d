#!/bin/bash
# One device call for the end-to-end run (ON THE GPU MACHINE from the repo root; carry .stage, and dist/ with a
# kernel wheel built on this kind of machine to skip its rebuild):
#   1. the multi-turn benchmark (benchmark/multiturn_arms.py through run_multiturn.sh) on SGLANG_RELEASE
#      (default 0.5.23); if its first server cannot start there, the same plan on 0.5.17;
#   2. the GPU index/replace/shutdown tests against the kernel wheel installed in that release's site.
# Leaves in $OUT: bench_multiturn.json, results.json, capture_check.json, logs.tgz.
# Env: PLAN, BUDGET (s, 380), SGLANG_RELEASE, EXTRA (more multiturn_arms.py options, e.g. --model-dir /tmp/dsv2_lite),
#      TAG (suffix of the files left in $OUT, so that several runs fit one call), FALLBACK (0.5.17; "" for none).
set -u
FINAL=${OUT:-/tmp/kvtq_out}
TAG=${TAG:+_$TAG}
W=/tmp/kvtq_e2e$TAG
rm -rf "$W" && mkdir -p "$W" "$FINAL"
PLAN=${PLAN:-l2:bf16,l2:kv4,l2:mixed,l3:bf16,l3:kv4}
export SGLANG_RELEASE=${SGLANG_RELEASE:-0.5.23}
t0=$(date +%s)
echo "=== multi-turn on SGLang $SGLANG_RELEASE: $PLAN"
OUT=$W/mt SAVE_JIT=0 timeout $(( ${BUDGET:-380} + 60 )) bash scripts/device/run_multiturn.sh --plan "$PLAN" \
  --budget "${BUDGET:-380}" --prebuild-native 0 ${EXTRA:-} > "$W/mt.log" 2>&1
rc=$?
tail -45 "$W/mt.log"
if [ $rc != 0 ] && [ -n "${FALLBACK-0.5.17}" ] && ! grep -q '"arm"' "$W/mt/bench_multiturn.json" 2>/dev/null; then
  left=$(( 560 - ($(date +%s) - t0) ))
  echo "=== $SGLANG_RELEASE did not serve (rc=$rc); the plan on 0.5.17 with ${left}s left"
  export SGLANG_RELEASE=${FALLBACK-0.5.17}
  OUT=$W/mt SAVE_JIT=0 timeout $(( left > 60 ? left - 30 : 30 )) bash scripts/device/run_multiturn.sh --plan "$PLAN" \
    --budget $(( left > 120 ? left - 90 : 30 )) --prebuild-native 0 ${EXTRA:-} > "$W/mt17.log" 2>&1
  tail -30 "$W/mt17.log"
fi
echo "=== GPU index tests against the installed kernel wheel ($SGLANG_RELEASE site)"
PYTHONPATH=/tmp/sgl/$SGLANG_RELEASE timeout 60 python3 -m pytest -m gpu test/gpu -q -p no:cacheprovider \
  -k "out_of_range or replaced or shutdown or installed" > "$W/gpu_index.log" 2>&1
tail -4 "$W/gpu_index.log"
for f in bench_multiturn results capture_check; do cp "$W/mt/$f.json" "$FINAL/$f$TAG.json" 2>/dev/null; done
# server logs: the start-up lines (release, era, pool capacity, codec) and errors, not the request traffic
(cd "$W" && mkdir -p srv && tar -xzf mt/logs.tgz -C srv 2>/dev/null; find srv -name '*.log' -exec sh -c \
  'grep -E "kvtuner_hicache|Allocating|error|Error|Traceback|era " "$1" | head -60 > "$1.head"' _ {} \;)
tar -czf "$FINAL/logs$TAG.tgz" -C "$W" --exclude='*.tgz' --exclude='srv/*.log' . 2>/dev/null
ls -la "$FINAL"
