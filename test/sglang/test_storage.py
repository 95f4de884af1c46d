"""L3 namespace, page binding, healing and faults: our proxy around SGLang's real HiCacheFile."""

from __future__ import annotations

import ctypes
import inspect
import os
import threading
import time

import pytest
import torch
from kvtuner_hicache.config import QuantConfig
from kvtuner_hicache.page_format import KEY_DIGEST_OFFSET, MODEL_DIGEST_OFFSET, key_digest, model_digest
from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy, model_identity
from l3_rig import PS, file_proxy, filled_pool, get, mla_device_pool, page_file, pages_of, put, storage_config
from sglang.srt.mem_cache import hicache_storage as hs
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo
from sglang_pools import bf16_host_pool, mha_device_pool

pytestmark = pytest.mark.sglang
KEYS = ["aa", "bb", "cc"]


def test_roundtrip_namespaced_and_sealed(tmp_path):
    pool, h = filled_pool()
    b = file_proxy(pool, tmp_path)
    assert put(b, pool, h, KEYS)
    names = sorted(os.listdir(tmp_path))
    assert all(f"-{pool.page_layout.tag}_org-model_0_1.bin" in n for n in names), names
    assert b.batch_exists(KEYS, HiCacheStorageExtraInfo(prefix_keys=["root"])) == 3
    got = get(b, pool, KEYS)
    want_model = model_digest(model_identity(storage_config()))
    for i, page in enumerate(got):
        assert torch.equal(page, pool.get_data_page(h[i * PS]))
        raw = memoryview(page.numpy())
        assert pool.page_layout.check_page(raw, model=want_model, key=key_digest(KEYS[i])) is None
        assert bytes(raw[KEY_DIGEST_OFFSET:KEY_DIGEST_OFFSET + 16]) == key_digest(KEYS[i])
        assert bytes(raw[MODEL_DIGEST_OFFSET:MODEL_DIGEST_OFFSET + 16]) == want_model


def test_bf16_and_quantized_pools_do_not_see_each_other(tmp_path):
    dev = mha_device_pool(2, 4, 128, PS, tokens=512)
    q, h = filled_pool(dev=dev)
    q2, _ = filled_pool(QuantConfig(nbits_key=2, nbits_value=2), dev=dev)
    plain = bf16_host_pool(dev)
    bq, bq2, bp = file_proxy(q, tmp_path), file_proxy(q2, tmp_path), file_proxy(plain, tmp_path)
    assert put(bq, q, h, KEYS)
    assert bp.batch_exists(KEYS) == 0 and bq2.batch_exists(KEYS) == 0
    hp = plain.alloc(3 * PS)
    assert bp.batch_set(KEYS, [plain.get_data_page(hp[i * PS]) for i in range(3)])
    assert any(n.startswith("aa-bf16_") for n in os.listdir(tmp_path))
    assert bq.batch_exists(KEYS) == 3 and bq2.batch_exists(KEYS) == 0
    assert [p is not None for p in get(bp, plain, KEYS)] == [True] * 3


def _damage(path, how: str, tmp_path, proxy, pool, h) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "header-flip":
        data[9] ^= 0x04
    elif how == "truncate":
        data = data[:1000]
    elif how == "foreign":  # a page of another config, same size (KV4 per-token keys instead of per-channel)
        other, oh = filled_pool(QuantConfig(axis_key=0))
        data = bytearray(other.get_data_page(oh[0]).numpy().tobytes())
    elif how == "swapped":  # a valid page of this pool, stored under another key
        data = bytearray(page_file(tmp_path, proxy, "aa").read_bytes())
    elif how == "other-model":  # a valid page of another model with the same layout
        other = file_proxy(pool, tmp_path / "m2", model="org/other-model")
        assert put(other, pool, h, ["bb"])
        data = bytearray(page_file(tmp_path / "m2", other, "bb").read_bytes())
    path.write_bytes(bytes(data))


REASONS = {"flip": "checksum", "header-flip": "another format", "truncate": "read failed", "foreign": "another",
           "swapped": "another key", "other-model": "another model"}


