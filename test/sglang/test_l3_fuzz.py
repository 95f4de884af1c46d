"""Fuzz: random corruptions of stored pages through real SGLang pools, our proxy and SGLang's HiCacheFile.

Each trial damages the file of one page of a stored prefix, reads the whole prefix back and then
backs it up again. Asserted on every trial:
- zero silent loads: every page that loads is bit-equal to the page that was written;
- a damaged page is a counted miss, with every page after it (prefix semantics);
- it heals within one backup: the bad file is removed at once, `batch_exists` stops in front of it,
  and after the next `batch_set` of the prefix the whole prefix loads again.
Damage that leaves the page's own bytes intact (bytes appended after a whole page: HiCacheFile
reads exactly one page) must load correctly instead. Seeds are fixed; counts are printed.
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from collections import Counter

import pytest
import torch
from kvtuner_hicache.config import QuantConfig
from kvtuner_hicache.page_format import HEADER_BYTES
from l3_rig import PS, file_proxy, filled_pool, mha_device_pool, mla_device_pool, page_file, put, quant_pool
from sglang_pools import bf16_host_pool

pytestmark = pytest.mark.sglang
N_KEYS = 24
KINDS = ["header-bitflip", "payload-bitflip", "multi-bitflip", "truncate", "extend", "prepend", "zero-fill",
         "zero-range", "random-range", "swap", "other-config", "other-size-config", "other-shape", "other-model",
         "bf16-page", "v1-page", "empty"]


def _foreign_pages(pool, dev, mla: bool, tmp_path) -> dict[str, bytes]:
    """Pages a shared store could hold under one of our keys: other configs, shapes, models, formats."""
    out: dict[str, bytes] = {}
    cfg = pool.quant_config
    other_cfg = QuantConfig(nbits_key=8, axis_key=0) if mla else QuantConfig(axis_key=0)
    p2, h2 = filled_pool(other_cfg, n_pages=1, dev=dev)
    out["other-config"] = p2.get_data_page(h2[0]).numpy().tobytes()
    p3, h3 = filled_pool(cfg.with_(nbits_value=2), n_pages=1, dev=dev)
    out["other-size-config"] = p3.get_data_page(h3[0]).numpy().tobytes()
    dev4 = mla_device_pool(3, PS, tokens=4 * PS, seed=5) if mla else mha_device_pool(4, 4, 64, PS, tokens=4 * PS, seed=5)
    p4, h4 = filled_pool(cfg, n_pages=1, dev=dev4)
    out["other-shape"] = p4.get_data_page(h4[0]).numpy().tobytes()
    # the same layout, sealed by a server of another model, for the same key
    other = file_proxy(pool, tmp_path / "other-model", model="org/other-model", mla=mla)
    assert put(other, pool, torch.arange(PS), ["k0"])
    out["other-model"] = page_file(tmp_path / "other-model", other, "k0").read_bytes()
    if not mla:
        plain = bf16_host_pool(dev)
        hp = plain.alloc(PS)
        out["bf16-page"] = plain.get_data_page(hp[0]).contiguous().view(torch.uint8).numpy().tobytes()
    return out


def _v1(page: bytes) -> bytes:
    """The same payload with a format-1 header (the previous release's pages)."""
    _magic, _ver, hb, ps, nl, ns, pb, fp = struct.unpack_from("<4sHHIHHQ16s", page, 0)
    head = struct.pack("<4sHHHHHI16sI", b"KVTQ", 1, hb, ps, nl, ns, pb, fp, zlib.crc32(page[HEADER_BYTES:]))
    return head + bytes(HEADER_BYTES - len(head)) + page[HEADER_BYTES:]


def _damage(kind: str, data: bytes, rng: random.Random, files: dict[str, bytes], key: str,
            foreign: dict[str, bytes]) -> bytes | None:
    n = len(data)
    b = bytearray(data)
    if kind == "header-bitflip":
        i = rng.randrange(HEADER_BYTES)
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "payload-bitflip":
        i = rng.randrange(HEADER_BYTES, n)
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "multi-bitflip":
        for _ in range(rng.randint(2, 16)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        return bytes(b[: rng.randrange(n)])
    elif kind == "extend":
        return bytes(b) + os.urandom(rng.randint(1, 4096))
    elif kind == "prepend":
        return os.urandom(rng.randint(1, 256)) + bytes(b)
    elif kind == "zero-fill":
        return bytes(n)
    elif kind == "zero-range":
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 8192))
        b[i:j] = bytes(j - i)
    elif kind == "random-range":
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 8192))
        b[i:j] = rng.randbytes(j - i)
    elif kind == "swap":
        other = rng.choice([k for k in files if k != key])
        return files[other]
    elif kind == "v1-page":
        return _v1(bytes(b))
    elif kind == "empty":
        return b""
    else:
        return foreign.get(kind)
    return bytes(b)


