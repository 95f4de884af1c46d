"""Shared body of our L3 backends: byte-object stores on SGLang's generic (copying) storage path.

SGLang's storage threads (`backup_thread`, `prefetch_thread`, `prefetch_io_aux_thread`) only catch
`queue.Empty`: an exception raised by a backend kills the thread and stalls HiCache silently, and
a call that blocks stalls it too. So every public method here returns a miss / False instead of
raising, and every engine operation runs under a deadline (`op_timeout_s`). After a failure the
store is "down" for `retry_after_s`: calls return misses at once instead of piling up on a dead
engine, then the next call probes it again.

Keys: SGLang's page hash (with kvtuner-hicache's proxy in front: namespaced, e.g. `<sha256>-kvtq2-<fp>`)
plus `_{model}[_{tp_rank}_{tp_size}][_{pp_size}_{pp_rank}]`, the same suffix as SGLang's file
backend, so ranks and models sharing one store never collide.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

logger = logging.getLogger(__name__)


class StoreDown(Exception):
    """The engine did not answer (in time); the caller turns this into a miss."""


class BackendConfigError(ValueError):
    """A start-up problem the user must fix (missing mount, unreachable endpoint, bad option)."""


@dataclass
class L3Counters:
    """What an engine did for this process; `get_stats()` hands a copy to tests and logs."""

    pages_written: int = 0
    bytes_written: int = 0
    write_s: float = 0.0
    pages_skipped_existing: int = 0
    write_failures: int = 0
    pages_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    misses: int = 0  # not in the store
    corrupt: int = 0  # present but with the wrong size: counted miss, never loaded
    outages: int = 0  # engine errors / timeouts (each one turns its call into misses)
    evicted_pages: int = 0
    evicted_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def key_suffix(cfg: HiCacheStorageConfig | None) -> str:
    """Rank/model suffix, identical to SGLang's HiCacheFile (MLA pages are shared by all TP ranks)."""
    if cfg is None:
        return ""
    model = "-".join(cfg.model_name.split("/")) if cfg.model_name else ""
    s = f"_{model}"
    if not cfg.is_mla_model:
        s += f"_{cfg.tp_rank}_{cfg.tp_size}"
    if cfg.pp_size > 1:
        s += f"_{cfg.pp_size}_{cfg.pp_rank}"
    if getattr(cfg, "attn_cp_size", 1) > 1:
        s += f"_cp{cfg.attn_cp_rank}_{cfg.attn_cp_size}"
    return s


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor without a copy when it is contiguous."""
    return memoryview(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy())


DYNAMIC_FIELDS = ("backend_name", "module_path", "class_name", "interface_v1")


def options(storage_config: HiCacheStorageConfig | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The store's options: `extra` if given, else the config's extra_config (SGLang's dynamic path)."""
    merged = dict(getattr(storage_config, "extra_config", None) or {})
    merged.update(extra or {})
    for k in DYNAMIC_FIELDS:
        merged.pop(k, None)
    return merged


def as_float(extra: dict[str, Any], name: str, default: float) -> float:
    v = extra.get(name, default)
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise BackendConfigError(f"extra config '{name}' must be a number, got {v!r}") from e


