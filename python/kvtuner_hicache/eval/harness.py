"""What HiCache does to a request, measured on a real model.

Prefill a prefix once (fp32, exact), take its KV cache (post-RoPE K and V per layer, HF layout
[1, kv_heads, seq, head_dim]), and for every config build the cache the request would see after
backup -> quantized host page -> load: KV cast to bf16 (the device pool's dtype), whole pages
round-tripped through the exact page format (`roundtrip_pages`), the last residual pages left in
bf16, then back to fp32 for the model. Then score a continuation teacher-forced with that cache.
Each config costs one round trip and one scoring pass; configs can share a forward (batch).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtuner_hicache.config import KVShape
from kvtuner_hicache.eval import data as D
from kvtuner_hicache.eval.configs import EvalConfig
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant.elastic_pages import roundtrip_top
from kvtuner_hicache.quant.reference import roundtrip_pages

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [B, H, S, D]
Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


# ---- cache plumbing -----------------------------------------------------------------------------


def cache_kv(cache: Any) -> KV:
    """The cached (keys, values) of every layer of a transformers Cache (5.x `.layers` API)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(template: Any, variants: Sequence[KV]) -> Any:
    """A deep copy of `template` whose layers hold `variants` stacked along the batch dimension.

    Only `.keys` / `.values` are replaced, so any per-layer state (sliding-window counters) is kept.
    """
    cache = copy.deepcopy(template)
    for i, layer in enumerate(cache.layers):
        ks = [v[i][0] for v in variants]
        vs = [v[i][1] for v in variants]
        if ks[0].shape != layer.keys.shape or vs[0].shape != layer.values.shape:
            raise ValueError(f"layer {i}: variant shape {tuple(ks[0].shape)} != cache {tuple(layer.keys.shape)}")
        layer.keys = ks[0] if len(ks) == 1 else torch.cat(ks, dim=0)
        layer.values = vs[0] if len(vs) == 1 else torch.cat(vs, dim=0)
    return cache


def key_channel_ratio(kv: KV) -> list[float]:
    """Per layer: max over (head, channel) of mean|k| over tokens, divided by the median of the same."""
    out = []
    for k, _ in kv:
        m = k[0].abs().float().mean(dim=1).flatten()  # [H*D]
        out.append(float(m.max() / m.median().clamp_min(1e-12)))
    return out


