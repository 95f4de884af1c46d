"""One thin adapter per SGLang ABI era: what differs between the supported releases, and nothing else.

The core (config, page format, quantizers, kernels) never changes per release. What does change
(docs/upgrading.md, ../shared/design/upstream-drift.md) is:

- where the HiCache host pool is built (the *pool seam*): HiRadixCache.__init__ up to 0.5.18,
  `hybrid_pool_assembler.build_kv_host_pool` inside `UnifiedRadixCache.init_hicache` from 0.5.19;
- where start-up validation can run (the *resolution* step): `ServerArgs.__post_init__` up to 0.5.18,
  `ServerArgs.resolve_once` in 0.5.19, `register_resolution_hook` from 0.5.20 (ServerArgs is a
  msgspec struct there, which ignores a patched `__post_init__`);
- how `HostKVCache.__init__` is called: positionally with the device pool up to 0.5.21,
  keyword-only with precomputed geometry from 0.5.22;
- how the controller's L3 page reader reports progress: `operation.increment` up to 0.5.18, a
  returned page count from 0.5.19.

`active_era()` picks the adapter once, from the installed SGLang version. Releases outside the table
are unsupported: `unsupported_release_error()` names the installed version and the supported range.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

from kvtuner_hicache._upstream import SGLANG_VERSION as DEFAULT_RELEASE  # the pin setup.sh and the docs use

SUPPORTED_RANGE = ("0.5.17", "0.5.23")


def installed_sglang_version() -> str | None:
    """The installed SGLang release (dist metadata first, the package's own version otherwise)."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        from sglang.version import __version__

        return str(__version__)
    except Exception:  # no sglang at all
        return None


def release_key(version: str) -> str:
    """`0.5.23.post1` and `0.5.23rc0` are the 0.5.23 release; the era table is keyed on x.y.z."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    return ".".join(m.groups()) if m else version.strip()


@dataclass(frozen=True)
class Era:
    """What one ABI era of SGLang looks like to this plugin."""

    name: str
    releases: tuple[str, ...]
    pool_seam: str  # "hiradix" (HiRadixCache builds the pool) or "assembler" (build_kv_host_pool)
    resolution: str  # "post_init", "resolve_once" or "resolution_hook"
    keyword_only_host_base: bool  # HostKVCache.__init__(*, dtype, size_per_token, ...) from 0.5.22
    has_storage_format_tag: bool  # HostKVCache.storage_format_tag names our format in L3 keys
    # HiCacheController.page_get_func returns the pages it loaded (0.5.19+); before, it counts them
    # itself through operation.increment(tokens) and returns nothing
    page_get_returns_count: bool = True

    def resolution_for(self, release: str) -> str:
        return self.resolution

    def init_host_base(self, pool: Any, device_pool: Any, *, size_per_token: int, host_size_gb: float,
                       page_size: int, layout: str, pin_memory: bool, device: str, allocator_type: str,
                       pool_label: str) -> None:
        """Run HostKVCache.__init__ for `pool` (which has already computed its geometry)."""
        from sglang.srt.mem_cache.pool_host.base import HostKVCache

        if not self.keyword_only_host_base:
            # The base calls pool.get_size_per_token() and pool.init_kv_buffer() itself.
            HostKVCache.__init__(pool, device_pool, 0.0, host_size_gb, page_size, layout, pin_memory, device,
                                 allocator_type, pool_label=pool_label)
            return
        device_tokens = getattr(device_pool, "host_capacity_tokens", None) or device_pool.size
        HostKVCache.__init__(
            pool, dtype=pool.dtype, device_capacity_tokens=device_tokens, size_per_token=size_per_token,
            start_layer=device_pool.start_layer, end_layer=device_pool.end_layer, host_to_device_ratio=0.0,
            host_size=host_size_gb, page_size=page_size, layout=layout, pin_memory=pin_memory, device=device,
            allocator_type=allocator_type, pool_label=pool_label,
        )

    def memory_settings(self) -> dict[str, Any]:
        """HiCache sizing as SGLang resolved it for this process (assembler-seam eras only)."""
        from sglang.srt.mem_cache.pool_host.common import get_allocator_type
        from sglang.srt.runtime_context import get_memory

        mem = get_memory()
        return {
            "host_to_device_ratio": mem.hicache_ratio,
            "host_size": mem.hicache_size,
            "layout": mem.hicache_mem_layout,
            "allocator_type": get_allocator_type(),
        }


class _Era0519(Era):
    """0.5.19 resolves in `resolve_once`; 0.5.20 and 0.5.21 share its ABI but have resolution hooks."""

    def resolution_for(self, release: str) -> str:
        return "resolve_once" if release == "0.5.19" else "resolution_hook"


ERAS: tuple[Era, ...] = (
    Era("A", ("0.5.17",), "hiradix", "post_init", keyword_only_host_base=False, has_storage_format_tag=False,
        page_get_returns_count=False),
    Era("B", ("0.5.18",), "hiradix", "post_init", keyword_only_host_base=False, has_storage_format_tag=False,
        page_get_returns_count=False),
    _Era0519("C", ("0.5.19", "0.5.20", "0.5.21"), "assembler", "resolution_hook",
             keyword_only_host_base=False, has_storage_format_tag=False),
    Era("D", ("0.5.22",), "assembler", "resolution_hook", keyword_only_host_base=True, has_storage_format_tag=True),
    Era("E", ("0.5.23",), "assembler", "resolution_hook", keyword_only_host_base=True, has_storage_format_tag=True),
)
SUPPORTED_RELEASES: tuple[str, ...] = tuple(r for era in ERAS for r in era.releases)


def era_for(version: str | None) -> Era | None:
    if not version:
        return None
    key = release_key(version)
    return next((era for era in ERAS if key in era.releases), None)


@functools.cache
def active_release() -> str | None:
    """x.y.z of the installed SGLang (None without SGLang)."""
    version = installed_sglang_version()
    return release_key(version) if version else None


@functools.cache
def active_era() -> Era | None:
    """The adapter of the installed SGLang, None when the release is not supported."""
    return era_for(installed_sglang_version())


def unsupported_release_error() -> str | None:
    """The one-line start-up error for an unsupported SGLang, None when the installed one is supported."""
    version = installed_sglang_version()
    if era_for(version) is not None:
        return None
    lo, hi = SUPPORTED_RANGE
    return (f"--enable-kvtuner-hicache: SGLang {version or '(not installed)'} is not supported by this "
            f"kvtuner-hicache release (supported: {lo} to {hi}); install sglang=={DEFAULT_RELEASE}")
