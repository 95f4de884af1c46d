"""L3 key namespace, page binding and healing: a proxy around any SGLang HiCache storage backend.

Contract (every SGLang release 0.5.17 .. 0.5.23):
- Keys. Every key gets the suffix `-{tag}` (quantized pools: the page layout's `kvtq2-<fingerprint>`;
  plain pools: the device dtype, e.g. `bf16`), so two formats never read each other's pages.
- Write. Right before a quantized page leaves for L3 it is sealed in place (`PageLayout.seal`): the
  header gets the digest of the key SGLang stores it under (before our suffix), the digest of the
  model identity (`model_identity`) and a CRC32C over header and payload.
- Read. Every page that comes back is checked against the key it was asked for, the model and the
  layout (`PageLayout.first_bad_page`); a bad page is a counted miss for itself and every page after
  it (prefix semantics), never loaded.
- Heal. A rejected page is removed from the backend where that is possible (`invalidate_keys`:
  SGLang's file backend, our juicefs and lmcache stores, mooncake), so the next backup of that prefix
  writes a good one; until then, and for the life of the process where removal is impossible,
  the proxy remembers the key and `batch_exists` stops in front of it.
- Faults. No exception escapes into SGLang's storage threads (they catch only `queue.Empty` and die
  silently). Copying calls (`get`, `set`, `exists` and their batches) run under a deadline; after an
  error or a timeout the backend is skipped (misses, failed writes) for `retry_after_s`, then
  probed again, so a backend that comes back is used again. Zero-copy calls (`*_v1`, `*_v2`) are
  not cut off by a deadline: a late transfer would land in host pages already handed to another
  request; they rely on the backend's own timeouts, and a page written late still fails the key check.
- Elastic planes. Over an elastic pool (`--kvtuner-hicache-elastic`) a copying `set`/`batch_set` also
  writes the refinement planes each page holds at that moment as objects of their own
  (`elastic_l3.py`: `<key>.r<stream>` in the same namespace, sealed with key, model and layout), after
  its floor pages were written; `kvtq_get_planes` reads them back, and a plane object that is missing
  or fails its check is a miss for that plane only (the page stays at its floor). A failed plane write
  costs nothing but the planes. `KVTQ_L3_PLANES=0` writes and reads floor pages only; our reader
  (`l3_read.py`) reads the planes after the prefetch has handed over the floor pages, or inside the
  prefetch with `KVTQ_L3_PLANES=sync`.
- Forwarding. Every public method of each release's `HiCacheStorage` is defined here and reaches
  the backend (test/sglang/test_storage.py enumerates them); `__getattr__` only serves
  backend-specific extras.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageExtraInfo,
    PoolName,
    PoolTransferResult,
)

from kvtuner_hicache import elastic_l3
from kvtuner_hicache.page_format import CRC32C_HARDWARE, PageLayout, key_digest, model_digest

logger = logging.getLogger(__name__)

_DTYPE_TAGS = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float8_e4m3fn: "fp8e4m3",
    torch.float8_e5m2: "fp8e5m2",
}
_DRAFT_SUFFIX = f".{PoolName.DRAFT.value}"
ENV_OP_TIMEOUT = "KVTQ_L3_OP_TIMEOUT_S"  # deadline of one copying call (plus transfer time), default 30
ENV_RETRY_AFTER = "KVTQ_L3_RETRY_AFTER_S"  # how long a failed backend is skipped, default 5
ENV_L3_PLANES = "KVTQ_L3_PLANES"  # "0": elastic pools write and read floor pages only; "sync": planes read in the prefetch
_MIN_MB_S = 50.0  # pessimistic transfer rate added to the deadline of big batches


class BackendDown(Exception):
    """The backend raised or did not answer in time; the caller turns this into misses."""


def _unwrap_host_pool(pool: Any) -> Any:
    """The KV host pool behind a unified-path HostPoolGroup (its anchor), else the pool itself."""
    entry = getattr(pool, "anchor_entry", None)
    return getattr(entry, "host_pool", None) or pool


def namespace_tag(mem_pool_host: Any) -> str:
    """`kvtq2-<fingerprint>` for our pools, a device-dtype tag (`bf16`, `fp8e4m3`, ...) otherwise."""
    pool = _unwrap_host_pool(mem_pool_host)
    layout = getattr(pool, "page_layout", None)
    if getattr(pool, "kvtq_quantized", False) and layout is not None:
        return layout.tag
    dtype = getattr(getattr(pool, "device_pool", None), "dtype", None) or getattr(pool, "dtype", None)
    return _DTYPE_TAGS.get(dtype, str(dtype).replace("torch.", "").replace("/", "_"))


def _innermost(backend: Any) -> Any:
    """The real backend behind SGLang 0.5.23's HiCacheStorageFailureInjector (test-only wrapper)."""
    seen = 0
    while type(backend).__name__ == "HiCacheStorageFailureInjector" and seen < 4:
        backend = getattr(backend, "_backend", backend)
        seen += 1
    return backend


