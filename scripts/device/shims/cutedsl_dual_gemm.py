"""Device-bundle shim (written by kvtuner-hicache, not SGLang code): the GPU machine's image has no
NVIDIA CuTe DSL (`cutlass` from nvidia-cutlass-dsl), which SGLang 0.5.22+ imports when its Qwen2 MLP
asks whether the fused dual GEMM can run. This module answers "no", so the model uses its unfused
gate/up + down projections, exactly as it does for shapes the fused kernel does not cover.
release_site.sh copies it over sglang/kernels/ops/gemm/cutedsl_dual_gemm.py only when `cutlass`
does not import on the machine."""

from enum import IntEnum

MAX_DUAL_GEMM_DECODE_TOKENS = 16


class DualGemmQuantMode(IntEnum):
    STATIC_PER_TENSOR = 0
    STATIC_PER_TOKEN = 1
    DYNAMIC_PER_TENSOR = 2
    DYNAMIC_PER_TOKEN = 3
    UNQUANT = 4

    @property
    def is_quantized(self) -> bool:
        return self is not DualGemmQuantMode.UNQUANT


def can_use_dual_gemm(*args, **kwargs) -> bool:
    return False
