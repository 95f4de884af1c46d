#!/bin/bash
# Runs ON THE GPU MACHINE from the repo root, .stage/ carried (scripts/device/make_bundle.sh):
#   bash scripts/device/try_releases.sh [--serve]
# Which SGLang release can this machine (torch 2.11, sglang-kernel 0.4.5) run? For every staged release
# (.stage/sglang-<ver>.tar.xz, newest first, then 0.5.17):
#   1. builds a fresh site: the 0.5.17 base + that release's overlay (release_site.sh), all releases at once;
#   2. imports the server chain launch_server -> http_server -> scheduler -> model_runner -> qwen2/deepseek_v2
#      -> unified_radix_cache -> host pools -> triton backend -> sampler (check_release_imports.py), in parallel;
#   3. with --serve (or SERVE=1), newest first among those that imported: starts
#      `python3 -m sglang.launch_server` (Qwen2.5-7B shape, dummy weights, triton attention,
#      --enable-hierarchical-cache --page-size 64), waits for /get_model_info (SERVE_WAIT, 150 s), sends one
#      /generate with input_ids, stops it; stops at the first release that serves (ALL=1: tries them all).
# Prints one line per release, writes $OUT/releases.json (+ import_<ver>.log, serve_<ver>.log) and
# $KVTQ_SGL_ROOT/chosen_release (run_server.sh's default SGLANG_RELEASE on this machine), and echoes
# "USE SGLANG_RELEASE=<ver>". Env: RELEASES ("0.5.23 0.5.22": only these), SERVE, ALL, SERVE_WAIT, MLA=1
# (also serve the DeepSeek-V2-Lite shape, .stage/model_mla), STAGE, KVTQ_SGL_ROOT (/tmp/sgl), OUT (/tmp/kvtq_out),
# IMPORT_TIMEOUT (150 s per release), PORT (31000).
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/device/release_site.sh
. "$HERE/release_site.sh"
OUT=${OUT:-/tmp/kvtq_out}
SERVE=${SERVE:-0}
[ "${1:-}" = --serve ] && SERVE=1
ALL=${ALL:-0}
SERVE_WAIT=${SERVE_WAIT:-150}
PORT=${PORT:-31000}
mkdir -p "$OUT" "$KVTQ_SGL_ROOT"
T0=$(date +%s)
el() { echo "+$(( $(date +%s) - T0 ))s"; }
read -ra RELS <<< "${RELEASES:-$(staged_releases | tr '\n' ' ')}"
echo "[try_releases] $(el) releases: ${RELS[*]}; serve=$SERVE all=$ALL; $(python3 -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")' 2>&1 | tail -1)"

# 1+2: sites and import checks, all releases in parallel (the base is unpacked once, first).
release_site 0.5.17 >/dev/null || { echo "[try_releases] base unpack failed"; exit 1; }
declare -A SITE PID
for v in "${RELS[@]}"; do
  (
    s=$(release_site "$v" fresh 2>"$OUT/import_$v.log") || { echo "RESULT fail site: $(tail -1 "$OUT/import_$v.log")" >> "$OUT/import_$v.log"; exit 1; }
    server_env "$s"
    echo "site $s" >> "$OUT/import_$v.log"
    timeout "${IMPORT_TIMEOUT:-150}" python3 "$HERE/check_release_imports.py" --json "$OUT/import_$v.json" >> "$OUT/import_$v.log" 2>&1
    rc=$?; [ $rc = 124 ] && echo "RESULT fail timeout after ${IMPORT_TIMEOUT:-150} s" >> "$OUT/import_$v.log"
    exit $rc
  ) &
  PID[$v]=$!
  SITE[$v]=$KVTQ_SGL_ROOT/$v
