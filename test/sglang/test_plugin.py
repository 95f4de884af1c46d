"""Hook wiring through the real tree-cache build of the installed release: the pool seam, the
controller round trip, the refusal of foreign pools, and an inert plugin without the flag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext import plugin
from sglang_env import PS, controller_round_trip, kv_host_pool, resolved_server_args, tree_cache
from sglang_pools import mha_device_pool, mla_device_pool

pytestmark = pytest.mark.sglang
QUANT = ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", str(PS)]


@pytest.mark.parametrize("mla", [False, True])
def test_tree_cache_gets_our_pool_and_controller_round_trips(kvtq_hooks, tiny_model, era, mla):
    """registry.create_tree_cache -> HiRadixCache (0.5.17/18) or UnifiedRadixCache (0.5.19+) -> our pool;
    L1 -> L2 -> L1 through SGLang's own controller is bit-exact against the reference round trip."""
    extra = ["--kvtuner-hicache-nbits-key", "8"] if mla else []
    sa = resolved_server_args(tiny_model, *QUANT, *extra)
    kv = mla_device_pool(2, PS, tokens=1024) if mla else mha_device_pool(2, 4, 128, PS, tokens=1024)
    cache, alloc = tree_cache(kv, sa)
    host = kv_host_pool(cache)
    assert host.kvtq_quantized and host.quant_config == plugin.active_config()
    assert type(cache).__name__ == ("HiRadixCache" if era.pool_seam == "hiradix" else "UnifiedRadixCache")
    expected, got, _ = controller_round_trip(cache, kv, alloc)
    for b in range(len(expected)):
        for layer in range(kv.layer_num):
            assert torch.equal(got[b][layer], expected[b][layer]), (b, layer)


def test_hiradix_substitution_is_scoped(kvtq_hooks, tiny_model, era):
    """On the HiRadixCache releases the class swap lives only inside one __init__."""
    if era.pool_seam != "hiradix":
        import importlib.util

        # 0.5.19/0.5.20 still ship the module (dead code), 0.5.21+ deleted it; either way no hook on it
        assert plugin.T_HIRADIX not in {t for t, _, _ in plugin.hooks_for(era, "")}
        assert importlib.util.find_spec("sglang.srt.mem_cache.hiradix_cache") is None or era.name == "C"
        return
    import sglang.srt.mem_cache.hiradix_cache as hr

    before = (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost)
    sa = resolved_server_args(tiny_model, *QUANT)
    tree_cache(mha_device_pool(2, 2, 64, PS, tokens=512), sa)
    assert (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost) == before


def test_seam_refuses_pools_it_cannot_quantize(kvtq_hooks):
    cfg = QuantConfig()
    kv = mha_device_pool(2, 2, 64, PS, tokens=512)
    with pytest.raises(ConfigError, match="plain MHA/GQA and MLA KV pools only"):
        plugin.build_quantized_pool(kv, cfg, host_to_device_ratio=2.0, host_size=0, page_size=PS,
                                    layout="page_first", pool_label="swa")
    with pytest.raises(ConfigError, match="MTP draft layers"):
        plugin.build_quantized_pool(kv, cfg, host_to_device_ratio=2.0, host_size=0, page_size=PS,
                                    layout="page_first", mtp_draft_device_pools=(kv,))
    with pytest.raises(ConfigError, match="page_first"):
        plugin.build_quantized_pool(kv, cfg, host_to_device_ratio=2.0, host_size=0, page_size=PS,
                                    layout="layer_first")


def test_foreign_pool_stops_the_server(kvtq_hooks):
    kargs.set_env_config(QuantConfig())
    bf16 = SimpleNamespace(cache_controller=SimpleNamespace(mem_pool_host=object()))
    with pytest.raises(RuntimeError, match="not a quantized one"):
        plugin._create_tree_cache(bf16, SimpleNamespace())
    group = SimpleNamespace(anchor_entry=SimpleNamespace(host_pool=object()))  # a unified tree's pool group
    with pytest.raises(RuntimeError, match="not a quantized one"):
        plugin.require_ours(group, "UnifiedRadixCache")
    no_hicache = SimpleNamespace()
    with pytest.raises(RuntimeError, match="no HiCache controller"):
        plugin._create_tree_cache(no_hicache, SimpleNamespace(server_args=SimpleNamespace(enable_hierarchical_cache=True)))


