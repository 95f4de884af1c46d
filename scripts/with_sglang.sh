#!/usr/bin/env bash
# Run a command against one SGLang release, whatever release .venv/ holds:
#   bash scripts/with_sglang.sh 0.5.20 .venv/bin/python -m pytest test/sglang
# The release is installed once with --no-deps into .cache/sglang/<version>/ (git-ignored) and put
# first on PYTHONPATH, so its `sglang` package and dist-info shadow the venv's. Every supported
# release imports with the venv's other pins (scripts/requirements-cpu.txt), so nothing else changes.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: $0 SGLANG_VERSION COMMAND [ARGS...]" >&2
  exit 2
fi
version=$1
shift
site="$REPO/.cache/sglang/$version"
if [ ! -f "$site/.complete" ]; then
  rm -rf "$site"
  mkdir -p "$site"
  echo "[with_sglang] installing sglang==$version into $site" >&2
  "$REPO/.venv/bin/python" -m pip install -q --no-deps --no-compile --target "$site" "sglang==$version" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  touch "$site/.complete"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
