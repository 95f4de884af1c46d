#!/usr/bin/env bash
# The README's test command: build .venv (scripts/setup.sh, SGLang at the pin in _upstream.py), fetch the
# smoke-test model and the eval data, lint, then:
#   1. every CPU test on the pinned release (0.5.23);
#   2. every CPU test again on the oldest supported release (0.5.17, through scripts/with_sglang.sh);
#   3. the per-release compatibility tests (adapters, plugin, elastic pool, flags) on each release in between
#      (0.5.18 .. 0.5.22);
#   4. a real SGLang server on CPU with the plugin (test/server, pinned release only);
#   5. the L3 tests against real engines (JuiceFS FUSE mount, Mooncake master, LMCache server on 127.0.0.1).
# GPU tests (-m gpu) run on a GPU machine through scripts/gpu_test.sh. Extra arguments go to pytest (step 1).
# RELEASES="0.5.18 0.5.20" narrows step 3; SKIP_OLDEST=1 skips step 2 (local iteration only: CI runs all).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
t0=$(date +%s)
step() { echo "[test] +$(( $(date +%s) - t0 )) s: $*"; }
bash scripts/setup.sh
bash scripts/fetch_models.sh smollm2-135m
bash scripts/fetch_models.sh data
export KVT_REQUIRE_MODELS=1   # the real-model smoke test must run, never skip silently
.venv/bin/ruff check .
PYTEST=(.venv/bin/python -m pytest -m "not gpu and not l3 and not server" -p no:cacheprovider)

pinned=$(sed -nE "s/^SGLANG_VERSION[[:space:]]*=[[:space:]]*\"([^\"]+)\".*/\1/p" python/kvtuner_hicache/_upstream.py)
step "all CPU tests on SGLang $pinned (the pin)"
"${PYTEST[@]}" "$@"

if [ "${SKIP_OLDEST:-0}" != 1 ]; then
  step "all CPU tests on SGLang 0.5.17 (the oldest supported release)"
  bash scripts/with_sglang.sh 0.5.17 "${PYTEST[@]}" -q
fi

for v in ${RELEASES:-0.5.18 0.5.19 0.5.20 0.5.21 0.5.22}; do
  step "compatibility tests on SGLang $v"
  bash scripts/with_sglang.sh "$v" "${PYTEST[@]}" -q test/sglang/test_release_compat.py test/sglang/test_plugin.py \
    test/sglang/test_elastic_pool.py test/sglang/test_args.py test/sglang/test_l3_in_pool_reads.py
done

step "a real SGLang $pinned server on this CPU machine (smollm2-135m, elastic pool; scripts/cpu/serve.sh)"
.venv/bin/python -m pytest -m server -p no:cacheprovider -q test/server

step "L3 tests against real engines"
# installs, starts, tests (missing engines fail, never skip) and always tears down.
bash scripts/l3/test_l3.sh
step "done"
