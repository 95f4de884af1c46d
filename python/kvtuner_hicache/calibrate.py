"""Calibrate a KVTuner per-layer table for a model: `python -m kvtuner_hicache.calibrate`.

What it optimises: the KL divergence, against the unquantized (bf16) pool, of the next-token
distributions of a continuation whose prefix KV went through the page format (what HiCache does
to a request reloaded from L2/L3), subject to a budget in *effective* bits per KV element
(codes + fp16 metadata + alignment + page header, `PageLayout.effective_bits`). With `--objective nll`
it optimises the mean NLL of the calibration text's own next tokens instead (log perplexity); "KL" below
then stands for that objective.

How (interaction-aware greedy with re-measurement):

1. Calibration text: windows of the Paul Graham essays placed in the gaps between the windows
   the accuracy harness evaluates on (`--eval-windows`, `--eval-window-len`); the two are checked
   disjoint and the spans are recorded in the table, so a table is never scored on its own text.
2. Round r measures, *in the context of the current table* T (round 1: uniform `--anchor`; by default,
   per budget, the candidate pair whose uniform table is nearest the budget, `anchor_for`), KL(T) and,
   for every layer i and candidate pair p, KL(T with layer i at p):
   the marginal cost or gain of one layer's change given that every other layer is quantized.
   Only the layers from i on are recomputed (the hidden states entering layer i are replayed
   from T's forward), which halves the cost.
3. Allocation: an exact multiple-choice knapsack (dynamic programming over page bytes) on the
   additive model KL(T') ~ KL(T) + sum_i [KL(T, i->p_i) - KL(T)] under the byte budget, each change
   charged `--z` standard errors of its KL change over the calibration windows (`pessimistic_value`:
   a change that only noise favours is not taken).
4. The new table becomes the context of the next round; after the last round the candidate
   tables (one per round) are measured and the one with the lowest measured KL is written.

Output: a KVTuner-format YAML `{layer: {nbits_key, nbits_value}}` that KVTuner's readers load
as is, plus one comment line `#@kvtuner-hicache {json}` recording the flags it was calibrated
with (axes, group, asym, page size), the model and the calibration spans. `load_layer_bits`
reads that line back and `config.table_flag_errors` checks a server's flags against it.
Several `--bits` budgets share round 1 (`--bits 3.0,3.5 --out t_{bits}.yaml`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig, table_meta_line
from kvtuner_hicache.page_format import HEADER_BYTES, PageLayout

Pair = tuple[int, int]
DEFAULT_PAIRS: tuple[Pair, ...] = ((2, 2), (2, 4), (3, 2), (3, 3), (4, 2), (4, 4))  # every one served by kernel 0.7.0
TABLE_FORMAT = 1  # version of the #@kvtuner-hicache metadata block


# ---- costs and allocation (pure, no model) ------------------------------------------------------


def layer_bytes(cfg: QuantConfig, shape: KVShape, page_size: int, pair: Pair) -> int:
    """Bytes one layer takes in a page (K chunk + V chunk) at `pair`, metadata and alignment included."""
    one = KVShape(1, shape.heads, shape.head_dim, shape.v_head_dim, shape.is_mla, shape.kv_lora_rank, shape.qk_rope_head_dim)
    lay = PageLayout(cfg.with_(nbits_key=pair[0], nbits_value=pair[1], layer_bits=None), one, page_size)
    return sum(c.nbytes for c in lay.chunks.values())


def anchor_for(costs: dict[Pair, int], n_layers: int, budget: int) -> Pair:
    """The pair whose uniform table is nearest `budget` in bytes (ties: more key bits, then more value bits).
    Round 1 measures in its context and `--z` charges every departure from it, so a table stays at the uniform
    pair of its budget wherever the calibration text does not clearly favour another (K3V2 for 3.0 bits, which
    the page header puts 0.001 bit over; K4V2 for 3.5)."""
    return min(costs, key=lambda p: (abs(costs[p] * n_layers - budget), -p[0], -p[1]))


def budget_bytes(bits: float, shape: KVShape, page_size: int) -> int:
    """Layer bytes a page may hold so that its effective bits (header included) are <= `bits`."""
    elements = page_size * (shape.heads * (shape.head_dim + shape.v_head_dim) if not shape.is_mla
                            else shape.kv_lora_rank + shape.qk_rope_head_dim) * shape.num_layers
    return math.floor(bits * elements / 8) - HEADER_BYTES


def _hull(options: list[tuple[int, float, Pair]]) -> list[tuple[int, float, Pair]]:
    """Lower convex hull of (bytes, kl) points, by increasing bytes, KL strictly decreasing."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    front: list[tuple[int, float, Pair]] = []
    for p in pts:  # Pareto: drop points not better than a cheaper one
        if not front or p[1] < front[-1][1]:
            front.append(p)
    hull: list[tuple[int, float, Pair]] = []
    for p in front:
        while len(hull) >= 2:
            (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
            if (k2 - k1) * (p[0] - b1) >= (p[1] - k1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(costs: Sequence[dict[Pair, int]], kl: Sequence[dict[Pair, float]], budget: int) -> list[Pair]:
    """Greedy multiple-choice knapsack on each layer's convex hull (fast, near-optimal)."""
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


def allocate_exact(costs: Sequence[dict[Pair, int]], value: Sequence[dict[Pair, float]], budget: int) -> list[Pair]:
    """Exact multiple-choice knapsack: one pair per layer, sum(cost) <= budget, minimal sum(value).

    Dynamic programming over the budget in units of the gcd of all costs (page-format chunk sizes
    are multiples of 128 B, so the table stays small). Ties go to the cheaper table. Raises
    ValueError when even the cheapest table exceeds the budget.
    """
    unit = reduce(math.gcd, [c for row in costs for c in row.values()])
    cap = budget // unit
    cheapest = sum(min(row.values()) for row in costs) // unit
    if cheapest > cap:
        raise ValueError(f"budget {budget} B is below the cheapest table ({cheapest * unit} B)")
    inf = math.inf
    best = [inf] * (cap + 1)  # best[b]: minimal value using exactly b units so far
    best[0] = 0.0
    choice: list[list[Pair | None]] = []
    for i, row in enumerate(costs):
        nxt = [inf] * (cap + 1)
        ch: list[Pair | None] = [None] * (cap + 1)
        for b in range(cap + 1):
            if best[b] == inf:
                continue
            for p, c in row.items():
                nb = b + c // unit
                if nb <= cap:
                    v = best[b] + value[i][p]
                    if v < nxt[nb] - 1e-15:
                        nxt[nb], ch[nb] = v, p
        best = nxt
        choice.append(ch)
    end = min(range(cap + 1), key=lambda b: (best[b], b))
    table: list[Pair] = []
    b = end
    for i in range(len(costs) - 1, -1, -1):
        p = choice[i][b]
        assert p is not None
        table.append(p)
        b -= costs[i][p] // unit
    return table[::-1]


def to_yaml(table: Sequence[Pair], header: Sequence[str], meta: dict[str, Any] | None = None) -> str:
    """KVTuner's per-layer YAML, preceded by comment lines (and the metadata line, if given)."""
    lines = [f"# {h}" for h in header]
    if meta is not None:
        lines.append(table_meta_line(meta))
    for i, (k, v) in enumerate(table):
        lines += [f"{i}:", f"  nbits_key: {k}", f"  nbits_value: {v}"]
    return "\n".join(lines) + "\n"


# ---- calibration text, disjoint from the evaluation windows -------------------------------------


def eval_spans(n_tokens: int, n_windows: int, window_len: int) -> list[tuple[int, int]]:
    """[start, end) essay-token spans of the accuracy harness's `n_windows` windows."""
    from kvtuner_hicache.eval.data import window_offsets

    return [(o, o + window_len) for o in window_offsets(n_tokens, window_len, n_windows)]


def calibration_spans(n_tokens: int, n_windows: int, length: int, avoid: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`n_windows` spans of `length` tokens, centred in the largest gaps between the `avoid` spans
    (one per gap, largest gaps first, returned in text order); ValueError if they do not fit."""
    edges = sorted(avoid)
    gaps, pos = [], 0
    for s, e in edges:
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < n_tokens:
        gaps.append((pos, n_tokens))
    gaps = [g for g in gaps if g[1] - g[0] >= length]
    gaps.sort(key=lambda g: -(g[1] - g[0]))
    if len(gaps) < n_windows:
        raise ValueError(f"only {len(gaps)} gaps of >= {length} tokens between the evaluation windows; "
                         f"use fewer/shorter calibration windows")
    spans = [((a + b - length) // 2, (a + b - length) // 2 + length) for a, b in gaps[:n_windows]]
    return sorted(spans)


def overlaps(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every pair of overlapping [start, end) spans."""
    return [(x, y) for x in a for y in b if x[0] < y[1] and y[0] < x[1]]


# ---- replaying the layers before the first changed one ------------------------------------------


def decoder_layers(model: Any) -> Any:
    """The decoder layer ModuleList of a transformers causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no .model.layers to replay")
    return layers


@contextlib.contextmanager
def capture_layer_inputs(model: Any) -> Iterator[list[Any]]:
    """Record the hidden states entering every decoder layer during one forward (batch 1)."""
    import torch

    store: list[Any] = [None] * len(decoder_layers(model))

    def hook(i: int) -> Callable[..., None]:
        def f(_mod: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            store[i] = x.detach().clone()
        return f

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.inference_mode():
            yield store
    finally:
        for hd in handles:
            hd.remove()


class _Replay:
    """Stands in for decoder layer j < start: identity, except the last one, which returns the
    recorded input of layer `start` (broadcast over the batch)."""

    def __init__(self, hidden: Any | None):
        self.hidden = hidden

    def __call__(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if self.hidden is None:
            return hidden_states
        return self.hidden.expand(hidden_states.shape[0], *self.hidden.shape[1:])


@contextlib.contextmanager
def replay_from(model: Any, start: int, inputs: Sequence[Any]) -> Iterator[None]:
    """Within the block, a forward runs decoder layers `start`.. only; layers before it return the
    hidden states recorded by `capture_layer_inputs` (their cache layers are not extended, which
    the scoring copy never needs). `start` = 0 changes nothing."""
    if start <= 0:
        yield
        return
    import torch

    layers = decoder_layers(model)
    inner = model.model
    original = list(layers)

    class _Wrap(torch.nn.Module):
        def __init__(self, fn: _Replay):
            super().__init__()
            self.fn = fn
            self.attention_type = getattr(original[0], "attention_type", "full_attention")

        def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            return self.fn(hidden_states, *args, **kwargs)

    swapped = torch.nn.ModuleList([_Wrap(_Replay(inputs[start] if j == start - 1 else None)) for j in range(start)]
                                  + original[start:])
    for j in range(start):
        if hasattr(original[j], "attention_type"):
            swapped[j].attention_type = original[j].attention_type
    inner.layers = swapped
    try:
        yield
    finally:
        inner.layers = layers


# ---- measuring on a real model ------------------------------------------------------------------


@dataclass
class Window:
    cache: Any
    feed: list[int]
    targets: Any
    ref: Any  # harness.Ref of the bf16 reference
    ref_kv: Any
    full: dict[Pair, Any]  # every layer round-tripped at the pair


@dataclass
class Measured:
    kl: float  # mean KL per scored token of the context table
    marginal: list[dict[Pair, float]]  # per layer: mean KL with that layer changed to the pair
    seconds: float
    # per layer: the standard error, over calibration windows, of that change's paired KL difference
    # (0 for the context's own pair, and with fewer than two windows)
    marginal_se: list[dict[Pair, float]] = field(default_factory=list)


# What a table is scored by, as an index into eval.harness.compare's (sum NLL, sum KL, top-1) tuple. `kl`: the KL
# divergence from the bf16 pool's next-token distributions (low variance). `nll`: the NLL of the text's own next
# tokens, i.e. log perplexity, the quantity issue 14's targets are stated in; noisier per token, and on Qwen2.5-Coder
# tables with the lower KL have repeatedly had the higher perplexity (docs/accuracy.md).
OBJECTIVES = {"nll": 0, "kl": 1}


@dataclass
class Calibrator:
    """Measures per-layer tables on calibration windows (see the module docstring) by `objective` (OBJECTIVES):
    every "KL" of this module, its log lines and its JSON is that objective's mean per scored token."""

    harness: Any  # eval.harness.Harness
    cfg: QuantConfig
    pairs: Sequence[Pair]
    progress: bool = True
    objective: str = "kl"
    windows: list[Window] = field(default_factory=list)
    forwards: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: one of {', '.join(OBJECTIVES)}")

    def _score(self, logits: Any, w: Window) -> float:
        """The objective summed over one window's scored tokens."""
        from kvtuner_hicache.eval.harness import compare

        return compare(logits, w.targets, w.ref)[OBJECTIVES[self.objective]]

    def add_window(self, ids: Sequence[int], prefix_len: int) -> None:
        import torch

        from kvtuner_hicache.eval.configs import EvalConfig
        from kvtuner_hicache.eval.harness import cache_kv, make_ref

        h = self.harness
        cache = h.prefill(ids[:prefix_len])
        kv = cache_kv(cache)
        ref_kv = h.variant(kv, EvalConfig("bf16", None, "bf16"))
        feed = list(ids[prefix_len:-1])
        targets = torch.tensor(ids[prefix_len + 1:], dtype=torch.long)
        (_, logits), = h.forward(cache, [("bf16", ref_kv)], feed)
        full = {p: h.variant(kv, EvalConfig(f"K{p[0]}V{p[1]}", self.cfg.with_(nbits_key=p[0], nbits_value=p[1], layer_bits=None)))
                for p in self.pairs}
        self.windows.append(Window(cache, feed, targets, make_ref(logits), ref_kv, full))

    @property
    def tokens(self) -> int:
        return sum(len(w.feed) for w in self.windows)

    def _kv(self, w: Window, table: Sequence[Pair]) -> list[Any]:
        return [w.full[p][i] for i, p in enumerate(table)]

    def table_kl(self, table: Sequence[Pair]) -> float:
        """Measured mean objective (KL by default) per scored token of one table (one forward per window)."""
        total = 0.0
        for w in self.windows:
            (_, logits), = self.harness.forward(w.cache, [("t", self._kv(w, table))], w.feed)
            total += self._score(logits, w)
            self.forwards += 1
        return total / self.tokens

    def measure(self, table: Sequence[Pair], label: str = "") -> Measured:
        """KL(table) and KL(table with layer i at p) for every layer i and pair p."""
        import torch

        t0 = time.perf_counter()
        h = self.harness
        model = h.model
        n_layers = len(table)
        kl = 0.0
        marg = [{p: 0.0 for p in self.pairs} for _ in range(n_layers)]
        diffs: list[list[dict[Pair, float]]] = []  # per window: per-token KL change of each layer's change
        bar = _progress(len(self.windows) * n_layers, f"calibrate {label}".strip(), self.progress)
        for w in self.windows:
            ctx = self._kv(w, table)
            with capture_layer_inputs(model) as inputs:
                (_, logits), = h.forward(w.cache, [("ctx", ctx)], w.feed)
            self.forwards += 1
            base = self._score(logits, w)
            kl += base
            wd = [{p: 0.0 for p in self.pairs} for _ in range(n_layers)]
            for i in range(n_layers):
                jobs = []
                for p in self.pairs:
                    if p == table[i]:
                        marg[i][p] += base
                        continue
                    kv = list(ctx)
                    kv[i] = w.full[p][i]
                    jobs.append((f"{p[0]}:{p[1]}", kv))
                with replay_from(model, i, inputs), torch.inference_mode():
                    for name, lg in h.forward(w.cache, jobs, w.feed):
                        kb, vb = (int(x) for x in name.split(":"))
                        v = self._score(lg, w)
                        marg[i][(kb, vb)] += v
                        wd[i][(kb, vb)] = (v - base) / len(w.feed)
                        self.forwards += 1
                bar.update(1)
            diffs.append(wd)
        bar.close()
        n = self.tokens
        se = [{p: _std_error([d[i][p] for d in diffs]) for p in self.pairs} for i in range(n_layers)]
        return Measured(kl / n, [{p: v / n for p, v in row.items()} for row in marg], time.perf_counter() - t0, se)


def _std_error(xs: Sequence[float]) -> float:
    """Standard error of the mean of `xs` (0 with fewer than two values)."""
    k = len(xs)
    if k < 2:
        return 0.0
    m = sum(xs) / k
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (k - 1) / k)


class _Bar:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.perf_counter()

    def update(self, k: int) -> None:
        self.n += k
        el = time.perf_counter() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else 0.0
        print(f"\r[{self.desc}] {self.n}/{self.total} {el:.0f}s elapsed, ~{eta:.0f}s left", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


class _NoBar:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over `total` steps (a plain stderr counter without tqdm; nothing when disabled)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return _Bar(total, desc)


def pessimistic_value(measured: Measured, table: Sequence[Pair], z: float) -> list[dict[Pair, float]]:
    """Knapsack values: each layer change's measured KL change, plus `z` standard errors of it over the
    calibration windows (the layer's current pair: 0). With a few hundred calibration tokens the ranking of
    dozens of candidate changes picks some for their noise (a winner's curse: tables that beat uniform bits on
    their calibration text and lose to them on other text); charging the uncertainty makes a change that only
    noise favours cost more than it gains, so the table stays with the context's pair there."""
    se = measured.marginal_se or [dict.fromkeys(row, 0.0) for row in measured.marginal]
    return [{p: 0.0 if p == table[i] else row[p] - measured.kl + z * se[i][p] for p in row}
            for i, row in enumerate(measured.marginal)]


def search(cal: Calibrator, costs: Sequence[dict[Pair, int]], budget: int, anchor: Sequence[Pair], rounds: int,
           first: Measured | None = None, log: Callable[[str], None] = print, z: float = 0.0) -> dict[str, Any]:
    """Rounds of measure-in-context + exact knapsack on `pessimistic_value(..., z)`; returns the best measured
    table and the trail."""
    table = list(anchor)
    trail: list[dict[str, Any]] = []
    candidates: list[tuple[float, list[Pair]]] = []
    fits = lambda t: sum(costs[i][p] for i, p in enumerate(t)) <= budget  # noqa: E731
    measured = first
    for r in range(rounds):
        if measured is None:
            measured = cal.measure(table, f"round {r + 1}")
        if fits(table):
            candidates.append((measured.kl, list(table)))
        value = pessimistic_value(measured, table, z)
        new = allocate_exact(costs, value, budget)
        predicted = measured.kl + sum(measured.marginal[i][p] - measured.kl for i, p in enumerate(new) if p != table[i])
        trail.append({"round": r + 1, "context": [list(p) for p in table], "context_kl": measured.kl,
                      "marginal_kl": [[row[p] for p in cal.pairs] for row in measured.marginal],
                      "marginal_se": [[row[p] for p in cal.pairs] for row in measured.marginal_se], "z": z,
                      "chosen": [list(p) for p in new], "predicted_kl": predicted, "seconds": measured.seconds})
        obj = cal.objective.upper()
        log(f"[calibrate] round {r + 1}: context {obj} {measured.kl:.5f}, new table predicted {obj} {predicted:.5f} "
            f"({sum(1 for a, b in zip(new, table, strict=True) if a != b)} layers changed, {measured.seconds:.0f}s)")
        if new == table:
            break
        table = new
        measured = None
    if not any(t == table for _, t in candidates):
        kl = cal.table_kl(table)
        log(f"[calibrate] final table measured {cal.objective.upper()} {kl:.5f}")
        candidates.append((kl, list(table)))
    kl, best = min(candidates, key=lambda c: c[0])
    return {"table": best, "kl": kl, "candidates": [{"kl": k, "table": [list(p) for p in t]} for k, t in candidates],
            "trail": trail}


# ---- the command --------------------------------------------------------------------------------


def _pairs(text: str) -> list[Pair]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().upper()
        if not (tok.startswith("K") and "V" in tok):
            raise ValueError(f"{tok!r} is not of the form K4V2")
        kb, vb = tok[1:].split("V")
        out.append((int(kb), int(vb)))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kvtuner_hicache.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model name of the eval harness (kvtuner_hicache.eval.models)")
    ap.add_argument("--bits", required=True,
                    help="budget(s): effective bits per KV element, metadata and header included; comma list")
    ap.add_argument("--out", required=True, help="YAML to write; '{bits}' is replaced by each budget")
    ap.add_argument("--pairs", default=",".join(f"K{k}V{v}" for k, v in DEFAULT_PAIRS), help="candidate (K, V) bits")
    ap.add_argument("--anchor", default="auto",
                    help="uniform table of round 1's context: a pair (e.g. K4V2), or 'auto': per budget, the pair whose "
                         "uniform table is nearest it")
    ap.add_argument("--rounds", type=int, default=2, help="measure-and-allocate rounds (>= 1)")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="kl",
                    help="what a table is scored by: kl (from the bf16 pool's distributions) or nll (of the text's "
                         "tokens: log perplexity)")
    ap.add_argument("--z", type=float, default=1.0,
                    help="charge each layer change this many standard errors (over calibration windows) of its "
                         "measured KL change; 0: the measured means alone (needs --windows >= 2 to matter)")
    ap.add_argument("--axis-key", type=int, default=QuantConfig().axis_key)
    ap.add_argument("--axis-value", type=int, default=QuantConfig().axis_value)
    ap.add_argument("--q-group-size", type=int, default=QuantConfig().q_group_size)
    ap.add_argument("--asym", action=argparse.BooleanOptionalAction, default=QuantConfig().asym)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2, help="calibration windows")
    ap.add_argument("--prefix-len", type=int, default=1024, help="quantized prefix tokens per calibration window")
    ap.add_argument("--score-len", type=int, default=128, help="scored tokens per calibration window")
    ap.add_argument("--eval-windows", type=int, default=12, help="the evaluation windows to stay clear of")
    ap.add_argument("--eval-window-len", type=int, default=1536 + 512 + 1, help="their length in tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", help="also write the measurements and choices as JSON")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        pairs = _pairs(a.pairs)
        anchor = None if a.anchor.strip().lower() == "auto" else _pairs(a.anchor)[0]
        budgets = [float(x) for x in a.bits.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.z < 0:
        print(f"error: --z {a.z}: must be >= 0", file=sys.stderr)
        return 2
    if anchor is not None and anchor not in pairs:
        pairs.append(anchor)
    if len(budgets) > 1 and "{bits}" not in a.out:
        print("error: several --bits need '{bits}' in --out", file=sys.stderr)
        return 2
    import torch

    from kvtuner_hicache.eval import data as D
    from kvtuner_hicache.eval import models
    from kvtuner_hicache.eval.harness import Harness

    torch.set_num_threads(a.threads)
    cfg = QuantConfig(axis_key=a.axis_key, axis_value=a.axis_value, q_group_size=a.q_group_size, asym=a.asym)
    from transformers import AutoConfig

    shape = models.kv_shape_of(AutoConfig.from_pretrained(models.ensure_model(a.model)))
    cfg.validate_for(shape, a.page_size)
    costs = [{p: layer_bytes(cfg, shape, a.page_size, p) for p in pairs} for _ in range(shape.num_layers)]
    for b in budgets:  # fail before any model time is spent
        cheapest = sum(min(r.values()) for r in costs)
        if cheapest > budget_bytes(b, shape, a.page_size):
            kmin, vmin = min(p[0] for p in pairs), min(p[1] for p in pairs)
            lo = PageLayout(cfg.with_(nbits_key=kmin, nbits_value=vmin), shape, a.page_size).effective_bits
            print(f"error: --bits {b}: the cheapest table (K{kmin}V{vmin} everywhere) already takes "
                  f"{lo:.4f} effective bits at page {a.page_size} (codes, fp16 metadata and the page header)",
                  file=sys.stderr)
            return 2
    lm = models.load(a.model)
    tok = lm.tokenizer
    ids = D.encode(tok, D.essay_text(models.data_dir()))
    pre = D.special_prefix(tok)
    length = a.prefix_len + a.score_len + 1 - len(pre)
    avoid = eval_spans(len(ids), a.eval_windows, a.eval_window_len - len(pre))
    spans = calibration_spans(len(ids), a.windows, length, avoid)
    assert not overlaps(spans, avoid)
    h = Harness(lm.model, shape, a.page_size, batch=a.batch, log=log)
    cal = Calibrator(h, cfg, pairs, progress=not a.no_progress, objective=a.objective)
    t0 = time.perf_counter()
    for s, e in spans:
        cal.add_window(pre + ids[s:e], a.prefix_len)
    log(f"[calibrate] {a.model}: {len(spans)} calibration windows ({cal.tokens} scored tokens) clear of "
        f"{a.eval_windows} evaluation windows, prefilled in {time.perf_counter() - t0:.0f}s")
    firsts: dict[Pair, Measured] = {}  # round 1 per anchor, shared by the budgets that have it
    results = []
    for b in budgets:
        budget = budget_bytes(b, shape, a.page_size)
        anc = anchor if anchor is not None else anchor_for(costs[0], shape.num_layers, budget)
        start = [anc] * shape.num_layers
        if anc not in firsts:
            firsts[anc] = cal.measure(start, f"round 1 (uniform K{anc[0]}V{anc[1]})")
        res = search(cal, costs, budget, start, a.rounds, firsts[anc], log, z=a.z)
        res["anchor"] = list(anc)
        table = res["table"]
        full = cfg.with_(layer_bits={i: LayerBits(*p) for i, p in enumerate(table)})
        lay = PageLayout(full, shape, a.page_size)
        meta = {"format": TABLE_FORMAT, "model": a.model, "axis_key": a.axis_key, "axis_value": a.axis_value,
                "q_group_size": a.q_group_size, "asym": a.asym, "page_size": a.page_size, "budget_bits": b,
                "effective_bits": round(lay.effective_bits, 4), "calibration_objective": a.objective,
                "calibration_kl": round(res["kl"], 6),
                "calibration_text": "paul-graham-essays", "calibration_spans": [list(x) for x in spans]}
        header = [
            f"KVTuner per-layer table for {a.model}, made by python -m kvtuner_hicache.calibrate",
            f"budget {b} effective bits/element -> {lay.effective_bits:.4f} ({lay.compression_vs_bf16:.2f}x vs bf16) at page "
            f"{a.page_size}; calibrated with --kvtuner-hicache-axis-key {a.axis_key} --kvtuner-hicache-axis-value "
            f"{a.axis_value} --kvtuner-hicache-q-group-size {a.q_group_size} "
            f"{'--kvtuner-hicache-asym' if a.asym else '--no-kvtuner-hicache-asym'} (recorded below; the server checks them)",
            f"calibration: {len(spans)} essay windows ({cal.tokens} scored tokens, prefix {a.prefix_len}) clear of the "
            f"evaluation windows; measured {a.objective.upper()} {res['kl']:.5f} per token",
        ]
        out = a.out.replace("{bits}", f"{b:g}")
        with open(out, "w") as f:
            f.write(to_yaml(table, header, meta))
        counts: dict[str, int] = {}
        for p in table:
            counts[f"K{p[0]}V{p[1]}"] = counts.get(f"K{p[0]}V{p[1]}", 0) + 1
        print(f"{out}: {lay.effective_bits:.4f} bits, {a.objective.upper()} {res['kl']:.5f}, "
              + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        print("  " + " ".join(f"{i}:K{k}V{v}" for i, (k, v) in enumerate(table)))
        results.append({"bits_budget": b, "out": out, "effective_bits": lay.effective_bits, **res,
                        "table": [list(p) for p in table]})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "command": "python -m kvtuner_hicache.calibrate " + shlex.join(argv),
                       "objective": a.objective,
                       "pairs": [list(p) for p in pairs], "anchor": a.anchor, "spans": [list(x) for x in spans],
                       "eval_spans_avoided": [list(x) for x in avoid], "scored_tokens": cal.tokens,
                       "forwards": cal.forwards, "seconds": round(time.perf_counter() - t0, 1),
                       "costs_bytes": [costs[0][p] for p in pairs], "results": results}, f, indent=1)
    log(f"[calibrate] done in {time.perf_counter() - t0:.0f}s ({cal.forwards} scored variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
