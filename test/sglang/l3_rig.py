"""Real SGLang pools and SGLang's own HiCacheFile behind our storage proxy, for the L3 tests.

Builds the proxy directly (not through the plugin's hooks), so these tests pin the proxy's own
contract on every supported release. Pools are built with whichever constructor form the
installed host pool has (keyword-only since the era adapters).
"""

from __future__ import annotations

import inspect
import os
import pathlib

import torch
from kvtuner_hicache.config import QuantConfig
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
from sglang_pools import mha_device_pool, mla_device_pool  # noqa: F401  (re-exported for the tests)

PS = 64


def storage_config(model: str = "org/model", mla: bool = False, tp_rank: int = 0, tp_size: int = 1,
                   extra: dict | None = None) -> HiCacheStorageConfig:
    """A HiCacheStorageConfig for any release (fields added after 0.5.17 keep their defaults)."""
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name=model, extra_config=extra)


def quant_pool(device_pool, cfg: QuantConfig | None = None, ratio: float = 2.0):
    from kvtuner_hicache.sglang_ext import host_pool as hp
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    mla = isinstance(device_pool, MLATokenToKVPool)
    cls = hp.QuantizedMLATokenToKVPoolHost if mla else hp.QuantizedMHATokenToKVPoolHost
    cfg = cfg or QuantConfig()
    params = inspect.signature(hp._QuantizedHostPool.__init__).parameters if hasattr(hp, "_QuantizedHostPool") else {}
    if "host_to_device_ratio" in params and params["host_to_device_ratio"].kind is inspect.Parameter.KEYWORD_ONLY:
        return cls(device_pool, quant_config=cfg, host_to_device_ratio=ratio, host_size=0,
                   page_size=device_pool.page_size, layout="page_first", pin_memory=False)
    return cls(device_pool, ratio, 0, device_pool.page_size, "page_first", pin_memory=False, quant_config=cfg)


def filled_pool(cfg: QuantConfig | None = None, n_pages: int = 3, dev=None, seed: int = 0):
    """A quantized host pool with `n_pages` pages backed up from random device KV; (pool, host indices)."""
    dev = dev or mha_device_pool(2, 4, 128, PS, tokens=(n_pages + 2) * PS, seed=seed)
    pool = quant_pool(dev, cfg)
    h = pool.alloc(n_pages * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(PS, (n_pages + 1) * PS), "kernel")
    return pool, h


def file_proxy(pool, directory: pathlib.Path, model: str = "org/model", mla: bool = False, backend=None):
    """Our proxy around SGLang's real HiCacheFile writing into `directory`."""
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(directory)
    cfg = storage_config(model, mla)
    inner = backend if backend is not None else HiCacheFile(cfg)
    proxy = KVTQStorageProxy(inner, pool, cfg)
    proxy.register_mem_pool_host(pool)
    return proxy


def pages_of(pool, h, n: int) -> list[torch.Tensor]:
    return [pool.get_data_page(h[i * PS]) for i in range(n)]


def put(proxy, pool, h, keys) -> bool:
    return proxy.batch_set(list(keys), pages_of(pool, h, len(keys)))


def get(proxy, pool, keys) -> list:
    return proxy.batch_get(list(keys), [pool.get_dummy_flat_data_page() for _ in keys])


def page_file(directory: pathlib.Path, proxy, key: str) -> pathlib.Path:
    """Where HiCacheFile keeps `key` (namespaced by the proxy, suffixed with model and rank)."""
    return directory / f"{proxy._namespaced(key)}{proxy.inner.config_suffix}.bin"
