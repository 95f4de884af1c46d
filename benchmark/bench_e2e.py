"""End-to-end benchmark that can resolve +-3 %: arms side by side on one GPU, repeats in alternating order.

Runs ON THE GPU MACHINE from the repo root after `scripts/device/run_server.sh setup` (the wrapper
scripts/device/session_bench_e2e.sh does both, one scenario per device call).

Method (why each choice):
- One SGLang server per arm, started strictly one after another (SGLang's start-up memory profile
  fails when several start together), each warmed up (Triton/JIT kernels compiled, cache flushed), then
  every server serves one discarded pass of the first pattern (its own seed): the first trace a fresh
  server served was 3x slower than its later ones (run 8, kv4 sessions 286 ms against 82-102 ms).
  They stay resident, idle, while another arm is measured: nothing starts beside a measurement, and the
  arm order can alternate without restarts (repeat r runs the arms forwards when r is even, backwards
  when odd, so drift of the machine does not favour one arm).
- Decode CUDA graphs on (`--cuda-graph-max-bs-decode 8`; `--cuda-graph-max-bs` before 0.5.23), 48 output tokens per request: TPOT is a steady decode.
- Every repeat and pattern starts from a flushed cache (`/flush_cache`) and uses its own token ids
  (seed = repeat x 1000 + pattern), identical for every arm: no arm meets another repeat's L3 objects.
- Patterns (token ids only, never generated tokens, so every arm gets the same prompts), sized so that
  bf16's GPU + host pool cannot hold the working set while KV4's can (l2), or cannot either (l3):
    chat       12 clients x 4 rounds, each round appends 768 tokens; round-robin over the clients;
    documents  16 documents of 2,048 tokens, Zipf(1.1) popularity, 48 requests of document + 64 tokens;
    sessions   14 sessions of 2,048 tokens revisited in turn, 4 turns of +256 tokens;
    l3hit      (l3 only) 8 documents of 3,072 tokens sent once each (they reach L3 by write-through), the
               cache flushed (L1 and L2 only: SGLang's /flush_cache keeps L3), the same documents sent
               again with other 16-token suffixes: every arm measures L3-hit TTFT on identical
               prompts, one request at a time; then (phase 3, fields `*again*`) the documents once more
               without a flush, newest first (in phase 2's order L2 would evict each one just before its
               turn): host hits where L2 kept them, at the precision they reached since.
  At most 4 requests in flight (FIFO), so a prefix comes back after the others were served.
- Scenarios: l2 = GPU pool 16,384 tokens, 1 GB host (`--hicache-size 1`) for every HiCache arm, no L3,
  arms none (no HiCache: the recompute baseline), bf16 (SGLang's HiCache), kv4 (ours); l3 = GPU pool
  4,096 tokens, `--hicache-ratio 1.2`, `file` backend on local disk, prefetch wait_complete, arms bf16, kv4;
  arm kv4_sglread is kv4 with SGLang's own L3 reader (KVTQ_L3_IN_POOL_READS=0); arm elastic_l3floor is
  elastic with floor pages only in L3 (KVTQ_L3_PLANES=0: no plane objects written or read), arm
  elastic_l3sync reads the plane objects inside the prefetch (KVTQ_L3_PLANES=sync) where elastic reads
  them after the floor pages were handed over.
- In l3, every server times its L3 stages (KVTQ_L3_PROFILE, kvtuner_hicache.sglang_ext.l3_profile):
  each record carries `l3_profile`, the stages' calls, seconds and pages during its phase.
- `--l3-backend mooncake` (scenario l3) swaps the file backend for SGLang's own `mooncake` backend: every
  server gets a `mooncake_master` of its own on loopback (TCP transfer engine, P2P handshake, an 8 GB
  segment in the server process) from the directory in $KVTQ_MOONCAKE_DIR (the unpacked
  `mooncake-transfer-engine-non-cuda` wheel; scripts/device/mooncake_bundle.sh). Records carry
  `l3_backend`. L3 bytes written are then the master's `master_allocated_bytes` growth; bytes read are
  the prefetched tokens x bytes per token (`l3_bytes_read_source`), since a local-segment get makes no
  syscall that /proc could count.

Per record (scenario x pattern x arm x repeat): TTFT mean (all requests, and of requests with an L3 hit),
TPOT mean, prompt / host-hit / storage-hit tokens (SGLang's cached_tokens_details), L3 bytes written
(the backend directory's growth) and read (the bytes the server's processes read through syscalls over
the phase, /proc/<pid>/io). With Mooncake see above. The summary gives mean and spread (min..max over repeats) per arm and the ratio to bf16.

    PYTHONPATH=<site> python3 benchmark/bench_e2e.py --scenario l2 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_multiturn as bm  # noqa: E402
from multiturn_arms import arm_args, gpu_name, parse_server_log  # noqa: E402

OUTPUT_TOKENS = 48
PARALLEL = 4
VOCAB = (1000, 150000)
PATTERNS = ("chat", "documents", "sessions", "l3hit")
SCENARIOS: dict[str, dict[str, Any]] = {
    "l2": {"args": ["--max-total-tokens", "16384"], "hicache": ["--hicache-size", "1"],
           "arms": ("none", "bf16", "kv4"), "patterns": ("chat", "documents", "sessions")},
    "l3": {"args": ["--max-total-tokens", "4096"],
           "hicache": ["--hicache-ratio", "1.2", "--hicache-storage-backend", "file",
                       "--hicache-storage-prefetch-policy", "wait_complete"],
           "arms": ("bf16", "kv4"), "patterns": PATTERNS},
}
# arms that are another arm's flags with a different environment
ARM_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "kv4_sglread": ("kv4", {"KVTQ_L3_IN_POOL_READS": "0"}),  # SGLang's own L3 reader for our pages
    "elastic_l3floor": ("elastic", {"KVTQ_L3_PLANES": "0"}),  # L3 keeps floor pages only (no plane objects)
    "elastic_l3sync": ("elastic", {"KVTQ_L3_PLANES": "sync"}),  # planes read inside the prefetch (run 8's elastic)
}
L3HIT_DOCS, L3HIT_DOC_TOKENS, L3HIT_SUFFIX = 8, 3072, 16
WARMUP_REP = 97  # the discarded warm-up pass: a trace seed no measured repeat uses


def gpu_free_bytes() -> int:
    """Free memory of GPU 0 as the driver reports it (nvidia-smi; 0 when it cannot be read)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return int(out.strip().splitlines()[0]) * 2**20
    except Exception:  # noqa: BLE001 - no nvidia-smi: no check
        return 0


