"""Host (scheduler-thread) time of the elastic pool's bookkeeping, against the fixed KV4 pool, codec stubbed out.

On the GPU the codec only enqueues kernels, so what an elastic pool adds to SGLang's scheduler thread is its
own Python work: plane admission, offsets, demotion, row hand-backs, metrics. This drives the real pools of
the installed SGLang release (CPU device pool, Qwen2.5-7B depth: 28 layers) with a no-op codec, one
iteration = alloc + backup + 28 per-layer load calls of `--pages` pages, at two host budgets: `roomy` (no
pressure: every page keeps its planes) and `tight` (every backup demotes and hands rows back; the oldest
allocation is freed when the pool is full, as SGLang's eviction would). Median of `--iters` iterations.

    .venv/bin/python benchmark/elastic_host_overhead.py      # -> docs/results/elastic_host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "sglang"))

from kvtuner_hicache.config import QuantConfig  # noqa: E402
from kvtuner_hicache.sglang_ext.elastic_metrics import ElasticMetrics  # noqa: E402
from sglang_pools import mha_device_pool, quant_host_pool  # noqa: E402

PS, LAYERS = 64, 28


class NoCodec:
    """Stands in for the native codec: enqueues nothing, so only the pool's own work is timed."""

    name = "none"

    def backup(self, *a, **k) -> None:
        pass

    def load_layer(self, *a, **k) -> None:
        pass

    def pages_written(self, *a) -> None:
        pass

    def check(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return "none"


def run(arm: str, budget: str, pages: int, iters: int) -> dict:
    dev = mha_device_pool(LAYERS, 1, 64, PS, tokens=(pages + 8) * PS)
    cfg = QuantConfig(elastic=arm == "elastic")
    pool = quant_host_pool(dev, cfg, host_size={"roomy": 0.4, "tight": 0.05}[budget])
    pool.codec = NoCodec()
    if arm == "elastic":
        pool.metrics = ElasticMetrics(0)  # as with SGLang's --enable-metrics
    rows = torch.arange(pages * PS)
    held: deque = deque()
    t_alloc, t_backup, t_load = [], [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        h = pool.alloc(pages * PS)
        while h is None:  # full at the floor: SGLang would evict
            pool.free(held.popleft())
            t0 = time.perf_counter()
            h = pool.alloc(pages * PS)
        held.append(h)
        t1 = time.perf_counter()
        pool.backup_from_device_all_layer(dev, h, rows, "kernel")
        t2 = time.perf_counter()
        for layer in range(LAYERS):
            pool.load_to_device_per_layer(dev, h, rows, layer, "kernel")
        t3 = time.perf_counter()
        t_alloc.append(t1 - t0)
        t_backup.append(t2 - t1)
        t_load.append(t3 - t2)
    rec = {"arm": arm, "budget": budget, "pages": pages, "iters": iters, "pool_pages": pool.page_num,
           "alloc_ms": statistics.median(t_alloc) * 1e3, "backup_ms": statistics.median(t_backup) * 1e3,
           "load_ms": statistics.median(t_load) * 1e3}
    if arm == "elastic":
        rec["elastic_stats"] = pool.elastic_stats()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=40)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "elastic_host_overhead.json"))
    a = ap.parse_args()
    recs = [run(arm, budget, a.pages, a.iters) for budget in ("roomy", "tight") for arm in ("kv4", "elastic")]
    print("| budget | arm | pool pages | alloc ms | backup ms | 28 load calls ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in recs:
        print(f"| {r['budget']} | {r['arm']} | {r['pool_pages']} | {r['alloc_ms']:.3f} | {r['backup_ms']:.3f} | "
              f"{r['load_ms']:.3f} |")
    out = {"command": "python benchmark/elastic_host_overhead.py " + " ".join(sys.argv[1:]), "records": recs}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
