"""benchmark/bench_multiturn.py against a fake SGLang HTTP server on 127.0.0.1 (no GPU, no sglang)."""

from __future__ import annotations

import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_multiturn as bm  # noqa: E402
from fake_sglang import FakeSGLang  # noqa: E402


@pytest.fixture()
def fake_url():
    FakeSGLang.seen, FakeSGLang.prompts, FakeSGLang.flushed = set(), [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_bench_against_fake_server(fake_url):
    assert bm.wait_ready(fake_url, 5) < 5
    w = bm.Workload(clients=4, rounds=3, chunk=128, output=4, parallel=2)
    armed = []
    res = bm.bench(fake_url, w, on_armed=lambda: armed.append(1))
    assert armed == [1] and FakeSGLang.flushed == 1
    assert res["requests"] == 12 and res["errors"] == 0
    # round r prompt = r * (chunk + output) + chunk
    assert sorted({p for p in FakeSGLang.prompts[3:]}) == [128, 260, 392]
    # rounds 2+ reuse the previous prompt + output (page-aligned): 4 clients x (128 + 256) tokens
    assert res["host_hit_tokens"] == 4 * (128 + 256)
    assert res["ttft_mean_s"] > 0 and res["tpot_mean_s"] is not None and res["throughput_tok_s"] > 0
    d = res["metrics_delta"]
    assert d["sglang:cached_tokens_total{host}"] == 120.0  # 12 requests x 10 during the timed part
    assert d["sglang:hicache_host_total_tokens"] == 17408.0 and "sglang:unrelated_total" not in d
    assert [r["round"] for r in res["per_round"]] == [0, 1, 2]


def test_http_error_is_recorded(fake_url):
    rec, out = bm.generate("http://127.0.0.1:9", [1, 2], 2, timeout=2)
    assert rec.error is not None and out == []


def test_parse_metrics_sums_other_labels():
    text = ('sglang:cached_tokens_total{cache_source="device",tp_rank="0"} 3\n'
            'sglang:cached_tokens_total{cache_source="device",tp_rank="1"} 4\n'
            "sglang:load_back_tokens_total 1e3\n")
    m = bm.parse_metrics(text)
    assert m == {"sglang:cached_tokens_total{device}": 7.0, "sglang:load_back_tokens_total": 1000.0}


def test_arms_orchestrator_with_fake_servers(tmp_path):
    import multiturn_arms as ma

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    rc = ma.main(["--plan", "l2:kv4,l2:bf16,l2:none,l3:kv4", "--out-dir", str(out), "--work-dir", str(tmp_path / "w"),
                  "--launcher", f"{sys.executable} {root / 'test' / 'fake_sglang.py'}", "--port0", "38000",
                  "--ahead", "2", "--budget", "200", "--prebuild-native", "0", "--clients", "3", "--rounds", "2", "--chunk", "128", "--output", "2",
                  "--parallel", "2"])
    assert rc == 0
    import json

    recs = json.load(open(out / "bench_multiturn.json"))
    assert [(r["scenario"], r["arm"], r["status"]) for r in recs] == [
        ("l2", "kv4", "ok"), ("l2", "bf16", "ok"), ("l2", "none", "ok"), ("l3", "kv4", "ok")]
    assert recs[0]["l2_capacity_tokens"] == 61760 and recs[0]["codec"] == "native"
    assert recs[1]["l2_capacity_tokens"] == 17408 and recs[1]["host_bytes_per_token"] == 57344
    assert all(r["host_hit_tokens"] > 0 and r["ttft_mean_s"] > 0 for r in recs)
    full = json.load(open(out / "results.json"))
    # l3:kv4 had the capture on, but a fake server saves nothing: reported as an error, not a pass
    assert full["capture_check"] and "error" in full["capture_check"][0]
    assert (tmp_path / "w" / "logs" / "server_l2_kv4.log").exists()
