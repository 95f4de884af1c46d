"""Real SGLang servers on this CPU machine, one arm at a time: host hits, the precision they are served at,
and greedy outputs against recompute, for fixed KV8 / KV4 and the elastic pool at one host byte budget (`--hicache-ratio`, a ratio of the device pool's bytes).

Each arm is a fresh server (`scripts/cpu/serve.sh`, smollm2-135m, fp16 KV on CPU, a 2048-token device pool
so prefixes must come back from the host), driven sequentially by token ids (`/generate`, greedy,
`ignore_eos`, 8 new tokens), then its /metrics are read: SGLang's own `prefill_effective_tokens_total`
(device / host hit tokens) and, for the elastic arm, `sglang:kvtq_elastic_hit_tokens_total{bits}`. The
`none` arm (no HiCache) recomputes every evicted prefix: it is the reference for output agreement.
Inputs never include generated tokens, so every arm sees the same requests.

Patterns (deterministic from --seed):
- sessions: 8 sessions of 320 tokens, round robin, each turn appends 64 tokens (4 turns);
- documents: 12 documents of 320 tokens, Zipf(1.1)-popular, each request adds a 32-token question.

CPU times are printed for orientation only (absolute times come from the GPU machine); the claims are
the counts and the agreement.

    .venv/bin/python benchmark/elastic_cpu_server.py      # ~15 min -> docs/results/elastic_cpu_server.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cpu_server  # noqa: E402

REPO = cpu_server.REPO
ARMS = {
    "none": [],
    "bf16": ["--enable-hierarchical-cache"],
    "kv8": ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--kvtuner-hicache-nbits-key", "8",
            "--kvtuner-hicache-nbits-value", "8"],
    "kv4": ["--enable-hierarchical-cache", "--enable-kvtuner-hicache"],
    "elastic": ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--kvtuner-hicache-elastic"],
}
_METRIC = re.compile(r'^(sglang:[a-z_:]+)\{([^}]*)\} ([0-9.e+-]+)$')


def trace(pattern: str, seed: int) -> list[list[int]]:
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(1000, 48000) for _ in range(n)]

    if pattern == "sessions":
        sessions = [toks(320) for _ in range(8)]
        out = []
        for _turn in range(4):
            for s in sessions:
                s += toks(64)
                out.append(list(s))
        return out
    if pattern == "documents":
        docs = [toks(320) for _ in range(12)]
        weights = [1 / (i + 1) ** 1.1 for i in range(len(docs))]
        return [docs[rng.choices(range(len(docs)), weights)[0]] + toks(32) for _ in range(36)]
    raise ValueError(pattern)


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def metrics(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode().splitlines():
        m = _METRIC.match(line)
        if m:
            labels = dict(kv.split("=", 1) for kv in m[2].split(",") if "=" in kv)
            key = labels.get("mode", labels.get("bits", "")).strip('"')
            out[(m[1], key)] = float(m[3])
    return out


def start(arm: str, args: argparse.Namespace, log: pathlib.Path) -> subprocess.Popen:
    return cpu_server.start(["--model-path", args.model, "--max-total-tokens", "2048", "--hicache-ratio",
                             str(args.hicache_ratio), "--enable-metrics", "--enable-cache-report",
                             "--skip-tokenizer-init", *ARMS[arm]], args.port, log)


def run_arm(arm: str, pattern: str, args: argparse.Namespace, logs: pathlib.Path) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    requests = trace(pattern, args.seed)
    proc = start(arm, args, logs / f"{pattern}_{arm}.log")
    try:
        before = metrics(url)
        outputs, host, t0 = [], 0, time.time()
        for ids in requests:
            r = _post(f"{url}/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
            outputs.append(r["output_ids"])
            host += (r["meta_info"].get("cached_tokens_details") or {}).get("host", 0)
        wall = time.time() - t0
        after = metrics(url)
    finally:
        cpu_server.stop(proc)

    def delta(name: str, key: str) -> float:
        return after.get((name, key), 0.0) - before.get((name, key), 0.0)

    by_bits = {k: delta(n, k) for (n, k) in after if n == "sglang:kvtq_elastic_hit_tokens_total"}
    return {"pattern": pattern, "arm": arm, "requests": len(outputs), "outputs": outputs, "cpu_wall_s": wall,
            "prompt_tokens": sum(len(x) for x in requests),
            "host_hit_tokens": delta("sglang:prefill_effective_tokens_total", "host_hit"),
            "device_hit_tokens": delta("sglang:prefill_effective_tokens_total", "device_hit"),
            "host_hit_tokens_reported": host,
            "hit_tokens_by_bits": {k: v for k, v in by_bits.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache" / "models" / "smollm2-135m" / "hf"))
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--hicache-ratio", type=float, default=1.0)
    ap.add_argument("--patterns", default="sessions,documents")
    # bf16 is not in the default: SGLang's own host pool pins its memory, which needs CUDA ("Torch not compiled
    # with CUDA enabled" at start-up on this machine); ours keeps plain pages on a CPU device pool
    ap.add_argument("--arms", default="none,kv8,kv4,elastic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "elastic_cpu_server.json"))
    args = ap.parse_args()
    logs = REPO / ".cache" / "elastic_cpu_server"
    logs.mkdir(parents=True, exist_ok=True)
    records = []
    for pattern in args.patterns.split(","):
        for arm in args.arms.split(","):
            rec = run_arm(arm, pattern, args, logs)
            records.append(rec)
            print(f"[{pattern}/{arm}] host-hit {rec['host_hit_tokens']:.0f} tokens in {rec['cpu_wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    print("| pattern | arm | prompt tokens | device-hit tokens | host-hit tokens | host hits by code bits | "
          "greedy outputs = none | CPU s (orientation) |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for rec in records:
        ref = next((r for r in records if r["pattern"] == rec["pattern"] and r["arm"] == "none"), None)
        if ref is not None:
            rec["outputs_equal_none"] = sum(a == b for a, b in zip(rec["outputs"], ref["outputs"], strict=True))
        bits = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(rec["hit_tokens_by_bits"].items(), reverse=True)) or "-"
        print(f"| {rec['pattern']} | {rec['arm']} | {rec['prompt_tokens']} | {rec['device_hit_tokens']:.0f} | "
              f"{rec['host_hit_tokens']:.0f} | {bits} | {rec.get('outputs_equal_none', '-')}/{rec['requests']} | "
              f"{rec['cpu_wall_s']:.0f} |")
    meta = {"command": "python benchmark/elastic_cpu_server.py " + " ".join(sys.argv[1:]), "args": vars(args),
            "device_pool_tokens": 2048, "note": "real SGLang servers on CPU (scripts/cpu/serve.sh); counts from "
            "/metrics and meta_info; times are CPU orientation only"}
    pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
