"""Precision-elastic codes (issue 15): code planes that let a host page give up bits without re-encoding.

A page enters L2 quantized at its *source* precision B (8, or the per-layer table's upper bits) by the
reference quantizer, unchanged (same codes, same fp16 scale/min per group). Its B-bit unsigned codes are
then cut into **code planes, most significant first**; plane p holds bits [B - w_0 - ... - w_p, ...) of
every code, packed exactly like a w_p-bit code array of the page format (little-endian in a byte,
element i at bit (i * w_p) % 8 of byte i * w_p / 8). Default split:

    B = 8:  widths (2, 2, 4)   plane 0 = bits 7..6, plane 1 = bits 5..4, plane 2 = bits 3..0
    B = 4:  widths (2, 2)      plane 0 = bits 3..2, plane 1 = bits 1..0

so the prefixes are exactly the ladder 8 -> 4 -> 2 of the issue: any prefix of the planes is the
truncated code c_b = u_B >> (B - b), and a demotion to b bits is dropping (freeing) the planes after
the prefix whose widths sum to b. Nothing is re-encoded, the group metadata never changes, nothing
crosses PCIe, no GPU work. (1-bit planes, `widths=(1,) * B`, are supported as well; docs/elastic.md
says why they are not the default.)

Decoding a truncated code at the midpoint of the interval of B-bit codes it stands for
(k = B - b, h = (2^k - 1) / 2, s and m the group's stored fp16 scale and min of the B-bit encode):

    asym:  x^ = c_b * (s * 2^k) + (m + s * h)
    sym:   x^ = (c_b - 2^(b-1)) * (s * 2^k) + s * h

In fp32: s * 2^k and s * h are exact (an fp16 times a power of two, resp. times 1.5 / 7.5 / 31.5),
and c_b * (s * 2^k) is exact; so asym costs two roundings (m + s*h, then the add) and sym one, with no
fused multiply-add: a kernel reproduces it bit for bit with __fadd_rn / __fmul_rn. At k = 0 both
formulas are the reference's dequantize_groups, bit for bit.

**Error bound** (proved in docs/elastic.md, tested in test/test_elastic.py). The B-bit encode leaves
every sanitized element within s/2 of its grid point u_B * s + m (reference.py); the truncated code
covers 2^k consecutive grid points whose midpoint is the decode, so

    |x - x^| <= 2^(k-1) * s            (+ fp32 rounding; k >= 1; s = the stored B-bit scale)

Asym 8 -> 4: 8 s = 8/255 of the group range (fp16-rounded outward), against s_4 / 2 = 8.5/255 for a
direct 4-bit encode; 8 -> 2: 32/255 against 42.5/255; 4 -> 2 (source 4-bit): 2 s_4 = 34/255 against
42.5/255. Sym (of max|x|): 8 -> 4: 8/127 against 1/14 = 9.07/127; 8 -> 2: 32/127 against 1/2;
4 -> 2: 2/7 against 1/2. With the stored metadata: both encodes share m = f16_round_down(min), and
2^k / (2^B - 1) < 1 / (2^b - 1) (asym; sym likewise with 2^(B-1) - 1), so when the source scale is a
normal fp16 (where multiplying by 2^k commutes with rounding up) the demoted bound 2^(k-1) * s_B is at
most the direct bound s_b / 2; with a subnormal source scale it exceeds it by at most 2^(k-25) (< 2^-19).

Non-finite input is handled by the reference encode (`reference.sanitize`: NaN -> 0, +-inf and
out-of-range values saturate to +-65504, -0 -> +0); the bounds hold against the sanitized values.

**Measured (docs/elastic.md, benchmark/elastic_accuracy.py, smollm2-135m):** the midpoint truncation
has the lower max error and the lower reconstruction RMS (0.98x direct at 4 bits, 0.78x at 2), yet the
*model* does worse: KL to fp32 per token 0.0124 vs 0.0054 for direct KV4, 0.46 vs 0.27 at 2 bits. It
moves every group's extreme codes inward (the decoded span of a group is 240/255 of its range at 4 bits,
192/255 at 2) and attention is sensitive to exactly those values. Two alternatives are here as well and
match direct at the model level: `requantize_codes` (re-quantize the codes onto the direct b-bit grid,
integer-only, a repack) and `quantize_embedded` (8-bit codes as a direct 4-bit code plus a 4-bit
refinement plane, so freeing the fine plane leaves a fixed KV4 page's codes, bit for bit).

Pure torch (CPU or CUDA), no sglang. The direct comparison is `quantize_direct` (the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtuner_hicache.page_format import ALIGN, ChunkSpec
from kvtuner_hicache.quant.reference import (
    dequantize_groups,
    from_groups,
    pack_codes,
    quantize_groups,
    sanitize,
    to_groups,
    unpack_codes,
)

# Default code-plane widths per source precision, most significant plane first.
PLANE_WIDTHS: dict[int, tuple[int, ...]] = {8: (2, 2, 4), 4: (2, 2), 2: (2,)}
PLANE_ALIGN = ALIGN  # every plane of a chunk starts on a 128-byte boundary, like the page format's sub-arrays


def plane_widths(source_bits: int) -> tuple[int, ...]:
    """The default plane split of a `source_bits` code (MSB first); its prefixes sum to 2, 4, ..., source_bits."""
    try:
        return PLANE_WIDTHS[source_bits]
    except KeyError:
        raise ValueError(f"no elastic plane split for {source_bits}-bit codes (have {sorted(PLANE_WIDTHS)})") from None


def _check_widths(widths: Sequence[int], source_bits: int) -> tuple[int, ...]:
    w = tuple(int(x) for x in widths)
    if not w or any(x not in (1, 2, 4, 8) for x in w) or sum(w) != source_bits:
        raise ValueError(f"plane widths {w} must be 1/2/4/8-bit planes summing to the source bits {source_bits}")
    return w


def prefix_planes(widths: Sequence[int], bits: int) -> int:
    """How many leading planes of `widths` make a `bits`-bit code; ValueError when no prefix sums to `bits`."""
    total = 0
    for n, w in enumerate(widths, start=1):
        total += w
        if total == bits:
            return n
    raise ValueError(f"no prefix of the planes {tuple(widths)} has {bits} bits")


# ---- planes <-> codes (unpacked fields and packed bytes) ----------------------------------------


def split_planes(codes: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """uint8 codes of sum(widths) bits -> one uint8 field tensor per plane (values < 2^w), MSB first."""
    w = _check_widths(widths, sum(widths))
    c = codes.to(torch.int32)
    out, low = [], sum(w)
    for width in w:
        low -= width
        out.append(((c >> low) & (2**width - 1)).to(torch.uint8))
    return tuple(out)


def join_planes(fields: Sequence[torch.Tensor], widths: Sequence[int]) -> torch.Tensor:
    """Leading plane fields (MSB first) -> the uint8 code of sum(widths[:len(fields)]) bits."""
    if not fields or len(fields) > len(widths):
        raise ValueError(f"{len(fields)} plane(s) for widths {tuple(widths)}")
    acc = torch.zeros_like(fields[0], dtype=torch.int32)
    for f, width in zip(fields, widths, strict=False):
        acc = (acc << width) | f.to(torch.int32)
    return acc.to(torch.uint8)


def pack_planes(codes: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """uint8 codes [N, E] -> packed planes, plane p uint8 [N, E * w_p / 8], each in the page format's packing."""
    return tuple(pack_codes(f, width) for f, width in zip(split_planes(codes, widths), widths, strict=True))


