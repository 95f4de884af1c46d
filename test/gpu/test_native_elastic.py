"""Native elastic pages (issue 15) vs the reference codec: refinement planes written by the backup kernel and
read by the load kernels, bit for bit.

The reference is ReferenceCodec with the same `planes` argument on CPU copies of the same inputs
(quant/elastic_pages.py: encode_planes and load_top), so every plane byte and every loaded device row is
compared against ground truth computed without CUDA. Host buffers are laid out like the elastic pool's:
pages in rows, planes in other rows (and after the pages of a row), offsets from the buffer's start.
"""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig
from kvtuner_hicache.page_format import ALIGN, PageLayout
from kvtuner_hicache.quant import native
from kvtuner_hicache.quant.codec import DeviceKV, NativeCodec, ReferenceCodec
from kvtuner_hicache.quant.elastic_pages import RefinementLayout
from test_native_kernels import assert_rows_equal, make_pool, nat, page_rows  # noqa: F401 (nat: fixture)

gpu = pytest.mark.gpu
POISON = 0x5A


def _round(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class Rig:
    """One layout, device KV on the GPU and its CPU copy, and a host buffer of `rows` rows of `stride` bytes:
    page i in row i, planes placed by `place` at offsets inside rows that hold no page."""

    def __init__(self, cfg: QuantConfig, shape: KVShape, ps: int, n_pages: int, seed: int, kind: str = "special"):
        self.layout = PageLayout(cfg, shape, ps)
        assert native.supports(self.layout) is None, native.supports(self.layout)
        self.rl = RefinementLayout(self.layout)
        assert self.rl.streams, "the config must have elastic chunks"
        self.half = _round(max(self.rl.plane_bytes.values()), ALIGN)  # two plane slots per row
        self.stride = _round(max(self.layout.page_bytes, 2 * self.half), 4096)
        self.n = n_pages
        self.rows = 3 * n_pages + 2  # pages, then plane rows, then spare
        self.dev_rows = (n_pages + 3) * ps
        self.dev, self.cpu = make_pool(self.layout, self.dev_rows, torch.bfloat16, kind, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.slots = torch.randperm(n_pages + 3, generator=gen)[:n_pages].tolist()
        self.tidx = page_rows(self.slots, ps)
        self.host_ids = torch.randperm(n_pages, generator=gen)  # pages in rows 0..n-1, out of order

    def buffers(self, pinned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.full((self.rows, self.stride), POISON, dtype=torch.uint8)
        if pinned:
            buf = buf.pin_memory()
        return buf, buf[:, : self.layout.page_bytes]

    def planes(self, pattern: str) -> torch.Tensor:
        """Offsets [2, n]: 'all' every page both planes, 'mixed' a page-dependent subset, 'none' -1 only."""
        offs = torch.full((2, self.n), -1, dtype=torch.int64)
        if pattern == "none":
            return offs
        k = 0
        for i in range(self.n):
            for s in self.rl.streams:
                if pattern == "mixed" and (i + s) % 3 == 0:
                    continue
                row, half = self.n + k // 2, k % 2
                offs[s, i] = row * self.stride + half * self.half
                k += 1
        return offs


def _backup_both(rig: Rig, planes: torch.Tensor, **codec_kw):
    """Native backup (GPU kernels, pinned host buffer) and reference backup (CPU) of the same pages."""
    hbuf, hpages = rig.buffers(pinned=True)
    rbuf, rpages = rig.buffers(pinned=False)
    nat_codec = NativeCodec(rig.layout, DeviceKV.from_lists(rig.dev), hpages, torch.device("cuda"), staging_pages=4,
                            **codec_kw)
    ref_codec = ReferenceCodec(rig.layout, DeviceKV.from_lists(rig.cpu), rpages)
    stream = torch.cuda.Stream()  # like SGLang's write stream
    with torch.cuda.stream(stream):
        nat_codec.backup(rig.host_ids, rig.tidx.cuda(), planes)
    stream.synchronize()
    ref_codec.backup(rig.host_ids, rig.tidx, planes)
    nat_codec.check()
    return nat_codec, ref_codec, hbuf, rbuf


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = (a != b).nonzero().tolist()
    return f"{len(bad)} bytes differ, first at (row, byte) {bad[:6]}"


@gpu
@pytest.mark.parametrize("pattern", ["all", "mixed", "none"])
@pytest.mark.parametrize("case", ["K4cV4t", "K2cV2t", "K8cV4t", "K4tV2c-g32", "K4tV4t-g4", "table"])
def test_backup_writes_the_reference_planes_and_load_decodes_them(nat, case, pattern):  # noqa: F811
    cfgs = {
        "K4cV4t": QuantConfig(),
        "K2cV2t": QuantConfig(nbits_key=2, nbits_value=2),
        "K8cV4t": QuantConfig(nbits_key=8, nbits_value=4),  # keys have no plane
        "K4tV2c-g32": QuantConfig(nbits_key=4, nbits_value=2, axis_key=0, axis_value=1, q_group_size=32),
        "K4tV4t-g4": QuantConfig(axis_key=0, axis_value=0, q_group_size=4),  # groups smaller than an item
        "table": QuantConfig(layer_bits={0: LayerBits(8, 8), 1: LayerBits(4, 2), 2: LayerBits(2, 4), 3: LayerBits(8, 4)}),
    }
    cfg = cfgs[case]
    shape = KVShape.mha(4 if case == "table" else 2, 4, 128)
    rig = Rig(cfg, shape, 64, n_pages=5, seed=len(case) * 7 + len(pattern))
    planes = rig.planes(pattern)
    nat_codec, ref_codec, hbuf, rbuf = _backup_both(rig, planes)
    if not torch.equal(hbuf, rbuf):  # pages, planes and every byte around them (poison stays poison)
        raise AssertionError(f"{case}/{pattern}: host buffers differ: {_diff(hbuf, rbuf)}")
    # load: small (one launch for every layer) and per-layer, default grid and one block
    for fuse in (None, 0):
        for blocks in (None, 1):
            dev_out, cpu_out = make_pool(rig.layout, rig.dev_rows, torch.bfloat16, "normal", 99)
            codec = NativeCodec(rig.layout, DeviceKV.from_lists(dev_out), hbuf[:, : rig.layout.page_bytes],
                                torch.device("cuda"), staging_pages=1, load_blocks=blocks,
                                **({} if fuse is None else {"fuse_pages": fuse}))
            ref = ReferenceCodec(rig.layout, DeviceKV.from_lists(cpu_out), rbuf[:, : rig.layout.page_bytes])
            dst = page_rows(list(reversed(rig.slots)), rig.layout.page_size)
            ids = rig.host_ids.cuda()
            for layer in range(rig.layout.num_layers):
                codec.load_layer(layer, ids, dst.cuda(), planes)
                ref.load_layer(layer, rig.host_ids, dst, planes)
            torch.cuda.synchronize()
            codec.check()
            assert_rows_equal(dev_out, cpu_out, f"{case}/{pattern} load (fuse={fuse}, blocks={blocks})")
            codec.shutdown()
    nat_codec.shutdown()


@gpu
@pytest.mark.parametrize("direct,all_classes", [(8, 0), (8, 8), (0, 8)], ids=["direct", "direct-one-launch", "one-launch"])
@pytest.mark.parametrize("case", ["K4cV4t", "table"])
def test_small_plane_backups_direct_and_in_one_launch_equal_the_reference(nat, case, direct, all_classes):  # noqa: F811
    """Kernel 0.10.0's small-backup paths (pages encoded straight into the mapped host buffer; every encode class
    in one launch) write the reference's pages and planes, and not one byte more."""
    cfg = QuantConfig() if case == "K4cV4t" else QuantConfig(
        layer_bits={0: LayerBits(8, 8), 1: LayerBits(4, 2), 2: LayerBits(2, 4), 3: LayerBits(8, 4)})
    rig = Rig(cfg, KVShape.mha(4 if case == "table" else 2, 4, 128), 64, n_pages=5, seed=17)
    nat_codec, ref_codec, hbuf, rbuf = _backup_both(rig, rig.planes("mixed"), direct_pages=direct,
                                                    all_classes_pages=all_classes)
    assert nat_codec.direct_pages == direct
    if not torch.equal(hbuf, rbuf):
        raise AssertionError(f"{case}: host buffers differ: {_diff(hbuf, rbuf)}")
    nat_codec.shutdown()


@gpu
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("pattern", ["all", "mixed", "none"])
@pytest.mark.parametrize("case", ["K4cV4t", "K8cV4t", "K4tV2c-g32", "table"])
def test_staged_loads_bring_the_planes_along(nat, case, pattern, group):  # noqa: F811
    """An elastic pool's staged load (copy engine into GPU staging, kernel 0.5.0's StagedRing) copies each
    group's refinement codes beside the pages and decodes them from there: bit for bit the reference's top
    decode where a page has a plane and its floor where it has none, with layer groups that do and do not
    divide the layer count, and again (planes moved) on a second load through the same ring."""
    cfgs = {
        "K4cV4t": QuantConfig(elastic=True),
        "K8cV4t": QuantConfig(nbits_key=8, nbits_value=4, elastic=True),  # keys have no plane
        "K4tV2c-g32": QuantConfig(nbits_key=4, nbits_value=2, axis_key=0, axis_value=1, q_group_size=32, elastic=True),
        "table": QuantConfig(layer_bits={0: LayerBits(8, 8), 1: LayerBits(4, 2), 2: LayerBits(2, 4), 3: LayerBits(8, 4),
                                         4: LayerBits(4, 4)}, elastic=True),
    }
    cfg = cfgs[case]
    rig = Rig(cfg, KVShape.mha(5, 4, 128), 64, n_pages=6, seed=len(case) * 5 + len(pattern) + group)
    planes = rig.planes(pattern)
    _, _, hbuf, rbuf = _backup_both(rig, planes)
    assert torch.equal(hbuf, rbuf)
    dev_out, cpu_out = make_pool(rig.layout, rig.dev_rows, torch.bfloat16, "normal", 7)
    codec = NativeCodec(rig.layout, DeviceKV.from_lists(dev_out), hbuf[:, : rig.layout.page_bytes],
                        torch.device("cuda"), staging_pages=1, fuse_pages=0, staged_pages=8, staged_group=group,
                        staged_min_pages=1)
    assert codec.staged.takes_planes
    ref = ReferenceCodec(rig.layout, DeviceKV.from_lists(cpu_out), rbuf[:, : rig.layout.page_bytes])
    for attempt, sub in enumerate(([0, 1, 2, 3, 4, 5], [4, 1, 5])):
        ids = rig.host_ids[sub]
        p = planes[:, sub].contiguous()
        if attempt == 1:  # each page gets its neighbour's planes: offsets the first load did not use
            p = p.roll(1, dims=1).contiguous()
        dst = page_rows([rig.slots[i] for i in reversed(sub)], rig.layout.page_size)
        for layer in range(rig.layout.num_layers):
            codec.load_layer(layer, ids.cuda(), dst.cuda(), p, cpu_page_ids=ids)
            ref.load_layer(layer, ids, dst, p)
        torch.cuda.synchronize()
        codec.check()
        assert_rows_equal(dev_out, cpu_out, f"{case}/{pattern}/group {group}: staged load {attempt}")
    codec.shutdown()


@gpu
def test_top_load_is_more_accurate_than_the_floor(nat):  # noqa: F811
    """The plane changes what is loaded (not a no-op): closer to the source than the floor decode."""
    rig = Rig(QuantConfig(), KVShape.mha(2, 4, 128), 64, n_pages=4, seed=3, kind="normal")
    hbuf, _ = rig.buffers(pinned=True)
    codec = NativeCodec(rig.layout, DeviceKV.from_lists(rig.dev), hbuf[:, : rig.layout.page_bytes], torch.device("cuda"))
    top, floor = rig.planes("all"), rig.planes("none")
    codec.backup(rig.host_ids, rig.tidx.cuda(), top)
    errs = {}
    for name, planes in (("top", top), ("floor", floor)):
        out, _ = make_pool(rig.layout, rig.dev_rows, torch.bfloat16, "zeros", 0)
        c2 = NativeCodec(rig.layout, DeviceKV.from_lists(out), hbuf[:, : rig.layout.page_bytes], torch.device("cuda"),
                         fuse_pages=0)
        for layer in range(rig.layout.num_layers):
            c2.load_layer(layer, rig.host_ids.cuda(), rig.tidx.cuda(), planes)
        torch.cuda.synchronize()
        rows = rig.tidx.cuda()
        errs[name] = max(float((out[b][layer][rows].float() - rig.dev[b][layer][rows].float()).abs().max())
                         for b in range(2) for layer in range(rig.layout.num_layers))
        c2.shutdown()
    assert errs["top"] < errs["floor"] / 4, errs
    codec.shutdown()


@gpu
def test_bad_plane_offsets_raise_and_nothing_is_written_outside(nat):  # noqa: F811
    rig = Rig(QuantConfig(), KVShape.mha(2, 4, 128), 64, n_pages=3, seed=5)
    hbuf, hpages = rig.buffers(pinned=True)
    codec = NativeCodec(rig.layout, DeviceKV.from_lists(rig.dev), hpages, torch.device("cuda"))
    bad = rig.planes("all")
    bad[1, 2] = rig.rows * rig.stride - 8  # the plane would run past the buffer
    with pytest.raises(IndexError, match="refinement plane offset"):
        codec.backup(rig.host_ids, rig.tidx.cuda(), bad)  # host check, before anything is enqueued
    with pytest.raises(ValueError, match="CPU int64"):
        codec.backup(rig.host_ids, rig.tidx.cuda(), bad[:, :2])
    # the kernels' own check (offsets given on the GPU, past the host check): reported, skipped, no fault
    lay = rig.layout
    p0, p1 = codec._pointers()
    before = hbuf.clone()
    torch.ops.kvtq.backup(codec._chunks, codec._units, p0, p1, rig.tidx.cuda(), codec._header, codec.staging,
                          hpages, rig.host_ids, codec._geom, codec.err.word, codec._side, bad.cuda(),
                          codec._pages_ptr, codec._buffer_bytes)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="refinement plane offset .* in a backup"):
        codec.check()
    tail = slice(rig.rows * rig.stride - 8, None)
    assert torch.equal(hbuf.reshape(-1)[tail], before.reshape(-1)[tail]), "a bad plane offset was written"
    out, _ = make_pool(lay, rig.dev_rows, torch.bfloat16, "zeros", 0)
    c2 = NativeCodec(lay, DeviceKV.from_lists(out), hpages, torch.device("cuda"), fuse_pages=0)
    desc = c2._desc_small[0]
    torch.ops.kvtq.decode(desc, c2._cfg, rig.host_ids.cuda(), rig.tidx.cuda(), out[0][0], out[1][0], c2.err.word,
                          bad.cuda())
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="refinement plane offset .* in a load"):
        c2.check()
    c2.load_layer(0, rig.host_ids.cuda(), rig.tidx.cuda(), rig.planes("all"))  # the context is intact
    torch.cuda.synchronize()
    c2.check()
    c2.shutdown()
    codec.shutdown()
