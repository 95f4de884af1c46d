"""Fixtures for the SGLang integration tests: real SGLang classes on CPU, our hooks applied."""

from __future__ import annotations

import json
import os
import warnings

import pytest

pytest.importorskip("sglang")
warnings.filterwarnings("ignore", message="Only CUDA")

from kvtuner_hicache.sglang_ext.args import ENV_VAR  # noqa: E402

_CLEAN_ENV = (ENV_VAR, "SGLANG_USE_HND_KVCACHE", "SGLANG_ENABLE_UNIFIED_RADIX_TREE")


@pytest.fixture(scope="session")
def kvtq_hooks():
    """Our hooks applied once for the session, as SGLang's load_plugins() would."""
    from kvtuner_hicache.sglang_ext.plugin import missing_hooks, register
    from sglang.srt.plugins.hook_registry import HookRegistry

    register()
    HookRegistry.apply_hooks()
    assert missing_hooks() == []
    return True


@pytest.fixture(autouse=True)
def _clean_env():
    """The plugin writes os.environ directly (that is its transport): restore it per test."""
    saved = {k: os.environ.pop(k, None) for k in _CLEAN_ENV}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A config-only Qwen2 checkpoint (28 layers like Qwen2.5-7B, head_dim 64): enough for ServerArgs to resolve on CPU."""
    d = tmp_path_factory.mktemp("tinyqwen")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 28, "vocab_size": 1000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    }))
    return str(d)
