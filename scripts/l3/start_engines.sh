#!/usr/bin/env bash
# Start the L3 engines on loopback for test/l3 and wait until each answers (bounded waits):
#   JuiceFS  sqlite3 metadata + local-dir object store, FUSE-mounted at .cache/l3/run/jfs/mnt
#   Mooncake mooncake_master on 127.0.0.1:$L3_MOONCAKE_PORT (clients use P2PHANDSHAKE: no metadata server)
#   LMCache  legacy server `lmcache_server 127.0.0.1 $L3_LMCACHE_PORT cpu`
# PIDs, the mount and logs go to .cache/l3/run/; `.cache/l3/run/env` holds what the tests read.
# stop_engines.sh undoes all of it. Usage: start_engines.sh [juicefs] [mooncake] [lmcache] (default: all)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
L3="$REPO/.cache/l3"
RUN="$L3/run"
PY="${PYTHON:-$REPO/.venv/bin/python}"
MC_PORT=${L3_MOONCAKE_PORT:-50051}
MC_METRICS=${L3_MOONCAKE_METRICS_PORT:-9003}
LMC_PORT=${L3_LMCACHE_PORT:-65432}
JFS_METRICS=${L3_JUICEFS_METRICS_PORT:-9567}
engines=("$@"); [ ${#engines[@]} -gt 0 ] || engines=(juicefs mooncake lmcache)
mkdir -p "$RUN"
# keep the entries of engines not (re)started now, so one engine can be restarted alone
if [ -f "$RUN/env" ]; then
  pat=$(printf '%s\n' "${engines[@]}" | tr a-z A-Z | sed 's/^/^L3_/;s/$/_/' | paste -sd'|')
  grep -Ev "$pat" "$RUN/env" > "$RUN/env.partial" || true
else
  : > "$RUN/env.partial"
fi

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll every 0.2 s
  local limit=$1 what=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@"; do
    if [ "$(date +%s)" -ge "$end" ]; then echo "l3: $what not ready after ${limit}s" >&2; return 1; fi
    sleep 0.2
  done
}
stop_pid() {  # stop_pid NAME: stop the process a previous start recorded (restart of one engine)
  local f="$RUN/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
start_bg() {  # start_bg NAME CMD...: own session so stop_engines can signal the whole group
  local name=$1; shift
  stop_pid "$name"
  setsid "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

for e in "${engines[@]}"; do
  t0=$(date +%s%N)
  case $e in
  juicefs)
    J="$L3/juicefs/bin/juicefs"
    D="$RUN/jfs"; MNT="$D/mnt"
    if grep -qs " $MNT " /proc/mounts; then  # live or dead (killed client) mount from an earlier run
      timeout 30 "$J" umount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    rm -rf "$D"; mkdir -p "$D/bucket" "$MNT" "$D/cache"
    timeout 60 "$J" format "sqlite3://$D/meta.db" kvtq-l3 --storage file --bucket "$D/bucket/" \
      --trash-days 0 >"$RUN/juicefs-format.log" 2>&1
    timeout 60 "$J" mount "sqlite3://$D/meta.db" "$MNT" -d --log "$RUN/juicefs.log" --cache-dir "$D/cache" \
      --cache-size 1024 --no-usage-report --no-syslog --metrics "127.0.0.1:$JFS_METRICS" >"$RUN/juicefs-mount.log" 2>&1
    wait_for 30 "JuiceFS mount" mountpoint -q "$MNT"
    echo "$MNT" > "$RUN/juicefs.mount"
    echo "L3_JUICEFS_MOUNT=$MNT" >> "$RUN/env.partial"
    ;;
  mooncake)
    chmod +x "$L3/mooncake/mooncake/mooncake_master"  # the real binary (bin/ holds a python wrapper)
    start_bg mooncake_master "$L3/mooncake/mooncake/mooncake_master" --rpc_address=127.0.0.1 --rpc_port="$MC_PORT" \
      --metrics_host=127.0.0.1 --metrics_port="$MC_METRICS" --default_kv_lease_ttl=100
    wait_for 30 "mooncake_master" port_open "$MC_PORT"
    kill -0 "$(cat "$RUN/mooncake_master.pid")" 2>/dev/null || { echo "l3: mooncake_master exited (port taken?)" >&2; exit 1; }
    echo "L3_MOONCAKE_MASTER=127.0.0.1:$MC_PORT" >> "$RUN/env.partial"
    echo "L3_MOONCAKE_PYTHONPATH=$L3/mooncake" >> "$RUN/env.partial"
    ;;
  lmcache)
    LMCACHE_DISABLE_BANNER=1 PYTHONPATH="$L3/lmcache" start_bg lmcache_server "$PY" -m lmcache.v1.server 127.0.0.1 "$LMC_PORT" cpu
    wait_for 90 "LMCache server" port_open "$LMC_PORT"
    kill -0 "$(cat "$RUN/lmcache_server.pid")" 2>/dev/null || { echo "l3: LMCache server exited (port taken?)" >&2; exit 1; }
    echo "L3_LMCACHE_ENDPOINT=127.0.0.1:$LMC_PORT" >> "$RUN/env.partial"
    ;;
  *) echo "l3: unknown engine $e" >&2; exit 2 ;;
  esac
  echo "l3: $e ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
done
mv "$RUN/env.partial" "$RUN/env"
