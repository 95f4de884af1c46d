"""Calibrate a KVTuner per-layer table for a model: `python -m kvtuner_hicache.calibrate`.

1. Sensitivity: prefill calibration windows once; for every layer i and candidate pair (K bits,
   V bits), round-trip *only* layer i's prefix KV through the page format (all other layers keep
   the bf16 reference) and score the continuation: mean KL(reference || quantized) per token.
   Quantizing the prefix and scoring what follows is what HiCache does to a request (unlike
   KVTuner's exact-prefill calibration, which never sees the quantized prefix).
2. Allocation: a multiple-choice knapsack. Layer costs are the page-format bytes of the layer's
   chunks (metadata included); the per-layer KLs are treated as additive; greedy upgrades along
   each layer's lower convex hull of (bytes, KL) until the effective-bits budget is spent.
3. Output: a KVTuner-format YAML `{layer: {nbits_key, nbits_value}}` usable with
   `--kvtuner-hicache-config`, with a comment header saying how it was made.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig
from kvtuner_hicache.page_format import PageLayout

DEFAULT_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))  # KVTuner's pruned key-first candidate set


# ---- allocation (pure, no model) ----------------------------------------------------------------


def layer_bytes(cfg: QuantConfig, shape: KVShape, page_size: int, pair: tuple[int, int]) -> int:
    """Bytes one layer takes in a page (K chunk + V chunk) at `pair`, metadata included."""
    one = KVShape(1, shape.heads, shape.head_dim, shape.v_head_dim, shape.is_mla, shape.kv_lora_rank, shape.qk_rope_head_dim)
    lay = PageLayout(cfg.with_(nbits_key=pair[0], nbits_value=pair[1], layer_bits=None), one, page_size)
    return sum(c.nbytes for c in lay.chunks.values())


def _hull(options: list[tuple[int, float, tuple[int, int]]]) -> list[tuple[int, float, tuple[int, int]]]:
    """Lower convex hull of (bytes, kl) points, by increasing bytes, KL strictly decreasing."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    front: list[tuple[int, float, tuple[int, int]]] = []
    for p in pts:  # Pareto: drop points not better than a cheaper one
        if not front or p[1] < front[-1][1]:
            front.append(p)
    hull: list[tuple[int, float, tuple[int, int]]] = []
    for p in front:
        while len(hull) >= 2:
            (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (k2 - k1) * (p[0] - b1) >= (p[1] - k1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(costs: Sequence[dict[tuple[int, int], int]], kl: Sequence[dict[tuple[int, int], float]], budget: int) -> list[tuple[int, int]]:
    """Pick one pair per layer minimising sum(kl) with sum(bytes) <= budget (greedy on convex hulls)."""
    hulls = [_hull([(costs[i][p], kl[i][p], p) for p in costs[i]]) for i in range(len(costs))]
    pos = [0] * len(hulls)
    spent = sum(h[0][0] for h in hulls)
    if spent > budget:
        raise ValueError(f"budget {budget} B is below the cheapest table ({spent} B)")
    while True:
        best, best_rate = None, 0.0
        for i, h in enumerate(hulls):
            if pos[i] + 1 < len(h):
                db = h[pos[i] + 1][0] - h[pos[i]][0]
                dk = h[pos[i]][1] - h[pos[i] + 1][1]
                rate = dk / db if db > 0 else math.inf
                if spent + db <= budget and rate > best_rate:
                    best, best_rate = i, rate
        if best is None:
            return [h[p][2] for h, p in zip(hulls, pos, strict=True)]
        spent += hulls[best][pos[best] + 1][0] - hulls[best][pos[best]][0]
        pos[best] += 1


def to_yaml(table: Sequence[tuple[int, int]], header: Sequence[str]) -> str:
    lines = [f"# {h}" for h in header]
    for i, (k, v) in enumerate(table):
        lines += [f"{i}:", f"  nbits_key: {k}", f"  nbits_value: {v}"]
    return "\n".join(lines) + "\n"


# ---- sensitivity (real model) -------------------------------------------------------------------


@dataclass
class Sensitivity:
    kl: list[dict[tuple[int, int], float]]  # per layer, per pair: mean KL per scored token
    tokens: int
    seconds: float


def measure(model_name: str, cfg: QuantConfig, pairs: Sequence[tuple[int, int]], windows: int, prefix_len: int,
            score_len: int, page_size: int, batch: int, log=print) -> tuple[Sensitivity, KVShape]:
    import torch

    from kvtuner_hicache.eval import data as D
    from kvtuner_hicache.eval import models
    from kvtuner_hicache.eval.configs import EvalConfig
    from kvtuner_hicache.eval.harness import Harness, cache_kv, compare, make_ref

    torch.set_num_threads(2)
    lm = models.load(model_name)
    h = Harness(lm.model, lm.shape, page_size, batch=batch, log=log)
    tok = lm.tokenizer
    ids = D.encode(tok, D.essay_text(models.data_dir()))
    # windows centred between the accuracy harness's evenly spaced ones (offsets (2w+1)/(2n) of the
    # corpus), so a table is never validated on the text it was calibrated on
    pre = D.special_prefix(tok)
    body = prefix_len + score_len - len(pre)
    span = len(ids) - body
    wins = [pre + ids[o:o + body] for o in (span * (2 * w + 1) // (2 * windows) for w in range(windows))]
    base = EvalConfig("bf16", None, "bf16")
    variants = {p: EvalConfig(f"K{p[0]}V{p[1]}", cfg.with_(nbits_key=p[0], nbits_value=p[1], layer_bits=None)) for p in pairs}
    n_layers = lm.shape.num_layers
    kl = [{p: 0.0 for p in pairs} for _ in range(n_layers)]
    tokens = 0
    t0 = time.perf_counter()
    for w, win in enumerate(wins):
        cache = h.prefill(win[:prefix_len])
        kv = cache_kv(cache)
        ref_kv = h.variant(kv, base)
        feed = list(win[prefix_len:-1])
        targets = torch.tensor(win[prefix_len + 1:], dtype=torch.long)
        (_, bl), = h.forward(cache, [("bf16", ref_kv)], feed)
        ref = make_ref(bl)
        full = {p: h.variant(kv, c) for p, c in variants.items()}  # every layer round-tripped at p
        jobs = []
        for i in range(n_layers):
            for p in pairs:
                mixed = list(ref_kv)
                mixed[i] = full[p][i]  # only layer i quantized
                jobs.append((f"{i}:{p[0]}:{p[1]}", mixed))
        for name, logits in h.forward(cache, jobs, feed):
            _, k, _ = compare(logits, targets, ref)
            i, kb, vb = (int(x) for x in name.split(":"))
            kl[i][(kb, vb)] += k
        tokens += len(feed)
        log(f"[calibrate] window {w + 1}/{len(wins)}: {len(jobs)} single-layer configs in {time.perf_counter() - t0:.0f}s")
    for row in kl:
        for p in row:
            row[p] /= tokens
    return Sensitivity(kl, tokens, time.perf_counter() - t0), lm.shape


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtuner_hicache.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", type=float, required=True, help="budget: effective bits per KV element, metadata included")
    ap.add_argument("--out", required=True, help="YAML file to write")
    ap.add_argument("--pairs", default=",".join(f"K{k}V{v}" for k, v in DEFAULT_PAIRS))
    ap.add_argument("--axis-key", type=int, default=QuantConfig().axis_key)
    ap.add_argument("--axis-value", type=int, default=QuantConfig().axis_value)
    ap.add_argument("--q-group-size", type=int, default=QuantConfig().q_group_size)
    ap.add_argument("--asym", action=argparse.BooleanOptionalAction, default=QuantConfig().asym)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--score-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", help="also write the sensitivity matrix and the choice as JSON")
    a = ap.parse_args(argv)
    pairs = []
    for tok in a.pairs.split(","):
        tok = tok.strip().upper()
        if not (tok.startswith("K") and "V" in tok):
            ap.error(f"--pairs: {tok!r} is not of the form K8V4")
        kb, vb = tok[1:].split("V")
        pairs.append((int(kb), int(vb)))
    cfg = QuantConfig(axis_key=a.axis_key, axis_value=a.axis_value, q_group_size=a.q_group_size, asym=a.asym)
    sens, shape = measure(a.model, cfg, pairs, a.windows, a.prefix_len, a.score_len, a.page_size, a.batch,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    costs = [{p: layer_bytes(cfg, shape, a.page_size, p) for p in pairs} for _ in range(shape.num_layers)]
    elements = shape.heads * (shape.head_dim + shape.v_head_dim) * a.page_size
    budget = int(a.bits / 8 * elements * shape.num_layers)
    table = allocate(costs, sens.kl, budget)
    full = QuantConfig(axis_key=a.axis_key, axis_value=a.axis_value, q_group_size=a.q_group_size, asym=a.asym,
                       layer_bits={i: LayerBits(*p) for i, p in enumerate(table)})
    lay = PageLayout(full, shape, a.page_size)
    predicted = sum(sens.kl[i][p] for i, p in enumerate(table))
    header = [
        f"KVTuner per-layer table for {a.model}, made by python -m kvtuner_hicache.calibrate",
        f"budget {a.bits} effective bits/element -> {lay.effective_bits:.3f} bits ({lay.compression_vs_bf16:.2f}x vs bf16) "
        f"at page {a.page_size}; axes K={a.axis_key} V={a.axis_value}, group {a.q_group_size}, {'asym' if a.asym else 'sym'}",
        f"sensitivity: single-layer KL on {sens.tokens} scored tokens ({a.windows} windows, prefix {a.prefix_len}); "
        f"predicted sum KL {predicted:.4g}",
        "use with the same axes/group/asym flags it was calibrated for",
    ]
    with open(a.out, "w") as f:
        f.write(to_yaml(table, header))
    print("\n".join(header))
    print("| layer | " + " | ".join(f"K{k}V{v} KL" for k, v in pairs) + " | chosen |")
    print("|---" * (len(pairs) + 2) + "|")
    for i, row in enumerate(sens.kl):
        print(f"| {i} | " + " | ".join(f"{row[p]:.2e}" for p in pairs) + f" | K{table[i][0]}V{table[i][1]} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "bits_budget": a.bits, "effective_bits": lay.effective_bits,
                       "pairs": [list(p) for p in pairs], "kl": [[row[p] for p in pairs] for row in sens.kl],
                       "table": [list(p) for p in table], "predicted_kl": predicted, "seconds": sens.seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
