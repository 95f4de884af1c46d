"""Accuracy probes of page-format variants that the format does not have (issue 14; results in docs/accuracy.md).

Kept so that a negative result can be re-run rather than re-invented. Each variant patches the page format or
the harness's round trip in this process only, then runs `python -m kvtuner_hicache.eval` with the remaining
arguments (same flags, same table, same JSON):

  --variant vgroup128   per-token groups (values, `t`) of 128 elements while per-channel groups (keys, `c`)
                        stay at 64 tokens. Only configs named with `-g32` are changed; `g32` is a marker here,
                        so `K3cV2t-a-g32` reads as K3 per-channel g64 + V2 per-token g128, and the other
                        configs of the same run are the unchanged comparators.
  --variant rotate      a randomized Hadamard rotation of every quantized stream along head_dim (keys and values;
                        `--rotate k` or `v` for one) before the page encode, undone after the decode. The rotation
                        runs in fp32 and its result is rounded to the pool's bf16, as a GPU encode would read it.

Usage: python benchmark/probe_kv_variants.py --variant rotate -- --model qwen2.5-coder-1.5b --configs bf16,K3cV2t-a-g64 ...
"""

from __future__ import annotations

import argparse
import sys

import kvtuner_hicache.eval.harness as harness
import kvtuner_hicache.page_format as page_format
import torch
from kvtuner_hicache.config import AXIS_PER_CHANNEL
from kvtuner_hicache.eval import cli

MARKER_GROUP = 32


def patch_value_groups() -> None:
    """Configs with q_group_size 32: per-channel groups of 64 tokens, per-token groups of 128 elements."""
    geometry, spec = page_format.chunk_geometry, page_format.ChunkSpec

    def group(axis: int, g: int) -> int:
        return g if g != MARKER_GROUP else (64 if axis == AXIS_PER_CHANNEL else 128)

    page_format.chunk_geometry = lambda bits, axis, g, *rest: geometry(bits, axis, group(axis, g), *rest)
    page_format.ChunkSpec = lambda s, layer, bits, axis, g, *rest: spec(s, layer, bits, axis, group(axis, g), *rest)


def hadamard(d: int, seed: int = 1234) -> torch.Tensor:
    """diag(random signs) @ H_d / sqrt(d): orthogonal, so its transpose undoes it."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != d:
        raise ValueError(f"head_dim {d} is not a power of two")
    sign = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed + d)).float() * 2 - 1
    return sign[:, None] * h / d ** 0.5


def patch_rotation(streams: set[str]) -> None:
    """Rotate the selected streams (k = buffer 0, v = buffer 1) around the harness's page round trip."""
    trip = harness.roundtrip_pages
    mats: dict[int, torch.Tensor] = {}

    def rot(t: torch.Tensor, inverse: bool) -> torch.Tensor:
        m = mats.setdefault(t.shape[-1], hadamard(t.shape[-1]))
        return (t.float() @ (m.T if inverse else m)).to(t.dtype)

    def rotated_trip(layout, layer_kv):
        pick = ["k" in streams, "v" in streams]
        fwd = [[rot(t, False) if pick[b] else t for t in per] for b, per in enumerate(layer_kv)]
        out = trip(layout, fwd)
        return [[rot(t, True) if pick[b] else t for t in per] for b, per in enumerate(out)]

    harness.roundtrip_pages = rotated_trip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, choices=("vgroup128", "rotate"))
    ap.add_argument("--rotate", default="k,v", help="streams to rotate with --variant rotate: k, v or k,v")
    args, rest = ap.parse_known_args()
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.variant == "vgroup128":
        patch_value_groups()
    else:
        streams = {s.strip() for s in args.rotate.split(",") if s.strip()}
        if not streams or streams - {"k", "v"}:
            ap.error(f"--rotate takes k, v or k,v, got {args.rotate!r}")
        patch_rotation(streams)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
