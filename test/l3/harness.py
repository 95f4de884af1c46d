"""Drive SGLang 0.5.17's own HiCache storage path on CPU: a real HiCacheController with our host
pool, its backup/prefetch threads, and a real storage backend built by StorageBackendFactory.

Here the test plays the scheduler's part (allocate host slots for a prefetch hit, hand the
operation to the I/O thread), exactly as HiRadixCache does, and nothing else.
"""

from __future__ import annotations

import itertools
import pathlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from kvtuner_hicache.config import QuantConfig
from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.runtime_context import get_parallel

# Realistic per-layer shape (Qwen2.5-7B heads, fewer layers): page 64, 4 KV heads x 128
LAYERS, HEADS, HEAD_DIM, PAGE = 4, 4, 128, 64
KV4 = QuantConfig()  # the default: KV4 asymmetric, group 64
_ids = itertools.count()

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN = REPO / ".cache" / "l3" / "run"  # engine pids, mounts, env (scripts/l3/start_engines.sh)


def device_pool(tokens: int = 16 * PAGE, seed: int = 0) -> MHATokenToKVPool:
    pool = MHATokenToKVPool(size=tokens, page_size=PAGE, dtype=torch.bfloat16, head_num=HEADS, head_dim=HEAD_DIM,
                            layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    g = torch.Generator().manual_seed(seed)
    for b in pool.k_buffer + pool.v_buffer:
        b.copy_(torch.randn(b.shape, generator=g) * 2 + 0.5)
    return pool


def host_pool(dev: MHATokenToKVPool, cfg: QuantConfig | None) -> Any:
    if cfg is None:
        import inspect

        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

        if "buffer_info" in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:  # 0.5.23+
            info = dev.get_device_pool_infos()[0].buffer_info
            return MHATokenToKVPoolHost(info, 2.0, 0, PAGE, "page_first", pin_memory=False,
                                        device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                                        end_layer=dev.end_layer)
        return MHATokenToKVPoolHost(dev, 2.0, 0, PAGE, "page_first", pin_memory=False)
    import inspect

    from kvtuner_hicache.sglang_ext.elastic_pool import ElasticMHATokenToKVPoolHost
    from kvtuner_hicache.sglang_ext.host_pool import QuantizedMHATokenToKVPoolHost

    cls = ElasticMHATokenToKVPoolHost if cfg.elastic else QuantizedMHATokenToKVPoolHost
    params = inspect.signature(QuantizedMHATokenToKVPoolHost.__mro__[1].__init__).parameters
    if "host_to_device_ratio" in params and params["host_to_device_ratio"].kind is inspect.Parameter.KEYWORD_ONLY:
        return cls(dev, quant_config=cfg, host_to_device_ratio=2.0, host_size=0,
                   page_size=PAGE, layout="page_first", pin_memory=False)
    return cls(dev, 2.0, 0, PAGE, "page_first", pin_memory=False, quant_config=cfg)


@dataclass
class Rig:
    cc: HiCacheController
    dev: MHATokenToKVPool
    host: Any
    cfg: QuantConfig | None

    @property
    def backend(self) -> Any:
        return self.cc.storage_backend  # our namespacing proxy

    @property
    def inner(self) -> Any:
        return getattr(self.cc.storage_backend, "inner", self.cc.storage_backend)

    def page_bytes(self) -> int:
        page = self.host.get_data_page(0)
        return page.numel() * page.element_size()

    def close(self) -> None:
        reader = getattr(self.backend, "kvtq_reader", None)
        if reader is not None:
            reader.close()  # its queued plane reads finish before the backend goes
        self.cc.detach_storage_backend()


_ONE_RANK = dict(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0, attn_cp_size=1,
                 attn_cp_rank=0, attn_tp_size=1, attn_tp_rank=0)


def _controller(alloc: Any, host: Any, backend: str, model: str, extra: dict[str, Any]) -> HiCacheController:
    return HiCacheController(alloc, host, PAGE, None, threading.Event(), write_policy="write_through",
                             io_backend="kernel", storage_backend=backend, prefetch_threshold=PAGE,
                             model_name=model, storage_backend_extra_config=dict(extra))


def make_rig(backend: str, extra: dict[str, Any], cfg: QuantConfig | None, model: str = "test-model",
             seed: int = 0) -> Rig:
    dev = device_pool(seed=seed)
    alloc = PagedTokenToKVPoolAllocator(dev.size, PAGE, torch.bfloat16, "cpu", dev, need_sort=False)
    host = host_pool(dev, cfg)
    parallel = get_parallel()
    if hasattr(parallel, "override_permanently"):  # newer releases: the storage threads read it later too
        parallel.override_permanently(**_ONE_RANK)  # derived widths only on 0.5.20: tp_rank is a leaf there
    with parallel.override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1):
        cc = _controller(alloc, host, backend, model, extra)
    return Rig(cc, dev, host, cfg)


