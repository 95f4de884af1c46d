"""Staged loads' layout arithmetic (quant/staged_load.StagedGeometry), checked on the CPU by doing the copies.

The GPU path copies `copies[g]` rows of every page into a staging row and decodes each layer at
`offsets[layer]`; here the same copies are done with tensors, and every chunk of every layer must then sit in
its group's staging row byte for byte, 128-byte aligned, inside `pitch`. The decode itself is the kernel's
(tested bit-exact on the GPU in test/gpu/test_native_staged.py).
"""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig
from kvtuner_hicache.page_format import ALIGN, PageLayout
from kvtuner_hicache.quant.staged_load import StagedGeometry

LAYOUTS = {
    "KV4": (QuantConfig(), KVShape.mha(28, 4, 128), 64),
    "mixed": (QuantConfig(layer_bits={i: LayerBits(*[(8, 4), (2, 2), (4, 8), (4, 4), (8, 8)][i % 5]) for i in range(7)}),
              KVShape.mha(7, 2, 128), 64),
    "K and V dims differ": (QuantConfig(nbits_key=8, nbits_value=2, axis_key=0), KVShape.mha(5, 2, 64, 128), 32),
    "MLA": (QuantConfig(nbits_key=8, nbits_value=4), KVShape.mla(6), 64),
}


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 40])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_copies_put_every_chunk_at_its_staged_offset(name, group):
    cfg, shape, ps = LAYOUTS[name]
    lay = PageLayout(cfg, shape, ps)
    geo = StagedGeometry(lay, group)
    assert [layer for a, b in geo.groups for layer in range(a, b)] == list(range(lay.num_layers))
    assert all(b - a <= group for a, b in geo.groups)
    page = torch.randint(0, 256, (lay.page_bytes,), dtype=torch.uint8)
    for g, (a, b) in enumerate(geo.groups):
        row = torch.zeros(geo.pitch, dtype=torch.uint8)
        for src, nbytes, dst in geo.copies[g]:
            assert dst % ALIGN == 0 and dst + nbytes <= geo.pitch
            row[dst:dst + nbytes] = page[src:src + nbytes]
        for layer in range(a, b):
            assert geo.group_of[layer] == g
            for s in range(len(lay.streams)):
                c = lay.chunk(s, layer)
                off = geo.offsets[layer][s]
                assert off % ALIGN == 0  # the kernel reads 16-byte words
                assert torch.equal(row[off:off + c.nbytes], page[c.offset:c.offset + c.nbytes]), (layer, s)


def test_pitch_is_the_largest_group():
    lay = PageLayout(QuantConfig(), KVShape.mha(28, 4, 128), 64)
    per_layer = lay.chunk(0, 0).nbytes + lay.chunk(1, 0).nbytes
    assert StagedGeometry(lay, 4).pitch == 4 * per_layer
    assert StagedGeometry(lay, 5).pitch == 5 * per_layer  # 28 = 5 * 5 + 3: the last group is smaller
    assert len(StagedGeometry(lay, 5).groups) == 6


@pytest.mark.parametrize("group", [1, 2, 3, 5])
@pytest.mark.parametrize("cfg", [QuantConfig(elastic=True), QuantConfig(nbits_key=8, nbits_value=4, elastic=True),
                                 QuantConfig(layer_bits={i: LayerBits(*[(8, 8), (4, 2), (2, 4), (8, 4), (4, 4)][i])
                                                         for i in range(5)}, elastic=True)],
                         ids=["KV4", "K8V4", "table"])
def test_plane_copies_put_every_refinement_at_its_staged_offset(cfg, group):
    """Elastic pools: a staging row also takes the group's refinement codes of each stream, after the page's
    chunks, without overlapping them; every layer's codes land where `plane_offsets` says."""
    from kvtuner_hicache.quant.elastic_pages import RefinementLayout

    lay = PageLayout(cfg, KVShape.mha(5, 2, 128), 64)
    rl = RefinementLayout(lay)
    geo = StagedGeometry(lay, group, rl)
    planes = {s: torch.randint(0, 256, (n,), dtype=torch.uint8) for s, n in rl.plane_bytes.items()}
    for g, (a, b) in enumerate(geo.groups):
        row = torch.zeros(geo.pitch, dtype=torch.uint8)
        used = torch.zeros(geo.pitch, dtype=torch.bool)
        for _, nbytes, dst in geo.copies[g]:
            used[dst:dst + nbytes] = True
        for s, (src, nbytes, dst) in enumerate(geo.plane_copies[g]):
            if nbytes == 0:
                assert all(rl.chunk(s, layer) is None for layer in range(a, b))
                continue
            assert dst % ALIGN == 0 and dst + nbytes <= geo.pitch and not used[dst:dst + nbytes].any()
            used[dst:dst + nbytes] = True
            row[dst:dst + nbytes] = planes[s][src:src + nbytes]
        for layer in range(a, b):
            for s in range(2):
                c = rl.chunk(s, layer)
                if c is None:
                    continue
                off = geo.plane_offsets[layer][s]
                assert off % ALIGN == 0
                assert torch.equal(row[off:off + c.nbytes], planes[s][c.offset:c.offset + c.nbytes]), (layer, s)
    fixed = StagedGeometry(lay, group)  # fixed pools reserve nothing for planes
    assert all(nbytes == 0 for rows in fixed.plane_copies for _, nbytes, _ in rows) and fixed.pitch <= geo.pitch
