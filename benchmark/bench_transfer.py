#!/usr/bin/env python3
"""HiCache transfer benchmark: quantized pages (native kernels) vs bf16 baselines, per direction.

Directions (page size 64, all layers of the model shape):
  backup      GPU -> pinned host, incl. quantize: native.backup_to_host (encode into a 64-page GPU staging
              area, then one DMA per run of host pages), on one stream.
  load        pinned host -> GPU, per layer x L, incl. dequantize: native.decode_layer L times (zero-copy
              reads of pinned memory, bounded grid of KVTQ_LOAD_BLOCKS blocks).
  quantize    encode_pages from device rows into GPU memory only (no PCIe).
  dequantize  decode_layer x L from pages in GPU memory only (no PCIe, unbounded grid).

bf16 baselines (the SGLang bundle is not used here; these are our own stand-ins, clearly labelled):
  bf16-kernel  a zero-copy copy kernel with SGLang's access pattern: one warp per token row, page_first
               host layout [slots, L, H, D]; load = one launch per layer with SGLang's default quota
               (2 blocks x 1024 threads), backup = one all-layer launch (2 x SMs blocks x 256 threads).
  bf16-copy    plain torch pinned `copy_` of the same bf16 bytes with our host-call structure: backup = one
               copy of all bytes, load = one copy per layer (L calls, like a per-layer load).
  single DMA   one torch `copy_` of all bf16 bytes (the PCIe ceiling; reported as speedup_vs_single_dma).
speedup_vs_bf16 = (faster of bf16-kernel and bf16-copy) / ours. Effective bf16 GB/s = bf16 bytes / our time.

Usage: PYTHONPATH=python python3 benchmark/bench_transfer.py [--json docs/results/bench_transfer.json]
       [--md docs/benchmarks.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from kvtuner_hicache.config import KVShape, QuantConfig, load_layer_bits  # noqa: E402
from kvtuner_hicache.page_format import PageLayout  # noqa: E402
from kvtuner_hicache.quant import native  # noqa: E402

PAGE_SIZE = 64
STAGING_PAGES = 64
SHAPES = {"Qwen2.5-7B": KVShape.mha(28, 4, 128), "Llama-3.1-8B": KVShape.mha(32, 8, 128)}
PRESETS = {"Qwen2.5-7B": "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml"}
UNIFORM = [("KV8", 8, 8), ("K8V4", 8, 4), ("KV4", 4, 4), ("K4V2", 4, 2), ("KV2", 2, 2)]
# SGLang 0.5.17's own bf16 HiCache transfers, measured with the real bundle on an H100 80GB HBM3
# (shared/design/device-sglang.md; another session, same GPU type), Qwen2.5-7B, page 64: ms.
SGLANG_H100 = {("backup", 1): 0.123, ("backup", 16): 1.184, ("backup", 256): 19.3,
               ("load", 1): 0.389, ("load", 16): 1.282, ("load", 256): 18.6}


def presets_dir() -> pathlib.Path | None:
    for d in (os.environ.get("KVTQ_PRESETS_DIR"), REPO.parent / "shared" / "kvtuner-presets"):
        if d and pathlib.Path(d).is_dir():
            return pathlib.Path(d)
    return None


def bench(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() between CUDA events (host launch gaps included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def configs_for(shape_name: str) -> list[tuple[str, QuantConfig]]:
    out = [(n, QuantConfig(nbits_key=k, nbits_value=v, axis_key=1, axis_value=0, asym=True, q_group_size=64))
           for n, k, v in UNIFORM]
    d = presets_dir()
    preset = PRESETS.get(shape_name)
    if d is not None and preset and (d / preset).is_file():
        out.append(("mixed-kivi4", QuantConfig(layer_bits=load_layer_bits(d / preset), axis_key=1, axis_value=0,
                                               asym=True, q_group_size=64)))
    return out


def run_shape(shape_name: str, shape: KVShape, pages_list: list[int], reps: int, ext, records: list, sweep: bool) -> None:
    dev = torch.device("cuda")
    L, H, D = shape.num_layers, shape.heads, shape.head_dim
    ps = PAGE_SIZE
    maxp = max(pages_list)
    slots = maxp + 8
    rows = slots * ps
    gen = torch.Generator(device=dev).manual_seed(0)
    k = [torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(L)]
    v = [torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(L)]
    bufs = [k, v]
    kptrs = torch.tensor([t.data_ptr() for t in k], dtype=torch.int64, device=dev)
    vptrs = torch.tensor([t.data_ptr() for t in v], dtype=torch.int64, device=dev)
    row_bytes = H * D * 2
    # bf16 host pool, page_first [slots, L, H, D] per K/V, pinned
    host_k = torch.empty(maxp * ps, L, H, D, dtype=torch.bfloat16).pin_memory()
    host_v = torch.empty(maxp * ps, L, H, D, dtype=torch.bfloat16).pin_memory()
    bf16_flat_dev = torch.empty(maxp * ps * shape.bf16_bytes_per_token(), dtype=torch.uint8, device=dev)
    bf16_flat_host = torch.empty(bf16_flat_dev.numel(), dtype=torch.uint8, pin_memory=True)
    cfgs = configs_for(shape_name)
    layouts = {name: PageLayout(cfg, shape, ps) for name, cfg in cfgs}
    max_pb = max(lay.page_bytes for lay in layouts.values())
    hostq_flat = torch.empty((maxp + 8) * max_pb, dtype=torch.uint8).pin_memory()
    devq_flat = torch.empty(maxp * max_pb, dtype=torch.uint8, device=dev)
    gpu = torch.cuda.get_device_name()
    sms = ext.sm_count()
    pg = torch.Generator().manual_seed(1)
    ctx = dict(dev=dev, L=L, k=k, v=v, bufs=bufs, kptrs=kptrs, vptrs=vptrs, row_bytes=row_bytes, host_k=host_k,
               host_v=host_v, bf16_flat_dev=bf16_flat_dev, bf16_flat_host=bf16_flat_host, cfgs=cfgs, layouts=layouts,
               hostq_flat=hostq_flat, devq_flat=devq_flat, gpu=gpu, sms=sms, pg=pg, slots=slots, ps=ps, shape=shape,
               shape_name=shape_name, reps=reps, ext=ext, records=records, sweep=sweep)
    for n in pages_list:
        run_pages(n, **ctx)
    torch.cuda.empty_cache()


def run_pages(n, *, dev, L, k, v, bufs, kptrs, vptrs, row_bytes, host_k, host_v, bf16_flat_dev, bf16_flat_host, cfgs,
              layouts, hostq_flat, devq_flat, gpu, sms, pg, slots, ps, shape, shape_name, reps, ext, records, sweep):
    dslots = torch.randperm(slots, generator=pg)[:n]
    tidx = (dslots[:, None] * ps + torch.arange(ps)).reshape(-1).to(dev)
    host_tok = torch.arange(n * ps, dtype=torch.int64, device=dev)  # host slots for bf16 (page runs)
    bf16_bytes = n * ps * shape.bf16_bytes_per_token()

    def bf16_load():
        for layer in range(L):
            ext.bf16_load_layer(host_k, host_v, k[layer], v[layer], host_tok, tidx, layer, 2, 1024)

    def bf16_backup():
        ext.bf16_backup_all(kptrs, vptrs, host_k, host_v, host_tok, tidx, row_bytes, 2 * sms, 256)

    t_bf_load = bench(bf16_load, reps)
    t_bf_backup = bench(bf16_backup, reps)
    t_cp_h2d = bench(lambda: bf16_flat_dev[:bf16_bytes].copy_(bf16_flat_host[:bf16_bytes], non_blocking=True), reps)
    lb = bf16_bytes // L

    def bf16_copy_layers():
        for layer in range(L):
            bf16_flat_dev[layer * lb:(layer + 1) * lb].copy_(bf16_flat_host[layer * lb:(layer + 1) * lb], non_blocking=True)

    t_cp_h2d_layers = bench(bf16_copy_layers, reps)
    t_cp_d2h = bench(lambda: bf16_flat_host[:bf16_bytes].copy_(bf16_flat_dev[:bf16_bytes], non_blocking=True), reps)
    for name, _cfg in cfgs:
        run_config(name, layouts[name], n=n, dev=dev, L=L, k=k, v=v, bufs=bufs, tidx=tidx, hostq_flat=hostq_flat,
                   devq_flat=devq_flat, gpu=gpu, pg=pg, ps=ps, shape_name=shape_name, reps=reps, records=records,
                   sweep=sweep, bf16_bytes=bf16_bytes, t_bf=(t_bf_backup, t_bf_load), t_cp=(t_cp_d2h, t_cp_h2d),
                   t_cp_layers=t_cp_h2d_layers)


def run_config(name, lay, *, n, dev, L, k, v, bufs, tidx, hostq_flat, devq_flat, gpu, pg, ps, shape_name, reps, records,
               sweep, bf16_bytes, t_bf, t_cp, t_cp_layers):
    t_bf_backup, t_bf_load = t_bf
    t_cp_d2h, t_cp_h2d = t_cp
    pb = lay.page_bytes
    npool = n + 8
    hostq = hostq_flat[: npool * pb].view(npool, pb)
    host_ids = torch.randperm(npool, generator=pg)[:n]
    host_ids_sorted = torch.sort(host_ids).values  # mostly runs, like an allocator's pages
    staging = torch.empty(min(n, STAGING_PAGES), pb, dtype=torch.uint8, device=dev)
    devq = devq_flat[: n * pb].view(n, pb)
    pid_dev = host_ids_sorted.to(dev)
    q_bytes = n * pb

    def backup():
        native.backup_to_host(lay, bufs, tidx, hostq, host_ids_sorted, staging)

    def load(blocks=None):
        for layer in range(L):
            native.decode_layer(lay, layer, hostq, pid_dev, [k[layer], v[layer]], tidx, blocks=blocks)

    def quantize():
        native.encode_pages(lay, bufs, tidx, devq)

    local_ids = torch.arange(n, device=dev)

    def dequantize():
        for layer in range(L):
            native.decode_layer(lay, layer, devq, local_ids, [k[layer], v[layer]], tidx, blocks=0)

    backup()  # fill host pages with real data before timing the load
    torch.cuda.synchronize()
    t_backup = bench(backup, reps)
    t_load = bench(load, reps)
    t_q = bench(quantize, reps)
    t_dq = bench(dequantize, reps)
    base = {"shape": shape_name, "config": name, "pages": n, "page_size": ps, "gpu": gpu,
            "page_bytes": pb, "bytes_bf16": bf16_bytes, "bytes_quantized": q_bytes,
            "compression_vs_bf16": round(lay.compression_vs_bf16, 3)}
    # bf16 copy with the same host-call structure as ours: backup = one call, load = one call per layer
    for direction, t, t_kern, t_copy, t_dma in (("backup", t_backup, t_bf_backup, t_cp_d2h, t_cp_d2h),
                                                ("load", t_load, t_bf_load, t_cp_layers, t_cp_h2d)):
        best = min(t_kern, t_copy)
        rec = dict(base, direction=direction, time_ms=round(t, 4), bf16_kernel_ms=round(t_kern, 4),
                   bf16_copy_ms=round(t_copy, 4), bf16_single_dma_ms=round(t_dma, 4),
                   speedup_vs_single_dma=round(t_dma / t, 3), bytes_pcie=q_bytes,
                   pcie_GBps=round(q_bytes / t / 1e6, 2), eff_bf16_GBps=round(bf16_bytes / t / 1e6, 2),
                   bf16_kernel_GBps=round(bf16_bytes / t_kern / 1e6, 2),
                   bf16_copy_GBps=round(bf16_bytes / t_copy / 1e6, 2),
                   speedup_vs_bf16=round(best / t, 3), speedup_vs_bf16_kernel=round(t_kern / t, 3),
                   speedup_vs_bf16_copy=round(t_copy / t, 3))
        if direction == "load":
            rec["load_blocks"] = native.load_blocks()
        sg = SGLANG_H100.get((direction, n)) if shape_name == "Qwen2.5-7B" else None
        if sg is not None:
            rec["sglang_h100_ms"] = sg
            rec["speedup_vs_sglang_h100"] = round(sg / t, 3)
        records.append(rec)
    for direction, t in (("quantize", t_q), ("dequantize", t_dq)):
        records.append(dict(base, direction=direction, time_ms=round(t, 4), bytes_pcie=0,
                            eff_bf16_GBps=round(bf16_bytes / t / 1e6, 2), speedup_vs_bf16=None))
    if sweep and name == "KV4" and n >= 16:
        for blocks in (8, 16, 32, 48, 64, 132, 264, 0):
            t_b = bench(lambda b=blocks: load(b), reps)
            records.append(dict(base, direction="load-sweep", load_blocks=blocks, time_ms=round(t_b, 4),
                                eff_bf16_GBps=round(bf16_bytes / t_b / 1e6, 2),
                                speedup_vs_bf16=round(min(t_bf_load, t_cp_layers) / t_b, 3),
                                speedup_vs_single_dma=round(t_cp_h2d / t_b, 3)))
    print(f"{shape_name:13s} {name:12s} {n:4d}p  backup {t_backup:8.3f} ms  load {t_load:8.3f} ms  "
          f"q {t_q:7.3f}  dq {t_dq:7.3f}  | bf16 kern load {t_bf_load:8.3f} backup {t_bf_backup:8.3f}  "
          f"copy h2d {t_cp_h2d:8.3f} (per layer {t_cp_layers:8.3f}) d2h {t_cp_d2h:8.3f}", flush=True)



def table(records: list) -> str:
    lines = ["| shape | config | dir | pages | ours ms | bf16 kernel ms | bf16 copy ms | PCIe GB/s | eff. bf16 GB/s "
             "| speed-up vs bf16 | vs one bf16 DMA |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r["direction"] not in ("backup", "load"):
            continue
        lines.append(f"| {r['shape']} | {r['config']} | {r['direction']} | {r['pages']} | {r['time_ms']:.3f} | "
                     f"{r['bf16_kernel_ms']:.3f} | {r['bf16_copy_ms']:.3f} | {r['pcie_GBps']:.1f} | "
                     f"{r['eff_bf16_GBps']:.1f} | {r['speedup_vs_bf16']:.2f}x | {r['speedup_vs_single_dma']:.2f}x |")
    return "\n".join(lines)


def table_device(records: list) -> str:
    lines = ["| shape | config | pages | quantize ms | quantize bf16 GB/s | dequantize ms (all layers) | dequantize bf16 GB/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    q = {(r["shape"], r["config"], r["pages"]): r for r in records if r["direction"] == "quantize"}
    for r in records:
        if r["direction"] != "dequantize":
            continue
        rq = q[(r["shape"], r["config"], r["pages"])]
        lines.append(f"| {r['shape']} | {r['config']} | {r['pages']} | {rq['time_ms']:.3f} | {rq['eff_bf16_GBps']:.0f} | "
                     f"{r['time_ms']:.3f} | {r['eff_bf16_GBps']:.0f} |")
    return "\n".join(lines)


def table_sweep(records: list) -> str:
    lines = ["| shape | pages | load blocks (0 = unbounded) | load ms (x L layers) | eff. bf16 GB/s | speed-up vs bf16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r["direction"] == "load-sweep":
            lines.append(f"| {r['shape']} | {r['pages']} | {r['load_blocks']} | {r['time_ms']:.3f} | "
                         f"{r['eff_bf16_GBps']:.1f} | {r['speedup_vs_bf16']:.2f}x |")
    return "\n".join(lines)


def targets(records: list) -> list[str]:
    out = []

    def get(shape, cfg, d, n):
        for r in records:
            if (r["shape"], r["config"], r["direction"], r["pages"]) == (shape, cfg, d, n):
                return r
        return None

    for shape in SHAPES:
        for cfg, need in (("KV4", 3.0), ("KV8", 1.7)):
            r = get(shape, cfg, "load", 256)
            if r:
                out.append(f"{shape} load {cfg} 256 pages >= {need}x: {r['speedup_vs_bf16']:.2f}x "
                           f"{'PASS' if r['speedup_vs_bf16'] >= need else 'MISS'} (vs one bf16 DMA of all layers: "
                           f"{r['speedup_vs_single_dma']:.2f}x"
                           + (f"; vs SGLang's measured {r['sglang_h100_ms']} ms: {r['speedup_vs_sglang_h100']:.2f}x)"
                              if "sglang_h100_ms" in r else ")"))
        for n in (1, 16):
            for d in ("load", "backup"):
                worst = min((r for r in records if r["shape"] == shape and r["direction"] == d and r["pages"] == n),
                            key=lambda r: r["speedup_vs_bf16"], default=None)
                if worst:
                    out.append(f"{shape} {d} {n} pages never slower than bf16: worst {worst['config']} "
                               f"{worst['speedup_vs_bf16']:.2f}x {'PASS' if worst['speedup_vs_bf16'] >= 1.0 else 'MISS'}")
        r = get(shape, "KV4", "backup", 256)
        if r:
            out.append(f"{shape} backup KV4 256 pages >= 2.5x: {r['speedup_vs_bf16']:.2f}x "
                       f"{'PASS' if r['speedup_vs_bf16'] >= 2.5 else 'MISS'}")
        for d in ("quantize", "dequantize"):
            rs = [r for r in records if r["shape"] == shape and r["direction"] == d and r["pages"] == 256]
            if rs:
                lo = min(rs, key=lambda r: r["eff_bf16_GBps"])
                out.append(f"{shape} {d} 256 pages >= 1 TB/s bf16: slowest {lo['config']} {lo['eff_bf16_GBps']:.0f} GB/s "
                           f"{'PASS' if lo['eff_bf16_GBps'] >= 1000 else 'MISS'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=str(REPO / "docs" / "results" / "bench_transfer.json"))
    ap.add_argument("--md", default=None, help="also write a markdown report here")
    ap.add_argument("--pages", default="1,16,256")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="Qwen shape only, fewer reps")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_transfer: needs a CUDA GPU")
    t0 = time.time()
    ext = native.extension()
    print(f"native build {native.build_name()} in {time.time() - t0:.1f} s; GPU {torch.cuda.get_device_name()}; "
          f"load blocks {native.load_blocks()}", flush=True)
    pages_list = [int(x) for x in args.pages.split(",")]
    records: list = []
    shapes = {"Qwen2.5-7B": SHAPES["Qwen2.5-7B"]} if args.quick else SHAPES
    for name, shape in shapes.items():
        run_shape(name, shape, pages_list, 5 if args.quick else args.reps, ext, records, not args.no_sweep)
    gpu = torch.cuda.get_device_name()
    cmd = "PYTHONPATH=python python3 benchmark/bench_transfer.py " + " ".join(sys.argv[1:])
    res = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "page_size": PAGE_SIZE,
           "staging_pages": STAGING_PAGES, "load_blocks": native.load_blocks(), "command": cmd, "records": records,
           "targets": targets(records)}
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    print(table(records))
    print(table_device(records))
    print(table_sweep(records))
    print("\n".join(res["targets"]))
    if args.md:
        md = [f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); page size {PAGE_SIZE}; "
              f"backup staging {STAGING_PAGES} pages; load blocks {native.load_blocks()}; median of {args.reps} "
              f"CUDA-event timings.", "", f"Command: `{cmd}`", "", "### Transfers", "", table(records), "",
              "### Quantize / dequantize on device memory alone", "", table_device(records), "",
              "### Load block-quota sweep (KV4)", "", table_sweep(records), "", "### Targets", "",
              "\n".join(f"- {t}" for t in res["targets"]), ""]
        pathlib.Path(args.md).write_text("\n".join(md))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
