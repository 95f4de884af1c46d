"""The kernel wheel's batch CRC32C (`torch.ops.kvtq.page_crcs`, sgl-kernel/csrc/kvtq_crc.cpp) against the
crc32c package, and the L3 page checks that use it once the kernels are loaded.

The operator runs on the CPU but ships in the CUDA kernel wheel, so these tests run where the wheel
loads (scripts/gpu_test.sh). Ground truth is `page_format.page_crc`, which always calls the crc32c package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtuner_hicache import page_format as pf
from kvtuner_hicache.config import KVShape, QuantConfig
from kvtuner_hicache.page_format import PageLayout, key_digest, model_digest
from test_native_kernels import nat  # noqa: F401 (fixture)

gpu = pytest.mark.gpu


def _pages(n: int, sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=sizes[i % len(sizes)], dtype=np.uint8) for i in range(n)]


@gpu
def test_loading_the_kernels_routes_page_crcs_through_the_native_batch(nat):  # noqa: F811
    assert nat.ops().crc32c_hardware(), "the GPU host's CPU has CRC32C instructions (SSE4.2 / ARMv8 CRC)"
    assert pf.batch_crc_name().startswith("kvtq page_crcs"), pf.batch_crc_name()


@gpu
@pytest.mark.parametrize("sizes", [[pf.HEADER_BYTES], [4096], [pf.HEADER_BYTES + 1, 1000003, 64 * 1024 + 7]])
@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_native_batch_equals_the_crc32c_package_page_by_page(nat, sizes, n):  # noqa: F811
    arrays = _pages(n, sizes, seed=n * 7 + len(sizes))
    views = [memoryview(a) for a in arrays]
    assert nat.page_crcs(views) == [pf.page_crc(v) for v in views]
    ro = [memoryview(a.tobytes()) for a in arrays]  # read-only buffers (bytes) too
    assert nat.page_crcs(ro) == [pf.page_crc(v) for v in ro]


@gpu
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_a_batch_split_over_threads_gives_the_same_crcs(nat, threads):  # noqa: F811
    """Threads start only for every 8 MB of pages: 41 pages of 1 MiB (+ odd tails) use them all."""
    arrays = _pages(41, [(1 << 20) + 5, 1 << 20], seed=threads)
    addrs = torch.tensor([a.ctypes.data for a in arrays], dtype=torch.int64)
    lens = torch.tensor([a.nbytes for a in arrays], dtype=torch.int64)
    got = nat.ops().page_crcs(addrs, lens, pf.HEADER_CRC_OFFSET, pf.HEADER_BYTES, threads).tolist()
    assert got == [pf.page_crc(memoryview(a)) for a in arrays]


@gpu
def test_skip_range_and_plain_crc(nat):  # noqa: F811
    a = _pages(1, [777], seed=3)[0]
    addrs = torch.tensor([a.ctypes.data], dtype=torch.int64)
    lens = torch.tensor([a.nbytes], dtype=torch.int64)
    assert nat.ops().page_crcs(addrs, lens, 0, 0, 1).item() == pf.crc32c(a.tobytes())
    assert nat.ops().page_crcs(addrs, lens, 10, 20, 1).item() == pf.crc32c(a[20:].tobytes(), pf.crc32c(a[:10].tobytes()))
    with pytest.raises(RuntimeError, match="shorter"):
        nat.ops().page_crcs(addrs, torch.tensor([5]), 10, 20, 1)


@gpu
@pytest.mark.parametrize("where", ["first body byte", "last byte", "crc field"])
def test_a_corrupted_page_is_found_with_the_native_batch(nat, where):  # noqa: F811
    layout = PageLayout(QuantConfig(), KVShape(num_layers=2, heads=2, head_dim=64, v_head_dim=64), 64)
    model = model_digest("test-model")
    pages = _pages(8, [layout.page_bytes], seed=11)
    keys = [key_digest(f"k{i}") for i in range(len(pages))]
    for p, k in zip(pages, keys, strict=True):
        p[: pf.HEADER_BYTES] = np.frombuffer(layout.header(model=model, key=k), np.uint8)
    layout.seal_pages(pages, model, keys)
    assert all(layout.check_page(p, model=model, key=k) is None for p, k in zip(pages, keys, strict=True))
    assert layout.first_bad_page(pages, keys, model) is None
    at = {"first body byte": pf.HEADER_BYTES, "last byte": layout.page_bytes - 1,
          "crc field": pf.HEADER_CRC_OFFSET}[where]
    pages[5][at] ^= 0x01
    assert layout.first_bad_page(pages, keys, model) == (5, "checksum mismatch")
