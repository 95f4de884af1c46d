"""benchmark/bench_page_check.py: its sealed pages pass both checks and it writes its table as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import bench_page_check as bpc  # noqa: E402
from kvtuner_hicache.config import KVShape, QuantConfig  # noqa: E402
from kvtuner_hicache.page_format import PageLayout  # noqa: E402


def test_sealed_pages_pass_and_a_flip_fails_both_checks():
    lay = PageLayout(QuantConfig(), KVShape.mha(2, 2, 64), 64)
    pages, keys, model = bpc.sealed_pages(lay, 5)
    assert bpc.one_thread(lay, pages, keys, model) is None
    assert lay.first_bad_page(pages, keys, model) is None
    pages[3][-1] ^= 0x01
    assert bpc.one_thread(lay, pages, keys, model) == (3, "checksum mismatch")
    assert lay.first_bad_page(pages, keys, model) == (3, "checksum mismatch")


def test_main_writes_every_row(tmp_path):
    out = tmp_path / "r.json"
    assert bpc.main(["--pages", "4", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["busy_thread"], r["check"]) for r in rows} == {
        (b, c) for b in (False, True) for c in ("one thread, page by page", "first_bad_page, crc32c package")}
    assert all(r["median_s"] > 0 and r["pages"] == 4 for r in rows)
