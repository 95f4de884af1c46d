"""Pure-torch reference quantizer: the ground truth for the page format and the native kernels.

Runs on CPU and CUDA. Every arithmetic step is a single IEEE fp32 operation rounded to nearest
(no fused multiply-add, no approximate reciprocal) so that a GPU kernel can reproduce the codes bit
for bit:

  x      <- nan_to_num(x, nan=0, +-inf=+-65504), clamped to [-65504, 65504]   (fp16 range)
  asym:  m = fp16_round_down(min(x));  s = fp16_round_up((max(x) - m) / (2^b - 1))
         u = clamp(round_half_even((x - m) * (1 / s)), 0, 2^b - 1)      (u = 0 where s == 0)
         x^ = u * s + m
  sym:   s = fp16_round_up(max|x| / (2^(b-1) - 1))
         u = clamp(round_half_even(x * (1 / s)), -(2^(b-1) - 1), 2^(b-1) - 1) + 2^(b-1)
         x^ = (u - 2^(b-1)) * s

Rounding the metadata outward (min down, scale up) keeps every element inside the grid that
the stored fp16 metadata describes, so |x - x^| <= s/2 holds with the stored scale s
(plus fp32 roundings), whatever the group's offset.

The code multiplies by the correctly rounded reciprocal 1 / s (once per group) instead of dividing
by s (page format rule since kernel 0.9.0; until 0.8.1 the codes were round((x - m) / s)). The two
rules differ only where the quotient q lies within about 2^-23 |q| (tested: 2^-22 |q|) of a
half-integer, by one code: the other of two grid points that are equally near to within that
margin. The decode is unchanged, so pages of either rule read the same. The kernels' encode needs
no division and no exact-tie path on it (docs/page-format.md, "Codes").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtuner_hicache.config import AXIS_PER_TOKEN
from kvtuner_hicache.page_format import ChunkSpec, PageLayout

F16_MAX = 65504.0


# ---- fp16 directed rounding ---------------------------------------------------------------------


def _next_up(h: torch.Tensor) -> torch.Tensor:
    """Next representable fp16 above h (h finite)."""
    bits = h.view(torch.int16)
    up = torch.where(h > 0, bits + 1, bits - 1)
    up = torch.where(h == 0, torch.ones_like(bits), up)
    return up.view(torch.float16)


def f16_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= v (v fp32, |v| <= 65504)."""
    h = v.to(torch.float16)
    return torch.where(h.float() < v, _next_up(h), h)


def f16_round_down(v: torch.Tensor) -> torch.Tensor:
    """Largest fp16 <= v (v fp32, |v| <= 65504)."""
    h = v.to(torch.float16)
    return torch.where(h.float() > v, -_next_up(-h), h)


