"""The per-pool codec interface on CPU: ReferenceCodec through PageCodec, the factory's choice, the
no-silent-fallback rule, bad indices, replaced layer tensors and the debug capture wrapper."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from kvtuner_hicache.config import KVShape, QuantConfig
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant import capture, codec, native, reference
from kvtuner_hicache.quant.codec import DeviceKV, NativeCodecUnavailable, PageCodec, ReferenceCodec, make_codec

PS = 16


def _layout(mla: bool = False) -> PageLayout:
    shape = KVShape.mla(3, 64, 16) if mla else KVShape.mha(3, 2, 64)
    return PageLayout(QuantConfig(nbits_key=8 if mla else 4, nbits_value=2, q_group_size=16), shape, PS)


def _pool(layout: PageLayout, rows: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sh = layout.shape
    if sh.is_mla:
        return [[torch.randn(rows, 1, sh.kv_lora_rank + sh.qk_rope_head_dim, generator=g).bfloat16()
                 for _ in range(sh.num_layers)]]
    return [[torch.randn(rows, sh.heads, sh.head_dim, generator=g).bfloat16() for _ in range(sh.num_layers)],
            [torch.randn(rows, sh.heads, sh.v_head_dim, generator=g).bfloat16() for _ in range(sh.num_layers)]]


def _rows(slots: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(s * PS, (s + 1) * PS) for s in slots])


class FakeMHAPool:
    """Attribute-compatible with SGLang's MHATokenToKVPool as far as DeviceKV reads it."""

    def __init__(self, bufs):
        self.k_buffer, self.v_buffer = bufs
        self.k_data_ptrs = torch.tensor([t.data_ptr() for t in self.k_buffer], dtype=torch.uint64)
        self.v_data_ptrs = torch.tensor([t.data_ptr() for t in self.v_buffer], dtype=torch.uint64)


