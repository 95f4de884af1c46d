#!/bin/bash
# Runs ON THE GPU MACHINE from the repo root, with .stage/ carried (scripts/device/make_bundle.sh).
#
#   bash scripts/device/run_server.sh setup
#       unpack .stage/sglang-site.tar.xz to /tmp/site (again only when it changed), install our wheel
#       (.stage/wheels) into it, restore .stage/jit_cache.tgz, write /tmp/qwen2_7b/config.json,
#       check that SGLang imports and that our plugin's entry point is discovered.
#   bash scripts/device/run_server.sh [--port 30000] [--log server.log] [--wait 300] -- ARGS...
#       setup, then start `python3 -m sglang.launch_server --port P ARGS...` in its own session and
#       wait until /get_model_info answers; prints "READY pid=<pid> after <s> s" and leaves it running
#       (stop it with: kill -- -<pid>). Exit 1 if it died, 2 on timeout.
#   bash scripts/device/run_server.sh --exec [--port P] -- ARGS...
#       no setup, no wait: exec the server in the foreground (benchmark/multiturn_arms.py uses this).
#
# Env: STAGE (.stage), SITE (/tmp/site), SLIM_MODELS=1 (default) skips importing SGLang's ~200 other
#      model modules at start-up (SGLANG_DISABLED_MODEL_ARCHS = every module but qwen2); 0 imports all.
set -u
STAGE=${STAGE:-.stage}
SITE=${SITE:-/tmp/site}
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2_7b}

server_env() {
  export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # kernel sources: the installed package's kvtuner_hicache/csrc, else the carried checkout's sgl-kernel/csrc
  if [ -z "${KVTQ_KERNEL_SRC:-}" ] && [ ! -f "$SITE/kvtuner_hicache/csrc/kvtq_kernels.cu" ] && [ -f sgl-kernel/csrc/kvtq_kernels.cu ]; then
    export KVTQ_KERNEL_SRC=$PWD/sgl-kernel/csrc
  fi
  if [ "${SLIM_MODELS:-1}" = 1 ] && [ -z "${SGLANG_DISABLED_MODEL_ARCHS:-}" ]; then
    SGLANG_DISABLED_MODEL_ARCHS=$(cd "$SITE/sglang/srt/models" 2>/dev/null && ls ./*.py | sed 's|^\./||; s|\.py$||' \
      | grep -v -x -E 'qwen2|__init__|registry' | paste -sd, -)
    export SGLANG_DISABLED_MODEL_ARCHS
  fi
}

setup() {
  local t0 stamp
  t0=$(date +%s)
  stamp=$(stat -c '%n %s %Y' "$STAGE"/sglang-site.tar.xz 2>/dev/null)
  [ -n "$stamp" ] || { echo "no $STAGE/sglang-site.tar.xz: run scripts/device/make_bundle.sh and carry .stage"; return 1; }
  if [ "$(cat "$SITE/.unpacked" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    tar -C "$SITE" -xJf "$STAGE/sglang-site.tar.xz" || { echo "unpack failed"; return 1; }
    echo "$stamp" > "$SITE/.unpacked"
  fi
  # our package: code + kernel sources + .dist-info/entry_points.txt (plugin discovery on PYTHONPATH)
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-index --upgrade \
    --target "$SITE" "$STAGE"/wheels/*.whl 2>&1 | grep -v -i "warning" || true
  if [ -f "$STAGE/jit_cache.tgz" ] && [ ! -f ~/.cache/.kvtq_jit_restored ]; then
    mkdir -p ~/.cache && tar -C ~ -xzf "$STAGE/jit_cache.tgz" && touch ~/.cache/.kvtq_jit_restored && echo "restored JIT caches"
  fi
  mkdir -p "$MODEL_DIR"
  cp -f "$STAGE/model/config.json" "$MODEL_DIR/config.json"
  server_env
  python3 - <<'PY' || return 1
from importlib.metadata import entry_points
import importlib
eps = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "kvtuner_hicache"]
assert eps, "kvtuner_hicache entry point not discovered on PYTHONPATH"
import kvtuner_hicache.quant.native as n
print("plugin entry point:", eps[0].value, "| kernel sources:", n.source_dir())
importlib.import_module("sglang.srt.server_args")
PY
  echo "setup done in $(( $(date +%s) - t0 )) s ($(du -sh "$SITE" | cut -f1) in $SITE)"
}

PORT=30000 LOG="" WAIT=300 EXEC=0
if [ "${1:-}" = setup ]; then setup; exit $?; fi
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
  server_env
  exec python3 -m sglang.launch_server --port "$PORT" "$@"
fi

setup || exit 1
LOG=${LOG:-/tmp/sglang_server_$PORT.log}
server_env
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
