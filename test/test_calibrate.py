"""The calibration tool: allocation (pure), budgets, calibration text, YAML output, and the layer
replay + search on a tiny random model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from kvtuner_hicache.calibrate import (
    Calibrator,
    Measured,
    _hull,
    _pairs,
    allocate,
    allocate_exact,
    budget_bytes,
    calibration_spans,
    eval_spans,
    layer_bytes,
    overlaps,
    search,
    to_yaml,
)
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig, load_layer_bits, table_flag_errors
from kvtuner_hicache.page_format import PageLayout

PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]


def test_layer_bytes_follow_the_page_format():
    shape = KVShape.mha(28, 4, 128)
    b = {p: layer_bytes(QuantConfig(), shape, 64, p) for p in PAIRS}
    assert b[(8, 8)] > b[(8, 4)] > b[(4, 4)] > b[(4, 2)] > b[(2, 2)]
    # codes are exactly bits/8 per element; the rest is per-group fp16 metadata
    assert b[(4, 4)] - b[(2, 2)] == 64 * 4 * 128 * 2 * (4 - 2) // 8
    # 3-bit codes cost exactly 3/8 byte per element too, and parse from --pairs
    b3 = {p: layer_bytes(QuantConfig(), shape, 64, p) for p in [(3, 2), (3, 3)]}
    assert b3[(3, 2)] - b[(2, 2)] == 64 * 4 * 128 * (3 - 2) // 8 and b[(4, 2)] - b3[(3, 2)] == b3[(3, 2)] - b[(2, 2)]
    assert b3[(3, 3)] - b3[(3, 2)] == b3[(3, 2)] - b[(2, 2)]
    assert _pairs("K3V2,k3v3") == [(3, 2), (3, 3)]


def test_hull_drops_dominated_and_non_convex_points():
    pts = [(10, 1.0, "a"), (20, 0.5, "b"), (30, 0.45, "c"), (40, 0.0, "d"), (25, 0.9, "dominated")]
    assert [p[2] for p in _hull(pts)] == ["a", "b", "d"]


def test_allocation_spends_bits_where_the_kl_is():
    costs = [{p: (p[0] + p[1]) * 10 for p in PAIRS} for _ in range(4)]
    # layer 2 is very key-sensitive, the others are not
    kl = [{p: (10.0 if i == 2 else 0.1) / (p[0] * p[1]) for p in PAIRS} for i in range(4)]
    cheapest = sum(c[(2, 2)] for c in costs)
    table = allocate(costs, kl, cheapest + 120)
    assert table[2] == (8, 8)
    assert all(table[i] == (2, 2) for i in (0, 1, 3))
    assert sum(costs[i][p] for i, p in enumerate(table)) <= cheapest + 120
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(costs, kl, cheapest - 1)


def test_allocation_uses_the_budget_when_it_helps():
    costs = [{p: (p[0] + p[1]) * 10 for p in PAIRS} for _ in range(3)]
    kl = [{p: 1.0 / (p[0] + p[1]) for p in PAIRS} for _ in range(3)]
    table = allocate(costs, kl, sum(c[(8, 8)] for c in costs))
    assert table == [(8, 8)] * 3


def test_yaml_output_is_a_kvtuner_table(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(to_yaml([(8, 4), (4, 2)], ["made by a test"]))
    table = load_layer_bits(path)
    assert (table[0].key, table[0].value, table[1].key, table[1].value) == (8, 4, 4, 2)


# ---- exact allocation, budgets, calibration text, the layer replay ------------------------------

def test_exact_allocation_matches_brute_force():
    rng = random.Random(0)
    pairs = [(2, 2), (2, 4), (4, 2), (4, 4)]
    for _ in range(30):
        n = 4
        costs = [{p: 128 * (p[0] + p[1] + rng.randint(0, 2)) for p in pairs} for _ in range(n)]
        value = [{p: rng.uniform(-1, 1) for p in pairs} for _ in range(n)]
        budget = rng.randint(sum(min(c.values()) for c in costs), sum(max(c.values()) for c in costs))
        best = min((v for v in itertools.product(pairs, repeat=n) if sum(costs[i][p] for i, p in enumerate(v)) <= budget),
                   key=lambda v: sum(value[i][p] for i, p in enumerate(v)))
        got = allocate_exact(costs, value, budget)
        assert sum(costs[i][p] for i, p in enumerate(got)) <= budget
        assert sum(value[i][p] for i, p in enumerate(got)) == pytest.approx(sum(value[i][p] for i, p in enumerate(best)))
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_exact(costs, value, 10)


def test_budget_counts_the_header_so_tables_never_exceed_it():
    shape = KVShape.mha(28, 2, 128)
    cfg = QuantConfig()
    for bits in (2.5, 3.0, 3.5):
        b = budget_bytes(bits, shape, 64)
        costs = [{p: layer_bytes(cfg, shape, 64, p) for p in PAIRS} for _ in range(28)]
        table = allocate_exact(costs, [{p: -(p[0] + p[1]) for p in PAIRS} for _ in range(28)], b) if bits > 2.5 else None
        if table:
            lay = PageLayout(cfg.with_(layer_bits={i: LayerBits(*p) for i, p in enumerate(table)}), shape, 64)
            assert lay.effective_bits <= bits
    # uniform K4V2 is 3.5 bits of codes + metadata plus the 128-byte header: just over a 3.5 budget
    assert 28 * layer_bytes(cfg, shape, 64, (4, 2)) > budget_bytes(3.5, shape, 64)
    # and uniform K2V2 just over 2.5: no table of {2,4,8}-bit layers fits 2.5 bits
    assert 28 * layer_bytes(cfg, shape, 64, (2, 2)) > budget_bytes(2.5, shape, 64)


def test_calibration_text_is_clear_of_the_evaluation_windows():
    avoid = eval_spans(149_686, 12, 2049)
    spans = calibration_spans(149_686, 4, 1153, avoid)
    assert len(spans) == 4 and not overlaps(spans, avoid) and all(e - s == 1153 for s, e in spans)
    assert overlaps([(0, 10)], [(5, 20)]) and not overlaps([(0, 10)], [(10, 20)])
    with pytest.raises(ValueError, match="gaps"):
        calibration_spans(149_686, 20, 1153, avoid)


def _tiny():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_replayed_layers_give_the_full_forward_and_search_runs():
    from kvtuner_hicache.eval.harness import Harness
    from kvtuner_hicache.eval.models import kv_shape_of

    model = _tiny()
    shape = kv_shape_of(model.config)
    h = Harness(model, shape, 16, batch=3)
    cfg = QuantConfig(q_group_size=16)
    pairs = [(2, 2), (4, 2), (4, 4)]
    cal = Calibrator(h, cfg, pairs, progress=False)
    ids = torch.randint(0, 256, (97,), generator=torch.Generator().manual_seed(3)).tolist()
    cal.add_window(ids, 64)
    table = [(4, 2)] * 3
    m = cal.measure(table)
    # each marginal (computed from a replayed layer i on) equals a full forward of that table
    for i in range(3):
        for p in pairs:
            t = list(table)
            t[i] = p
            assert m.marginal[i][p] == pytest.approx(cal.table_kl(t), rel=1e-4, abs=1e-7)
    assert m.marginal[0][(4, 2)] == pytest.approx(m.kl)
    costs = [{p: layer_bytes(cfg, shape, 16, p) for p in pairs} for _ in range(3)]
    res = search(cal, costs, sum(c[(4, 2)] for c in costs), table, rounds=2, first=m, log=lambda s: None)
    assert sum(costs[i][tuple(p)] for i, p in enumerate(res["table"])) <= sum(c[(4, 2)] for c in costs)
    assert res["kl"] <= m.kl + 1e-12  # the anchor fits this budget, so the best is never worse
    # the YAML it writes records its flags, and a server with other flags is told what to pass
    assert table_flag_errors(QuantConfig(layer_bits={0: LayerBits(4, 2)}, axis_key=0), {"axis_key": 1})


def test_the_nll_objective_scores_tables_by_the_text_s_own_tokens():
    from kvtuner_hicache.eval.harness import Harness, compare
    from kvtuner_hicache.eval.models import kv_shape_of

    model = _tiny()
    h = Harness(model, kv_shape_of(model.config), 16, batch=3)
    pairs = [(2, 2), (4, 4)]
    ids = torch.randint(0, 256, (97,), generator=torch.Generator().manual_seed(5)).tolist()
    cals = {o: Calibrator(h, QuantConfig(q_group_size=16), pairs, progress=False, objective=o) for o in ("kl", "nll")}
    for c in cals.values():
        c.add_window(ids, 64)
    w = cals["nll"].windows[0]
    for table in ([(2, 2)] * 3, [(4, 4)] * 3):
        (_, logits), = h.forward(w.cache, [("t", cals["nll"]._kv(w, table))], w.feed)
        nll, kl, _ = compare(logits, w.targets, w.ref)
        assert cals["nll"].table_kl(table) == pytest.approx(nll / len(w.feed), rel=1e-6)
        assert cals["kl"].table_kl(table) == pytest.approx(kl / len(w.feed), rel=1e-6)
    m = cals["nll"].measure([(4, 4)] * 3)  # replayed marginals score the same objective
    t = [(4, 4)] * 3
    t[1] = (2, 2)
    assert m.marginal[1][(2, 2)] == pytest.approx(cals["nll"].table_kl(t), rel=1e-4)
    with pytest.raises(ValueError, match="objective"):
        Calibrator(h, QuantConfig(), pairs, objective="ppl")


def test_pessimistic_value_charges_each_change_its_uncertainty():
    from kvtuner_hicache.calibrate import Measured, pessimistic_value

    m = Measured(0.10, [{(4, 2): 0.10, (3, 2): 0.09, (2, 2): 0.20}], 0.0,
                 [{(4, 2): 0.0, (3, 2): 0.02, (2, 2): 0.01}])
    table = [(4, 2)]
    assert pessimistic_value(m, table, 0.0)[0] == pytest.approx({(4, 2): 0.0, (3, 2): -0.01, (2, 2): 0.10})
    assert pessimistic_value(m, table, 1.0)[0] == pytest.approx({(4, 2): 0.0, (3, 2): 0.01, (2, 2): 0.11})
    # a Measured without standard errors (one window) is valued by its means
    assert pessimistic_value(Measured(0.1, m.marginal, 0.0), table, 3.0)[0][(3, 2)] == pytest.approx(-0.01)


class _StubCalibrator:
    """search()'s view of a Calibrator: a Measured per context and a KL per table (here: additive)."""

    pairs = [(4, 2), (2, 2), (4, 4)]
    objective = "kl"

    def __init__(self, gain: dict, se: float):
        self.gain, self.se = gain, se

    def table_kl(self, table):
        return 0.1 + sum(self.gain[p] for p in table)

    def measure(self, table, label=""):
        kl = self.table_kl(table)
        marginal = [{p: kl - self.gain[table[i]] + self.gain[p] for p in self.pairs} for i in range(len(table))]
        se = [{p: 0.0 if p == table[i] else self.se for p in self.pairs} for i in range(len(table))]
        return Measured(kl, marginal, 0.0, se)


