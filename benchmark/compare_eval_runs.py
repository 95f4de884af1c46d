"""Two accuracy-harness JSONs of the same windows, config by config: how far apart their perplexities are
(CPU, no timing). For a change that should not move accuracy, such as kernel 0.9.0's code rule
(docs/page-format.md, "Codes"), run the harness again with the JSON's own command and compare.

Prints, per config present in both files: perplexity in each, the relative difference of the mean, the largest
relative difference over windows, Δ ppl against each run's own bf16 (which cancels run-to-run float noise of the
model, 1e-5..1e-4 between runs of the same command) and KL in each; writes the same rows as JSON with --json.

Usage: python3 benchmark/compare_eval_runs.py BEFORE.json AFTER.json [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib


def rows(before: dict, after: dict) -> list[dict]:
    """One row per config that both runs scored on the same number of windows."""
    old = {r["config"]: r for r in before["records"]}
    out = []
    for r in after["records"]:
        o = old.get(r["config"])
        if o is None or len(o["ppl_per_window"]) != len(r["ppl_per_window"]):
            continue
        per = [b / a - 1 for a, b in zip(o["ppl_per_window"], r["ppl_per_window"], strict=True)]
        out.append({"config": r["config"], "ppl_before": o["ppl"], "ppl_after": r["ppl"],
                    "ppl_rel_diff": r["ppl"] / o["ppl"] - 1, "max_window_rel_diff": max(per, key=abs),
                    "windows": len(per), "delta_pct_before": o.get("ppl_delta_pct"),
                    "delta_pct_after": r.get("ppl_delta_pct"), "kl_before": o.get("kl"), "kl_after": r.get("kl")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=pathlib.Path)
    ap.add_argument("after", type=pathlib.Path)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    spans = [(m.get("window_offsets"), m.get("prefix_len"), m.get("score_len")) for m in (before["meta"], after["meta"])]
    if spans[0] != spans[1]:
        raise SystemExit(f"the runs scored different windows (offsets, prefix, scored): {spans[0]} against {spans[1]}")
    table = rows(before, after)
    if not table:
        raise SystemExit("no config is in both runs")
    print("| config | ppl before | ppl after | mean rel. diff | largest window rel. diff | Δ ppl % vs bf16 before | after "
          "| KL before | KL after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in table:
        kl = [f"{r[k]:.5f}" if r[k] is not None else "-" for k in ("kl_before", "kl_after")]
        dp = [f"{r[k]:+.3f}" if r[k] is not None else "-" for k in ("delta_pct_before", "delta_pct_after")]
        print(f"| {r['config']} | {r['ppl_before']:.4f} | {r['ppl_after']:.4f} | {r['ppl_rel_diff']:+.2e} | "
              f"{r['max_window_rel_diff']:+.2e} | {dp[0]} | {dp[1]} | {kl[0]} | {kl[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
