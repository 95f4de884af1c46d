"""Per-stage timing of the HiCache L3 path, for benchmarks: `KVTQ_L3_PROFILE=<file prefix>`.

Off unless the variable is set. Then every HiCache controller that attaches a storage backend
(SGLang's bf16 pools and ours alike, so both arms are timed by the same code) gets these stages
wrapped, on the instance only (the class and every other controller stay untouched):

  hit_query     controller._storage_hit_query    per prefetch: the backend's exists lookups
  transfer      controller._page_transfer         per prefetch operation: all its batches
  page_get      controller.page_get_func          per batch: read, check and copy into the pool
  backend_read  backend.batch_get / batch_get_v1  the storage engine alone
  verify        proxy._first_bad                  our key / model / layout / CRC32C check
  alloc_page    pool.get_dummy_flat_data_page     SGLang's generic reader: one pinned page per key
  copy_in       pool.set_from_flat_data_page, pool.kvtq_write_pages
  backup_write  controller.page_set_func          per backup batch, sealing included
  backend_write backend.batch_set / batch_set_v1
  load_layer    pool.load_to_device_per_layer     host-side time only (the copy is asynchronous)

Each process keeps cumulative totals per stage (calls, seconds, pages) and writes them to
`<prefix>.<pid>.json` at most every 0.2 s, from a daemon thread; a benchmark reads all files of
a prefix before and after a phase and subtracts (`read_totals`, `subtract`).
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

ENV_PROFILE = "KVTQ_L3_PROFILE"
_FLUSH_S = 0.2


class _Recorder:
    def __init__(self, prefix: str):
        self.path = f"{prefix}.{os.getpid()}.json"
        self.totals: dict[str, list[float]] = {}  # stage -> [calls, seconds, pages]
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        threading.Thread(target=self._writer, name="kvtq-l3-profile", daemon=True).start()

    def add(self, stage: str, seconds: float, pages: int) -> None:
        with self._lock:
            t = self.totals.setdefault(stage, [0, 0.0, 0])
            t[0] += 1
            t[1] += seconds
            t[2] += pages
        self._dirty.set()

    def _writer(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._lock:
                snap = {k: {"calls": v[0], "s": v[1], "pages": v[2]} for k, v in self.totals.items()}
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, self.path)
            time.sleep(_FLUSH_S)


_recorder: _Recorder | None = None
_recorder_lock = threading.Lock()


def _rec(prefix: str) -> _Recorder:
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = _Recorder(prefix)
        return _recorder


def _wrap(obj: Any, name: str, stage: str, rec: _Recorder, pages: Callable[[tuple], int] | None = None) -> None:
    fn = getattr(obj, name, None)
    if fn is None or getattr(fn, "_kvtq_profiled", False):
        return

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            rec.add(stage, time.perf_counter() - t0, pages(a) if pages else 0)

    timed._kvtq_profiled = True  # type: ignore[attr-defined]
    setattr(obj, name, timed)


def install(controller: Any) -> bool:
    """Wrap this controller's L3 stages when KVTQ_L3_PROFILE is set; True when it did."""
    prefix = os.environ.get(ENV_PROFILE)
    backend = getattr(controller, "storage_backend", None)
    if not prefix or backend is None:
        return False
    rec = _rec(prefix)
    n0 = lambda a: len(a[0])  # noqa: E731 - (keys, ...)
    n1 = lambda a: len(a[1])  # noqa: E731 - (operation / ids, keys or pages, ...)
    _wrap(controller, "_storage_hit_query", "hit_query", rec)
    _wrap(controller, "_page_transfer", "transfer", rec, lambda a: len(a[0].hash_value or []))
    _wrap(controller, "page_get_func", "page_get", rec, n1)
    _wrap(controller, "page_set_func", "backup_write", rec, n0)
    inner = getattr(backend, "inner", None)
    if inner is not None:  # our proxy
        _wrap(backend, "_first_bad", "verify", rec, n1)
    engine = inner if inner is not None else backend
    for name in ("batch_get", "batch_get_v1"):
        _wrap(engine, name, "backend_read", rec, n0)
    for name in ("batch_set", "batch_set_v1"):
        _wrap(engine, name, "backend_write", rec, n0)
    pool = getattr(controller, "storage_host_pool", None) or controller.mem_pool_host
    _wrap(pool, "get_dummy_flat_data_page", "alloc_page", rec, lambda a: 1)
    _wrap(pool, "set_from_flat_data_page", "copy_in", rec, lambda a: 1)
    _wrap(pool, "kvtq_write_pages", "copy_in", rec, lambda a: len(a[0]))
    _wrap(controller.mem_pool_host, "load_to_device_per_layer", "load_layer", rec)
    return True


def read_totals(prefix: str) -> dict[str, dict[str, float]]:
    """Cumulative totals of every process that wrote under `prefix`, summed per stage."""
    out: dict[str, dict[str, float]] = {}
    for path in glob.glob(f"{glob.escape(prefix)}.*.json"):
        try:
            with open(path) as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        for stage, v in snap.items():
            t = out.setdefault(stage, {"calls": 0, "s": 0.0, "pages": 0})
            for k in t:
                t[k] += v.get(k, 0)
    return out


def subtract(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-stage difference of two `read_totals` snapshots (stages without calls left out)."""
    out = {}
    for stage, v in after.items():
        b = before.get(stage, {})
        d = {k: v[k] - b.get(k, 0) for k in v}
        if d["calls"]:
            out[stage] = d
    return out
