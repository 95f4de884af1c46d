"""Legacy module-level codec choice, kept until the host pool builds its codec with `codec.make_codec`.

`get_codec(device)` returns the `native` module on CUDA and the `reference` module on CPU. It follows
the same rule as `make_codec`: on CUDA without the kernels it raises NativeCodecUnavailable (how to
install them is in the message) unless KVTQ_ALLOW_REFERENCE_CODEC=1, which logs a WARNING and returns
the reference. New code uses `kvtuner_hicache.quant.codec.make_codec` (one object per pool).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from kvtuner_hicache.quant import native, reference
from kvtuner_hicache.quant.codec import ENV_ALLOW_REFERENCE, NativeCodecUnavailable, _allow_reference

log = logging.getLogger(__name__)


def get_codec(device: torch.device | str) -> ModuleType:
    """The codec module for pages whose device-side buffers live on `device` (see the module docstring)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return reference
    if native.available():
        return native
    if not _allow_reference(None):
        raise NativeCodecUnavailable(f"kvtuner_hicache: the native CUDA kernels are unavailable: "
                                     f"{native.unavailable_reason()}. To run with the slow pure-torch reference "
                                     f"codec instead, set {ENV_ALLOW_REFERENCE}=1.")
    log.warning("kvtuner_hicache: SLOW reference codec on %s (%s=1): %s", dev, ENV_ALLOW_REFERENCE,
                native.unavailable_reason())
    return reference


def codec_name(codec: object) -> str:
    """Short label for logs: `reference` or `native` (modules), or a PageCodec's describe()."""
    describe = getattr(codec, "describe", None)
    if callable(describe):
        return str(describe())
    name = getattr(codec, "name", None) or getattr(codec, "__name__", type(codec).__name__)
    return str(name).rsplit(".", 1)[-1]
