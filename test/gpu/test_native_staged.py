"""Staged loads (quant/staged_load.py): copy-engine staging of a load's pages, then decode from device memory.

Every loaded device row is compared bit for bit with the reference decode of the same host pages (computed on
CPU copies, without CUDA), for uniform, mixed-precision and MLA layouts, host pages in runs and scattered
(2-D copies and the batched submission), layer groups that do and do not divide the layer count, loads that
reuse the staging slots across calls, loads that fit the staging area whole and loads that cycle two slots,
a layer tensor replaced between loads, a load that stops early, and ids the host checks reject.
"""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant import native, reference
from kvtuner_hicache.quant.codec import DeviceKV, NativeCodec
from test_native_kernels import assert_rows_equal, make_pool, nat, page_rows  # noqa: F401 (nat: the fixture)

# every test here needs the kernels: `nat` skips without CUDA and fails when CUDA has no kernels
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nat")]
POISON = 0x3C


class StagedRig:
    """A layout, device KV (GPU and a CPU copy), `n_host` host pages filled by the reference encoder, and a
    codec whose staged path takes every batch of 1..max_pages pages."""

    def __init__(self, cfg: QuantConfig, shape: KVShape, ps: int, n_host: int, seed: int, *, group: int,
                 max_pages: int):
        self.layout = PageLayout(cfg, shape, ps)
        self.ps = ps
        self.dev_slots = n_host + 4
        self.dev, self.cpu = make_pool(self.layout, self.dev_slots * ps, torch.bfloat16, "normal", seed)
        self.host = torch.full((n_host, self.layout.page_bytes), POISON, dtype=torch.uint8)
        reference.encode_pages(self.layout, self.cpu, page_rows(range(n_host), ps), self.host)
        rows = torch.full((n_host, self.layout.page_bytes + 4096), POISON, dtype=torch.uint8).pin_memory()
        self.pinned = rows[:, : self.layout.page_bytes]  # a row stride that is not the page size, as in the pool
        self.pinned.copy_(self.host)
        self.codec = NativeCodec(self.layout, DeviceKV.from_lists(self.dev), self.pinned, torch.device("cuda"),
                                 staging_pages=1, staged_pages=max_pages, staged_group=group, staged_min_pages=1)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def load(self, host_ids: list[int], dev_slots: list[int], *, layers: range | None = None) -> torch.Tensor:
        """Load host pages into device slots through the codec (staged when it fits); returns the rows."""
        ids = torch.tensor(host_ids, dtype=torch.int64)
        rows = page_rows(dev_slots, self.ps)
        pid, tid = ids.cuda(), rows.cuda()
        for layer in layers if layers is not None else range(self.layout.num_layers):
            self.codec.load_layer(layer, pid, tid, cpu_page_ids=ids)
        return rows

    def expect(self, host_ids: list[int], rows: torch.Tensor, want: list[list[torch.Tensor]]) -> None:
        ids = torch.tensor(host_ids, dtype=torch.int64)
        for layer in range(self.layout.num_layers):
            reference.decode_layer(self.layout, layer, self.host, ids, [per[layer] for per in want], rows)

    def poison_device(self) -> list[list[torch.Tensor]]:
        for per in self.dev:
            for t in per:
                t.fill_(7.0)
        return [[torch.full_like(t, 7.0) for t in per] for per in self.cpu]


def _mixed_28() -> QuantConfig:
    pairs = [(8, 4), (4, 4), (2, 2), (4, 8), (8, 8), (4, 2), (2, 4)]
    table = {i: LayerBits(*pairs[i % len(pairs)]) for i in range(28)}
    return QuantConfig(layer_bits=table, axis_key=1, axis_value=0, q_group_size=64)


CASES = {
    "KV4": (QuantConfig(), KVShape.mha(28, 4, 128), 64),
    "KV8": (QuantConfig(nbits_key=8, nbits_value=8), KVShape.mha(28, 4, 128), 64),
    "mixed": (_mixed_28(), KVShape.mha(28, 4, 128), 64),
    "K4V2-sym-pertoken": (QuantConfig(nbits_key=4, nbits_value=2, asym=False, axis_key=0, q_group_size=32),
                          KVShape.mha(5, 2, 64, 128), 32),
    "MLA": (QuantConfig(nbits_key=8, nbits_value=4), KVShape.mla(6), 64),
    "K3V2-3bit": (QuantConfig(nbits_key=3, nbits_value=2), KVShape.mha(6, 4, 128), 64),
}