@pytest.mark.parametrize("damage", list(REASONS))
def test_bad_page_is_a_counted_prefix_miss_and_heals(tmp_path, damage, caplog):
    pool, h = filled_pool()
    b = file_proxy(pool, tmp_path)
    assert put(b, pool, h, KEYS)
    target = page_file(tmp_path, b, "bb")
    _damage(target, damage, tmp_path, b, pool, h)
    got = get(b, pool, KEYS)
    assert got[0] is not None and got[1] is None and got[2] is None
    assert b.kvtq_l3_rejected_pages == 1 and b.kvtq_l3_healed_pages == 1
    assert REASONS[damage] in caplog.text
    # healed: the bad object is gone, lookups stop in front of it, the next backup writes a good page
    assert not target.exists()
    assert b.batch_exists(KEYS) == 1
    assert put(b, pool, h, KEYS)
    assert target.exists() and b.bad_keys() == {}
    again = get(b, pool, KEYS)
    assert all(torch.equal(again[i], pool.get_data_page(h[i * PS])) for i in range(3))
    assert b.kvtq_l3_rejected_pages == 1


def test_bf16_file_under_quantized_key_is_rejected(tmp_path):
    """HiCacheFile silently reads a larger file's prefix: the header check catches it."""
    pool, h = filled_pool()
    b = file_proxy(pool, tmp_path)
    assert put(b, pool, h, KEYS[:1])
    page_file(tmp_path, b, "aa").write_bytes(os.urandom(pool.page_layout.page_bytes * 3))
    assert get(b, pool, KEYS[:1]) == [None]
    assert b.kvtq_l3_rejected_pages == 1


class _NoDelete(HiCacheStorage):
    """A copying backend that cannot remove objects and never overwrites an existing key."""

    def __init__(self):
        self.objs: dict[str, bytes] = {}

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        for k, v in zip(keys, values, strict=True):
            self.objs.setdefault(k, v.numpy().tobytes())
        return True

    def set(self, key, value=None, target_location=None, target_sizes=None):
        return self.batch_set([key], [value])

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        out = []
        for k, t in zip(keys, target_locations, strict=True):
            if k in self.objs:
                t.copy_(torch.frombuffer(bytearray(self.objs[k]), dtype=torch.uint8))
                out.append(t)
            else:
                out.append(None)
        return out

    def get(self, key, target_location=None, target_sizes=None):
        return self.batch_get([key], [target_location])[0]

    def exists(self, key):
        return key in self.objs

    def batch_exists(self, keys, extra_info=None):
        return next((i for i, k in enumerate(keys) if k not in self.objs), len(keys))


def test_backend_that_cannot_delete_keeps_the_bad_key_out_for_the_process(tmp_path, caplog):
    pool, h = filled_pool()
    inner = _NoDelete()
    b = KVTQStorageProxy(inner, pool, storage_config())
    assert put(b, pool, h, KEYS)
    nb = b._namespaced("bb")
    inner.objs[nb] = inner.objs[b._namespaced("aa")]  # swapped object
    assert [p is not None for p in get(b, pool, KEYS)] == [True, False, False]
    assert "life of this process" in caplog.text
    assert inner.batch_exists(b._namespaced_all(KEYS)) == 3  # the backend still has it ...
    assert b.batch_exists(KEYS) == 1 and not b.exists("bb")  # ... the proxy never reports it again
    assert put(b, pool, h, KEYS)  # the backend skips the existing key: still bad, still remembered
    assert b.bad_keys() == {nb: False}
    assert [p is not None for p in get(b, pool, KEYS)] == [True, False, False]
    assert b.kvtq_l3_rejected_pages == 1  # known bad: not read, not counted again


class _ZeroCopyMem(HiCacheStorage):
    """Minimal zero-copy backend (like mooncake): objects are the byte ranges get_page_buffer_meta names."""

    def __init__(self):
        self.objs: dict[str, bytes] = {}
        self.fail = False

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per = len(ptrs) // len(keys)
        for i, k in enumerate(keys):
            for j in range(per):
                self.objs[f"{k}/{j}"] = ctypes.string_at(ptrs[i * per + j], sizes[i * per + j])
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        if self.fail:
            raise RuntimeError("transfer engine down")
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per = len(ptrs) // len(keys)
        out = []
        for i, k in enumerate(keys):
            objs = [self.objs.get(f"{k}/{j}") for j in range(per)]
            if any(o is None for o in objs):
                out.append(False)
                continue
            for j, o in enumerate(objs):
                ctypes.memmove(ptrs[i * per + j], o, len(o))
            out.append(True)
        return out

    def invalidate_keys(self, keys):
        for k in keys:
            for j in range(2):
                self.objs.pop(f"{k}/{j}", None)
        return [True] * len(keys)

    def exists(self, key):
        return f"{key}/0" in self.objs

    def batch_exists(self, keys, extra_info=None):
        return next((i for i, k in enumerate(keys) if not self.exists(k)), len(keys))

    def get(self, *a, **k):
        raise NotImplementedError

    def batch_get(self, *a, **k):
        raise NotImplementedError

    def set(self, *a, **k):
        raise NotImplementedError

    def batch_set(self, *a, **k):
        raise NotImplementedError


