#!/usr/bin/env bash
# Stop everything start_engines.sh started: unmount JuiceFS, SIGTERM each recorded process group
# (SIGKILL after 5 s), remove the pid files. Safe to run twice or when nothing runs.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
L3="$REPO/.cache/l3"
RUN="$L3/run"
[ -d "$RUN" ] || exit 0
if [ -f "$RUN/juicefs.mount" ]; then
  MNT=$(cat "$RUN/juicefs.mount")
  if mountpoint -q "$MNT" 2>/dev/null || ! stat "$MNT" >/dev/null 2>&1; then
    timeout 30 "$L3/juicefs/bin/juicefs" umount "$MNT" >/dev/null 2>&1 \
      || timeout 10 "$L3/juicefs/bin/juicefs" umount --force "$MNT" >/dev/null 2>&1 \
      || fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  fi
  rm -f "$RUN/juicefs.mount"
fi
for f in "$RUN"/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; }
  fi
  rm -f "$f"
done
rm -f "$RUN/env"
echo "l3: engines stopped"