class ByteObjectStore(HiCacheStorage):
    """Generic-path HiCacheStorage over an engine that stores whole byte objects by key.

    Subclasses implement `_put(keys, blobs)`, `_get(keys, targets)`, `_exists(keys)` and
    `_remove(keys)` (each may raise; they run under the deadline) and `engine`/`describe()` for
    messages. Built as `Store(storage_config, extra)`: `extra` is the JSON object of
    --hicache-storage-backend-config; when SGLang builds the store through its `dynamic` backend,
    `extra` is empty and the options come from `storage_config.extra_config`.
    """

    engine = "l3"

    def __init__(self, storage_config: HiCacheStorageConfig | None, extra: dict[str, Any]):
        self.storage_config = storage_config
        self.suffix = key_suffix(storage_config)
        self.op_timeout_s = as_float(extra, "op_timeout_s", 10.0)
        self.retry_after_s = as_float(extra, "retry_after_s", 5.0)
        self.min_throughput_mb_s = max(as_float(extra, "min_throughput_mb_s", 20.0), 0.1)
        self.counters = L3Counters()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._closed = False
        # per-batch lists only when SGLang drains them (--enable-storage-metrics): no unbounded growth
        self._metrics = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._read_pgs: list[int] = []
        self._read_bw: list[float] = []
        self._write_pgs: list[int] = []
        self._write_bw: list[float] = []
        # Engine calls run on these workers so a stuck engine (hung FUSE daemon, silent socket)
        # costs the storage thread at most op_timeout_s; 2 workers: one may be stuck meanwhile.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kvtq-{self.engine}")

    # ---- to implement ---------------------------------------------------------------------------

    def _put(self, keys: list[str], blobs: list[memoryview]) -> list[bool]:
        raise NotImplementedError

    def _get(self, keys: list[str], targets: list[memoryview]) -> list[int]:
        """Per key: bytes read into target (== len(target) on success), -1 missing, -2 wrong size."""
        raise NotImplementedError

    def _exists(self, keys: list[str]) -> list[bool]:
        raise NotImplementedError

    def _remove(self, keys: list[str]) -> list[bool]:
        """Per key: True when the object is gone, or will be overwritten by the next write."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.engine

    # ---- deadline + circuit breaker -------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, nbytes: int = 0) -> Any:
        if self._closed:
            raise StoreDown("closed")
        now = time.monotonic()
        if now < self._down_until:
            raise StoreDown("recently failed")
        # big batches get more time: op_timeout_s plus the transfer at a pessimistic throughput
        timeout = self.op_timeout_s + nbytes / (self.min_throughput_mb_s * 1e6)
        fut = self._pool.submit(fn, *args)
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            self._mark_down(what, f"no answer within {timeout:.1f} s")
        except Exception as e:  # engine errors: ENOTCONN on a dead mount, reset sockets, ...
            self._mark_down(what, f"{type(e).__name__}: {e}")
        raise StoreDown(what)

    def _mark_down(self, what: str, why: str) -> None:
        with self._lock:
            self.counters.outages += 1
            self._down_until = time.monotonic() + self.retry_after_s
        logger.warning("kvtuner_hicache %s: %s failed (%s); L3 reads are misses and writes are skipped "
                       "for %.0f s", self.describe(), what, why, self.retry_after_s)
        self._on_failure()

    def _on_failure(self) -> None:
        """Drop cached connections etc. (called after an engine failure)."""

    def _full(self, key: str) -> str:
        return key + self.suffix

    # ---- HiCacheStorage: generic path -------------------------------------------------------------

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        if not keys or values is None or len(values) != len(keys):
            return False
        blobs = [tensor_bytes(v) for v in values]
        t0 = time.perf_counter()
        try:
            ok = self._call("write", self._put, [self._full(k) for k in keys], blobs,
                            nbytes=sum(len(b) for b in blobs))
        except StoreDown:
            with self._lock:
                self.counters.write_failures += len(keys)
            return False
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.write_s += dt
            self.counters.write_failures += ok.count(False)
            if self._metrics:
                self._write_pgs.append(len(keys))
                self._write_bw.append(sum(len(b) for b in blobs) / max(dt, 1e-9) / 1e9)
        return all(ok)

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        return self.batch_set([key], [value])

    def batch_get(self, keys, target_locations=None, target_sizes=None) -> list[torch.Tensor | None]:
        if not keys:
            return []
        if target_locations is None or len(target_locations) != len(keys):
            return [None] * len(keys)
        views = [tensor_bytes(t) for t in target_locations]
        t0 = time.perf_counter()
        try:
            got = self._call("read", self._get, [self._full(k) for k in keys], views,
                             nbytes=sum(len(v) for v in views))
        except StoreDown:
            with self._lock:
                self.counters.misses += len(keys)
            return [None] * len(keys)
        dt = time.perf_counter() - t0
        out: list[torch.Tensor | None] = []
        with self._lock:
            self.counters.read_s += dt
            if self._metrics:
                self._read_pgs.append(len(keys))
                self._read_bw.append(sum(len(v) for v in views) / max(dt, 1e-9) / 1e9)
            for t, v, n in zip(target_locations, views, got, strict=True):
                if n == len(v):
                    self.counters.pages_read += 1
                    self.counters.bytes_read += n
                    out.append(t)
                else:
                    if n == -2:
                        self.counters.corrupt += 1
                    self.counters.misses += 1
                    out.append(None)
        if -2 in got:
            bad = [k for k, n in zip(keys, got, strict=True) if n == -2]
            removed = self.invalidate_keys(bad)  # heal: the next backup writes them again
            logger.warning("kvtuner_hicache %s: %d stored page(s) had the wrong size (truncated or another "
                           "format); counted as misses, %d removed", self.describe(), len(bad), sum(removed))
        return out

    def get(self, key, target_location=None, target_sizes=None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_exists(self, keys, extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        if not keys:
            return 0
        try:
            found = self._call("lookup", self._exists, [self._full(k) for k in keys])
        except StoreDown:
            return 0
        return found.index(False) if False in found else len(found)

    def exists(self, key) -> bool:
        return self.batch_exists([key]) == 1

    def invalidate_keys(self, keys: list[str]) -> list[bool]:
        """Drop bad objects (kvtuner-hicache's proxy calls this for a page it rejected on read).

        Per key: True when the object is gone for this process (lookups miss it and the next
        backup writes it again), False when the engine is down.
        """
        if not keys:
            return []
        try:
            return list(self._call("remove", self._remove, [self._full(k) for k in keys]))
        except StoreDown:
            return [False] * len(keys)

    # ---- misc ----------------------------------------------------------------------------------------

    def l3_counters(self) -> dict[str, Any]:
        """Cumulative counters (reachable through the namespacing proxy's attribute fallback)."""
        with self._lock:
            return self.counters.as_dict()

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics (pages and GB/s per batch since the last call), as its collector wants."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        m = StorageMetrics()
        with self._lock:
            m.prefetch_pgs, self._read_pgs = self._read_pgs, []
            m.prefetch_bandwidth, self._read_bw = self._read_bw, []
            m.backup_pgs, self._write_pgs = self._write_pgs, []
            m.backup_bandwidth, self._write_bw = self._write_bw, []
        return m

    def _count_written(self, nbytes: int) -> None:
        with self._lock:
            self.counters.pages_written += 1
            self.counters.bytes_written += nbytes

    def _count_skipped(self) -> None:
        with self._lock:
            self.counters.pages_skipped_existing += 1

    def close(self) -> None:
        self._closed = True
        # never wait on a stuck engine call: shutdown must stay prompt when the engine is dead
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._close_engine()

    def _close_engine(self) -> None:
        pass