def base_arm(arm: str) -> str:
    """The arm whose server flags `arm` uses (itself unless it is one of ARM_VARIANTS)."""
    return ARM_VARIANTS.get(arm, (arm, {}))[0]


def cuda_graph_bs_flag() -> str:
    """The decode CUDA-graph batch-size flag of the installed release (0.5.23 split it per phase)."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    names = getattr(ServerArgs, "__struct_fields__", None) or [f.name for f in dataclasses.fields(ServerArgs)]
    return "--cuda-graph-max-bs-decode" if "cuda_graph_max_bs_decode" in names else "--cuda-graph-max-bs"


def server_args(model_dir: str, scenario: str, arm: str, stage: str, graph_flag: str = "--cuda-graph-max-bs") -> list[str]:
    sc = SCENARIOS[scenario]
    extra = arm_args(base_arm(arm), stage)
    if extra is None:
        raise SystemExit(f"bench_e2e: unknown arm {arm!r}")
    return (["--model-path", model_dir, "--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend",
             "triton", "--sampling-backend", "pytorch", "--page-size", "64", "--mem-fraction-static", "0.85",
             graph_flag, "8", "--enable-metrics", "--enable-cache-report", "--skip-server-warmup",
             "--log-level", "info"] + sc["args"] + (sc["hicache"] + extra if extra else []))


def trace(pattern: str, seed: int) -> list[list[int]]:
    """The pattern's prompts in issue order (deterministic from seed)."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(*VOCAB) for _ in range(n)]

    if pattern == "chat":
        hist = [[] for _ in range(12)]
        out = []
        for _round in range(4):
            for h in hist:
                h += toks(768)
                out.append(list(h))
        return out
    if pattern == "documents":
        docs = [toks(2048) for _ in range(16)]
        weights = [1 / (i + 1) ** 1.1 for i in range(len(docs))]
        return [docs[rng.choices(range(len(docs)), weights)[0]] + toks(64) for _ in range(48)]
    if pattern == "sessions":
        sessions = [toks(2048) for _ in range(14)]
        out = []
        for _turn in range(4):
            for s in sessions:
                s += toks(256)
                out.append(list(s))
        return out
    if pattern == "l3hit":  # the documents; measure() adds a fresh suffix per phase
        return [toks(L3HIT_DOC_TOKENS) for _ in range(L3HIT_DOCS)]
    raise ValueError(pattern)