# ---- group quantizer ----------------------------------------------------------------------------


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """Define non-finite and out-of-fp16-range inputs: NaN -> 0, saturate to +-65504, -0 -> +0.

    The last step makes min/max independent of the reduction order (amin/amax of -0 and +0 return
    whichever they meet first, so the stored fp16 min/scale bits of a group containing both would
    differ between CPU, CUDA and the native kernels); -0 + 0 = +0 in IEEE round-to-nearest.
    """
    x = x.float()
    return torch.nan_to_num(x, nan=0.0, posinf=F16_MAX, neginf=-F16_MAX).clamp_(-F16_MAX, F16_MAX).add_(0.0)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """IEEE a / b on every device. CUDA torch turns `tensor / python_float` into a * (1 / b), which can
    differ from the correctly rounded quotient by one ulp; a 0-dim tensor on a's device avoids that."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """RN(1 / s) in fp32 for fp16 scales s > 0, and 0 where s == 0 (so such a group codes every element as 0).
    A tensor-by-tensor division: IEEE on every device (see _div)."""
    s = scale.float()
    return torch.where(s > 0, torch.ones_like(s) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def quantize_groups(x: torch.Tensor, bits: int, asym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize groups along the last dim. Returns (codes uint8 [..., G], scale fp16 [...], min fp16 [...] | None)."""
    x = sanitize(x)
    if asym:
        levels = float(2**bits - 1)
        mn = f16_round_down(x.amin(dim=-1))
        scale = f16_round_up(_div(x.amax(dim=-1) - mn.float(), levels))
        q = torch.round((x - mn.float().unsqueeze(-1)) * reciprocal(scale).unsqueeze(-1))
        return q.clamp_(0.0, levels).to(torch.uint8), scale, mn
    qmax = float(2 ** (bits - 1) - 1)
    scale = f16_round_up(_div(x.abs().amax(dim=-1), qmax))
    q = torch.round(x * reciprocal(scale).unsqueeze(-1))
    return (q.clamp_(-qmax, qmax) + 2 ** (bits - 1)).to(torch.uint8), scale, None


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of quantize_groups, in fp32: u*s + m (asym) or (u - 2^(b-1))*s (sym)."""
    s = scale.float().unsqueeze(-1)
    if mn is not None:
        return codes.float() * s + mn.float().unsqueeze(-1)
    return (codes.float() - 2 ** (bits - 1)) * s


# ---- bit packing --------------------------------------------------------------------------------


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device)


def _pack3(codes: torch.Tensor) -> torch.Tensor:
    n, e = codes.shape
    if e % 8:
        raise ValueError(f"3-bit codes pack eight at a time; {e} codes per row")
    c = codes.reshape(n, e // 8, 8).to(torch.int32)
    word = (c << torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)).sum(dim=-1)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8).reshape(n, e // 8 * 3)


def _unpack3(packed: torch.Tensor) -> torch.Tensor:
    n, b = packed.shape
    p = packed.reshape(n, b // 3, 3).to(torch.int32)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(n, b // 3 * 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, E] (values < 2^bits) -> packed bytes [N, E*bits/8], little-endian in a byte
    (3 bits: eight codes in three bytes, code i at bits 3i..3i+2 of their little-endian 24-bit word)."""
    if bits == 8:
        return codes.contiguous()
    if bits == 3:
        return _pack3(codes)
    per = 8 // bits
    n, e = codes.shape
    c = codes.reshape(n, e // per, per).to(torch.int32)
    return (c << _shifts(bits, codes.device)).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes [N, B] -> uint8 codes [N, B*8/bits]."""
    if bits == 8:
        return packed.contiguous()
    if bits == 3:
        return _unpack3(packed)
    n, b = packed.shape
    p = packed.to(torch.int32).unsqueeze(-1)
    return ((p >> _shifts(bits, packed.device)) & (2**bits - 1)).to(torch.uint8).reshape(n, b * 8 // bits)


# ---- one chunk = one (stream, layer) of a batch of pages ----------------------------------------


def to_groups(x: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """[P, T, H, D] -> [P, groups, G]; axis 0 groups along D, axis 1 along T (inside the page)."""
    p, t, h, d = x.shape
    if axis == AXIS_PER_TOKEN:
        return x.reshape(p, t * h * d // group, group)
    return x.reshape(p, t // group, group, h, d).permute(0, 1, 3, 4, 2).reshape(p, (t // group) * h * d, group)


def from_groups(g: torch.Tensor, axis: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of to_groups."""
    p, t, h, d = shape
    if axis == AXIS_PER_TOKEN:
        return g.reshape(p, t, h, d)
    group = g.shape[-1]
    return g.reshape(p, t // group, h, d, group).permute(0, 1, 4, 2, 3).reshape(p, t, h, d)


def quantize_chunk(x: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """x [P, page_size, H, D] (any float dtype) -> the chunk's bytes, uint8 [P, spec.nbytes]."""
    p = x.shape[0]
    codes, scale, mn = quantize_groups(to_groups(x, spec.axis, spec.group), spec.bits, spec.asym)
    codes = from_groups(codes, spec.axis, tuple(x.shape)).reshape(p, spec.elements)
    out = torch.zeros(p, spec.nbytes, dtype=torch.uint8, device=x.device)
    out[:, : spec.codes_bytes] = pack_codes(codes, spec.bits)
    meta = spec.num_groups * 2
    out[:, spec.scale_offset : spec.scale_offset + meta] = scale.contiguous().view(torch.uint8)
    if mn is not None:
        out[:, spec.min_offset : spec.min_offset + meta] = mn.contiguous().view(torch.uint8)
    return out


def dequantize_chunk(raw: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """Chunk bytes uint8 [P, spec.nbytes] -> fp32 [P, page_size, H, D]."""
    p = raw.shape[0]
    shape = (p, spec.page_size, spec.heads, spec.dim)
    codes = unpack_codes(raw[:, : spec.codes_bytes], spec.bits)
    meta = spec.num_groups * 2
    scale = raw[:, spec.scale_offset : spec.scale_offset + meta].contiguous().view(torch.float16)
    mn = raw[:, spec.min_offset : spec.min_offset + meta].contiguous().view(torch.float16) if spec.asym else None
    grouped = to_groups(codes.reshape(shape), spec.axis, spec.group)
    return from_groups(dequantize_groups(grouped, scale, mn, spec.bits), spec.axis, shape)


# ---- page-level ops: the signatures the native kernels implement too -------------------------


def encode_pages(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]], token_index: torch.Tensor, out: torch.Tensor) -> None:
    """Gather pages from device-pool buffers, quantize them, write whole pages into `out`.

    buffers[b][layer]: device buffer `b` (0 = K or MLA latent row, 1 = V) of a local layer,
    shaped [rows, H, D_total]. token_index: int64 [n_pages * page_size] rows, whole pages.
    out: uint8 [n_pages, page_bytes] (header included).
    """
    ps = layout.page_size
    n_pages = token_index.numel() // ps
    assert token_index.numel() == n_pages * ps, "token_index must cover whole pages"
    assert out.shape == (n_pages, layout.page_bytes) and out.dtype == torch.uint8
    idx = token_index.to(buffers[0][0].device)
    out[:, : len(layout.header())] = torch.frombuffer(bytearray(layout.header()), dtype=torch.uint8).to(out.device)
    for s, st in enumerate(layout.streams):
        for layer in range(layout.num_layers):
            spec = layout.chunk(s, layer)
            x = buffers[st.buffer][layer][idx][..., st.col_offset : st.col_offset + st.dim]
            out[:, spec.offset : spec.offset + spec.nbytes] = quantize_chunk(x.reshape(n_pages, ps, st.heads, st.dim), spec).to(out.device)


def decode_layer(layout: PageLayout, layer: int, pages: torch.Tensor, page_ids: torch.Tensor, buffers: Sequence[torch.Tensor], token_index: torch.Tensor) -> None:
    """Dequantize one local layer of pages `page_ids` of `pages` and scatter into the device pool.

    pages: uint8 [num_pages, page_bytes] (the host pool); page_ids: int64 [n];
    buffers[b]: this layer's device buffer `b`, [rows, H, D_total]; token_index: [n * page_size].
    """
    dev = buffers[0].device
    idx = token_index.to(dev)
    pid = page_ids.to(pages.device)
    for s, st in enumerate(layout.streams):
        spec = layout.chunk(s, layer)
        raw = pages[pid, spec.offset : spec.offset + spec.nbytes].to(dev)
        x = dequantize_chunk(raw, spec).reshape(-1, st.heads, st.dim)
        dst = buffers[st.buffer]
        dst[idx, :, st.col_offset : st.col_offset + st.dim] = x.to(dst.dtype)


def roundtrip_pages(layout: PageLayout, layer_kv: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """What a prefix looks like after backup -> host page -> load, for tensors laid out like the pool.

    layer_kv[b][layer]: [tokens, H, D_total] with tokens a multiple of page_size. Returns new
    tensors of the same shape and dtype, every stream replaced by its dequantized copy.
    """
    tokens = layer_kv[0][0].shape[0]
    idx = torch.arange(tokens, device=layer_kv[0][0].device)
    pages = torch.empty(tokens // layout.page_size, layout.page_bytes, dtype=torch.uint8, device=layer_kv[0][0].device)
    encode_pages(layout, layer_kv, idx, pages)
    out = [[t.clone() for t in per_layer] for per_layer in layer_kv]
    pid = torch.arange(pages.shape[0], device=pages.device)
    for layer in range(layout.num_layers):
        decode_layer(layout, layer, pages, pid, [out[b][layer] for b in range(len(out))], idx)
    return out
