"""The L3 page check (key, model, layout, CRC32C) of one storage batch, with and without a busy thread.

Inside a server the check runs on SGLang's prefetch thread while the scheduler's main thread spins on
the GIL; every CRC32C call releases the GIL and has to win it back. This times
`PageLayout.first_bad_page` over one batch of sealed pages (Qwen2.5-7B shape, page 64, default KV4:
128 pages, 130 MB, SGLang's STORAGE_BATCH_SIZE): one thread page by page (the first check),
`page_crcs` on the crc32c package (up to 4 threads), and, where the kernel wheel loads (GPU hosts),
`page_crcs` on the kernel's batch operator (one call, GIL released); all of them again beside a
pure-Python busy thread that stands in for the scheduler. Prints a table (median [min, max] of
--reps) and writes JSON.

    .venv/bin/python benchmark/bench_page_check.py --out docs/results/bench_page_check.json [--cpu-build]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import threading
import time
from typing import Any

from kvtuner_hicache import page_format
from kvtuner_hicache.config import KVShape, QuantConfig
from kvtuner_hicache.page_format import (
    HEADER_CRC_OFFSET,
    PageLayout,
    key_digest,
    model_digest,
    page_crc,
)


def sealed_pages(lay: PageLayout, n: int) -> tuple[list[bytearray], list[bytes], bytes]:
    model = model_digest("bench/model|tp0/1")
    keys = [key_digest(f"k{i}") for i in range(n)]
    pages = []
    for key in keys:
        raw = bytearray(os.urandom(lay.page_bytes))
        raw[:HEADER_CRC_OFFSET] = lay.header(model=model, key=key)[:HEADER_CRC_OFFSET]
        struct.pack_into("<I", raw, HEADER_CRC_OFFSET, page_crc(raw))
        pages.append(raw)
    return pages, keys, model


def one_thread(lay: PageLayout, pages: list[Any], keys: list[bytes], model: bytes) -> Any:
    """The check as it was before page_crcs: headers and CRCs page by page on the calling thread."""
    for i, (p, k) in enumerate(zip(pages, keys, strict=True)):
        reason = lay.check_page(p, model=model, key=k)
        if reason:
            return i, reason
    return None


def cpu_build_of_the_crc_operator() -> Any:
    """Build sgl-kernel/csrc/kvtq_crc.cpp alone for this CPU (torch.utils.cpp_extension: g++ and ninja), so
    that a machine without the CUDA kernel wheel can time the same operator. Benchmarks only: serving
    never compiles. Returns a batch CRC with native.page_crcs' contract."""
    import tempfile
    from pathlib import Path

    import torch
    from torch.utils import cpp_extension

    src = Path(__file__).resolve().parents[1] / "sgl-kernel" / "csrc" / "kvtq_crc.cpp"
    build = Path(tempfile.gettempdir()) / "kvtq_crc_cpu_build"
    build.mkdir(exist_ok=True)
    cpp_extension.load(name="kvtq_crc_cpu", sources=[str(src)], build_directory=str(build),
                       extra_cflags=["-O3", "-std=c++20", "-fvisibility=hidden"], is_python_module=False)
    from kvtuner_hicache.quant import native

    return lambda pages: native.page_crcs(pages, torch.ops.kvtq)


def batch_crcs(cpu_build: bool = False) -> list[tuple[str, Any]]:
    """(row label, batch CRC for page_format.set_batch_crc): the crc32c package, and the kernel wheel's
    operator when the kernels load here (else, with `cpu_build`, a CPU build of its source)."""
    from kvtuner_hicache.quant import native

    out: list[tuple[str, Any]] = [("first_bad_page, crc32c package", None)]
    if native.available() and native.ops().crc32c_hardware():
        out.append(("first_bad_page, kvtq page_crcs", native.page_crcs))
    elif cpu_build:
        out.append(("first_bad_page, kvtq page_crcs (cpu build)", cpu_build_of_the_crc_operator()))
    return out


def timed(fn: Any, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        assert fn() is None
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="")
    ap.add_argument("--cpu-build", action="store_true",
                    help="without the kernel wheel: build kvtq_crc.cpp for this CPU and time it too")
    a = ap.parse_args(argv)
    lay = PageLayout(QuantConfig(), KVShape.mha(28, 4, 128), 64)
    pages, keys, model = sealed_pages(lay, a.pages)
    views = [memoryview(p) for p in pages]
    mb = a.pages * lay.page_bytes / 1e6
    rows = []
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    checks = [("one thread, page by page", None, lambda: one_thread(lay, views, keys, model))]
    checks += [(name, crc, lambda: lay.first_bad_page(views, keys, model)) for name, crc in batch_crcs(a.cpu_build)]
    for busy in (False, True):
        spinner = threading.Thread(target=spin, daemon=True) if busy else None
        if spinner:
            spinner.start()
        for name, crc, fn in checks:
            page_format.set_batch_crc(crc)
            ts = timed(fn, a.reps)
            med = statistics.median(ts)
            rows.append({"busy_thread": busy, "check": name, "pages": a.pages, "mb": mb, "median_s": med,
                         "min_s": min(ts), "max_s": max(ts), "gb_per_s": mb / 1e3 / med})
        if spinner:
            stop.set()
            spinner.join()
    page_format.set_batch_crc(None)  # the package again, as on a host without the kernel wheel
    print(f"{a.pages} pages of {lay.page_bytes} B ({mb:.0f} MB), {os.cpu_count()} CPUs")
    print(f"{'busy thread':11} {'check':32} {'ms median [min, max]':>26} {'GB/s':>6}")
    for r in rows:
        print(f"{str(r['busy_thread']):11} {r['check']:32} {r['median_s'] * 1e3:9.1f} "
              f"[{r['min_s'] * 1e3:.1f}, {r['max_s'] * 1e3:.1f}]{'':4} {r['gb_per_s']:6.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": "benchmark/bench_page_check.py", "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
