"""Byte layout of one quantized host page (the spec is docs/page-format.md).

A page holds `page_size` tokens of every layer:

    [header 128 B][stream 0: layer 0 .. L-1][stream 1: layer 0 .. L-1]

MHA: stream 0 = K, stream 1 = V. MLA: stream 0 = the rope part of the latent row (key bits),
stream 1 = the compressed latent c_kv (value bits). The header plus stream 0 is the "K part"
and stream 1 the "V part" that zero-copy L3 backends address with two pointers per page.

One chunk = one (stream, layer): packed codes | fp16 scales | fp16 mins (asym only), each
sub-array starting at a multiple of ALIGN bytes. Codes are in natural [token, head, dim]
order, packed little-endian inside each byte (element i of a byte sits at bits i*b).

Header (format 2, docs/page-format.md has the table): layout fields and fingerprint, then two
16-byte identity digests that the storage layer fills right before a page goes to L3 (`seal`):
the model identity (`model_digest`) and the page's storage key (`key_digest`), and last a CRC32C
over the whole page with the CRC field itself skipped. `check_page` / `first_bad_page` verify a
page against the layout, the model and the key it was asked for. Encoders write the header with
both digests and the CRC zero; such an unsealed page only passes `check_page(verify_crc=False)`.
Pure Python plus the `crc32c` package (hardware CRC32C): no torch, no sglang.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kvtuner_hicache.config import AXIS_PER_CHANNEL, KVShape, QuantConfig

FORMAT_VERSION = 2
MAGIC = b"KVTQ"
HEADER_BYTES = 128
ALIGN = 128  # every sub-array starts 128-byte aligned: whole sectors for GPU and PCIe reads
META_BYTES = 2  # fp16 scale / min; see docs/page-format.md for the measured fp16-vs-fp32 choice
# magic, version, header_bytes, page_size, layers, streams, page_bytes, layout fingerprint,
# model digest, key digest; then zero up to the CRC32C in the header's last 4 bytes
_HEADER = struct.Struct("<4sHHIHHQ16s16s16s")
_VERSION = struct.Struct("<4sH")
DIGEST_BYTES = 16
MODEL_DIGEST_OFFSET = 40
KEY_DIGEST_OFFSET = 56
HEADER_CRC_OFFSET = HEADER_BYTES - 4  # CRC32C of bytes [0, 124) and [128, page_bytes)
NO_DIGEST = bytes(DIGEST_BYTES)
assert _HEADER.size == KEY_DIGEST_OFFSET + DIGEST_BYTES <= HEADER_CRC_OFFSET


def _load_crc32c() -> tuple[Any, bool]:
    try:
        import crc32c
    except ImportError as e:  # pragma: no cover - the pin is in scripts/requirements-cpu.txt
        raise ImportError("kvtuner_hicache needs the `crc32c` package (hardware CRC32C) for its L3 page "
                          "checks: pip install crc32c") from e
    return crc32c.crc32c, bool(getattr(crc32c, "hardware_based", False))


_crc32c, CRC32C_HARDWARE = _load_crc32c()  # False: the package's software fallback (~10x slower)


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, continuing from `value`; no copy is made."""
    return _crc32c(data, value)


def key_digest(key: str) -> bytes:
    """16 bytes naming a storage key (the key SGLang asks for, before any namespace suffix)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:DIGEST_BYTES]


def model_digest(identity: str) -> bytes:
    """16 bytes naming the model (and rank slice) a page belongs to; see `storage.model_identity`."""
    return hashlib.sha256(b"kvtq-model\0" + identity.encode("utf-8", "surrogatepass")).digest()[:DIGEST_BYTES]


def page_crc(page: Any) -> int:
    """CRC32C of a whole page except the 4-byte CRC field (`page`: any contiguous bytes-like object)."""
    mv = memoryview(page).cast("B")
    return crc32c(mv[HEADER_BYTES:], crc32c(mv[:HEADER_CRC_OFFSET]))


_CRC_WORKERS = max(1, min(4, os.cpu_count() or 1))  # the crc32c package releases the GIL on large buffers
_crc_pool: ThreadPoolExecutor | None = None
_crc_pool_lock = threading.Lock()


BatchCRC = Callable[[Sequence[memoryview]], list[int]]
_PACKAGE_CRC = "crc32c package, up to 4 threads"
_batch_crc: BatchCRC | None = None
_batch_crc_name = _PACKAGE_CRC


def set_batch_crc(fn: BatchCRC | None, name: str = "") -> None:
    """Compute `page_crcs` with `fn` (same results; the kernel wheel's one-call batch CRC, which runs
    without the GIL: quant/native.py installs it when the kernels load), or with the crc32c package
    again (None). Process-wide: every layout's seal and check goes through it."""
    global _batch_crc, _batch_crc_name
    _batch_crc = fn
    _batch_crc_name = _PACKAGE_CRC if fn is None else (name or getattr(fn, "__qualname__", "custom"))