def _to_pool(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1, H, S, D] -> pool layout [tokens, H, D] (bf16).

    A sliding-window layer caches only its last S < tokens positions; those sit at absolute
    positions tokens-S..tokens-1. The missing front is filled by repeating the first cached token,
    which leaves every group's min/max (and so the codes of the real tokens) unchanged.
    """
    if x.shape[0] != 1:
        raise ValueError(f"expected a batch-1 prefill cache, got batch {x.shape[0]}")
    t = x[0].transpose(0, 1).to(torch.bfloat16)
    s = t.shape[0]
    if s < tokens:
        t = torch.cat([t[:1].expand(tokens - s, *t.shape[1:]), t], dim=0)
    return t.contiguous()


def _from_pool(t: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    return t[t.shape[0] - seq:].transpose(0, 1).unsqueeze(0).to(dtype).contiguous()


def apply_config(kv: KV, cfg: EvalConfig, layout: PageLayout | None, page_size: int) -> KV:
    """The prefix KV as a request sees it after a HiCache round trip under `cfg` (fp32 tensors).

    fp32: untouched. bf16: cast to bf16 and back. Quantized: bf16 cast, all whole pages except
    the last `cfg.residual_pages` through encode/decode of the page format, residual pages kept
    bf16, then back to fp32.
    """
    dtype = kv[0][0].dtype
    if cfg.quant is None:
        if cfg.kv_dtype == "fp32":
            return list(kv)
        return [(k.to(torch.bfloat16).to(dtype), v.to(torch.bfloat16).to(dtype)) for k, v in kv]
    assert layout is not None
    tokens = max(k.shape[2] for k, _ in kv)
    if tokens % page_size:
        raise ValueError(f"prefix of {tokens} tokens is not a whole number of {page_size}-token pages")
    residual = min(cfg.residual_pages(page_size), tokens // page_size)
    q = tokens - residual * page_size
    pool = [[_to_pool(k, tokens) for k, _ in kv], [_to_pool(v, tokens) for _, v in kv]]
    if q:
        trip = roundtrip_top if cfg.quant.elastic else roundtrip_pages
        rt = trip(layout, [[t[:q] for t in pool[0]], [t[:q] for t in pool[1]]])
        pool = [[torch.cat([rt[b][i], pool[b][i][q:]]) if residual else rt[b][i] for i in range(len(kv))]
                for b in range(2)]
    return [(_from_pool(pool[0][i], k.shape[2], dtype), _from_pool(pool[1][i], v.shape[2], dtype))
            for i, (k, v) in enumerate(kv)]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the page round trip single-threaded: its thousands of small ops gain nothing from a
    thread pool, and on a loaded 2-core machine each parallel op can stall on a descheduled worker
    (measured: 21 s with 2 threads vs 0.14 s with 1 for the same Qwen-0.5B prefix)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- metrics ------------------------------------------------------------------------------------


@dataclass
class Ref:
    """Reference (bf16-baseline) log-probs of some scored positions."""

    logp: torch.Tensor  # [T, V] log_softmax
    top1: torch.Tensor  # [T]


def make_ref(logits: torch.Tensor) -> Ref:
    lp = torch.log_softmax(logits.float(), dim=-1)
    return Ref(lp, lp.argmax(dim=-1))


def compare_tokens(logits: torch.Tensor, targets: torch.Tensor, ref: Ref | None, chunk: int = 128) -> tuple[torch.Tensor, float, int]:
    """(per-position NLL of targets [T], sum KL(ref || this), top-1 agreements) of [T, V] logits."""
    nlls = []
    kl = 0.0
    top = 0
    for s in range(0, logits.shape[0], chunk):
        lp = torch.log_softmax(logits[s:s + chunk].float(), dim=-1)
        nlls.append(-lp.gather(-1, targets[s:s + chunk, None])[:, 0])
        if ref is not None:
            rl = ref.logp[s:s + chunk]
            kl += float((rl.exp() * (rl - lp)).sum())
            top += int((lp.argmax(dim=-1) == ref.top1[s:s + chunk]).sum())
    return torch.cat(nlls) if nlls else torch.zeros(0), kl, top


def compare(logits: torch.Tensor, targets: torch.Tensor, ref: Ref | None, chunk: int = 128) -> tuple[float, float, int]:
    """(sum NLL of targets, sum KL(ref || this), top-1 agreements) over T positions of [T, V] logits."""
    nll, kl, top = compare_tokens(logits, targets, ref, chunk)
    return float(nll.sum()), kl, top


# ---- the harness --------------------------------------------------------------------------------


@dataclass
class Timings:
    roundtrip_s: float = 0.0
    score_s: float = 0.0


@dataclass
class Harness:
    model: Any
    shape: KVShape
    page_size: int = 64
    batch: int = 1  # configs per forward pass
    log: Log = stderr_log
    timings: dict[str, Timings] = field(default_factory=dict)
    prefill_s: float = 0.0
    _layouts: dict[str, PageLayout | None] = field(default_factory=dict)

    def layout(self, cfg: EvalConfig) -> PageLayout | None:
        if cfg.name not in self._layouts:
            self._layouts[cfg.name] = cfg.layout(self.shape, self.page_size)
        return self._layouts[cfg.name]

    def _t(self, name: str) -> Timings:
        return self.timings.setdefault(name, Timings())

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache: Any = None) -> Any:
        """Run `ids` (after `cache`, if given, which is extended in place); returns the cache."""
        t0 = time.perf_counter()
        x = torch.tensor([list(ids)], dtype=torch.long)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.prefill_s += time.perf_counter() - t0
        return out.past_key_values

    def variant(self, kv: KV, cfg: EvalConfig) -> KV:
        t0 = time.perf_counter()
        with one_thread():
            out = apply_config(kv, cfg, self.layout(cfg), self.page_size)
        self._t(cfg.name).roundtrip_s += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def forward(self, cache: Any, kvs: Sequence[tuple[str, KV]], ids: Sequence[int], keep: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (config name, logits [T', V]) of `ids` run after each cache variant, `batch` at a time.

        keep: logits_to_keep (0 = all positions).
        """
        x = torch.tensor([list(ids)], dtype=torch.long)
        for s in range(0, len(kvs), self.batch):
            chunk = kvs[s:s + self.batch]
            c = build_cache(cache, [kv for _, kv in chunk])
            t0 = time.perf_counter()
            logits = self.model(input_ids=x.expand(len(chunk), -1), past_key_values=c, use_cache=True,
                                logits_to_keep=keep).logits
            dt = (time.perf_counter() - t0) / len(chunk)
            del c
            for j, (name, _) in enumerate(chunk):
                self._t(name).score_s += dt
                yield name, logits[j]


