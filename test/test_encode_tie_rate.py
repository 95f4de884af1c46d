"""benchmark/encode_tie_rate.py: its replay of the encode's fast path flags every element whose fast code differs
from the reference (the kernel's reason to trust the fast path elsewhere), and decoded values flag none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import encode_tie_rate as etr  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_fast_code_that_differs_from_the_reference_is_flagged_near(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(20000, etr.GROUP, generator=gen).to(torch.bfloat16).float()
    x[:50] = torch.randint(-8, 8, (50, etr.GROUP), generator=gen).float() / 4  # short mantissas: exact ties
    near, wrong = etr.fast_path(x, bits)
    assert near.any()  # bf16 inputs with fp16 min/scale do sit on half-integers
    assert not (wrong & ~near).any()


@pytest.mark.parametrize("axis,stream", [(1, "keys"), (0, "values")])
def test_decoded_rows_never_leave_the_fast_path_and_normal_rows_do(axis, stream):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, etr.GROUP, 2, 64, generator=gen).to(torch.bfloat16)
    r = etr.rates(x, axis, 4)
    assert r["item"] > 0 and r["warp"] >= r["item"] and r["elements"] == x.numel()
    assert etr.rates(etr.roundtrip(x, axis, 4), axis, 4)["element"] == 0.0
