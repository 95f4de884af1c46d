#!/usr/bin/env bash
# The L3 part of CI: install the real engines, start them on 127.0.0.1, run `pytest -m l3 test/l3`
# under a time limit, and always stop every engine and unmount JuiceFS (trap), whatever happened.
# Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
t0=$(date +%s)
bash scripts/l3/install_engines.sh
trap 'bash scripts/l3/stop_engines.sh' EXIT
bash scripts/l3/stop_engines.sh >/dev/null  # leftovers of an interrupted run
bash scripts/l3/start_engines.sh
rm -f .cache/l3/measure.jsonl
rc=0
L3_REQUIRE=1 timeout -k 10 420 .venv/bin/python -m pytest -m l3 test/l3 -p no:cacheprovider "$@" || rc=$?
echo "l3: finished in $(( $(date +%s) - t0 )) s (rc=$rc)"
exit $rc