def test_inert_without_the_flag(kvtq_hooks):
    """Without --enable-kvtuner-hicache every hook hands SGLang's own objects through untouched."""
    assert plugin.active_config() is None
    calls = []

    def orig_build(**kw):
        calls.append(kw)
        return "sglang's pool"

    assert plugin._build_kv_host_pool(orig_build, kv_pool="kv", page_size=PS) == "sglang's pool"
    assert calls == [{"kv_pool": "kv", "page_size": PS}]
    tree = SimpleNamespace(cache_controller=SimpleNamespace(mem_pool_host=object()))
    assert plugin._create_tree_cache(tree, SimpleNamespace()) is tree
    backend = object()
    stock_pool = SimpleNamespace()
    assert plugin._create_backend(lambda *a, **k: backend, None, "file", None, stock_pool) is backend
    assert plugin._unified_init_hicache(lambda self, sa: "built", object(), None) == "built"


def test_quantized_pool_backends_get_the_proxy_others_do_not(kvtq_hooks):
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy
    from sglang_pools import bf16_host_pool, quant_host_pool

    kv = mha_device_pool(2, 2, 64, PS, tokens=512)
    inner = SimpleNamespace()
    ours = plugin._create_backend(lambda *a, **k: inner, None, "file", None, quant_host_pool(kv))
    assert isinstance(ours, KVTQStorageProxy)
    assert plugin._create_backend(lambda *a, **k: inner, None, "file", None, bf16_host_pool(kv)) is inner


def test_hooks_verified_by_identity(kvtq_hooks, era):
    """Every target of this era is wrapped; a target left as it was is reported, by name."""
    assert plugin.missing_hooks() == []
    target = plugin.T_TREE
    saved = plugin._state.originals[target]
    try:
        plugin._state.originals[target] = plugin._resolve(target)  # as if apply_hooks had not wrapped it
        assert plugin.missing_hooks() == [target]
        kargs.set_env_config(QuantConfig())
        with pytest.raises(ConfigError, match="registry.create_tree_cache"):
            plugin.verify_hooks(required=True)
    finally:
        plugin._state.originals[target] = saved


def test_the_pool_learns_a_loads_cpu_indices_from_the_controller(kvtq_hooks, tiny_model):
    """SGLang's controller moves a load's host indices to the GPU (`move_indices`); the plugin's tap hands the
    pool the CPU original, so the pool knows the page ids on the host without a device read (staged loads,
    elastic bookkeeping). A tensor the controller did not move has no CPU copy."""
    sa = resolved_server_args(tiny_model, *QUANT)
    kv = mha_device_pool(2, 4, 128, PS, tokens=1024)
    cache, _ = tree_cache(kv, sa)
    cc, host = cache.cache_controller, kv_host_pool(cache)
    assert getattr(cc.move_indices, "kvtq_tracked", False)
    cc.device = "meta"  # stands in for the GPU: the move makes a new tensor, as a copy to CUDA does
    on_cpu = torch.arange(2 * PS, 5 * PS)
    moved, _ = cc.move_indices(on_cpu, torch.arange(3 * PS))
    assert moved.device.type == "meta"
    host._load_ids(moved, 0, "kernel", False)
    assert torch.equal(host._load_cpu_page_ids, torch.tensor([2, 3, 4]))
    host._load_ids(moved, 1, "kernel", False)  # the later layers of that load keep it
    assert torch.equal(host._load_cpu_page_ids, torch.tensor([2, 3, 4]))
    host._load_ids(torch.arange(3 * PS, device="meta"), 0, "kernel", False)
    assert host._load_cpu_page_ids is None
    host._load_ids(on_cpu, 0, "kernel", False)  # CPU pools: the ids are on the CPU already
    assert torch.equal(host._load_cpu_page_ids, torch.tensor([2, 3, 4]))
