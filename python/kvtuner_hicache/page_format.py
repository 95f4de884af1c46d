"""Byte layout of one quantized host page (the spec is docs/page-format.md).

A page holds `page_size` tokens of every layer:

    [header 128 B][stream 0: layer 0 .. L-1][stream 1: layer 0 .. L-1]

MHA: stream 0 = K, stream 1 = V. MLA: stream 0 = the rope part of the latent row (key bits),
stream 1 = the compressed latent c_kv (value bits). The header plus stream 0 is the "K part"
and stream 1 the "V part" that zero-copy L3 backends address with two pointers per page.

One chunk = one (stream, layer): packed codes | fp16 scales | fp16 mins (asym only), each
sub-array starting at a multiple of ALIGN bytes. Codes are in natural [token, head, dim]
order, packed little-endian inside each byte (element i of a byte sits at bits i*b).
Pure Python: no torch, no sglang.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

from kvtuner_hicache.config import AXIS_PER_CHANNEL, KVShape, QuantConfig

FORMAT_VERSION = 1
MAGIC = b"KVTQ"
HEADER_BYTES = 128
ALIGN = 128  # every sub-array starts 128-byte aligned: whole sectors for GPU and PCIe reads
META_BYTES = 2  # fp16 scale / min; see docs/page-format.md for the measured fp16-vs-fp32 choice
_HEADER = struct.Struct("<4sHHHHHI16sI")  # magic, version, header_bytes, page_size, layers, streams, page_bytes, fp, crc
HEADER_CRC_OFFSET = _HEADER.size - 4


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class StreamSpec:
    """One quantized tensor per layer, read from a device buffer's column range."""

    name: str
    buffer: int  # 0: device k_buffer (MLA: kv_buffer), 1: device v_buffer
    heads: int
    dim: int
    col_offset: int  # first column inside the device row's last dimension
    axis: int


@dataclass(frozen=True)
class ChunkSpec:
    """Where one (stream, layer) lives inside a page and how it is quantized."""

    stream: int
    layer: int
    bits: int
    axis: int
    group: int
    asym: bool
    page_size: int
    heads: int
    dim: int
    offset: int  # byte offset of the chunk inside the page
    codes_bytes: int
    num_groups: int
    scale_offset: int  # relative to `offset`
    min_offset: int  # relative to `offset`; -1 when symmetric
    nbytes: int  # aligned size of the whole chunk

    @property
    def elements(self) -> int:
        return self.page_size * self.heads * self.dim


def chunk_geometry(bits: int, axis: int, group: int, asym: bool, page_size: int, heads: int, dim: int) -> tuple[int, int, int, int, int]:
    """(codes_bytes, num_groups, scale_offset, min_offset, nbytes) of one chunk."""
    elements = page_size * heads * dim
    codes_bytes = elements * bits // 8
    num_groups = elements // group
    scale_offset = _align(codes_bytes)
    meta = _align(num_groups * META_BYTES)
    min_offset = scale_offset + meta if asym else -1
    nbytes = scale_offset + meta * (2 if asym else 1)
    return codes_bytes, num_groups, scale_offset, min_offset, nbytes


