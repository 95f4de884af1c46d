#!/usr/bin/env python3
"""Quantize alone, on device memory: the encode kernels' own time, against the GPU's copy bandwidth.

bench_transfer's `quantize` row times one native.encode_pages call between CUDA events, so its ~0.2 ms of
Python (pointer tables, geometry, the error sink) counts whenever the GPU waits for it. This benchmark
separates the three numbers issue 13 needs (Qwen2.5-7B shape, page 64, pages gathered from scattered slots):

  call_ms      one encode_pages call between events (bench_transfer's method; wrapper included)
  queued_ms    QUEUE back-to-back calls between two events, divided by QUEUE: the CPU runs ahead of the
               GPU, so this is the GPU's time per call, launch gaps between the class kernels included
  kernel_ms    the sum of the encode kernels' durations (torch.profiler / CUPTI), per (axis, bits) class too,
               taken after every event timing of the run; `queued_after_cupti_ms` repeats queued_ms after them.
               (Until run 16 CUPTI ran between configs, and bench_transfer's queued quantize, timed with no
               profiler in its process, read 15-25 % faster than this benchmark on the same GPU and kernel.)

Source rows: bf16 normal values (`data` = `normal`). With --roundtrip, each config is timed once more on rows
that went through its own encode and decode (`data` = `dequantized`, queued_ms only): no quotient of such
values lies on a half-integer, so the encode never takes its division path (benchmark/encode_tie_rate.py counts
how often it does on normal data and on a real model's KV); the difference is that path's cost.

bf16 GB/s = the bf16 bytes read / the time. The GPU's own ceilings, same run: `copy` (torch copy_ of the
same bf16 bytes, device to device: read + write) and `gather` (index_select of the same rows, as a
quantize-free gather would read them).

Usage: PYTHONPATH=python python3 benchmark/bench_quantize.py [--pages 64,256] [--configs KV8,KV4,K4V2]
       [--json docs/results/bench_quantize.json]
       ncu: add --ncu (two calls per config, nothing timed) under `ncu --kernel-name regex:encode_kernel ...`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from kvtuner_hicache.page_format import PageLayout  # noqa: E402
from kvtuner_hicache.quant import native  # noqa: E402

sys.path.insert(0, str(REPO / "benchmark"))
from bench_transfer import (  # noqa: E402
    PAGE_SIZE,
    QUEUED_CALLS,
    SHAPES,
    UNIFORM,
    event_samples,
    median_p10_p90,
    restore_rows,
    uniform_config,
)

SHAPE = SHAPES["Qwen2.5-7B"]
BITS = {name: (k, v) for name, k, v in UNIFORM} | {"K3V2": (3, 2), "KV3": (3, 3)}  # bench_transfer's, plus 3-bit
QUEUE = QUEUED_CALLS


def kernel_ms(fn, calls: int) -> dict[str, float]:
    """Mean device milliseconds per call of each kernel fn launches (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA" and "encode_kernel" in e.name:
            per[e.name] += e.device_time_total / 1e3 / calls  # microseconds -> ms per call
    return dict(per)


def class_of(kernel_name: str) -> str:
    """'encode_kernel<__nv_bfloat16, false, 1, 4>' -> 'axis1 4-bit'."""
    args = kernel_name.split("encode_kernel<", 1)[1].split(">", 1)[0].split(",")
    return f"axis{args[2].strip()} {args[3].strip()}-bit"


def spread(xs: list[float]) -> dict[str, float]:
    """Median, p10 and p90 of the samples, in ms."""
    med, p10, p90 = median_p10_p90(xs)
    return {"median": round(med, 4), "p10": round(p10, 4), "p90": round(p90, 4)}


def time_dequantized(rec: dict, lay: PageLayout, bufs: list, tidx: torch.Tensor, out: torch.Tensor, quantize,
                     reps: int) -> dict:
    """Queued quantize time on rows holding their own decoded values (encode, decode every layer back into the
    source rows, time), then the rows as they were. A record like `rec` with data = dequantized."""
    saved = [[t.index_select(0, tidx) for t in per] for per in bufs]
    quantize()
    ids = torch.arange(out.shape[0], device=out.device)
    for layer in range(lay.num_layers):
        native.decode_layer(lay, layer, out, ids, [per[layer] for per in bufs], tidx)
    t = spread(event_samples(quantize, reps, QUEUE))
    native.check_errors(out.device)
    restore_rows(bufs, tidx, saved)
    keep = ("gpu", "kernels", "shape", "config", "pages", "bytes_bf16", "bytes_quantized")
    return {**{k: rec[k] for k in keep}, "data": "dequantized", "queued_ms": t,
            "queued_GBps": round(rec["bytes_bf16"] / t["median"] / 1e6, 1),
            "queued_vs_normal": round(t["median"] / rec["queued_ms"]["median"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default="16,64,256")
    ap.add_argument("--configs", default="KV8,KV4,K4V2,K3V2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ncu", action="store_true", help="two calls per config and page count, nothing timed")
    ap.add_argument("--roundtrip", action="store_true", help="also time each config on its own decoded rows")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    dev = torch.device("cuda")
    pages = [int(p) for p in args.pages.split(",")]
    names = args.configs.split(",")
    L, H, D = SHAPE.num_layers, SHAPE.heads, SHAPE.head_dim
    slots = max(pages) + 8
    rows = slots * PAGE_SIZE
    gen = torch.Generator(device=dev).manual_seed(0)
    bufs = [[torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(L)]
            for _ in range(2)]
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; kernels {native.build_name()}", flush=True)
    records = []
    cases = []  # (record, quantize): every event timing first, CUPTI after all of them (see the docstring)
    roundtrips = []  # records of --roundtrip (event timings only)
    for n in pages:
        pg = torch.Generator().manual_seed(n)
        dslots = torch.randperm(slots, generator=pg)[:n]
        tidx = (dslots[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).reshape(-1).to(dev)
        bf16_bytes = n * PAGE_SIZE * SHAPE.bf16_bytes_per_token()
        flat = torch.empty(bf16_bytes // 2, dtype=torch.bfloat16, device=dev)
        flat2 = torch.empty_like(flat)
        t_copy = None if args.ncu else spread(event_samples(lambda a=flat, b=flat2: b.copy_(a), args.reps, QUEUE))
        del flat, flat2

        def gather(tidx=tidx):
            for per in bufs:
                for t in per:
                    torch.index_select(t, 0, tidx)
        t_gather = None if args.ncu else spread(event_samples(gather, args.reps))
        for name in names:
            kb, vb = BITS[name]
            lay = PageLayout(uniform_config(kb, vb), SHAPE, PAGE_SIZE)
            out = torch.empty(n, lay.page_bytes, dtype=torch.uint8, device=dev)

            def quantize(lay=lay, out=out, tidx=tidx):
                native.encode_pages(lay, bufs, tidx, out)
            if args.ncu:
                quantize()
                quantize()
                torch.cuda.synchronize()
                continue
            t_call = spread(event_samples(quantize, args.reps))
            t_queued = spread(event_samples(quantize, args.reps, QUEUE))
            rec = {"gpu": gpu, "kernels": native.build_name(), "shape": "Qwen2.5-7B", "config": name, "pages": n,
                   "bytes_bf16": bf16_bytes, "bytes_quantized": n * lay.page_bytes,
                   "call_ms": t_call, "queued_ms": t_queued,
                   "call_GBps": round(bf16_bytes / t_call["median"] / 1e6, 1),
                   "queued_GBps": round(bf16_bytes / t_queued["median"] / 1e6, 1),
                   "copy_ms": t_copy, "copy_read_GBps": round(bf16_bytes / t_copy["median"] / 1e6, 1),
                   "gather_ms": t_gather, "gather_GBps": round(bf16_bytes / t_gather["median"] / 1e6, 1),
                   "data": "normal"}
            cases.append((rec, quantize))
            if args.roundtrip:
                roundtrips.append(time_dequantized(rec, lay, bufs, tidx, out, quantize, args.reps))
    for rec, quantize in cases:  # CUPTI last: whether it slows the kernels after it is what queued_after_cupti shows
        per_kernel = kernel_ms(quantize, QUEUE)
        native.check_errors(dev)
        k_total = sum(per_kernel.values())
        rec["kernel_ms"] = round(k_total, 4)
        rec["kernel_ms_by_class"] = {class_of(k): round(v, 4) for k, v in per_kernel.items()}
        rec["kernel_GBps"] = round(rec["bytes_bf16"] / k_total / 1e6, 1)
        records.append(rec)
        by_class = " ".join(f"{c} {v:.3f}" for c, v in sorted(rec["kernel_ms_by_class"].items()))
        print(f"{rec['config']:5s} {rec['pages']:4d}p call {rec['call_ms']['median']:.3f} queued "
              f"{rec['queued_ms']['median']:.3f} kernels {k_total:.3f} ms ({by_class}) | GB/s call "
              f"{rec['call_GBps']:.0f} queued {rec['queued_GBps']:.0f} kernels {rec['kernel_GBps']:.0f} | copy "
              f"{rec['copy_read_GBps']:.0f} gather {rec['gather_GBps']:.0f}", flush=True)
    for rec, quantize in cases:
        rec["queued_after_cupti_ms"] = spread(event_samples(quantize, args.reps, QUEUE))
    if args.ncu:
        return
    for r in roundtrips:
        print(f"{r['config']:5s} {r['pages']:4d}p dequantized rows: queued {r['queued_ms']['median']:.3f} ms "
              f"({r['queued_GBps']:.0f} GB/s, {r['queued_vs_normal']:.3f}x the normal rows' time)", flush=True)
    print()
    print("| config | pages | call ms | queued ms [p10, p90] | kernels ms | queued after CUPTI ms | bf16 GB/s: call / "
          "queued / kernels | copy_ read GB/s | index_select GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in records:
        q = r["queued_ms"]
        print(f"| {r['config']} | {r['pages']} | {r['call_ms']['median']:.3f} | {q['median']:.3f} [{q['p10']:.3f}, "
              f"{q['p90']:.3f}] | {r['kernel_ms']:.3f} | {r['queued_after_cupti_ms']['median']:.3f} | "
              f"{r['call_GBps']:.0f} / {r['queued_GBps']:.0f} / "
              f"{r['kernel_GBps']:.0f} | {r['copy_read_GBps']:.0f} | {r['gather_GBps']:.0f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(records + roundtrips, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
