"""Real SGLang 0.5.17 pools on CPU with random KV, for the tests in this folder.

A module of its own (not conftest.py): test/l3 has a conftest too, and `from conftest import`
would pick whichever was imported first when both folders run in one pytest session.
"""

from __future__ import annotations

import torch
from kvtuner_hicache.config import QuantConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool


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
