"""benchmark/bench_e2e.py: its traces, its measurement against a fake SGLang server, its summary, and the
server flags it builds parsed by the installed SGLang release's own argument parser."""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as be  # noqa: E402
from fake_sglang import FakeSGLang  # noqa: E402


def test_traces_are_deterministic_distinct_per_seed_and_reuse_prefixes():
    for p in be.PATTERNS:
        a, b, c = be.trace(p, 7), be.trace(p, 7), be.trace(p, 8)
        assert a == b and a != c
        assert not set(map(tuple, a)) & set(map(tuple, c))  # another repeat never meets these prompts
    chat = be.trace("chat", 0)
    assert len(chat) == 48 and chat[12][:768] == chat[0]  # round 2 of client 0 extends its round 1
    sess = be.trace("sessions", 0)
    assert sess[14][: len(sess[0])] == sess[0] and len(sess[-1]) == 2048 + 4 * 256
    docs = be.trace("documents", 0)
    heads = [tuple(d[:2048]) for d in docs]
    assert len(set(heads)) < len(heads)  # popular documents come back


def test_summary_means_spread_and_ratio_to_bf16():
    recs = []
    for arm, ttfts, tpots in (("bf16", [0.10, 0.12, 0.11], [0.006, 0.006, 0.006]),
                              ("kv4", [0.05, 0.07, 0.06], [0.0057, 0.0060, 0.0063])):
        for rep, (t, d) in enumerate(zip(ttfts, tpots, strict=True)):
            recs.append({"scenario": "l2", "pattern": "chat", "arm": arm, "rep": rep, "ttft_mean_s": t,
                         "tpot_mean_s": d, "ttft_mean_storage_hit_s": None, "host_hit_tokens": 10 * rep,
                         "storage_hit_tokens": 0, "l3_bytes_written": 0, "l3_bytes_read": 0})
    rows = {r["arm"]: r for r in be.summary(recs)}
    assert rows["kv4"]["reps"] == 3
    assert rows["kv4"]["ttft_mean_s"] == pytest.approx(0.06)
    assert (rows["kv4"]["ttft_mean_s_min"], rows["kv4"]["ttft_mean_s_max"]) == (0.05, 0.07)
    assert rows["kv4"]["ttft_vs_bf16"] == pytest.approx(0.06 / 0.11)
    assert rows["kv4"]["tpot_vs_bf16"] == pytest.approx(1.0)
    assert "ttft_mean_storage_hit_s" not in rows["kv4"]  # no storage hits: no number made up
    assert rows["bf16"]["ttft_vs_bf16"] == pytest.approx(1.0)


