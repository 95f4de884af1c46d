"""`python -m kvtuner_hicache.eval`: argument parsing and the run (model -> text -> tasks -> report)."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from kvtuner_hicache.config import ConfigError
from kvtuner_hicache.eval import data as D
from kvtuner_hicache.eval import models
from kvtuner_hicache.eval.configs import MAIN_CONFIGS, SWEEPS, ConfigContext, EvalConfig, expand_names, resolve
from kvtuner_hicache.eval.harness import (
    Acc,
    Harness,
    cache_kv,
    key_channel_ratio,
    run_gsm8k,
    run_mmlu,
    run_text,
    stderr_log,
)
from kvtuner_hicache.eval.report import LEGEND, markdown, pairwise, pairwise_markdown, parse_pairs, record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvtuner_hicache.eval",
        description="Accuracy of quantized HiCache pages on a real model (CPU, teacher-forced).",
    )
    p.add_argument("--model", default="qwen2.5-coder-0.5b", choices=models.MODELS)
    p.add_argument("--sweep", default="default", choices=sorted(SWEEPS), help="named config list")
    p.add_argument("--configs", help="comma-separated config names (overrides --sweep); see configs.py")
    p.add_argument("--add-configs", default="", help="comma-separated config names appended to --sweep/--configs")
    p.add_argument("--windows", type=int, default=4, help="essay windows for perplexity (0: skip)")
    p.add_argument("--window-indices", default="",
                   help="run only these of the --windows evenly spaced windows: 'odd', 'even' or a comma list "
                        "(e.g. --windows 15 --window-indices odd adds 7 windows to an 8-window run; "
                        "join them with python -m kvtuner_hicache.eval.report --concat)")
    p.add_argument("--prefix-len", type=int, default=1536, help="quantized prefix tokens per window (whole pages)")
    p.add_argument("--score-len", type=int, default=512, help="scored tokens per window")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=0,
                   help="residual tokens for configs whose name has no +rN: the last ceil(N/page) pages stay bf16")
    p.add_argument("--gsm8k", type=int, default=0, help="GSM8K items (reference-answer NLL)")
    p.add_argument("--gsm8k-shots", type=int, default=4, help="worked examples in the quantized prefix")
    p.add_argument("--mmlu", type=int, default=0, help="MMLU items (answer-letter accuracy)")
    p.add_argument("--mmlu-shots", type=int, default=5, help="examples in the MMLU prompt")
    p.add_argument("--task-configs", default="all",
                   help="configs that also run GSM8K/MMLU: all, main (main configs + per-layer tables), or a comma list")
    p.add_argument("--batch", type=int, default=1, help="configs per forward pass")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="MMLU item shuffle")
    p.add_argument("--no-fetch", action="store_true", help="fail instead of running scripts/fetch_models.sh")
    p.add_argument("--compare", default="",
                   help="paired config-vs-config comparisons to report, 'A vs B,C vs D' (A against B); "
                        "every config is always compared with bf16")
    p.add_argument("--json", dest="json_out", help="write the records here")
    return p


def _indices(spec: str, n: int) -> list[int]:
    if spec in ("odd", "even"):
        return list(range(1 if spec == "odd" else 0, n, 2))
    pick = [int(x) for x in spec.split(",") if x.strip()]
    if any(not 0 <= i < n for i in pick):
        raise ConfigError(f"--window-indices {spec}: indices must be in 0..{n - 1}")
    return pick


def _task_configs(spec: str, configs: Sequence[EvalConfig]) -> list[EvalConfig]:
    if spec == "all":
        return list(configs)
    if spec == "main":  # the main configs and every per-layer table
        return [c for c in configs if c.name in MAIN_CONFIGS or c.name.startswith("table:")]
    names = {s.strip() for s in spec.split(",")}
    return [c for c in configs if c.name in names]


def calibration_overlaps(configs: Sequence[EvalConfig], offsets: Sequence[int], body: int) -> list[str]:
    """Per-layer tables whose recorded calibration spans overlap the essay tokens this run scores: the windows at
    `offsets` (those of --window-indices only), `body` tokens each (then the table would be scored on its own
    calibration text)."""
    from kvtuner_hicache.calibrate import overlaps

    spans = [(o, o + body) for o in offsets]
    notes = []
    for c in configs:
        meta = getattr(c.quant.layer_bits, "meta", None) if c.quant is not None else None
        cal = [tuple(x) for x in (meta or {}).get("calibration_spans", [])]
        hit = overlaps(cal, spans) if cal else []
        if hit:
            notes.append(f"{c.name}: calibrated on essay tokens {hit[0][0]} which overlap evaluation window {hit[0][1]}")
    return notes


def run(args: argparse.Namespace, argv: Sequence[str], log: Any = stderr_log) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    names = expand_names(args.sweep, args.configs)
    names += [n.strip() for n in args.add_configs.split(",") if n.strip() and n.strip() not in names]
    # a bad --compare fails here, not after the whole run
    pairs = parse_pairs(args.compare)
    unknown = sorted({n for pair in pairs for n in pair if n != "bf16" and n not in names})
    if unknown:
        raise ConfigError(f"--compare names {', '.join(unknown)}, which --configs/--sweep/--add-configs do not run")
    lm = models.load(args.model, allow_fetch=not args.no_fetch)
    shape, ps = lm.shape, args.page_size
    log(f"loaded {args.model} in {lm.load_s:.1f}s: {shape.num_layers} layers, {shape.heads} kv heads, head_dim {shape.head_dim}")
    data_root = models.data_dir()
    if not data_root.is_dir() and not args.no_fetch:
        models.fetch("data")
    h = Harness(lm.model, shape, ps, args.batch, log)
    tok = lm.tokenizer
    bos = D.special_prefix(tok)

    # text windows; the first prefill also gives the key statistics the `mixed` table needs
    windows: list[list[int]] = []
    first_cache = None
    if args.prefix_len % ps:
        raise ConfigError(f"--prefix-len {args.prefix_len} must be a multiple of --page-size {ps}")
    essay = D.encode(tok, D.essay_text(data_root))
    win_len = args.prefix_len + args.score_len + 1
    offsets: list[int] = []
    if args.windows > 0:
        windows = D.text_windows(essay, bos, win_len, args.windows)
        offsets = D.window_offsets(len(essay), win_len - len(bos), args.windows)
        if args.window_indices:
            pick = _indices(args.window_indices, args.windows)
            windows, offsets = [windows[i] for i in pick], [offsets[i] for i in pick]
        stats_ids = windows[0][: args.prefix_len]
    else:
        stats_ids = (bos + essay)[: args.prefix_len]
    first_cache = h.prefill(stats_ids)
    key_ratio = key_channel_ratio(cache_kv(first_cache))
    log(f"prefill {args.prefix_len} tokens: {h.prefill_s:.1f}s; key channel ratio per layer: "
        + " ".join(f"{r:.0f}" for r in key_ratio))

    ctx = ConfigContext(shape, ps, args.residual_length, key_ratio)
    configs, skipped = resolve(names, ctx)
    for n, why in skipped:
        log(f"skip {n}: {why}")
    base = EvalConfig("bf16 (reference)", None, "bf16", "KV cast to bf16 and back (reference)")
    base_row = next((c for c in configs if c.name == "bf16"), None)
    log("configs: " + ", ".join(c.name for c in configs))
    overlap_notes = calibration_overlaps(configs, offsets, win_len - len(bos))
    for note in overlap_notes:
        log("WARNING: " + note)

    t0 = time.perf_counter()
    text = run_text(h, windows, args.prefix_len, configs, base, first_cache) if windows else {}
    text_s = time.perf_counter() - t0
    task_cfgs = _task_configs(args.task_configs, configs)
    gsm: dict[str, Acc] = {}
    mmlu: dict[str, Acc] = {}
    gsm_prefix = 0
    mmlu_cached = 0.0
    t0 = time.perf_counter()
    if args.gsm8k > 0:
        items = D.load_gsm8k(data_root)
        gsm, gsm_prefix = run_gsm8k(h, tok, items[: args.gsm8k_shots], items[args.gsm8k_shots: args.gsm8k_shots + args.gsm8k],
                                    task_cfgs, base)
    gsm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.mmlu > 0:
        shots, items_m = D.mmlu_split(D.load_mmlu(data_root), args.mmlu_shots, args.mmlu, args.seed)
        mmlu, mmlu_cached = run_mmlu(h, tok, shots, items_m, task_cfgs, base)
    mmlu_s = time.perf_counter() - t0

    command = "python -m kvtuner_hicache.eval " + shlex.join(list(argv))
    common = {"model": args.model, "windows": len(windows), "command": command}
    records = []
    rows = [base] if base_row is None else []
    rows += configs
    for c in rows:
        is_ref = c is base
        name_in_acc = c.name
        rec = record(c, h.layout(c) if c is not base else None, shape, ps, args.prefix_len,
                     text.get(name_in_acc), text.get(base.name), gsm.get(name_in_acc), gsm.get(base.name),
                     mmlu.get(name_in_acc), mmlu.get(base.name), is_reference=is_ref)
        if is_ref:
            rec["config"] = "bf16"
            if "ppl" in rec:
                rec.update({"top1_agreement": 1.0, "kl": 0.0})
            if "mmlu" in rec:
                rec["mmlu"].update({"kl": 0.0, "agreement": 1.0})
            if "gsm8k" in rec:
                rec["gsm8k"].update({"kl": 0.0, "top1_agreement": 1.0})
        t = h.timings.get(c.name)
        rec.update(common)
        rec["timings"] = {"roundtrip_s": round(t.roundtrip_s, 3), "score_s": round(t.score_s, 3)} if t else {}
        records.append(rec)
    result = {
        "pairwise": pairwise(records, pairs),
        "meta": {
            **common,
            "model_path": str(lm.path),
            "shape": {"layers": shape.num_layers, "kv_heads": shape.heads, "head_dim": shape.head_dim},
            "page_size": ps,
            "prefix_len": args.prefix_len,
            "essay_tokens": len(essay),
            "window_layout": args.windows,
            "window_offsets": offsets,
            "score_len": args.score_len,
            "gsm8k_items": args.gsm8k, "gsm8k_shots": args.gsm8k_shots, "gsm8k_prefix_tokens": gsm_prefix,
            "mmlu_items": args.mmlu, "mmlu_shots": args.mmlu_shots, "mmlu_mean_cached_tokens": mmlu_cached,
            "task_configs": [c.name for c in task_cfgs] if (args.gsm8k or args.mmlu) else [],
            "key_channel_ratio": key_ratio,
            "skipped": [{"config": n, "reason": why} for n, why in skipped],
            "calibration_overlaps": overlap_notes,
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "timings": {"load_s": round(lm.load_s, 1), "prefill_s": round(h.prefill_s, 1), "text_s": round(text_s, 1),
                        "gsm8k_s": round(gsm_s, 1), "mmlu_s": round(mmlu_s, 1),
                        "total_s": round(time.perf_counter() - t_start, 1)},
        },
        "records": records,
    }
    return result


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# {meta['model']}: {meta['windows']} windows x ({meta['prefix_len']} prefix + {meta['score_len']} scored), "
             f"page {meta['page_size']}", "", markdown(result["records"]), ""]
    if result.get("pairwise"):
        lines += ["Paired comparisons between configs (same windows, tokens and items):", "",
                  pairwise_markdown(result["pairwise"]), ""]
    lines += [LEGEND, ""]
    for s in meta["skipped"]:
        lines.append(f"- skipped {s['config']}: {s['reason']}")
    for r in result["records"]:
        if r.get("high_precision_layers") is not None:
            lines.append(f"- {r['config']}: {r['description']}")
    t = meta["timings"]
    lines.append(f"- timings: load {t['load_s']}s, prefills {t['prefill_s']}s, text {t['text_s']}s, "
                 f"gsm8k {t['gsm8k_s']}s, mmlu {t['mmlu_s']}s, total {t['total_s']}s")
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        result = run(args, argv)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json_out:
        out = pathlib.Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
        stderr_log(f"wrote {out}")
    return 0