def run_trace(url: str, prompts: list[list[int]], parallel: int = PARALLEL) -> tuple[list[bm.ReqRecord], float]:
    """Issue the prompts in order with `parallel` requests in flight."""
    todo = deque(enumerate(prompts))
    lock = threading.Lock()
    recs: list[bm.ReqRecord] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, ids = todo.popleft()
            rec, _ = bm.generate(url, ids, OUTPUT_TOKENS)
            rec.client, rec.round = i, i
            with lock:
                recs.append(rec)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return recs, time.perf_counter() - t0


def flush(url: str) -> None:
    """SGLang refuses to flush while requests or backups are pending: retry for a while."""
    for _ in range(40):
        try:
            if requests.post(url + "/flush_cache", timeout=30).status_code == 200:
                time.sleep(0.5)
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: /flush_cache kept failing")


def dir_bytes(d: str | None) -> int:
    if not d or not os.path.isdir(d):
        return 0
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def with_l3_backend(args: list[str], backend: str, extra_config: str) -> list[str]:
    """`args` with the L3 backend swapped for `backend`, configured by the JSON `extra_config`."""
    out = list(args)
    out[out.index("--hicache-storage-backend") + 1] = backend
    return out + ["--hicache-storage-backend-extra-config", extra_config]


MOONCAKE_SEGMENT = 8 << 30  # bytes each server lends the store (more than any arm writes in one phase)


class MooncakeMaster:
    """A `mooncake_master` of one server on loopback (its own ports, so its counters are that arm's alone)."""

    def __init__(self, root: str, index: int, log_dir: str):
        self.root = root
        self.port, self.metrics_port = 50151 + index, 9103 + index
        exe = os.path.join(root, "mooncake", "mooncake_master")
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"bench_e2e: --l3-backend mooncake needs {exe} (set KVTQ_MOONCAKE_DIR to the unpacked "
                             "mooncake-transfer-engine-non-cuda wheel)")
        self.log = open(os.path.join(log_dir, f"mooncake_master_{index}.log"), "w")
        self.proc = subprocess.Popen([exe, "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
                                      "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}",
                                      "--default_kv_lease_ttl=100"], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.monotonic() + 30
        while self.allocated_bytes() is None:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"bench_e2e: mooncake_master on port {self.port} did not start (see {self.log.name})")
            time.sleep(0.2)

    def extra_config(self) -> str:
        return json.dumps({"master_server_address": f"127.0.0.1:{self.port}", "metadata_server": "P2PHANDSHAKE",
                           "protocol": "tcp", "device_name": "", "local_hostname": "127.0.0.1",
                           "global_segment_size": MOONCAKE_SEGMENT})

    def allocated_bytes(self) -> int | None:
        """The master's `master_allocated_bytes` (bytes of live objects), None while it does not answer."""
        try:
            text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except requests.RequestException:
            return None
        for line in text.splitlines():
            if line.startswith("master_allocated_bytes "):
                return int(float(line.split()[1]))
        return None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(8)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.log.close()


