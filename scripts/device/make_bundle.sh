#!/bin/bash
# Build everything the GPU machine needs to run real SGLang servers with our plugin, in one command:
#   bash scripts/device/make_bundle.sh                      # RELEASES="0.5.23 0.5.22 0.5.21" (default)
#   RELEASES="0.5.23" bash scripts/device/make_bundle.sh    # fewer overlays (others are moved out of .stage)
# (the GPU machine has no network; Python 3.12, torch 2.11.0+cu130, nvcc 13, CMake, ninja, scikit-build-core).
# Runs on a CPU box with PyPI access, from anywhere; writes <repo>/.stage/ (git-ignored), each part reused when
# present:
#   .stage/sglang-site.tar.xz   SGLang 0.5.17 + the deps the image lacks (scripts/device/sglang_site.sh,
#                               ~39 MiB, ~6 min on 2 cores; FORCE_SITE=1 rebuilds)
#   .stage/sglang-<ver>.tar.xz  per-release overlay: that release's stripped sglang/ (+ what its import chain
#   .stage/sglang-<ver>.top     needs beyond the base), laid over the base on the device (sglang_overlay.sh,
#                               ~7 MiB and ~2 min each; FORCE_OVERLAY=1 rebuilds)
#   .stage/deps/crc32c-*.whl    cp312 wheel of crc32c (our package imports it; the image lacks it)
#   .stage/presets/*.yaml       the KVTuner per-layer tables the benchmark uses (../shared does not travel)
#   .stage/model/config.json    Qwen2.5-7B shape config for --load-format dummy
#   .stage/model_mla/config.json  DeepSeek-V2-Lite shape config (MLA) for --load-format dummy
#   .stage/jit_cache.tgz        optional, kept if present: SGLang/Triton JIT caches from a run (mind the size)
# Our two wheels (kernel, package) are built ON the device (scripts/device/build_kernel_wheel.sh, called by
# run_server.sh setup), not staged. Then, on the GPU machine (carry .stage):
#   bash scripts/device/try_releases.sh --serve      which release serves (docs/device.md)
#   bash scripts/device/run_multiturn.sh ...         the benchmark (docs/benchmarks.md)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STAGE=${STAGE:-$REPO/.stage}
SHARED=${SHARED:-$REPO/../shared}
PY=${PYTHON:-python3}
RELEASES=${RELEASES:-0.5.23 0.5.22 0.5.21}
LIMIT_MIB=${LIMIT_MIB:-64}
mkdir -p "$STAGE"

# 1. SGLang site archive (the slow part; keep it between builds).
if [ ! -s "$STAGE/sglang-site.tar.xz" ] || [ "${FORCE_SITE:-0}" = 1 ]; then
  STAGE="$STAGE" REPO="$REPO" nice -n 10 bash "$REPO/scripts/device/sglang_site.sh"
else
  echo "reusing $STAGE/sglang-site.tar.xz (FORCE_SITE=1 rebuilds it)"
fi

# 2. Per-release overlays; overlays not asked for leave .stage (they would travel) for /tmp/sgl_stage_unused.
read -ra RELS <<< "$RELEASES"
# shellcheck disable=SC2086
STAGE="$STAGE" bash "$REPO/scripts/device/sglang_overlay.sh" "${RELS[@]}"
for f in "$STAGE"/sglang-0.*.tar.xz; do
  [ -e "$f" ] || continue
  v=$(basename "$f" .tar.xz); v=${v#sglang-}
  if ! printf '%s\n' "${RELS[@]}" | grep -qx "$v"; then
    mkdir -p /tmp/sgl_stage_unused && mv -f "$f" "$STAGE/sglang-$v.top" /tmp/sgl_stage_unused/ 2>/dev/null
    echo "moved the $v overlay to /tmp/sgl_stage_unused (not in RELEASES)"
  fi
done
rm -rf "$STAGE/wheels"  # our wheels are built on the device now

# 3. Runtime deps the image lacks, as cp312 wheels (installed into the site by run_server.sh / gpu_test.sh).
#    crc32c 2.9.post0 ships manylinux_2_28 (not 2_17) wheels; the image's glibc is >= 2.34 (sglang's wheel is 2_34).
CRC=$(grep -E '^crc32c==' "$REPO/scripts/requirements-cpu.txt" | sed 's/[[:space:]#].*//')
[ -n "$CRC" ] || { echo "no crc32c pin in scripts/requirements-cpu.txt"; exit 1; }
mkdir -p "$STAGE/deps"
PIP_CONSTRAINT= nice -n 10 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_34_x86_64 -d "$STAGE/deps" "$CRC" 2>&1 | { grep -v "is ignored: it is neither" || true; }
ls "$STAGE"/deps/crc32c-*cp312*.whl >/dev/null || { echo "no cp312 crc32c wheel in $STAGE/deps"; exit 1; }

# 4. Presets, model configs.
mkdir -p "$STAGE/presets" "$STAGE/model" "$STAGE/model_mla"
for f in "$SHARED"/kvtuner-presets/Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml; do
  [ -f "$f" ] && cp -f "$f" "$STAGE/presets/" && chmod u+w "$STAGE/presets/$(basename "$f")"
done
cp -f "$REPO/scripts/device/qwen2_7b_config.json" "$STAGE/model/config.json"
cp -f "$REPO/scripts/device/deepseek_v2_lite_config.json" "$STAGE/model_mla/config.json"
if [ -d "$REPO/.git" ] || [ -f "$REPO/.git" ]; then
  git -C "$REPO" check-ignore -q .stage/sglang-site.tar.xz || echo "WARNING: .stage/ is not git-ignored"
fi

# 5. Sizes: .stage and the working tree travel together, at most 64 MiB a call.
ls -la "$STAGE" "$STAGE/deps"
stage_b=$(du -sb "$STAGE" | cut -f1)
tree_b=$(cd "$REPO" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((stage_b + tree_b))
awk -v s="$stage_b" -v t="$tree_b" -v l="$LIMIT_MIB" 'BEGIN { printf "stage %.1f MiB + repo tree %.1f MiB = %.1f MiB (limit %d MiB a call)\n", s/1048576, t/1048576, (s+t)/1048576, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576 - 1048576)) ]; then
  echo "ERROR: too big to travel: drop an overlay (RELEASES=\"${RELS[*]:0:${#RELS[@]}-1}\") or .stage/jit_cache.tgz"
  exit 1
fi