@pytest.mark.parametrize("mla, trials, seed", [(False, 1200, 1234), (True, 400, 99)], ids=["mha", "mla"])
def test_fuzz_no_silent_loads_and_every_bad_page_heals(tmp_path, mla, trials, seed, capsys):
    t0 = time.monotonic()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = QuantConfig(nbits_key=8) if mla else QuantConfig()
    dev = mla_device_pool(2, PS, tokens=(N_KEYS + 2) * PS) if mla else mha_device_pool(4, 2, 64, PS, tokens=(N_KEYS + 2) * PS)
    pool = quant_pool(dev, cfg)
    h = pool.alloc(N_KEYS * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(PS, (N_KEYS + 1) * PS), "kernel")
    keys = [f"{rng.getrandbits(256):064x}" for _ in range(N_KEYS)]
    store = tmp_path / "store"
    b = file_proxy(pool, store, mla=mla)
    assert put(b, pool, h, keys)
    want = [pool.get_data_page(h[i * PS]).numpy().tobytes() for i in range(N_KEYS)]
    targets = [pool.get_dummy_flat_data_page() for _ in keys]  # reused: each read overwrites them
    files = {k: page_file(store, b, k).read_bytes() for k in keys}
    foreign = _foreign_pages(pool, dev, mla, tmp_path)
    kinds = [k for k in KINDS if k not in ("bf16-page",) or not mla]
    counts: Counter[str] = Counter()
    benign: Counter[str] = Counter()
    loads = 0
    for _ in range(trials):
        kind = rng.choice(kinds)
        i = rng.randrange(N_KEYS)
        path = page_file(store, b, keys[i])
        new = _damage(kind, files[keys[i]], rng, files, keys[i], foreign)
        path.write_bytes(new)
        intact = new[: len(files[keys[i]])] == files[keys[i]]
        rejected_before = b.kvtq_l3_rejected_pages
        got = b.batch_get(keys, targets)
        for j, page in enumerate(got):  # zero silent loads
            if page is not None:
                assert page.numpy().tobytes() == want[j], f"{kind}: page {j} loaded with wrong bytes"
                loads += 1
        if intact:
            benign[kind] += 1
            assert all(p is not None for p in got), kind
            continue
        counts[kind] += 1
        assert [p is not None for p in got] == [j < i for j in range(N_KEYS)], kind
        assert b.kvtq_l3_rejected_pages == rejected_before + 1, kind
        assert not path.exists() and b.batch_exists(keys) == i, kind  # removed, lookups stop there
        assert put(b, pool, h, keys)  # the next backup of the prefix ...
        assert path.read_bytes() == files[keys[i]], kind  # ... writes the good page again
        assert b.batch_exists(keys) == N_KEYS and b.bad_keys() == {}, kind
    healed = sum(counts.values())
    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nl3 fuzz ({'mla' if mla else 'mha'}, seed {seed}): {trials} trials in {elapsed:.1f} s, "
              f"{healed} bad pages caught and healed, 0 silent loads, {loads} correct loads, "
              f"{sum(benign.values())} intact ({dict(benign)}); by kind: {dict(sorted(counts.items()))}")
    assert b.kvtq_l3_rejected_pages == healed == b.kvtq_l3_healed_pages
    assert set(counts) | set(benign) == set(kinds), f"kinds never exercised: {set(kinds) - set(counts) - set(benign)}"
    assert set(benign) <= {"extend"}, benign  # only appended bytes leave the page itself intact
    assert elapsed < 60
