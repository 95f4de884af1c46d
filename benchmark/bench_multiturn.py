"""Multi-turn prefix-reuse client for one SGLang server (launched with --skip-tokenizer-init).

Workload (modelled on SGLang's benchmark/hicache/bench_multiturn.py, written from scratch here):
N clients x M rounds. Each round a client appends a new user chunk of random token ids to its history
and sends the whole history by token ids (`/generate` with `input_ids`, streamed, greedy,
`ignore_eos`); the generated ids are appended to the history too. At most P requests are in flight;
clients wait in a FIFO, so every client's prefix is reused after all other clients were served (the
longest reuse distance). With N x M x chunk above the GPU KV pool, prefixes must come back from L2
(host) or L3 (storage).

Per request: TTFT (first streamed chunk), TPOT ((last - first) / (out - 1)), cached_tokens_details
(device / host / storage). /metrics counters are read before and after and reported as deltas.

    python benchmark/bench_multiturn.py --url http://127.0.0.1:30000 --clients 16 --rounds 6 \
        --chunk 576 --output 8 --parallel 4 --out run.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

METRIC_NAMES = (
    "sglang:cached_tokens_total",
    "sglang:load_back_tokens_total",
    "sglang:load_back_duration_seconds_sum",
    "sglang:evicted_tokens_total",
    "sglang:backuped_tokens_total",
    "sglang:prefetched_tokens_total",
    "sglang:kvtq_elastic_hit_tokens_total",  # elastic pools: host-hit tokens per precision (label bits)
    "sglang:hicache_host_total_tokens",
    "sglang:hicache_host_used_tokens",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
)


@dataclass
class Workload:
    clients: int = 16
    rounds: int = 6
    chunk: int = 576
    output: int = 8
    parallel: int = 4
    vocab_lo: int = 1000
    vocab_hi: int = 150000
    seed: int = 0


@dataclass
class ReqRecord:
    client: int
    round: int
    prompt_tokens: int
    ttft_s: float = 0.0
    latency_s: float = 0.0
    tpot_s: float | None = None
    output_tokens: int = 0
    cached: dict[str, int] = field(default_factory=dict)
    error: str | None = None


# ---- HTTP --------------------------------------------------------------------------------------


def wait_ready(url: str, timeout: float, alive: Any = None) -> float:
    """Poll /get_model_info until 200. `alive()` (optional) returning False aborts. Returns seconds waited."""
    t0 = time.time()
    while True:
        try:
            if requests.get(url + "/get_model_info", timeout=5).status_code == 200:
                return time.time() - t0
        except requests.RequestException:
            pass
        if alive is not None and not alive():
            raise RuntimeError("server process died while starting")
        if time.time() - t0 > timeout:
            raise TimeoutError(f"server not ready after {timeout:.0f} s")
        time.sleep(1.0)


def generate(url: str, ids: list[int], max_new: int, timeout: float = 600) -> tuple[ReqRecord, list[int]]:
    """One streamed greedy request; returns its record (client/round filled by the caller) and output ids."""
    rec = ReqRecord(-1, -1, len(ids))
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    t0 = time.perf_counter()
    first = last = None
    out_ids: list[int] = []
    meta: dict[str, Any] = {}
    try:
        with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return rec, []
            for line in r.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                msg = json.loads(payload)
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                ids_now = msg.get("output_ids") or []
                if len(ids_now) >= len(out_ids) and ids_now[: len(out_ids)] == out_ids:
                    out_ids = list(ids_now)  # cumulative chunks (SGLang's default)
                else:
                    out_ids = out_ids + list(ids_now)  # incremental chunks (--stream-output)
                meta = msg.get("meta_info", meta)
    except (requests.RequestException, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return rec, []
    if first is None:
        rec.error = "no streamed chunk"
        return rec, []
    rec.ttft_s = first - t0
    rec.latency_s = last - t0
    rec.output_tokens = int(meta.get("completion_tokens", len(out_ids)))
    if rec.output_tokens > 1:
        rec.tpot_s = (last - first) / (rec.output_tokens - 1)
    det = meta.get("cached_tokens_details") or {}
    rec.cached = {k: int(det.get(k, 0)) for k in ("device", "host", "storage") if isinstance(det.get(k, 0), int)}
    rec.cached["total"] = int(meta.get("cached_tokens", 0))
    return rec, out_ids[:max_new]


_METRIC_RE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>[-+0-9.eEinfNa]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name or name{cache_source=..} or name{bits=..}: value} for METRIC_NAMES (summed over
    other labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line.strip())
        if not m or m["name"] not in METRIC_NAMES:
            continue
        key = m["name"]
        src = re.search(r'(?:cache_source|bits)="([^"]*)"', m["labels"] or "")
        if src:
            key += "{" + src.group(1) + "}"
        out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def scrape(url: str) -> dict[str, float]:
    try:
        return parse_metrics(requests.get(url + "/metrics", timeout=10).text)
    except requests.RequestException:
        return {}


# ---- workload ----------------------------------------------------------------------------------


def warmup(url: str, vocab_hi: int = 150000) -> None:
    """Compile Triton/JIT kernels on the paths the workload uses (prefill, prefix-hit extend, decode), then flush."""
    rng = random.Random(12345)
    a = [rng.randrange(1000, vocab_hi) for _ in range(1024)]
    generate(url, a, 4)
    generate(url, a + [rng.randrange(1000, vocab_hi) for _ in range(128)], 4)
    generate(url, [rng.randrange(1000, vocab_hi) for _ in range(3000)], 4)
    time.sleep(0.5)
    requests.post(url + "/flush_cache", timeout=30)
    time.sleep(0.5)


def run_workload(url: str, w: Workload) -> tuple[list[ReqRecord], float]:
    """Run the multi-turn workload; returns per-request records and the wall time."""
    rngs = [random.Random(w.seed * 100003 + c) for c in range(w.clients)]
    hist: list[list[int]] = [[] for _ in range(w.clients)]
    nxt = [0] * w.clients
    ready: deque[int] = deque(range(w.clients))
    lock = threading.Lock()
    records: list[ReqRecord] = []

    def worker() -> None:
        while True:
            with lock:
                if not ready:
                    return
                c = ready.popleft()
                rnd = nxt[c]
                hist[c] = hist[c] + [rngs[c].randrange(w.vocab_lo, w.vocab_hi) for _ in range(w.chunk)]
                ids = list(hist[c])
            rec, out = generate(url, ids, w.output)
            rec.client, rec.round = c, rnd
            with lock:
                records.append(rec)
                # a failed request still advances the client (its history stays consistent)
                hist[c] = hist[c] + (out if out else [w.vocab_lo] * w.output)
                nxt[c] += 1
                if nxt[c] < w.rounds:
                    ready.append(c)

    # clients join one by one while the pool is full, so FIFO order = round-robin across clients
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(w.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(records: list[ReqRecord], wall: float, m0: dict[str, float], m1: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    hits = {k: sum(r.cached.get(k, 0) for r in ok) for k in ("device", "host", "storage", "total")}
    delta = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in set(m0) | set(m1)}
    for k in ("sglang:hicache_host_total_tokens", "sglang:hicache_host_used_tokens"):
        if k in m1:
            delta[k] = m1[k]  # gauges: the value at the end
    late = [r.ttft_s for r in ok if r.round >= 3]
    # TTFT by where the request's prefix came from (a request with any storage hit counts as "storage")
    by_src = {"storage": [r.ttft_s for r in ok if r.cached.get("storage", 0) > 0],
              "host": [r.ttft_s for r in ok if r.cached.get("host", 0) > 0 and r.cached.get("storage", 0) == 0]}
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "first_error": next((r.error for r in records if r.error), None),
        "wall_s": wall, "prompt_tokens": prompt, "output_tokens": out_tok,
        "device_hit_tokens": hits["device"], "host_hit_tokens": hits["host"], "storage_hit_tokens": hits["storage"],
        "cached_tokens": hits["total"], "hit_rate": hits["total"] / prompt if prompt else 0.0,
        "host_hit_rate": hits["host"] / prompt if prompt else 0.0,
        "storage_hit_rate": hits["storage"] / prompt if prompt else 0.0,
        "computed_prompt_tokens": prompt - hits["total"],
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p90_s": _pct(ttft, 0.9), "ttft_p99_s": _pct(ttft, 0.99),
        "ttft_mean_round3plus_s": statistics.fmean(late) if late else None,
        "storage_hit_requests": len(by_src["storage"]),
        "ttft_mean_storage_hit_s": statistics.fmean(by_src["storage"]) if by_src["storage"] else None,
        "host_hit_requests": len(by_src["host"]),
        "ttft_mean_host_hit_s": statistics.fmean(by_src["host"]) if by_src["host"] else None,
        "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "throughput_tok_s": (prompt + out_tok) / wall if wall > 0 else None,
        "output_tok_s": out_tok / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "metrics_delta": delta,
    }


def per_round(records: list[ReqRecord]) -> list[dict[str, Any]]:
    out = []
    for rnd in sorted({r.round for r in records}):
        rs = [r for r in records if r.round == rnd and r.error is None]
        p = sum(r.prompt_tokens for r in rs)
        out.append({"round": rnd, "n": len(rs), "ttft_mean_s": statistics.fmean([r.ttft_s for r in rs]) if rs else None,
                    "hit_rate": sum(r.cached.get("total", 0) for r in rs) / p if p else 0.0,
                    "host": sum(r.cached.get("host", 0) for r in rs), "storage": sum(r.cached.get("storage", 0) for r in rs)})
    return out


def bench(url: str, w: Workload, do_warmup: bool = True, on_armed: Any = None) -> dict[str, Any]:
    """Warm up (+ flush), then the timed workload; `on_armed()` runs between the two (capture arming)."""
    if do_warmup:
        warmup(url, w.vocab_hi)
    if on_armed is not None:
        on_armed()
    m0 = scrape(url)
    records, wall = run_workload(url, w)
    time.sleep(1.0)  # let the last write-through backups land before reading counters
    m1 = scrape(url)
    res = summarize(records, wall, m0, m1)
    res["per_round"] = per_round(records)
    res["workload"] = asdict(w)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="multi-turn prefix-reuse benchmark client")
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=576)
    ap.add_argument("--output", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--wait", type=float, default=0, help="wait this long for the server first")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.wait:
        wait_ready(a.url, a.wait)
    w = Workload(a.clients, a.rounds, a.chunk, a.output, a.parallel, seed=a.seed)
    res = bench(a.url, w, do_warmup=not a.no_warmup)
    print(json.dumps({k: v for k, v in res.items() if k not in ("metrics_delta", "per_round")}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
