"""L3 storage engines for SGLang HiCache: `juicefs` and `lmcache` (docs/storage.md).

Storage adapters, independent of quantization: they store whatever pages the host pool hands
them (bf16, or kvtuner-hicache's quantized pages) and work with or without
--enable-kvtuner-hicache. Loaded by SGLang's plugin framework (entry point `kvtuner_hicache_l3`,
`kvtuner_hicache_l3.plugin:register`), or with no plugin at all through SGLang's public `dynamic`
backend:

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "juicefs", "module_path": "kvtuner_hicache_l3.juicefs",
        "class_name": "JuiceFSStore", "mount_point": "/mnt/jfs"}'

This module imports nothing from sglang; the store classes do, so they are loaded by name.
"""

from __future__ import annotations

# backend name -> (module, class); the classes take (HiCacheStorageConfig, extra_config dict)
BACKENDS: dict[str, tuple[str, str]] = {
    "juicefs": ("kvtuner_hicache_l3.juicefs", "JuiceFSStore"),
    "lmcache": ("kvtuner_hicache_l3.lmcache", "LMCacheStore"),
}

__all__ = ["BACKENDS"]
