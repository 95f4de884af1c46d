"""L3 objects of elastic refinement planes (issue 15): a page's planes stored beside its floor page.

An elastic page written to L3 stores its floor page as every fixed page of the floor config does (same
key, same namespace, page format 2) and, for each stream whose plane it holds at that moment, one more
object under `<key>.r<stream>` in the same namespace: a 128-byte header and the plane bytes
(`quant/elastic_pages.py`, plane layout v1). A reader that finds the floor page valid may fetch the
plane objects too; a missing or bad plane object only means that page enters L2 at its floor.

Plane object header (little-endian):

| offset | bytes | field |
| ---: | ---: | --- |
| 0 | 8 | magic `KVTQPLN1` |
| 8 | 1 | plane layout version (`PLANE_LAYOUT_VERSION`) |
| 9 | 1 | stream (0 keys, 1 values) |
| 12 | 4 | payload bytes |
| 16 | 16 | layout digest: sha256 of the page layout's namespace tag (format and fingerprint) |
| 32 | 16 | model digest (`page_format.model_digest`) |
| 48 | 16 | digest of the page's key (`page_format.key_digest`, the key before any suffix) |
| 124 | 4 | CRC32C of bytes [0, 124) and the payload |

Pure Python and torch, no sglang.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from kvtuner_hicache.page_format import DIGEST_BYTES, HEADER_BYTES, crc32c
from kvtuner_hicache.quant.elastic_pages import PLANE_LAYOUT_VERSION

MAGIC = b"KVTQPLN1"
_CRC_AT = HEADER_BYTES - 4


def plane_key(key: str, stream: int) -> str:
    """The storage key of `key`'s refinement plane of `stream` (the proxy adds its namespace suffix)."""
    return f"{key}.r{stream}"


def layout_digest(tag: str) -> bytes:
    return hashlib.sha256(b"kvtq-plane-layout\0" + tag.encode()).digest()[:DIGEST_BYTES]


def _header(stream: int, payload: int, layout: bytes, model: bytes, key: bytes) -> bytes:
    head = MAGIC + struct.pack("<BBxxI", PLANE_LAYOUT_VERSION, stream, payload) + layout + model + key
    return head + bytes(_CRC_AT - len(head))


def seal(obj: Any, stream: int, layout: bytes, model: bytes, key: bytes) -> None:
    """Fill the header of a plane object in place (`obj`: writable bytes of HEADER_BYTES + payload)."""
    mv = memoryview(obj).cast("B")
    mv[:_CRC_AT] = _header(stream, len(mv) - HEADER_BYTES, layout, model, key)
    crc = crc32c(mv[HEADER_BYTES:], crc32c(mv[:_CRC_AT]))
    mv[_CRC_AT:HEADER_BYTES] = struct.pack("<I", crc)


def problem(obj: Any, stream: int, layout: bytes, model: bytes, key: bytes) -> str | None:
    """Why a plane object read back for (`key`, `stream`) must not be used, or None when it is good."""
    mv = memoryview(obj).cast("B")
    if len(mv) <= HEADER_BYTES:
        return f"{len(mv)} bytes"
    want = _header(stream, len(mv) - HEADER_BYTES, layout, model, key)
    if bytes(mv[:_CRC_AT]) != want:
        got = bytes(mv[:8])
        return "not a plane object" if got != MAGIC else "header (version, stream, size, layout, model or key) differs"
    crc = crc32c(mv[HEADER_BYTES:], crc32c(mv[:_CRC_AT]))
    if struct.unpack("<I", bytes(mv[_CRC_AT:HEADER_BYTES]))[0] != crc:
        return "CRC32C mismatch"
    return None


__all__ = ["HEADER_BYTES", "MAGIC", "layout_digest", "plane_key", "problem", "seal"]
