"""benchmark/backup_defaults.py: a path's limit is the largest batch up to which it never loses, in every config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmark" / "backup_defaults.py"
sys.path.insert(0, str(SCRIPT.parent))
import backup_defaults as bd  # noqa: E402


def _recs(config: str, table: dict[int, dict[str, float]]) -> list[dict]:
    return [{"direction": "backup-variant", "shape": "S", "config": config, "pages": n, "variant": v, "time_ms": t}
            for n, row in table.items() for v, t in row.items()]


def _row(staged: float, one: float, direct: float | None = None, both: float | None = None) -> dict[str, float]:
    r = {"staged": staged, "one-launch": one}
    if direct is not None:
        r.update({"direct": direct, "direct+one-launch": both})
    return r


def test_limits_stop_at_the_first_size_where_a_path_loses():
    kv4 = _recs("KV4", {1: _row(0.08, 0.08, 0.05, 0.05), 2: _row(0.10, 0.10, 0.07, 0.07),
                        16: _row(0.40, 0.40, 0.50, 0.50), 64: _row(1.3, 1.3, 1.2, 1.2), 256: _row(5.1, 5.3)})
    mixed = _recs("mixed", {1: _row(0.11, 0.08, 0.09, 0.06), 2: _row(0.13, 0.10, 0.11, 0.08),
                            16: _row(0.44, 0.40, 0.50, 0.45), 64: _row(1.33, 1.30, 1.5, 1.4), 256: _row(4.9, 4.8)})
    res = bd.suggest(kv4 + mixed, tol=0.02)
    # direct: KV4 loses at 16 (0.50 > 0.40), so 64's win does not count; mixed loses at 16 too
    assert res["per_config"]["S KV4"]["direct_backup_pages"] == 2
    assert res["per_config"]["S mixed"]["direct_backup_pages"] == 2
    # one launch: never slower for mixed (up to 256); KV4 ties until 256, where 5.3 > 5.1 * 1.02
    assert res["per_config"]["S mixed"]["all_classes_pages"] == 256
    assert res["per_config"]["S KV4"]["all_classes_pages"] == 64
    assert (res["direct_backup_pages"], res["all_classes_pages"]) == (2, 64)


def test_a_path_that_loses_at_the_smallest_size_gets_zero_and_tolerance_counts():
    recs = _recs("KV8", {1: _row(0.100, 0.1015, 0.104, 0.104), 2: _row(0.1, 0.1, 0.09, 0.09)})
    res = bd.suggest(recs, tol=0.02)
    assert res["direct_backup_pages"] == 0  # 0.104 > 0.100 * 1.02 at one page: never direct
    assert res["all_classes_pages"] == 2  # 0.1015 is inside 2 % of 0.100
    assert bd.suggest(recs, tol=0.05)["direct_backup_pages"] == 2


def test_no_sweep_records_is_an_error_and_the_cli_prints_the_table(tmp_path):
    with pytest.raises(ValueError, match="--backup-sweep"):
        bd.suggest([{"direction": "backup", "pages": 1}])
    f = tmp_path / "bench.json"
    f.write_text(json.dumps({"gpu": "G", "records": _recs("KV4", {1: _row(0.08, 0.08, 0.05, 0.05)})}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(f), "--json", str(tmp_path / "o.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "every config" in out and json.loads((tmp_path / "o.json").read_text())["direct_backup_pages"] == 1