def batch_crc_name() -> str:
    """Which implementation `page_crcs` uses now (for start-up logs and benchmark records)."""
    return _batch_crc_name


def page_crcs(pages: Sequence[memoryview]) -> list[int]:
    """`page_crc` of each page (contiguous byte views of at least HEADER_BYTES bytes).

    With a batch CRC installed (`set_batch_crc`) one call covers the batch. Otherwise the crc32c
    package: the batch is split into up to 4 contiguous shares, the caller computes the first and
    worker threads the rest (one core runs CRC32C at 7-13 GB/s; a storage batch of 128 KV4 pages is
    130 MB); one task per worker, but still one GIL hand-back per page, and each costs a wait when the
    server's busy scheduler thread holds the GIL (that is why the native batch exists)."""
    n = len(pages)
    if _batch_crc is not None and n >= 2:
        return _batch_crc(pages)
    if n < 2 or _CRC_WORKERS == 1:
        return _share_crcs(pages)
    global _crc_pool
    with _crc_pool_lock:
        if _crc_pool is None:
            _crc_pool = ThreadPoolExecutor(_CRC_WORKERS - 1, thread_name_prefix="kvtq-crc")
    step = -(-n // _CRC_WORKERS)
    shares = [pages[i:i + step] for i in range(0, n, step)]
    futures = [_crc_pool.submit(_share_crcs, share) for share in shares[1:]]
    out = _share_crcs(shares[0])
    for f in futures:
        out += f.result()
    return out


def _share_crcs(pages: Sequence[memoryview]) -> list[int]:
    return [page_crc(p) for p in pages]


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
        """Filename-safe namespace tag for storage keys, e.g. `kvtq2-3f2a...`."""
        return f"kvtq{FORMAT_VERSION}-{self.fingerprint.hex()}"

    def header(self, crc: int = 0, model: bytes = NO_DIGEST, key: bytes = NO_DIGEST) -> bytes:
        """The 128-byte header; encoders write it with both digests and the CRC zero."""
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_BYTES, self.page_size, self.num_layers,
                            len(self.streams), self.page_bytes, self.fingerprint, model, key)
        return head + bytes(HEADER_CRC_OFFSET - len(head)) + struct.pack("<I", crc)

    def seal(self, page: Any, model: bytes, key: bytes) -> int:
        """Bind a page to its model and key and fill its CRC, in place; returns the CRC.

        `page` is a writable, contiguous bytes-like object of `page_bytes` bytes (a numpy view of
        the host page). The layout part of the header is left as the encoder wrote it.
        """
        self.seal_pages([page], model, [key])
        return struct.unpack_from("<I", memoryview(page).cast("B"), HEADER_CRC_OFFSET)[0]

    def seal_pages(self, pages: Sequence[Any], model: bytes, keys: Sequence[bytes]) -> None:
        """`seal` for a batch: the digests page by page, the CRCs in parallel (`page_crcs`)."""
        views = [memoryview(p).cast("B") for p in pages]
        for mv, key in zip(views, keys, strict=True):
            mv[MODEL_DIGEST_OFFSET:MODEL_DIGEST_OFFSET + DIGEST_BYTES] = model
            mv[KEY_DIGEST_OFFSET:KEY_DIGEST_OFFSET + DIGEST_BYTES] = key
        for mv, crc in zip(views, page_crcs(views), strict=True):
            struct.pack_into("<I", mv, HEADER_CRC_OFFSET, crc)

    def check_page(self, page: Any, verify_crc: bool = True, model: bytes | None = None,
                   key: bytes | None = None) -> str | None:
        """None when `page` is a valid page of this layout, else the reason it is not.

        With `verify_crc` the CRC32C over header and payload must match; with `model` / `key`
        the page must have been sealed for that model digest / key digest.
        """
        mv = memoryview(page).cast("B")
        if len(mv) != self.page_bytes:
            return f"size {len(mv)} != {self.page_bytes}"
        return self._check_header(mv, model, key) or (self._check_crc(mv) if verify_crc else None)

    def first_bad_page(self, pages: Sequence[Any], keys: Sequence[bytes], model: bytes) -> tuple[int, str] | None:
        """Check a batch of pages read for `keys` (key digests): (index, reason) of the first bad one.

        The expected header is built once per batch; each page then costs one 124-byte compare (in
        order, up to the first bad header) and one CRC32C pass over its bytes (zero-copy
        memoryviews, the pages of a batch in parallel: `page_crcs`); the first bad page wins.
        """
        template = bytearray(self.header(model=model)[:HEADER_CRC_OFFSET])
        size = self.page_bytes
        k0, k1 = KEY_DIGEST_OFFSET, KEY_DIGEST_OFFSET + DIGEST_BYTES
        views: list[memoryview] = []
        header_bad: tuple[int, str] | None = None
        for i, (page, key) in enumerate(zip(pages, keys, strict=True)):
            mv = memoryview(page).cast("B")
            if len(mv) != size:
                header_bad = (i, f"size {len(mv)} != {size}")
                break
            template[k0:k1] = key
            if mv[:HEADER_CRC_OFFSET] != template:
                header_bad = (i, self._check_header(mv, model, key) or "header corrupt")
                break
            views.append(mv)
        for i, (mv, crc) in enumerate(zip(views, page_crcs(views), strict=True)):
            if crc != struct.unpack_from("<I", mv, HEADER_CRC_OFFSET)[0]:
                return i, "checksum mismatch"
        return header_bad

    def _check_header(self, mv: memoryview, model: bytes | None, key: bytes | None) -> str | None:
        magic, ver = _VERSION.unpack_from(mv, 0)
        if magic != MAGIC:
            return "bad magic"
        if ver != FORMAT_VERSION:
            return f"page format {ver}, expected {FORMAT_VERSION}"
        _, _, hb, ps, nl, ns, pb, fp, md, kd = _HEADER.unpack_from(mv, 0)
        if (hb, ps, nl, ns, pb) != (HEADER_BYTES, self.page_size, self.num_layers, len(self.streams), self.page_bytes):
            return "header describes another format"
        if fp != self.fingerprint:
            return "written by another quantization config"
        if model is not None and md != model:
            return "written by another model or rank"
        if key is not None and kd != key:
            return "stored under another key"
        if any(mv[_HEADER.size:HEADER_CRC_OFFSET]):
            return "header corrupt (reserved bytes)"
        return None

    @staticmethod
    def _check_crc(mv: memoryview) -> str | None:
        (stored,) = struct.unpack_from("<I", mv, HEADER_CRC_OFFSET)
        return None if page_crc(mv) == stored else "checksum mismatch"

    def describe(self) -> str:
        return (f"{self.cfg.short_name()} page_size={self.page_size}: {self.page_bytes} B/page, "
                f"{self.bytes_per_token:.1f} B/token, {self.effective_bits:.3f} bits/element, "
                f"{self.compression_vs_bf16:.2f}x vs bf16")


def layout_for(cfg: QuantConfig, shape: KVShape, page_size: int) -> PageLayout:
    return PageLayout(cfg, shape, page_size)


__all__ = ["AXIS_PER_CHANNEL", "ALIGN", "ChunkSpec", "FORMAT_VERSION", "HEADER_BYTES", "HEADER_CRC_OFFSET", "NO_DIGEST",
           "PageLayout", "StreamSpec", "crc32c", "key_digest", "layout_for", "model_digest", "page_crc", "page_crcs",
           "batch_crc_name", "set_batch_crc"]
