"""Prometheus series of the elastic host pool, exported when SGLang runs with `--enable-metrics`.

SGLang's scheduler processes write prometheus_client's multiprocess files and its HTTP server serves
them at /metrics, so series created here (in the scheduler, after SGLang set the multiprocess
directory) appear there beside SGLang's own:

    sglang:kvtq_elastic_pages{tp_rank, bits}             gauge: pages held per mean code bits/element
    sglang:kvtq_elastic_plane_rows{tp_rank}              gauge: rows that hold refinement planes only
    sglang:kvtq_elastic_demotions_total{tp_rank, stream} counter: planes given up (k: keys, v: values)
    sglang:kvtq_elastic_evictions_total{tp_rank}         counter: pages SGLang freed (evicted)
    sglang:kvtq_elastic_hit_tokens_total{tp_rank, bits}  counter: host-hit tokens loaded at that precision

The pool publishes after every change from its own methods (its page census is kept incrementally, so
a publish is a few series updates). The series are process-wide (prometheus_client refuses a second
series of one name), one label set per pool.
"""

from __future__ import annotations

from typing import Any

_SERIES: dict[str, Any] | None = None


def metrics_enabled() -> bool:
    """Whether this process's SGLang server was started with --enable-metrics (False when none is published)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return bool(getattr(get_server_args(), "enable_metrics", False))
    except Exception:  # no server published (offline use, tests that build pools directly)
        return False


def _series() -> dict[str, Any]:
    global _SERIES
    if _SERIES is None:
        from prometheus_client import Counter, Gauge

        _SERIES = {
            "pages": Gauge("sglang:kvtq_elastic_pages", "Elastic host pool pages per mean code bits per element",
                           ["tp_rank", "bits"], multiprocess_mode="mostrecent"),
            "plane_rows": Gauge("sglang:kvtq_elastic_plane_rows", "Elastic host pool rows holding refinement planes",
                                ["tp_rank"], multiprocess_mode="mostrecent"),
            "demotions": Counter("sglang:kvtq_elastic_demotions", "Refinement planes given up", ["tp_rank", "stream"]),
            "evictions": Counter("sglang:kvtq_elastic_evictions", "Elastic host pool pages freed by SGLang", ["tp_rank"]),
            "hit_tokens": Counter("sglang:kvtq_elastic_hit_tokens", "Host-hit tokens loaded, per mean code bits",
                                  ["tp_rank", "bits"]),
        }
    return _SERIES


class ElasticMetrics:
    """Publishes one pool's `elastic_stats()` into the process-wide series (counters as deltas)."""

    def __init__(self, tp_rank: int):
        self.rank = str(tp_rank)
        self.series = _series()
        self._sent: dict[tuple[str, str], float] = {}  # counter totals already published
        self._bits_seen: set[str] = set()
        self._children: dict[tuple[str, str], Any] = {}  # labelled series, looked up once (the pool publishes often)

    def _child(self, name: str, label: str) -> Any:
        c = self._children.get((name, label))
        if c is None:
            s = self.series[name]
            c = self._children[(name, label)] = s.labels(self.rank, label) if label else s.labels(self.rank)
        return c

    def _inc(self, name: str, label: str, total: float) -> None:
        delta = total - self._sent.get((name, label), 0)
        if delta > 0:
            self._child(name, label).inc(delta)
            self._sent[(name, label)] = total

    def publish(self, stats: dict[str, Any]) -> None:
        pages = stats["pages_by_bits"]
        self._bits_seen.update(pages)
        for bits in self._bits_seen:  # a precision that emptied reads 0, not its last value
            self._child("pages", bits).set(pages.get(bits, 0))
        self._child("plane_rows", "").set(stats["plane_rows"])
        for stream, n in stats["demotions"].items():
            self._inc("demotions", stream, n)
        self._inc("evictions", "", stats["evicted_pages"])
        for bits, n in stats["served_tokens_by_bits"].items():
            self._inc("hit_tokens", bits, n)


__all__ = ["ElasticMetrics", "metrics_enabled"]
