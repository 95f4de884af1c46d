"""Run every (scenario, arm) of the end-to-end multi-turn benchmark on the GPU machine, one server each.

Runs ON THE GPU MACHINE from the repo root after `scripts/device/run_server.sh setup` (the wrapper
scripts/device/run_multiturn.sh does both). Servers are started through `run_server.sh --exec`;
while one server is benchmarked, the next `--ahead` servers are already starting (start-up is ~1 min
of CPU work, mostly imports; they load dummy weights and then idle, started with --skip-server-warmup),
which keeps the whole run inside one device call. Benchmarks themselves run strictly one at a time.

Scenarios (same host byte budget for every arm of a scenario):
  l2  GPU pool 16384 tokens, --hicache-size 1 (GB), no L3: prefixes come back from L2 (host) or are recomputed.
  l3  GPU pool 8192 tokens, --hicache-ratio 1.2 (bytes: 0.56 GB), L3 `file` backend (local disk), prefetch
      wait_complete: L2 is too small for every arm, the oldest prefixes come back from L3. By default our
      l3 arms run with the debug capture on (KVTQ_CAPTURE_DIR), checked afterwards by check_capture.py;
      --capture l2:kv8,l3:kv4,... picks the capture arms explicitly (any scenario).
Arms: none (no HiCache, l2 only), bf16 (SGLang's HiCache), kv8, k8v4, kv4 (our defaults), mixed
(KVTuner per-layer table).

Writes to --out-dir: results.json (everything), bench_multiturn.json (one record per scenario x arm),
capture_check.json, and capture_<scenario>_<arm>.tgz for --capture-sample (a part of that capture small
enough to come back, re-checkable with check_capture.py); server logs go to <work-dir>/logs/ (the device
wrapper tars them into $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_multiturn as bm  # noqa: E402

PRESET = "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml"
BF16_BYTES_PER_TOKEN = 28 * 2 * 4 * 128 * 2  # Qwen2.5-7B KV per token in bf16


def base_args(model_dir: str) -> list[str]:
    return ["--model-path", model_dir, "--load-format", "dummy", "--skip-tokenizer-init",
            "--attention-backend", "triton", "--sampling-backend", "pytorch", "--page-size", "64",
            "--mem-fraction-static", "0.8", "--disable-cuda-graph", "--enable-metrics",
            "--skip-server-warmup", "--mm-feature-transport", "cpu", "--log-level", "info"]


def arm_args(arm: str, stage: str) -> list[str] | None:
    hi = ["--enable-hierarchical-cache"]
    ours = hi + ["--enable-kvtuner-hicache"]
    return {
        "none": [],
        "bf16": hi,
        "kv8": ours + ["--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "8"],
        "k8v4": ours + ["--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "4"],
        "kv4": ours,
        "elastic": ours + ["--kvtuner-hicache-elastic"],  # K4V4 floor, K8V8-class at the top
        "mixed": ours + ["--kvtuner-hicache-config", os.path.join(stage, "presets", PRESET)],
    }.get(arm)


SCENARIOS: dict[str, dict[str, Any]] = {
    "l2": {"args": ["--max-total-tokens", "16384", "--hicache-size", "1"], "hicache_args": [], "capture": False},
    "l3": {"args": ["--max-total-tokens", "8192"],
           "hicache_args": ["--hicache-ratio", "1.2", "--hicache-storage-backend", "file",
                            "--hicache-storage-prefetch-policy", "wait_complete"], "capture": True},
}
PREBUILD = ("import time; t = time.time(); from kvtuner_hicache.quant import native; ok = native.available(); "
            "print('native', ok, native.build_name() if ok else native.unavailable_reason(), '%.1f s' % (time.time() - t))")
DEFAULT_PLAN = "l2:kv4,l2:bf16,l2:none,l2:k8v4,l2:kv8,l2:mixed,l3:kv4,l3:bf16,l3:mixed,l3:k8v4,l3:kv8"

_OUR_POOL = re.compile(r"kvtuner_hicache (\w+) host pool: (\d+) tokens \((\d+) pages\), (\d+) B/token .*?"
                       r"([\d.]+)x vs bf16.*?codec=(\w+)")
_SGL_POOL = re.compile(r"Allocating (\w+) hierarchical KV host pool: (\d+) tokens, ([\d.]+) GB host memory")
_CODEC = re.compile(r"kvtuner_hicache codec for (\S+): (.*)")
_MAX_TOK = re.compile(r"max_total_num_tokens=(\d+)")


def parse_server_log(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {"tracebacks": text.count("Traceback (most recent call last)")}
    m = _OUR_POOL.search(text)
    if m:
        info.update(l2_capacity_tokens=int(m[2]), host_bytes_per_token=int(m[4]), compression_vs_bf16=float(m[5]),
                    codec=m[6])
    else:
        m = _SGL_POOL.search(text)
        if m:
            info.update(l2_capacity_tokens=int(m[2]), host_bytes_per_token=BF16_BYTES_PER_TOKEN,
                        host_gb_logged=float(m[3]), compression_vs_bf16=1.0, codec="sglang-bf16")
    m = _CODEC.search(text)
    if m:
        info["codec_choice"] = m[2].strip()[:300]
    m = _MAX_TOK.search(text)
    if m:
        info["gpu_pool_tokens"] = int(m[1])
    return info


class Server:
    def __init__(self, scenario: str, arm: str, idx: int, a: argparse.Namespace):
        self.scenario, self.arm, self.name = scenario, arm, f"{scenario}_{arm}"
        self.port = a.port0 + 1000 * idx
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(a.work_dir, "logs", f"server_{self.name}.log")
        sc = SCENARIOS[scenario]
        extra = arm_args(arm, a.stage)
        assert extra is not None, arm
        args = base_args(a.model_dir) + sc["args"] + (sc["hicache_args"] + extra if extra else [])
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.capture_dir = None
        want_capture = (scenario, arm) in a.capture_set if a.capture_set is not None else sc["capture"]
        if want_capture and arm not in ("none", "bf16"):
            self.capture_dir = os.path.join(a.work_dir, "capture", self.name)
            shutil.rmtree(self.capture_dir, ignore_errors=True)
            os.makedirs(self.capture_dir)
            Path(self.capture_dir, "PAUSE").touch()  # warm-up traffic is not captured
            env["KVTQ_CAPTURE_DIR"] = self.capture_dir
            env["KVTQ_CAPTURE_PAGES"] = str(a.capture_pages)
        if "--hicache-storage-backend" in args:
            d = os.path.join(a.work_dir, "l3", self.name)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = d
        self.args = args
        self.t_launch = time.time()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*shlex.split(a.launcher), "--port", str(self.port), "--", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # scheduler/detokenizer children may outlive the group leader for a moment
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def run_arm(srv: Server, a: argparse.Namespace, w: bm.Workload, deadline: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"arm": srv.arm, "scenario": srv.scenario, "run": a.run, "capture": srv.capture_dir is not None,
                           "port": srv.port, "args": srv.args}
    try:
        rec["startup_s"] = bm.wait_ready(srv.url, max(10.0, min(a.server_wait, deadline - time.time() - 30)), srv.alive)
        rec["ready_after_launch_s"] = time.time() - srv.t_launch
    except Exception as e:
        rec["status"] = f"not ready: {e}"
        return rec
    box: dict[str, Any] = {}

    def arm_capture() -> None:
        if srv.capture_dir:
            os.unlink(os.path.join(srv.capture_dir, "PAUSE"))

    def body() -> None:
        try:
            box["res"] = bm.bench(srv.url, w, on_armed=arm_capture)
        except Exception as e:
            box["err"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=body, daemon=True)
    t0 = time.time()
    t.start()
    t.join(max(10.0, min(a.arm_timeout, deadline - time.time() - 15)))
    rec["bench_wall_s"] = time.time() - t0
    if t.is_alive():
        rec["status"] = "timeout"
    elif "err" in box:
        rec["status"] = f"error: {box['err']}"
    else:
        rec.update(box["res"])
        rec["status"] = "ok" if box["res"]["errors"] == 0 else f"{box['res']['errors']} request errors"
    return rec


def finish_record(rec: dict[str, Any], log_text: str, gpu: str) -> dict[str, Any]:
    rec.update(parse_server_log(log_text))
    rec["gpu"] = gpu
    if rec["arm"] == "none":
        rec.setdefault("codec", "-")
    bpt = rec.get("host_bytes_per_token", BF16_BYTES_PER_TOKEN)
    md = rec.get("metrics_delta", {})
    if md:
        rec["l2_load_tokens"] = md.get("sglang:load_back_tokens_total", 0.0)
        rec["l2_bytes_loaded"] = rec["l2_load_tokens"] * bpt
        rec["l3_backup_tokens"] = md.get("sglang:backuped_tokens_total", 0.0)
        rec["l3_prefetch_tokens"] = md.get("sglang:prefetched_tokens_total", 0.0)
        rec["l3_bytes_written"] = rec["l3_backup_tokens"] * bpt
        rec["l3_bytes_read"] = rec["l3_prefetch_tokens"] * bpt
        if "sglang:hicache_host_total_tokens" in md:
            rec["l2_capacity_tokens_metric"] = md["sglang:hicache_host_total_tokens"]
    if "computed_prompt_tokens" in rec and rec["arm"] != "none":
        # write-through backs up every newly computed token once (prompt and generated), page-aligned
        rec["l2_bytes_backed_up_est"] = (rec["computed_prompt_tokens"] + rec["output_tokens"]) * bpt
    return rec


SUMMARY_FIELDS = ("arm", "scenario", "run", "status", "capture", "gpu", "codec", "l2_capacity_tokens", "host_bytes_per_token",
                  "compression_vs_bf16", "host_hit_tokens", "storage_hit_tokens", "device_hit_tokens", "hit_rate",
                  "prompt_tokens", "computed_prompt_tokens", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s",
                  "ttft_mean_round3plus_s", "host_hit_requests", "ttft_mean_host_hit_s", "storage_hit_requests",
                  "ttft_mean_storage_hit_s", "tpot_mean_s", "throughput_tok_s", "req_s", "wall_s", "l2_bytes_loaded",
                  "l2_bytes_backed_up_est", "l3_backup_tokens", "l3_bytes_written", "l3_bytes_read", "startup_s")


def summary_record(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in SUMMARY_FIELDS}


def _f(v: Any, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v * scale)


def print_table(recs: list[dict[str, Any]]) -> None:
    hdr = (f"{'scen':4} {'arm':6} {'status':8} {'codec':10} {'L2 tok':>7} {'B/tok':>6} {'host hit':>9} {'stor hit':>9} "
           f"{'hit%':>5} {'TTFT mean':>9} {'p50':>6} {'p90':>6} {'TPOT':>6} {'tok/s':>7} {'L2 load GB':>10} {'L3 wr GB':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in recs:
        arm = r["arm"] + ("*" if r.get("capture") else "")
        print(f"{r['scenario']:4} {arm:6} {str(r.get('status'))[:8]:8} {str(r.get('codec') or '-')[:10]:10} "
              f"{_f(r.get('l2_capacity_tokens'), fmt='{:.0f}'):>7} {_f(r.get('host_bytes_per_token'), fmt='{:.0f}'):>6} "
              f"{_f(r.get('host_hit_tokens'), fmt='{:.0f}'):>9} {_f(r.get('storage_hit_tokens'), fmt='{:.0f}'):>9} "
              f"{_f(r.get('hit_rate'), 100, '{:.0f}'):>5} {_f(r.get('ttft_mean_s'), 1e3, '{:.0f}ms'):>9} "
              f"{_f(r.get('ttft_p50_s'), 1e3, '{:.0f}'):>6} {_f(r.get('ttft_p90_s'), 1e3, '{:.0f}'):>6} "
              f"{_f(r.get('tpot_mean_s'), 1e3, '{:.1f}'):>6} {_f(r.get('throughput_tok_s'), fmt='{:.0f}'):>7} "
              f"{_f(r.get('l2_bytes_loaded'), 1e-9, '{:.2f}'):>10} {_f(r.get('l3_bytes_written'), 1e-9, '{:.2f}'):>8}")
    print("(arm* = debug capture on)")


def write_outputs(a: argparse.Namespace, recs: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump({"records": recs, **extra}, f, indent=1, default=str)
    with open(os.path.join(a.out_dir, "bench_multiturn.json"), "w") as f:
        json.dump([summary_record(r) for r in recs], f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="comma-separated scenario:arm list, run in this order")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/kvtq_out"))
    ap.add_argument("--work-dir", default="/tmp/kvtq_work")
    ap.add_argument("--stage", default=".stage")
    ap.add_argument("--model-dir", default="/tmp/qwen2_7b")
    ap.add_argument("--port0", type=int, default=30000)
    ap.add_argument("--launcher", default="bash scripts/device/run_server.sh --exec",
                    help="command that execs one server; gets --port P -- <sglang args>")
    ap.add_argument("--ahead", type=int, default=2, help="servers starting while one is benchmarked")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run (hard deadline)")
    ap.add_argument("--server-wait", type=float, default=240)
    ap.add_argument("--arm-timeout", type=float, default=120)
    ap.add_argument("--capture-pages", type=int, default=16)
    ap.add_argument("--capture", default="",
                    help="comma-separated scenario:arm list run with the debug capture on (default: our arms of l3)")
    ap.add_argument("--capture-sample", default="",
                    help="scenario:arm list whose capture is also packed (part of it) as $OUT/capture_<scen>_<arm>.tgz")
    ap.add_argument("--sample-mib", type=float, default=15.0, help="uncompressed size cap of one capture sample")
    ap.add_argument("--run", type=int, default=None, help="run number written into every record")
    ap.add_argument("--prebuild-native", type=int, default=1)
    ap.add_argument("--fail-fast", type=int, default=1, help="abort everything when the first arm fails")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=576)
    ap.add_argument("--output", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4)
    a = ap.parse_args(argv)
    a.capture_set = {tuple(p.split(":")) for p in a.capture.split(",") if p} if a.capture else None
    t_start = time.time()
    deadline = t_start + a.budget
    os.makedirs(a.out_dir, exist_ok=True)
    os.makedirs(os.path.join(a.work_dir, "logs"), exist_ok=True)
    w = bm.Workload(a.clients, a.rounds, a.chunk, a.output, a.parallel)
    gpu = gpu_name()
    plan = deque(tuple(p.split(":")) for p in a.plan.split(",") if p)
    running: deque[Server] = deque()
    recs: list[dict[str, Any]] = []
    idx = 0
    aborted = None
    print(f"[{time.time() - t_start:5.0f}s] GPU {gpu}; plan {a.plan}; workload {w}", flush=True)
    if a.prebuild_native:  # build our kernels while the first servers import (a server would wait on its lock)
        subprocess.Popen([sys.executable, "-c", PREBUILD], stdout=open(os.path.join(a.work_dir, "logs", "native_build.log"), "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    while plan or running:
        while plan and len(running) < 1 + a.ahead and deadline - time.time() > 100:
            sc, arm = plan.popleft()
            running.append(Server(sc, arm, idx, a))
            idx += 1
        if not running:
            break
        srv = running.popleft()
        print(f"[{time.time() - t_start:5.0f}s] {srv.name}: waiting for the server (port {srv.port})", flush=True)
        rec = run_arm(srv, a, w, deadline)
        srv.stop()
        rec = finish_record(rec, Path(srv.log_path).read_text(errors="replace"), gpu)
        rec["capture_dir"] = srv.capture_dir
        recs.append(rec)
        print(f"[{time.time() - t_start:5.0f}s] {srv.name}: {rec['status']} startup {_f(rec.get('startup_s'))} s, "
              f"bench {_f(rec.get('bench_wall_s'))} s, codec {rec.get('codec')}, L2 {rec.get('l2_capacity_tokens')} tok, "
              f"hits host {rec.get('host_hit_tokens')} storage {rec.get('storage_hit_tokens')}, "
              f"TTFT mean {_f(rec.get('ttft_mean_s'), 1e3, '{:.0f}')} ms", flush=True)
        write_outputs(a, recs, {"gpu": gpu, "workload": w.__dict__})
        if rec["status"] != "ok":
            print("---- server log tail ----\n" + "\n".join(Path(srv.log_path).read_text(errors="replace").splitlines()[-40:]))
            if a.fail_fast and len(recs) == 1:
                aborted = f"first arm {srv.name} failed: {rec['status']}"
                break
    for s in running:
        s.stop()
    for sc, arm in plan:
        recs.append({"arm": arm, "scenario": sc, "run": a.run, "status": "skipped (time budget)"})
    # accuracy through the real path: loaded pages == reference dequantization of the backed-up rows
    cap_dirs = [r["capture_dir"] for r in recs if r.get("capture_dir") and r.get("status") == "ok"]
    check: list[Any] = []
    if cap_dirs and not aborted:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        cj = os.path.join(a.out_dir, "capture_check.json")
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("check_capture.py")), *cap_dirs, "--json", cj],
                           env=env, capture_output=True, text=True, timeout=max(30, deadline + 60 - time.time()))
        print(p.stdout + p.stderr[-3000:], flush=True)
        check = json.load(open(cj)) if os.path.exists(cj) else [{"error": p.stderr[-2000:]}]
    samples: list[Any] = []
    for sa in (tuple(p.split(":")) for p in a.capture_sample.split(",") if p):
        r = next((r for r in recs if (r["scenario"], r["arm"]) == sa and r.get("capture_dir") and r.get("status") == "ok"), None)
        if r is None:
            continue
        try:
            import check_capture

            samples.append(check_capture.pack_sample(r["capture_dir"], os.path.join(a.out_dir, f"capture_{sa[0]}_{sa[1]}.tgz"),
                                                     int(a.sample_mib * 1048576)))
        except Exception as e:  # a sample is optional: never lose the run for it
            samples.append({"root": r["capture_dir"], "error": f"{type(e).__name__}: {e}"})
        print("capture sample:", samples[-1], flush=True)
    write_outputs(a, recs, {"gpu": gpu, "workload": w.__dict__, "capture_check": check, "capture_samples": samples,
                            "aborted": aborted, "total_s": time.time() - t_start})
    print_table([r for r in recs if "scenario" in r])
    print(f"[{time.time() - t_start:5.0f}s] done{'; ABORTED: ' + aborted if aborted else ''}", flush=True)
    return 3 if aborted else 0


if __name__ == "__main__":
    sys.exit(main())