class Server:
    """One arm's server (launched through run_server.sh --exec); stop() kills its process group."""

    def __init__(self, scenario: str, arm: str, port: int, a: argparse.Namespace):
        self.scenario, self.arm, self.port = scenario, arm, port
        self.url = f"http://127.0.0.1:{port}"
        self.args = server_args(a.model_dir, scenario, arm, a.stage, a.graph_flag)
        self.log_path = os.path.join(a.work_dir, f"server_{scenario}_{arm}.log")
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.l3_dir = self.profile = self.master = None
        self.l3_backend = "file" if "--hicache-storage-backend" in self.args else None
        if self.l3_backend and a.l3_backend == "mooncake":
            self.l3_backend = "mooncake"
            self.master = MooncakeMaster(a.mooncake_dir, port - a.port0, a.work_dir)
            self.args = with_l3_backend(self.args, "mooncake", self.master.extra_config())
            env["KVTQ_EXTRA_PYTHONPATH"] = a.mooncake_dir  # run_server.sh puts it beside the release site
        elif self.l3_backend:
            self.l3_dir = os.path.join(a.work_dir, "l3", f"{scenario}_{arm}")
            shutil.rmtree(self.l3_dir, ignore_errors=True)
            os.makedirs(self.l3_dir)
            env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = self.l3_dir
        if self.l3_backend:
            self.profile = os.path.join(a.work_dir, "profile", f"{scenario}_{arm}")
            os.makedirs(os.path.dirname(self.profile), exist_ok=True)
            env["KVTQ_L3_PROFILE"] = self.profile
        env.update(ARM_VARIANTS.get(arm, ("", {}))[1])
        self.log = open(self.log_path, "w")
        self.t0 = time.time()
        self.proc = subprocess.Popen([*shlex.split(a.launcher), "--port", str(port), "--", *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def ready(self, timeout: float) -> float:
        bm.wait_ready(self.url, timeout, lambda: self.proc.poll() is None)
        bm.warmup(self.url, VOCAB[1])
        return time.time() - self.t0

    def l3_bytes(self) -> int:
        """Bytes this server's L3 holds now: the file backend's directory, or Mooncake's live objects."""
        if self.master is not None:
            return self.master.allocated_bytes() or 0
        return dir_bytes(self.l3_dir)

    def info(self) -> dict[str, Any]:
        return parse_server_log(Path(self.log_path).read_text(errors="replace"))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(8)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.log.close()
        if self.master is not None:
            self.master.stop()


def profile_totals(srv: Server) -> dict[str, dict[str, float]]:
    if not getattr(srv, "profile", None):
        return {}
    from kvtuner_hicache.sglang_ext.l3_profile import read_totals

    time.sleep(0.5)  # the servers' profile writers flush every 0.2 s
    return read_totals(srv.profile)


def group_read_bytes(pgid: int | None) -> int:
    """Bytes the server's processes read through syscalls (/proc/<pid>/io rchar, summed over its process
    group): over a phase, the L3 file reads plus a few KB of HTTP and IPC."""
    if not pgid:
        return 0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            io = (stat.parent / "io").read_text()
        except (OSError, ValueError, IndexError):
            continue
        total += next((int(line.split()[1]) for line in io.splitlines() if line.startswith("rchar:")), 0)
    return total


def l3_settled(stored: Callable[[], int], timeout: float = 30.0) -> int:
    """Wait until the bytes L3 holds stop growing (the write-through backups landed); those bytes."""
    last, same, end = -1, 0, time.monotonic() + timeout
    while time.monotonic() < end:
        now = stored()
        same = same + 1 if now == last else 0
        if same >= 3:
            return now
        last = now
        time.sleep(0.3)
    return last


def measure(srv: Server, pattern: str, rep: int, meta: dict[str, Any]) -> dict[str, Any]:
    from kvtuner_hicache.sglang_ext.l3_profile import subtract

    flush(srv.url)
    prompts = trace(pattern, rep * 1000 + PATTERNS.index(pattern))
    rng = random.Random(rep * 1000 + 99)

    def with_suffix(docs: list[list[int]]) -> list[list[int]]:
        return [d + [rng.randrange(*VOCAB) for _ in range(L3HIT_SUFFIX)] for d in docs]

    l3_before = srv.l3_bytes()
    cold: dict[str, Any] = {}
    if pattern == "l3hit":  # phase 1: each document once, into L3; then L1 and L2 are emptied
        warm, _ = run_trace(srv.url, with_suffix(prompts), 1)
        ok = [r.ttft_s for r in warm if not r.error]
        cold = {"ttft_mean_cold_s": statistics.fmean(ok) if ok else None,
                "l3_bytes_after_warm": l3_settled(srv.l3_bytes) - l3_before}
        flush(srv.url)
        docs, prompts = prompts, with_suffix(prompts)
    p0 = profile_totals(srv)
    pgid = srv.proc.pid if getattr(srv, "proc", None) and srv.l3_dir else None
    io0 = group_read_bytes(pgid)
    m0 = bm.scrape(srv.url)
    recs, wall = run_trace(srv.url, prompts, 1 if pattern == "l3hit" else PARALLEL)
    time.sleep(1.0)  # the last write-through backups land before the counters are read
    m1 = bm.scrape(srv.url)
    io1 = group_read_bytes(pgid)
    prof = subtract(profile_totals(srv), p0) if getattr(srv, "profile", None) else {}
    s = bm.summarize(recs, wall, m0, m1)
    if pattern == "l3hit":  # phase 3: the documents once more, newest first, so that L2 still holds most of them
        cold.update(again_phase(srv, with_suffix(docs[::-1])))
    bpt = meta.get("host_bytes_per_token") or 0
    md = s["metrics_delta"]
    read_from_tokens = md.get("sglang:prefetched_tokens_total", 0.0) * bpt if srv.l3_backend else 0
    return {**cold, "l3_profile": prof, "scenario": srv.scenario, "pattern": pattern, "arm": srv.arm, "rep": rep, **meta,
            "requests": s["requests"], "errors": s["errors"], "first_error": s["first_error"],
            "ttft_mean_s": s["ttft_mean_s"], "ttft_p50_s": s["ttft_p50_s"], "ttft_p90_s": s["ttft_p90_s"],
            "ttft_mean_storage_hit_s": s["ttft_mean_storage_hit_s"], "storage_hit_requests": s["storage_hit_requests"],
            "ttft_mean_host_hit_s": s["ttft_mean_host_hit_s"], "tpot_mean_s": s["tpot_mean_s"],
            "prompt_tokens": s["prompt_tokens"], "host_hit_tokens": s["host_hit_tokens"],
            "storage_hit_tokens": s["storage_hit_tokens"], "device_hit_tokens": s["device_hit_tokens"],
            "l3_backend": srv.l3_backend,
            "l3_bytes_written": srv.l3_bytes() - l3_before if srv.l3_backend else 0,
            # measured: what the server's processes read (file); Mooncake: prefetched tokens x bytes per token
            "l3_bytes_read": io1 - io0 if srv.l3_dir else read_from_tokens,
            "l3_bytes_read_source": "syscalls" if srv.l3_dir else ("tokens" if srv.l3_backend else None),
            "l3_bytes_read_from_tokens": read_from_tokens,
            "l3_prefetched_tokens": md.get("sglang:prefetched_tokens_total", 0.0),
            "l3_backup_tokens": md.get("sglang:backuped_tokens_total", 0.0), "wall_s": wall,
            "hit_tokens_by_bits": hit_tokens_by_bits(srv.arm, md, s["host_hit_tokens"] + s["storage_hit_tokens"])}


def again_phase(srv: Server, prompts: list[list[int]]) -> dict[str, Any]:
    """The l3hit documents a third time, no flush: an elastic pool's deferred plane reads (which landed after
    phase 2's hits were served at the floor) show here as host hits at the top precision."""
    time.sleep(0.5)  # the plane reads of phase 2's last prefetch land
    m0 = bm.scrape(srv.url)
    recs, wall = run_trace(srv.url, prompts, 1)
    time.sleep(1.0)
    s = bm.summarize(recs, wall, m0, bm.scrape(srv.url))
    return {"ttft_mean_again_s": s["ttft_mean_s"], "again_host_hit_tokens": s["host_hit_tokens"],
            "again_storage_hit_tokens": s["storage_hit_tokens"], "again_errors": s["errors"],
            "again_hit_tokens_by_bits": hit_tokens_by_bits(srv.arm, s["metrics_delta"],
                                                           s["host_hit_tokens"] + s["storage_hit_tokens"])}


FIXED_BITS = {"bf16": "16", "kv8": "8", "kv4": "4", "k8v4": "6"}  # code bits per element, per base arm


def hit_tokens_by_bits(arm: str, metrics_delta: dict[str, float], pool_hit_tokens: float) -> dict[str, float]:
    """Hit tokens served from the host pool per precision (code bits per element, metadata not counted): an
    elastic pool's own counter (sglang:kvtq_elastic_hit_tokens_total{bits}), else `pool_hit_tokens` at the
    arm's fixed bits. Both host hits and L3 hits count: an L3 hit is prefetched into the host pool and loaded
    from it like a host hit (the elastic counter counts both, so the fixed arms must too)."""
    pre = "sglang:kvtq_elastic_hit_tokens_total{"
    by = {k[len(pre):-1]: v for k, v in metrics_delta.items() if k.startswith(pre) and v}
    if by or base_arm(arm) == "elastic":
        return by
    bits = FIXED_BITS.get(base_arm(arm))
    return {bits: pool_hit_tokens} if bits and pool_hit_tokens else {}


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and min..max over repeats per scenario x pattern x arm, and the ratio of means to bf16."""
    keys = ("ttft_mean_s", "tpot_mean_s", "ttft_mean_storage_hit_s", "ttft_mean_cold_s", "host_hit_tokens",
            "storage_hit_tokens", "l3_bytes_written", "l3_bytes_read", "ttft_mean_again_s", "again_host_hit_tokens",
            "again_storage_hit_tokens")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["pattern"], r["arm"]), []).append(r)
    out = []
    for (sc, pat, arm), rs in groups.items():
        row: dict[str, Any] = {"scenario": sc, "pattern": pat, "arm": arm, "reps": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                row[k] = statistics.fmean(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        stages: dict[str, dict[str, float]] = {}
        for r in rs:
            for st, v in (r.get("l3_profile") or {}).items():
                agg = stages.setdefault(st, {"calls": 0.0, "s": 0.0, "pages": 0.0})
                for f in agg:
                    agg[f] += v.get(f, 0) / len(rs)
        if stages:
            row["l3_profile"] = stages  # mean per repeat
        for field in ("hit_tokens_by_bits", "again_hit_tokens_by_bits"):
            by_bits: dict[str, float] = {}
            for r in rs:
                for bits, v in (r.get(field) or {}).items():
                    by_bits[bits] = by_bits.get(bits, 0.0) + v / len(rs)
            if by_bits:
                row[field] = by_bits  # mean per repeat
        out.append(row)
    base = {(r["scenario"], r["pattern"]): r for r in out if r["arm"] == "bf16"}
    for r in out:
        b = base.get((r["scenario"], r["pattern"]))
        for k, name in (("ttft_mean_s", "ttft"), ("tpot_mean_s", "tpot"), ("ttft_mean_storage_hit_s", "ttft_storage_hit")):
            if b and r.get(k) and b.get(k):
                r[name + "_vs_bf16"] = r[k] / b[k]
        for k in ("l3_bytes_written", "l3_bytes_read"):  # x fewer bytes than bf16 (same prompts)
            if b and r.get(k) and b.get(k):
                r[k + "_fewer_x"] = b[k] / r[k]
    return out


def print_summary(rows: list[dict[str, Any]]) -> None:
    def ms(r: dict[str, Any], k: str) -> str:
        if r.get(k) is None:
            return "-"
        return f"{r[k] * 1e3:.1f} [{r[k + '_min'] * 1e3:.1f}, {r[k + '_max'] * 1e3:.1f}]"

    print(f"{'scen':4} {'pattern':10} {'arm':5} {'TTFT mean ms [min, max]':>26} {'vs bf16':>7} "
          f"{'TPOT ms [min, max]':>22} {'vs bf16':>7} {'host hit':>9} {'L3 hit':>8} {'L3 GB wr/rd':>12}")
    for r in rows:
        print(f"{r['scenario']:4} {r['pattern']:10} {r['arm']:5} {ms(r, 'ttft_mean_s'):>26} "
              f"{r.get('ttft_vs_bf16', float('nan')):7.3f} {ms(r, 'tpot_mean_s'):>22} "
              f"{r.get('tpot_vs_bf16', float('nan')):7.3f} {r.get('host_hit_tokens', 0):9.0f} "
              f"{r.get('storage_hit_tokens', 0):8.0f} "
              f"{r.get('l3_bytes_written', 0) / 1e9:5.2f}/{r.get('l3_bytes_read', 0) / 1e9:5.2f}")
    again = [r for r in rows if r.get("ttft_mean_again_s") is not None]
    if again:
        print("\nl3hit phase 3 (the documents again, no flush): TTFT ms [min, max], host / L3 hit tokens, hits by bits")
        for r in again:
            print(f"{r['arm']:16} {ms(r, 'ttft_mean_again_s'):>26} {r.get('again_host_hit_tokens', 0):9.0f} "
                  f"{r.get('again_storage_hit_tokens', 0):8.0f} {r.get('again_hit_tokens_by_bits', {})}")
    prof = [r for r in rows if r.get("l3_profile")]
    if not prof:
        return
    stages = sorted({st for r in prof for st in r["l3_profile"]})
    print("\nL3 stages, ms per phase (mean over repeats; pages in brackets)")
    print(f"{'pattern':10} {'arm':11} " + " ".join(f"{st:>18}" for st in stages))
    for r in prof:
        cells = []
        for st in stages:
            v = r["l3_profile"].get(st)
            cells.append(f"{v['s'] * 1e3:10.1f} [{v['pages']:5.0f}]" if v else f"{'-':>18}")
        print(f"{r['pattern']:10} {r['arm']:11} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    ap.add_argument("--arms", default="", help="comma-separated (default: the scenario's arms)")
    ap.add_argument("--patterns", default="", help="comma-separated (default: the scenario's patterns)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/kvtq_out"))
    ap.add_argument("--work-dir", default="/tmp/kvtq_e2e_work")
    ap.add_argument("--stage", default=".stage")
    ap.add_argument("--model-dir", default="/tmp/qwen2_7b")
    ap.add_argument("--port0", type=int, default=30100)
    ap.add_argument("--launcher", default="bash scripts/device/run_server.sh --exec")
    ap.add_argument("--server-wait", type=float, default=240)
    ap.add_argument("--budget", type=float, default=540, help="seconds; repeats that would not fit are left out")
    ap.add_argument("--l3-backend", choices=("file", "mooncake"), default="file",
                    help="scenario l3: SGLang's file backend on local disk, or its mooncake backend (a master per server)")
    ap.add_argument("--mooncake-dir", default=os.environ.get("KVTQ_MOONCAKE_DIR", ""),
                    help="the unpacked mooncake-transfer-engine-non-cuda wheel (--l3-backend mooncake)")
    ap.add_argument("--no-warmup-pass", action="store_true",
                    help="skip the discarded pass of the first pattern on every server before repeat 0")
    a = ap.parse_args(argv)
    a.graph_flag = cuda_graph_bs_flag()
    t_start = time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    os.makedirs(a.work_dir, exist_ok=True)
    arms = [x for x in a.arms.split(",") if x] or list(SCENARIOS[a.scenario]["arms"])
    patterns = [p for p in a.patterns.split(",") if p] or list(SCENARIOS[a.scenario]["patterns"])
    if "l3hit" in patterns and a.scenario != "l3":
        raise SystemExit("bench_e2e: pattern l3hit needs scenario l3 (an L3 backend)")
    if a.l3_backend == "mooncake" and (a.scenario != "l3" or not a.mooncake_dir):
        raise SystemExit("bench_e2e: --l3-backend mooncake needs --scenario l3 and --mooncake-dir (or KVTQ_MOONCAKE_DIR)")
    if a.l3_backend == "mooncake":
        a.mooncake_dir = os.path.abspath(a.mooncake_dir)
    gpu = gpu_name()
    from importlib.metadata import version

    sgl_version = version("sglang")
    print(f"GPU {gpu}; SGLang {sgl_version}; scenario {a.scenario}; arms {arms}; patterns {patterns}", flush=True)
    servers: list[Server] = []
    records: list[dict[str, Any]] = []
    metas: dict[str, dict[str, Any]] = {}
    tag = a.scenario + ("_mooncake" if a.l3_backend == "mooncake" else "")
    out_json = os.path.join(a.out_dir, f"bench_e2e_{tag}.json")
    try:
        free0 = gpu_free_bytes()
        for i, arm in enumerate(arms):  # strictly one start at a time
            if i == 1:  # the first server's footprint tells whether the others fit beside it (resident servers)
                free = gpu_free_bytes()
                need = (free0 - free) * (len(arms) - 1)
                if free0 and free < need * 1.02:
                    raise SystemExit(f"bench_e2e: {len(arms)} resident servers do not fit this GPU: the first took "
                                     f"{(free0 - free) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are left for "
                                     f"{len(arms) - 1} more; pass fewer --arms (measured in separate calls)")
            srv = Server(a.scenario, arm, a.port0 + i, a)
            servers.append(srv)
            up = srv.ready(a.server_wait)
            info = srv.info()
            metas[arm] = {"gpu": gpu, "sglang_version": sgl_version, "codec": info.get("codec", "-"),
                          "l2_capacity_tokens": info.get("l2_capacity_tokens"),
                          "host_bytes_per_token": info.get("host_bytes_per_token"), "startup_s": round(up, 1)}
            print(f"[{time.time() - t_start:5.0f}s] {a.scenario}:{arm} ready in {up:.0f} s: {metas[arm]}", flush=True)
        if not a.no_warmup_pass:  # the first trace a fresh server serves is slower (run 8: 286 ms against 82-102)
            for srv in servers:
                measure(srv, patterns[0], WARMUP_REP, metas[srv.arm])
            print(f"[{time.time() - t_start:5.0f}s] warm-up pass ({patterns[0]}) done on every server", flush=True)
        per_rep = None
        for rep in range(a.reps):
            if per_rep is not None and time.time() + per_rep > t_start + a.budget:
                print(f"[{time.time() - t_start:5.0f}s] repeat {rep} would not fit the budget: stopping", flush=True)
                break
            t_rep = time.time()
            order = servers if rep % 2 == 0 else servers[::-1]
            for srv in order:
                for pat in patterns:
                    r = measure(srv, pat, rep, metas[srv.arm])
                    records.append(r)
                    print(f"[{time.time() - t_start:5.0f}s] rep {rep} {a.scenario}:{srv.arm} {pat}: TTFT "
                          f"{(r['ttft_mean_s'] or 0) * 1e3:.1f} ms TPOT {(r['tpot_mean_s'] or 0) * 1e3:.2f} ms host "
                          f"{r['host_hit_tokens']} L3 {r['storage_hit_tokens']} errors {r['errors']}"
                          + (f"; again: TTFT {r['ttft_mean_again_s'] * 1e3:.1f} ms host {r['again_host_hit_tokens']} "
                             f"by bits {r['again_hit_tokens_by_bits']}" if r.get("ttft_mean_again_s") else ""),
                          flush=True)
                    with open(out_json, "w") as f:
                        json.dump(records, f, indent=1)
            per_rep = time.time() - t_rep
    finally:
        for srv in servers:
            srv.stop()
    rows = summary(records)
    with open(os.path.join(a.out_dir, f"bench_e2e_{tag}_summary.json"), "w") as f:
        json.dump({"command": "python3 benchmark/bench_e2e.py " + " ".join(sys.argv[1:]), "gpu": gpu,
                   "sglang_version": sgl_version, "arms": metas, "summary": rows}, f, indent=1)
    print_summary(rows)
    bad = sum(r["errors"] + r.get("again_errors", 0) for r in records)
    print(f"[{time.time() - t_start:5.0f}s] done: {len(records)} records, {bad} request errors", flush=True)
    return 0 if records and bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