@pytest.mark.parametrize("order", ["runs", "scattered"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_staged_load_is_bit_exact(case, group, order):
    cfg, shape, ps = CASES[case]
    n_host = 24
    rig = StagedRig(cfg, shape, ps, n_host, seed=len(case) * 31 + group, group=group, max_pages=20)
    if order == "runs":
        host_ids = [3, 4, 5, 6, 11, 12, 13, 0]  # three runs: one 2-D copy per run and stream
    else:
        host_ids = torch.randperm(n_host, generator=rig.gen)[:20].tolist()  # > 8 runs: one batched submission
    dev_slots = torch.randperm(rig.dev_slots, generator=rig.gen)[: len(host_ids)].tolist()
    want = rig.poison_device()
    rows = rig.load(host_ids, dev_slots)
    torch.cuda.synchronize()
    rig.expect(host_ids, rows, want)
    assert_rows_equal(rig.dev, want, f"staged load {case} group {group} {order}")
    rig.codec.check()
    rig.codec.shutdown()


def test_staged_loads_back_to_back_reuse_the_slots():
    """Many loads in a row, without a sync between them, each its own pages and rows: the copies into a slot
    wait for the decodes that read it, across loads too."""
    cfg, shape, ps = CASES["mixed"]
    rig = StagedRig(cfg, shape, ps, 32, seed=5, group=2, max_pages=16)
    want = rig.poison_device()
    loads = []
    for i in range(6):
        host_ids = torch.randperm(32, generator=rig.gen)[: 4 + 2 * i].tolist()
        dev_slots = torch.randperm(rig.dev_slots, generator=rig.gen)[: len(host_ids)].tolist()
        loads.append((host_ids, rig.load(host_ids, dev_slots)))
    torch.cuda.synchronize()
    for host_ids, rows in loads:  # later loads overwrite earlier rows: replay in the same order
        rig.expect(host_ids, rows, want)
    assert_rows_equal(rig.dev, want, "six staged loads back to back")
    rig.codec.shutdown()


def test_a_load_that_stops_early_then_a_new_load():
    """A staged load whose later layers never come (SGLang's layer cap) leaves nothing pending that a new load
    could trip over: the new load is exact, and so are the layers the first one did decode."""
    cfg, shape, ps = CASES["KV4"]
    rig = StagedRig(cfg, shape, ps, 16, seed=9, group=4, max_pages=16)
    want = rig.poison_device()
    first = [1, 2, 3, 9, 10]
    rows1 = rig.load(first, [0, 1, 2, 3, 4], layers=range(0, 6))  # stops inside the second group
    second = [15, 14, 13, 12, 5, 6]
    rows2 = rig.load(second, [8, 9, 10, 11, 12, 13])
    torch.cuda.synchronize()
    ids1 = torch.tensor(first)
    for layer in range(6):
        reference.decode_layer(rig.layout, layer, rig.host, ids1, [per[layer] for per in want], rows1)
    rig.expect(second, rows2, want)
    assert_rows_equal(rig.dev, want, "a load stopped at layer 6, then a whole load")
    rig.codec.shutdown()


def test_batches_outside_the_staged_range_decode_zero_copy():
    """Below min_pages and above max_pages the codec decodes zero-copy; a load without cpu ids too."""
    cfg, shape, ps = CASES["KV8"]
    rig = StagedRig(cfg, shape, ps, 24, seed=3, group=4, max_pages=6)
    rig.codec.staged.min_pages = 3
    want = rig.poison_device()
    for host_ids in ([4, 5], list(range(7, 19))):
        assert not rig.codec.staged.fits(len(host_ids))
        rows = rig.load(host_ids, list(range(len(host_ids))))
        torch.cuda.synchronize()
        rig.expect(host_ids, rows, want)
    assert_rows_equal(rig.dev, want, "zero-copy loads beside a staged codec")
    assert rig.codec.staged.fits(4)
    rig.codec.shutdown()


def test_bad_cpu_ids_raise_before_anything_is_enqueued():
    cfg, shape, ps = CASES["KV4"]
    rig = StagedRig(cfg, shape, ps, 8, seed=1, group=4, max_pages=8)
    rows = page_rows([0, 1], ps).cuda()
    with pytest.raises(IndexError, match="host page id 8 out of range"):
        rig.codec.load_layer(0, torch.tensor([0, 8]).cuda(), rows, cpu_page_ids=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="3 cpu_page_ids for a load of 2 pages"):
        rig.codec.load_layer(0, torch.tensor([0, 1]).cuda(), rows, cpu_page_ids=torch.tensor([0, 1, 2]))
    want = rig.poison_device()  # the codec still serves a good load
    rows2 = rig.load([7, 6, 5], [2, 3, 4])
    torch.cuda.synchronize()
    rig.expect([7, 6, 5], rows2, want)
    assert_rows_equal(rig.dev, want, "a load after rejected ids")
    rig.codec.shutdown()


@pytest.mark.parametrize("n", [3, 5, 12])
def test_slots_follow_the_batch_size(n):
    """Staging for two groups of 12 pages holds every group of a 3-page load (all copies in flight from layer 0),
    4 of 7 groups at 5 pages and 2 at 12: each exact."""
    cfg, shape, ps = CASES["KV4"]  # 28 layers
    rig = StagedRig(cfg, shape, ps, 16, seed=11 + n, group=4, max_pages=12)
    want = rig.poison_device()
    host_ids = torch.randperm(16, generator=rig.gen)[:n].tolist()
    rows = rig.load(host_ids, list(range(2, 2 + n)))
    assert rig.codec.staged.slots == min(7, 2 * 12 // n)
    torch.cuda.synchronize()
    rig.expect(host_ids, rows, want)
    assert_rows_equal(rig.dev, want, f"a staged load of {n} pages")
    rig.codec.shutdown()


def test_a_replaced_layer_tensor_is_followed_by_the_next_staged_load():
    """The ring's decode arguments hold the layer tensors' addresses: a tensor replaced in the owner's list
    between loads is written by the next load, and the old one is left alone."""
    cfg, shape, ps = CASES["KV8"]
    rig = StagedRig(cfg, shape, ps, 12, seed=21, group=3, max_pages=8)
    want = rig.poison_device()
    rows = rig.load([0, 1, 2], [0, 1, 2])
    torch.cuda.synchronize()
    rig.expect([0, 1, 2], rows, want)
    old = rig.dev[1][5]
    rig.dev[1][5] = torch.full_like(old, 7.0)  # V of layer 5: a new tensor, poisoned like the rest
    want[1][5] = torch.full_like(want[1][5], 7.0)  # the first load's rows went to the old tensor
    kept = old.clone()
    gen = rig.codec.pointer_rebuilds
    rows = rig.load([9, 4, 7, 8], [3, 4, 5, 6])
    torch.cuda.synchronize()
    assert rig.codec.pointer_rebuilds == gen + 1
    rig.expect([9, 4, 7, 8], rows, want)
    assert_rows_equal(rig.dev, want, "loads around a replaced layer tensor")
    assert torch.equal(old, kept), "the replaced tensor was written"
    rig.codec.shutdown()


def test_the_ring_checks_its_arguments():
    cfg, shape, ps = CASES["KV4"]
    rig = StagedRig(cfg, shape, ps, 8, seed=2, group=4, max_pages=4)
    assert rig.codec.staged.fits(4)
    ring = rig.codec.staged.ring
    rows = page_rows([0, 1], ps).cuda()
    with pytest.raises(RuntimeError, match="before set_layers"):
        ring.begin(torch.tensor([0, 1]), rows, None)
    rig.load([0, 1], [0, 1])  # binds the layers
    with pytest.raises(RuntimeError, match="a staged load of 5 pages"):
        ring.begin(torch.arange(5), page_rows(range(5), ps).cuda(), None)
    with pytest.raises(RuntimeError, match="token_index must hold page_size rows per page"):
        ring.begin(torch.tensor([0, 1]), rows[:-1].contiguous(), None)
    with pytest.raises(RuntimeError, match="expected layer -1, got 3"):
        ring.layer(3)
    ring.begin(torch.tensor([2, 3]), rows, None)
    with pytest.raises(RuntimeError, match="expected layer 0, got 1"):
        ring.layer(1)
    rig.codec.shutdown()
    assert not ring.live()
    with pytest.raises(RuntimeError, match="released ring"):
        ring.begin(torch.tensor([0, 1]), rows, None)


def test_stage_copies_checks_its_arguments():
    ops = native.ops()
    host = torch.zeros(4, 1024, dtype=torch.uint8).pin_memory()
    staging = torch.empty(4, 256, dtype=torch.uint8, device="cuda")
    ids = torch.tensor([0, 3])
    with pytest.raises(RuntimeError, match="outside a host page of 1024 B or a staging row of 256 B"):
        ops.stage_copies(host, ids, staging, torch.tensor([[900, 200, 0]]), 0)
    with pytest.raises(RuntimeError, match="host page id 4 out of range"):
        ops.stage_copies(host, torch.tensor([4]), staging, torch.tensor([[0, 128, 0]]), 0)
    with pytest.raises(RuntimeError, match="3 pages for a staging area of 2"):
        ops.stage_copies(host, torch.tensor([0, 1, 2]), staging[:2], torch.tensor([[0, 128, 0]]), 0)
    host[3, 100:228] = torch.arange(128, dtype=torch.uint8)
    ops.stage_copies(host, torch.tensor([3]), staging, torch.tensor([[100, 128, 64]]), 0)
    torch.cuda.synchronize()
    assert torch.equal(staging[0, 64:192].cpu(), torch.arange(128, dtype=torch.uint8))
