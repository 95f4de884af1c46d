"""Per-config records (the JSON schema) and the markdown table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kvtuner_hicache.config import KVShape
from kvtuner_hicache.eval import stats as S
from kvtuner_hicache.eval.configs import EvalConfig
from kvtuner_hicache.eval.harness import Acc
from kvtuner_hicache.page_format import PageLayout

STORE_BLOCK = 32  # scored tokens per stored block sum (the JSON keeps these, not every token)
BLOCK = 64  # tokens per unit of the block bootstrap (a multiple of STORE_BLOCK)


def sizes(cfg: EvalConfig, layout: PageLayout | None, shape: KVShape, page_size: int, prefix_len: int) -> dict[str, float]:
    """effective_bits / compression_ratio of the page format, and of the whole prefix incl. bf16 residual pages."""
    if layout is None:
        bits = 32.0 if cfg.kv_dtype == "fp32" else 16.0
        return {"effective_bits": bits, "compression_ratio": 16.0 / bits, "prefix_effective_bits": bits}
    pages = prefix_len // page_size
    residual = min(cfg.residual_pages(page_size), pages)
    bf16_page = shape.bf16_bytes_per_token() * page_size
    page_bytes = layout.page_bytes
    if cfg.quant is not None and cfg.quant.elastic:  # a page at the top also holds its refinement planes
        from kvtuner_hicache.quant.elastic_pages import RefinementLayout

        page_bytes += sum(RefinementLayout(layout).plane_bytes.values())
    bits = page_bytes * 8 / (page_size * layout.elements_per_token)
    prefix_bytes = (pages - residual) * page_bytes + residual * bf16_page
    return {
        "effective_bits": bits,
        "compression_ratio": 16.0 / bits,
        "prefix_effective_bits": prefix_bytes * 8 / (prefix_len * layout.elements_per_token) if prefix_len else bits,
    }


def _ppl(nll: float) -> float:
    return math.exp(nll)


def record(cfg: EvalConfig, layout: PageLayout | None, shape: KVShape, page_size: int, prefix_len: int,
           text: Acc | None, text_base: Acc | None, gsm: Acc | None, gsm_base: Acc | None,
           mmlu: Acc | None, mmlu_base: Acc | None, is_reference: bool = False) -> dict[str, Any]:
    """One JSON record. Δ, KL and top-1 are against the bf16 reference (KV cast to bf16 and back)."""
    rec: dict[str, Any] = {"config": cfg.name, "description": cfg.description,
                           "quant": None if cfg.quant is None else {**cfg.quant.canonical(),
                                                                     "residual_length": cfg.residual_length},
                           "kv_dtype": cfg.kv_dtype, "is_reference": is_reference}
    if cfg.mixed_layers:
        rec["high_precision_layers"] = list(cfg.mixed_layers)
    rec.update(sizes(cfg, layout, shape, page_size, prefix_len))
    if text is not None and text_base is not None and text.n:
        ppl, base = _ppl(text.nll / text.n), _ppl(text_base.nll / text_base.n)
        win_sums = [m * n for m, n in zip(text.per_window_nll, text.per_window_tokens, strict=True)]
        base_sums = [m * n for m, n in zip(text_base.per_window_nll, text_base.per_window_tokens, strict=True)]
        blk, blk_n = S.blocks(text.per_token_nll, STORE_BLOCK)
        rec.update({
            "ppl": ppl,
            "ppl_base": base,
            "ppl_delta_pct": 100.0 * (ppl / base - 1.0),
            "ppl_per_window": [_ppl(x) for x in text.per_window_nll],
            "ppl_delta_pct_per_window": [100.0 * (math.exp(a - b) - 1.0)
                                         for a, b in zip(text.per_window_nll, text_base.per_window_nll, strict=True)],
            "top1_agreement": text.top1 / text.n,
            "kl": text.kl / text.n,
            "scored_tokens": text.n,
            "nll_sum_per_window": win_sums,
            "tokens_per_window": list(text.per_window_tokens),
            "nll_sum_per_block32": [round(x, 5) for x in blk],
            "tokens_per_block32": blk_n,
        })
        bblk, bblk_n = S.blocks(text_base.per_token_nll, STORE_BLOCK)
        rec["stats"] = {"ppl_delta_pct": text_delta(rec, {"nll_sum_per_window": base_sums,
                                                          "tokens_per_window": list(text_base.per_window_tokens),
                                                          "nll_sum_per_block32": bblk, "tokens_per_block32": bblk_n})}
    if gsm is not None and gsm_base is not None and gsm.n:
        nll, base = gsm.nll / gsm.n, gsm_base.nll / gsm_base.n
        rec["gsm8k"] = {"answer_nll": nll, "answer_nll_base": base, "delta_nll": nll - base,
                        "kl": gsm.kl / gsm.n, "top1_agreement": gsm.top1 / gsm.n, "answer_tokens": gsm.n,
                        "item_nll": gsm.item_nll, "item_tokens": gsm.item_tokens, "item_kl": gsm.item_kl,
                        "item_nll_base": gsm_base.item_nll}
        rec["gsm8k"]["delta_nll_ci"] = S.paired_mean_delta(gsm.item_nll, gsm_base.item_nll, gsm.item_tokens).as_dict()
        rec["gsm8k"]["answer_nll_ci"] = S.mean_interval(gsm.item_nll, gsm.item_tokens).as_dict()
    if mmlu is not None and mmlu_base is not None and mmlu.items:
        rec["mmlu"] = {"acc": mmlu.correct / mmlu.items, "acc_base": mmlu_base.correct / mmlu_base.items,
                       "kl": mmlu.kl / mmlu.items, "agreement": mmlu.agree / mmlu.items, "items": mmlu.items,
                       "item_correct": mmlu.item_correct, "item_correct_base": mmlu_base.item_correct,
                       "item_kl": mmlu.item_kl}
        rec["mmlu"]["acc_ci"] = S.mean_interval(mmlu.item_correct).as_dict()
        rec["mmlu"]["delta_acc_ci"] = S.paired_mean_delta(mmlu.item_correct, mmlu_base.item_correct).as_dict()
    return rec


def text_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Δ ppl % of record a against record b (same run: same windows, same scored tokens), with the
    window (cluster) bootstrap interval, the 64-token block bootstrap interval, and the number of
    windows a ±0.3 % interval would need at this per-window spread."""
    wa, wb, wn = a["nll_sum_per_window"], b["nll_sum_per_window"], a["tokens_per_window"]
    if len(wa) != len(wb) or list(wn) != list(b["tokens_per_window"]):
        raise ValueError("records are not paired: different windows or scored tokens")
    win = S.paired_ppl_delta(wa, wb, wn, unit="window")
    per_window = [100.0 * math.expm1((x - y) / n) for x, y, n in zip(wa, wb, wn, strict=True)]
    out: dict[str, Any] = {"window": win.as_dict(), "windows_for_0.3pct": S.windows_needed(per_window, 0.3)}
    ba, bb, bn = a.get("nll_sum_per_block32"), b.get("nll_sum_per_block32"), a.get("tokens_per_block32")
    if ba and bb and len(ba) == len(bb):
        k = BLOCK // STORE_BLOCK
        merge = lambda xs: [sum(xs[i:i + k]) for i in range(0, len(xs), k)]  # noqa: E731
        out["block64"] = S.paired_ppl_delta(merge(ba), merge(bb), merge(bn), unit="block64").as_dict()
    return out


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'A vs B, C vs D' -> [(A, B), (C, D)] (config names may contain ':' and '/')."""
    out = []
    for part in spec.split(","):
        if " vs " in part:
            a, b = part.split(" vs ", 1)
            out.append((a.strip(), b.strip()))
        elif part.strip():
            raise ValueError(f"--compare {part.strip()!r}: expected 'A vs B'")
    return out


def task_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired task deltas of config a against config b (same items): GSM8K reference-answer NLL per answer
    token (nats) and MMLU accuracy, each with a bootstrap interval over items; {} where either lacks a task."""
    out: dict[str, Any] = {}
    ga, gb = a.get("gsm8k") or {}, b.get("gsm8k") or {}
    if ga.get("item_nll") and gb.get("item_nll"):
        if ga["item_tokens"] != gb["item_tokens"]:
            raise ValueError(f"{a['config']} and {b['config']}: GSM8K items are not paired (other answer tokens)")
        out["gsm8k_delta_nll"] = S.paired_mean_delta(ga["item_nll"], gb["item_nll"], ga["item_tokens"]).as_dict()
    ma, mb = a.get("mmlu") or {}, b.get("mmlu") or {}
    if ma.get("item_correct") and mb.get("item_correct"):
        if len(ma["item_correct"]) != len(mb["item_correct"]):
            raise ValueError(f"{a['config']} and {b['config']}: MMLU items are not paired")
        out["mmlu_delta_acc"] = S.paired_mean_delta(ma["item_correct"], mb["item_correct"]).as_dict()
    return out