@pytest.mark.parametrize("mla", [False, True])
def test_zero_copy_path_checks_and_heals(mla, monkeypatch):
    monkeypatch.setenv("KVTQ_L3_RETRY_AFTER_S", "0.2")
    dev = mla_device_pool(2, PS, tokens=512) if mla else None
    pool, h = filled_pool(QuantConfig(nbits_key=8) if mla else None, dev=dev)
    inner = _ZeroCopyMem()
    b = KVTQStorageProxy(inner, pool, storage_config(mla=mla))
    b.register_mem_pool_host(pool)
    assert b.batch_set_v1(KEYS, h) == [True] * 3
    assert all(k.split("/")[0].endswith(pool.page_layout.tag) for k in inner.objs)
    assert len(inner.objs) == 3 * (1 if mla else 2)
    expected = [p.clone() for p in pages_of(pool, h, 3)]
    h2 = pool.alloc(3 * PS)
    assert b.batch_get_v1(KEYS, h2) == [True] * 3
    assert all(torch.equal(pool.get_data_page(h2[i * PS]), expected[i]) for i in range(3))
    # swap the objects of two keys: both pages are valid, but neither is the page asked for
    ka, kb = f"aa-{pool.page_layout.tag}", f"bb-{pool.page_layout.tag}"
    for j in range(1 if mla else 2):
        inner.objs[f"{ka}/{j}"], inner.objs[f"{kb}/{j}"] = inner.objs[f"{kb}/{j}"], inner.objs[f"{ka}/{j}"]
    assert b.batch_get_v1(KEYS, h2) == [False] * 3
    assert b.batch_exists(KEYS) == 0 and not inner.exists(ka)  # removed
    assert b.batch_set_v1(KEYS, h) == [True] * 3 and b.batch_get_v1(KEYS, h2) == [True] * 3  # healed
    inner.fail = True
    assert b.batch_get_v1(KEYS, h2) == [False] * 3  # never raises into the prefetch thread
    assert b.kvtq_l3_rejected_pages == 1 and b.kvtq_l3_backend_errors == 1
    inner.fail = False
    time.sleep(0.25)
    assert b.batch_get_v1(KEYS, h2) == [True] * 3  # back: used again


def test_proxy_never_raises_into_storage_threads():
    class Broken(_ZeroCopyMem):
        def batch_exists(self, keys, extra_info=None):
            raise OSError("mount gone")

        def batch_set_v1(self, keys, host_indices, extra_info=None):
            raise OSError("mount gone")

        def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
            raise OSError("mount gone")

        def batch_get_v2(self, transfers, extra_info=None):
            raise OSError("mount gone")

        def batch_set_v2(self, transfers, extra_info=None):
            raise OSError("mount gone")

        def get_stats(self):
            raise OSError("mount gone")

    pool, h = filled_pool()
    b = KVTQStorageProxy(Broken(), pool, storage_config())
    b.retry_after_s = 0.0
    assert b.batch_exists(KEYS) == 0
    assert b.batch_set_v1(KEYS, h) == [False] * 3
    assert b.exists("aa") is False
    assert b.batch_get(KEYS, [pool.get_dummy_flat_data_page() for _ in KEYS]) == [None] * 3
    transfer = [hs.PoolTransfer(name=hs.PoolName.DRAFT, host_indices=h[:PS], keys=["aa"])]
    assert b.batch_exists_v2(["aa"], transfer).kv_hit_pages == 0
    assert b.batch_get_v2(transfer) == {hs.PoolName.DRAFT: [False]}
    assert b.batch_set_v2(transfer) == {hs.PoolName.DRAFT: [False]}
    assert b.get_stats() is None and b.kvtq_l3_backend_errors >= 4  # no exception, errors counted


def test_hung_backend_gives_misses_within_the_deadline_and_is_used_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTQ_L3_OP_TIMEOUT_S", "0.3")
    monkeypatch.setenv("KVTQ_L3_RETRY_AFTER_S", "0.5")
    pool, h = filled_pool()
    b = file_proxy(pool, tmp_path)
    assert put(b, pool, h, KEYS)
    release = threading.Event()
    real_get = b.inner.get

    def stuck_get(*a, **k):
        release.wait(10)
        return real_get(*a, **k)

    b.inner.get = stuck_get
    t0 = time.monotonic()
    assert get(b, pool, KEYS) == [None] * 3
    assert time.monotonic() - t0 < 2.0
    assert b.batch_exists(KEYS) == 0 and not put(b, pool, h, KEYS)  # skipped while down, instantly
    assert time.monotonic() - t0 < 2.5
    release.set()
    b.inner.get = real_get
    time.sleep(0.6)
    assert b.batch_exists(KEYS) == 3
    assert all(p is not None for p in get(b, pool, KEYS))
    assert b.kvtq_l3_backend_errors == 1 and b.kvtq_l3_rejected_pages == 0


