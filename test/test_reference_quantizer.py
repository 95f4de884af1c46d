"""Property tests of the reference quantizer: error bounds, edge cases, packing, the fp16 metadata choice."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtuner_hicache.quant.reference import (
    F16_MAX,
    dequantize_groups,
    f16_round_down,
    f16_round_up,
    from_groups,
    pack_codes,
    quantize_groups,
    sanitize,
    to_groups,
    unpack_codes,
)

BITS = (2, 3, 4, 8)


def _bound(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, bits: int) -> torch.Tensor:
    """s/2 with the stored scale, plus the fp32 rounding of the dequantize arithmetic."""
    s = scale.float().unsqueeze(-1)
    m = mn.float().abs().unsqueeze(-1) if mn is not None else 0.0
    return s / 2 + 2.0**-22 * (x.abs() + m + s * 2**bits)


def _check_bound(x: torch.Tensor, bits: int, asym: bool) -> None:
    codes, scale, mn = quantize_groups(x, bits, asym)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    if not asym:
        assert int(codes.min()) >= 1  # -2^(b-1) is never used (KVTuner's symmetric grid)
    xs = sanitize(x)
    err = (dequantize_groups(codes, scale, mn, bits) - xs).abs()
    assert bool((err <= _bound(xs, scale, mn, bits)).all()), float((err - _bound(xs, scale, mn, bits)).max())


finite = st.floats(min_value=-3e4, max_value=3e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(finite, min_size=8, max_size=8 * 16),
    bits=st.sampled_from(BITS),
    asym=st.booleans(),
    group=st.sampled_from([8, 16]),
)
def test_error_at_most_half_the_stored_scale(values, bits, asym, group):
    n = len(values) // group * group
    if n == 0:
        return
    x = torch.tensor(values[:n], dtype=torch.float32).to(torch.bfloat16).reshape(-1, group)
    _check_bound(x, bits, asym)


@settings(max_examples=100, deadline=None)
@given(offset=st.floats(-2e4, 2e4), spread=st.floats(1e-6, 10.0), bits=st.sampled_from(BITS), asym=st.booleans())
def test_groups_far_from_zero_keep_the_bound(offset, spread, bits, asym):
    # the case KVTuner's integer zero-point stored in fp16 gets wrong: offset >> range
    x = (offset + spread * torch.linspace(-1, 1, 64)).reshape(1, 64)
    _check_bound(x, bits, asym)


@settings(max_examples=100, deadline=None)
@given(exp=st.integers(-30, 15), bits=st.sampled_from(BITS), asym=st.booleans())
def test_tiny_and_huge_magnitudes(exp, bits, asym):
    x = (torch.randn(4, 32, generator=torch.Generator().manual_seed(exp + 100)) * 2.0**exp).to(torch.bfloat16)
    _check_bound(x, bits, asym)


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_are_exact_when_asymmetric(bits):
    vals = torch.tensor([0.5, -3.0, 1232.0, 7.8125e-3, -65280.0], dtype=torch.bfloat16)  # bf16 values inside fp16 range
    x = vals.float().unsqueeze(-1).expand(-1, 32).contiguous()
    codes, scale, mn = quantize_groups(x, bits, True)
    assert bool((scale == 0).all())
    assert torch.equal(dequantize_groups(codes, scale, mn, bits), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("asym", [True, False])
def test_zero_groups_are_exact(bits, asym):
    x = torch.zeros(3, 64)
    codes, scale, mn = quantize_groups(x, bits, asym)
    assert torch.equal(dequantize_groups(codes, scale, mn, bits), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("asym", [True, False])
def test_constant_groups_symmetric_within_bound(bits, asym):
    x = torch.full((2, 32), -2.75)
    _check_bound(x, bits, asym)


@pytest.mark.parametrize("asym", [True, False])
def test_non_finite_inputs_are_defined(asym):
    x = torch.tensor([[float("nan"), 1.0, -1.0, 0.5], [float("inf"), 0.0, 1.0, 2.0], [-float("inf"), 1e6, -1e6, 3.0]])
    codes, scale, mn = quantize_groups(x, 8, asym)
    y = dequantize_groups(codes, scale, mn, 8)
    assert bool(torch.isfinite(y).all())
    assert bool((y.abs() <= F16_MAX * (1 + 2**-8)).all())
    assert y[0, 0].abs() <= scale[0].float()  # NaN is encoded as 0
    assert y[1, 0] >= F16_MAX * (1 - 2**-7) and y[2, 0] <= -F16_MAX * (1 - 2**-7)  # +-inf saturate


@pytest.mark.parametrize("asym", [True, False])
def test_8bit_outlier_group(asym):
    # one Qwen-like key outlier channel (|k| ~ 359) next to ordinary ones
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    x[:, 7] = 359.0
    codes, scale, mn = quantize_groups(x.to(torch.bfloat16), 8, asym)
    y = dequantize_groups(codes, scale, mn, 8)
    assert float((y - x.to(torch.bfloat16).float()).abs().max()) <= float(scale.float().max()) / 2 + 1e-3
    assert float((y[:, 7] - 359.0).abs().max()) < 1.5  # outlier kept to within a step


def test_directed_fp16_rounding():
    v = torch.tensor([0.0, 1e-9, -1e-9, 1.0, 1.0001, -1.0001, 3.14159, -65504.0, 65504.0, 6.1e-5, -0.0])
    up, down = f16_round_up(v).float(), f16_round_down(v).float()
    assert bool((up >= v).all()) and bool((down <= v).all())
    assert bool((up - down <= torch.maximum(v.abs() * 2**-10, torch.tensor(2.0**-24))).all())
    exact = torch.tensor([0.5, -2.0, 1024.0, 3.0517578125e-05])
    assert torch.equal(f16_round_up(exact).float(), exact) and torch.equal(f16_round_down(exact).float(), exact)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 256), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 256 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_bit_order_is_little_endian_within_a_byte():
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # a little-endian 32-bit word holds 8 consecutive 4-bit codes, element 0 in the low bits
    word = pack_codes(torch.arange(8, dtype=torch.uint8).reshape(1, 8), 4).view(torch.int32)
    assert int(word) == 0x76543210


@pytest.mark.parametrize("axis, group", [(0, 32), (0, 64), (1, 16), (1, 64)])
def test_grouping_is_a_permutation(axis, group):
    x = torch.arange(2 * 64 * 3 * 64, dtype=torch.float32).reshape(2, 64, 3, 64)
    g = to_groups(x, axis, group)
    assert g.shape[-1] == group
    assert torch.equal(from_groups(g, axis, tuple(x.shape)), x)
    if axis == 1:  # one group = one (head, channel) over consecutive tokens of a page
        assert torch.equal(g[0, 0], x[0, :group, 0, 0])
    else:
        assert torch.equal(g[0, 0], x[0, 0, 0, :group])


def _fp32_metadata_error(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Same asymmetric quantizer with exact fp32 min/scale (what fp32 metadata would store)."""
    mn = x.amin(-1, keepdim=True)
    s = (x.amax(-1, keepdim=True) - mn) / (2**bits - 1)
    q = torch.round((x - mn) / s).clamp(0, 2**bits - 1)
    return q * s + mn - x


