"""Compatibility shim: the L3 backends moved to the top-level package `kvtuner_hicache_l3`.

Remove once nothing imports `kvtuner_hicache.sglang_ext.backends` (see `registration`).
"""

from __future__ import annotations

from kvtuner_hicache_l3 import BACKENDS

__all__ = ["BACKENDS"]
