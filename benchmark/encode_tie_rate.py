"""How often the encode kernel of 0.8.x left its fast path: the share of 8-element items whose quotient lies near a
half-integer (CPU, counts, no timing). Kernel 0.9.0 has no such path: its codes are rint(RN(n * RN(1/s))), the
fast path itself (docs/page-format.md, "Codes"), and `exact_fix` below is the share of codes in which that rule
departs from the division rule of 0.8.x.

The 0.8.x kernel (sgl-kernel/csrc/kvtq_kernels.cu, quant8) coded an item of 8 elements with r = RN(RN(x - m) * RN(1/s))
and a round-to-integer add; when any element's |r - rint(r)| >= 0.4999, the item is redone with the correctly
rounded division, all 8 elements through an out-of-line call, so that codes equal the reference's
rint(RN((x - m) / s)) bit for bit. On a GPU a warp takes that branch when any of its 32 lanes' items does.
This script replays the fast path's fp32 arithmetic (IEEE, round to nearest, as the kernel's intrinsics) on
CPU tensors, groups the elements as the default config does (keys per-channel: 64 tokens of one channel;
values per-token: 64 elements of one token row; asymmetric), forms items as 8 neighbouring channels of one
token row (the kernel's 16-byte loads) and reports, per data kind and bits:

  element    share of elements near a half-integer
  item       share of 8-element items that take the division path
  warp       share of 32 neighbouring items (memory order) of which at least one does
  exact_fix  share of elements whose fast-path code differs from the reference's (the path's reason to exist)

Data kinds: `normal` (torch.randn rounded to bf16, as benchmark/bench_quantize.py and bench_transfer.py fill
the device pool), `dequantized` (the same after a round trip through that config: what bench_transfer's quantize
row read until 2026-12-07, after its loads had written decoded pages into the source rows), and, with --model,
`model` (a real model's prefill KV in bf16, from the accuracy harness's model cache).

Usage: PYTHONPATH=python python3 benchmark/encode_tie_rate.py [--model qwen2.5-coder-0.5b] [--tokens 1024]
       [--json docs/results/encode_tie_rate.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from kvtuner_hicache.quant import reference as R  # noqa: E402

GROUP = 64
NEAR = 0.4999  # the kernel's threshold (quant8)
AXES = {"keys": 1, "values": 0}  # the default config: K per-channel, V per-token


def fast_path(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [groups, G] fp32 (sanitized). (near [groups, G] bool, fast code != reference code [groups, G] bool)."""
    levels = float(2**bits - 1)
    mn = R.f16_round_down(x.amin(-1)).float()[:, None]
    s = R.f16_round_up(R._div(x.amax(-1) - mn[:, 0], levels)).float()[:, None]
    inv = torch.where(s > 0, torch.ones_like(s) / s, torch.zeros_like(s))  # RN(1/s), as __frcp_rn
    n = x - mn
    r = n * inv
    near = (r - torch.round(r)).abs() >= NEAR
    ref = torch.where(s > 0, torch.round(n / s), torch.zeros_like(n)).clamp(0, levels)
    return near, torch.round(r).clamp(0, levels) != ref


def rates(x: torch.Tensor, axis: int, bits: int) -> dict[str, float]:
    """x: [pages, page_size, H, D] bf16 values of one stream."""
    shape = tuple(x.shape)
    g = R.to_groups(R.sanitize(x), axis, GROUP)
    near, wrong = fast_path(g.reshape(-1, GROUP), bits)
    near = R.from_groups(near.reshape(g.shape), axis, shape)  # back to [P, T, H, D]: items along the row
    items = near.reshape(-1, 8).any(-1)
    whole = items.numel() // 32 * 32
    return {"element": near.float().mean().item(), "item": items.float().mean().item(),
            "warp": items[:whole].reshape(-1, 32).any(-1).float().mean().item(),
            "exact_fix": wrong.float().mean().item(), "elements": near.numel()}


def roundtrip(x: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    """x after quantize -> dequantize under (axis, bits), rounded to bf16 like a decode into the pool."""
    shape = tuple(x.shape)
    g = R.to_groups(x, axis, GROUP)
    codes, scale, mn = R.quantize_groups(g, bits, True)
    return R.from_groups(R.dequantize_groups(codes, scale, mn, bits), axis, shape).to(torch.bfloat16)


def model_kv(name: str, tokens: int) -> dict[str, torch.Tensor]:
    """A real model's prefill KV of `tokens` tokens of the harness's essay text, as [layers, T, H, D] bf16 per stream."""
    from kvtuner_hicache.eval import data as D
    from kvtuner_hicache.eval import harness as H
    from kvtuner_hicache.eval import models as M

    lm = M.load(name, allow_fetch=False)
    ids = D.encode(lm.tokenizer, D.essay_text(M.data_dir()))[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"only {len(ids)} tokens of essay text")
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), use_cache=True)
    kv = H.cache_kv(out.past_key_values)
    return {"keys": torch.stack([k[0].transpose(0, 1) for k, _ in kv]).to(torch.bfloat16),
            "values": torch.stack([v[0].transpose(0, 1) for _, v in kv]).to(torch.bfloat16)}


def as_pages(t: torch.Tensor) -> torch.Tensor:
    """[layers, T, H, D] -> [layers * T / 64, 64, H, D] (pages of 64 tokens, layer by layer)."""
    layers, tokens, h, d = t.shape
    return t.reshape(layers * tokens // GROUP, GROUP, h, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--pages", type=int, default=2048, help="pages of 64 tokens of normal data per stream")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--model", default=None, help="an eval model in the cache (scripts/fetch_models.sh)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    normal = {s: torch.randn(args.pages, GROUP, args.heads, args.head_dim, generator=gen).to(torch.bfloat16)
              for s in AXES}
    sources = {"normal": normal}
    if args.model:
        sources["model"] = {s: as_pages(t) for s, t in model_kv(args.model, args.tokens).items()}
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for kind, data in sources.items():
            for stream, axis in AXES.items():
                rows.append({"data": kind, "bits": bits, "stream": stream, **rates(data[stream], axis, bits)})
                if kind == "normal":
                    rt = roundtrip(data[stream], axis, bits)
                    rows.append({"data": "dequantized", "bits": bits, "stream": stream, **rates(rt, axis, bits)})
    print("| data | bits | stream | elements near a half-integer | items on the division path | warps "
          "(32 items) | fast code != reference |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['bits']} | {r['stream']} | {r['element']:.2e} | {r['item']:.2e} | "
              f"{r['warp']:.3f} | {r['exact_fix']:.2e} |")
    if args.json:
        meta = {"threshold": NEAR, "group": GROUP, "model": args.model, "tokens": args.tokens,
                "normal_shape": [args.pages, GROUP, args.heads, args.head_dim], "command": " ".join(sys.argv)}
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
