"""Paired bootstrap statistics of the accuracy harness (no model needed)."""

from __future__ import annotations

import math
import random

import pytest
from kvtuner_hicache.eval import stats as S
from kvtuner_hicache.eval.report import markdown, pairwise, pairwise_markdown, text_delta


def _windows(n: int, shift: float, noise: float, seed: int, tokens: int = 512) -> tuple[list[float], list[float], list[int]]:
    """Per-window NLL sums of a reference and a config whose per-token NLL is `shift` higher, plus
    window-level noise shared by both (the text) and config-only noise."""
    rng = random.Random(seed)
    ref, cfg = [], []
    for _ in range(n):
        text = rng.gauss(2.8, 0.3)  # the window's difficulty, common to both configs
        ref.append(text * tokens)
        cfg.append((text + shift + rng.gauss(0.0, noise)) * tokens)
    return cfg, ref, [tokens] * n


def test_point_estimate_is_the_pooled_ppl_ratio():
    a, b, n = [1000.0, 1100.0], [990.0, 1080.0], [500, 500]
    assert S.ppl_delta_pct(a, b, n) == pytest.approx(100 * (math.exp(30 / 1000) - 1))
    iv = S.paired_ppl_delta(a, b, n)
    assert iv.value == pytest.approx(S.ppl_delta_pct(a, b, n))
    assert iv.lo <= iv.value <= iv.hi and iv.n == 2


def test_interval_is_deterministic_and_seeded():
    a, b, n = _windows(10, 0.01, 0.005, 1)
    assert S.paired_ppl_delta(a, b, n) == S.paired_ppl_delta(a, b, n)
    assert S.paired_ppl_delta(a, b, n, seed=1) != S.paired_ppl_delta(a, b, n, seed=2)


def test_pairing_removes_the_shared_text_noise():
    # a +1 % shift with large window-to-window text variation: paired, it is resolved
    a, b, n = _windows(12, 0.01, 0.002, 3)
    iv = S.paired_ppl_delta(a, b, n)
    assert iv.resolved and iv.lo > 0 and iv.value == pytest.approx(1.0, abs=0.2)


def test_no_difference_is_not_resolved_and_one_window_never_is():
    a, b, n = _windows(12, 0.0, 0.01, 4)
    assert not S.paired_ppl_delta(a, b, n).resolved
    one = S.paired_ppl_delta(a[:1], b[:1], n[:1])
    assert one.lo == one.hi == one.value and not one.resolved


