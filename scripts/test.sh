#!/usr/bin/env bash
# The README's test command: build .venv (scripts/setup.sh), fetch the smoke-test model and the
# eval data, then lint and run every CPU test, then the L3 tests against real engines. GPU tests (-m gpu) run on a GPU machine through
# scripts/gpu_test.sh. Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh
bash scripts/fetch_models.sh smollm2-135m
bash scripts/fetch_models.sh data
export KVT_REQUIRE_MODELS=1   # the real-model smoke test must run, never skip silently
.venv/bin/ruff check .
.venv/bin/python -m pytest -m "not gpu and not l3" -p no:cacheprovider "$@"
# L3 against real engines (JuiceFS FUSE mount, Mooncake master, LMCache server) on 127.0.0.1:
# installs, starts, tests (missing engines fail, never skip) and always tears down.
bash scripts/l3/test_l3.sh
