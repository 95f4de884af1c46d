"""L3 namespace and page checks through SGLang's real HiCacheFile backend and factory."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from kvtuner_hicache.config import QuantConfig
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang_pools import bf16_host_pool, mha_device_pool, mla_device_pool, quant_host_pool

pytestmark = pytest.mark.sglang
PS = 64


def _storage_config(mla: bool = False) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=True,
                                model_name="org/model")


@pytest.fixture
def file_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(tmp_path))
    return tmp_path


def _backend(pool, name="file", mla=False):
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    b = StorageBackendFactory.create_backend(name, _storage_config(mla), pool)
    b.register_mem_pool_host(pool)
    return b


def _filled_pool(cfg=None, n_pages=3, dev=None):
    dev = dev or mha_device_pool(2, 4, 128, PS, tokens=512)
    pool = quant_host_pool(dev, cfg)
    h = pool.alloc(n_pages * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(PS, (n_pages + 1) * PS), "kernel")
    return pool, h


def _put(backend, pool, h, keys):
    pages = [pool.get_data_page(h[i * PS]) for i in range(len(keys))]
    assert backend.batch_set(keys, pages)


def _get(backend, pool, keys):
    return backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])


def _path(file_dir, key):
    (hit,) = [p for p in os.listdir(file_dir) if p.startswith(key + "-")]
    return file_dir / hit


KEYS = ["aa", "bb", "cc"]


def test_roundtrip_namespaced_with_crc(kvtq_hooks, file_dir):
    pool, h = _filled_pool()
    b = _backend(pool)
    assert type(b).__name__ == "KVTQStorageProxy"
    _put(b, pool, h, KEYS)
    names = sorted(os.listdir(file_dir))
    assert all(f"-{pool.page_layout.tag}_org-model_0_1.bin" in n for n in names), names
    assert b.batch_exists(KEYS, HiCacheStorageExtraInfo(prefix_keys=["root"])) == 3
    got = _get(b, pool, KEYS)
    for i, page in enumerate(got):
        assert torch.equal(page, pool.get_data_page(h[i * PS]))
        assert pool.page_layout.check_page(memoryview(page.numpy())) is None  # CRC filled and valid


def test_bf16_and_quantized_pools_do_not_see_each_other(kvtq_hooks, file_dir):
    dev = mha_device_pool(2, 4, 128, PS, tokens=512)
    q, h = _filled_pool(dev=dev)
    q2, h2 = _filled_pool(QuantConfig(nbits_key=2, nbits_value=2), dev=dev)
    plain = bf16_host_pool(dev)
    bq, bq2, bp = _backend(q), _backend(q2), _backend(plain)
    _put(bq, q, h, KEYS)
    assert bp.batch_exists(KEYS) == 0 and bq2.batch_exists(KEYS) == 0
    hp = plain.alloc(3 * PS)
    assert bp.batch_set(KEYS, [plain.get_data_page(hp[i * PS]) for i in range(3)])
    assert any(n.startswith("aa-bf16_") for n in os.listdir(file_dir))
    assert bq.batch_exists(KEYS) == 3 and bq2.batch_exists(KEYS) == 0
    assert [p is not None for p in _get(bp, plain, KEYS)] == [True] * 3


@pytest.mark.parametrize("damage, reason", [("flip", "checksum"), ("truncate", "read failed"), ("foreign", "another")])
def test_bad_page_is_a_counted_prefix_miss(kvtq_hooks, file_dir, damage, reason, caplog):
    pool, h = _filled_pool()
    b = _backend(pool)
    _put(b, pool, h, KEYS)
    target = _path(file_dir, "bb")
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:  # a page of another config under this key (same size: KV4 keys vs KV4 values, other axis)
        other, oh = _filled_pool(QuantConfig(axis_key=0))
        target.write_bytes(other.get_data_page(oh[0]).numpy().tobytes())
    got = _get(b, pool, KEYS)
    assert got[0] is not None and got[1] is None and got[2] is None
    assert b.kvtq_l3_rejected_pages == 1
    assert reason in caplog.text


def test_bf16_file_under_quantized_key_is_rejected(kvtq_hooks, file_dir):
    """The file backend silently reads a larger file's prefix: the header check catches it."""
    pool, h = _filled_pool()
    b = _backend(pool)
    _put(b, pool, h, KEYS[:1])
    _path(file_dir, "aa").write_bytes(os.urandom(pool.page_layout.page_bytes * 3))
    assert _get(b, pool, KEYS[:1]) == [None]
    assert b.kvtq_l3_rejected_pages == 1


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

    def exists(self, key):
        return f"{key}/0" in self.objs

    def get(self, *a, **k):
        raise NotImplementedError

    def batch_get(self, *a, **k):
        raise NotImplementedError

    def set(self, *a, **k):
        raise NotImplementedError

    def batch_set(self, *a, **k):
        raise NotImplementedError


@pytest.mark.parametrize("mla", [False, True])
def test_zero_copy_path_checks_pages(kvtq_hooks, mla):
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    dev = mla_device_pool(2, PS, tokens=512) if mla else None
    pool, h = _filled_pool(QuantConfig(nbits_key=8) if mla else None, dev=dev)
    inner = _ZeroCopyMem()
    b = KVTQStorageProxy(inner, pool)
    b.register_mem_pool_host(pool)
    assert b.batch_set_v1(KEYS, h) == [True] * 3
    assert all(k.split("/")[0].endswith(pool.page_layout.tag) for k in inner.objs)
    assert len(inner.objs) == 3 * (1 if mla else 2)
    expected = [pool.get_data_page(h[i * PS]).clone() for i in range(3)]
    h2 = pool.alloc(3 * PS)
    assert b.batch_get_v1(KEYS, h2) == [True] * 3
    assert all(torch.equal(pool.get_data_page(h2[i * PS]), expected[i]) for i in range(3))
    # corrupt the first object of the middle page: it and the rest are misses
    k = f"bb-{pool.page_layout.tag}/0"
    inner.objs[k] = inner.objs[k][:200] + bytes([inner.objs[k][200] ^ 1]) + inner.objs[k][201:]
    assert b.batch_get_v1(KEYS, h2) == [True, False, False]
    inner.fail = True
    assert b.batch_get_v1(KEYS, h2) == [False] * 3  # never raises into the prefetch thread
    assert b.kvtq_l3_rejected_pages == 2


def test_proxy_never_raises_into_storage_threads(kvtq_hooks):
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    class Broken(_ZeroCopyMem):
        def batch_exists(self, keys, extra_info=None):
            raise OSError("mount gone")

        def batch_set_v1(self, keys, host_indices, extra_info=None):
            raise OSError("mount gone")

    pool, h = _filled_pool()
    b = KVTQStorageProxy(Broken(), pool)
    assert b.batch_exists(KEYS) == 0
    assert b.batch_set_v1(KEYS, h) == [False] * 3
    assert b.exists("aa") is False
