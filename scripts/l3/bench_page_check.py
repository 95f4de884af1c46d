"""Throughput of the L3 page checks (seal on write, first_bad_page on read) on this machine.

    .venv/bin/python scripts/l3/bench_page_check.py [--pages 64] [--rounds 20]

Qwen2.5-7B shape (28 layers, 4 KV heads x 128, page 64) at the default KV4: 1.04 MB pages. Prints
GB/s per core for raw CRC32C, seal (digests + CRC) and the batched read check, and zlib.crc32
(the format-1 checksum) for comparison. docs/page-format.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib

import numpy as np
from kvtuner_hicache.config import KVShape, QuantConfig
from kvtuner_hicache.page_format import PageLayout, crc32c, key_digest, model_digest


def _rate(fn, nbytes: int, rounds: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return nbytes * rounds / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    lay = PageLayout(QuantConfig(), KVShape.mha(28, 4, 128), 64)
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, size=(a.pages, lay.page_bytes), dtype=np.uint8)
    hdr = np.frombuffer(lay.header(), dtype=np.uint8)
    pages[:, :128] = hdr
    model = model_digest("Qwen/Qwen2.5-7B-Instruct|tp0/1")
    keys = [key_digest(f"{i:064x}") for i in range(a.pages)]
    views = [memoryview(p) for p in pages]
    total = a.pages * lay.page_bytes

    def seal_all():
        for v, k in zip(views, keys, strict=True):
            lay.seal(v, model, k)

    seal_all()
    assert lay.first_bad_page(views, keys, model) is None
    out = {
        "page_bytes": lay.page_bytes, "pages": a.pages,
        "crc32c_GBps": _rate(lambda: [crc32c(v) for v in views], total, a.rounds),
        "seal_GBps": _rate(seal_all, total, a.rounds),
        "check_GBps": _rate(lambda: lay.first_bad_page(views, keys, model), total, a.rounds),
        "zlib_crc32_GBps": _rate(lambda: [zlib.crc32(v) for v in views], total, max(a.rounds // 5, 1)),
    }
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