@pytest.fixture()
def fake_url():
    FakeSGLang.seen, FakeSGLang.prompts, FakeSGLang.flushed = set(), [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_measure_flushes_and_records_the_report_fields(fake_url, tmp_path):
    srv = be.Server.__new__(be.Server)  # the measurement only needs the url, names and L3 directory
    srv.url, srv.scenario, srv.arm, srv.l3_dir = fake_url, "l3", "kv4", str(tmp_path)
    srv.master, srv.l3_backend = None, "file"
    (tmp_path / "page0").write_bytes(b"x" * 100)
    rec = be.measure(srv, "sessions", 1, {"gpu": "fake", "sglang_version": "0", "host_bytes_per_token": 16192})
    assert FakeSGLang.flushed == 1 and rec["requests"] == 56 and rec["errors"] == 0
    assert sorted(FakeSGLang.prompts) == sorted(len(p) for p in be.trace("sessions", 1000 + 2))  # 4 in flight
    for k in ("scenario", "pattern", "arm", "rep", "gpu", "sglang_version", "ttft_mean_s", "ttft_mean_storage_hit_s",
              "tpot_mean_s", "prompt_tokens", "host_hit_tokens", "storage_hit_tokens", "l3_bytes_read",
              "l3_bytes_written"):
        assert k in rec, k
    assert rec["l3_bytes_written"] == 0  # the fake writes nothing; the existing file is not counted
    assert rec["tpot_mean_s"] > 0


def test_server_flags_parse_on_the_installed_release():
    from kvtuner_hicache.sglang_ext import args as our_args
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    if "--enable-kvtuner-hicache" not in parser._option_string_actions:  # the plugin's hook adds them once loaded
        our_args.add_cli_args(parser)
    flag = be.cuda_graph_bs_flag()
    for sc, spec in be.SCENARIOS.items():
        for arm in spec["arms"]:
            ns = parser.parse_args(be.server_args("/m", sc, arm, ".stage", flag))
            assert not ns.disable_cuda_graph
            assert ns.enable_hierarchical_cache == (arm != "none")
            assert ns.enable_kvtuner_hicache == (arm == "kv4")


def test_l3hit_sends_each_document_three_times_around_a_flush(fake_url, tmp_path):
    """Phase 1 stores the documents, the flush empties L1/L2, phase 2 (the measured one) sends the same
    documents with other suffixes, one at a time; phase 3 sends them once more without a flush, into the
    `*again*` fields; the record's main fields are phase 2's requests only."""
    srv = be.Server.__new__(be.Server)
    srv.url, srv.scenario, srv.arm, srv.l3_dir, srv.profile = fake_url, "l3", "kv4", str(tmp_path), None
    srv.master, srv.l3_backend = None, "file"
    rec = be.measure(srv, "l3hit", 0, {"gpu": "fake", "sglang_version": "0", "host_bytes_per_token": 16192})
    n, length = be.L3HIT_DOCS, be.L3HIT_DOC_TOKENS + be.L3HIT_SUFFIX
    assert FakeSGLang.flushed == 2 and rec["requests"] == n and rec["errors"] == 0
    assert FakeSGLang.prompts == [length] * (3 * n)
    assert rec["ttft_mean_again_s"] > 0 and rec["again_errors"] == 0
    served = rec["again_host_hit_tokens"] + rec["again_storage_hit_tokens"]  # L3 hits load from the host pool too
    assert rec["again_hit_tokens_by_bits"] == ({"4": served} if served else {})
    assert rec["prompt_tokens"] == n * length and rec["ttft_mean_cold_s"] > 0
    docs = be.trace("l3hit", be.PATTERNS.index("l3hit"))
    assert len(docs) == n and all(len(d) == be.L3HIT_DOC_TOKENS for d in docs)


def test_arm_variants_keep_their_base_flags():
    assert be.server_args("/m", "l3", "kv4_sglread", ".stage") == be.server_args("/m", "l3", "kv4", ".stage")
    assert be.ARM_VARIANTS["kv4_sglread"][1] == {"KVTQ_L3_IN_POOL_READS": "0"}
    assert be.server_args("/m", "l3", "elastic_l3floor", ".stage") == be.server_args("/m", "l3", "elastic", ".stage")
    assert be.ARM_VARIANTS["elastic_l3floor"][1] == {"KVTQ_L3_PLANES": "0"}
    assert be.ARM_VARIANTS["elastic_l3sync"][1] == {"KVTQ_L3_PLANES": "sync"}
    with pytest.raises(SystemExit):
        be.main(["--scenario", "l2", "--patterns", "l3hit", "--reps", "0"])


def test_hit_tokens_by_bits_from_the_elastic_counter_or_the_fixed_bits():
    import bench_multiturn as bm

    text = ('sglang:kvtq_elastic_hit_tokens_total{tp_rank="0",bits="8"} 640.0\n'
            'sglang:kvtq_elastic_hit_tokens_total{tp_rank="0",bits="4"} 128.0\n'
            'sglang:cached_tokens_total{cache_source="host"} 768.0\n')
    m = bm.parse_metrics(text)
    assert m["sglang:kvtq_elastic_hit_tokens_total{8}"] == 640.0 and m["sglang:cached_tokens_total{host}"] == 768.0
    assert be.hit_tokens_by_bits("elastic", m, 768.0) == {"8": 640.0, "4": 128.0}
    assert be.hit_tokens_by_bits("elastic", {}, 768.0) == {}  # no counter: nothing is made up
    assert be.hit_tokens_by_bits("elastic_l3floor", {}, 768.0) == {}
    assert be.hit_tokens_by_bits("kv4", {}, 768.0) == {"4": 768.0}
    assert be.hit_tokens_by_bits("kv8", {}, 0.0) == {}
    rows = be.summary([{"scenario": "l2", "pattern": "chat", "arm": "elastic", "rep": r, "ttft_mean_s": 0.1,
                        "hit_tokens_by_bits": {"8": 100.0 * (r + 1)}} for r in range(2)])
    assert rows[0]["hit_tokens_by_bits"] == {"8": 150.0}


class _GrowingMaster:
    """Stands in for MooncakeMaster: its store grows by 1 MB every time it is asked."""

    def __init__(self):
        self.calls = 0

    def allocated_bytes(self):
        self.calls += 1
        return self.calls * 10**6


def test_with_mooncake_the_record_takes_the_masters_bytes_and_reads_from_tokens(fake_url):
    srv = be.Server.__new__(be.Server)
    srv.url, srv.scenario, srv.arm, srv.l3_dir, srv.profile = fake_url, "l3", "kv4", None, None
    srv.master, srv.l3_backend = _GrowingMaster(), "mooncake"
    rec = be.measure(srv, "chat", 0, {"gpu": "fake", "sglang_version": "0", "host_bytes_per_token": 16192})
    assert rec["l3_backend"] == "mooncake" and rec["l3_bytes_read_source"] == "tokens"
    assert rec["l3_bytes_written"] == 10**6  # asked once before the phase and once after
    assert rec["l3_bytes_read"] == rec["l3_bytes_read_from_tokens"]


def test_mooncake_backend_flags_parse_on_the_installed_release():
    from kvtuner_hicache.sglang_ext import args as our_args
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    if "--enable-kvtuner-hicache" not in parser._option_string_actions:
        our_args.add_cli_args(parser)
    extra = '{"master_server_address": "127.0.0.1:50151"}'
    args = be.with_l3_backend(be.server_args("/m", "l3", "kv4", ".stage", be.cuda_graph_bs_flag()), "mooncake", extra)
    ns = parser.parse_args(args)
    assert ns.hicache_storage_backend == "mooncake" and ns.hicache_storage_backend_extra_config == extra
    assert args.count("--hicache-storage-backend") == 1
    with pytest.raises(SystemExit):
        be.main(["--scenario", "l2", "--l3-backend", "mooncake", "--mooncake-dir", "/x", "--reps", "0"])
