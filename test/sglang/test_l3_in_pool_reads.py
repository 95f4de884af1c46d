"""L3 reads into the quantized host pool (`l3_read.InPoolReader`) through SGLang's real controller.

On the installed release (CI: 0.5.23, 0.5.17 and every release between): the plugin's
attach_storage_backend hook gives a quantized pool's controller our reader and leaves SGLang's
reader to bf16 pools and to `KVTQ_L3_IN_POOL_READS=0`; pages written to SGLang's HiCacheFile by the
backup thread come back through the prefetch thread bit for bit; a damaged page is a miss with the
pages after it; a terminated prefetch writes nothing into the pool; the per-stage profiler times
the same path (`l3_profile`).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest
import torch
from kvtuner_hicache.sglang_ext import l3_profile
from kvtuner_hicache.sglang_ext.l3_read import ENV_IN_POOL_READS, InPoolReader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "l3"))
import harness as H  # noqa: E402  (test/l3/harness.py: a real HiCacheController on CPU)

pytestmark = pytest.mark.sglang


@pytest.fixture
def file_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(tmp_path))
    return tmp_path


def _flip(path: pathlib.Path, mask: int) -> None:
    """Damage a stored object: flip bits in the middle of its file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= mask
    path.write_bytes(bytes(data))


def _rig(cfg, **kw):
    rig = H.make_rig("file", {}, cfg, **kw)
    return rig


def _stored_then_dropped(rig, n: int, seed: int):
    """Back up n pages to L3, note what they hold and load to, then drop the host copy."""
    toks = H.tokens_for(n, seed=seed)
    h, done = H.backup(rig, toks, list(range(1, n + 1)))
    assert done == n * H.PAGE
    stored = H.page_snapshot(rig, h)
    rows = H.load_rows(rig, h, list(range(8, 8 + n)))
    rig.host.free(h)
    rig.host.kv_buffer.zero_()  # the host copy is really gone
    return toks, stored, rows


def test_reader_installed_for_our_pools_only(kvtq_hooks, file_dir, monkeypatch):
    ours = _rig(H.KV4)
    plain = _rig(None)
    try:
        assert isinstance(ours.cc.page_get_func, InPoolReader)
        assert plain.cc.page_get_func.__func__ is type(plain.cc)._generic_page_get  # bf16: SGLang's reader
    finally:
        ours.close()
        plain.close()
    monkeypatch.setenv(ENV_IN_POOL_READS, "0")
    kept = _rig(H.KV4)
    try:
        assert kept.cc.page_get_func.__func__ is type(kept.cc)._generic_page_get
    finally:
        kept.close()


@pytest.mark.parametrize("reader", ["in_pool", "sglang"])
def test_l3_round_trip_is_bit_exact(kvtq_hooks, file_dir, monkeypatch, reader):
    """Both readers give the same host pages and the same device rows as the original host copy."""
    if reader == "sglang":
        monkeypatch.setenv(ENV_IN_POOL_READS, "0")
    rig = _rig(H.KV4)
    try:
        n = 5
        toks, stored, rows = _stored_then_dropped(rig, n, seed=3)
        h2, hits, got = H.prefetch(rig, toks)
        assert (hits, got) == (n * H.PAGE, n * H.PAGE)
        assert H.page_snapshot(rig, h2) == stored
        after = H.load_rows(rig, h2, list(range(8, 8 + n)))
        assert all(torch.equal(a, b) for a, b in zip(rows, after, strict=True))
    finally:
        rig.close()


