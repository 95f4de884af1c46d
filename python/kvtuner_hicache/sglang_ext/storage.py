"""L3 key namespace and page checks: a proxy around any SGLang HiCache storage backend.

Every key gets the suffix `-{tag}` (quantized pools: the page layout's `kvtq1-<fingerprint>`;
plain pools: the device dtype, e.g. `bf16`), so two formats never read each other's pages.
Quantized pages get their header CRC filled before they leave for L3 and are checked
(`PageLayout.check_page`) when they come back; a bad page is a counted miss for itself and every
page after it (prefix semantics). No exception escapes into SGLang's storage threads, which only
catch `queue.Empty` and would die silently.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo, PoolName

from kvtuner_hicache.page_format import HEADER_CRC_OFFSET, PageLayout

logger = logging.getLogger(__name__)

_DTYPE_TAGS = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float8_e4m3fn: "fp8e4m3",
    torch.float8_e5m2: "fp8e5m2",
}
_DRAFT_SUFFIX = f".{PoolName.DRAFT.value}"


def _unwrap_host_pool(pool: Any) -> Any:
    """The KV host pool behind a unified-path HostPoolGroup (its anchor), else the pool itself."""
    entry = getattr(pool, "anchor_entry", None)
    return getattr(entry, "host_pool", None) or pool


def namespace_tag(mem_pool_host: Any) -> str:
    """`kvtq1-<fingerprint>` for our pools, a device-dtype tag (`bf16`, `fp8e4m3`, ...) otherwise."""
    pool = _unwrap_host_pool(mem_pool_host)
    layout = getattr(pool, "page_layout", None)
    if getattr(pool, "kvtq_quantized", False) and layout is not None:
        return layout.tag
    dtype = getattr(getattr(pool, "device_pool", None), "dtype", None) or getattr(pool, "dtype", None)
    return _DTYPE_TAGS.get(dtype, str(dtype).replace("torch.", "").replace("/", "_"))


def _page_bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def fill_crc(layout: PageLayout, page: torch.Tensor) -> None:
    """Write the payload CRC into the page header in place (page: uint8 CPU view of one page)."""
    crc = layout.payload_crc(_page_bytes_view(page))
    page[HEADER_CRC_OFFSET : HEADER_CRC_OFFSET + 4] = torch.frombuffer(bytearray(struct.pack("<I", crc)), dtype=torch.uint8)


class KVTQStorageProxy(HiCacheStorage):
    """Namespacing and verifying wrapper; delegates everything else to `inner`."""

    def __init__(self, inner: HiCacheStorage, mem_pool_host: Any):
        self.inner = inner
        self.pool = _unwrap_host_pool(mem_pool_host)
        self.tag = namespace_tag(mem_pool_host)
        self.layout: PageLayout | None = (
            self.pool.page_layout if getattr(self.pool, "kvtq_quantized", False) else None
        )
        self.kvtq_l3_rejected_pages = 0
        self._lock = threading.Lock()
        logger.info("kvtuner_hicache: L3 keys of backend %s live under namespace '-%s'", type(inner).__name__, self.tag)

    # ---- keys ------------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return f"{key}-{self.tag}"

    def _ks(self, keys: list[str]) -> list[str]:
        return [self._k(k) for k in keys]

    def _info(self, extra_info: HiCacheStorageExtraInfo | None) -> HiCacheStorageExtraInfo | None:
        if extra_info is None or not extra_info.prefix_keys:
            return extra_info
        return dataclasses.replace(extra_info, prefix_keys=self._ks(list(extra_info.prefix_keys)))

    def _transfers(self, transfers: list[Any] | None) -> list[Any] | None:
        if transfers is None:
            return None
        return [dataclasses.replace(t, keys=self._ks(list(t.keys))) if t.keys else t for t in transfers]

    def _checked(self, key: str) -> bool:
        """Only target-pool pages of a quantized pool are ours to check (draft pages are bf16)."""
        return self.layout is not None and not key.endswith(_DRAFT_SUFFIX)

    def _reject(self, key: str, reason: str, dropped: int) -> None:
        with self._lock:
            self.kvtq_l3_rejected_pages += 1
        logger.warning("kvtuner_hicache: L3 page %s rejected (%s); treating it and %d later page(s) as a miss",
                       key, reason, dropped - 1)

    # ---- registration ------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host
        self.inner.register_mem_pool_host(mem_pool_host)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        self.inner.register_mem_host_pool_v2(host_pool, host_pool_name)

    # ---- generic (copying) interface ---------------------------------------------------------------

    def get(self, key, target_location=None, target_sizes=None):
        try:
            page = self.inner.get(self._k(key), target_location, target_sizes)
        except Exception as e:  # e.g. HiCacheFile raises IOError on a short (truncated) file
            if self._checked(key):
                self._reject(key, f"read failed: {e}", 1)
            return None
        if page is not None and self._checked(key):
            reason = self.layout.check_page(_page_bytes_view(page))
            if reason:
                self._reject(key, reason, 1)
                return None
        return page

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        nkeys = self._ks(keys)
        try:
            pages = self.inner.batch_get(nkeys, target_locations, target_sizes)
        except Exception:
            pages = self._get_one_by_one(nkeys, target_locations, target_sizes)
        if not isinstance(pages, list):
            return pages
        pages = list(pages)
        for i, page in enumerate(pages):
            if page is None:
                return pages[:i] + [None] * (len(pages) - i)
            if self._checked(keys[i]):
                reason = self.layout.check_page(_page_bytes_view(page))
                if reason:
                    self._reject(keys[i], reason, len(pages) - i)
                    return pages[:i] + [None] * (len(pages) - i)
        return pages

    def _get_one_by_one(self, nkeys, target_locations, target_sizes) -> list[Any]:
        """A backend's batch read failed: keep the readable prefix, count the page that broke it."""
        out: list[Any] = [None] * len(nkeys)
        for i, key in enumerate(nkeys):
            loc = target_locations[i] if target_locations is not None else None
            size = target_sizes[i] if target_sizes is not None else None
            try:
                out[i] = self.inner.get(key, loc, size)
            except Exception as e:
                self._reject(key, f"read failed: {e}", len(nkeys) - i)
                break
            if out[i] is None:
                break
        return out

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        try:
            if value is not None and self._checked(key):
                fill_crc(self.layout, value)
            return self.inner.set(self._k(key), value, target_location, target_sizes)
        except Exception:
            logger.exception("kvtuner_hicache: L3 set of %s failed", key)
            return False

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        try:
            if values is not None:
                for key, value in zip(keys, values, strict=False):
                    if self._checked(key):
                        fill_crc(self.layout, value)
            return self.inner.batch_set(self._ks(keys), values, target_locations, target_sizes)
        except Exception:
            logger.exception("kvtuner_hicache: L3 batch_set failed")
            return False

    def exists(self, key) -> bool:
        try:
            return self.inner.exists(self._k(key))
        except Exception:
            logger.exception("kvtuner_hicache: L3 exists failed")
            return False

    def batch_exists(self, keys, extra_info=None) -> int:
        try:
            return self.inner.batch_exists(self._ks(keys), self._info(extra_info))
        except Exception:
            logger.exception("kvtuner_hicache: L3 batch_exists failed")
            return 0

    # ---- zero-copy interface (host pages addressed through get_page_buffer_meta) -----------------

    def batch_set_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        try:
            if self.layout is not None:
                for pid in self.pool.kvtq_page_ids(host_indices):
                    fill_crc(self.layout, self.pool.pages[pid])
            return self.inner.batch_set_v1(self._ks(keys), host_indices, self._info(extra_info))
        except Exception:
            logger.exception("kvtuner_hicache: L3 batch_set_v1 failed")
            return [False] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        try:
            results = list(self.inner.batch_get_v1(self._ks(keys), host_indices, self._info(extra_info)))
        except Exception as e:
            if keys:
                self._reject(keys[0], f"read failed: {e}", len(keys))
            return [False] * len(keys)
        if self.layout is None:
            return results
        pids = self.pool.kvtq_page_ids(host_indices)
        for i, ok in enumerate(results):
            if not ok:
                return results[:i] + [False] * (len(results) - i)
            reason = self.layout.check_page(_page_bytes_view(self.pool.pages[pids[i]]))
            if reason:
                self._reject(keys[i], reason, len(results) - i)
                return results[:i] + [False] * (len(results) - i)
        return results

    # ---- v2 (hybrid / draft pools: not our pages, only namespaced) --------------------------------

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        return self.inner.batch_exists_v2(self._ks(keys), self._transfers(pool_transfers), self._info(extra_info))

    def batch_get_v2(self, transfers, extra_info=None):
        return self.inner.batch_get_v2(self._transfers(transfers), self._info(extra_info))

    def batch_set_v2(self, transfers, extra_info=None):
        return self.inner.batch_set_v2(self._transfers(transfers), self._info(extra_info))

    # ---- the rest -------------------------------------------------------------------------------------

    def clear(self):
        return self.inner.clear()

    def get_stats(self):
        stats = self.inner.get_stats()
        if isinstance(stats, dict):
            stats["kvtq_l3_rejected_pages"] = self.kvtq_l3_rejected_pages
        elif stats is not None:
            try:
                stats.kvtq_l3_rejected_pages = self.kvtq_l3_rejected_pages
            except AttributeError:
                pass
        return stats

    def close(self):
        close = getattr(self.inner, "close", None)
        return close() if close is not None else None

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the proxy does not define (backend-specific extras)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)
