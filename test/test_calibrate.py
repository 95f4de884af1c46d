"""The calibration tool's allocation (pure) and its YAML output; the model part runs in the smoke test."""

from __future__ import annotations

import pytest
from kvtuner_hicache.calibrate import _hull, allocate, layer_bytes, to_yaml
from kvtuner_hicache.config import KVShape, QuantConfig, load_layer_bits

PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]


def test_layer_bytes_follow_the_page_format():
    shape = KVShape.mha(28, 4, 128)
    b = {p: layer_bytes(QuantConfig(), shape, 64, p) for p in PAIRS}
    assert b[(8, 8)] > b[(8, 4)] > b[(4, 4)] > b[(4, 2)] > b[(2, 2)]
    # codes are exactly bits/8 per element; the rest is per-group fp16 metadata
    assert b[(4, 4)] - b[(2, 2)] == 64 * 4 * 128 * 2 * (4 - 2) // 8


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
