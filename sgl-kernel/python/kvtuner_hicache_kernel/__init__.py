"""CUDA kernels of the quantized HiCache page codec, as torch operators under `torch.ops.kvtq`.

`load()` checks the build stamp against the running torch, loads the library once and returns
`torch.ops.kvtq`. Importing this package loads nothing. The operators and their contracts are in
csrc/kvtq_ops.cpp; the Python codec that uses them is `kvtuner_hicache.quant.codec.NativeCodec`.

ABI rule: the library links against the C++ API of the torch it was built with, so it loads only
into exactly that torch version (local build tag included, e.g. `2.11.0+cu130`). A mismatch raises
`KernelABIError` before the library is opened; rebuild the wheel against the torch you run
(`scripts/device/build_kernel_wheel.sh`).
"""

from __future__ import annotations

import pathlib
import threading
from typing import Any

from kvtuner_hicache_kernel import _build_info

__version__: str = _build_info.VERSION
LIBRARY = pathlib.Path(__file__).with_name("_kvtq_ops.so")

_lock = threading.Lock()
_ops: Any = None


class KernelABIError(ImportError):
    """The installed kernel library does not match this process (torch version, or a replaced library)."""


def build_info() -> dict[str, str]:
    """What the library in this package was built for (written by CMakeLists.txt)."""
    return {"version": _build_info.VERSION, "torch": _build_info.TORCH_VERSION, "cuda": _build_info.CUDA_VERSION,
            "archs": _build_info.CUDA_ARCHS}


def expected_stamp() -> str:
    """The stamp `torch.ops.kvtq.abi_stamp()` must return for this package (minus the CUDA runtime field)."""
    return f"kvtq {_build_info.VERSION}; torch {_build_info.TORCH_VERSION}"


def load() -> Any:
    """Load the library (once) and return `torch.ops.kvtq`; raises KernelABIError on any mismatch."""
    global _ops
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is not None:
            return _ops
        import torch

        if torch.__version__ != _build_info.TORCH_VERSION:
            raise KernelABIError(
                f"kvtuner-hicache-kernel {_build_info.VERSION} was built for torch {_build_info.TORCH_VERSION}, "
                f"this process runs torch {torch.__version__}: rebuild the kernel wheel against this torch "
                "(scripts/device/build_kernel_wheel.sh) or install the one built for it")
        if not LIBRARY.is_file():
            raise KernelABIError(f"kvtuner-hicache-kernel: {LIBRARY} is missing (a broken install?)")
        torch.ops.load_library(str(LIBRARY))
        ops = torch.ops.kvtq
        stamp = str(ops.abi_stamp())
        if not stamp.startswith(expected_stamp() + ";"):
            raise KernelABIError(f"kvtuner-hicache-kernel: the library says {stamp!r}, its package expects "
                                 f"{expected_stamp()!r} (the library file was replaced?)")
        _register_fakes(torch)
        _ops = ops
    return _ops


def _register_fakes(torch) -> None:
    """Meta ("fake") kernels, so that torch.compile can trace through the transfer operators: both
    only mutate their outputs in place. `backup` (host-side DMA planning, a custom-class stream) is not
    traceable and runs eagerly, as SGLang runs its write-back outside CUDA graphs."""
    for op in ("kvtq::encode", "kvtq::decode"):
        try:
            torch.library.register_fake(op)(lambda *args, **kwargs: None)
        except RuntimeError:  # already registered (a second load in this process)
            pass


__all__ = ["KernelABIError", "LIBRARY", "__version__", "build_info", "expected_stamp", "load"]