def test_search_keeps_the_anchor_where_only_noise_favours_a_change():
    """K4V4 on one layer paid by K2V2 on another gains 0.001 KL in the means; with a standard error of 0.01 per
    change, z = 1 keeps uniform K4V2 and z = 0 takes the trade."""
    cal = _StubCalibrator({(4, 2): 0.0, (2, 2): 0.004, (4, 4): -0.005}, se=0.01)
    costs = [{(4, 2): 10, (2, 2): 8, (4, 4): 12} for _ in range(3)]
    anchor = [(4, 2)] * 3
    taken = search(cal, costs, 30, anchor, rounds=1, log=lambda s: None, z=0.0)["table"]
    assert sorted(taken) == [(2, 2), (4, 2), (4, 4)]
    assert search(cal, costs, 30, anchor, rounds=1, log=lambda s: None, z=1.0)["table"] == anchor


def test_standard_errors_are_those_of_the_per_window_kl_changes():
    """With two windows, a change's standard error is half the gap between its two per-window KL changes."""
    from kvtuner_hicache.eval.harness import Harness
    from kvtuner_hicache.eval.models import kv_shape_of

    model = _tiny()
    shape = kv_shape_of(model.config)
    cfg = QuantConfig(q_group_size=16)
    pairs = [(2, 2), (4, 2)]
    gen = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, 256, (97,), generator=gen).tolist() for _ in range(2)]
    both = Calibrator(Harness(model, shape, 16, batch=2), cfg, pairs, progress=False)
    singles = []
    for ids in windows:
        both.add_window(ids, 64)
        one = Calibrator(Harness(model, shape, 16, batch=2), cfg, pairs, progress=False)
        one.add_window(ids, 64)
        singles.append(one)
    table = [(4, 2)] * 3
    m = both.measure(table)
    changed = [(2, 2)] + table[1:]
    d = [one.table_kl(changed) - one.table_kl(table) for one in singles]
    assert m.marginal_se[0][(2, 2)] == pytest.approx(abs(d[0] - d[1]) / 2, rel=1e-4, abs=1e-9)
    assert m.marginal_se[0][(4, 2)] == 0.0


def test_auto_anchor_is_the_uniform_pair_at_the_budget():
    """K3V2 for 3.0 bits (the header puts it 0.001 bit over), K4V2 for 3.5 (ties with K3V3 and K2V4 go to more
    key bits), K4V4 for 4.5."""
    from kvtuner_hicache.calibrate import anchor_for

    shape, cfg = KVShape.mha(28, 2, 128), QuantConfig()
    pairs = [(2, 2), (2, 4), (3, 2), (3, 3), (4, 2), (4, 4)]
    costs = {p: layer_bytes(cfg, shape, 64, p) for p in pairs}
    for bits, want in ((3.0, (3, 2)), (3.5, (4, 2)), (4.5, (4, 4))):
        assert anchor_for(costs, 28, budget_bytes(bits, shape, 64)) == want
