"""One release's compatibility, through its real classes (CI runs this file on every release 0.5.17-0.5.23).

For the installed release: the plugin loads in a fresh process without a hook traceback, exactly the
hooks of its era are in place, the quantized pool is built through the era's real seam, one page
round-trips through the L3 accessors (get_page_buffer_meta, get_data_page, set_from_flat_data_page),
host-memory auto-sizing (0.5.21+) grants our pool bytes, not tokens, and storage_format_tag (0.5.22+)
names our format.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from kvtuner_hicache.sglang_ext import plugin
from kvtuner_hicache.sglang_ext.eras import active_release
from sglang_env import PS, device_streams, kv_host_pool, resolved_server_args, tree_cache
from sglang_pools import mha_device_pool, mla_device_pool

pytestmark = pytest.mark.sglang
QUANT = ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", str(PS)]


def test_plugin_loads_in_a_fresh_process_without_hook_errors():
    """SGLang's own load_plugins() finds the entry point and applies this era's hooks with no traceback."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from sglang.srt.plugins import load_plugins; load_plugins()\n"
            "from kvtuner_hicache.sglang_ext import plugin; print('MISSING', plugin.missing_hooks())\n")
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_KVTUNER_HICACHE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Failed to apply hooks" not in text and "Traceback" not in text, text[-3000:]
    assert f"kvtuner_hicache plugin: SGLang {active_release()}, era " in text
    assert "MISSING []" in out.stdout


def test_exactly_this_eras_hooks(kvtq_hooks, era):
    targets = {t for t, _, _ in plugin.hooks_for(era, active_release())}
    assert plugin.missing_hooks() == []
    assert (plugin.T_HIRADIX in targets) == (era.pool_seam == "hiradix")
    assert (plugin.T_BUILD_POOL in targets) == (era.pool_seam == "assembler")
    assert (plugin.T_POST_INIT in targets) == (era.name in ("A", "B"))
    assert (plugin.T_RESOLVE_ONCE in targets) == (active_release() == "0.5.19")
    uses_resolution_hook = era.resolution_for(active_release()) == "resolution_hook"
    assert plugin._state.resolution_hook_registered == uses_resolution_hook
    if uses_resolution_hook:
        from sglang.srt.arg_groups import resolution_hooks

        assert plugin._resolution_step in resolution_hooks._HOOKS[plugin.RESOLUTION_STEP]


@pytest.mark.parametrize("mla", [False, True])
def test_page_round_trips_through_the_l3_accessors(kvtq_hooks, tiny_model, mla):
    """A page read with get_data_page and written back with set_from_flat_data_page into another slot
    loads to the same device rows; get_page_buffer_meta addresses exactly that page's bytes."""
    sa = resolved_server_args(tiny_model, *QUANT, *(["--kvtuner-hicache-nbits-key", "8"] if mla else []))
    kv = mla_device_pool(2, PS, tokens=1024) if mla else mha_device_pool(2, 2, 128, PS, tokens=1024)
    cache, alloc = tree_cache(kv, sa)
    host, cc = kv_host_pool(cache), cache.cache_controller
    h = cc.write(alloc.alloc(PS))
    page = host.get_data_page(int(h[0]), flat=True).clone()
    ptrs, sizes = host.get_page_buffer_meta(h)
    assert sum(sizes) == host.page_layout.page_bytes and ptrs[0] == host.page_ptr(int(h[0]) // PS)
    h2 = host.alloc(PS)
    host.set_from_flat_data_page(int(h2[0]), page)
    assert torch.equal(host.get_data_page(int(h2[0])), page)
    streams = device_streams(kv)
    rows = [alloc.alloc(PS), alloc.alloc(PS)]
    for hh, dst in zip((h, h2), rows, strict=True):
        for layer in range(kv.layer_num):
            host.load_to_device_per_layer(kv, hh, dst, layer, "kernel")
    for s in streams:
        for layer in range(kv.layer_num):
            assert torch.equal(s[layer][rows[0]], s[layer][rows[1]])


def _release_at_least(version: str) -> bool:
    return tuple(map(int, active_release().split("."))) >= tuple(map(int, version.split(".")))


def test_auto_size_grants_our_pool_bytes(kvtq_hooks, tiny_model, monkeypatch):
    """Auto-sizing (0.5.21+) caps the ratio by bytes; our pool fills those bytes with compression-times
    more tokens. Before 0.5.21 the module must be absent (the era table says so)."""
    has_auto_size = importlib.util.find_spec("sglang.srt.mem_cache.hicache_auto_size") is not None
    assert has_auto_size == _release_at_least("0.5.21")
    if not has_auto_size:
        return
    from sglang.srt.mem_cache import hicache_auto_size

    budget = 1 << 20  # what this machine would grant the rank (a small number, so the cap binds)
    monkeypatch.setattr(hicache_auto_size, "host_memory_budget_bytes", lambda *a, **k: budget)
    sa = resolved_server_args(tiny_model, *QUANT)
    kv = mha_device_pool(2, 2, 64, PS, tokens=2048)  # 1 KiB/token bf16: 2 MiB of device KV
    cache, _ = tree_cache(kv, sa, auto_size=True)
    host = kv_host_pool(cache)
    granted = budget * sa.hicache_host_memory_fraction if sa.hicache_host_memory_fraction else budget
    pool_bytes = host.size * host.size_per_token
    assert 0.85 * granted <= pool_bytes <= granted
    bf16_tokens_same_bytes = pool_bytes / host.page_layout.shape.bf16_bytes_per_token()
    assert host.size >= 3 * bf16_tokens_same_bytes  # K4V4: 3.2x the tokens of a bf16 pool of these bytes


def test_storage_format_tag_names_our_format(kvtq_hooks, tiny_model, era):
    """0.5.22+ appends HostKVCache.storage_format_tag to the model name SGLang's backends key on."""
    from sglang.srt.mem_cache.pool_host.base import HostKVCache

    assert hasattr(HostKVCache, "storage_format_tag") == era.has_storage_format_tag == _release_at_least("0.5.22")
    sa = resolved_server_args(tiny_model, *QUANT)
    host = kv_host_pool(tree_cache(mha_device_pool(2, 2, 64, PS, tokens=512), sa)[0])
    if not era.has_storage_format_tag:
        return  # only our proxy's key suffix namespaces L3 there (test_storage.py)
    from sglang.srt.managers.cache_controller import storage_model_name

    assert host.storage_format_tag == host.page_layout.tag
    assert storage_model_name("Qwen/Qwen2.5-7B", host) == f"Qwen/Qwen2.5-7B-{host.page_layout.tag}"