def model_identity(storage_config: Any = None, backend: Any = None) -> str:
    """What a page is bound to besides its key: the model and the rank's slice of it.

    From SGLang's HiCacheStorageConfig: model name, and the ranks whose pages differ (TP rank for
    MHA, whose pages hold a head slice; none for MLA, whose pages all TP ranks share; PP stage;
    attention CP and DCP rank). Without a config, the file backend's own key suffix (model and
    ranks), else the empty identity (every writer and reader of this process agree on it).
    """
    cfg = storage_config if storage_config is not None else getattr(_innermost(backend), "storage_config", None)
    if cfg is None:
        return f"suffix:{getattr(_innermost(backend), 'config_suffix', '')}"
    parts = [f"model={getattr(cfg, 'model_name', None) or ''}"]
    if not getattr(cfg, "is_mla_model", False):
        parts.append(f"tp={getattr(cfg, 'tp_rank', 0)}/{getattr(cfg, 'tp_size', 1)}")
    for name in ("pp", "attn_cp", "dcp"):
        size = getattr(cfg, f"{name}_size", 1) or 1
        if size > 1:
            parts.append(f"{name}={getattr(cfg, f'{name}_rank', 0)}/{size}")
    return "|".join(parts)


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors or [] if isinstance(t, torch.Tensor))