def test_coverage_of_the_window_bootstrap():
    # ~95 % of intervals should contain the true shift; allow a generous band for 100 trials
    true_pct = 100 * math.expm1(0.004)
    ivs = [S.paired_ppl_delta(*_windows(20, 0.004, 0.01, s)) for s in range(100)]
    hits = sum(iv.lo <= true_pct <= iv.hi for iv in ivs)
    assert 82 <= hits <= 100


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="paired units"):
        S.paired_ppl_delta([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(ValueError, match="paired units"):
        S.paired_mean_delta([1.0], [1.0, 0.0])


def test_mean_and_accuracy_intervals():
    correct = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 4
    iv = S.mean_interval(correct)
    assert iv.value == pytest.approx(0.7) and iv.lo < 0.7 < iv.hi and iv.resolved
    same = S.paired_mean_delta(correct, correct)
    assert same.value == same.lo == same.hi == 0.0 and not same.resolved
    # GSM8K-style: per-item NLL sums weighted by answer tokens
    d = S.paired_mean_delta([12.0, 30.0], [10.0, 29.0], [100, 200])
    assert d.value == pytest.approx(3.0 / 300)


def test_blocks_and_windows_needed():
    sums, counts = S.blocks([[1.0] * 70, [2.0] * 64], 32)
    assert counts == [32, 32, 6, 32, 32] and sums == [32.0, 32.0, 6.0, 64.0, 64.0]
    # spread 0.8 % per window: ±0.3 % needs (1.96 * 0.8 / 0.3)^2 = 27.3 -> 28 windows
    x = [0.8, -0.8] * 10
    sd = math.sqrt(sum(v * v for v in x) / (len(x) - 1))
    assert S.windows_needed(x, 0.3) == math.ceil((1.96 * sd / 0.3) ** 2)
    assert S.windows_needed([1.0], 0.3) is None


def _record(name: str, win: list[float], tokens: list[int], bits: float, kl: float) -> dict:
    per_block = [w / 16 for w in win for _ in range(16)]  # 512 tokens = 16 blocks of 32
    return {"config": name, "effective_bits": bits, "compression_ratio": 16 / bits, "kl": kl,
            "nll_sum_per_window": win, "tokens_per_window": tokens, "nll_sum_per_block32": per_block,
            "tokens_per_block32": [32] * len(per_block)}


def test_records_compare_pairwise_and_render():
    a, b, n = _windows(8, 0.01, 0.002, 5)
    c, _, _ = _windows(8, 0.011, 0.002, 5)
    ra, rb, rc = _record("K4cV2t-a-g64", a, n, 3.5, 0.01), _record("bf16", b, n, 16, 0.0), _record("table:x", c, n, 3.4, 0.012)
    d = text_delta(ra, rb)
    assert d["window"]["resolved"] and d["block64"]["n"] == 8 * 8 and d["windows_for_0.3pct"] >= 2
    rows = pairwise([ra, rb, rc], [("table:x", "K4cV2t-a-g64"), ("missing", "bf16")])
    assert [r["a"] for r in rows] == ["table:x", "missing"]  # a pair that cannot be compared says why
    assert rows[1] == {"a": "missing", "b": "bf16", "note": "not in this run: missing"}
    md = pairwise_markdown(rows)
    assert "table:x" in md and "not in this run: missing" in md
    ra["stats"] = {"ppl_delta_pct": d}
    ra["ppl"] = 18.0
    rb["is_reference"] = True
    table = markdown([rb, ra])
    assert "**R**" in table and "| ref |" in table
    with pytest.raises(ValueError, match="not paired"):
        text_delta(ra, _record("other", a[:4], n[:4], 3.5, 0.0))


def test_old_records_are_reanalysed_and_pairs_parse():
    from kvtuner_hicache.eval.report import parse_pairs, reanalyze

    old = {"records": [
        {"config": "bf16", "effective_bits": 16.0, "compression_ratio": 1.0, "ppl_per_window": [10.0, 12.0, 11.0, 9.0, 10.5],
         "scored_tokens": 2560},
        {"config": "K4cV2t-a-g64", "effective_bits": 3.5, "compression_ratio": 4.57,
         "ppl_per_window": [10.1, 12.1, 11.1, 9.1, 10.6], "scored_tokens": 2560},
    ]}
    out = reanalyze(old, parse_pairs("K4cV2t-a-g64 vs bf16"))
    st = out["records"][1]["stats"]["ppl_delta_pct"]["window"]
    assert st["n"] == 5 and st["resolved"] and st["lo"] > 0.8
    assert out["pairwise"][0]["window"]["value"] == pytest.approx(st["value"])
    assert parse_pairs("table:a/b.yaml vs K4cV2t-a-g64, x vs y") == [("table:a/b.yaml", "K4cV2t-a-g64"), ("x", "y")]
    with pytest.raises(ValueError, match="expected 'A vs B'"):
        parse_pairs("a:b")
    # three windows: an interval is shown, but never called resolved
    three = S.paired_ppl_delta([1030.0, 1020.0, 1010.0], [1000.0, 1000.0, 1000.0], [512] * 3)
    assert three.lo > 0 and not three.resolved


def test_wilson_interval():
    iv = S.wilson(5, 6)
    assert iv.value == pytest.approx(5 / 6) and 0.40 < iv.lo < 0.45 and 0.96 < iv.hi < 0.98
    assert S.wilson(0, 10).lo == pytest.approx(0.0, abs=1e-12)


def test_runs_on_the_same_windows_merge():
    from kvtuner_hicache.eval.report import merge

    meta = {"model": "m", "windows": 5, "prefix_len": 64, "score_len": 32, "page_size": 16, "command": "x"}
    ref = {"config": "bf16", "effective_bits": 16.0, "compression_ratio": 1.0, "ppl_per_window": [10.0, 12.0, 11.0, 9.0, 10.5],
           "scored_tokens": 160}
    one = {"meta": meta, "records": [ref, {**ref, "config": "A", "ppl_per_window": [10.1, 12.1, 11.1, 9.1, 10.6]}]}
    two = {"meta": meta, "records": [ref, {**ref, "config": "B", "ppl_per_window": [10.2, 12.2, 11.2, 9.2, 10.7]}]}
    both = merge([one, two])
    assert [r["config"] for r in both["records"]] == ["bf16", "A", "B"]
    with pytest.raises(ValueError, match="differ in"):
        merge([one, {**two, "meta": {**meta, "windows": 4}}])
    assert both["meta"]["merge_ref_max_rel_diff"] == 0.0
    # another thread count: the same windows within 1e-5 relative merge, and the gap is recorded
    near = {**ref, "ppl_per_window": [10.0 * (1 + 1e-5), 12.0, 11.0, 9.0, 10.5]}
    close = merge([one, {"meta": meta, "records": [near, two["records"][1]]}])
    assert 0 < close["meta"]["merge_ref_max_rel_diff"] < 1e-4
    other_ref = {**ref, "ppl_per_window": [10.0, 12.0, 11.0, 9.0, 10.6]}
    with pytest.raises(ValueError, match="references differ"):
        merge([one, {"meta": meta, "records": [other_ref]}])


def test_runs_on_different_windows_concatenate():
    from kvtuner_hicache.eval.report import concat, reanalyze

    def run(ppls_ref, ppls_a, offsets):
        meta = {"model": "m", "windows": len(offsets), "prefix_len": 64, "score_len": 32, "page_size": 16,
                "window_offsets": offsets}
        ref = {"config": "bf16", "effective_bits": 16.0, "compression_ratio": 1.0, "ppl_per_window": ppls_ref,
               "scored_tokens": 32 * len(offsets), "kl": 0.0}
        return {"meta": meta, "records": [ref, {**ref, "config": "A", "ppl_per_window": ppls_a, "kl": 0.01}]}

    a = run([10.0, 12.0, 11.0], [10.1, 12.1, 11.1], [0, 200, 400])
    b = run([9.0, 10.5], [9.1, 10.6], [100, 300])
    out = reanalyze(concat([a, b]))
    rec = next(r for r in out["records"] if r["config"] == "A")
    assert len(rec["nll_sum_per_window"]) == 5 and out["meta"]["windows"] == 5
    assert rec["stats"]["ppl_delta_pct"]["window"]["n"] == 5 and rec["kl"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="appears in two runs"):
        concat([a, a])


def test_pairwise_compares_task_items_between_configs():
    """GSM8K and MMLU are paired per item between configs too (a tasks-only run has no windows)."""
    def rec(name: str, nll: list[float], correct: list[int]) -> dict:
        return {"config": name, "effective_bits": 4.5, "compression_ratio": 3.5, "kl": None,
                "gsm8k": {"item_nll": nll, "item_tokens": [100] * len(nll)}, "mmlu": {"item_correct": correct}}

    base = [50.0 + i for i in range(10)]
    a = rec("A", [x + 2.0 for x in base], [1, 1, 0, 1, 0, 1, 1, 0, 1, 1])  # +0.02 nats per token on every item
    b = rec("B", base, [1, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    (row,) = pairwise([a, b], [("A", "B")])
    assert "window" not in row and "note" not in row
    g = row["gsm8k_delta_nll"]
    assert g["value"] == pytest.approx(0.02) and g["lo"] == pytest.approx(0.02) and g["resolved"]
    m = row["mmlu_delta_acc"]
    assert m["value"] == pytest.approx(0.1) and m["n"] == 10 and m["lo"] <= 0.1 <= m["hi"]
    assert "+0.0200" in pairwise_markdown([row])
    short = rec("C", base[:5], [1] * 5)
    with pytest.raises(ValueError, match="not paired"):
        pairwise([a, short], [("A", "C")])
    (none,) = pairwise([{**a, "gsm8k": None, "mmlu": None}, b], [("A", "B")])
    assert none["note"] == "no windows or task items in common"


@pytest.mark.parametrize("compare, says", [
    ("K4cV4t-a-g64:bf16", "expected 'A vs B'"),
    ("K2cV2t-a-g64 vs bf16", "K2cV2t-a-g64, which --configs/--sweep/--add-configs do not run"),
])
def test_a_bad_compare_fails_before_the_model_loads(compare, says, capsys, monkeypatch):
    from kvtuner_hicache.eval import cli

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --compare was checked")

    monkeypatch.setattr(cli.models, "load", no_model)
    assert cli.main(["--configs", "bf16,K4cV4t-a-g64", "--compare", compare, "--no-fetch"]) == 2
    assert says in capsys.readouterr().err


def test_calibration_overlap_check_uses_the_windows_the_run_scores(tmp_path):
    """With --window-indices the check looks at the picked windows' own tokens, not at a layout of that many."""
    from kvtuner_hicache.calibrate import to_yaml
    from kvtuner_hicache.config import QuantConfig, load_layer_bits
    from kvtuner_hicache.eval.cli import calibration_overlaps
    from kvtuner_hicache.eval.configs import EvalConfig

    path = tmp_path / "t.yaml"
    path.write_text(to_yaml([(4, 2)] * 2, ["test"], {"format": 1, "calibration_spans": [[34290, 34867]]}))
    cfg = EvalConfig("table", QuantConfig(layer_bits=load_layer_bits(path)))
    assert calibration_overlaps([cfg], [31801, 37101], 1280) == []  # the windows around the span
    notes = calibration_overlaps([cfg], [5300, 34000], 1280)
    assert len(notes) == 1 and "overlap evaluation window (34000, 35280)" in notes[0]
