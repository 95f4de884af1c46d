"""Quantized HiCache host pools (L2) for every supported SGLang release (0.5.17 to 0.5.23).

One host row per page: `kv_buffer = uint8[page_num, row_stride]`, the page itself is the first
`page_bytes` of the row (docs/page-format.md); `row_stride` is page_bytes rounded up to 4 KiB so
that every page starts 4 KiB aligned (NIXL O_DIRECT, whole-page DMA). Token slots keep SGLang's
semantics (page = `page_size` aligned slots), so alloc/free/clear are inherited unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.base import HostKVCache
from sglang.srt.mem_cache.pool_host.common import ALLOC_MEMORY_FUNCS

from kvtuner_hicache.config import ConfigError, KVShape, QuantConfig
from kvtuner_hicache.page_format import HEADER_BYTES, PageLayout
from kvtuner_hicache.quant.codec import make_codec
from kvtuner_hicache.quant.dispatch import codec_name
from kvtuner_hicache.sglang_ext.args import config_to_json
from kvtuner_hicache.sglang_ext.eras import Era, active_era, active_release, unsupported_release_error

logger = logging.getLogger(__name__)

ROW_ALIGN = 4096
RESIDUAL_BUDGET_FRACTION = 8  # 1/8 of the host byte budget goes to the bf16 tail store when R > 0
_DEVICE_DTYPES = (torch.bfloat16, torch.float16)


def _pipeline_parallel() -> bool:
    """Whether this server splits layers over pipeline stages (then a stage cannot see the model's depth)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return (getattr(get_parallel(), "pp_size", 1) or 1) > 1
    except Exception:  # no published runtime context (tests, offline use): a single stage
        return False


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class _QuantizedHostPool(HostKVCache):
    """Shared body of the MHA and MLA pools; subclasses describe the device buffers.

    Built by the plugin's pool seam of the running era (never by SGLang's own constructors), with
    the QuantConfig passed in: `Pool(device_pool, quant_config=..., host_to_device_ratio=...,
    host_size=..., page_size=..., layout=...)`. The base class is initialised through the era's
    shim (`eras.Era.init_host_base`), so one class serves every supported release.
    """

    kvtq_quantized = True  # what the plugin's verification looks for

    def __init__(
        self,
        device_pool: Any,
        *,
        quant_config: QuantConfig,
        host_to_device_ratio: float,
        host_size: float,
        page_size: int,
        layout: str,
        allocator_type: str = "default",
        pool_label: str = "kv",
        pin_memory: bool = True,
        era: Era | None = None,
    ):
        if not isinstance(quant_config, QuantConfig):
            raise ConfigError("quantized host pool built without a QuantConfig")
        if layout != "page_first":
            raise ConfigError(f"quantized HiCache needs --hicache-mem-layout page_first, got {layout}")
        if getattr(device_pool, "layer_shard_enabled", False):
            raise ConfigError("quantized HiCache does not support layer-sharded device KV pools")
        era = era or active_era()
        if era is None:
            raise ConfigError(unsupported_release_error() or "unsupported SGLang release")
        self.device_pool = device_pool
        self.quant_config = quant_config
        self.residual = None  # set after the base init (which calls clear())
        self._load_key: Any = None
        self._load_cpu: tuple[torch.Tensor, torch.Tensor] | None = None  # (GPU, CPU) host indices of a load
        self._load_cpu_page_ids: torch.Tensor | None = None
        # Host budget in bytes: --hicache-size GB, else --hicache-ratio times the device pool's
        # bytes (not tokens), so the same host memory holds compression-times more tokens. SGLang's
        # host-memory auto-sizing (0.5.21+) caps the ratio by bytes too, so it grants bytes.
        dev_bytes_per_token = self._shape(device_pool).bf16_bytes_per_token() // 2 * device_pool.store_dtype.itemsize
        budget = host_size * 1e9 if host_size > 0 else device_pool.size * host_to_device_ratio * dev_bytes_per_token
        self.residual_bytes = int(budget // RESIDUAL_BUDGET_FRACTION) if quant_config.residual_length > 0 else 0
        # Pinning needs a CUDA/HIP device; a CPU device pool (tests, CPU serving) keeps plain pages.
        pin = pin_memory and str(device_pool.device) not in ("cpu",)
        self.dtype = torch.uint8  # storage backends size and view pages by .dtype
        self.page_size = page_size  # the base sets it again; the geometry below needs it first
        size_per_token = self.get_size_per_token()
        era.init_host_base(self, device_pool, size_per_token=size_per_token,
                           host_size_gb=(budget - self.residual_bytes) / 1e9, page_size=page_size,
                           layout=layout, pin_memory=pin, device="cpu", allocator_type=allocator_type,
                           pool_label=pool_label)
        self.dtype = torch.uint8  # the positional-era base resets it to the device dtype
        if era.has_storage_format_tag:
            self.storage_format_tag = self.page_layout.tag  # SGLang appends it to the L3 model name
        self.can_use_write_back_jit = True  # keeps backup host indices on the CPU (page ids read there)
        # One codec object for this pool, chosen once: native kernels on CUDA (an error if they are
        # missing, unless the reference codec is opted into), the reference on CPU; debug capture
        # and the bf16 tail store wrap it, so the hot methods below only call the codec.
        self.codec = make_codec(self.page_layout, device_pool, self.pages, device_pool.device,
                                capture_meta={"pool_label": pool_label,
                                              "config": json.loads(config_to_json(quant_config))})
        if self.residual_bytes:
            from kvtuner_hicache.sglang_ext.residual import ResidualTailCodec, ResidualTailStore

            self.residual = ResidualTailStore(self._device_buffers(device_pool), self.page_size,
                                              quant_config.residual_length, self.residual_bytes, self.pin_memory)
            self.codec = ResidualTailCodec(self.codec, self.residual)
        pl = self.page_layout
        # effective numbers: the 4 KiB row padding counted
        self.compression_vs_bf16 = pl.shape.bf16_bytes_per_token() / self.size_per_token
        self.bf16_equivalent_tokens = int(self.size * self.size_per_token // pl.shape.bf16_bytes_per_token())
        # benchmark/multiturn_arms.py parses this line (test_host_pool.py checks that it still does)
        logger.info(
            "kvtuner_hicache %s host pool: %d tokens (%d pages), %d B/token (%.3f bits/element, %.2fx vs bf16, "
            "%s), %.2f GB; a bf16 pool of these bytes holds %d tokens; codec=%s; SGLang %s (era %s); "
            "L3 namespace %s%s",
            pool_label, self.size, self.page_num, self.size_per_token, self.size_per_token * 8 / pl.elements_per_token,
            self.compression_vs_bf16, quant_config.short_name(), self.size * self.size_per_token / 1e9,
            self.bf16_equivalent_tokens, codec_name(self.codec), active_release(), era.name, pl.tag,
            f"; bf16 tail store {self.residual_bytes / 1e9:.2f} GB" if self.residual_bytes else "",
        )

    # ---- what subclasses provide --------------------------------------------------------------

    @staticmethod
    def _shape(device_pool: Any) -> KVShape:
        raise NotImplementedError

    def _device_buffers(self, device_pool: Any) -> list[list[torch.Tensor]]:
        """buffers[b][local layer] in the order PageLayout's StreamSpec.buffer indexes."""
        raise NotImplementedError

    # ---- sizing and allocation (called by HostKVCache.__init__) -------------------------------

    def get_size_per_token(self) -> int:
        dp = self.device_pool
        if dp.store_dtype not in _DEVICE_DTYPES:
            raise ConfigError(
                f"quantized HiCache reads a bf16/fp16 device KV cache, this one stores {dp.store_dtype} "
                "(--kv-cache-dtype must be auto or bf16)"
            )
        shape = self._shape(dp)
        self.layer_num = shape.num_layers
        self.target_layer_num = shape.num_layers  # no packed MTP draft layers (rejected at the seam)
        self.page_layout = PageLayout(self.quant_config, shape, self.page_size, start_layer=dp.start_layer,
                                      total_layers=None if _pipeline_parallel() else 0)
        self.row_stride = _align(self.page_layout.page_bytes, ROW_ALIGN)
        assert self.row_stride % self.page_size == 0, "page rows are whole bytes per token"
        return self.row_stride // self.page_size

    def get_ksize_per_token(self) -> int | float:
        """Bytes per token of the 'K part' (header + stream 0) that zero-copy backends address."""
        k = self.page_layout.k_part_bytes
        return k // self.page_size if k % self.page_size == 0 else k / self.page_size

    def init_kv_buffer(self) -> torch.Tensor:
        self.dtype = torch.uint8  # storage backends size and view pages by .dtype
        alloc = ALLOC_MEMORY_FUNCS[self.device_pool.device]
        buf = alloc((self.page_num, self.row_stride), dtype=torch.uint8, device=self.device,
                    pin_memory=self.pin_memory, allocator=self.allocator)
        header = torch.frombuffer(bytearray(self.page_layout.header()), dtype=torch.uint8)
        buf[:, :HEADER_BYTES] = header
        # page view used by the codec: the first page_bytes of every row
        self.pages = buf[:, : self.page_layout.page_bytes]
        return buf

    # ---- GPU <-> host --------------------------------------------------------------------------

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices, io_backend) -> None:
        self.codec.backup(self._backup_page_ids(host_indices, io_backend), device_indices)

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id, io_backend,
                                 *, is_draft: bool = False) -> None:
        ids = self._load_ids(host_indices, layer_id, io_backend, is_draft)
        self.codec.load_layer(layer_id, ids, device_indices, cpu_page_ids=self._load_cpu_page_ids)

    def note_load_indices(self, on_device: torch.Tensor, on_cpu: torch.Tensor) -> None:
        """The controller moved a load's host indices to the GPU (`load_indices.track`): keep the CPU
        original of the latest one, so that the load's page ids are known on the host without a device read."""
        self._load_cpu = (on_device, on_cpu)

    def _backup_page_ids(self, host_indices, io_backend: str) -> torch.Tensor:
        if io_backend != "kernel":
            raise ValueError(f"quantized HiCache supports io_backend 'kernel' only, got {io_backend!r}")
        # host indices stay on the CPU (can_use_write_back_jit): page ids without a device sync
        return host_indices[:: self.page_size] // self.page_size

    def _load_ids(self, host_indices, layer_id: int, io_backend: str, is_draft: bool) -> torch.Tensor:
        """The page ids of a load (and `_load_cpu_page_ids`, the same on the CPU when known). The controller
        calls once per local layer with the same index tensors: derived on layer 0 and reused (O(1) host
        work per layer afterwards)."""
        if is_draft:  # 0.5.18+ passes it; our pools never hold packed draft layers
            raise RuntimeError("quantized HiCache host pools hold no MTP draft layers (is_draft=True)")
        if io_backend != "kernel":
            raise ValueError(f"quantized HiCache supports io_backend 'kernel' only, got {io_backend!r}")
        if layer_id == 0 or self._load_key is not host_indices:
            ps = self.page_size
            self._load_page_ids = host_indices[::ps] // ps
            self._load_key = host_indices
            cpu = self._load_cpu
            if host_indices.device.type == "cpu":
                self._load_cpu_page_ids = self._load_page_ids
            elif cpu is not None and cpu[0] is host_indices:
                self._load_cpu_page_ids = cpu[1][::ps] // ps
            else:
                self._load_cpu_page_ids = None
        return self._load_page_ids

    # ---- page accessors for L3 -----------------------------------------------------------------

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        """Zero-copy uint8 view of the page holding token slot `index` (flat or not: one row)."""
        return self.pages[int(index) // self.page_size]

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self.page_layout.page_bytes, dtype=torch.uint8, device=self.device,
                           pin_memory=self.pin_memory)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        src = data_page.reshape(-1).view(torch.uint8)
        if src.numel() != self.page_layout.page_bytes:
            raise ValueError(f"page of {src.numel()} bytes, expected {self.page_layout.page_bytes}")
        pid = int(index) // self.page_size
        self.pages[pid].copy_(src)
        self.codec.pages_written([pid])  # the tail store drops a stale bf16 copy; capture records L3 pages

    # ---- slot lifetime: a freed page's bf16 tail must never outlive it ---------------------------

    def free(self, indices: torch.Tensor) -> int:
        if self.residual is not None:
            ps = self.page_size
            self.residual.drop(torch.unique(indices.cpu() // ps).tolist())
        return super().free(indices)

    def clear(self) -> None:
        super().clear()
        if self.residual is not None:
            self.residual.clear()

    def page_ptr(self, page_id: int) -> int:
        return self.kv_buffer.data_ptr() + page_id * self.row_stride

    def get_page_buffer_meta(self, indices) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def is_stride_page_aligned(self, page_size_bytes: int = 4096) -> bool:
        return self.kv_buffer.data_ptr() % page_size_bytes == 0 and self.row_stride % page_size_bytes == 0

    def kvtq_write_pages(self, ids: list[int], rows: torch.Tensor) -> None:
        """Verified L3 pages (`rows`: uint8[n, page_bytes]) into host pages `ids`.

        One slice copy per run of consecutive page ids (the allocator hands out runs): memcpy speed,
        where index_copy_ measured 10x slower on uint8 rows."""
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                self.pages[ids[start]: ids[start] + i - start].copy_(rows[start:i])
                start = i
        self.codec.pages_written(ids)  # as set_from_flat_data_page does, per batch

    def kvtq_page_ids(self, host_indices) -> list[int]:
        """Page ids of host token slots given page by page (the storage proxy uses this)."""
        ps = self.page_size
        return [int(i) // ps for i in host_indices[::ps].tolist()]


class QuantizedMHATokenToKVPoolHost(_QuantizedHostPool):
    """Quantized host pool for MHA/GQA device pools, symmetric or not in K/V head dims."""

    device_pool: MHATokenToKVPool

    def __init__(self, device_pool: Any, **kwargs: Any):
        if getattr(device_pool, "kv_cache_layout", "nhd") != "nhd":
            raise ConfigError(
                f"quantized HiCache needs the NHD device KV layout, this pool is {device_pool.kv_cache_layout} "
                "(unset SGLANG_USE_HND_KVCACHE / SGLANG_AITER_KV_CACHE_LAYOUT)"
            )
        if getattr(device_pool, "is_quantized_kv_cache", False):
            raise ConfigError("quantized HiCache does not take an FP4/FP8-quantized device KV cache")
        super().__init__(device_pool, **kwargs)

    @staticmethod
    def _shape(device_pool) -> KVShape:
        return KVShape.mha(device_pool.layer_num, device_pool.head_num, device_pool.head_dim,
                           getattr(device_pool, "v_head_dim", None) or device_pool.head_dim)

    def get_size_per_token(self) -> int:
        self.head_num = self.device_pool.head_num
        self.head_dim = self.device_pool.head_dim
        self.v_head_dim = getattr(self.device_pool, "v_head_dim", None) or self.head_dim
        return super().get_size_per_token()

    def _device_buffers(self, device_pool) -> list[list[torch.Tensor]]:
        return [device_pool.k_buffer, device_pool.v_buffer]

    def get_page_buffer_meta(self, indices) -> tuple[list[int], list[int]]:
        """Two objects per page for zero-copy backends: K part (header + K) and V part."""
        k, v = self.page_layout.k_part_bytes, self.page_layout.v_part_bytes
        ptrs, sizes = [], []
        for pid in self.kvtq_page_ids(indices):
            base = self.page_ptr(pid)
            ptrs += [base, base + k]
            sizes += [k, v]
        return ptrs, sizes


class QuantizedMLATokenToKVPoolHost(_QuantizedHostPool):
    """Quantized host pool for MLA (DeepSeek) device pools: rope part = key bits, latent = value bits."""

    device_pool: MLATokenToKVPool

    def __init__(self, device_pool: Any, **kwargs: Any):
        if getattr(device_pool, "use_dsa", False):
            raise ConfigError("quantized HiCache does not support DSA (sparse-attention MLA) pools")
        if getattr(device_pool, "kv_cache_dim", None) not in (None, device_pool.kv_lora_rank + device_pool.qk_rope_head_dim):
            raise ConfigError("quantized HiCache does not support an MLA row wider than latent + rope (fp8 DSA)")
        super().__init__(device_pool, **kwargs)

    @staticmethod
    def _shape(device_pool) -> KVShape:
        return KVShape.mla(device_pool.layer_num, device_pool.kv_lora_rank, device_pool.qk_rope_head_dim)

    def get_size_per_token(self) -> int:
        self.kv_lora_rank = self.device_pool.kv_lora_rank
        self.qk_rope_head_dim = self.device_pool.qk_rope_head_dim
        self.kv_cache_dim = self.kv_lora_rank + self.qk_rope_head_dim
        return super().get_size_per_token()

    def _device_buffers(self, device_pool) -> list[list[torch.Tensor]]:
        return [device_pool.kv_buffer]

    def get_page_buffer_meta(self, indices) -> tuple[list[int], list[int]]:
        """One object per page."""
        pb = self.page_layout.page_bytes
        pids = self.kvtq_page_ids(indices)
        return [self.page_ptr(p) for p in pids], [pb] * len(pids)


def quantized_pool_cls_for(device_pool: Any) -> type[_QuantizedHostPool]:
    """Our pool class for a device pool: one class for symmetric and asymmetric (head_dim !=
    v_head_dim) MHA, the page layout handles both; MLA has its own."""
    return QuantizedMLATokenToKVPoolHost if isinstance(device_pool, MLATokenToKVPool) else QuantizedMHATokenToKVPoolHost
