"""Plot docs/results/bench_multiturn.json (written from the device runs) on a CPU machine.

    PYTHONPATH=/tmp/dev python3 benchmark/plot_multiturn.py [--json docs/results/bench_multiturn.json] \
        [--png docs/bench_multiturn.png]

One row per scenario: TTFT (mean bar, p90 tick) per arm, and the prompt-token hit rate split by
source (GPU / host L2 / storage L3). Arms are labelled with their codec, "capture" when the debug
capture was on in that arm, and their run when the file holds several runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

ORDER = ["none", "bf16", "kv8", "k8v4", "mixed", "kv4"]


def label(r: dict[str, Any], show_run: bool = True) -> str:
    codec = r.get("codec") or "-"
    tag = {"native": "native", "reference": "torch ref", "sglang-bf16": "SGLang", "-": ""}.get(codec, codec)
    parts = [r["arm"]] + ([f"run {r.get('run', '?')}"] if show_run else []) + ([tag] if tag else [])
    return "\n".join(parts + (["capture on"] if r.get("capture") else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="docs/results/bench_multiturn.json")
    ap.add_argument("--png", default="docs/bench_multiturn.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in json.load(open(a.json)) if r.get("status") == "ok"]
    runs = sorted({r.get("run") for r in recs}, key=str)
    show_run = len(runs) > 1
    scenarios = [s for s in ("l2", "l3") if any(r["scenario"] == s for r in recs)]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(15, 4.6 * len(scenarios)), squeeze=False)
    titles = {"l2": "L2 scenario: GPU pool 16k tokens, 1 GB host (same bytes every arm), no L3",
              "l3": "L3 scenario: GPU pool 8k tokens, 0.56 GB host, L3 file backend"}
    for row, sc in enumerate(scenarios):
        rs = sorted((r for r in recs if r["scenario"] == sc), key=lambda r: (ORDER.index(r["arm"]), -(r.get("run") or 0)))
        xs = list(range(len(rs)))
        colors = ["#999999" if r["arm"] == "none" else "#d62728" if r["arm"] == "bf16" else
                  ("#6baed6" if r.get("capture") else "#1f77b4") if r.get("codec") == "native" else "#9ecae1"
                  for r in rs]
        ax = axes[row][0]
        ax.bar(xs, [r["ttft_mean_s"] * 1e3 for r in rs], color=colors)
        ax.scatter(xs, [r["ttft_p90_s"] * 1e3 for r in rs], marker="_", s=400, color="black", label="p90", zorder=3)
        for x, r in zip(xs, rs, strict=True):
            ax.text(x, r["ttft_mean_s"] * 1e3, f"{r['ttft_mean_s'] * 1e3:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [label(r, show_run) for r in rs], fontsize=8)
        ax.set_ylabel("TTFT (ms): bar = mean, tick = p90")
        ax.set_title(titles.get(sc, sc), fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[row][1]
        bottom = [0.0] * len(rs)
        for key, name, col in (("device_hit_tokens", "GPU (L1)", "#bbbbbb"), ("host_hit_tokens", "host (L2)", "#2ca02c"),
                               ("storage_hit_tokens", "storage (L3)", "#ff7f0e")):
            vals = [100.0 * (r.get(key) or 0) / r["prompt_tokens"] for r in rs]
            ax.bar(xs, vals, bottom=bottom, color=col, label=name)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for x, r in zip(xs, rs, strict=True):
            cap = r.get("l2_capacity_tokens")
            ax.text(x, 1, f"L2\n{cap / 1000:.1f}k" if cap else "no L2", ha="center", va="bottom", fontsize=7, color="white")
        ax.set_xticks(xs, [label(r, show_run) for r in rs], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("prompt tokens served from cache (%)")
        ax.legend(fontsize=8, loc="upper left")
    gpu = recs[0].get("gpu", "?") if recs else "?"
    run_txt = "" if show_run or not runs or runs[0] is None else f"run {runs[0]}, "
    fig.suptitle(f"Multi-turn prefix reuse, Qwen2.5-7B shape (dummy weights), SGLang 0.5.17, {run_txt}{gpu}: "
                 "16 clients x 6 rounds x 576 new tokens, 8 output tokens, 4 in flight", fontsize=11)
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print("wrote", a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
