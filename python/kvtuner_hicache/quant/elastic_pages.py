"""Refinement planes of elastic pages (issue 15): the bits above the floor, per stream, as bytes.

The floor page of an elastic pool is a fixed page of the floor config, byte for byte (page format 2,
docs/page-format.md). For every b-bit asymmetric chunk of that page with b in (2, 4), the *refinement
plane* of its stream holds a b-bit code r per element (`elastic.quantize_embedded`: the residual of
the b-bit code c cut into 2^b cells), so that c and r together decode as a 2b-bit-class value
`m + s * (c + (2r + 1 - 2^b) / 2^(b+1))` (max error s / 2^(b+1): 1/480 of the group range at 4+4 against
1/510 for a direct 8-bit code, 1/24 at 2+2 against 1/30 for a direct 4-bit code), and c alone is the
fixed b-bit page, bit for bit. Dropping a plane is the whole demotion: no re-encode, no GPU work, no
bytes written; what is left is exactly the fixed page.

Plane layout (`PLANE_LAYOUT_VERSION`): one plane per stream, the stream's refinable chunks in layer
order, each `elements * b / 8` bytes of r packed like the chunk's codes (same element order, same
b-bit packing), each starting 128-byte aligned. A page header never carries a plane; in L3 a plane is
an object of its own whose header records this version (`kvtuner_hicache/elastic_l3.py`).

8-bit and 3-bit chunks have no plane (their stream's pages keep one precision there). Symmetric configs have no
planes (the embedded code is asymmetric); the config layer rejects `--kvtuner-hicache-elastic` for them.

Pure torch, no sglang: the reference for a native elastic decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtuner_hicache.page_format import ALIGN, ChunkSpec, PageLayout
from kvtuner_hicache.quant.elastic import dequantize_embedded, quantize_embedded
from kvtuner_hicache.quant.reference import (
    decode_layer,
    encode_pages,
    from_groups,
    pack_codes,
    to_groups,
    unpack_codes,
)

PLANE_LAYOUT_VERSION = 1
# floor bits of a chunk -> bits of its refinement: the top doubles the code bits (4 -> 8, 2 -> 4);
# 8-bit chunks have no plane
REFINE_BITS: dict[int, int] = {4: 4, 2: 2}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class RefinementChunk:
    layer: int
    spec: ChunkSpec
    offset: int  # byte offset of this layer's r codes inside the stream's plane
    refine_bits: int  # bits of r; the top decodes as spec.bits + refine_bits

    @property
    def nbytes(self) -> int:
        return self.spec.elements * self.refine_bits // 8


class RefinementLayout:
    """Where each (stream, layer) refinement lives inside its stream's plane, for one page layout."""

    def __init__(self, layout: PageLayout):
        self.layout = layout
        self.chunks: dict[int, list[RefinementChunk]] = {}
        self.plane_bytes: dict[int, int] = {}
        for s in range(len(layout.streams)):
            off, mine = 0, []
            for layer in range(layout.num_layers):
                spec = layout.chunk(s, layer)
                if spec.bits in REFINE_BITS and spec.asym:
                    c = RefinementChunk(layer, spec, off, REFINE_BITS[spec.bits])
                    mine.append(c)
                    off += _align(c.nbytes)
            if mine:
                self.chunks[s] = mine
                self.plane_bytes[s] = off
        self._by_layer = {(s, c.layer): c for s, cs in self.chunks.items() for c in cs}

    @property
    def streams(self) -> tuple[int, ...]:
        """Streams with at least one elastic chunk (0 = keys / MLA rope, 1 = values / latent)."""
        return tuple(sorted(self.chunks))

    def chunk(self, stream: int, layer: int) -> RefinementChunk | None:
        return self._by_layer.get((stream, layer))

    def top_bits_per_element(self, streams_with_plane: Sequence[int]) -> float:
        """Mean code bits per element of a page holding the planes of `streams_with_plane`."""
        total = bits = 0
        for s in range(len(self.layout.streams)):
            for layer in range(self.layout.num_layers):
                spec = self.layout.chunk(s, layer)
                c = self.chunk(s, layer)
                extra = c.refine_bits if s in streams_with_plane and c is not None else 0
                total += spec.elements
                bits += spec.elements * (spec.bits + extra)
        return bits / total


