"""Real SGLang objects on CPU for the integration tests, on whichever supported release is installed.

A module of its own (not conftest.py), like sglang_pools.py. Every helper goes through the same entry
points a server uses: `prepare_server_args` + the release's resolution, `runtime_context.publish`,
`registry.create_tree_cache` (HiRadixCache on 0.5.17/0.5.18, UnifiedRadixCache from 0.5.19).
"""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import torch

PS = 64


def world_group() -> Any:
    """A one-rank gloo process group (SGLang's controllers all-reduce hit counts over it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.group.WORLD


def resolved_server_args(model_path: str, *argv: str) -> Any:
    """ServerArgs as the launcher has them: parsed, resolved by the release's own pipeline, published."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import prepare_server_args

    sa = prepare_server_args(["--model-path", model_path, "--device", "cpu", *argv])
    resolve = getattr(sa, "resolve_once", None)
    if resolve is not None:  # 0.5.19+: prepare_server_args returns raw input
        resolve()
    runtime_context.publish(sa, role="scheduler")
    return sa


def tree_cache(kv: Any, sa: Any, *, auto_size: bool = False) -> tuple[Any, Any]:
    """(tree cache, allocator) built by SGLang's registry for device pool `kv`, HiCache as `sa` says."""
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    group = world_group()
    alloc = PagedTokenToKVPoolAllocator(kv.size, kv.page_size, torch.bfloat16, "cpu", kv, need_sort=False)
    req = ReqToTokenPool(size=4, max_context_len=4096, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req, token_to_kv_pool_allocator=alloc,
                             page_size=kv.page_size, tp_cache_group=group)
    ctx = SimpleNamespace(
        server_args=sa, params=params, is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False,
        enable_hierarchical_cache=bool(getattr(sa, "enable_hierarchical_cache", False)), disable_radix_cache=False,
        tp_worker=SimpleNamespace(register_hicache_layer_transfer_counter=lambda *a, **k: None),
        model_config=None, tp_size=1, tp_rank=0, tp_group=group, full_tokens_per_layer=None,
        effective_chunked_prefill_size=None,  # read by 0.5.19-0.5.21
    )
    if auto_size:  # 0.5.21+: what kv_cache_builder wraps around create_tree_cache
        from sglang.srt.mem_cache.hicache_auto_size import auto_size_hicache
        from sglang.srt.runtime_context import get_parallel

        # auto-sizing MIN-all-reduces the ratio over the world group the scheduler would have built
        with get_parallel().override(world_group=SimpleNamespace(cpu_group=group)):
            with auto_size_hicache(params, None, enabled=True):
                return registry.create_tree_cache(ctx), alloc
    return registry.create_tree_cache(ctx), alloc


def kv_host_pool(cache: Any) -> Any:
    """The KV host pool of a HiCache tree (the anchor of a unified tree's pool group)."""
    from kvtuner_hicache.sglang_ext.plugin import kv_host_pool_of

    return kv_host_pool_of(cache.cache_controller.mem_pool_host)


def device_streams(kv: Any) -> list[list[torch.Tensor]]:
    return [kv.kv_buffer] if hasattr(kv, "kv_buffer") else [kv.k_buffer, kv.v_buffer]


def controller_round_trip(cache: Any, kv: Any, alloc: Any, pages: int = 3) -> tuple[list, list, torch.Tensor]:
    """L1 -> L2 -> L1 through the real controller: (expected rows, loaded rows, host indices)."""
    from kvtuner_hicache.quant import roundtrip_pages

    cc = cache.cache_controller
    host = kv_host_pool(cache)
    streams = device_streams(kv)
    src = alloc.alloc(pages * kv.page_size)
    expected = roundtrip_pages(host.page_layout, [[b[src] for b in s] for s in streams])
    h = cc.write(src)
    assert h is not None, "the controller found no host room"
    dst = cc.load(h)
    cc.start_loading()
    got = [[b[dst].clone() for b in s] for s in streams]
    return expected, got, h