def unpack_planes(planes: Sequence[torch.Tensor], widths: Sequence[int]) -> torch.Tensor:
    """Leading packed planes [N, E * w_p / 8] (MSB first) -> uint8 codes [N, E] of their summed bits."""
    if not planes or len(planes) > len(widths):
        raise ValueError(f"{len(planes)} plane(s) for widths {tuple(widths)}")
    return join_planes([unpack_codes(p, width) for p, width in zip(planes, widths, strict=False)], widths)


# ---- demotion ----------------------------------------------------------------------------------


def demote(
    codes_or_planes: torch.Tensor | Sequence[torch.Tensor],
    from_bits: int,
    to_bits: int,
    widths: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Lower a code's precision from `from_bits` to `to_bits` (<= from_bits) by keeping its top bits.

    - a tensor of `from_bits`-bit uint8 codes: returns the truncated codes `codes >> (from_bits - to_bits)`;
    - a sequence of planes (packed or unpacked fields, MSB first, widths `widths`, default
      `plane_widths` of the page's source precision; `from_bits` = the bits those planes hold now):
      returns the leading planes that make `to_bits`, the same tensor objects (no copy): the rest are
      what the pool frees. ValueError when no prefix of the planes has `to_bits` bits.

    Both forms give the same code: unpack_planes(demote(pack_planes(u, w), B, b, w), w) == demote(u, B, b).
    """
    if not 1 <= to_bits <= from_bits <= 8:
        raise ValueError(f"cannot demote {from_bits}-bit codes to {to_bits} bits")
    if isinstance(codes_or_planes, torch.Tensor):
        return (codes_or_planes.to(torch.int32) >> (from_bits - to_bits)).to(torch.uint8)
    planes = tuple(codes_or_planes)
    w = tuple(widths) if widths is not None else plane_widths(from_bits)
    n_now = prefix_planes(w, from_bits)
    if len(planes) != n_now:
        raise ValueError(f"{len(planes)} plane(s) do not make {from_bits} bits with widths {w}")
    return planes[: prefix_planes(w, to_bits)]


# ---- decode and error bounds -------------------------------------------------------------------


def dequantize_demoted(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, source_bits: int,
                       bits: int) -> torch.Tensor:
    """Decode `bits`-bit truncated codes [..., G] of a `source_bits` encode (scale/min [...]) at the interval
    midpoint, in fp32: c*(s*2^k) + (m + s*h) (asym) or (c - 2^(b-1))*(s*2^k) + s*h (sym), k = B - b,
    h = (2^k - 1)/2. Equal to reference.dequantize_groups when bits == source_bits."""
    if not 1 <= bits <= source_bits <= 8:
        raise ValueError(f"cannot decode {bits}-bit codes of a {source_bits}-bit encode")
    k = source_bits - bits
    if k == 0:
        return dequantize_groups(codes, scale, mn, bits)
    s = scale.float().unsqueeze(-1)
    step = s * float(2**k)  # exact: power-of-two scaling of an fp16
    half = s * ((2**k - 1) / 2)  # exact: fp16 mantissa (11 bits) times 1.5 / 7.5 / 31.5 / ... fits fp32
    if mn is not None:
        return codes.float() * step + (mn.float().unsqueeze(-1) + half)
    return (codes.float() - 2 ** (bits - 1)) * step + half


def demoted_error_bound(scale: torch.Tensor, source_bits: int, bits: int) -> torch.Tensor:
    """Max |x - x^| per group for a `bits`-bit truncation of a `source_bits` encode with stored scale
    `scale`: 2^(k-1) * s for k = B - b >= 1, s / 2 at k = 0 (fp32 rounding of the decode not included)."""
    k = source_bits - bits
    return scale.float() * (2.0 ** (k - 1))


def direct_error_bound(scale: torch.Tensor) -> torch.Tensor:
    """Max |x - x^| per group of a direct encode with stored scale `scale` (reference.py): s / 2."""
    return scale.float() / 2


def analytic_bound_fraction(source_bits: int, bits: int, asym: bool = True) -> tuple[float, float]:
    """(demoted, direct) max error as a fraction of the group range (asym: max - min; sym: 2 max|x|),
    before fp16 metadata rounding. Asym 8->4: (8/255, 8.5/255); sym 8->4: (8/254, 9.07/254)."""
    k = source_bits - bits
    if asym:
        return 2.0 ** (k - 1) / (2**source_bits - 1), 0.5 / (2**bits - 1)
    return 2.0 ** (k - 1) / (2 * (2 ** (source_bits - 1) - 1)), 0.5 / (2 * (2 ** (bits - 1) - 1))


# ---- group-level quantize: demoted and direct --------------------------------------------------


def quantize_demoted(x: torch.Tensor, source_bits: int, bits: int,
                     asym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Groups along the last dim: reference encode at `source_bits`, then truncate to `bits`.
    Returns (codes uint8 [..., G] < 2^bits, scale fp16 [...], min fp16 [...] | None) of the *source*
    encode; decode with dequantize_demoted(codes, scale, mn, source_bits, bits)."""
    codes, scale, mn = quantize_groups(x, source_bits, asym)
    return demote(codes, source_bits, bits), scale, mn  # type: ignore[return-value]


def quantize_direct(x: torch.Tensor, bits: int, asym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The comparison: quantize straight to `bits` with the reference (reference.quantize_groups)."""
    return quantize_groups(x, bits, asym)


def roundtrip_demoted(x: torch.Tensor, source_bits: int, bits: int, asym: bool) -> torch.Tensor:
    """fp32 reconstruction of groups x [..., G] after a `source_bits` encode demoted to `bits`."""
    codes, scale, mn = quantize_demoted(x, source_bits, bits, asym)
    return dequantize_demoted(codes, scale, mn, source_bits, bits)


def roundtrip_direct(x: torch.Tensor, bits: int, asym: bool) -> torch.Tensor:
    """fp32 reconstruction of groups x [..., G] after a direct `bits` encode (the reference)."""
    codes, scale, mn = quantize_direct(x, bits, asym)
    return dequantize_groups(codes, scale, mn, bits)


# ---- the measured alternative: re-quantization in the code domain -------------------------------


def requantize_codes(codes: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """The issue's other design, for comparison: map B-bit codes onto the b-bit grid of the same group,
    c_b = round(u_B / d) with d = (2^B - 1) / (2^b - 1) (17, 85, 5 for 8->4, 8->2, 4->2: odd integers, so
    no ties). Integer-only, on the codes (no source values, no new metadata), but it rewrites (repacks)
    the codes, where a plane demotion only frees planes. Keeps each group's min and max codes exact."""
    levels_from, levels_to = 2**from_bits - 1, 2**to_bits - 1
    if not 1 <= to_bits <= from_bits <= 8 or levels_from % levels_to:
        raise ValueError(f"cannot requantize {from_bits}-bit codes to {to_bits} bits")
    d = levels_from // levels_to
    return ((codes.to(torch.int32) + d // 2) // d).to(torch.uint8)


def dequantize_requantized(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, source_bits: int,
                           bits: int) -> torch.Tensor:
    """Decode requantize_codes output (asymmetric groups): c * (s * d) + m, s * d exact in fp32 (an fp16
    times an integer of at most 7 bits), one rounding. Max error s * d / 2 = the direct encode's bound
    (s_B * d ~ the direct scale): 8.5/255 of the range at 4 bits, 42.5/255 at 2."""
    d = (2**source_bits - 1) // (2**bits - 1)
    return codes.float() * (scale.float().unsqueeze(-1) * float(d)) + mn.float().unsqueeze(-1)


# ---- embedded (successive-refinement) 8-bit codes: the 4-bit prefix *is* the direct 4-bit code ----


def quantize_embedded(x: torch.Tensor, coarse_bits: int = 4,
                      fine_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groups along the last dim, coded so that dropping the fine plane leaves the direct
    `coarse_bits` code, bit for bit: c = the reference's direct code (same scale s and min m), then the
    residual t - c in [-1/2, 1/2] (t = (x - m) / s) is cut into 2^fine_bits equal cells,
    r = clamp(floor((t - c + 1/2) * 2^f), 0, 2^f - 1). Returns (c, r, scale, min).
    Error with both planes: <= s / 2^(f+1) (s / 32 for 4+4: 1/480 of the range, against 1/510 for the
    direct 8-bit code); with the coarse plane alone: the direct code's s / 2."""
    c, scale, mn = quantize_groups(x, coarse_bits, True)
    assert mn is not None
    xs = sanitize(x)
    s = scale.float().unsqueeze(-1)
    t = torch.where(s > 0, (xs - mn.float().unsqueeze(-1)) / s, torch.zeros_like(xs))
    cells = float(2**fine_bits)
    r = torch.floor((t - c.float() + 0.5) * cells).clamp_(0.0, cells - 1)
    return c, r.to(torch.uint8), scale, mn


def dequantize_embedded(c: torch.Tensor, r: torch.Tensor | None, scale: torch.Tensor, mn: torch.Tensor,
                        fine_bits: int = 4) -> torch.Tensor:
    """Both planes: m + s * (c + (2r + 1 - 2^f) / 2^(f+1)) (the product is exact in fp32, one rounding);
    r None (fine plane freed): the reference decode c * s + m."""
    s = scale.float().unsqueeze(-1)
    if r is None:
        return c.float() * s + mn.float().unsqueeze(-1)
    off = (r.float() * 2 + (1 - 2**fine_bits)) / float(2 ** (fine_bits + 1))
    return (c.float() + off) * s + mn.float().unsqueeze(-1)


# ---- one chunk = one (stream, layer) of a batch of pages, as planes -----------------------------


@dataclass(frozen=True)
class PlaneChunk:
    """One (stream, layer) of P pages as code planes: what an elastic host page holds for that chunk.

    planes: the planes still held, MSB first, plane p uint8 [P, E * widths[p] / 8], codes in natural
    [token, head, dim] order (as in the page format); scale/mn: fp16 [P, num_groups] of the source
    encode, in the page format's metadata order; they never change on demotion.
    """

    planes: tuple[torch.Tensor, ...]
    widths: tuple[int, ...]
    source_bits: int
    scale: torch.Tensor
    mn: torch.Tensor | None

    @property
    def bits(self) -> int:
        return sum(self.widths[: len(self.planes)])

    def demote(self, to_bits: int) -> PlaneChunk:
        """The same chunk at `to_bits`: the leading planes (no copy), same metadata."""
        kept = demote(self.planes, self.bits, to_bits, self.widths)
        return PlaneChunk(tuple(kept), self.widths, self.source_bits, self.scale, self.mn)


def quantize_chunk_planes(x: torch.Tensor, spec: ChunkSpec, widths: Sequence[int] | None = None) -> PlaneChunk:
    """x [P, page_size, H, D] -> the chunk as planes of spec.bits-bit codes (the reference encode of
    quantize_chunk, same codes and metadata, split into planes)."""
    w = _check_widths(widths if widths is not None else plane_widths(spec.bits), spec.bits)
    p = x.shape[0]
    codes, scale, mn = quantize_groups(to_groups(x, spec.axis, spec.group), spec.bits, spec.asym)
    codes = from_groups(codes, spec.axis, tuple(x.shape)).reshape(p, spec.elements)
    return PlaneChunk(pack_planes(codes, w), w, spec.bits, scale.contiguous(), None if mn is None else mn.contiguous())


def dequantize_chunk_planes(chunk: PlaneChunk, spec: ChunkSpec) -> torch.Tensor:
    """A PlaneChunk at whatever precision it holds -> fp32 [P, page_size, H, D] (midpoint decode)."""
    p = chunk.scale.shape[0]
    shape = (p, spec.page_size, spec.heads, spec.dim)
    codes = unpack_planes(chunk.planes, chunk.widths).reshape(shape)
    grouped = to_groups(codes, spec.axis, spec.group)
    return from_groups(dequantize_demoted(grouped, chunk.scale, chunk.mn, chunk.source_bits, chunk.bits), spec.axis, shape)


def _align(n: int) -> int:
    return (n + PLANE_ALIGN - 1) // PLANE_ALIGN * PLANE_ALIGN


def plane_chunk_bytes(spec: ChunkSpec, bits: int, widths: Sequence[int] | None = None) -> int:
    """Bytes an elastic chunk occupies when it holds `bits` bits: its leading planes (each 128-B aligned)
    plus the source encode's fp16 scale (and min), each 128-B aligned, as in the page format."""
    w = _check_widths(widths if widths is not None else plane_widths(spec.bits), spec.bits)
    n = prefix_planes(w, bits)
    codes = sum(_align(spec.elements * width // 8) for width in w[:n])
    meta = _align(spec.num_groups * 2) * (2 if spec.asym else 1)
    return codes + meta


__all__ = [
    "PLANE_ALIGN", "PLANE_WIDTHS", "PlaneChunk", "analytic_bound_fraction", "demote", "demoted_error_bound",
    "dequantize_chunk_planes", "dequantize_demoted", "direct_error_bound", "join_planes", "pack_planes",
    "plane_chunk_bytes", "plane_widths", "prefix_planes", "quantize_chunk_planes", "quantize_demoted",
    "quantize_direct", "dequantize_embedded", "dequantize_requantized", "quantize_embedded", "requantize_codes", "roundtrip_demoted", "roundtrip_direct", "split_planes", "unpack_planes",
]
