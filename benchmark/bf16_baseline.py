"""The benchmark's own bf16 copy kernels (benchmark/bf16_baseline.cu -> torch.ops.kvtq_bench.*).

Not part of the kernel wheel. `load()` loads a cached build (made once with nvcc by `prebuild()`,
which scripts/gpu_test.sh runs before it hides nvcc), else JIT-builds it when nvcc is there, else
returns None (the benchmark then leaves the bf16_kernel_* fields out).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import torch

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "bf16_baseline.cu"


def _name_and_dir() -> tuple[str, pathlib.Path]:
    major, minor = torch.cuda.get_device_capability()
    h = hashlib.sha256(SRC.read_bytes() + f"{torch.__version__}|sm_{major}{minor}".encode()).hexdigest()[:12]
    name = f"kvtq_bench_bf16_{h}"
    root = pathlib.Path(os.environ.get("KVTQ_BUILD_DIR") or pathlib.Path.home() / ".cache" / "kvtuner_hicache")
    return name, root / name


def prebuild() -> pathlib.Path:
    """JIT-build the baseline library (needs nvcc); returns its path."""
    from torch.utils import cpp_extension

    name, build_dir = _name_and_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    path = cpp_extension.load(name=name, sources=[str(SRC)], build_directory=str(build_dir), is_python_module=False,
                              extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
    return pathlib.Path(path)


def load() -> Any:
    """torch.ops.kvtq_bench, or None when neither a cached build nor nvcc is there."""
    name, build_dir = _name_and_dir()
    so = build_dir / f"{name}.so"
    try:
        if not so.is_file():
            so = prebuild()
        else:
            torch.ops.load_library(str(so))
    except Exception as e:  # noqa: BLE001 - optional baseline
        print(f"bf16 baseline kernels unavailable ({type(e).__name__}: {e}); bf16_kernel_* fields left out")
        return None
    return torch.ops.kvtq_bench
