"""Quantized host pools built from real SGLang device pools on CPU (any supported release)."""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.config import load_layer_bits as load_yaml
from kvtuner_hicache.page_format import HEADER_BYTES
from kvtuner_hicache.quant import roundtrip_pages
from sglang_pools import bf16_host_pool, mha_device_pool, mla_device_pool, quant_host_pool

pytestmark = pytest.mark.sglang

# (name, device pool factory(page_size), config(page_size)); real head shapes, few layers for speed
SHAPES = {
    "qwen2.5-7b": (lambda ps: mha_device_pool(3, 4, 128, ps, tokens=16 * ps), lambda ps: QuantConfig(q_group_size=min(64, ps))),
    "llama-3.1-8b": (lambda ps: mha_device_pool(2, 8, 128, ps, tokens=16 * ps), lambda ps: QuantConfig(q_group_size=min(64, ps))),
    "asym-k192-v128": (lambda ps: mha_device_pool(2, 2, 192, ps, tokens=16 * ps, v_head_dim=128),
                       lambda ps: QuantConfig(q_group_size=min(64, ps), nbits_key=2, nbits_value=8)),
    "deepseek-mla": (lambda ps: mla_device_pool(2, ps, tokens=16 * ps), lambda ps: QuantConfig(q_group_size=min(64, ps), nbits_key=8)),
}


def _stream_tensors(dev, rows):
    if hasattr(dev, "kv_buffer"):
        return [[b[rows] for b in dev.kv_buffer]]
    return [[b[rows] for b in dev.k_buffer], [b[rows] for b in dev.v_buffer]]


def _device_rows(dev, rows):
    return _stream_tensors(dev, rows)


def _scattered_pages(ps: int, pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages])


@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_backup_load_roundtrip_matches_reference(shape, page_size):
    make_dev, make_cfg = SHAPES[shape]
    dev = make_dev(page_size)
    host = quant_host_pool(dev, make_cfg(page_size))
    # host pages out of order: churn the allocator first
    first = host.alloc(3 * page_size)
    host.free(first[page_size : 2 * page_size])
    src = _scattered_pages(page_size, [5, 2, 3, 9])
    h = host.alloc(4 * page_size)
    host.backup_from_device_all_layer(dev, h, src, "kernel")
    expected = roundtrip_pages(host.page_layout, _device_rows(dev, src))
    dst = _scattered_pages(page_size, [12, 1, 7, 8])
    for layer in range(dev.layer_num):
        host.load_to_device_per_layer(dev, h, dst, layer, "kernel")
    got = _device_rows(dev, dst)
    for b in range(len(expected)):
        for layer in range(dev.layer_num):
            assert torch.equal(got[b][layer], expected[b][layer]), (b, layer)
    # every backed-up page is a valid page (CRC is filled only on the way to L3)
    for pid in host.kvtq_page_ids(h):
        assert host.page_layout.check_page(memoryview(host.pages[pid].numpy()), verify_crc=False) is None


def test_per_layer_mixed_table(mixed_table):
    table = load_yaml(mixed_table)
    assert len(set(table.values())) > 1  # really mixed
    dev = mha_device_pool(28, 4, 128, 64, tokens=256)
    host = quant_host_pool(dev, QuantConfig(layer_bits=table))
    bits = {host.page_layout.chunk(0, i).bits for i in range(28)} | {host.page_layout.chunk(1, i).bits for i in range(28)}
    assert len(bits) > 1
    src = _scattered_pages(64, [1, 3])
    h = host.alloc(128)
    host.backup_from_device_all_layer(dev, h, src, "kernel")
    expected = roundtrip_pages(host.page_layout, _device_rows(dev, src))
    dst = _scattered_pages(64, [0, 2])
    for layer in range(28):
        host.load_to_device_per_layer(dev, h, dst, layer, "kernel")
    got = _device_rows(dev, dst)
    assert all(torch.equal(got[b][i], expected[b][i]) for b in range(2) for i in range(28))


def test_table_for_another_model_is_a_clear_error(table_32_layers):
    path = table_32_layers
    cfg = QuantConfig(layer_bits=load_yaml(path), layer_bits_source=f"--kvtuner-hicache-config {path}")
    with pytest.raises(ConfigError, match="names layers the model lacks"):
        quant_host_pool(mha_device_pool(28, 4, 128, 64, tokens=128), cfg)