@pytest.mark.parametrize("bits", BITS)
def test_fp16_metadata_cost(bits):
    """fp16 (outward-rounded) metadata vs fp32 metadata: the RMS error may grow by at most 1 %.

    Data: key-like rows with Qwen-style outlier channels (|k| up to ~350), grouped per channel.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=g) * (1 + 40 * (torch.rand(1, 64, generator=g) > 0.95))
    x = (x + 5.0).to(torch.bfloat16).float()
    codes, scale, mn = quantize_groups(x, bits, True)
    e16 = (dequantize_groups(codes, scale, mn, bits) - x).pow(2).mean().sqrt()
    e32 = _fp32_metadata_error(x, bits).pow(2).mean().sqrt()
    assert float(e16) <= float(e32) * 1.01, (float(e16), float(e32))
    assert math.isfinite(float(e16))


def test_three_bit_codes_pack_eight_in_three_bytes_little_endian():
    """Code i of each group of eight sits at bits 3i..3i+2 of the three bytes read as a little-endian word."""
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 1], codes[0, 7], codes[0, 8] = 5, 7, 3
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [[5 << 3, 0, 7 << 5, 3, 0, 0]]
    rng = torch.Generator().manual_seed(3)
    many = torch.randint(0, 8, (4, 64 * 24), dtype=torch.uint8, generator=rng)
    assert pack_codes(many, 3).shape == (4, 64 * 9)
    assert torch.equal(unpack_codes(pack_codes(many, 3), 3), many)
    with pytest.raises(ValueError, match="eight at a time"):
        pack_codes(many[:, :12], 3)


def _groups_with_ties(seed: int, rows: int = 4000) -> torch.Tensor:
    """bf16 normal groups, and groups of short mantissas whose quotients sit on exact half-integers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16).float()
    x[:400] = torch.randint(-16, 16, (400, 64), generator=g).float() / 8
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("asym", [True, False])
def test_codes_are_the_rounded_product_with_the_rounded_reciprocal(bits, asym):
    """The code rule of the page format, recomputed in numpy's IEEE fp32 from the stored metadata:
    rint(RN(RN(x - m) * RN(1 / s))), clamped; 0 where s == 0."""
    np = pytest.importorskip("numpy")
    x = _groups_with_ties(bits)
    codes, scale, mn = quantize_groups(x, bits, asym)
    xs = x.numpy().astype(np.float32)
    s = scale.float().numpy().astype(np.float32)[:, None]
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    if asym:
        n = (xs - mn.float().numpy().astype(np.float32)[:, None]).astype(np.float32)
        want = np.clip(np.rint((n * inv).astype(np.float32)), 0, 2**bits - 1)
    else:
        qmax = 2 ** (bits - 1) - 1
        want = np.clip(np.rint((xs * inv).astype(np.float32)), -qmax, qmax) + 2 ** (bits - 1)
    assert np.array_equal(codes.numpy().astype(np.int64), want.astype(np.int64))


@pytest.mark.parametrize("bits", BITS)
def test_the_reciprocal_rule_departs_from_the_division_rule_only_at_half_integers(bits):
    """Against the rule of kernels up to 0.8.1, rint(RN((x - m) / s)): codes differ by one, and only where the
    exact quotient q lies within 2^-22 |q| (in steps) of a half-integer, so the two codes are
    equally near the input to within that margin."""
    x = _groups_with_ties(10 + bits, rows=40000)  # about 1e-5 of bf16 normal codes differ
    codes, scale, mn = quantize_groups(x, bits, True)
    s = scale.float().unsqueeze(-1)
    n = x - mn.float().unsqueeze(-1)
    old = torch.where(s > 0, torch.round(n / s), torch.zeros_like(n)).clamp(0, 2**bits - 1)
    diff = codes.float() != old
    assert diff.any()  # the ties are there, and the rules do split some of them
    assert bool(((codes.float() - old).abs()[diff] == 1).all())
    q = n.double() / s.double().clamp_min(1e-30)  # the exact quotient (fp32 operands, 53-bit division)
    dist = (q - q.floor() - 0.5).abs()
    assert float(dist[diff].max()) <= 2.0**-22 * float(q[diff].abs().max()) + 1e-12
