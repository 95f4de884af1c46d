"""Our own L3 storage engines for SGLang HiCache: `juicefs` and `lmcache` (see docs/storage.md).

SGLang only knows its built-in backend names; `registration.HOOKS` adds ours (CLI choices, the
`--hicache-storage-backend-config` alias, and construction through StorageBackendFactory). The
classes import sglang, so they are loaded lazily by name.
"""

from __future__ import annotations

# backend name -> (module, class); the classes take (HiCacheStorageConfig, extra_config dict)
BACKENDS: dict[str, tuple[str, str]] = {
    "juicefs": ("kvtuner_hicache.sglang_ext.backends.juicefs", "JuiceFSStore"),
    "lmcache": ("kvtuner_hicache.sglang_ext.backends.lmcache", "LMCacheStore"),
}

__all__ = ["BACKENDS"]
