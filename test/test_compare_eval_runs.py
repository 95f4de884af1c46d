"""benchmark/compare_eval_runs.py: configs are matched by name over the same windows, differences are relative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmark" / "compare_eval_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
import compare_eval_runs as cer  # noqa: E402


def _run(ppl: dict[str, list[float]], offsets=(0, 100)) -> dict:
    recs = []
    for name, per in ppl.items():
        mean = sum(per) / len(per)
        recs.append({"config": name, "ppl": mean, "ppl_per_window": per, "ppl_delta_pct": 100 * (mean / 10.0 - 1),
                     "kl": 0.01})
    return {"meta": {"window_offsets": list(offsets), "prefix_len": 8, "score_len": 4}, "records": recs}


def test_rows_pair_configs_by_name_and_report_relative_differences():
    before = _run({"bf16": [10.0, 10.0], "KV4": [11.0, 12.0], "only-before": [1.0, 1.0]})
    after = _run({"bf16": [10.0, 10.0], "KV4": [11.0, 12.6], "only-after": [1.0, 1.0]})
    rows = {r["config"]: r for r in cer.rows(before, after)}
    assert set(rows) == {"bf16", "KV4"}
    assert rows["bf16"]["ppl_rel_diff"] == 0.0
    assert rows["KV4"]["max_window_rel_diff"] == pytest.approx(0.05)
    assert rows["KV4"]["ppl_rel_diff"] == pytest.approx(11.8 / 11.5 - 1)


def test_runs_of_other_windows_are_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run({"KV4": [11.0, 12.0]})))
    b.write_text(json.dumps(_run({"KV4": [11.0, 12.0]}, offsets=(0, 200))))
    out = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True)
    assert out.returncode != 0 and "different windows" in out.stderr