# ---- tasks --------------------------------------------------------------------------------------


@dataclass
class Acc:
    """Accumulated per-config scores over windows or items, with the per-unit values that the
    paired statistics (`kvtuner_hicache.eval.stats`) resample."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    n: int = 0
    per_window_nll: list[float] = field(default_factory=list)  # mean NLL per scored token, per window
    per_window_tokens: list[int] = field(default_factory=list)
    per_token_nll: list[list[float]] = field(default_factory=list)  # per window, per scored token
    correct: int = 0
    agree: int = 0
    items: int = 0
    item_nll: list[float] = field(default_factory=list)  # GSM8K: answer NLL sum per item
    item_tokens: list[int] = field(default_factory=list)  # GSM8K: answer tokens per item
    item_correct: list[int] = field(default_factory=list)  # MMLU: 1 if the letter is right
    item_kl: list[float] = field(default_factory=list)  # KL per item (GSM8K: sum over tokens; MMLU: 4-way)

    def add(self, nll: float, kl: float, top1: int, n: int) -> None:
        self.nll += nll
        self.kl += kl
        self.top1 += top1
        self.n += n

    def add_window(self, nll: torch.Tensor, kl: float, top1: int) -> None:
        """One text window: per-position NLL [T]."""
        n = int(nll.numel())
        total = float(nll.sum())
        self.add(total, kl, top1, n)
        self.per_window_nll.append(total / n)
        self.per_window_tokens.append(n)
        self.per_token_nll.append([round(float(x), 6) for x in nll])

    def add_item(self, nll: float, kl: float, top1: int, n: int) -> None:
        """One GSM8K item: answer NLL sum over n answer tokens."""
        self.add(nll, kl, top1, n)
        self.item_nll.append(nll)
        self.item_tokens.append(n)
        self.item_kl.append(kl)


def run_text(h: Harness, windows: Sequence[Sequence[int]], prefix_len: int, configs: Sequence[EvalConfig],
             base: EvalConfig, first_cache: Any = None) -> dict[str, Acc]:
    """Perplexity windows: prefill window[:prefix_len], score window[prefix_len+1:] for every config.

    The scored tokens are fed after the (modified) cache; token t+1 is predicted from position t,
    so every scored prediction sees the quantized prefix. Returns per-config accumulators,
    `base.name` included (the reference every KL / top-1 is measured against).
    """
    if prefix_len % h.page_size:
        raise ValueError(f"--prefix-len {prefix_len} is not a multiple of --page-size {h.page_size}")
    acc: dict[str, Acc] = {c.name: Acc() for c in [base, *configs]}
    for w, win in enumerate(windows):
        t0 = time.perf_counter()
        cache = first_cache if (w == 0 and first_cache is not None) else h.prefill(win[:prefix_len])
        kv = cache_kv(cache)
        feed = list(win[prefix_len:-1])
        targets = torch.tensor(win[prefix_len + 1:], dtype=torch.long)
        (_, base_logits), = h.forward(cache, [(base.name, h.variant(kv, base))], feed)
        ref = make_ref(base_logits)
        nll_t, _, _ = compare_tokens(base_logits, targets, None)
        acc[base.name].add_window(nll_t, 0.0, len(feed))
        del base_logits
        for s in range(0, len(configs), h.batch):
            chunk = configs[s:s + h.batch]
            kvs = [(c.name, h.variant(kv, c)) for c in chunk]
            for name, logits in h.forward(cache, kvs, feed):
                nll_t, kl, top = compare_tokens(logits, targets, ref)
                acc[name].add_window(nll_t, kl, top)
        h.log(f"window {w + 1}/{len(windows)} done in {time.perf_counter() - t0:.0f}s "
              f"(base ppl {math.exp(acc[base.name].per_window_nll[-1]):.3f})")
    return acc


def whole_pages(prefix: Sequence[int], body: Sequence[int], page_size: int) -> list[int]:
    """`prefix` (BOS) + the tail of `body`, left-truncated so the total is a whole number of pages."""
    total = (len(prefix) + len(body)) // page_size * page_size
    if total <= len(prefix):
        raise ValueError(f"few-shot text of {len(body)} tokens does not fill one {page_size}-token page")
    return list(prefix) + list(body[len(body) - (total - len(prefix)):])


def run_gsm8k(h: Harness, tok: Any, shots: Sequence[D.QA], items: Sequence[D.QA], configs: Sequence[EvalConfig],
              base: EvalConfig) -> tuple[dict[str, Acc], int]:
    """GSM8K reference-answer NLL behind a quantized few-shot prefix.

    The k worked examples (left-truncated to whole pages) are the cached, quantized prefix; each
    item's question (exact) and answer are run after it, and only the answer tokens are scored.
    Returns (per-config accumulators, prefix tokens).
    """
    prefix = whole_pages(D.special_prefix(tok), D.encode(tok, D.gsm8k_fewshot(shots)), h.page_size)
    cache = h.prefill(prefix)
    kv = cache_kv(cache)
    variants = [(c.name, h.variant(kv, c)) for c in configs]
    base_kv = h.variant(kv, base)
    acc: dict[str, Acc] = {c.name: Acc() for c in [base, *configs]}
    for i, item in enumerate(items):
        q_text, a_text = D.gsm8k_item(item)
        q_ids, a_ids = D.encode(tok, q_text), D.encode(tok, a_text)
        ids = q_ids + a_ids
        targets = torch.tensor(a_ids, dtype=torch.long)
        keep = len(a_ids) + 1
        (_, bl), = h.forward(cache, [(base.name, base_kv)], ids, keep)
        bl = bl[:-1]
        ref = make_ref(bl)
        nll, _, _ = compare(bl, targets, None)
        acc[base.name].add_item(nll, 0.0, len(a_ids), len(a_ids))
        for name, logits in h.forward(cache, variants, ids, keep):
            nll, kl, top = compare(logits[:-1], targets, ref)
            acc[name].add_item(nll, kl, top, len(a_ids))
        h.log(f"gsm8k item {i + 1}/{len(items)} ({len(a_ids)} answer tokens)")
    return acc, len(prefix)


def run_mmlu(h: Harness, tok: Any, shots: Sequence[D.MCQ], items: Sequence[D.MCQ], configs: Sequence[EvalConfig],
             base: EvalConfig) -> tuple[dict[str, Acc], float]:
    """MMLU answer letter behind a quantized prompt: k-shot block + question, all whole pages cached.

    Every whole page of the prompt (leaving at least the last token) is prefilled exactly, then
    round-tripped per config; the tokens after the last page boundary are run on top and the
    prediction is the argmax over ' A'..' D'. KL is that of the 4-way distribution vs the base.
    Returns (per-config accumulators, mean quantized prompt tokens).
    """
    letters = D.letter_ids(tok)
    ps = h.page_size
    shared = D.special_prefix(tok) + D.encode(tok, D.mmlu_fewshot(shots))
    n0 = len(shared) // ps * ps
    shared_cache = h.prefill(shared[:n0]) if n0 else None
    acc: dict[str, Acc] = {c.name: Acc() for c in [base, *configs]}
    quantized = 0
    for i, item in enumerate(items):
        ids = shared + D.encode(tok, D.mmlu_question(item))
        q = (len(ids) - 1) // ps * ps
        quantized += q
        if q == 0:
            raise ValueError("an MMLU prompt shorter than one page: use --mmlu-shots > 0")
        cache = copy.deepcopy(shared_cache) if shared_cache is not None else None
        if q > n0:
            cache = h.prefill(ids[n0:q], cache)
        kv = cache_kv(cache)
        tail = ids[q:]
        (_, bl), = h.forward(cache, [(base.name, h.variant(kv, base))], tail, 1)
        blp = torch.log_softmax(bl[-1, letters].float(), dim=-1)
        bpred = int(blp.argmax())
        a = acc[base.name]
        a.items += 1
        a.correct += int(bpred == item.answer)
        a.item_correct.append(int(bpred == item.answer))
        a.item_kl.append(0.0)
        a.agree += 1
        chunked = [(c.name, c) for c in configs]
        for s in range(0, len(chunked), h.batch):
            kvs = [(n, h.variant(kv, c)) for n, c in chunked[s:s + h.batch]]
            for name, logits in h.forward(cache, kvs, tail, 1):
                lp = torch.log_softmax(logits[-1, letters].float(), dim=-1)
                pred = int(lp.argmax())
                a = acc[name]
                a.items += 1
                a.correct += int(pred == item.answer)
                a.item_correct.append(int(pred == item.answer))
                a.agree += int(pred == bpred)
                k = float((blp.exp() * (blp - lp)).sum())
                a.kl += k
                a.item_kl.append(k)
        h.log(f"mmlu item {i + 1}/{len(items)} ({q} of {len(ids)} prompt tokens cached)")
    return acc, quantized / max(1, len(items))
