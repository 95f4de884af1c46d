"""CPU-serving shim (written by kvtuner-hicache, not vLLM code). SGLang's RotaryEmbedding, on a CPU
device without SGLang's CPU kernel package (`SGLANG_USE_CPU_ENGINE` off), imports
`vllm._custom_ops.rotary_embedding`; vLLM is not installed here. This module provides that one op in
plain torch with the same in-place contract, so `scripts/cpu/serve.sh` can start a real SGLang server on
a CPU-only machine. test/sglang/test_cpu_serving_shim.py checks it against SGLang's own forward_native.
"""

from __future__ import annotations

import torch


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotate query and key in place: [tokens, heads * head_size] (or [tokens, heads, head_size]); the first
    rot_dim = cos_sin_cache.shape[-1] dims of each head rotate, NeoX (halves) or GPT-J (interleaved) style."""
    pos = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, pos).float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1] * 2
    for x in (query, key):
        if x is None:
            continue
        t = x.view(pos.numel(), -1, head_size)
        xr = t[..., :rot].float()
        if is_neox:
            x1, x2 = xr.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = xr[..., ::2], xr[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        t[..., :rot] = out.to(t.dtype)
