"""Pick the page codec for a device.

`get_codec(device)` returns a module-like object with the reference's page-level signatures
(`encode_pages`, `decode_layer`): the native CUDA codec (`kvtuner_hicache.quant.native`, which also
has `backup_to_host`) when the device is a CUDA device and the kernels build there, else the pure-torch
reference. Both write the same bytes, so the choice only changes speed. The choice and its reason are
logged once per device at INFO. KVTQ_DISABLE_NATIVE=1 forces the reference.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from kvtuner_hicache.quant import native, reference

log = logging.getLogger(__name__)

_chosen: dict[str, ModuleType] = {}


def get_codec(device: torch.device | str) -> ModuleType:
    """The codec object for pages whose device-side buffers live on `device`."""
    dev = torch.device(device)
    key = str(dev)
    codec = _chosen.get(key)
    if codec is not None:
        return codec
    if dev.type == "cuda":
        if native.available():
            codec = native
            log.info("kvtuner_hicache codec for %s: native CUDA kernels (%s)", key, native.build_name())
        else:
            codec = reference
            log.info("kvtuner_hicache codec for %s: reference (native kernels unavailable: %s)", key,
                     native.unavailable_reason())
    else:
        codec = reference
        log.info("kvtuner_hicache codec for %s: reference (the native kernels need a CUDA device)", key)
    _chosen[key] = codec
    return codec


def codec_name(codec: object) -> str:
    """Short label for logs: `reference` or `native`."""
    name = getattr(codec, "name", None) or getattr(codec, "__name__", type(codec).__name__)
    return str(name).rsplit(".", 1)[-1]