def _page_view(t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of one CPU page tensor (a view of the host pool's row, or SGLang's buffer)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ---- healing: remove a bad object from the backend --------------------------------------------


def _invalidate_file(backend: Any, nkeys: list[str]) -> list[bool]:
    """SGLang's HiCacheFile: unlink `<dir>/<key><config_suffix>.bin` (its next `set` then writes)."""
    out = []
    cache = getattr(backend, "metadata_cache", None)
    for nkey in nkeys:
        stem = nkey + backend.config_suffix
        try:
            os.unlink(os.path.join(backend.file_path, f"{stem}.bin"))
            ok = True
        except FileNotFoundError:
            ok = True
        except OSError:
            ok = False
        if cache is not None:
            cache.remove(stem)
        out.append(ok)
    return out


def _invalidate_mooncake(backend: Any, nkeys: list[str]) -> list[bool]:
    """SGLang's MooncakeStore: force-remove the K (and V) objects of each page key."""
    store = backend.store
    tagged = backend._tag_keys(list(nkeys)) if hasattr(backend, "_tag_keys") else list(nkeys)
    out = []
    for key in tagged:
        if getattr(backend, "is_mla_backend", False):
            objs = [f"{key}_{backend.mla_suffix}_k"]
        elif getattr(backend, "should_split_heads", False):
            objs = [f"{key}_{s}_{kv}" for s in backend.mha_suffix for kv in ("k", "v")]
        else:
            objs = [f"{key}_{backend.mha_suffix}_{kv}" for kv in ("k", "v")]
        ok = True
        for obj in objs:
            rc = store.remove(obj, True)
            ok = ok and rc in (0, None, -704)  # -704: OBJECT_NOT_FOUND, already gone
        out.append(ok)
    return out


def invalidate(backend: Any, nkeys: list[str]) -> list[bool]:
    """Remove the objects stored under `nkeys` (namespaced keys); per key, True when it is gone.

    Backends opt in with `invalidate_keys(keys) -> list[bool]` (our juicefs and lmcache stores);
    SGLang's file and mooncake backends are handled here through their public attributes. Any
    other backend cannot remove: all False, and the proxy remembers the keys instead.
    """
    b = _innermost(backend)
    name = type(b).__name__
    try:
        if hasattr(b, "invalidate_keys"):
            return [bool(x) for x in b.invalidate_keys(list(nkeys))]
        if hasattr(b, "config_suffix") and hasattr(b, "file_path"):
            return _invalidate_file(b, nkeys)
        if name == "MooncakeStore" and hasattr(b, "store"):
            return _invalidate_mooncake(b, nkeys)
    except Exception as e:  # a backend that is down cannot remove either
        logger.warning("kvtuner_hicache: could not remove %d bad L3 page(s) from %s: %s", len(nkeys), name, e)
    return [False] * len(nkeys)


class KVTQStorageProxy(HiCacheStorage):
    """Namespacing, sealing, verifying and healing wrapper around `inner` (see the module doc)."""

    def __init__(self, inner: HiCacheStorage, mem_pool_host: Any, storage_config: Any = None):
        self.inner = inner
        self.pool = _unwrap_host_pool(mem_pool_host)
        self.tag = namespace_tag(mem_pool_host)
        self.layout: PageLayout | None = (
            self.pool.page_layout if getattr(self.pool, "kvtq_quantized", False) else None
        )
        self.identity = model_identity(storage_config, inner)
        self.model_digest = model_digest(self.identity)
        self.kvtq_l3_rejected_pages = 0
        self.kvtq_l3_healed_pages = 0
        self.kvtq_l3_backend_errors = 0
        self.kvtq_planes = (self.layout is not None and getattr(self.pool, "kvtq_elastic", False)
                            and os.environ.get(ENV_L3_PLANES, "1") != "0")
        self.kvtq_planes_sync = self.kvtq_planes and os.environ.get(ENV_L3_PLANES, "1") == "sync"
        self._plane_layout = elastic_l3.layout_digest(self.tag) if self.kvtq_planes else b""
        self.kvtq_l3_planes_written = self.kvtq_l3_planes_read = self.kvtq_l3_rejected_planes = 0
        self.kvtq_reader: Any = None  # the controller's l3_read.InPoolReader, once installed
        self._bad: dict[str, bool] = {}  # namespaced key -> removed from the backend
        self._lock = threading.Lock()
        self.op_timeout_s = float(os.environ.get(ENV_OP_TIMEOUT, "30"))
        self.retry_after_s = float(os.environ.get(ENV_RETRY_AFTER, "5"))
        self._down_until = 0.0
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtq-l3")
        logger.info("kvtuner_hicache: L3 keys of backend %s live under namespace '-%s' (pages bound to %s)",
                    type(inner).__name__, self.tag, self.identity)
        if self.layout is not None and not CRC32C_HARDWARE:
            logger.warning("kvtuner_hicache: the crc32c package has no hardware CRC32C on this CPU; L3 page "
                           "checks run in software, well below line rate")

    # ---- keys ------------------------------------------------------------------------------------

    def _namespaced(self, key: str) -> str:
        return f"{key}-{self.tag}"

    def _namespaced_all(self, keys: list[str]) -> list[str]:
        return [f"{k}-{self.tag}" for k in keys]

    def _namespaced_info(self, extra_info: HiCacheStorageExtraInfo | None) -> HiCacheStorageExtraInfo | None:
        if extra_info is None or not extra_info.prefix_keys:
            return extra_info
        return dataclasses.replace(extra_info, prefix_keys=self._namespaced_all(list(extra_info.prefix_keys)))

    def _namespaced_transfers(self, transfers: list[Any] | None) -> list[Any] | None:
        if transfers is None:
            return None
        return [dataclasses.replace(t, keys=self._namespaced_all(list(t.keys))) if t.keys else t for t in transfers]

    def _checked(self, key: str) -> bool:
        """Only target-pool pages of a quantized pool are ours to check (draft pages are bf16)."""
        return self.layout is not None and not key.endswith(_DRAFT_SUFFIX)

    # ---- deadline and circuit breaker (copying calls only) ----------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, nbytes: int = 0, raise_errors: bool = False) -> Any:
        """Run one backend call under the deadline. Timeouts (and errors, unless `raise_errors`)
        mark the backend down and raise BackendDown; with `raise_errors` the error itself is raised."""
        self._check_up()
        timeout = self.op_timeout_s + nbytes / (_MIN_MB_S * 1e6)
        try:
            return self._workers.submit(fn, *args).result(timeout=timeout)
        except FutureTimeout:
            self._backend_failed(what, f"no answer within {timeout:.1f} s")
        except Exception as e:
            if raise_errors:
                raise
            self._backend_failed(what, f"{type(e).__name__}: {e}")
        raise BackendDown(what)

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise BackendDown("recently failed")

    def _backend_failed(self, what: str, why: str) -> None:
        with self._lock:
            self.kvtq_l3_backend_errors += 1
            self._down_until = time.monotonic() + self.retry_after_s
        logger.warning("kvtuner_hicache: L3 %s on %s failed (%s); L3 gives misses for %.0f s, then is tried again",
                       what, type(self.inner).__name__, why, self.retry_after_s)

    # ---- bad pages ---------------------------------------------------------------------------------

    def _reject(self, key: str, reason: str, dropped: int, read_error: bool = False) -> None:
        """Count a bad page, log it, and remove it from the backend or remember it.

        `read_error`: the backend raised instead of returning bytes (a truncated file, or an
        outage); such a key is removed if the backend can, but never remembered when it cannot,
        so a backend that was merely down serves the page again once it is back.
        """
        nkey = self._namespaced(key)
        removed = invalidate(self.inner, [nkey])[0]
        with self._lock:
            self.kvtq_l3_rejected_pages += 1
            if removed:
                self.kvtq_l3_healed_pages += 1
            if removed or not read_error:
                self._bad[nkey] = removed
        if removed:
            fate = "removed from the backend; the next backup writes it again"
        elif read_error:
            fate = "not removable now (backend down?)"
        else:
            fate = "the backend cannot remove it: skipped for the life of this process"
        logger.warning("kvtuner_hicache: L3 page %s rejected (%s); it and %d later page(s) are a miss; %s",
                       key, reason, dropped - 1, fate)
        if read_error and not removed:
            self._backend_failed("read", reason)

    def _cut_at_bad(self, nkeys: list[str], hits: int) -> int:
        if not self._bad:
            return hits
        with self._lock:
            for i in range(hits):
                if nkeys[i] in self._bad:
                    return i
        return hits

    def _written(self, nkeys: list[str], ok: list[bool] | bool) -> None:
        """A removed bad key that was written again is good again (the backend holds a new page)."""
        if not self._bad:
            return
        oks = ok if isinstance(ok, list) else [bool(ok)] * len(nkeys)
        with self._lock:
            for nkey, good in zip(nkeys, oks, strict=False):
                if good and self._bad.get(nkey):
                    del self._bad[nkey]

    def _seal_all(self, keys: list[str], pages: list[torch.Tensor]) -> None:
        """Seal the pages of our keys in one batch (their CRCs in parallel)."""
        ours = [(k, p) for k, p in zip(keys, pages, strict=False) if self._checked(k)]
        if ours:
            self.layout.seal_pages([_page_view(p) for _, p in ours], self.model_digest,
                                   [key_digest(k) for k, _ in ours])

    def _first_bad(self, keys: list[str], pages: list[memoryview]) -> tuple[int, str] | None:
        n = len(pages)
        checked = n if self.layout is not None else 0
        for i in range(n):
            if not self._checked(keys[i]):
                checked = i
                break
        if checked == 0:
            return None
        return self.layout.first_bad_page(pages[:checked], [key_digest(k) for k in keys[:checked]], self.model_digest)

    # ---- registration ------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host
        self.inner.register_mem_pool_host(mem_pool_host)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        self.inner.register_mem_host_pool_v2(host_pool, host_pool_name)

    def on_host_pools_registered(self) -> None:
        """SGLang 0.5.23+: the pool set is final; raising fails the attach, so errors propagate."""
        hook = getattr(self.inner, "on_host_pools_registered", None)
        if hook is not None:
            hook()

    # ---- generic (copying) interface ---------------------------------------------------------------

    def get(self, key, target_location=None, target_sizes=None):
        try:
            page = self._call("read", self.inner.get, self._namespaced(key), target_location, target_sizes,
                              nbytes=_nbytes([target_location]), raise_errors=True)
        except BackendDown:
            return None
        except Exception as e:  # e.g. HiCacheFile raises IOError on a short (truncated) file
            self._reject(key, f"read failed: {type(e).__name__}: {e}", 1, read_error=True)
            return None
        return self._verified([key], [page])[0]

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        keys = list(keys)
        if not keys:
            return []
        nkeys = self._namespaced_all(keys)
        try:
            try:
                pages = self._call("read", self.inner.batch_get, nkeys, target_locations, target_sizes,
                                   nbytes=_nbytes(target_locations), raise_errors=True)
            except BackendDown:
                raise
            except Exception:  # one bad object can fail a whole batch (HiCacheFile): find it
                pages = self._call("read", self._get_one_by_one, keys, nkeys, target_locations, target_sizes,
                                   nbytes=_nbytes(target_locations))
        except BackendDown:
            return [None] * len(keys)
        if not isinstance(pages, list):
            return pages
        return self._verified(keys, pages)

    def _verified(self, keys: list[str], pages: list[Any]) -> list[Any]:
        """The longest prefix of `pages` that is present, not known bad and passes the checks."""
        pages = list(pages) + [None] * (len(keys) - len(pages))
        n = next((i for i, p in enumerate(pages) if p is None), len(pages))
        n = self._cut_at_bad(self._namespaced_all(keys[:n]), n)
        bad = self._first_bad(keys, [_page_view(p) for p in pages[:n]]) if n and self.layout is not None else None
        if bad is not None:
            i, reason = bad
            self._reject(keys[i], reason, len(pages) - i)
            n = i
        return pages[:n] + [None] * (len(pages) - n)

    def _get_one_by_one(self, keys, nkeys, target_locations, target_sizes) -> list[Any]:
        """A backend's batch read raised: keep the readable prefix, reject the page that broke it."""
        out: list[Any] = [None] * len(nkeys)
        for i, nkey in enumerate(nkeys):
            loc = target_locations[i] if target_locations is not None else None
            size = target_sizes[i] if target_sizes is not None else None
            try:
                out[i] = self.inner.get(nkey, loc, size)
            except Exception as e:
                self._reject(keys[i], f"read failed: {type(e).__name__}: {e}", len(nkeys) - i, read_error=True)
                break
            if out[i] is None:
                break
        return out

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        nkey = self._namespaced(key)
        try:
            if value is not None:
                self._seal_all([key], [value])
        except Exception:
            logger.exception("kvtuner_hicache: sealing L3 page %s failed; not writing it", key)
            return False
        try:
            ok = bool(self._call("write", self.inner.set, nkey, value, target_location, target_sizes,
                                 nbytes=_nbytes([value])))
        except BackendDown:
            return False
        self._written([nkey], ok)
        if ok and self.kvtq_planes and value is not None:
            self._set_planes([key], [value])
        return ok

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        keys = list(keys)
        nkeys = self._namespaced_all(keys)
        try:
            if values is not None:
                self._seal_all(keys, list(values))
        except Exception:
            logger.exception("kvtuner_hicache: sealing L3 pages failed; not writing them")
            return False
        try:
            ok = bool(self._call("write", self.inner.batch_set, nkeys, values, target_locations, target_sizes,
                                 nbytes=_nbytes(values)))
        except BackendDown:
            return False
        self._written(nkeys, ok)
        if ok and self.kvtq_planes and values is not None:
            self._set_planes(keys, list(values))
        return ok

    # ---- elastic planes as objects of their own (elastic_l3.py) -------------------------------------

    def _page_ids_of(self, values: list[Any]) -> list[int | None]:
        """The host page each value is a view of (SGLang's copying writer passes `get_data_page` views)."""
        pages = self.pool.pages
        base, stride, n = pages.data_ptr(), pages.stride(0), pages.shape[0]
        out: list[int | None] = []
        for v in values:
            off = v.data_ptr() - base if isinstance(v, torch.Tensor) else -1
            out.append(off // stride if 0 <= off < n * stride and off % stride == 0 else None)
        return out

    def _set_planes(self, keys: list[str], values: list[Any]) -> None:
        pids = self._page_ids_of(values)
        sel = [i for i, p in enumerate(pids) if p is not None and self._checked(keys[i])]
        if not sel:
            return
        objs = self.pool.kvtq_copy_planes([pids[i] for i in sel], elastic_l3.HEADER_BYTES)
        if not objs:
            return
        for j, s, obj in objs:
            elastic_l3.seal(obj.numpy(), s, self._plane_layout, self.model_digest, key_digest(keys[sel[j]]))
        nkeys = self._namespaced_all([elastic_l3.plane_key(keys[sel[j]], s) for j, s, _ in objs])
        try:
            ok = self._call("write", self.inner.batch_set, nkeys, [o for _, _, o in objs], None, None,
                            nbytes=sum(o.numel() for _, _, o in objs))
        except BackendDown:
            return
        if ok:
            with self._lock:
                self.kvtq_l3_planes_written += len(objs)

    def kvtq_get_planes(self, keys: list[str], stream: int, targets: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The plane objects of `stream` for the pages of `keys`, read into `targets` (uint8, header +
        plane bytes each) and checked; None where missing or bad (a bad one is removed if possible)."""
        nkeys = self._namespaced_all([elastic_l3.plane_key(k, stream) for k in keys])
        try:
            got = self._call("read", self.inner.batch_get, nkeys, targets, None, nbytes=_nbytes(targets),
                             raise_errors=True)
        except Exception:  # an outage, or a plane object of the wrong size: these planes are misses
            return [None] * len(keys)
        got = list(got or []) + [None] * (len(keys) - len(got or []))
        out: list[torch.Tensor | None] = []
        for key, nkey, obj in zip(keys, nkeys, got, strict=False):
            if obj is None:
                out.append(None)
                continue
            flat = obj.reshape(-1).view(torch.uint8)
            why = elastic_l3.problem(flat.numpy(), stream, self._plane_layout, self.model_digest, key_digest(key))
            if why is not None:
                invalidate(self.inner, [nkey])
                with self._lock:
                    self.kvtq_l3_rejected_planes += 1
                logger.warning("kvtuner_hicache: L3 plane object %s rejected (%s); that page loads at its floor",
                               nkey, why)
                out.append(None)
                continue
            out.append(flat)
        with self._lock:
            self.kvtq_l3_planes_read += sum(o is not None for o in out)
        return out

    def exists(self, key) -> bool:
        nkey = self._namespaced(key)
        try:
            found = bool(self._call("lookup", self.inner.exists, nkey))
        except BackendDown:
            return False
        return found and self._cut_at_bad([nkey], 1) == 1

    def batch_exists(self, keys, extra_info=None) -> int:
        keys = list(keys)
        if not keys:
            return 0
        nkeys = self._namespaced_all(keys)
        try:
            hits = self._call("lookup", self.inner.batch_exists, nkeys, self._namespaced_info(extra_info))
        except BackendDown:
            return 0
        return self._cut_at_bad(nkeys, int(hits or 0))

    # ---- zero-copy interface (host pages addressed through get_page_buffer_meta) -----------------

    def batch_set_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        keys = list(keys)
        if time.monotonic() < self._down_until:
            return [False] * len(keys)
        try:
            if self.layout is not None:
                self._seal_all(keys, [self.pool.pages[pid] for pid in self.pool.kvtq_page_ids(host_indices)])
            nkeys = self._namespaced_all(keys)
            results = list(self.inner.batch_set_v1(nkeys, host_indices, self._namespaced_info(extra_info)))
        except Exception as e:
            self._backend_failed("write", f"{type(e).__name__}: {e}")
            return [False] * len(keys)
        self._written(nkeys, [bool(r) for r in results])
        return results

    def batch_get_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        keys = list(keys)
        nkeys = self._namespaced_all(keys)
        if time.monotonic() < self._down_until:
            return [False] * len(keys)
        try:
            results = list(self.inner.batch_get_v1(nkeys, host_indices, self._namespaced_info(extra_info)))
        except Exception as e:
            self._backend_failed("read", f"{type(e).__name__}: {e}")
            return [False] * len(keys)
        n = next((i for i, ok in enumerate(results) if not ok), len(results))
        n = self._cut_at_bad(nkeys, n)
        if n and self.layout is not None:
            pids = self.pool.kvtq_page_ids(host_indices)
            bad = self._first_bad(keys[:n], [_page_view(self.pool.pages[p]) for p in pids[:n]])
            if bad is not None:
                i, reason = bad
                self._reject(keys[i], reason, len(results) - i)
                n = i
        return results[:n] + [False] * (len(results) - n)

    # ---- v2 (hybrid / draft pools: not our pages, only namespaced) --------------------------------

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        try:
            return self.inner.batch_exists_v2(self._namespaced_all(list(keys)),
                                              self._namespaced_transfers(pool_transfers),
                                              self._namespaced_info(extra_info))
        except Exception as e:
            self._backend_failed("lookup", f"{type(e).__name__}: {e}")
            return PoolTransferResult.empty()

    def batch_get_v2(self, transfers, extra_info=None):
        try:
            return self.inner.batch_get_v2(self._namespaced_transfers(transfers), self._namespaced_info(extra_info))
        except Exception as e:
            self._backend_failed("read", f"{type(e).__name__}: {e}")
            return {t.name: [False] * len(t.keys or []) for t in transfers or []}

    def batch_set_v2(self, transfers, extra_info=None):
        try:
            return self.inner.batch_set_v2(self._namespaced_transfers(transfers), self._namespaced_info(extra_info))
        except Exception as e:
            self._backend_failed("write", f"{type(e).__name__}: {e}")
            return {t.name: [False] * len(t.keys or []) for t in transfers or []}

    # ---- the rest -------------------------------------------------------------------------------------

    def clear(self):
        with self._lock:
            self._bad.clear()
        return self.inner.clear()

    def bad_keys(self) -> dict[str, bool]:
        """Namespaced keys rejected and not yet rewritten -> whether the backend removed them."""
        with self._lock:
            return dict(self._bad)

    def get_stats(self):
        try:
            stats = self.inner.get_stats()
        except Exception as e:
            logger.warning("kvtuner_hicache: L3 get_stats of %s failed: %s", type(self.inner).__name__, e)
            stats = None
        ours = {"kvtq_l3_rejected_pages": self.kvtq_l3_rejected_pages,
                "kvtq_l3_healed_pages": self.kvtq_l3_healed_pages,
                "kvtq_l3_backend_errors": self.kvtq_l3_backend_errors}
        if isinstance(stats, dict):
            stats.update(ours)
        elif stats is not None:
            for k, v in ours.items():
                try:
                    setattr(stats, k, v)
                except AttributeError:
                    pass
        return stats

    def close(self):
        self._workers.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.inner, "close", None)
        return close() if close is not None else None

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the proxy does not define (backend-specific extras)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)
