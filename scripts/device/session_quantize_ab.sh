#!/usr/bin/env bash
# One device call: the working tree's kernel against a reference kernel (.ref, from scripts/device/stage_ref_kernel.sh),
# ON THE GPU MACHINE from the repo root, carry [".stage", ".ref"]:
#   1. scripts/gpu_test.sh with SKIP_BENCH=1: build and install this tree's wheels, every GPU test (bit-exact codes);
#   2. benchmark/bench_quantize.py for this tree's kernel, then for the reference kernel (built into its own site),
#      then this tree's again, so drift between the two shows (one process tree, one GPU);
#   3. NCU=1: Nsight Compute on this tree's encode kernels (KV4, 256 pages), details in $OUT/ncu_encode_details.txt.
# Env: PAGES (64,256), CONFIGS (KV8,KV4,K4V2,K3V2), REPS (15), ROUNDTRIP (1: bench_quantize --roundtrip), KVTQ_ARCHS
# (90-real), NCU (1), TRANSFER (0; 1: step 1 also runs gpu_test.sh's bench_transfer, its target lines printed, then the
# reference's bench_transfer with the reference kernel and python/ in the same call, both with BENCH_ARGS (gpu_test.sh's
# default): bench_transfer_ref.json).
# Results in $OUT: bench_quantize_{tree,ref,tree2}.json, pytest_gpu.log, build logs (and bench_transfer{,_ref}.json/.md
# with TRANSFER=1).
set -uo pipefail
OUT=${OUT:-/tmp/kvtq_out}
mkdir -p "$OUT"
export KVTQ_ARCHS=${KVTQ_ARCHS:-90-real}
args=(--pages "${PAGES:-64,256}" --configs "${CONFIGS:-KV8,KV4,K4V2,K3V2}" --reps "${REPS:-15}")
[ "${ROUNDTRIP:-1}" = 1 ] && args+=(--roundtrip)  # each config also on its own decoded rows (the division path's cost)
[ -f .ref/REF ] || { echo "session_quantize_ab: no .ref here (bash scripts/device/stage_ref_kernel.sh REF, then carry .ref)"; exit 2; }
OUT=$OUT SKIP_BENCH=$(( 1 - ${TRANSFER:-0} )) bash scripts/gpu_test.sh -q 2>&1 | grep -v "^|" \
  | grep -E "PASS|MISS|backup KV4|passed|failed|error|Error|\[gpu_test\]" | tail -70
test_rc=${PIPESTATUS[0]}
PYTHONPATH=/tmp/kvtq-site python3 benchmark/bench_quantize.py "${args[@]}" --json "$OUT/bench_quantize_tree.json" 2>&1 | tail -12
(cd .ref && DIST=/tmp/kvtq-ref-dist bash scripts/device/build_kernel_wheel.sh --kernel-only --target /tmp/kvtq-ref-site \
   ${KVTQ_ARCHS:+--archs "$KVTQ_ARCHS"} > "$OUT/build_ref.log" 2>&1) || { echo "reference build failed"; tail -20 "$OUT/build_ref.log"; }
compgen -G ".stage/deps/*.whl" >/dev/null && python3 -m pip install -q --no-deps --no-index --target /tmp/kvtq-ref-site .stage/deps/*.whl
echo "reference kernel: $(cat .ref/REF)"
PYTHONPATH=/tmp/kvtq-ref-site python3 .ref/benchmark/bench_quantize.py "${args[@]}" --json "$OUT/bench_quantize_ref.json" 2>&1 | tail -12
PYTHONPATH=/tmp/kvtq-site python3 benchmark/bench_quantize.py "${args[@]}" --json "$OUT/bench_quantize_tree2.json" 2>&1 | tail -12
if [ "${TRANSFER:-0}" = 1 ]; then
  # the reference's own python/ (its codec) with its kernel, SGLang's bf16 kernels beside it, as gpu_test.sh runs them
  # shellcheck source=scripts/device/release_site.sh
  . scripts/device/release_site.sh
  SGL_SITE=$(release_site "${SGLANG_RELEASE:-$(staged_releases | head -1)}")
  # shellcheck disable=SC2086
  (cd .ref && KVTQ_PRESETS_DIR="$PWD/../.stage/presets" PYTHONPATH="/tmp/kvtq-ref-site:$PWD/python:$SGL_SITE" \
     python3 benchmark/bench_transfer.py ${BENCH_ARGS:---quick --pages 1,16,64,256 --no-sweep} --json "$OUT/bench_transfer_ref.json" \
     --md "$OUT/bench_transfer_ref.md" > "$OUT/bench_transfer_ref.log" 2>&1) || echo "reference bench_transfer failed"
  grep -E "backup KV4|PASS|MISS" "$OUT/bench_transfer_ref.log" | sed 's/^/[ref] /' | head -30
fi
if [ "${NCU:-1}" = 1 ]; then
  PYTHONPATH=/tmp/kvtq-site timeout 120 ncu --clock-control none --kernel-name regex:encode_kernel --launch-skip 2 --launch-count 2 \
    --set full -o "$OUT/ncu_encode" python3 benchmark/bench_quantize.py --ncu --configs KV4 --pages 256 > "$OUT/ncu_run.log" 2>&1
  ncu --import "$OUT/ncu_encode.ncu-rep" --page details 2>&1 | grep -v "^    ---" > "$OUT/ncu_encode_details.txt"
  rm -f "$OUT/ncu_encode.ncu-rep"  # large; the details text is what comes back
  grep -E "encode_kernel|Duration|DRAM Throughput|L2 Cache Throughput|Issue Slots Busy|Achieved Occupancy" "$OUT/ncu_encode_details.txt"
fi
echo "session_quantize_ab: GPU tests rc=$test_rc"
exit "$test_rc"
