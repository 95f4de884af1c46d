"""scripts/cpu/shims/vllm: the pure-torch rotary_embedding that lets SGLang serve on this CPU machine
matches SGLang's own RotaryEmbedding.forward_native."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytestmark = pytest.mark.sglang
SHIM = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "cpu" / "shims" / "vllm" / "_custom_ops.py"


@pytest.fixture(autouse=True)
def _forget_shim():
    """Other tests must not see a `vllm` package: drop the shim's modules afterwards."""
    yield
    import sys

    for name in ("vllm._custom_ops", "vllm"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_shim_rope_matches_sglang_forward_native(is_neox, rotary_dim, monkeypatch):
    monkeypatch.syspath_prepend(str(SHIM.parents[1]))  # what scripts/cpu/serve.sh puts on PYTHONPATH
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    torch.manual_seed(0)
    head, heads, kv_heads, tokens = 64, 4, 2, 37
    rope = RotaryEmbedding(head, rotary_dim, 2048, 10000, is_neox, torch.float32)
    pos = torch.randint(0, 2048, (tokens,))
    q, k = torch.randn(tokens, heads * head), torch.randn(tokens, kv_heads * head)
    want_q, want_k = rope.forward_native(pos, q.clone(), k.clone())
    assert rope.use_fallback_kernel and rope.fallback_rotary_embedding.__module__ == "vllm._custom_ops"
    assert pathlib.Path(importlib.util.find_spec("vllm._custom_ops").origin) == SHIM
    got_q, got_k = q.clone(), k.clone()
    rope.fallback_rotary_embedding(pos, got_q, got_k, head, rope.cos_sin_cache, is_neox)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
