"""Elastic code planes (issue 15): packing, demotion = truncation, the max-error bounds, RMS against direct."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtuner_hicache.config import AXIS_PER_CHANNEL, AXIS_PER_TOKEN
from kvtuner_hicache.page_format import ChunkSpec, chunk_geometry
from kvtuner_hicache.quant.elastic import (
    analytic_bound_fraction,
    demote,
    demoted_error_bound,
    dequantize_chunk_planes,
    dequantize_demoted,
    dequantize_embedded,
    dequantize_requantized,
    direct_error_bound,
    join_planes,
    pack_planes,
    plane_chunk_bytes,
    plane_widths,
    quantize_chunk_planes,
    quantize_demoted,
    quantize_direct,
    quantize_embedded,
    requantize_codes,
    roundtrip_demoted,
    roundtrip_direct,
    split_planes,
    unpack_planes,
)
from kvtuner_hicache.quant.reference import (
    F16_MAX,
    dequantize_chunk,
    dequantize_groups,
    pack_codes,
    quantize_chunk,
    quantize_groups,
    sanitize,
    unpack_codes,
)

DEMOTIONS = ((8, 4), (8, 2), (4, 2))  # (source bits, kept bits): the issue's 8 -> 4, 8 -> 2, 4 -> 2
WIDTHS = ((2, 2, 4), (1,) * 8, (4, 2, 2), (4, 4), (2, 2), (1, 1, 2), (2,))


def _spec(bits: int, axis: int, group: int, asym: bool, page_size: int = 64, heads: int = 2, dim: int = 64) -> ChunkSpec:
    cb, ng, so, mo, nb = chunk_geometry(bits, axis, group, asym, page_size, heads, dim)
    return ChunkSpec(0, 0, bits, axis, group, asym, page_size, heads, dim, 0, cb, ng, so, mo, nb)


def _eps(xs: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, source_bits: int) -> torch.Tensor:
    """fp32 rounding slack of the encode and the (two-rounding) midpoint decode."""
    s = scale.float().unsqueeze(-1)
    m = mn.float().abs().unsqueeze(-1) if mn is not None else 0.0
    return 2.0**-21 * (xs.abs() + m + s * 2**source_bits)


def _check_demoted_bound(x: torch.Tensor, source_bits: int, bits: int, asym: bool) -> None:
    codes, scale, mn = quantize_demoted(x, source_bits, bits, asym)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    xs = sanitize(x)
    err = (dequantize_demoted(codes, scale, mn, source_bits, bits) - xs).abs()
    bound = demoted_error_bound(scale, source_bits, bits).unsqueeze(-1) + _eps(xs, scale, mn, source_bits)
    assert bool((err <= bound).all()), float((err - bound).max())
    # ... and the demoted bound is the direct one's or better (same min; scales rounded up in fp16)
    _, dscale, dmn = quantize_direct(x, bits, asym)
    if mn is not None:
        assert torch.equal(mn, dmn)
    k = source_bits - bits
    slack = 2.0 ** (k - 25)  # only reachable with a subnormal source scale (module docstring)
    assert bool((demoted_error_bound(scale, source_bits, bits) <= direct_error_bound(dscale) + slack).all())
    normal = scale.float() >= 2.0**-14
    assert bool((demoted_error_bound(scale, source_bits, bits)[normal] <= direct_error_bound(dscale)[normal]).all())


# ---- planes: bit-exact packing ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data(), widths=st.sampled_from(WIDTHS), rows=st.integers(1, 3), words=st.integers(1, 4))
def test_planes_roundtrip_bit_exact(data, widths, rows, words):
    bits = sum(widths)
    n = rows * 8 * words  # a multiple of 8 elements: whole bytes for 1-bit planes
    vals = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    codes = torch.tensor(vals, dtype=torch.uint8).reshape(rows, -1)
    planes = pack_planes(codes, widths)
    assert [p.shape[1] for p in planes] == [codes.shape[1] * w // 8 for w in widths]
    assert torch.equal(unpack_planes(planes, widths), codes)
    low = bits
    for p, w in zip(planes, widths, strict=True):  # plane p is a w-bit code array in the page format's packing
        low -= w
        assert torch.equal(p, pack_codes(((codes.int() >> low) & (2**w - 1)).to(torch.uint8), w))
    # a prefix of the packed planes is the truncated code
    for n_planes in range(1, len(widths) + 1):
        kept = sum(widths[:n_planes])
        assert torch.equal(unpack_planes(planes[:n_planes], widths), (codes.int() >> (bits - kept)).to(torch.uint8))


def test_plane_bit_order():
    # one 8-bit code 0b10_01_1110 -> plane 0 = 0b10, plane 1 = 0b01, plane 2 = 0b1110; element 0 in the low bits
    codes = torch.tensor([[0b10011110, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    p0, p1, p2 = pack_planes(codes, (2, 2, 4))
    assert p0.tolist() == [[0b10, 0]] and p1.tolist() == [[0b01, 0]] and p2.tolist() == [[0b1110, 0, 0, 0]]
    f0, f1, f2 = split_planes(codes, (2, 2, 4))
    assert (int(f0[0, 0]), int(f1[0, 0]), int(f2[0, 0])) == (2, 1, 14)


# ---- demotion = truncation --------------------------------------------------------------------


@pytest.mark.parametrize("source_bits,bits", [(8, 4), (8, 2), (4, 2), (8, 8), (4, 4)])
def test_demote_is_truncation_both_forms(source_bits, bits):
    g = torch.Generator().manual_seed(source_bits * 10 + bits)
    codes = torch.randint(0, 2**source_bits, (5, 256), generator=g, dtype=torch.int32).to(torch.uint8)
    truncated = demote(codes, source_bits, bits)
    assert torch.equal(truncated, (codes.int() >> (source_bits - bits)).to(torch.uint8))
    widths = plane_widths(source_bits)
    planes = pack_planes(codes, widths)
    kept = demote(planes, source_bits, bits)
    assert all(a is b for a, b in zip(kept, planes, strict=False))  # freeing planes, no copy
    assert torch.equal(unpack_planes(kept, widths), truncated)


def test_demotion_composes_and_rejects_what_it_cannot_do():
    codes = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(torch.uint8)
    planes = pack_planes(codes, (2, 2, 4))
    step = demote(demote(planes, 8, 4), 4, 2, widths=(2, 2, 4))
    assert len(step) == 1 and step[0] is planes[0] and torch.equal(step[0], demote(planes, 8, 2)[0])
    assert torch.equal(demote(demote(codes, 8, 4), 4, 2), demote(codes, 8, 2))
    with pytest.raises(ValueError):
        demote(planes, 8, 6)  # 6 is not a prefix of (2, 2, 4)
    with pytest.raises(ValueError):
        demote(codes, 4, 8)
    with pytest.raises(ValueError):
        demote(planes[:2], 8, 2)  # two planes are 4 bits, not 8
    assert len(demote(pack_planes(codes, (1,) * 8), 8, 3, widths=(1,) * 8)) == 3  # bit planes: any prefix


# ---- decode: the reference at full precision, bit for bit --------------------------------------


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_full_precision_decode_is_the_reference(bits, asym):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    codes, scale, mn = quantize_groups(x, bits, asym)
    assert torch.equal(dequantize_demoted(codes, scale, mn, bits, bits), dequantize_groups(codes, scale, mn, bits))


@pytest.mark.parametrize("axis,group", [(AXIS_PER_TOKEN, 64), (AXIS_PER_TOKEN, 32), (AXIS_PER_CHANNEL, 64), (AXIS_PER_CHANNEL, 16)])
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("source_bits", [8, 4])
def test_chunk_planes_match_the_page_format(source_bits, asym, axis, group):
    spec = _spec(source_bits, axis, group, asym)
    x = torch.randn(3, spec.page_size, spec.heads, spec.dim, generator=torch.Generator().manual_seed(group)).to(torch.bfloat16)
    raw = quantize_chunk(x, spec)
    chunk = quantize_chunk_planes(x, spec)
    # same codes and metadata as the reference page chunk, and the same decode at full precision
    assert torch.equal(unpack_planes(chunk.planes, chunk.widths), unpack_codes(raw[:, : spec.codes_bytes], source_bits))
    meta = spec.num_groups * 2
    assert torch.equal(chunk.scale.view(torch.uint8), raw[:, spec.scale_offset : spec.scale_offset + meta])
    assert torch.equal(dequantize_chunk_planes(chunk, spec), dequantize_chunk(raw, spec))
    # demoted chunks decode like the group-level truncation, in natural [token, head, dim] order
    for bits in (b for b in (4, 2) if b < source_bits):
        low = chunk.demote(bits)
        assert low.bits == bits and low.scale is chunk.scale
        y = dequantize_chunk_planes(low, spec)
        err = (y - x.float()).abs().amax()
        assert float(err) <= float(demoted_error_bound(chunk.scale, source_bits, bits).max()) * (1 + 2**-10)


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_demoted_chunk_costs_what_a_direct_chunk_costs(bits, asym):
    # Qwen2.5-7B K chunk at page 64: 64 tokens x 4 heads x 128; per-channel (KIVI) keys, G = 64
    spec8 = _spec(8, AXIS_PER_CHANNEL, 64, asym, page_size=64, heads=4, dim=128)
    direct = _spec(bits, AXIS_PER_CHANNEL, 64, asym, page_size=64, heads=4, dim=128)
    assert plane_chunk_bytes(spec8, bits) == direct.nbytes
    if bits <= 4:
        assert plane_chunk_bytes(_spec(4, AXIS_PER_CHANNEL, 64, asym, page_size=64, heads=4, dim=128), bits) == direct.nbytes


# ---- max-error bounds -------------------------------------------------------------------------


finite = st.floats(min_value=-3e4, max_value=3e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(finite, min_size=16, max_size=16 * 8), demotion=st.sampled_from(DEMOTIONS), asym=st.booleans(),
       group=st.sampled_from([8, 16]))
def test_demoted_error_bound_random_groups(values, demotion, asym, group):
    n = len(values) // group * group
    x = torch.tensor(values[:n], dtype=torch.float32).to(torch.bfloat16).reshape(-1, group)
    _check_demoted_bound(x, *demotion, asym)


@settings(max_examples=100, deadline=None)
@given(offset=st.floats(-6e4, 6e4), spread=st.floats(1e-7, 10.0), demotion=st.sampled_from(DEMOTIONS), asym=st.booleans())
def test_demoted_bound_huge_offsets(offset, spread, demotion, asym):
    x = (offset + spread * torch.linspace(-1, 1, 64)).reshape(1, 64)
    _check_demoted_bound(x, *demotion, asym)


@pytest.mark.parametrize("exp", [-30, -24, -20, -14, -8, 0, 8, 15])
@pytest.mark.parametrize("demotion", DEMOTIONS)
@pytest.mark.parametrize("asym", [True, False])
def test_demoted_bound_tiny_and_huge_magnitudes(exp, demotion, asym):
    x = (torch.randn(8, 32, generator=torch.Generator().manual_seed(exp + 100)) * 2.0**exp).to(torch.bfloat16)
    _check_demoted_bound(x, *demotion, asym)


@pytest.mark.parametrize("demotion", DEMOTIONS)
@pytest.mark.parametrize("asym", [True, False])
def test_constant_zero_and_non_finite_groups(demotion, asym):
    source_bits, bits = demotion
    const = torch.tensor([0.5, -3.0, 1232.0, 7.8125e-3, -65280.0, 0.0]).unsqueeze(-1).expand(-1, 32).contiguous()
    codes, scale, mn = quantize_demoted(const, source_bits, bits, asym)
    y = dequantize_demoted(codes, scale, mn, source_bits, bits)
    if asym:  # scale 0: every truncated code decodes to the min, exactly as the reference does
        assert bool((scale == 0).all()) and torch.equal(y, const)
    _check_demoted_bound(const, source_bits, bits, asym)
    assert torch.equal(roundtrip_demoted(torch.zeros(2, 64), source_bits, bits, True), torch.zeros(2, 64))
    bad = torch.tensor([[float("nan"), 1.0, -1.0, 0.5], [float("inf"), 0.0, 1.0, 2.0], [-float("inf"), 1e6, -1e6, 3.0]])
    codes, scale, mn = quantize_demoted(bad, source_bits, bits, asym)
    ref_codes, ref_scale, ref_mn = quantize_groups(bad, source_bits, asym)  # same sanitize, same encode
    assert torch.equal(codes, demote(ref_codes, source_bits, bits)) and torch.equal(scale, ref_scale)
    y = dequantize_demoted(codes, scale, mn, source_bits, bits)
    assert bool(torch.isfinite(y).all()) and bool((y.abs() <= F16_MAX * (1 + 2**-7)).all())
    _check_demoted_bound(bad, source_bits, bits, asym)


@pytest.mark.parametrize("demotion", DEMOTIONS)
@pytest.mark.parametrize("asym", [True, False])
def test_bounds_are_tight_and_beat_direct(demotion, asym):
    """Adversarial groups: every element at the far edge of its truncated interval reaches the bound
    (so it is the true max), and the direct encode's own worst case on its adversarial group is larger."""
    source_bits, bits = demotion
    k = source_bits - bits
    lo, hi = (0.0, 255.0) if asym else (-127.0, 127.0)  # a grid whose scale is exactly 1 (fp16)
    if source_bits == 4:
        lo, hi = (0.0, 15.0) if asym else (-7.0, 7.0)
    base = torch.arange(lo, hi + 1)  # every source code once, so scale = 1, min = lo
    # element just below the upper rounding edge of each code: u + 0.5 - tiny
    edge = base + 0.5 - 2.0**-10
    x = torch.cat([torch.tensor([lo, hi]), edge.clamp(max=hi)])
    codes, scale, mn = quantize_demoted(x.unsqueeze(0), source_bits, bits, asym)
    assert float(scale[0]) == 1.0
    err = (dequantize_demoted(codes, scale, mn, source_bits, bits) - x).abs().max()
    bound = float(demoted_error_bound(scale, source_bits, bits)[0])
    assert bound == 2.0 ** (k - 1) and 0.99 * bound <= float(err) <= bound
    frac_demoted, frac_direct = analytic_bound_fraction(source_bits, bits, asym)
    rng = hi - lo if asym else 2 * hi
    assert abs(bound / rng - frac_demoted) < 1e-12 and frac_demoted < frac_direct
    # direct: elements at the rounding edges of the direct grid reach s_b / 2 = frac_direct * range
    _, dscale, _ = quantize_direct(x.unsqueeze(0), bits, asym)
    dgrid = torch.arange(0, 2**bits - (1 if asym else 2)) * float(dscale[0]) + (lo if asym else -float(dscale[0]) * (2 ** (bits - 1) - 1))
    xd = torch.cat([torch.tensor([lo, hi]), (dgrid + float(dscale[0]) / 2 - 2.0**-10).clamp(lo, hi)])
    derr = (roundtrip_direct(xd.unsqueeze(0), bits, asym) - xd).abs().max()
    assert float(derr) >= 0.99 * float(direct_error_bound(dscale)[0]) > bound


