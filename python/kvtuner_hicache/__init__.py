"""Quantized hierarchical KV cache (HiCache L2/L3) for SGLang, KVTuner style.

Layering (only the last three import sglang):
config -> page_format -> quant (reference + native kernels) -> host pools -> storage -> plugin
"""

from kvtuner_hicache._upstream import SGLANG_VERSION
from kvtuner_hicache.config import ConfigError, KVShape, LayerBits, QuantConfig

__all__ = ["SGLANG_VERSION", "ConfigError", "KVShape", "LayerBits", "QuantConfig"]
