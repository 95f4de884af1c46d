"""benchmark/tier_report.py joins one session's transfer and e2e JSON: ratios against SGLang's bf16 of the same
call only, bytes per token, and issue 13's checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import tier_report as tr  # noqa: E402


def _rec(arm, pattern, ttft, tpot, call_bytes=57344, hit_tokens=24576, backend=None):
    return {"scenario": "l3", "pattern": pattern, "arm": arm, "rep": 0, "gpu": "G", "l3_backend": backend,
            "ttft_mean_s": ttft, "ttft_mean_storage_hit_s": ttft, "tpot_mean_s": tpot,
            "storage_hit_tokens": hit_tokens, "l3_bytes_read": call_bytes * hit_tokens,
            "l3_bytes_written": call_bytes * tr.L3HIT_STORED_TOKENS}


def _transfer():
    recs = []
    for cfg, pages, ours, sgl in (("KV4", 64, 1.0, 3.5), ("KV4", 16, 0.5, 0.9), ("KV8", 256, 10.0, 17.0)):
        recs.append({"direction": "load", "config": cfg, "pages": pages, "time_ms": ours, "sglang_bf16_ms": sgl,
                     "speedup_vs_sglang_bf16": sgl / ours, "own_bytes_single_dma_ms": ours * 0.9,
                     "vs_own_bytes_single_dma": 1 / 0.9})
    recs.append({"direction": "quantize", "config": "KV4", "pages": 64, "time_ms": 1.0})
    return {"gpu": "G", "records": recs}


def test_each_arm_is_compared_with_the_bf16_of_its_own_call(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(_transfer()))
    (tmp_path / "a.json").write_text(json.dumps([_rec("bf16", "l3hit", 0.140, 0.0070),
                                                  _rec("kv8", "l3hit", 0.084, 0.0071, call_bytes=30466)]))
    (tmp_path / "b.json").write_text(json.dumps([_rec("bf16", "l3hit", 0.100, 0.0068),
                                                  _rec("kv4", "l3hit", 0.060, 0.0072, call_bytes=16130)]))
    out = tmp_path / "r.json"
    assert tr.main(["--transfer", str(tmp_path / "t.json"), "--e2e", f"c1={tmp_path / 'a.json'}",
                    f"c2={tmp_path / 'b.json'}", "--label", "run x", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    rows = {(r["call"], r["arm"]): r for r in rep["e2e"]}
    assert rows[("c1", "kv8")]["ttft_vs_bf16"] == pytest.approx(0.084 / 0.140)
    assert rows[("c2", "kv4")]["ttft_vs_bf16"] == pytest.approx(0.060 / 0.100)  # not against c1's bf16
    assert rows[("c2", "kv4")]["l3_read_fewer_x"] == pytest.approx(57344 / 16130)
    assert rows[("c2", "kv4")]["l3_written_bytes_per_token"] == pytest.approx(16130)
    assert rows[("c2", "kv4")]["tpot_vs_bf16"] == pytest.approx(0.0072 / 0.0068)
    assert [r["config"] for r in rep["load"]] == ["KV4", "KV4", "KV8"] and rep["backup"] == []
    t = "\n".join(rep["targets"])
    assert "load KV4 64 pages >= 3.2x SGLang bf16: 3.50x" in t and "PASS" in t
    assert "load KV4 16 pages >= 2.0x SGLang bf16: 1.80x (0.500 against 0.900 ms) MISS" in t
    assert "L3-hit TTFT KV4 <= 0.7x bf16 (c2, file): 0.600x PASS" in t
    assert "TPOT kv4 l3 l3hit (c2, file) at most +3% over bf16: 1.059x MISS" in t
    assert "| c2 | file | l3hit | kv4 |" in capsys.readouterr().out


def test_files_of_different_gpus_are_refused(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(_transfer()))
    other = _rec("bf16", "l3hit", 0.1, 0.007)
    other["gpu"] = "H"
    (tmp_path / "a.json").write_text(json.dumps([other]))
    with pytest.raises(SystemExit, match="different GPUs"):
        tr.main(["--transfer", str(tmp_path / "t.json"), "--e2e", f"c={tmp_path / 'a.json'}", "--label", "x",
                 "--out", str(tmp_path / "r.json")])
    (tmp_path / "b.json").write_text(json.dumps([dict(_rec("bf16", "l3hit", 0.1, 0.007), run="run 1 call 2")]))
    with pytest.raises(SystemExit, match="whose run contains 'run 2'"):
        tr.main(["--transfer", str(tmp_path / "t.json"), "--e2e", f"c={tmp_path / 'b.json'}:run 2", "--label", "x",
                 "--out", str(tmp_path / "r.json")])
    failed = dict(_rec("kv4", "chat", 0.1, 0.007), ttft_mean_s=None)
    (tmp_path / "f.json").write_text(json.dumps([failed]))
    with pytest.raises(SystemExit, match="without TTFT or TPOT.*l3/chat/kv4 rep 0"):
        tr.main(["--transfer", str(tmp_path / "t.json"), "--e2e", f"c={tmp_path / 'f.json'}", "--label", "x",
                 "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="CALL=PATH"):
        tr.main(["--transfer", str(tmp_path / "t.json"), "--e2e", str(tmp_path / "a.json"), "--label", "x",
                 "--out", str(tmp_path / "r.json")])


def test_backup_checks_and_the_quantize_clause():
    backup = [{"config": "KV4", "pages": n, "time_ms": t, "sglang_bf16_ms": sg, "speedup_vs_sglang_bf16": sg / t,
               "vs_own_bytes_single_dma": x} for n, t, sg, x in ((1, 0.109, 0.081, 4.2), (256, 5.0, 18.0, 1.07))]
    slow = [{"config": "KV4", "pages": 256, "eff_bf16_GBps": 700.0, "eff_bf16_GBps_queued": 754.0}]
    t = tr.backup_targets(backup, slow)
    assert t[0] == "backup KV4 1 pages not slower than SGLang bf16: 0.74x (0.109 against 0.081 ms) MISS"
    assert t[1].endswith("PASS")
    assert "slowest quantize 754 GB/s; KV4 backup at most 4.20x one DMA of its bytes (at 1 pages; 2 sizes) MISS" in t[2]
    backup[0]["vs_own_bytes_single_dma"] = 1.15  # every size within 1.2x of its DMA: the clause's second half
    assert tr.backup_targets(backup, slow)[2].endswith("PASS")
    backup[0]["vs_own_bytes_single_dma"] = 4.2
    fast = [dict(slow[0], eff_bf16_GBps_queued=1010.0)]  # or quantize at 1 TB/s
    assert tr.backup_targets(backup, fast)[2].endswith("PASS")

