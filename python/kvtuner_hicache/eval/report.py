"""Per-config records (the JSON schema) and the markdown table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kvtuner_hicache.config import KVShape
from kvtuner_hicache.eval.configs import EvalConfig
from kvtuner_hicache.eval.harness import Acc
from kvtuner_hicache.page_format import PageLayout


def sizes(cfg: EvalConfig, layout: PageLayout | None, shape: KVShape, page_size: int, prefix_len: int) -> dict[str, float]:
    """effective_bits / compression_ratio of the page format, and of the whole prefix incl. bf16 residual pages."""
    if layout is None:
        bits = 32.0 if cfg.kv_dtype == "fp32" else 16.0
        return {"effective_bits": bits, "compression_ratio": 16.0 / bits, "prefix_effective_bits": bits}
    pages = prefix_len // page_size
    residual = min(cfg.residual_pages(page_size), pages)
    bf16_page = shape.bf16_bytes_per_token() * page_size
    prefix_bytes = (pages - residual) * layout.page_bytes + residual * bf16_page
    return {
        "effective_bits": layout.effective_bits,
        "compression_ratio": layout.compression_vs_bf16,
        "prefix_effective_bits": prefix_bytes * 8 / (prefix_len * layout.elements_per_token) if prefix_len else layout.effective_bits,
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
        })
    if gsm is not None and gsm_base is not None and gsm.n:
        nll, base = gsm.nll / gsm.n, gsm_base.nll / gsm_base.n
        rec["gsm8k"] = {"answer_nll": nll, "answer_nll_base": base, "delta_nll": nll - base,
                        "kl": gsm.kl / gsm.n, "top1_agreement": gsm.top1 / gsm.n, "answer_tokens": gsm.n}
    if mmlu is not None and mmlu_base is not None and mmlu.items:
        rec["mmlu"] = {"acc": mmlu.correct / mmlu.items, "acc_base": mmlu_base.correct / mmlu_base.items,
                       "kl": mmlu.kl / mmlu.items, "agreement": mmlu.agree / mmlu.items, "items": mmlu.items}
    return rec


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The results table: one row per config."""
    head = ("| config | eff. bits | prefix bits | × vs bf16 | ppl | Δ% | Δ% windows (min..max) | top-1 | KL | "
            "GSM8K ΔNLL | MMLU acc | MMLU KL |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        pw = r.get("ppl_delta_pct_per_window") or []
        rng = f"{min(pw):+.2f}..{max(pw):+.2f}" if len(pw) > 1 else "-"
        g = r.get("gsm8k") or {}
        m = r.get("mmlu") or {}
        rows.append(
            f"| {r['config']} | {r['effective_bits']:.3f} | {r['prefix_effective_bits']:.3f} | "
            f"{r['compression_ratio']:.2f} | {_f(r.get('ppl'), '.3f')} | {_f(r.get('ppl_delta_pct'), '+.2f')} | {rng} | "
            f"{_f(r.get('top1_agreement'), '.4f')} | {_f(r.get('kl'), '.5f')} | {_f(g.get('delta_nll'), '+.4f')} | "
            f"{_f(m.get('acc'), '.3f')} | {_f(m.get('kl'), '.5f')} |"
        )
    return "\n".join(rows)