# ---- every public method of the running release's HiCacheStorage is forwarded ---------------------

# per method: the arguments the proxy is called with (None = the backend gets no call through us)
_CALLS = {
    "register_mem_pool_host": lambda pool, h: (pool,),
    "register_mem_host_pool_v2": lambda pool, h: (pool, "draft"),
    "on_host_pools_registered": lambda pool, h: (),
    "batch_exists_v2": lambda pool, h: (["aa"],),
    "batch_get_v2": lambda pool, h: ([],),
    "batch_set_v2": lambda pool, h: ([],),
    "batch_get_v1": lambda pool, h: (["aa"], h[:PS]),
    "batch_set_v1": lambda pool, h: (["aa"], h[:PS]),
    "get": lambda pool, h: ("aa", pool.get_dummy_flat_data_page()),
    "batch_get": lambda pool, h: (["aa"], [pool.get_dummy_flat_data_page()]),
    "set": lambda pool, h: ("aa", pool.get_data_page(h[0])),
    "batch_set": lambda pool, h: (["aa"], [pool.get_data_page(h[0])]),
    "exists": lambda pool, h: ("aa",),
    "batch_exists": lambda pool, h: (["aa"],),
    "clear": lambda pool, h: (),
    "get_stats": lambda pool, h: (),
}


def _public_methods(cls) -> list[str]:
    return sorted(n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_"))


def test_every_public_storage_method_is_forwarded():
    methods = _public_methods(HiCacheStorage)
    assert set(methods) - set(_CALLS) == set(), "a new HiCacheStorage method: forward it in KVTQStorageProxy"
    calls: list[str] = []

    class Recorder(HiCacheStorage):
        pass

    returns = {"batch_get_v1": [False], "batch_set_v1": [False], "batch_get": [None], "batch_exists": 0,
               "exists": False, "set": False, "batch_set": False, "get_stats": {}}

    def recording(name):
        def fn(self, *a, **k):
            calls.append(name)
            return returns.get(name)
        return fn

    for name in methods:
        setattr(Recorder, name, recording(name))
    Recorder.__abstractmethods__ = frozenset()
    pool, h = filled_pool()
    proxy = KVTQStorageProxy(Recorder(), pool, storage_config())
    for name in methods:
        assert name in KVTQStorageProxy.__dict__, f"KVTQStorageProxy does not define {name}"
        calls.clear()
        getattr(proxy, name)(*_CALLS[name](pool, h))
        assert calls == [name], f"{name} reached the backend as {calls}"


@pytest.mark.skipif(not hasattr(hs, "HiCacheStorageFailureInjector"), reason="SGLang < 0.5.23 has no failure injector")
def test_sglang_failure_injector_gives_misses_never_bad_loads(tmp_path):
    """SGLang 0.5.23's own injector (random failures and delays) between the proxy and HiCacheFile."""
    import random

    pool, h = filled_pool(n_pages=8)
    keys = [f"k{i}" for i in range(8)]
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(tmp_path)
    injector = hs.HiCacheStorageFailureInjector(hs.HiCacheFile(storage_config()), 0.002, 0.3)
    injector._thread_local.random = random.Random(0)
    b = KVTQStorageProxy(injector, pool, storage_config())
    b.retry_after_s = 0.0
    b.batch_set(keys, pages_of(pool, h, 8))  # seals the host pages (key and model), whatever the injector does
    want = [p.clone() for p in pages_of(pool, h, 8)]
    loads = misses = 0
    for _ in range(40):
        b.batch_set(keys, pages_of(pool, h, 8))
        got = b.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
        for i, p in enumerate(got):
            if p is None:
                misses += 1
            else:
                assert torch.equal(p, want[i])
                loads += 1
        b.batch_exists(keys)
    print(f"injector: {loads} loads, {misses} misses, {b.kvtq_l3_rejected_pages} rejected")
    assert loads > 0 and misses > 0
    assert b.kvtq_l3_rejected_pages == 0  # injected failures are misses, not bad pages
