#!/bin/bash
# Build everything the GPU machine needs to run a real SGLang 0.5.17 server with our plugin
# (that machine has no network; Python 3.12, torch 2.11.0+cu130 and nvcc 13 are preinstalled).
# Runs on a CPU box with PyPI access, from anywhere; writes <repo>/.stage/ (git-ignored):
#   .stage/sglang-site.tar.xz   SGLang 0.5.17 + the deps the image lacks (scripts/device/sglang_site.sh,
#                               ~39 MiB, ~6 min on 2 cores; reused when present, FORCE_SITE=1 rebuilds)
#   .stage/wheels/sglang_kvtuner_hicache-*.whl
#                               our package, with sgl-kernel/csrc inside as kvtuner_hicache/csrc so that
#                               quant/native.py JIT-builds the kernels from the installed package
#   .stage/presets/*.yaml       the KVTuner per-layer tables the benchmark uses (../shared does not travel)
#   .stage/model/config.json    Qwen2.5-7B shape config for --load-format dummy
#   .stage/jit_cache.tgz        optional, kept if present: SGLang/Triton/our kernel JIT caches from a run
# Then, on the GPU machine (carry .stage):  bash scripts/device/run_multiturn.sh   (see docs/benchmarks.md)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STAGE=${STAGE:-$REPO/.stage}
SHARED=${SHARED:-$REPO/../shared}
PY=${PYTHON:-python3}
WHEEL_PY=${WHEEL_PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
mkdir -p "$STAGE"

# 1. SGLang site archive (the slow part; keep it between builds).
if [ ! -s "$STAGE/sglang-site.tar.xz" ] || [ "${FORCE_SITE:-0}" = 1 ]; then
  STAGE="$STAGE" REPO="$REPO" bash "$REPO/scripts/device/sglang_site.sh"
else
  echo "reusing $STAGE/sglang-site.tar.xz (FORCE_SITE=1 rebuilds it)"
fi

# 2. Our package as a wheel. python/setup.py copies ../sgl-kernel/csrc into kvtuner_hicache/csrc at build
#    time, so build from a scratch copy that keeps the repo's layout (python/ next to sgl-kernel/).
TMP=$(mktemp -d /tmp/kvtq_wheel.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cp -r "$REPO/python" "$TMP/python"
find "$TMP/python" -name __pycache__ -prune -exec rm -rf {} + ; rm -rf "$TMP/python"/*.egg-info "$TMP/python/build"
[ -d "$REPO/sgl-kernel/csrc" ] && mkdir -p "$TMP/sgl-kernel" && cp -r "$REPO/sgl-kernel/csrc" "$TMP/sgl-kernel/csrc"
rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels"
"$WHEEL_PY" -m pip wheel -q --no-deps -w "$STAGE/wheels" "$TMP/python"
unzip -l "$STAGE"/wheels/*.whl | grep -E "entry_points.txt|csrc/" | sed 's/^/  wheel: /'
if [ -d "$REPO/sgl-kernel/csrc" ] && ! (unzip -l "$STAGE"/wheels/*.whl | grep "kvtuner_hicache/csrc/kvtq_kernels.cu" >/dev/null); then
  echo "ERROR: the wheel lacks kvtuner_hicache/csrc (kernel sources): the server would fall back to the reference codec"
  exit 1
fi

# 3. Presets, model config, device-side scripts.
mkdir -p "$STAGE/presets" "$STAGE/model"
for f in "$SHARED"/kvtuner-presets/Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml; do
  [ -f "$f" ] && cp -f "$f" "$STAGE/presets/" && chmod u+w "$STAGE/presets/$(basename "$f")"
done
cp -f "$REPO/scripts/device/qwen2_7b_config.json" "$STAGE/model/config.json"
ls -la "$STAGE" "$STAGE/wheels" "$STAGE/presets"
du -sb "$STAGE" | awk '{printf "stage total: %.1f MiB (keep below ~55 MiB: the repo travels too, 64 MiB a call)\n", $1/1048576}'
