"""The seed's two L3 commands, as written, start a real `launch_server` up to model loading on CPU.

Real engines (JuiceFS mount, LMCache server) from scripts/l3/start_engines.sh; our plugin is found
through its installed entry point. The model itself needs a GPU: on CPU the scheduler stops while
building the model, after SGLang logged "Load weight begin", which is what the issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.l3

MARKER = "Load weight begin"


def _launch(tmp_path, *backend_args: str) -> str:
    model = tmp_path / "qwen2-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "rope_theta": 10000.0}))
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
            "--load-format", "dummy", "--skip-tokenizer-init", "--page-size", "64", "--port", "31997",
            "--enable-hierarchical-cache", "--enable-kvtuner-hicache",
            "--kvtuner-hicache-nbits-key", "4", "--kvtuner-hicache-nbits-value", "4", *backend_args]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:  # a server that got further than expected: still inspect it
        return (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")


def _check(log: str) -> None:
    assert "kvtuner_hicache enabled: K4cV4t-a-g64" in log, log[-3000:]
    assert MARKER in log, log[-3000:]
    assert "sglang serve: error" not in log and "BackendConfigError" not in log


def test_seed_juicefs_command_reaches_model_loading(tmp_path, jfs_mount):
    _check(_launch(tmp_path, "--hicache-storage-backend", "juicefs",
                   "--hicache-storage-backend-config", json.dumps({"mount_point": jfs_mount})))


def test_seed_lmcache_command_reaches_model_loading(tmp_path, lmcache_endpoint):
    port = lmcache_endpoint.rsplit(":", 1)[1]
    _check(_launch(tmp_path, "--hicache-storage-backend", "lmcache",
                   "--hicache-storage-backend-config", json.dumps({"endpoint": f"localhost:{port}"})))
