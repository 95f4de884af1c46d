#!/usr/bin/env python3
"""The small-backup thresholds that a `bench_transfer.py --backup-sweep` run supports (CPU, reads JSON, no timing).

Kernel 0.10.0's backup op has two paths that the codec turns on by batch size (quant/codec.py):
`DIRECT_BACKUP_PAGES` (encode straight into the mapped host pages, no staging and no DMA call) and
`ALL_CLASSES_PAGES` (every encode class of a launch in one kernel). This reads the sweep's `backup-variant`
records and prints, for each path, the largest batch size up to which it is never slower than the path it
replaces, in every config measured, with each config's own limit beside it, so the defaults come from a table
and not from a guess:

  direct: at n pages, min(direct, direct+one-launch) <= min(staged, one-launch) * (1 + tol) for every config
  one launch: at n pages, one-launch <= staged * (1 + tol) and, where direct variants exist,
              direct+one-launch <= direct * (1 + tol), for every config

A limit is the largest n measured such that the rule holds at every measured n up to it (0 if it fails at the
smallest). Medians are compared; `--tol` (default 0.02) absorbs differences inside the timing noise.

  python3 benchmark/backup_defaults.py docs/results/bench_transfer_run20_h100.json [--tol 0.02] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict


def _variants(records: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """config -> pages -> variant -> median ms, from the `backup-variant` records."""
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("direction") == "backup-variant":
            out[f"{r['shape']} {r['config']}"][int(r["pages"])][r["variant"]] = float(r["time_ms"])
    return out


def _limit(by_pages: dict[int, dict[str, float]], holds) -> int:
    """The largest n such that `holds(variants at m)` is True for every measured m <= n (None = not measured)."""
    best = 0
    for n in sorted(by_pages):
        ok = holds(by_pages[n])
        if ok is None:
            break
        if not ok:
            break
        best = n
    return best


def direct_wins(v: dict[str, float], tol: float) -> bool | None:
    direct = [v[k] for k in ("direct", "direct+one-launch") if k in v]
    other = [v[k] for k in ("staged", "one-launch") if k in v]
    if not direct or not other:
        return None
    return min(direct) <= min(other) * (1 + tol)


def one_launch_wins(v: dict[str, float], tol: float) -> bool | None:
    if "staged" not in v or "one-launch" not in v:
        return None
    if v["one-launch"] > v["staged"] * (1 + tol):
        return False
    if "direct" in v and "direct+one-launch" in v:
        return v["direct+one-launch"] <= v["direct"] * (1 + tol)
    return True


def suggest(records: list[dict], tol: float = 0.02) -> dict:
    """Per config and overall, the largest batch up to which each path is never slower (see the module doc)."""
    per: dict[str, dict[str, int]] = {}
    for cfg, by_pages in sorted(_variants(records).items()):
        per[cfg] = {"direct_backup_pages": _limit(by_pages, lambda v: direct_wins(v, tol)),
                    "all_classes_pages": _limit(by_pages, lambda v: one_launch_wins(v, tol))}
    if not per:
        raise ValueError("no backup-variant records: run bench_transfer.py with --backup-sweep")
    return {"tol": tol, "per_config": per,
            "direct_backup_pages": min(p["direct_backup_pages"] for p in per.values()),
            "all_classes_pages": min(p["all_classes_pages"] for p in per.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_json", help="bench_transfer.py --json output of a --backup-sweep run")
    ap.add_argument("--tol", type=float, default=0.02, help="relative slack inside which a path counts as not slower")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    data = json.loads(pathlib.Path(a.bench_json).read_text())
    res = dict(suggest(data["records"], a.tol), source=a.bench_json, gpu=data.get("gpu"), kernels=data.get("kernels"))
    print(f"{'config':28s} {'direct up to':>12s} {'one launch up to':>16s}")
    for cfg, p in res["per_config"].items():
        print(f"{cfg:28s} {p['direct_backup_pages']:12d} {p['all_classes_pages']:16d}")
    print(f"{'every config':28s} {res['direct_backup_pages']:12d} {res['all_classes_pages']:16d}   "
          f"(codec.DIRECT_BACKUP_PAGES, ALL_CLASSES_PAGES; {res['gpu']}, tol {a.tol})")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