done
declare -A IMP IMPERR SRV SRVERR SRVS
for v in "${RELS[@]}"; do
  wait "${PID[$v]}"; rc=$?
  line=$(grep '^RESULT' "$OUT/import_$v.log" | tail -1)
  if [ $rc = 0 ]; then IMP[$v]=ok; IMPERR[$v]=""; else IMP[$v]=fail; IMPERR[$v]=${line#RESULT fail }; IMPERR[$v]=${IMPERR[$v]% (sglang *}; [ -n "${IMPERR[$v]}" ] || IMPERR[$v]="rc=$rc: $(tail -1 "$OUT/import_$v.log")"; fi
  SRV[$v]=skipped; SRVERR[$v]=""; SRVS[$v]=""
done
echo "[try_releases] $(el) import checks done"

# 3: serve, newest first.
first_error() {  # the exception line of the last traceback in a log, else its last line
  local l
  l=$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Exit)(:|$)|^(RuntimeError|AssertionError|ValueError|TypeError|KeyError|AttributeError)' "$1" | tail -1)
  [ -n "$l" ] || l=$(grep -v '^\s*$' "$1" | tail -1)
  echo "${l:0:300}"
}
serve_one() {  # ver model_dir log -> 0 if it served one /generate
  local v=$1 model=$2 log=$3 pid t0 ok=1
  (
    server_env "${SITE[$v]}"
    exec setsid python3 -m sglang.launch_server --model-path "$model" --load-format dummy --skip-tokenizer-init \
      --attention-backend triton --sampling-backend pytorch --enable-hierarchical-cache --hicache-ratio 2 \
      --page-size 64 --mem-fraction-static 0.6 --max-total-tokens 81920 --disable-cuda-graph \
      --skip-server-warmup --mm-feature-transport cpu --port "$PORT" ${SERVE_ARGS:-}
  ) > "$log" 2>&1 &
  pid=$!
  t0=$(date +%s)
  while :; do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/get_model_info', timeout=3)" 2>/dev/null; then
      echo "[serve] up after $(( $(date +%s) - t0 )) s" >> "$log"
      python3 - "$PORT" >> "$log" 2>&1 <<'PYEOF'
import json, sys, urllib.request
body = {"input_ids": [(7 * i + 11) % 30000 + 100 for i in range(200)],
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/generate", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
r = json.loads(urllib.request.urlopen(req, timeout=120).read())
r = r[0] if isinstance(r, list) else r
out = r.get("output_ids")
assert out, f"no output_ids in the /generate answer: {str(r)[:300]}"
print(f"[serve] /generate ok: {len(out)} tokens, meta_info {json.dumps(r.get('meta_info', {}))[:300]}")
PYEOF
      ok=$?; break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "[serve] server exited" >> "$log"; break; fi
    if [ $(( $(date +%s) - t0 )) -gt "$SERVE_WAIT" ]; then echo "[serve] TimeoutError: no /get_model_info after $SERVE_WAIT s" >> "$log"; break; fi
    sleep 2
  done
  kill -- -"$pid" 2>/dev/null; sleep 2; kill -9 -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return $ok
}
CHOSEN=""
if [ "$SERVE" = 1 ]; then
  mkdir -p /tmp/qwen2_7b /tmp/dsv2_lite
  cp -f "$STAGE/model/config.json" /tmp/qwen2_7b/config.json
  [ -f "$STAGE/model_mla/config.json" ] && cp -f "$STAGE/model_mla/config.json" /tmp/dsv2_lite/config.json
  for v in "${RELS[@]}"; do
    [ "${IMP[$v]}" = ok ] || continue
    t=$(date +%s)
    if serve_one "$v" /tmp/qwen2_7b "$OUT/serve_$v.log"; then SRV[$v]=ok; else SRV[$v]=fail; SRVERR[$v]=$(first_error "$OUT/serve_$v.log"); fi
    if [ "${SRV[$v]}" = ok ] && [ "${MLA:-0}" = 1 ] && [ -f /tmp/dsv2_lite/config.json ]; then
      serve_one "$v" /tmp/dsv2_lite "$OUT/serve_${v}_mla.log" || { SRV[$v]=fail; SRVERR[$v]="mla: $(first_error "$OUT/serve_${v}_mla.log")"; }
    fi
    SRVS[$v]=$(( $(date +%s) - t ))
    echo "[try_releases] $(el) $v serves: ${SRV[$v]} ${SRVERR[$v]}"
    if [ "${SRV[$v]}" = ok ]; then [ -n "$CHOSEN" ] || CHOSEN=$v; [ "$ALL" = 1 ] || break; fi
  done
else
  for v in "${RELS[@]}"; do [ "${IMP[$v]}" = ok ] && { CHOSEN=$v; break; }; done
fi

echo "[try_releases] $(el) summary (imports | serves):"
for v in "${RELS[@]}"; do
  printf '  %-7s imports %-4s %s| serves %-7s %s\n' "$v" "${IMP[$v]}" "${IMPERR[$v]:+(${IMPERR[$v]:0:200}) }" "${SRV[$v]}" "${SRVERR[$v]:0:200}"
done
{
  for v in "${RELS[@]}"; do printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "${IMP[$v]}" "${IMPERR[$v]}" "${SRV[$v]}" "${SRVERR[$v]}" "${SRVS[$v]}"; done
} | python3 -c '
import json, sys
rows = [dict(zip(("release", "imports", "import_error", "serves", "serve_error", "serve_s"), l.rstrip("\n").split("\t")))
        for l in sys.stdin if l.strip()]
json.dump({"chosen": sys.argv[1] or None, "serve_tested": sys.argv[2] == "1", "releases": rows},
          open(sys.argv[3], "w"), indent=1)
' "$CHOSEN" "$SERVE" "$OUT/releases.json"
if [ -n "$CHOSEN" ]; then
  echo "$CHOSEN" > "$KVTQ_SGL_ROOT/chosen_release"
  echo "USE SGLANG_RELEASE=$CHOSEN ($( [ "$SERVE" = 1 ] && echo "newest that served" || echo "newest that imported; not serve-tested"); $OUT/releases.json)"
  exit 0
fi
echo "USE SGLANG_RELEASE=0.5.17 (no release $( [ "$SERVE" = 1 ] && echo served || echo imported); see $OUT/releases.json)"
exit 1