def pairwise(records: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Paired comparisons between configs of one run, one row per pair asked for: {a, b, window / block64
    (Δ ppl %, where both have windows), gsm8k_delta_nll / mmlu_delta_acc (where both ran the task)}. A pair
    that cannot be compared keeps its row with a `note` saying why (never dropped in silence)."""
    by = {r["config"]: r for r in records}
    out = []
    for a, b in pairs:
        row: dict[str, Any] = {"a": a, "b": b}
        missing = [c for c in (a, b) if c not in by]
        if missing:
            row["note"] = "not in this run: " + ", ".join(missing)
            out.append(row)
            continue
        ra, rb = by[a], by[b]
        row.update({"bits_a": ra["effective_bits"], "bits_b": rb["effective_bits"], "kl_a": ra.get("kl"),
                    "kl_b": rb.get("kl")})
        if "nll_sum_per_window" in ra and "nll_sum_per_window" in rb:
            row.update(text_delta(ra, rb))
        row.update(task_delta(ra, rb))
        if not any(k in row for k in ("window", "gsm8k_delta_nll", "mmlu_delta_acc")):
            row["note"] = "no windows or task items in common"
        out.append(row)
    return out


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ci(d: dict[str, Any] | None, fmt: str = "+.2f") -> str:
    if not d:
        return "-"
    return f"{d['value']:{fmt}} [{d['lo']:{fmt}}, {d['hi']:{fmt}}]" + (" **R**" if d.get("resolved") else "")


LEGEND = """Legend. One run: every config is scored on the same windows, tokens and items as the `bf16`
reference (KV cast to bf16 and back = the unquantized device pool).
- config: `K{bits}{t|c}V{bits}{t|c}-{a|s}-g{G}[+rN]` = key bits and grouping (t per-token groups
  along head_dim, c per-channel groups along the tokens of a page), value bits and grouping,
  a = asymmetric (min + scale) / s = symmetric, G elements per group, +rN = last N tokens kept bf16;
  `seed` = K4tV4t-s-g64+r128 (the seed's defaults); `mixed` = K8V4 in the key-outlier layers,
  K4V2 elsewhere; `table:PATH` = a per-layer table (from python -m kvtuner_hicache.calibrate).
- eff. bits: bits per KV element in a page, everything counted (codes, fp16 scale/min, header);
  × = compression vs bf16.
- Δ ppl % [95% CI]: perplexity of the continuation behind the quantized prefix vs bf16, with a
  paired bootstrap interval over windows (2,000 resamples, seed 0); **R** = resolved (interval
  excludes 0, with at least 5 windows or items). block CI: the same over 64-token blocks (narrower; ignores within-window
  correlation, shown for reference).
- KL: mean KL(bf16 ‖ config) of the next-token distributions; top-1: argmax agreement with bf16.
- GSM8K ΔNLL: reference-answer NLL per answer token (nats) vs bf16, behind a quantized few-shot
  prefix, paired bootstrap over items. MMLU acc: answer-letter accuracy (bootstrap over items);
  MMLU Δacc: paired vs bf16."""


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The results table: one row per config (intervals from the paired bootstrap, see LEGEND)."""
    head = ("| config | eff. bits | × vs bf16 | ppl | Δ ppl % [95% CI] | block CI | top-1 | KL | "
            "GSM8K ΔNLL [95% CI] | MMLU acc [95% CI] | MMLU Δacc [95% CI] |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        st = (r.get("stats") or {}).get("ppl_delta_pct") or {}
        g = r.get("gsm8k") or {}
        m = r.get("mmlu") or {}
        blk = st.get("block64")
        ref = r.get("is_reference") or r.get("config") == "bf16"
        blk_s = "-" if ref or not blk else f"[{blk['lo']:+.2f}, {blk['hi']:+.2f}]"
        rows.append(
            f"| {r['config']} | {r['effective_bits']:.3f} | {r['compression_ratio']:.2f} | {_f(r.get('ppl'), '.3f')} | "
            f"{'ref' if ref else _ci(st.get('window'))} | "
            f"{blk_s} | "
            f"{_f(r.get('top1_agreement'), '.4f')} | {_f(r.get('kl'), '.5f')} | "
            f"{'ref' if ref and g else _ci(g.get('delta_nll_ci'), '+.4f')} | {_ci(m.get('acc_ci'), '.3f').replace(' **R**', '')} | "
            f"{'ref' if ref and m else _ci(m.get('delta_acc_ci'), '+.3f')} |"
        )
    return "\n".join(rows)


def pairwise_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Between-config comparisons (a vs b), one row each ('-' where a measure is not in both)."""
    out = ["| a | b | bits a / b | Δ ppl % a vs b [95% CI, windows] | block CI | resolved | windows for ±0.3 % | KL a / b "
           "| GSM8K ΔNLL a vs b [95% CI] | MMLU Δacc a vs b [95% CI] | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        w, blk = d.get("window"), d.get("block64")
        bits = f"{d['bits_a']:.3f} / {d['bits_b']:.3f}" if "bits_a" in d else "-"
        kl = f"{d['kl_a']:.4f} / {d['kl_b']:.4f}" if d.get("kl_a") is not None and d.get("kl_b") is not None else "-"
        out.append(f"| {d['a']} | {d['b']} | {bits} | {_ci(w).replace(' **R**', '')} | "
                   f"{'-' if not blk else _ci(blk).replace(' **R**', '')} | {'-' if not w else 'yes' if w['resolved'] else 'no'} | "
                   f"{_f(d.get('windows_for_0.3pct'), 'd')} | {kl} | {_ci(d.get('gsm8k_delta_nll'), '+.4f')} | "
                   f"{_ci(d.get('mmlu_delta_acc'), '+.3f')} | {d.get('note', '')} |")
    return "\n".join(out)


# ---- re-analysis of a results JSON (also of files written before the statistics existed) --------


def with_window_sums(rec: dict[str, Any]) -> dict[str, Any]:
    """`rec` with `nll_sum_per_window` / `tokens_per_window`, rebuilt from `ppl_per_window` and
    `scored_tokens` (equal windows) for records written before those fields existed."""
    if "nll_sum_per_window" in rec or "ppl_per_window" not in rec:
        return rec
    w = len(rec["ppl_per_window"])
    per = rec["scored_tokens"] // w
    out = dict(rec)
    out["nll_sum_per_window"] = [math.log(p) * per for p in rec["ppl_per_window"]]
    out["tokens_per_window"] = [per] * w
    return out


# Runs with another --threads sum in another order: the same windows' bf16 NLL then differ by about
# 1e-5 relative (1.2e-5 measured on qwen2.5-coder-1.5b, 1 vs 2 threads); other windows or text by > 1e-3.
MERGE_REF_REL_TOL = 1e-4


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs on the same windows (same model, windows, prefix, scored
    tokens, page size), e.g. uniform configs first and calibrated tables later. The runs must agree
    on the bf16 reference's per-window NLL (it is computed the same way, batch 1, in every run) to
    MERGE_REF_REL_TOL; then every record pairs with every other. Later runs' duplicates are dropped.
    The largest relative difference seen is recorded in the merged meta (`merge_ref_max_rel_diff`)."""
    if not results:
        raise ValueError("merge: no results")
    keys = ("model", "windows", "prefix_len", "score_len", "page_size")
    first = results[0]
    ref0 = with_window_sums(next(r for r in first["records"] if r.get("config") == "bf16"))
    records = list(first["records"])
    seen = {r["config"] for r in records}
    worst = 0.0
    for res in results[1:]:
        diff = [k for k in keys if res["meta"].get(k) != first["meta"].get(k)]
        if diff:
            raise ValueError(f"merge: runs differ in {diff}")
        ref = with_window_sums(next(r for r in res["records"] if r.get("config") == "bf16"))
        for a, b in zip(ref["nll_sum_per_window"], ref0["nll_sum_per_window"], strict=True):
            rel = abs(a - b) / abs(b)
            if rel > MERGE_REF_REL_TOL:
                raise ValueError(f"merge: the bf16 references differ by {rel:.1e} relative (not the same windows or text)")
            worst = max(worst, rel)
        for r in res["records"]:
            if r["config"] not in seen:
                records.append(r)
                seen.add(r["config"])
    meta = dict(first["meta"])
    meta["merged_commands"] = [r["meta"].get("command") for r in results]
    meta["merge_ref_max_rel_diff"] = worst
    return {**first, "meta": meta, "records": records}


_CONCAT = ("nll_sum_per_window", "tokens_per_window", "nll_sum_per_block32", "tokens_per_block32")


def concat(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs on *different* windows of the same text (same model, prefix, scored
    tokens, page size, configs): per config, the per-window and per-block arrays are joined and
    ppl, Δ, KL and top-1 recomputed over all windows. Windows must not repeat (checked on the
    recorded `window_offsets` when both runs have them, else on the bf16 per-window NLLs).
    GSM8K/MMLU parts are kept from the first run only."""
    keys = ("model", "prefix_len", "score_len", "page_size")
    first = results[0]
    for res in results[1:]:
        diff = [k for k in keys if res["meta"].get(k) != first["meta"].get(k)]
        if diff:
            raise ValueError(f"concat: runs differ in {diff}")
    refs = [with_window_sums(next(r for r in res["records"] if r.get("config") == "bf16")) for res in results]
    offs = [res["meta"].get("window_offsets") for res in results]
    if all(offs):
        flat = [o for x in offs for o in x]  # type: ignore[union-attr]
        if len(set(flat)) != len(flat):
            raise ValueError("concat: a window appears in two runs")
    else:
        flat_nll = [round(x, 6) for r in refs for x in r["nll_sum_per_window"]]
        if len(set(flat_nll)) != len(flat_nll):
            raise ValueError("concat: two runs share a window (same bf16 NLL)")
    names = [r["config"] for r in first["records"]]
    for res in results[1:]:
        missing = set(names) - {r["config"] for r in res["records"]}
        if missing:
            raise ValueError(f"concat: configs missing from a run: {sorted(missing)}")
    out_recs = []
    ref_all = sum((r["nll_sum_per_window"] for r in refs), [])
    ref_tok = sum((r["tokens_per_window"] for r in refs), [])
    for name in names:
        parts = [with_window_sums(next(r for r in res["records"] if r["config"] == name)) for res in results]
        rec = dict(parts[0])
        for k in _CONCAT:
            if all(k in p for p in parts):
                rec[k] = sum((list(p[k]) for p in parts), [])
            else:
                rec.pop(k, None)
        n = sum(rec["tokens_per_window"])
        rec["scored_tokens"] = n
        rec["ppl"] = math.exp(sum(rec["nll_sum_per_window"]) / n)
        rec["ppl_base"] = math.exp(sum(ref_all) / sum(ref_tok))
        rec["ppl_delta_pct"] = 100.0 * (rec["ppl"] / rec["ppl_base"] - 1.0)
        rec["ppl_per_window"] = [math.exp(x / t) for x, t in zip(rec["nll_sum_per_window"], rec["tokens_per_window"], strict=True)]
        rec["ppl_delta_pct_per_window"] = [100.0 * math.expm1((x - y) / t) for x, y, t in
                                           zip(rec["nll_sum_per_window"], ref_all, rec["tokens_per_window"], strict=True)]
        for k in ("kl", "top1_agreement"):
            if all(k in p for p in parts):
                rec[k] = sum(p[k] * p["scored_tokens"] for p in parts) / n
        rec.pop("stats", None)
        out_recs.append(rec)
    meta = dict(first["meta"])
    meta["windows"] = len(ref_all)
    meta["window_offsets"] = [o for x in offs for o in (x or [])]
    meta["concatenated_commands"] = [r["meta"].get("command") for r in results]
    return {**first, "meta": meta, "records": out_recs}


def reanalyze(result: dict[str, Any], pairs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Recompute every record's Δ ppl interval against the run's bf16 record, and `pairs`."""
    recs = [with_window_sums(r) for r in result["records"]]
    ref = next(r for r in recs if r.get("config") == "bf16" or r.get("is_reference"))
    for r in recs:
        if "nll_sum_per_window" in r and r is not ref:
            r.setdefault("stats", {})["ppl_delta_pct"] = text_delta(r, ref)
        m = r.get("mmlu")
        if m and "acc_ci" not in m and m.get("items"):  # an old record: no per-item data
            r["mmlu"] = {**m, "acc_ci": S.wilson(round(m["acc"] * m["items"]), m["items"]).as_dict()}
    return {**result, "records": recs, "pairwise": pairwise(recs, pairs)}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvtuner_hicache.eval.report RESULTS.json [--compare 'A vs B,...'] [--json OUT]`."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m kvtuner_hicache.eval.report",
                                 description="Paired bootstrap intervals for a results JSON of the accuracy harness.")
    ap.add_argument("results", nargs="+", help="one results JSON, or several runs on the same windows to merge")
    ap.add_argument("--compare", default="", help="'A vs B,C vs D': config A against config B")
    ap.add_argument("--concat", action="store_true",
                    help="the runs are on different windows of the same text: join their windows")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    runs = []
    for path in a.results:
        with open(path) as f:
            runs.append(json.load(f))
    result = (concat(runs) if a.concat else merge(runs)) if len(runs) > 1 else runs[0]
    pairs = parse_pairs(a.compare)
    out = reanalyze(result, pairs)
    print(markdown(out["records"]))
    if out["pairwise"]:
        print()
        print(pairwise_markdown(out["pairwise"]))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