class FakeMLAPool:
    def __init__(self, bufs):
        (self.kv_buffer,) = bufs
        self.data_ptrs = torch.tensor([t.data_ptr() for t in self.kv_buffer], dtype=torch.uint64)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_reference_codec_roundtrip_matches_reference(mla):
    lay = _layout(mla)
    bufs = _pool(lay, 8 * PS)
    host = torch.zeros(6, lay.page_bytes, dtype=torch.uint8)
    pool = FakeMLAPool(bufs) if mla else FakeMHAPool(bufs)
    c = make_codec(lay, pool, host, "cpu")
    assert isinstance(c, ReferenceCodec) and isinstance(c, PageCodec) and c.name == "reference"
    src = _rows([5, 0, 2])
    ids = torch.tensor([4, 1, 3])
    c.backup(ids, src)
    want = torch.empty(3, lay.page_bytes, dtype=torch.uint8)
    reference.encode_pages(lay, bufs, src, want)
    assert torch.equal(host[ids], want)
    assert (host[[0, 2, 5]] == 0).all()
    # load into other rows of a fresh pool; compare with the reference decode, layer by layer
    dst = [[torch.zeros_like(t) for t in per] for per in bufs]
    expect = [[torch.zeros_like(t) for t in per] for per in bufs]
    c2 = make_codec(lay, DeviceKV.from_lists(dst), host, "cpu")
    drows = _rows([1, 7, 3])
    for layer in range(lay.num_layers):
        c2.load_layer(layer, ids, drows)
        reference.decode_layer(lay, layer, host, ids, [per[layer] for per in expect], drows)
    for a, b in zip(dst, expect, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert any(x.abs().sum() > 0 for per in dst for x in per)
    c.shutdown()
    c2.shutdown()


def test_reference_codec_planes_are_the_elastic_reference():
    """ReferenceCodec's `planes` argument (what the native kernels are compared against on the GPU): a page
    with both planes loads exactly as elastic_pages.roundtrip_top reconstructs it, a page without loads
    its floor (the fixed decode), and nothing outside the given plane spans is written."""
    from kvtuner_hicache.quant.elastic_pages import RefinementLayout, roundtrip_top

    layout = PageLayout(QuantConfig(q_group_size=16), KVShape.mha(3, 2, 64), PS)
    rl = RefinementLayout(layout)
    n = 3
    bufs = _pool(layout, n * PS, seed=4)
    half = -(-max(rl.plane_bytes.values()) // 128) * 128
    stride = -(-max(layout.page_bytes, 2 * half) // 4096) * 4096
    buf = torch.full((2 * n + 1, stride), 0x5A, dtype=torch.uint8)
    pages = buf[:, : layout.page_bytes]
    planes = torch.full((2, n), -1, dtype=torch.int64)
    planes[:, 0] = torch.tensor([n * stride, n * stride + half])  # page 0: both planes, one row
    planes[1, 2] = (n + 1) * stride  # page 2: the value plane only; page 1: none
    c = ReferenceCodec(layout, DeviceKV.from_lists(bufs), pages)
    ids = torch.tensor([2, 0, 1])  # host rows out of order
    rows = torch.arange(n * PS)
    c.backup(ids, rows, planes[:, [0, 1, 2]])
    assert (buf[2 * n] == 0x5A).all() and (buf[n + 1, half:] == 0x5A).all(), "wrote outside the plane spans"
    out = [[torch.zeros_like(t) for t in per] for per in bufs]
    floor = [[torch.zeros_like(t) for t in per] for per in bufs]
    load = ReferenceCodec(layout, DeviceKV.from_lists(out), pages)
    fixed = ReferenceCodec(layout, DeviceKV.from_lists(floor), pages)
    for layer in range(layout.num_layers):
        load.load_layer(layer, ids, rows, planes)
        fixed.load_layer(layer, ids, rows)
    top = roundtrip_top(layout, bufs)
    for b in range(2):
        for layer in range(layout.num_layers):
            p0 = slice(0, PS)
            assert torch.equal(out[b][layer][p0], top[b][layer][p0]), (b, layer)  # both planes
            assert torch.equal(out[b][layer][PS:2 * PS], floor[b][layer][PS:2 * PS])  # no plane: the floor
            want = top if b == 1 else floor  # page 2 has only its value plane
            assert torch.equal(out[b][layer][2 * PS:], want[b][layer][2 * PS:]), (b, layer)
    assert not torch.equal(out[1][0][:PS], floor[1][0][:PS]), "the plane changed nothing"
    with pytest.raises(IndexError, match="refinement plane offset"):
        c.backup(ids, rows, torch.full((2, n), buf.numel() - 8, dtype=torch.int64))


def test_device_kv_reads_the_owner_live():
    lay = _layout()
    pool = FakeMHAPool(_pool(lay, 4 * PS))
    kv = DeviceKV.from_sglang_pool(pool)
    assert kv.names == ("k_buffer", "v_buffer") and kv.table_names == ("k_data_ptrs", "v_data_ptrs")
    assert kv.tables()[0] is pool.k_data_ptrs
    new = torch.zeros_like(pool.k_buffer[1])
    pool.k_buffer[1] = new
    assert kv.layer(1)[0] is new
    pool.v_buffer = [torch.ones_like(t) for t in pool.v_buffer]  # the owner rebinds its list
    assert kv.buffers()[1] is pool.v_buffer
    mla = DeviceKV.from_sglang_pool(FakeMLAPool(_pool(_layout(True), 4 * PS)))
    assert mla.names == ("kv_buffer",) and mla.table_names == ("data_ptrs",)


def test_replaced_layer_tensor_is_used():
    """A layer tensor replaced between calls (memory saver, VMM) is the one read and written."""
    lay = _layout()
    bufs = _pool(lay, 4 * PS, seed=1)
    host = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    c = make_codec(lay, bufs, host, "cpu")
    c.backup(torch.tensor([0]), _rows([1]))
    bufs[0][2] = torch.randn_like(bufs[0][2])  # replace K of layer 2
    c.backup(torch.tensor([1]), _rows([1]))
    want = torch.empty(1, lay.page_bytes, dtype=torch.uint8)
    reference.encode_pages(lay, bufs, _rows([1]), want)
    assert torch.equal(host[1], want[0]) and not torch.equal(host[0], host[1])
    old = bufs[1][0]
    bufs[1][0] = torch.zeros_like(old)
    c.load_layer(0, torch.tensor([1]), _rows([3]))
    assert bufs[1][0][_rows([3])].abs().sum() > 0, "the new V tensor of layer 0 was not written"


def test_bad_indices_raise_index_error():
    lay = _layout()
    bufs = _pool(lay, 4 * PS)
    host = torch.zeros(4, lay.page_bytes, dtype=torch.uint8)
    c = make_codec(lay, bufs, host, "cpu")
    with pytest.raises(IndexError, match="host page id 4"):
        c.backup(torch.tensor([4]), _rows([0]))
    with pytest.raises(IndexError, match="host page id -1"):
        c.load_layer(0, torch.tensor([-1]), _rows([0]))
    with pytest.raises(IndexError, match="device row"):
        c.backup(torch.tensor([0]), _rows([0]) + 4 * PS)
    with pytest.raises(IndexError, match="device row"):
        c.load_layer(0, torch.tensor([0]), _rows([0]) + 10**6)
    c.backup(torch.tensor([0]), _rows([0]))  # still usable
    many = torch.zeros(codec._LIST_CHECK_MAX + 1, dtype=torch.int64)  # past the list check: the tensor reduction
    for bad in (4, -1):
        many[-1] = bad
        with pytest.raises(IndexError, match=f"host page id {bad}"):
            c._host_ids(many)
        with pytest.raises(IndexError, match=f"host page id {bad}"):
            c._host_ids(many[1:])  # at the list check's bound


def test_cuda_without_kernels_is_an_error_unless_opted_in(monkeypatch, caplog):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "ModuleNotFoundError: kvtuner_hicache_kernel; " +
                        native.INSTALL_HINT)
    monkeypatch.delenv(codec.ENV_ALLOW_REFERENCE, raising=False)
    lay = _layout()
    bufs = _pool(lay, 2 * PS)
    host = torch.zeros(2, lay.page_bytes, dtype=torch.uint8)
    with pytest.raises(NativeCodecUnavailable) as e:
        make_codec(lay, bufs, host, "cuda")
    msg = str(e.value)
    assert "build_kernel_wheel.sh" in msg and codec.ENV_ALLOW_REFERENCE in msg
    monkeypatch.setenv(codec.ENV_ALLOW_REFERENCE, "1")
    with caplog.at_level(logging.WARNING, logger="kvtuner_hicache.quant.codec"):
        c = make_codec(lay, bufs, host, "cuda")
    assert isinstance(c, ReferenceCodec) and "reference" in c.describe()
    assert any(r.levelno == logging.WARNING and "SLOW reference codec" in r.message for r in caplog.records)
    monkeypatch.setenv(codec.ENV_ALLOW_REFERENCE, "0")
    with pytest.raises(NativeCodecUnavailable):
        make_codec(lay, bufs, host, "cuda")
    assert isinstance(make_codec(lay, bufs, host, "cuda", allow_reference=True), ReferenceCodec)


def test_legacy_dispatch_follows_the_same_rule(monkeypatch):
    from kvtuner_hicache.quant import dispatch

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no kernels")
    monkeypatch.delenv(codec.ENV_ALLOW_REFERENCE, raising=False)
    assert dispatch.get_codec("cpu") is reference
    with pytest.raises(NativeCodecUnavailable):
        dispatch.get_codec("cuda")
    monkeypatch.setenv(codec.ENV_ALLOW_REFERENCE, "1")
    assert dispatch.get_codec("cuda") is reference
    assert dispatch.codec_name(reference) == "reference"


def test_native_reports_why_it_is_unavailable_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: test/gpu covers the native codec")
    assert native.available() is False
    reason = native.unavailable_reason()
    assert reason and "build_kernel_wheel.sh" in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        native.ops()


def test_capturing_codec_wraps_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv(capture.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(capture.ENV_PAGES, "4")
    lay = _layout()
    bufs = _pool(lay, 6 * PS, seed=3)
    host = torch.zeros(5, lay.page_bytes, dtype=torch.uint8)
    c = make_codec(lay, bufs, host, "cpu", capture_meta={"pool_label": "kv", "config": {"x": 1}})
    assert isinstance(c, capture.CapturingCodec) and isinstance(c.inner, ReferenceCodec)
    c.backup(torch.tensor([2, 3]), _rows([4, 1]))
    assert c.n_backup == 1
    saved = torch.load(next(tmp_path.glob("pool_*/backup_0000.pt")))
    assert saved["pid"] == 2 and saved["crc"] == capture.payload_crc(host[2])
    for layer in range(lay.num_layers):
        c.load_layer(layer, torch.tensor([2]), _rows([0]))
    assert c.n_loads["l2"] == 1
    loaded = torch.load(next(tmp_path.glob("pool_*/load_l2_0000.pt")))
    assert loaded["backup"] == "backup_0000.pt"
    host[4] = host[2]  # an L3 page with the same payload lands in another slot
    c.pages_written([4])
    for layer in range(lay.num_layers):
        c.load_layer(layer, torch.tensor([4]), _rows([5]))
    assert c.n_loads["l3"] == 1
    meta = json.loads(next(tmp_path.glob("pool_*/meta.json")).read_text())
    assert meta["codec"] == "reference" and meta["page_bytes"] == lay.page_bytes and meta["config"] == {"x": 1}
    monkeypatch.delenv(capture.ENV_DIR)
    assert isinstance(make_codec(lay, bufs, host, "cpu"), ReferenceCodec)


def test_pointer_tables_hold_the_layer_addresses_and_are_made_once_per_address_list() -> None:
    k = [torch.zeros(4, 2) for _ in range(3)]
    v = [torch.zeros(4, 2) for _ in range(3)]
    p0, p1 = native.pointer_tables([k, v])
    assert p0.tolist() == [t.data_ptr() for t in k] and p1.tolist() == [t.data_ptr() for t in v]
    again = native.pointer_tables([list(k), list(v)])  # other lists, same tensors: the same tables
    assert again[0] is p0 and again[1] is p1
    v[1] = torch.zeros(4, 2)  # a layer at another address: a new table with it
    q0, q1 = native.pointer_tables([k, v])
    assert q0 is p0 and q1 is not p1 and q1.tolist() == [t.data_ptr() for t in v]
    (m,) = native.pointer_tables([k])[:1]  # one buffer (MLA): the second table repeats the first
    assert native.pointer_tables([k])[1] is m


def test_native_pointer_identity_follows_replaced_layers_and_tables() -> None:
    """NativeCodec rebuilds its pointer tables when a layer tensor or a table object changes; the check runs
    on the host only, so it is exercised here on CPU lists (the GPU tests count the rebuilds)."""
    k = [torch.zeros(4) for _ in range(3)]
    v = [torch.zeros(4) for _ in range(3)]
    owner = type("Pool", (), {})()
    owner.k_buffer, owner.v_buffer = k, v
    owner.k_data_ptrs, owner.v_data_ptrs = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    c = codec.NativeCodec.__new__(codec.NativeCodec)
    c.device_kv, c._nbuf, c._key = DeviceKV.from_sglang_pool(owner), 2, None
    assert not c._same_identity()  # nothing built yet
    c._key = c._identity()
    assert c._same_identity()
    v[2] = torch.zeros(4)  # a layer tensor replaced in place (memory saver, VMM)
    assert not c._same_identity()
    c._key = c._identity()
    owner.k_data_ptrs = torch.zeros(3, dtype=torch.int64)  # the owner rebuilt its table
    assert not c._same_identity()
    c._key = c._identity()
    k.append(torch.zeros(4))  # a list that grew
    assert not c._same_identity()
    c._key = c._identity()
    owner.v_buffer = [t for t in v]  # a new list holding the same tensors is the same identity
    assert c._same_identity()
