"""Host hits and the precision they are served at: elastic against fixed KV8 and KV4 at one host byte budget.

A trace-driven run of the real host pools (SGLang's classes, our pools, CPU, reference codec): every
request is a prefix of pages; the longest prefix present in L2 is a host hit (loaded through
`load_to_device_per_layer`, layer 0 only: the load is what touches a page and counts its precision);
the rest is backed up through `backup_from_device_all_layer`; when `alloc` says the pool is full, the
least recently used page is evicted the way HiRadixCache evicts host leaves (a request touches its
pages deepest first, so parents outlive their children). No model, no GPU: this measures the pools'
policies (capacity, demotion order, hit precision), not time. TTFT needs the GPU server benchmark.

Patterns (all deterministic from --seed):
- `sessions`: 6 multi-turn sessions visited round robin, each turn re-reads its session (10 pages, one
  more every 5 turns);
- `documents`: Zipf(1.1)-popular documents of D pages each, read whole;
- `mixed`: a shared system prompt of 4 pages followed by a Zipf-popular document, then a unique tail.

    .venv/bin/python benchmark/elastic_capacity.py            # -> docs/results/elastic_capacity.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time
import zlib
from collections import Counter, OrderedDict

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "python"), str(REPO / "test" / "sglang")]

from kvtuner_hicache.config import QuantConfig  # noqa: E402
from sglang_pools import mha_device_pool, quant_host_pool  # noqa: E402

PS = 64


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def trace(pattern: str, requests: int, seed: int) -> list[list[tuple]]:
    """Requests as lists of page keys (a key names a page's content: same key, same KV)."""
    rng = random.Random(seed)
    out = []
    if pattern == "sessions":
        for i in range(requests):
            s, turn = i % 6, i // 6
            out.append([("sess", s, j) for j in range(10 + turn // 5)])
    elif pattern == "documents":
        for _ in range(requests):
            d = _zipf(rng, 40)
            out.append([("doc", d, j) for j in range(6)])
    elif pattern == "mixed":
        for i in range(requests):
            d = _zipf(rng, 30)
            out.append([("sys", j) for j in range(4)] + [("doc", d, j) for j in range(4)] + [("u", i)])
    else:
        raise ValueError(pattern)
    return out


class Arm:
    """One host pool plus the radix-like LRU of the pages it holds."""

    def __init__(self, name: str, cfg: QuantConfig, dev, host_gb: float):
        self.name, self.dev = name, dev
        self.pool = quant_host_pool(dev, cfg, host_size=host_gb)
        self.where: OrderedDict[tuple, int] = OrderedDict()  # page key -> host page id, LRU first
        self.hit_tokens = self.prompt_tokens = 0
        self.by_bits: Counter[str] = Counter()
        # K and V heads have one size here, so a fixed page's mean code bits is the mean of its two flags
        self.fixed_bits = None if cfg.elastic else f"{(cfg.nbits_key + cfg.nbits_value) / 2:g}"

    def _rows_for(self, key: tuple) -> torch.Tensor:
        # device rows holding this page's KV: content is a function of the key (pages of the device pool)
        base = (zlib.crc32(repr(key).encode()) % (self.dev.size // PS - 1)) * PS  # stable across runs
        return torch.arange(base, base + PS)

    def _alloc_page(self, protect: set) -> torch.Tensor:
        while True:
            h = self.pool.alloc(PS)
            if h is not None:
                return h
            victim = next((k for k in self.where if k not in protect), None)
            assert victim is not None, "host pool smaller than one request"
            pid = self.where.pop(victim)
            self.pool.free(torch.arange(pid * PS, (pid + 1) * PS))

    def request(self, keys: list[tuple]) -> None:
        self.prompt_tokens += len(keys) * PS
        hit = 0
        while hit < len(keys) and keys[hit] in self.where:
            hit += 1
        if hit:
            pids = [self.where[k] for k in keys[:hit]]
            h = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in pids])
            dst = torch.arange(0, hit * PS) % self.dev.size
            if self.fixed_bits is None:
                before = Counter(self.pool.served_tokens_by_bits)
                self.pool.load_to_device_per_layer(self.dev, h, dst, 0, "kernel")
                self.by_bits.update(Counter(self.pool.served_tokens_by_bits) - before)
            else:
                self.pool.load_to_device_per_layer(self.dev, h, dst, 0, "kernel")
                self.by_bits[self.fixed_bits] += hit * PS
            self.hit_tokens += hit * PS
        protect = set(keys)
        for k in keys[hit:]:
            h = self._alloc_page(protect)
            self.pool.backup_from_device_all_layer(self.dev, h, self._rows_for(k), "kernel")
            self.where[k] = int(h[0]) // PS
        for k in reversed(keys):  # deepest first: a parent is always more recent than its children
            self.where.move_to_end(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--host-mb", type=float, default=12.0, help="host budget per arm (same bytes for every arm)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "elastic_capacity.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = mha_device_pool(args.layers, 2, 128, PS, tokens=64 * PS, seed=args.seed)
    arms = {"kv8": QuantConfig(nbits_key=8, nbits_value=8), "kv4": QuantConfig(),
            "elastic": QuantConfig(elastic=True)}
    records = []
    t0 = time.time()
    for pattern in ("sessions", "documents", "mixed"):
        reqs = trace(pattern, args.requests, args.seed)
        for name, cfg in arms.items():
            arm = Arm(name, cfg, dev, args.host_mb / 1e3)
            for r in reqs:
                arm.request(r)
            rec = {"pattern": pattern, "arm": name, "host_budget_mb": args.host_mb, "pool_pages": arm.pool.page_num,
                   "prompt_tokens": arm.prompt_tokens, "host_hit_tokens": arm.hit_tokens,
                   "hit_rate": arm.hit_tokens / arm.prompt_tokens, "hit_tokens_by_bits": dict(arm.by_bits)}
            if name == "elastic":
                rec["elastic_stats"] = arm.pool.elastic_stats()
            records.append(rec)
    print(f"| pattern | arm | pool pages | host-hit tokens | hit rate | hit tokens by code bits |  ({time.time() - t0:.0f} s)")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in records:
        bits = ", ".join(f"{k}: {v}" for k, v in sorted(r["hit_tokens_by_bits"].items(), reverse=True))
        print(f"| {r['pattern']} | {r['arm']} | {r['pool_pages']} | {r['host_hit_tokens']} | {r['hit_rate']:.3f} | {bits} |")
    meta = {"command": "python benchmark/elastic_capacity.py " + " ".join(sys.argv[1:]), "args": vars(args),
            "device_pool": {"layers": args.layers, "kv_heads": 2, "head_dim": 128, "page_size": PS},
            "note": "counts from the real host pools on CPU; no timing"}
    pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
