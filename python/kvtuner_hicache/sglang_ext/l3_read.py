"""L3 reads of copying backends into the quantized host pool: the controller's `page_get_func`.

SGLang reads pages from a copying backend (`file`, our juicefs and lmcache stores, any backend
without the zero-copy `*_v1` interface) through `HiCacheController._generic_page_get`: a freshly
allocated pinned zero page per key, the backend's `batch_get` into them, then one
`set_from_flat_data_page` call per page. `InPoolReader` does the same job for our pools with one
reused buffer and one copy per batch.

Contract (installed by the plugin's `attach_storage_backend` hook, releases 0.5.17 .. 0.5.23):
- Installed only on a controller whose backend is our `KVTQStorageProxy` over a quantized pool and
  whose `page_get_func` is SGLang's generic reader; zero-copy backends and bf16 pools keep
  SGLang's readers. `KVTQ_L3_IN_POOL_READS=0` keeps SGLang's reader for our pools too (to measure
  the difference).
- One call is one controller batch (at most SGLang's STORAGE_BATCH_SIZE pages). The proxy's
  `batch_get` reads into rows of a staging buffer the reader owns and reuses, so the proxy's
  deadline, page checks (key, model, layout, CRC32C) and healing apply exactly as for SGLang's
  reader; the verified prefix then goes into the pool's rows in one `kvtq_write_pages` copy and
  is counted only after its bytes are in place.
- Pool rows are written only by that copy, after the read returned and while the operation is not
  terminated: a read cut off by the deadline, or still running when the scheduler frees the slots
  of a terminated prefetch, lands in staging, never in rows another request may own. After a
  deadline the staging buffer is dropped (the late read may still be writing into it).
- Progress follows the era: a returned page count (0.5.19+), or `operation.increment(tokens)`
  (0.5.17, 0.5.18), as SGLang's own reader of that release reports it.
- Memory: the staging buffer grows to the largest batch read, at most SGLang's STORAGE_BATCH_SIZE
  (128) pages per controller (132 MB for KV4 pages of Qwen2.5-7B), unpinned; SGLang's reader
  allocates a pinned page per key of every batch instead.
- Elastic pools (`proxy.kvtq_planes`): once the floor pages are in place, the plane objects of those
  pages are read (one batch per stream, into staging of their own), checked by the proxy, and handed to
  the pool (`kvtq_admit_planes`) unless the operation was terminated; the pool drops the planes of a
  page that was freed since this call began. A missing or bad plane object leaves that page at its floor.
  By default that read runs *after* this call returned, on the reader's own thread, so the prefetch
  (and with `wait_complete` the request) waits for the floor pages only: reading the planes inside the
  prefetch doubled L3-hit TTFT on the GPU server (docs/elastic.md, run 8). At most
  `MAX_PENDING_PLANE_BATCHES` batches wait for their planes; a batch beyond that keeps its floor
  (`planes_skipped`). `KVTQ_L3_PLANES=sync` reads them inside the prefetch as before. `drain()` waits
  for the pending plane reads, `close()` also stops the thread.
- Called from the controller's prefetch I/O thread; a lock guards the page staging buffer, and the
  plane staging buffers belong to whichever thread reads planes (the caller in sync mode, else the
  reader's one worker).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_IN_POOL_READS = "KVTQ_L3_IN_POOL_READS"  # "0": keep SGLang's generic reader for our pools
MAX_PENDING_PLANE_BATCHES = 4  # plane reads queued behind the floor pages; beyond, a batch stays at its floor


class InPoolReader:
    """`page_get_func(operation, hash_values, host_indices, extra_info=None)` for our pools."""

    def __init__(self, proxy: Any, pool: Any, page_size: int, returns_count: bool):
        self.proxy = proxy
        self.pool = pool
        self.page_size = page_size
        self.returns_count = returns_count
        self.page_bytes = pool.page_layout.page_bytes
        self._staging: torch.Tensor | None = None
        self._plane_staging: dict[int, torch.Tensor] = {}  # stream -> rows of plane objects
        self._lock = threading.Lock()
        self.planes_after_prefetch = not bool(getattr(proxy, "kvtq_planes_sync", False))
        self._plane_worker: ThreadPoolExecutor | None = None
        self._pending = 0  # plane batches queued or running on the worker
        self._idle = threading.Condition()
        self.planes_skipped = 0  # batches whose planes were not read (too many pending)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued plane read has been admitted or dropped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Finish the queued plane reads and stop the worker thread; later batches read planes in the call."""
        with self._lock:  # no batch is between its floor read and queueing its planes
            worker, self._plane_worker = self._plane_worker, None
            self.planes_after_prefetch = False
        if worker is not None:
            worker.shutdown(wait=True)

    def _rows(self, n: int) -> torch.Tensor:
        if self._staging is None or self._staging.shape[0] < n:  # grows to the largest batch seen
            self._staging = torch.empty((n, self.page_bytes), dtype=torch.uint8)
        return self._staging[:n]

    def __call__(self, operation: Any, hash_values: list[str], host_indices: torch.Tensor,
                 extra_info: Any = None) -> int | None:
        with self._lock:
            n = self._read(operation, list(hash_values), host_indices)
        if self.returns_count:
            return n
        if n:
            operation.increment(n * self.page_size)  # False when terminated meanwhile: nothing counted
        return None

    def _read(self, operation: Any, keys: list[str], host_indices: torch.Tensor) -> int:
        if not keys:
            return 0
        ps = self.page_size
        planes = bool(getattr(self.proxy, "kvtq_planes", False))
        if planes:  # before the read: a page freed while it runs must not get these planes
            ids_all = self.pool.kvtq_page_ids(host_indices[: len(keys) * ps])
            generations = self.pool.kvtq_generations(ids_all)
        rows = self._rows(len(keys))
        targets = list(rows.unbind(0))
        errors = self.proxy.kvtq_l3_backend_errors
        pages = self.proxy.batch_get(keys, targets)
        if self.proxy.kvtq_l3_backend_errors != errors:
            self._staging = None  # a read cut off by the deadline may still be writing into it
        if not isinstance(pages, list):
            return 0
        n = next((i for i, p in enumerate(pages) if p is None), len(pages))
        for i in range(n):  # a backend that returns its own tensor instead of filling ours
            if pages[i].data_ptr() != targets[i].data_ptr():
                targets[i].copy_(pages[i].reshape(-1).view(torch.uint8))
        if n == 0 or operation.is_terminated():
            return 0
        ids = self.pool.kvtq_page_ids(host_indices[: n * ps])
        self.pool.kvtq_write_pages(ids, rows[:n])
        if planes:
            self._planes_for(operation, keys[:n], ids, generations[:n])
        return n

    def _planes_for(self, operation: Any, keys: list[str], ids: list[int], generations: list[Any]) -> None:
        if not self.planes_after_prefetch:
            self._read_planes(operation, keys, ids, generations)
            return
        with self._idle:
            if self._pending >= MAX_PENDING_PLANE_BATCHES:
                self.planes_skipped += 1
                return
            self._pending += 1
        if self._plane_worker is None:
            self._plane_worker = ThreadPoolExecutor(1, thread_name_prefix="kvtq-l3-planes")
        self._plane_worker.submit(self._deferred_planes, operation, keys, ids, generations)

    def _deferred_planes(self, operation: Any, keys: list[str], ids: list[int], generations: list[Any]) -> None:
        try:
            self._read_planes(operation, keys, ids, generations)
        except Exception:  # never lose the worker: these pages just stay at their floor
            logger.exception("kvtuner_hicache: reading L3 plane objects failed; those pages stay at their floor")
        finally:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _read_planes(self, operation: Any, keys: list[str], ids: list[int], generations: list[Any]) -> None:
        from kvtuner_hicache.elastic_l3 import HEADER_BYTES

        found: dict[int, list[torch.Tensor | None]] = {}
        for s, nbytes in self.pool.refinement.plane_bytes.items():
            buf = self._plane_staging.get(s)
            if buf is None or buf.shape[0] < len(keys):
                buf = self._plane_staging[s] = torch.empty((len(keys), HEADER_BYTES + nbytes), dtype=torch.uint8)
            errors = self.proxy.kvtq_l3_backend_errors
            got = self.proxy.kvtq_get_planes(keys, s, list(buf[: len(keys)].unbind(0)))
            if self.proxy.kvtq_l3_backend_errors != errors:
                self._plane_staging.pop(s, None)  # a read cut off by the deadline may still be writing into it
            found[s] = [g[HEADER_BYTES:] if g is not None else None for g in got]
        if any(p is not None for ps in found.values() for p in ps) and not operation.is_terminated():
            self.pool.kvtq_admit_planes(ids, generations, found)


