"""Paired statistics for the accuracy harness: bootstrap confidence intervals of differences.

Every config of one harness run is scored on the same windows and the same scored tokens, so a
difference between two configs (or a config and the bf16 reference) is a *paired* difference: per
unit (a text window, a block of scored tokens, a GSM8K item, an MMLU question) both sides are
known, and the noise of which text was drawn cancels to the extent that the two configs react to
it alike.

The interval of a statistic is a percentile bootstrap over units, resampling the same unit indices
for both sides (pairing kept), with a fixed seed, so that a rerun of the same records prints the
same interval. A difference is *resolved* when its interval excludes 0 over at least MIN_UNITS units.

Units for perplexity:

- `window` (the primary one, "cluster bootstrap"): a window's 512 scored tokens all sit behind
  the same quantized prefix, so they are not independent; resampling whole windows keeps that
  correlation. Few windows (< 8) make this interval itself uncertain: read it as indicative.
- `block`: blocks of `block` consecutive scored tokens pooled over windows. Narrower, because
  it ignores the correlation between blocks of one window; reported beside the window interval,
  never used for "resolved".

Δ ppl % of config a against b over a resample is 100 * (exp((ΣNLL_a - ΣNLL_b) / Σtokens) - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BOOT = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
MIN_UNITS = 5  # fewer units than this: the interval is shown but never called resolved


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval over `n` units."""

    value: float
    lo: float
    hi: float
    n: int
    unit: str
    level: float = DEFAULT_LEVEL

    @property
    def resolved(self) -> bool:
        """The interval excludes 0, over at least MIN_UNITS units (with 3 windows a bootstrap
        interval is little more than the min..max range, and claims no 95 %)."""
        return self.n >= MIN_UNITS and (self.lo > 0 or self.hi < 0)

    def as_dict(self) -> dict[str, float | int | str | bool]:
        d: dict[str, float | int | str | bool] = asdict(self)  # type: ignore[assignment]
        d["resolved"] = self.resolved
        return d

    def fmt(self, spec: str = "+.2f") -> str:
        """'+0.63 [+0.21, +1.10]' ('*' appended when resolved)."""
        return f"{self.value:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]" + ("*" if self.resolved else "")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampled unit indices (with replacement), the same for every statistic with
    the same (n, n_boot, seed): that is what keeps comparisons paired across calls."""
    return _rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return float(lo), float(hi)


def ppl_delta_pct(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int]) -> float:
    """Δ ppl % of a against b from per-unit NLL sums and per-unit token counts."""
    a, b, n = np.asarray(nll_a, float), np.asarray(nll_b, float), np.asarray(tokens, float)
    return 100.0 * math.expm1(float((a.sum() - b.sum()) / n.sum()))


def paired_ppl_delta(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int], unit: str = "window",
                     n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> Interval:
    """Δ ppl % of config a against config b with a paired bootstrap interval over units.

    nll_a, nll_b: per-unit sums of NLL (nats) over the unit's scored tokens, same units in the same
    order for both configs; tokens: scored tokens per unit.
    """
    a, b, n = np.asarray(nll_a, float), np.asarray(nll_b, float), np.asarray(tokens, float)
    if not (a.shape == b.shape == n.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired units must match: {a.shape}, {b.shape}, {n.shape}")
    value = ppl_delta_pct(a, b, n)
    if a.size == 1:
        return Interval(value, value, value, 1, unit, level)
    idx = _indices(a.size, n_boot, seed)
    d = (a - b)[idx].sum(axis=1) / n[idx].sum(axis=1)
    lo, hi = _percentiles(100.0 * np.expm1(d), level)
    return Interval(value, lo, hi, int(a.size), unit, level)


def paired_mean_delta(x_a: Sequence[float], x_b: Sequence[float], weights: Sequence[float] | None = None,
                      unit: str = "item", n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED,
                      level: float = DEFAULT_LEVEL) -> Interval:
    """Δ of a weighted mean (Σ(x_a - x_b) / Σw) with a paired bootstrap over units.

    GSM8K: x = per-item NLL sums, weights = answer tokens -> Δ nats per answer token.
    MMLU: x = per-item correct (0/1), weights None -> Δ accuracy.
    """
    a, b = np.asarray(x_a, float), np.asarray(x_b, float)
    w = np.ones_like(a) if weights is None else np.asarray(weights, float)
    if not (a.shape == b.shape == w.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired units must match: {a.shape}, {b.shape}, {w.shape}")
    value = float((a - b).sum() / w.sum())
    if a.size == 1:
        return Interval(value, value, value, 1, unit, level)
    idx = _indices(a.size, n_boot, seed)
    lo, hi = _percentiles((a - b)[idx].sum(axis=1) / w[idx].sum(axis=1), level)
    return Interval(value, lo, hi, int(a.size), unit, level)


def mean_interval(x: Sequence[float], weights: Sequence[float] | None = None, unit: str = "item",
                  n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> Interval:
    """Σx / Σw (e.g. MMLU accuracy, a per-token NLL) with a bootstrap interval over units."""
    zeros = [0.0] * len(x)
    return paired_mean_delta(x, zeros, weights, unit, n_boot, seed, level)


def wilson(successes: int, n: int, level: float = DEFAULT_LEVEL) -> Interval:
    """Wilson score interval of a proportion (for accuracy records that kept no per-item data)."""
    if n <= 0:
        raise ValueError("wilson: n must be > 0")
    z = {0.90: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return Interval(p, mid - half, mid + half, n, "item (Wilson)", level)


def blocks(per_token: Sequence[Sequence[float]], block: int) -> tuple[list[float], list[int]]:
    """Per-window per-token values -> (per-block sums, per-block token counts), windows in order,
    each window cut into consecutive blocks of `block` tokens (the last one may be shorter)."""
    sums: list[float] = []
    counts: list[int] = []
    for row in per_token:
        for s in range(0, len(row), block):
            part = row[s:s + block]
            sums.append(float(sum(part)))
            counts.append(len(part))
    return sums, counts


def windows_needed(per_window_delta_pct: Sequence[float], half_width_pct: float, level: float = DEFAULT_LEVEL) -> int | None:
    """Windows needed for a normal-theory interval of half width `half_width_pct` around the mean of
    paired per-window Δ% values whose spread is that of `per_window_delta_pct` (None if < 2 values).

    To resolve a true difference d, ask for half width < d: n = ceil((z * sd / d)^2).
    """
    x = np.asarray(per_window_delta_pct, float)
    if x.size < 2 or half_width_pct <= 0:
        return None
    sd = float(x.std(ddof=1))
    z = {0.90: 1.645, 0.95: 1.96, 0.99: 2.576}.get(level, 1.96)
    return max(2, math.ceil((z * sd / half_width_pct) ** 2))
