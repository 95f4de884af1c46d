#!/usr/bin/env bash
# A real SGLang server on this CPU-only machine (tests and demos, not production serving): the .venv of
# scripts/setup.sh, torch_native attention, no CUDA graphs, and the rope shim in scripts/cpu/shims (SGLang's
# CPU rope falls back to vllm's op without SGLang's CPU kernel package). Extra arguments go to
# launch_server after ours, e.g.
#   bash scripts/cpu/serve.sh --model-path .cache/models/smollm2-135m/hf --port 31000 \
#       --enable-hierarchical-cache --enable-kvtuner-hicache --kvtuner-hicache-elastic
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO/scripts/cpu/shims${PYTHONPATH:+:$PYTHONPATH}"
exec "$REPO/.venv/bin/python" -m sglang.launch_server --device cpu --attention-backend torch_native \
    --cuda-graph-backend-decode=disabled --cuda-graph-backend-prefill=disabled --page-size 64 \
    --skip-server-warmup "$@"