def encode_planes(rl: RefinementLayout, stream: int, buffers: Sequence[Sequence[torch.Tensor]],
                  token_index: torch.Tensor) -> torch.Tensor:
    """The refinement plane of `stream` for whole pages gathered from device buffers `buffers[b][layer]`
    at rows `token_index` (as reference.encode_pages reads them). Returns uint8 [P, plane_bytes]."""
    layout = rl.layout
    ps = layout.page_size
    p = token_index.numel() // ps
    st = layout.streams[stream]
    idx = token_index.to(buffers[0][0].device)
    out = torch.zeros(p, rl.plane_bytes[stream], dtype=torch.uint8)
    for c in rl.chunks[stream]:
        spec = c.spec
        x = buffers[st.buffer][c.layer][idx][..., st.col_offset : st.col_offset + st.dim]
        shape = (p, ps, st.heads, st.dim)
        _, r, _, _ = quantize_embedded(to_groups(x.reshape(shape), spec.axis, spec.group), spec.bits, c.refine_bits)
        r = from_groups(r, spec.axis, shape).reshape(p, spec.elements)
        out[:, c.offset : c.offset + c.nbytes] = pack_codes(r, c.refine_bits).cpu()
    return out


def decode_chunk_top(raw: torch.Tensor, plane: torch.Tensor, c: RefinementChunk) -> torch.Tensor:
    """Floor chunk bytes uint8 [P, nbytes] plus the stream's plane bytes uint8 [P, plane_bytes] ->
    fp32 [P, page_size, H, D] at the top precision (elastic.dequantize_embedded)."""
    spec = c.spec
    p = raw.shape[0]
    shape = (p, spec.page_size, spec.heads, spec.dim)
    codes = unpack_codes(raw[:, : spec.codes_bytes], spec.bits).reshape(shape)
    r = unpack_codes(plane[:, c.offset : c.offset + c.nbytes], c.refine_bits).reshape(shape)
    meta = spec.num_groups * 2
    scale = raw[:, spec.scale_offset : spec.scale_offset + meta].contiguous().view(torch.float16)
    mn = raw[:, spec.min_offset : spec.min_offset + meta].contiguous().view(torch.float16)
    x = dequantize_embedded(to_groups(codes, spec.axis, spec.group), to_groups(r, spec.axis, spec.group),
                            scale, mn, c.refine_bits)
    return from_groups(x, spec.axis, shape)


def load_top(layout: PageLayout, c: RefinementChunk, raw: torch.Tensor, planes: torch.Tensor,
             buffer: torch.Tensor, rows: torch.Tensor) -> None:
    """Overwrite device `rows` of one layer's `buffer` with the top decode of chunk `c`, given its floor
    bytes `raw` (uint8 [P, nbytes]) and its stream's planes (uint8 [P, >= plane bytes]): what an elastic
    pool's per-layer load adds after the floor decode."""
    st = layout.streams[c.spec.stream]
    x = decode_chunk_top(raw, planes, c).reshape(-1, st.heads, st.dim)
    buffer[rows.to(buffer.device), :, st.col_offset : st.col_offset + st.dim] = x.to(buffer.dtype)


def roundtrip_top(layout: PageLayout, layer_kv: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """reference.roundtrip_pages for an elastic page at the top: every page holds every refinement plane,
    loaded as the pool loads it (floor decode, then `load_top`). layer_kv[b][layer]: [tokens, H, D_total],
    tokens whole pages; returns new tensors of the same shape."""
    rl = RefinementLayout(layout)
    tokens = layer_kv[0][0].shape[0]
    idx = torch.arange(tokens, device=layer_kv[0][0].device)
    pages = torch.empty(tokens // layout.page_size, layout.page_bytes, dtype=torch.uint8)
    encode_pages(layout, layer_kv, idx, pages)
    planes = {s: encode_planes(rl, s, layer_kv, idx) for s in rl.streams}
    out = [[t.clone() for t in per_layer] for per_layer in layer_kv]
    pid = torch.arange(pages.shape[0])
    for layer in range(layout.num_layers):
        bufs = [out[b][layer] for b in range(len(out))]
        decode_layer(layout, layer, pages, pid, bufs, idx)
        for s in rl.streams:
            c = rl.chunk(s, layer)
            if c is not None:
                raw = pages[:, c.spec.offset : c.spec.offset + c.spec.nbytes]
                load_top(layout, c, raw, planes[s], bufs[layout.streams[s].buffer], idx)
    return out


__all__ = ["PLANE_LAYOUT_VERSION", "REFINE_BITS", "RefinementChunk", "RefinementLayout",
           "decode_chunk_top", "encode_planes", "load_top", "roundtrip_top"]
