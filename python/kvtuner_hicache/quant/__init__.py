"""Quantize/dequantize whole host pages.

`reference` is the pure-torch ground truth; `native` loads the CUDA kernels (the kvtuner-hicache-kernel
wheel); `codec` has the per-pool codec objects (`PageCodec`, `make_codec`); `capture` the debug wrapper.
"""

from kvtuner_hicache.quant.reference import decode_layer, encode_pages, roundtrip_pages

__all__ = ["decode_layer", "encode_pages", "roundtrip_pages"]
