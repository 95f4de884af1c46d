"""Fixtures for the SGLang integration tests: real SGLang classes on CPU, our hooks applied.

These tests run on whichever supported SGLang release is installed (CI: the whole folder on 0.5.23
and 0.5.17, test_release_compat.py on every release in between). A missing or broken SGLang is a
failure here, never a skip: that is the upgrade breakage this plugin must catch.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message="Only CUDA")

import sglang  # noqa: E402, F401  (an import error fails the run)
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


@pytest.fixture(scope="session")
def era():
    """The era adapter of the installed release (the suite refuses to run on an unsupported one)."""
    from kvtuner_hicache.sglang_ext.eras import active_era, installed_sglang_version

    adapter = active_era()
    assert adapter is not None, f"SGLang {installed_sglang_version()} is not a supported release"
    return adapter


@pytest.fixture(autouse=True)
def _clean_env():
    """The plugin writes os.environ directly (that is its transport): restore it per test."""
    saved = {k: os.environ.pop(k, None) for k in _CLEAN_ENV}
    from kvtuner_hicache.sglang_ext import plugin

    plugin._state.cli = False  # a parsed command line switches errors to exit(2); tests parse many
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
