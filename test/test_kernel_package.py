"""The kernel wheel's Python side on CPU: a torch mismatch is a clear KernelABIError raised before the
library is opened (never a crash inside dlopen). The library itself is covered by test/gpu."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "sgl-kernel" / "python" / "kvtuner_hicache_kernel"


def _fake_package(tmp_path: pathlib.Path, torch_version: str, with_library: bool) -> object:
    dst = tmp_path / "kvtuner_hicache_kernel"
    dst.mkdir()
    shutil.copy(PKG / "__init__.py", dst / "__init__.py")
    (dst / "_build_info.py").write_text(f'VERSION = "0.1.0"\nTORCH_VERSION = "{torch_version}"\n'
                                        'CUDA_VERSION = "13.0"\nCUDA_ARCHS = "90-real"\n')
    if with_library:
        (dst / "_kvtq_ops.so").write_bytes(b"not a library")
    sys.path.insert(0, str(tmp_path))
    for m in [m for m in sys.modules if m.startswith("kvtuner_hicache_kernel")]:
        del sys.modules[m]
    return importlib.import_module("kvtuner_hicache_kernel")


@pytest.fixture
def restore_path():
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    for m in [m for m in sys.modules if m.startswith("kvtuner_hicache_kernel")]:
        del sys.modules[m]


def test_torch_mismatch_is_a_clear_error(tmp_path, restore_path):
    k = _fake_package(tmp_path, "1.0.0+old", with_library=True)
    assert k.__version__ == "0.1.0" and k.build_info()["torch"] == "1.0.0+old"
    with pytest.raises(k.KernelABIError, match=r"built for torch 1\.0\.0\+old.*build_kernel_wheel\.sh"):
        k.load()
    assert isinstance(k.KernelABIError("x"), ImportError)


def test_missing_library_is_a_clear_error(tmp_path, restore_path):
    import torch

    k = _fake_package(tmp_path, torch.__version__, with_library=False)
    with pytest.raises(k.KernelABIError, match="missing"):
        k.load()


def test_kernel_checks_go_through_kvtq_check():
    """Host-side checks in the kernel sources use KVTQ_CHECK (csrc/kvtq_check.h): a TORCH_CHECK with a
    formatted message segfaulted on the GPU image instead of raising (docs/benchmarks.md, run 9)."""
    csrc = PKG.parents[1] / "csrc"
    sources = sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".cu", ".h") and p.name != "kvtq_check.h")
    assert {p.name for p in sources} >= {"kvtq_ops.cpp", "kvtq_crc.cpp", "kvtq_kernels.cu"}
    uses = {p.name: p.read_text().count("KVTQ_CHECK(") for p in sources}
    raw = {p.name: [m for m in ("TORCH_CHECK", "TORCH_INTERNAL_ASSERT", "C10_THROW_ERROR", "AT_ERROR")
                    if m in p.read_text()] for p in sources}
    assert not any(raw.values()), f"use KVTQ_CHECK, not c10's checks: {raw}"
    assert uses["kvtq_ops.cpp"] > 0 and uses["kvtq_crc.cpp"] > 0
    assert all('#include "kvtq_check.h"' in p.read_text() for p in sources if uses[p.name])
