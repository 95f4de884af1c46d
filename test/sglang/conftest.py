"""Fixtures for the SGLang integration tests: real SGLang classes on CPU, our hooks applied."""

from __future__ import annotations

import json
import os
import warnings

import pytest

pytest.importorskip("sglang")
warnings.filterwarnings("ignore", message="Only CUDA")

import torch  # noqa: E402
from kvtuner_hicache.config import QuantConfig  # noqa: E402
from kvtuner_hicache.sglang_ext.args import ENV_VAR  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402

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
    """A config-only Qwen2 checkpoint: enough for ServerArgs.__post_init__ to resolve on CPU."""
    d = tmp_path_factory.mktemp("tinyqwen")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    }))
    return str(d)


def mha_device_pool(layers: int, heads: int, head_dim: int, page_size: int, tokens: int = 1024,
                    v_head_dim: int | None = None, dtype=torch.bfloat16, seed: int = 0) -> MHATokenToKVPool:
    pool = MHATokenToKVPool(size=tokens, page_size=page_size, dtype=dtype, head_num=heads, head_dim=head_dim,
                            layer_num=layers, device="cpu", enable_memory_saver=False, v_head_dim=v_head_dim)
    if pool.store_dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(seed)
        for b in pool.k_buffer + pool.v_buffer:
            b.copy_(torch.randn(b.shape, generator=g) * 2 + 0.5)
    return pool


def mla_device_pool(layers: int, page_size: int, tokens: int = 1024, seed: int = 0) -> MLATokenToKVPool:
    pool = MLATokenToKVPool(size=tokens, page_size=page_size, dtype=torch.bfloat16, kv_lora_rank=512,
                            qk_rope_head_dim=64, layer_num=layers, device="cpu", enable_memory_saver=False)
    g = torch.Generator().manual_seed(seed)
    for b in pool.kv_buffer:
        b.copy_(torch.randn(b.shape, generator=g))
    return pool


def quant_host_pool(device_pool, cfg: QuantConfig | None = None, ratio: float = 2.0, host_size: float = 0):
    from kvtuner_hicache.sglang_ext.host_pool import QuantizedMHATokenToKVPoolHost, QuantizedMLATokenToKVPoolHost

    cls = QuantizedMLATokenToKVPoolHost if isinstance(device_pool, MLATokenToKVPool) else QuantizedMHATokenToKVPoolHost
    return cls(device_pool, ratio, host_size, device_pool.page_size, "page_first", quant_config=cfg or QuantConfig())


def bf16_host_pool(device_pool, ratio: float = 2.0, host_size: float = 0):
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    return MHATokenToKVPoolHost(device_pool, ratio, host_size, device_pool.page_size, "page_first", pin_memory=False)
