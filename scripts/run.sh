#!/usr/bin/env bash
# The README's main job.
#  - On a machine with an NVIDIA GPU: start an SGLang server whose HiCache L2/L3 hold quantized pages
#    (the seed's launch command; MODEL, PORT and EXTRA_ARGS override the defaults).
#  - On a CPU-only machine: run the accuracy harness on a real model through our page format
#    (what HiCache's quantized L2/L3 does to a request), MODEL defaults to qwen2.5-coder-0.5b.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # SGLang (with its CUDA torch) and our two wheels installed in this Python, as the README's install says
  PY=${PYTHON:-python3}
  if ! "$PY" -c "import sglang, kvtuner_hicache, kvtuner_hicache_kernel" 2>/dev/null; then
    echo "run.sh: $PY lacks sglang or our wheels. Install them first (README, 'Install on a GPU machine'):" >&2
    echo "  pip install sglang==$(sed -nE 's/^SGLANG_VERSION = \"(.*)\"/\1/p' python/kvtuner_hicache/_upstream.py)" >&2
    echo "  bash scripts/device/build_kernel_wheel.sh && pip install --no-deps dist/*.whl" >&2
    exit 1
  fi
  exec "$PY" -m sglang.launch_server \
    --model-path "${MODEL:-Qwen/Qwen2.5-7B-Instruct}" --port "${PORT:-30000}" --page-size 64 \
    --enable-hierarchical-cache --hicache-size "${HICACHE_GB:-32}" \
    --enable-kvtuner-hicache --kvtuner-hicache-nbits-key 4 --kvtuner-hicache-nbits-value 4 \
    ${EXTRA_ARGS:-}
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
MODEL=${MODEL:-qwen2.5-coder-0.5b}
bash scripts/fetch_models.sh "$MODEL"
bash scripts/fetch_models.sh data
# The default sweep, plus this model's calibrated per-layer tables when docs/results ships them;
# GSM8K answer NLL and MMLU accuracy (with bootstrap intervals) on the main configs and the tables.
# The printed table ends with a legend of its columns and config names (docs/accuracy.md has more).
TABLES=$(ls docs/results/calibrated_"$MODEL"_3.0bits.yaml docs/results/calibrated_"$MODEL"_3.5bits.yaml 2>/dev/null \
  | sed 's/^/table:/' | paste -sd, - || true)
exec .venv/bin/python -m kvtuner_hicache.eval --model "$MODEL" --sweep default --add-configs "$TABLES" \
  --windows "${WINDOWS:-4}" --gsm8k "${GSM8K:-8}" --mmlu "${MMLU:-24}" --task-configs main --batch 4 \
  --json "${OUT:-.cache/accuracy_$MODEL.json}" "$@"
