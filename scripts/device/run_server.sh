#!/bin/bash
# Runs ON THE GPU MACHINE from the repo root, with .stage/ carried (scripts/device/make_bundle.sh).
#
#   bash scripts/device/run_server.sh setup
#       builds the site of the SGLang release to use (release_site.sh: the 0.5.17 base + that release's
#       overlay, hard-linked under /tmp/sgl/<release>), builds our two wheels on this machine
#       (build_kernel_wheel.sh: kernel wheel with CMake/nvcc, package wheel; the kernel wheel is reused
#       while sgl-kernel/ is unchanged) and installs them and .stage/deps/*.whl (crc32c) into it, restores
#       .stage/jit_cache.tgz, writes the model configs (/tmp/qwen2_7b, /tmp/dsv2_lite), and checks that SGLang
#       imports, our plugin's entry point is discovered and our kernels load.
#   bash scripts/device/run_server.sh [--port 30000] [--log server.log] [--wait 300] -- ARGS...
#       setup, then start `python3 -m sglang.launch_server --port P ARGS...` in its own session and
#       wait until /get_model_info answers; prints "READY pid=<pid> after <s> s" and leaves it running
#       (stop it with: kill -- -<pid>). Exit 1 if it died, 2 on timeout.
#   bash scripts/device/run_server.sh --exec [--port P] -- ARGS...
#       no setup, no wait: exec the server in the foreground (benchmark/multiturn_arms.py uses this).
#   bash scripts/device/run_server.sh release      prints the release and site that would be used
#
# Release: SGLANG_RELEASE=0.5.23 (any staged overlay, or 0.5.17); default: what try_releases.sh chose on this
#      machine (/tmp/sgl/chosen_release), else .stage/release (a file with the version), else 0.5.17.
# Env: STAGE (.stage), KVTQ_SGL_ROOT (/tmp/sgl), SITE (override the site dir: no release handling),
#      SLIM_MODELS=1 (default) skips importing SGLang's other model modules at start-up (keeps qwen2 and
#      deepseek_v2); 0 imports all. REBUILD_WHEELS=1 rebuilds the kernel wheel even when unchanged.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/device/release_site.sh
. "$HERE/release_site.sh"
RELEASE=$(resolve_release)
export SGLANG_RELEASE=$RELEASE   # the --exec children of multiturn_arms.py resolve the same release
SITE=${SITE:-$KVTQ_SGL_ROOT/$RELEASE}

install_wheels() {  # build (kernel only when sgl-kernel/ changed) and install our two wheels into $SITE
  local h
  h=$(cd sgl-kernel && find . -path ./build -prune -o -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  h="$h $(python3 -c 'import torch; print(torch.__version__)')"
  if [ "${REBUILD_WHEELS:-0}" = 1 ] || [ "$(cat dist/.kernel_src 2>/dev/null)" != "$h" ] || ! compgen -G "dist/kvtuner_hicache_kernel-*.whl" >/dev/null; then
    bash "$HERE/build_kernel_wheel.sh" --kernel-only ${KVTQ_ARCHS:+--archs "$KVTQ_ARCHS"} > /tmp/kvtq_kernel_build.log 2>&1 \
      || { echo "kernel wheel build failed; tail of /tmp/kvtq_kernel_build.log:"; tail -30 /tmp/kvtq_kernel_build.log; return 1; }
    echo "$h" > dist/.kernel_src
    grep "\[build_kernel_wheel\]" /tmp/kvtq_kernel_build.log
  else
    echo "kernel wheel unchanged: $(ls dist/kvtuner_hicache_kernel-*.whl)"
  fi
  rm -f dist/sglang_kvtuner_hicache-*.whl
  python3 -m pip wheel -q --no-build-isolation --no-deps --no-index -w dist ./python > /tmp/kvtq_pkg_build.log 2>&1 \
    || { echo "package wheel build failed:"; tail -20 /tmp/kvtq_pkg_build.log; return 1; }
  local wheels=(dist/kvtuner_hicache_kernel-*.whl dist/sglang_kvtuner_hicache-*.whl)
  compgen -G "$STAGE/deps/*.whl" >/dev/null && wheels+=("$STAGE"/deps/*.whl)
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-index --upgrade \
    --target "$SITE" "${wheels[@]}" 2>&1 | grep -v -i "warning" || true
  echo "installed into $SITE: $(printf '%s ' "${wheels[@]##*/}")"
}

setup() {
  local t0 s
  t0=$(date +%s)
  if [ "$SITE" = "$KVTQ_SGL_ROOT/$RELEASE" ]; then
    s=$(release_site "$RELEASE") || return 1
    echo "SGLang $RELEASE site: $s"
  fi
  install_wheels || return 1
  if [ -f "$STAGE/jit_cache.tgz" ] && [ ! -f ~/.cache/.kvtq_jit_restored ]; then
    mkdir -p ~/.cache && tar -C ~ -xzf "$STAGE/jit_cache.tgz" && touch ~/.cache/.kvtq_jit_restored && echo "restored JIT caches"
  fi
  mkdir -p /tmp/qwen2_7b /tmp/dsv2_lite
  cp -f "$STAGE/model/config.json" /tmp/qwen2_7b/config.json
  [ -f "$STAGE/model_mla/config.json" ] && cp -f "$STAGE/model_mla/config.json" /tmp/dsv2_lite/config.json
  server_env "$SITE"
  python3 - <<'PY' || return 1
from importlib.metadata import entry_points, version
import importlib
eps = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "kvtuner_hicache"]
assert eps, "kvtuner_hicache entry point not discovered on PYTHONPATH"
import kvtuner_hicache.quant.native as n
ok = n.available()
print("sglang", version("sglang"), "| plugin entry point:", eps[0].value, "| native kernels:",
      n.build_name() if ok else "UNAVAILABLE: " + str(n.unavailable_reason()))
importlib.import_module("sglang.srt.server_args")
assert ok, "our kernel wheel does not load"
PY
  echo "setup done in $(( $(date +%s) - t0 )) s ($(du -sh "$SITE" | cut -f1) in $SITE)"
}

PORT=30000 LOG="" WAIT=300 EXEC=0
if [ "${1:-}" = setup ]; then setup; exit $?; fi
if [ "${1:-}" = release ]; then echo "$RELEASE $SITE"; exit 0; fi
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --log) LOG=$2; shift 2 ;;
    --wait) WAIT=$2; shift 2 ;;
    --exec) EXEC=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [ "$EXEC" = 1 ]; then
  server_env "$SITE"
  exec python3 -m sglang.launch_server --port "$PORT" "$@"
fi

setup || exit 1
LOG=${LOG:-/tmp/sglang_server_$PORT.log}
server_env "$SITE"
setsid python3 -m sglang.launch_server --port "$PORT" "$@" > "$LOG" 2>&1 &
PID=$!
T0=$(date +%s)
while true; do
  if python3 -c "import sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/get_model_info', timeout=3); sys.exit(0)" 2>/dev/null; then
    echo "READY pid=$PID after $(( $(date +%s) - T0 )) s (log $LOG; stop: kill -- -$PID)"; exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then echo "server died; tail of $LOG:"; tail -40 "$LOG"; exit 1; fi
  if [ $(( $(date +%s) - T0 )) -gt "$WAIT" ]; then echo "timeout after $WAIT s; tail of $LOG:"; tail -40 "$LOG"; exit 2; fi
  sleep 2
done
