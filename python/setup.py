"""Plain setuptools entry point; metadata lives in pyproject.toml.

The CUDA kernels are not part of this wheel: they ship as their own wheel, kvtuner-hicache-kernel
(sgl-kernel/, built by scripts/device/build_kernel_wheel.sh). The developer JIT build
(KVTQ_JIT_BUILD=1) reads the sources from a checkout (sgl-kernel/csrc) or KVTQ_KERNEL_SRC.
"""

from setuptools import setup

setup()