def test_page_size_too_small_for_per_channel_groups():
    with pytest.raises(ConfigError, match="--page-size"):
        quant_host_pool(mha_device_pool(2, 4, 128, 16, tokens=128), QuantConfig())


def test_fp8_device_pool_rejected():
    dev = mha_device_pool(2, 4, 128, 64, tokens=128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match="bf16/fp16"):
        quant_host_pool(dev)


def test_mla_rope_must_stay_8_bit():
    with pytest.raises(ConfigError, match="nbits-key 8"):
        quant_host_pool(mla_device_pool(2, 64, tokens=128), QuantConfig(nbits_key=4))


@pytest.mark.parametrize("cfg, at_least", [(QuantConfig(), 3.3), (QuantConfig(nbits_key=2, nbits_value=2), 5.5),
                                           (QuantConfig(nbits_key=8, nbits_value=8), 1.8)])
def test_hicache_size_gives_compression_times_tokens(cfg, at_least):
    dev = mha_device_pool(4, 4, 128, 64, tokens=128)
    gb = 0.1
    bf16 = bf16_host_pool(dev, host_size=gb)
    ours = quant_host_pool(dev, cfg, host_size=gb)
    gain = ours.size / bf16.size
    expected = bf16.size_per_token / ours.size_per_token
    assert gain == pytest.approx(expected, rel=0.01)
    assert gain > at_least
    assert ours.size * ours.size_per_token <= gb * 1e9 + ours.row_stride  # budget + the one extra page SGLang adds
    assert ours.kv_buffer.numel() == ours.page_num * ours.row_stride


def test_ratio_is_a_byte_ratio():
    dev = mha_device_pool(4, 4, 128, 64, tokens=1024)
    ours = quant_host_pool(dev, ratio=2.0)
    dev_bytes = 1024 * dev.get_kv_size_bytes()[0] * 2 / dev.k_buffer[0].shape[0]
    assert ours.size * ours.size_per_token == pytest.approx(2.0 * dev_bytes, rel=0.02)


def test_residual_budget_is_carved_out():
    dev = mha_device_pool(2, 4, 128, 64, tokens=128)
    plain = quant_host_pool(dev, host_size=0.01)
    with_tail = quant_host_pool(dev, QuantConfig(residual_length=64), host_size=0.01)
    assert with_tail.residual_bytes == pytest.approx(0.01e9 / 8, rel=1e-6)
    assert with_tail.size == pytest.approx(plain.size * 7 / 8, rel=0.03)


def test_page_accessors_and_meta():
    dev = mha_device_pool(2, 4, 128, 64, tokens=256)
    host = quant_host_pool(dev, QuantConfig(nbits_key=2, nbits_value=4))
    pl = host.page_layout
    assert host.dtype == torch.uint8 and host.layout == "page_first" and host.can_use_write_back_jit
    assert (host.head_num, host.head_dim, host.layer_num) == (4, 128, 2)
    # header in every page from the start
    for pid in range(host.page_num):
        assert host.page_layout.check_page(memoryview(host.pages[pid].numpy()), verify_crc=False) is None
    page = host.get_data_page(3 * 64 + 0)
    assert page.dtype == torch.uint8 and page.dim() == 1 and page.numel() == pl.page_bytes
    assert page.data_ptr() == host.kv_buffer.data_ptr() + 3 * host.row_stride  # zero copy
    dummy = host.get_dummy_flat_data_page()
    assert dummy.shape == page.shape and int(dummy.sum()) == 0
    dummy[HEADER_BYTES:] = 7
    host.set_from_flat_data_page(5 * 64, dummy)
    assert torch.equal(host.get_data_page(5 * 64), dummy)
    with pytest.raises(ValueError):
        host.set_from_flat_data_page(0, dummy[:-1])
    ptrs, sizes = host.get_page_buffer_meta(torch.arange(2 * 64, 4 * 64))
    base = host.kv_buffer.data_ptr()
    assert ptrs == [base + 2 * host.row_stride, base + 2 * host.row_stride + pl.k_part_bytes,
                    base + 3 * host.row_stride, base + 3 * host.row_stride + pl.k_part_bytes]
    assert sizes == [pl.k_part_bytes, pl.v_part_bytes] * 2 and pl.k_part_bytes != pl.v_part_bytes
    assert host.get_ksize_per_token() * 64 == pl.k_part_bytes
    assert host.is_stride_page_aligned(4096)