def install(controller: Any, returns_count: bool) -> bool:
    """Give `controller` an InPoolReader when its backend is our proxy behind SGLang's generic
    reader; True when installed. Leaves every other controller as SGLang built it."""
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    proxy = getattr(controller, "storage_backend", None)
    if not isinstance(proxy, KVTQStorageProxy) or proxy.layout is None:
        return False
    current = getattr(controller.page_get_func, "__func__", None)
    if current is not getattr(type(controller), "_generic_page_get", None):
        return False  # a zero-copy reader (the proxy's batch_get_v1 checks those pages in place)
    if os.environ.get(ENV_IN_POOL_READS, "1") == "0":
        logger.info("kvtuner_hicache: %s=0: L3 pages are read through SGLang's generic reader", ENV_IN_POOL_READS)
        return False
    if not hasattr(proxy.pool, "kvtq_write_pages"):
        raise RuntimeError(f"kvtuner_hicache: host pool {type(proxy.pool).__name__} has no kvtq_write_pages")
    old = getattr(proxy, "kvtq_reader", None)
    if old is not None:
        old.close()  # a re-attach over the same proxy: the previous reader's queued planes finish first
    controller.page_get_func = proxy.kvtq_reader = InPoolReader(proxy, proxy.pool, controller.page_size,
                                                                returns_count)
    logger.info("kvtuner_hicache: L3 pages of %s are read into the host pool in one copy per batch",
                type(proxy.inner).__name__)
    return True
