"""Tensor parallelism without GPUs: two ranks' pools built on CPU from real SGLang classes, as TP=2 builds them.

MHA/GQA: each rank holds its own KV heads, so its pages cover only those heads; quantization groups never
cross a head, so a rank's dequantized KV equals the TP=1 dequantized KV of its heads (pages stay
head-splittable), both ranks agree on the token capacity, and their L3 keys differ (SGLang's file backend
suffixes `_<rank>_<size>`). MLA: every rank holds the full latent, quantizes it bit-identically, and a
page written by rank 0 (the one writer) is accepted by rank 1 under the same key.
"""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import QuantConfig, load_layer_bits
from kvtuner_hicache.page_format import HEADER_BYTES
from kvtuner_hicache.quant import roundtrip_pages
from l3_rig import file_proxy, storage_config
from sglang_pools import mha_device_pool, mla_device_pool, quant_host_pool

pytestmark = pytest.mark.sglang
PS = 64
LAYERS, HEADS, DIM = 3, 4, 128


def _split_heads(full, rank: int, tp: int):
    """Rank `rank`'s device pool under TP=`tp`: its slice of the KV heads, same tokens."""
    per = HEADS // tp
    dev = mha_device_pool(LAYERS, per, DIM, PS, tokens=full.size)
    for dst, src in zip(dev.k_buffer + dev.v_buffer, full.k_buffer + full.v_buffer, strict=True):
        dst.copy_(src[:, rank * per : (rank + 1) * per])
    return dev


CONFIGS = {
    "default K4cV4t": QuantConfig(),
    "per-token K4tV2t g64": QuantConfig(axis_key=0, axis_value=0, nbits_value=2),
    "symmetric K8cV4t g32": QuantConfig(nbits_key=8, asym=False, q_group_size=32),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mha_rank_pages_hold_their_heads_and_match_tp1(name):
    cfg = CONFIGS[name]
    full = mha_device_pool(LAYERS, HEADS, DIM, PS, tokens=8 * PS, seed=3)
    rows = torch.arange(2 * PS, 4 * PS)
    tp1 = quant_host_pool(full, cfg)
    want = roundtrip_pages(tp1.page_layout, [[b[rows] for b in full.k_buffer], [b[rows] for b in full.v_buffer]])
    ranks = [quant_host_pool(_split_heads(full, r, 2), cfg) for r in range(2)]
    assert ranks[0].page_layout.page_bytes == ranks[1].page_layout.page_bytes < tp1.page_layout.page_bytes
    assert ranks[0].size == ranks[1].size  # capacity agrees across ranks (same bytes per rank and token)
    assert ranks[0].page_layout.tag == ranks[1].page_layout.tag != tp1.page_layout.tag  # heads are in the format
    per = HEADS // 2
    for r, host in enumerate(ranks):
        dev = host.device_pool
        h = host.alloc(2 * PS)
        host.backup_from_device_all_layer(dev, h, rows, "kernel")
        dst = torch.arange(5 * PS, 7 * PS)
        for layer in range(LAYERS):
            host.load_to_device_per_layer(dev, h, dst, layer, "kernel")
        for b, bufs in enumerate((dev.k_buffer, dev.v_buffer)):
            for layer in range(LAYERS):
                assert torch.equal(bufs[layer][dst], want[b][layer][:, r * per : (r + 1) * per]), (r, b, layer)


def test_per_layer_table_applies_to_every_rank_alike(mixed_table):
    cfg = QuantConfig(layer_bits=load_layer_bits(mixed_table))
    full = mha_device_pool(28, 2, 64, PS, tokens=2 * PS)
    per_rank = [quant_host_pool(mha_device_pool(28, 1, 64, PS, tokens=2 * PS), cfg) for _ in range(2)]
    bits = [[(h.page_layout.chunk(0, i).bits, h.page_layout.chunk(1, i).bits) for i in range(28)] for h in per_rank]
    assert bits[0] == bits[1] == [(cfg.layer_bits[i].key, cfg.layer_bits[i].value) for i in range(28)]
    assert quant_host_pool(full, cfg).page_layout.chunk(0, 0).bits == bits[0][0][0]


def test_mha_ranks_write_their_own_l3_keys(tmp_path):
    full = mha_device_pool(LAYERS, HEADS, DIM, PS, tokens=4 * PS, seed=5)
    hosts, proxies = [], []
    for r in range(2):
        host = quant_host_pool(_split_heads(full, r, 2))
        h = host.alloc(PS)
        host.backup_from_device_all_layer(host.device_pool, h, torch.arange(PS, 2 * PS), "kernel")
        proxy = file_proxy(host, tmp_path)
        proxy.inner = type(proxy.inner)(storage_config(tp_rank=r, tp_size=2))  # each rank's own HiCacheFile
        hosts.append((host, h))
        proxies.append(proxy)
    assert proxies[0].batch_set(["prefix-0"], [hosts[0][0].get_data_page(hosts[0][1][0])])
    assert proxies[0].batch_exists(["prefix-0"]) == 1
    assert proxies[1].batch_exists(["prefix-0"]) == 0  # rank 1 never sees rank 0's heads
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and "_0_2" in files[0]


def test_mla_pages_are_bit_identical_across_ranks_and_shared(tmp_path):
    cfg = QuantConfig(nbits_key=8)
    # every TP rank holds the same latent rows (MLA is replicated): same seed, two device pools
    devs = [mla_device_pool(2, PS, tokens=4 * PS, seed=9) for _ in range(2)]
    hosts = [quant_host_pool(d, cfg) for d in devs]
    pages = []
    for host, dev in zip(hosts, devs, strict=True):
        h = host.alloc(2 * PS)
        host.backup_from_device_all_layer(dev, h, torch.arange(PS, 3 * PS), "kernel")
        pages.append([host.get_data_page(h[i * PS]).clone() for i in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(pages[0], pages[1], strict=True))
    # rank 0 writes, rank 1 reads the same key: MLA keys carry no TP rank, and the page is accepted
    writer = file_proxy(hosts[0], tmp_path, mla=True)
    writer.inner = type(writer.inner)(storage_config(mla=True, tp_rank=0, tp_size=2))
    reader = file_proxy(hosts[1], tmp_path, mla=True)
    reader.inner = type(reader.inner)(storage_config(mla=True, tp_rank=1, tp_size=2))
    assert writer.batch_set(["p0", "p1"], pages[0])
    assert reader.batch_exists(["p0", "p1"]) == 2
    got = reader.batch_get(["p0", "p1"], [hosts[1].get_dummy_flat_data_page() for _ in range(2)])
    # the writer sealed its pages (key and model digests, CRC in the header); the payload is rank 1's own
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, pages[0], strict=True))
    assert all(torch.equal(g[HEADER_BYTES:], p[HEADER_BYTES:]) for g, p in zip(got, pages[1], strict=True))
