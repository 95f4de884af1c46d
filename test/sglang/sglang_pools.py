"""Real SGLang pools on CPU with random KV, for the tests in this folder (any supported release).

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
    """Our pool built the way the plugin's seams build it (build_quantized_pool), on the installed release."""
    from kvtuner_hicache.sglang_ext.plugin import build_quantized_pool

    return build_quantized_pool(device_pool, cfg or QuantConfig(), host_to_device_ratio=ratio, host_size=host_size,
                                page_size=device_pool.page_size, layout="page_first")


def bf16_host_pool(device_pool, ratio: float = 2.0, host_size: float = 0):
    """SGLang's own bf16 host pool (unpinned, for CPU) on the installed release: 0.5.23 builds it from the
    device pool's buffer_info, earlier releases from the device pool itself."""
    import inspect

    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    args = (ratio, host_size, device_pool.page_size, "page_first")
    if "buffer_info" in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:
        info = device_pool.get_device_pool_infos()[0].buffer_info
        return MHATokenToKVPoolHost(info, *args, pin_memory=False, device_capacity_tokens=device_pool.size,
                                    start_layer=device_pool.start_layer, end_layer=device_pool.end_layer)
    return MHATokenToKVPoolHost(device_pool, *args, pin_memory=False)

