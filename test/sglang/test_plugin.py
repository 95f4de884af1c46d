"""Hook wiring: real HiRadixCache + HiCacheController on CPU, scoped substitution, verification."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.quant import roundtrip_pages
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext import plugin
from sglang_pools import mha_device_pool, mla_device_pool

pytestmark = pytest.mark.sglang
PS = 64


@pytest.fixture(scope="module")
def world():
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.group.WORLD


def _server_args(**kw):
    d = dict(hicache_ratio=2.0, hicache_size=0, hicache_mem_layout="page_first", hicache_storage_backend=None,
             hicache_storage_backend_extra_config=None, hicache_storage_prefetch_policy="best_effort",
             extra_metric_labels=None, hicache_write_policy="write_through", hicache_io_backend="kernel",
             served_model_name="m", enable_hierarchical_cache=True)
    d.update(kw)
    return SimpleNamespace(**d)


def _hiradix(kv, world):
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    alloc = PagedTokenToKVPoolAllocator(kv.size, PS, torch.bfloat16, "cpu", kv, need_sort=False)
    req = ReqToTokenPool(size=4, max_context_len=2048, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req, token_to_kv_pool_allocator=alloc, page_size=PS,
                             tp_cache_group=world)
    return HiRadixCache(params=params, server_args=_server_args()), alloc


@pytest.mark.parametrize("mla", [False, True])
def test_hiradix_cache_gets_our_pool_and_controller_round_trips(kvtq_hooks, world, mla):
    import sglang.srt.mem_cache.hiradix_cache as hr

    before = (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost)
    kargs.set_env_config(QuantConfig(nbits_key=8) if mla else QuantConfig())
    kv = mla_device_pool(2, PS, tokens=1024) if mla else mha_device_pool(2, 4, 128, PS, tokens=1024)
    cache, alloc = _hiradix(kv, world)
    host = cache.cache_controller.mem_pool_host
    assert host is cache.token_to_kv_pool_host and host.kvtq_quantized
    assert (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost) == before  # scoped, restored
    # L1 -> L2 -> L1 through the real controller (write stream, per-layer load loop)
    cc = cache.cache_controller
    src = alloc.alloc(3 * PS)
    streams = [kv.kv_buffer] if mla else [kv.k_buffer, kv.v_buffer]
    expected = roundtrip_pages(host.page_layout, [[b[src] for b in s] for s in streams])
    h = cc.write(src)
    assert h is not None and len(cc.ack_write_queue) == 1
    dst = cc.load(h)
    cc.start_loading()
    for b, s in enumerate(streams):
        for layer in range(2):
            assert torch.equal(s[layer][dst], expected[b][layer])


def test_hiradix_hook_refuses_a_foreign_pool(kvtq_hooks):
    kargs.set_env_config(QuantConfig())

    def orig(self, params, server_args):
        self.token_to_kv_pool_host = object()

    with pytest.raises(RuntimeError, match="not a quantized"):
        plugin._hiradix_init(orig, SimpleNamespace(), None, _server_args())


def test_tree_cache_check_and_unified_refusal(kvtq_hooks):
    kargs.set_env_config(QuantConfig())
    ctx = SimpleNamespace(server_args=_server_args())
    bf16 = SimpleNamespace(cache_controller=SimpleNamespace(mem_pool_host=object()))
    with pytest.raises(RuntimeError, match="not a quantized"):
        plugin._create_tree_cache(bf16, ctx)
    with pytest.raises(ConfigError, match="unified radix cache"):
        plugin._unified_init_hicache(lambda *a: None, object(), _server_args())
    kargs.set_env_config(None)
    assert plugin._create_tree_cache(bf16, ctx) is bf16  # plugin loaded but off: untouched


def test_hooks_verified(kvtq_hooks):
    assert plugin.missing_hooks() == []
    assert not plugin._wraps_hook(lambda: None, plugin._add_cli_args)
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

    assert plugin._wraps_hook(HiRadixCache.__init__, plugin._hiradix_init)
