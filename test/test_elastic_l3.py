"""Plane objects in L3 (elastic_l3.py): sealed with stream, layout, model and key; any other object is refused."""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache import elastic_l3 as E
from kvtuner_hicache.page_format import HEADER_BYTES, key_digest, model_digest

LAYOUT, MODEL, KEY = E.layout_digest("kvtq2-abc"), model_digest("org/m@tp0of1"), key_digest("k1")


def _obj(stream: int = 1, payload: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    obj = torch.randint(0, 256, (HEADER_BYTES + payload,), dtype=torch.uint8, generator=g)
    E.seal(obj.numpy(), stream, LAYOUT, MODEL, KEY)
    return obj


def test_a_sealed_object_passes_and_its_key_names_page_and_stream():
    assert E.problem(_obj().numpy(), 1, LAYOUT, MODEL, KEY) is None
    assert E.plane_key("abc", 0) == "abc.r0" and E.plane_key("abc", 1) != E.plane_key("abc", 0)


@pytest.mark.parametrize("what", ["stream", "layout", "model", "key"])
def test_an_object_of_another_stream_layout_model_or_key_is_refused(what):
    args = {"stream": 1, "layout": LAYOUT, "model": MODEL, "key": KEY}
    args[what] = {"stream": 0, "layout": E.layout_digest("kvtq2-other"), "model": model_digest("x"),
                  "key": key_digest("k2")}[what]
    assert E.problem(_obj().numpy(), args["stream"], args["layout"], args["model"], args["key"]) is not None


@pytest.mark.parametrize("at", [0, 8, 13, 40, HEADER_BYTES - 2, HEADER_BYTES + 7, -1])
def test_any_flipped_bit_is_refused(at):
    obj = _obj().numpy()
    obj[at] ^= 0x04
    assert E.problem(obj, 1, LAYOUT, MODEL, KEY) is not None


def test_truncated_extended_and_foreign_objects_are_refused():
    obj = _obj().numpy()
    assert E.problem(obj[:-16], 1, LAYOUT, MODEL, KEY) is not None  # the size is in the header
    assert E.problem(obj[:HEADER_BYTES], 1, LAYOUT, MODEL, KEY) is not None
    page = torch.zeros(HEADER_BYTES + 4096, dtype=torch.uint8).numpy()  # e.g. a floor page's bytes
    assert E.problem(page, 1, LAYOUT, MODEL, KEY) == "not a plane object"