def test_damaged_page_is_a_miss_with_the_pages_after_it(kvtq_hooks, file_dir):
    rig = _rig(H.KV4)
    try:
        n = 5
        toks, stored, _ = _stored_then_dropped(rig, n, seed=4)
        files = sorted(file_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        assert len(files) == n
        key = H.get_hash_str(toks, None, page_size=H.PAGE)[2]
        (bad,) = [p for p in files if p.name.startswith(key)]
        _flip(bad, 0x10)
        h2, hits, got = H.prefetch(rig, toks)
        assert hits == n * H.PAGE and got == 2 * H.PAGE  # the exists check passes, the read does not
        assert H.page_snapshot(rig, h2[: 2 * H.PAGE]) == stored[:2]
        assert rig.backend.kvtq_l3_rejected_pages == 1
    finally:
        rig.close()


def test_terminated_prefetch_writes_nothing_into_the_pool(kvtq_hooks, file_dir):
    """A read that returns after the scheduler terminated the prefetch leaves the slots untouched."""
    rig = _rig(H.KV4)
    try:
        toks, _, _ = _stored_then_dropped(rig, 3, seed=5)
        reader = rig.cc.page_get_func
        assert isinstance(reader, InPoolReader)
        h = rig.host.alloc(3 * H.PAGE)
        rig.host.kv_buffer.fill_(0x5A)
        before = H.page_snapshot(rig, h)

        class Terminated:
            request_id = "r"

            def is_terminated(self) -> bool:
                return True

            def increment(self, tokens: int) -> bool:
                raise AssertionError("nothing may be counted for a terminated prefetch")

        keys = H.get_hash_str(toks, None, page_size=H.PAGE)
        assert reader(Terminated(), keys, h) in (0, None)
        assert H.page_snapshot(rig, h) == before
    finally:
        rig.close()


def test_profiler_times_the_stages_of_both_pools(kvtq_hooks, file_dir, tmp_path, monkeypatch):
    prefix = str(tmp_path / "prof")
    monkeypatch.setenv(l3_profile.ENV_PROFILE, prefix)
    for cfg in (H.KV4, None):
        rig = _rig(cfg, model=f"m-{cfg is None}")
        try:
            before = l3_profile.read_totals(prefix)
            toks, _, _ = _stored_then_dropped(rig, 4, seed=6)
            assert H.prefetch(rig, toks)[2] == 4 * H.PAGE
            deadline = time.monotonic() + 5
            while True:  # the writer thread flushes every 0.2 s
                d = l3_profile.subtract(l3_profile.read_totals(prefix), before)
                if d.get("page_get", {}).get("pages", 0) >= 4 and d.get("backend_write", {}).get("pages", 0) >= 4:
                    break
                assert time.monotonic() < deadline, d
                time.sleep(0.05)
            assert d["backend_read"]["pages"] == 4 and d["copy_in"]["pages"] == 4
            assert d["hit_query"]["calls"] >= 1 and d["transfer"]["calls"] == 1
            assert ("verify" in d) == (cfg is not None)  # only our proxy checks pages
            assert ("alloc_page" in d) == (cfg is None)  # SGLang's reader allocates a page per key
            assert all(v["s"] >= 0 for v in d.values())
        finally:
            rig.close()
    assert len(list(tmp_path.glob("prof.*.json"))) == 1 and os.getpid() > 0


def test_write_pages_puts_each_row_at_its_page_whatever_the_order(kvtq_hooks, file_dir):
    """Runs of consecutive ids become one slice copy each; scattered and reversed ids still land right."""
    rig = _rig(H.KV4)
    try:
        pool = rig.host
        n_pages = pool.pages.shape[0]
        ids = [3, 4, 5, 9, 2, 11, 10, 0]
        assert max(ids) < n_pages
        rows = torch.randint(0, 256, (len(ids), pool.page_layout.page_bytes), dtype=torch.uint8)
        pool.pages.zero_()
        pool.kvtq_write_pages(ids, rows)
        for i, p in enumerate(ids):
            assert torch.equal(pool.pages[p], rows[i]), p
        untouched = sorted(set(range(n_pages)) - set(ids))
        assert not pool.pages[untouched].any()
    finally:
        rig.close()


EL = H.QuantConfig(elastic=True)


def _plane_files(file_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in file_dir.iterdir() if ".r0-" in p.name or ".r1-" in p.name)


class _Live:
    """A prefetch operation that is never terminated (for calling the reader directly)."""

    request_id = "r"

    def is_terminated(self) -> bool:
        return False

    def increment(self, tokens: int) -> bool:
        return True


def _bits(rig, h, n: int) -> list[str]:
    """Code bits per element of the n host pages at `h` (the elastic pool's labels)."""
    return [rig.host.bits_label(int(h[i * H.PAGE]) // H.PAGE) for i in range(n)]


def test_elastic_pages_come_back_from_l3_at_the_precision_they_were_written(kvtq_hooks, file_dir):
    """An elastic page is written to L3 as its floor page plus its plane objects; the prefetch reads both,
    the page enters L2 with its planes and loads the same top-precision rows as before, bit for bit."""
    rig = _rig(EL)
    try:
        n = 4
        toks, stored, rows = _stored_then_dropped(rig, n, seed=6)
        assert len(_plane_files(file_dir)) == 2 * n and rig.backend.kvtq_l3_planes_written == 2 * n
        h2, hits, got = H.prefetch(rig, toks)
        assert (hits, got) == (n * H.PAGE, n * H.PAGE)
        assert H.page_snapshot(rig, h2) == stored  # the floor pages
        assert rig.backend.kvtq_reader.drain(30)  # the planes are read after the prefetch handed over
        assert set(_bits(rig, h2, n)) == {"8"}
        after = H.load_rows(rig, h2, list(range(8, 8 + n)))
        assert all(torch.equal(a, b) for a, b in zip(rows, after, strict=True))
        assert rig.backend.kvtq_l3_planes_read == 2 * n
    finally:
        rig.close()


def test_a_damaged_plane_object_leaves_only_its_page_at_the_floor(kvtq_hooks, file_dir):
    rig = _rig(EL)
    try:
        n = 3
        toks, stored, rows = _stored_then_dropped(rig, n, seed=7)
        key = H.get_hash_str(toks, None, page_size=H.PAGE)[1]
        (bad,) = [p for p in _plane_files(file_dir) if p.name.startswith(f"{key}.r1-")]
        _flip(bad, 0x01)
        h2, hits, got = H.prefetch(rig, toks)
        assert got == n * H.PAGE and H.page_snapshot(rig, h2) == stored  # floor pages are all fine
        assert rig.backend.kvtq_reader.drain(30)
        assert _bits(rig, h2, n) == ["8", "6", "8"]  # page 1 lost its value plane, nothing else
        assert rig.backend.kvtq_l3_rejected_planes == 1 and rig.backend.kvtq_l3_rejected_pages == 0
        assert not bad.exists()  # removed: the next write of that prefix can store it again
        after = H.load_rows(rig, h2, list(range(8, 8 + n)))
        assert all(torch.equal(a[:H.PAGE], b[:H.PAGE]) for a, b in zip(rows, after, strict=True))  # page 0: top
    finally:
        rig.close()


def test_planes_off_writes_and_reads_floor_pages_only(kvtq_hooks, file_dir, monkeypatch):
    from kvtuner_hicache.sglang_ext.storage import ENV_L3_PLANES

    monkeypatch.setenv(ENV_L3_PLANES, "0")
    rig = _rig(EL)
    try:
        toks, stored, _ = _stored_then_dropped(rig, 2, seed=8)
        assert not _plane_files(file_dir)
        h2, _, got = H.prefetch(rig, toks)
        assert got == 2 * H.PAGE and H.page_snapshot(rig, h2) == stored
        assert set(_bits(rig, h2, 2)) == {"4"}
    finally:
        rig.close()


def test_planes_of_a_page_freed_during_the_read_are_not_admitted(kvtq_hooks, file_dir):
    rig = _rig(EL)
    try:
        n = 2
        toks, _, _ = _stored_then_dropped(rig, n, seed=9)
        reader = rig.cc.page_get_func
        h = rig.host.alloc(n * H.PAGE)
        keys = H.get_hash_str(toks, None, page_size=H.PAGE)
        pool = rig.host
        real_write = pool.kvtq_write_pages

        def write_then_free(ids, rows):  # the scheduler frees the pages while the planes are still being read
            real_write(ids, rows)
            pool.free(h)

        pool.kvtq_write_pages = write_then_free
        reader(_Live(), keys, h)
        assert reader.drain(30)
        assert pool.planes.planes == 0 and rig.backend.kvtq_l3_planes_read == 2 * n
    finally:
        rig.close()


def test_the_prefetch_hands_over_floor_pages_before_the_planes_are_read(kvtq_hooks, file_dir):
    """The plane objects are read on the reader's own thread after the call returned: a prefetch waits for
    the floor pages only; the planes land once read; beyond MAX_PENDING_PLANE_BATCHES a batch stays at its floor."""
    import threading

    from kvtuner_hicache.sglang_ext import l3_read

    rig = _rig(EL)
    try:
        n = 2
        toks, stored, _ = _stored_then_dropped(rig, n, seed=10)
        proxy, reader, pool = rig.backend, rig.cc.page_get_func, rig.host
        assert isinstance(reader, InPoolReader) and reader is proxy.kvtq_reader and reader.planes_after_prefetch
        gate = threading.Event()
        real_get = proxy.kvtq_get_planes

        def slow_get(*a, **kw):
            assert gate.wait(30)
            return real_get(*a, **kw)

        proxy.kvtq_get_planes = slow_get
        keys = H.get_hash_str(toks, None, page_size=H.PAGE)
        h = pool.alloc(n * H.PAGE)
        got = reader(_Live(), keys, h)
        assert got in (None, n)  # returned while the plane read is blocked
        assert _bits(rig, h, n) == ["4", "4"] and H.page_snapshot(rig, h) == stored
        for _ in range(l3_read.MAX_PENDING_PLANE_BATCHES):  # one queued already: the last one is skipped
            reader(_Live(), keys[:1], pool.alloc(H.PAGE))
        assert reader.planes_skipped == 1
        gate.set()
        assert reader.drain(30)
        assert _bits(rig, h, n) == ["8", "8"]
    finally:
        rig.close()


def test_sync_mode_reads_the_planes_inside_the_prefetch(kvtq_hooks, file_dir, monkeypatch):
    from kvtuner_hicache.sglang_ext.storage import ENV_L3_PLANES

    monkeypatch.setenv(ENV_L3_PLANES, "sync")
    rig = _rig(EL)
    try:
        n = 2
        toks, stored, _ = _stored_then_dropped(rig, n, seed=11)
        reader = rig.cc.page_get_func
        assert not reader.planes_after_prefetch
        h = rig.host.alloc(n * H.PAGE)
        reader(_Live(), H.get_hash_str(toks, None, page_size=H.PAGE), h)
        assert _bits(rig, h, n) == ["8", "8"] and reader._plane_worker is None  # no drain needed
    finally:
        rig.close()