class PageLayout:
    """The byte map of one page for a (config, model shape, page size) triple."""

    def __init__(self, cfg: QuantConfig, shape: KVShape, page_size: int, start_layer: int = 0,
                 total_layers: int | None = 0):
        # shape.num_layers are this rank's layers; a per-layer table covers the whole model.
        # total_layers: 0 = this rank holds the whole model; None = a pipeline stage of unknown depth.
        cfg.validate_for(shape, page_size, total_layers=total_layers, start_layer=start_layer)
        self.cfg = cfg
        self.shape = shape
        self.page_size = page_size
        self.start_layer = start_layer  # global index of local layer 0 (pipeline parallelism)
        self.num_layers = shape.num_layers
        if shape.is_mla:
            self.streams = (
                StreamSpec("rope", 0, 1, shape.qk_rope_head_dim, shape.kv_lora_rank, cfg.axis_key),
                StreamSpec("latent", 0, 1, shape.kv_lora_rank, 0, cfg.axis_value),
            )
        else:
            self.streams = (
                StreamSpec("k", 0, shape.heads, shape.head_dim, 0, cfg.axis_key),
                StreamSpec("v", 1, shape.heads, shape.v_head_dim, 0, cfg.axis_value),
            )
        chunks: dict[tuple[int, int], ChunkSpec] = {}
        offset = HEADER_BYTES
        part_ends = []
        for s, st in enumerate(self.streams):
            for layer in range(self.num_layers):
                lb = cfg.bits_for_layer(start_layer + layer)
                bits = lb.key if s == 0 else lb.value
                cb, ng, so, mo, nb = chunk_geometry(bits, st.axis, cfg.q_group_size, cfg.asym, page_size, st.heads, st.dim)
                chunks[(s, layer)] = ChunkSpec(s, layer, bits, st.axis, cfg.q_group_size, cfg.asym, page_size, st.heads, st.dim, offset, cb, ng, so, mo, nb)
                offset += nb
            part_ends.append(offset)
        self.chunks = chunks
        self.page_bytes = offset
        self.k_part_bytes = part_ends[0]  # header + stream 0
        self.v_part_bytes = part_ends[1] - part_ends[0]

    def chunk(self, stream: int, layer: int) -> ChunkSpec:
        return self.chunks[(stream, layer)]

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> float:
        return self.page_bytes / self.page_size

    @property
    def elements_per_token(self) -> int:
        return sum(st.heads * st.dim for st in self.streams) * self.num_layers

    @property
    def effective_bits(self) -> float:
        """Bits per KV element, everything in the page counted (codes, metadata, padding, header)."""
        return self.bytes_per_token * 8 / self.elements_per_token

    @property
    def compression_vs_bf16(self) -> float:
        return self.shape.bf16_bytes_per_token() / self.bytes_per_token

    # ---- identity and header ---------------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> bytes:
        """16 bytes naming everything that shapes the page's bytes."""
        desc = {
            "format": FORMAT_VERSION,
            "page_size": self.page_size,
            "asym": self.cfg.asym,
            "group": self.cfg.q_group_size,
            "streams": [[st.name, st.heads, st.dim, st.axis] for st in self.streams],
            "bits": [[self.chunks[(s, i)].bits for i in range(self.num_layers)] for s in range(len(self.streams))],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).digest()[:16]

    @property
    def tag(self) -> str:
        """Filename-safe namespace tag for storage keys, e.g. `kvtq1-3f2a...`."""
        return f"kvtq{FORMAT_VERSION}-{self.fingerprint.hex()}"

    def header(self, crc: int = 0) -> bytes:
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_BYTES, self.page_size, self.num_layers,
                            len(self.streams), self.page_bytes, self.fingerprint, crc)
        return head + bytes(HEADER_BYTES - len(head))

    @staticmethod
    def payload_crc(page: memoryview | bytes) -> int:
        """CRC32 of everything after the header; stored in the header by the storage layer."""
        return zlib.crc32(memoryview(page)[HEADER_BYTES:])

    def check_page(self, page: memoryview | bytes, verify_crc: bool = True) -> str | None:
        """None when `page` is a valid page of this layout, else the reason it is not."""
        page = memoryview(page).cast("B")
        if len(page) != self.page_bytes:
            return f"size {len(page)} != {self.page_bytes}"
        magic, ver, hb, ps, nl, ns, pb, fp, crc = _HEADER.unpack_from(page, 0)
        if magic != MAGIC:
            return "bad magic"
        if (ver, hb, ps, nl, ns, pb) != (FORMAT_VERSION, HEADER_BYTES, self.page_size, self.num_layers, len(self.streams), self.page_bytes):
            return "header describes another format"
        if fp != self.fingerprint:
            return "written by another quantization config"
        if verify_crc and crc != self.payload_crc(page):
            return "payload checksum mismatch"
        return None

    def describe(self) -> str:
        return (f"{self.cfg.short_name()} page_size={self.page_size}: {self.page_bytes} B/page, "
                f"{self.bytes_per_token:.1f} B/token, {self.effective_bits:.3f} bits/element, "
                f"{self.compression_vs_bf16:.2f}x vs bf16")


def layout_for(cfg: QuantConfig, shape: KVShape, page_size: int) -> PageLayout:
    return PageLayout(cfg, shape, page_size)


__all__ = ["AXIS_PER_CHANNEL", "ALIGN", "ChunkSpec", "FORMAT_VERSION", "HEADER_BYTES", "PageLayout", "StreamSpec", "layout_for"]