def tokens_for(n_pages: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30000, (n_pages * PAGE,), generator=g).tolist()


def backup(rig: Rig, tokens: list[int], dev_pages: list[int], timeout: float = 60.0) -> tuple[torch.Tensor, int]:
    """GPU->host backup of `dev_pages`, then host->L3 through the controller's backup thread.
    Returns (host indices, tokens the backup thread reported written)."""
    dev_idx = torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in dev_pages])
    h = rig.host.alloc(len(dev_idx))
    assert h is not None
    if rig.cfg is None:
        # SGLang's bf16 pool only has CUDA transfer kernels: do its page_first copy by hand
        for layer in range(LAYERS):
            rig.host.kv_buffer[0, h, layer] = rig.dev.k_buffer[layer][dev_idx]
            rig.host.kv_buffer[1, h, layer] = rig.dev.v_buffer[layer][dev_idx]
    else:
        rig.host.backup_from_device_all_layer(rig.dev, h, dev_idx, "kernel")
    hashes = get_hash_str(tokens, None, page_size=PAGE)
    rig.cc.write_storage(h, tokens, hash_value=hashes)
    op = rig.cc.ack_backup_queue.get(timeout=timeout)
    return h, op.completed_tokens


def prefetch(rig: Rig, tokens: list[int], timeout: float = 60.0) -> tuple[torch.Tensor | None, int, int]:
    """L3->host through the prefetch threads. Returns (host indices, storage hits, tokens loaded)."""
    cc = rig.cc
    op = cc.prefetch(f"req{next(_ids)}", tokens, None)
    end = time.monotonic() + timeout
    while True:
        try:
            hit_op = cc.prefetch_hit_queue.get(timeout=0.1)
            assert hit_op is op
            break
        except queue.Empty:
            pass
        revoke = getattr(cc, "prefetch_revoke_queue", None)  # 0.5.17-0.5.22; 0.5.23 hands every op over
        if revoke is not None and not revoke.empty():
            assert revoke.get() == op.request_id
            return None, 0, 0  # fewer hits than the threshold: nothing to load
        assert time.monotonic() < end, "prefetch hit query did not finish"
    if op.storage_hit_count < cc.prefetch_threshold:  # 0.5.23: the scheduler revokes it at drain time
        return None, 0, 0
    # the scheduler's part: host slots for exactly the hit count
    h = rig.host.alloc(op.storage_hit_count)
    assert h is not None
    op.host_indices = h
    cc.prefetch_buffer.put(op)
    if hasattr(cc, "ack_prefetch_queue"):  # 0.5.23: progress arrives as rank-reduced acks
        done = 0
        while True:
            try:
                ack = cc.ack_prefetch_queue.get(timeout=0.1)
            except queue.Empty:
                assert time.monotonic() < end, "prefetch I/O did not finish"
                continue
            if ack.operation is not op:
                continue
            if ack.completed_tokens is not None:
                done = max(done, ack.completed_tokens)
            if ack.completed_req:
                return h, op.storage_hit_count, done
    while op.completed_tokens < op.storage_hit_count and not op.is_terminated():
        assert time.monotonic() < end, "prefetch I/O did not finish"
        time.sleep(0.02)
    time.sleep(0.05)  # let the I/O thread queue the release of an aborted tail
    return h, op.storage_hit_count, op.completed_tokens


def page_snapshot(rig: Rig, host_idx: torch.Tensor) -> list[bytes]:
    out = []
    for i in range(0, len(host_idx), PAGE):
        page = rig.host.get_data_page(int(host_idx[i]))
        out.append(bytes(page.reshape(-1).contiguous().view(torch.uint8).numpy()))
    return out


def load_rows(rig: Rig, host_idx: torch.Tensor, dev_pages: list[int]) -> list[torch.Tensor]:
    """host->device load (per layer, as the controller does) and the device rows it produced."""
    dev_idx = torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in dev_pages])
    for layer in range(LAYERS):
        if rig.cfg is None:  # bf16 pool: its CUDA-only kernel's copy, by hand
            rig.dev.k_buffer[layer][dev_idx] = rig.host.kv_buffer[0, host_idx, layer]
            rig.dev.v_buffer[layer][dev_idx] = rig.host.kv_buffer[1, host_idx, layer]
        else:
            rig.host.load_to_device_per_layer(rig.dev, host_idx, dev_idx, layer, "kernel")
    return [b[dev_idx].clone() for b in rig.dev.k_buffer + rig.dev.v_buffer]