def test_issue_numbers():
    assert analytic_bound_fraction(8, 4) == (8 / 255, 8.5 / 255)
    assert analytic_bound_fraction(8, 2) == (32 / 255, 42.5 / 255)
    assert analytic_bound_fraction(4, 2) == (2 / 15, 0.5 / 3)


# ---- RMS on Gaussian data: demoted at least as accurate as direct ------------------------------


def _rms_ratio(x: torch.Tensor, source_bits: int, bits: int, asym: bool) -> float:
    d = (roundtrip_demoted(x, source_bits, bits, asym) - x).pow(2).mean()
    r = (roundtrip_direct(x, bits, asym) - x).pow(2).mean()
    return float((d / r).sqrt())


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("demotion", DEMOTIONS)
@pytest.mark.parametrize("asym", [True, False])
def test_demoted_rms_no_worse_than_direct_gaussian(group, demotion, asym):
    """Paired (same data), 2^18 elements, three seeds; tolerance 0: the rule is 'at least as accurate'.
    The measured margins at G = 64 are 2 % (asym 8->4, the smallest), 10 % (sym 8->4) and 19-46 % at
    2 bits, against a seed-to-seed spread of the ratio of about 0.2 %, so a zero tolerance is not flaky.
    RMS is not the model's accuracy: docs/elastic.md measures the midpoint decode worse in KL on a real
    model although its RMS is lower; this test pins the reconstruction property only."""
    for seed in range(3):
        x = torch.randn(2**18 // group, group, generator=torch.Generator().manual_seed(seed))
        assert _rms_ratio(x, *demotion, asym) <= 1.0


def test_known_exception_small_asym_groups():
    """Documented limit (docs/elastic.md): asym 8 -> 4 with G = 32 is ~1.7 % *worse* in RMS than direct
    4-bit: a direct asym grid reproduces each group's min and max exactly, the midpoint decode puts them
    7.5 steps off, and with 2 extremes in 32 that outweighs the finer (16/17) interior step. Break-even
    is G ~ 43; the default G is 64. Pinned so a change of the decode shows up here."""
    x = torch.randn(2**13, 32, generator=torch.Generator().manual_seed(0))
    assert 1.0 < _rms_ratio(x, 8, 4, True) < 1.03
    assert _rms_ratio(x, 8, 4, False) < 1.0 and _rms_ratio(x, 8, 2, True) < 1.0


# ---- the alternative: code-domain re-quantization ---------------------------------------------


@pytest.mark.parametrize("demotion", DEMOTIONS)
def test_requantized_codes_keep_the_direct_bound_and_the_extremes(demotion):
    source_bits, bits = demotion
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    codes, scale, mn = quantize_groups(x, source_bits, True)
    c = requantize_codes(codes, source_bits, bits)
    assert int(c.max()) == 2**bits - 1 and torch.equal(c[codes == 0], torch.zeros_like(c[codes == 0]))
    assert bool((c[codes == 2**source_bits - 1] == 2**bits - 1).all())  # group extremes stay exact
    d = (2**source_bits - 1) // (2**bits - 1)
    err = (dequantize_requantized(c, scale, mn, source_bits, bits) - x).abs()
    assert bool((err <= scale.float().unsqueeze(-1) * d / 2 + _eps(x, scale, mn, source_bits)).all())
    with pytest.raises(ValueError):
        requantize_codes(codes, 8, 3)  # 255 / 7 is not an integer


# ---- embedded 4+4 codes: the coarse plane is the direct 4-bit code ------------------------------


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite, min_size=16, max_size=16 * 8), group=st.sampled_from([8, 16]))
def test_embedded_coarse_plane_is_the_direct_code_and_fine_bound(values, group):
    n = len(values) // group * group
    x = torch.tensor(values[:n], dtype=torch.float32).to(torch.bfloat16).reshape(-1, group)
    c, r, scale, mn = quantize_embedded(x)
    c4, s4, m4 = quantize_groups(x, 4, True)
    assert torch.equal(c, c4) and torch.equal(scale, s4) and torch.equal(mn, m4) and int(r.max()) < 16
    xs = sanitize(x)
    assert torch.equal(dequantize_embedded(c, None, scale, mn), dequantize_groups(c4, s4, m4, 4))
    err = (dequantize_embedded(c, r, scale, mn) - xs).abs()
    assert bool((err <= scale.float().unsqueeze(-1) / 32 + _eps(xs, scale, mn, 4)).all())
    planes = pack_planes(join_planes([c, r], (4, 4)), (4, 4))  # stored as two 4-bit planes, coarse first
    assert torch.equal(planes[0], pack_codes(c4, 4))  # the coarse plane's bytes are a fixed KV4 chunk's codes


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite, min_size=16, max_size=16 * 8), group=st.sampled_from([8, 16]))
def test_a_6_bit_refinement_of_a_2_bit_code_nests_the_2_bit_refinement(values, group):
    """The three-level ladder of docs/elastic.md ("What remains"): under a 2-bit floor, the 6-bit refinement r6
    holds today's 2-bit refinement r as its top two bits, bit for bit, so a fine plane of r6 mod 16 can be added
    beside the existing plane and dropped without touching it; floor + r + fine decode within s / 128."""
    n = len(values) // group * group
    x = torch.tensor(values[:n], dtype=torch.float32).to(torch.bfloat16).reshape(-1, group)
    c, r2, scale, mn = quantize_embedded(x, coarse_bits=2, fine_bits=2)
    c6, r6, scale6, mn6 = quantize_embedded(x, coarse_bits=2, fine_bits=6)
    assert torch.equal(c, c6) and torch.equal(scale, scale6) and torch.equal(mn, mn6)
    assert torch.equal(r6 >> 4, r2) and int(r6.max()) < 64
    xs = sanitize(x)
    err = (dequantize_embedded(c, r6, scale, mn, fine_bits=6) - xs).abs()
    assert bool((err <= scale.float().unsqueeze(-1) / 128 + _eps(xs, scale, mn, 2)).all())


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite, min_size=16, max_size=16 * 8), group=st.sampled_from([8, 16]))
def test_every_2_bit_prefix_of_a_6_bit_refinement_is_the_direct_refinement_of_that_width(values, group):
    """The equal-plane ladder of docs/elastic.md ("What remains"): r6 cut into three 2-bit planes, most significant
    first. Each prefix (2, 4 or 6 bits) equals the direct refinement of that width, bit for bit, so a page drops its
    last plane to step down (8 -> 6 -> 4 -> 2-bit class) and every plane has the size of today's 2-bit plane. Each
    level decodes within s / 2^(k+1) of its input."""
    n = len(values) // group * group
    x = torch.tensor(values[:n], dtype=torch.float32).to(torch.bfloat16).reshape(-1, group)
    c, r6, scale, mn = quantize_embedded(x, coarse_bits=2, fine_bits=6)
    xs = sanitize(x)
    for k in (2, 4, 6):
        ck, rk, sk, mk = quantize_embedded(x, coarse_bits=2, fine_bits=k)
        assert torch.equal(c, ck) and torch.equal(scale, sk) and torch.equal(mn, mk)
        assert torch.equal(r6 >> (6 - k), rk), f"the {k}-bit prefix differs from the direct {k}-bit refinement"
        err = (dequantize_embedded(c, rk, scale, mn, fine_bits=k) - xs).abs()
        assert bool((err <= scale.float().unsqueeze(-1) / 2 ** (k + 1) + _eps(xs, scale, mn, 2)).all())


def test_embedded_non_finite_and_constant_groups():
    bad = torch.tensor([[float("nan"), 1.0, -1.0, 0.5], [float("inf"), 0.0, 1.0, 2.0], [-float("inf"), 1e6, -1e6, 3.0]])
    c, r, scale, mn = quantize_embedded(bad)
    y = dequantize_embedded(c, r, scale, mn)
    assert bool(torch.isfinite(y).all())
    assert bool(((y - sanitize(bad)).abs() <= scale.float().unsqueeze(-1) / 32 + _eps(sanitize(bad), scale, mn, 4)).all())
    const = torch.full((2, 32), 1232.0)
    c, r, scale, mn = quantize_embedded(const)
    assert bool((scale == 0).all())
    assert torch.equal(dequantize_embedded(c, None, scale, mn), const)