def test_mla_meta_is_one_object_per_page():
    host = quant_host_pool(mla_device_pool(2, 64, tokens=256), QuantConfig(nbits_key=8))
    ptrs, sizes = host.get_page_buffer_meta(torch.arange(64, 192))
    assert len(ptrs) == 2 and sizes == [host.page_layout.page_bytes] * 2
    assert (host.kv_lora_rank, host.qk_rope_head_dim, host.kv_cache_dim) == (512, 64, 576)


def test_residual_tail_pages_load_exact():
    ps = 32
    dev = mha_device_pool(2, 4, 128, ps, tokens=1024)
    host = quant_host_pool(dev, QuantConfig(q_group_size=32, residual_length=40), host_size=0.02)  # 2 tail pages
    assert host.residual is not None and host.residual.tail_pages == 2
    node = _scattered_pages(ps, [1, 2, 3, 4])
    h = host.alloc(4 * ps)
    host.backup_from_device_all_layer(dev, h, node, "kernel")
    quantized = roundtrip_pages(host.page_layout, _device_rows(dev, node))
    exact = _device_rows(dev, node)
    dst = _scattered_pages(ps, [20, 21, 22, 23])
    for layer in range(2):
        host.load_to_device_per_layer(dev, h, dst, layer, "kernel")
    got = _device_rows(dev, dst)
    head, tail = slice(0, 2 * ps), slice(2 * ps, 4 * ps)
    for b in range(2):
        for layer in range(2):
            assert torch.equal(got[b][layer][head], quantized[b][layer][head])
            assert torch.equal(got[b][layer][tail], exact[b][layer][tail])
            assert not torch.equal(got[b][layer][tail], quantized[b][layer][tail])
    # L3 only sees the quantized page
    assert host.get_data_page(h[3 * ps]).numel() == host.page_layout.page_bytes
    # freeing the node drops its tails: a reused page id never loads another node's exact copy
    host.free(h)
    assert not host.residual.slot_of
    other = _scattered_pages(ps, [8, 9])
    h2 = host.alloc(2 * ps)
    host.backup_from_device_all_layer(dev, h2, other, "kernel")
    assert len(host.residual.slot_of) == 2


def test_residual_lru_evicts_oldest():
    ps = 64
    dev = mha_device_pool(2, 4, 128, ps, tokens=1024)
    host = quant_host_pool(dev, QuantConfig(residual_length=1), host_size=0.008)  # room for 3 tails
    cap = host.residual.capacity
    assert 0 < cap < 8
    hs = [host.alloc(ps) for _ in range(cap + 1)]
    for i, h in enumerate(hs):
        host.backup_from_device_all_layer(dev, h, _scattered_pages(ps, [i % 10]), "kernel")
    assert host.kvtq_page_ids(hs[0])[0] not in host.residual.slot_of
    assert all(host.kvtq_page_ids(h)[0] in host.residual.slot_of for h in hs[1:])


def test_start_up_line_is_what_the_benchmark_parses():
    """benchmark/multiturn_arms.py reads capacity, bytes/token, compression and codec from this real line."""
    import logging
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
    import multiturn_arms

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    log = logging.getLogger("kvtuner_hicache.sglang_ext.host_pool")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        host = quant_host_pool(mha_device_pool(2, 4, 128, 64, tokens=256))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    line = next(r for r in records if "host pool:" in r)
    m = multiturn_arms._OUR_POOL.search(line)
    assert m is not None, line
    assert (m[1], int(m[2]), int(m[3]), int(m[4])) == ("kv", host.size, host.page_num, host.size_per_token)
    assert float(m[5]) == pytest.approx(host.compression_vs_bf16, abs=0.01) and m[6] == "reference"
    assert "SGLang " in line and "(era " in line and "a bf16 pool of these bytes holds" in line
