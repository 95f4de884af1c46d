"""Print bytes per token of the page format for reference model shapes: `python -m kvtuner_hicache.page_format_table`."""

from __future__ import annotations

import argparse

from kvtuner_hicache.config import KVShape, QuantConfig
from kvtuner_hicache.page_format import PageLayout

SHAPES = {
    "Qwen2.5-7B (28L, 4x128)": KVShape.mha(28, 4, 128),
    "Llama-3.1-8B (32L, 8x128)": KVShape.mha(32, 8, 128),
    "DeepSeek-V3 MLA (61L, 512+64)": KVShape.mla(61, 512, 64),
}

CONFIGS = {
    "KV8": QuantConfig(nbits_key=8, nbits_value=8),
    "K8V4": QuantConfig(nbits_key=8, nbits_value=4),
    "KV4 (default)": QuantConfig(),
    "KV4 sym": QuantConfig(asym=False),
    "KV4 g128 per-token": QuantConfig(axis_key=0, q_group_size=128),
    "K4V2": QuantConfig(nbits_key=4, nbits_value=2),
    "KV2": QuantConfig(nbits_key=2, nbits_value=2),
}


def rows(page_size: int) -> list[tuple[str, str, str]]:
    out = []
    for sname, shape in SHAPES.items():
        out.append((sname, "bf16 (upstream)", f"{shape.bf16_bytes_per_token()} | 16.00 | 1.00x"))
        for cname, cfg in CONFIGS.items():
            if shape.is_mla and cfg.nbits_key < 8:
                cfg = cfg.with_(nbits_key=8)  # MLA keeps the rope part at 8 bits
                cname += " (rope 8b)"
            try:
                lay = PageLayout(cfg, shape, page_size)
            except ValueError:
                continue
            out.append((sname, cname, f"{lay.bytes_per_token:.0f} | {lay.effective_bits:.3f} | {lay.compression_vs_bf16:.2f}x"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--page-size", type=int, default=64)
    args = ap.parse_args()
    print("| model | config | bytes/token | effective bits/element | vs bf16 |")
    print("| --- | --- | --- | --- | --- |")
    for s, c, v in rows(args.page_size):
        print(f"| {s} | {c} | {v} |")


if __name__ == "__main__":
    main()
