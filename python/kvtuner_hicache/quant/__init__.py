"""Quantize/dequantize whole host pages. `reference` is pure torch; native kernels share its signatures."""

from kvtuner_hicache.quant.reference import decode_layer, encode_pages, roundtrip_pages

__all__ = ["decode_layer", "encode_pages", "roundtrip_pages"]
