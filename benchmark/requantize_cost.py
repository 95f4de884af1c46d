"""CPU cost of the 4 -> 2-bit code-domain step of the "C then B" elastic ladder (docs/elastic.md), per page.

That design demotes a direct 4-bit page to 2 bits by rewriting its codes, c2 = round(c4 / 5) (quant/elastic.py,
`requantize_codes`), where today's pool only frees planes. This times the rewrite of one page's packed codes on the
host: two packed 4-bit bytes (four codes) looked up as one uint16 in a 65,536-entry table that yields one byte of
four packed 2-bit codes, checked against `requantize_codes`. One thread, median of --reps.

    PYTHONPATH=python python3 benchmark/requantize_cost.py [--json docs/results/requantize_cost.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from kvtuner_hicache.quant import reference as R  # noqa: E402
from kvtuner_hicache.quant.elastic import requantize_codes  # noqa: E402

SHAPES = {"Qwen2.5-7B": (28, 4, 128), "Llama-3.1-8B": (32, 8, 128)}  # layers, KV heads, head_dim
PAGE = 64


def pair_table() -> np.ndarray:
    """uint16 of two packed 4-bit bytes (codes at bits 0, 4, 8, 12) -> one byte of four packed 2-bit codes."""
    v = np.arange(65536)
    out = np.zeros(65536, dtype=np.uint8)
    for i in range(4):
        out |= ((((v >> (4 * i)) & 15) + 2) // 5 << (2 * i)).astype(np.uint8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lut = pair_table()
    rng = np.random.default_rng(0)
    rows = []
    for name, (layers, heads, dim) in SHAPES.items():
        elements = layers * 2 * PAGE * heads * dim
        codes = rng.integers(0, 16, elements, dtype=np.uint8)
        packed4 = R.pack_codes(torch.from_numpy(codes)[None], 4).numpy().reshape(-1)
        out = np.empty(elements // 4, dtype=np.uint8)
        np.take(lut, packed4.view(np.uint16), out=out)
        want = R.pack_codes(requantize_codes(torch.from_numpy(codes), 4, 2)[None], 2).numpy().reshape(-1)
        if not np.array_equal(out, want):
            raise SystemExit("table lookup disagrees with requantize_codes")
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            np.take(lut, packed4.view(np.uint16), out=out)
            ts.append(time.perf_counter() - t)
        rows.append({"shape": name, "elements": elements, "bytes_in": packed4.size, "bytes_out": out.size,
                     "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3})
    print("| shape | code bytes in | out | ms per page (median, min), one thread |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['bytes_in']:,} | {r['bytes_out']:,} | {r['ms_median']:.3f}, {r['ms_min']:.3f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
