"""One page codec object per quantized host pool: backup (device rows -> host pages) and per-layer load.

Lifecycle (the pool's side of the contract):

    codec = make_codec(layout, device_kv, host_pages, device)   # once, in the pool's constructor
    codec.backup(host_page_ids, device_rows[, planes])            # HiCache write-back (write stream)
    codec.load_layer(layer, page_ids, device_rows[, planes][, cpu_page_ids=])  # per local layer (load stream)
    codec.pages_written(page_ids)                                 # host pages overwritten from L3 (optional)
    codec.shutdown()                                              # drains and releases streams/events

Stream contract: both calls only enqueue work on the caller's current CUDA stream and never
synchronize (the reference codec, a slow opt-in, is synchronous). When `backup` returns, everything it
did, including the DMAs on the codec's own side stream, is ordered before any work enqueued afterwards
on the caller's stream, so SGLang's events recorded there cover the host writes. `load_layer` writes the
layer's device rows on the caller's stream. A native load of at most FUSE_PAGES pages writes every layer's
rows on the layer-0 call (one launch) and the calls for layers 1..L-1 of the same index tensors enqueue
nothing: each layer's rows are still ready when that layer's call returns, which is all SGLang's per-layer
events need. A native load of a mid-size batch whose host page ids are also given on the CPU
(`cpu_page_ids`, the same pages as `page_ids`) is staged: the copy engine moves the packed bytes into GPU
staging on the codec's own stream and each layer is decoded from there (`quant/staged_load.py`).

Index contract: `host_page_ids` are CPU int64 [n] host page numbers (range-checked on the host before
anything is enqueued: IndexError). `page_ids` of a load are int64 [n] (GPU, as SGLang passes them; CPU ids
are checked on the host and copied); `cpu_page_ids`, when given, are the same ids on the CPU (checked on
the host at layer 0; the codecs may use them to address the host pages without reading the GPU copy).
`device_rows` are int64 [n * page_size] device token rows on the GPU.
GPU-resident indices are range-checked inside the kernels: a bad one is skipped (nothing is read or
written out of bounds, the CUDA context stays usable) and raises IndexError at the codec's next call or
at `check()`.

Refinement planes (elastic pools, `quant/elastic_pages.py`): `planes` is a CPU int64 [2, n] tensor, for
page i and stream s the byte offset from the start of the host buffer (`host_pages[0]`; the buffer spans
`num_pages * host_pages.stride(0)` bytes) of that page's refinement plane, -1 for none. `backup` writes the
planes of the pages that have one next to their floor pages; `load_layer` decodes those pages at the top
precision (floor codes plus refinement codes) in the same launch as the others. A planes tensor is
read-only once passed: offsets that change come in a new tensor (the codecs check and copy a tensor once). The native kernels read and
write planes asynchronously, like pages: the owner must keep a plane's bytes in place until the work
enqueued on the caller's stream has run (the elastic pool keeps a CUDA event per plane slot for this).

Device buffers: the codec never caches a layer tensor by address. `load_layer` reads the layer's tensors
from their owner on every call; `backup` uses the owner's own pointer tables (SGLang's
`k_data_ptrs`/`v_data_ptrs`, MLA `data_ptrs`) after checking once that they match the tensors, and a
cheap identity check per call rebuilds them when a layer tensor was replaced (memory saver, VMM).
"""

from __future__ import annotations

import logging
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant import native, reference
from kvtuner_hicache.quant.elastic_pages import RefinementLayout, encode_planes, load_top
from kvtuner_hicache.quant.staged_load import StagedLoad

log = logging.getLogger(__name__)

ENV_ALLOW_REFERENCE = "KVTQ_ALLOW_REFERENCE_CODEC"
STAGING_PAGES = 64  # pages encoded per staging chunk on backup
# Loads of at most this many pages decode every layer in one launch on the layer-0 call. Small loads are
# launch-bound: on the H200 the 28 per-layer launches of a Qwen2.5-7B load cost ~0.3 ms of scheduler
# host time, about what the one launch takes on the GPU at 16 pages (0.37 ms), while it costs ~10 us of
# host time. Larger loads keep per-layer launches, so layer i's forward starts once its rows are in.
# Measured with `benchmark/bench_transfer.py --fused-sweep` (docs/benchmarks.md, run 5).
FUSE_PAGES = 16
FUSED_BLOCKS_PER_LAYER = 2  # grid share of each layer in the one-launch load: the fastest at 1-256 pages
# Backups of at most this many pages are encoded straight into their (mapped) host pages: no staging and no
# DMA call, one launch per run of consecutive host ids. A one-page backup is bound by its launches (run 18,
# H100: 51 us of host time, 0.083 ms in all for KV4 against SGLang's 0.085 ms bf16 backup; mixed-kivi4 0.110).
# In backups of at most ALL_CLASSES_PAGES pages every encode launch runs all (axis, bits) classes at once
# (mixed-precision tables have up to 8 classes; run 18: 43 us of host time for mixed-kivi4's encode op at one
# page against 21 us for KV4's two classes). Both paths are in kernel 0.10.0 and tested bit for bit when passed
# explicitly (test/gpu), but OFF (0) by default until `benchmark/bench_transfer.py --backup-sweep` has timed
# them on a GPU against the staged backup; the defaults then come from that table through
# `benchmark/backup_defaults.py` (docs/benchmarks.md).
DIRECT_BACKUP_PAGES = 0
ALL_CLASSES_PAGES = 0
_LIST_CHECK_MAX = 64  # host ids range-checked through a Python list up to this many (CPU, 1-64 ids: 1-3 us)


class NativeCodecUnavailable(RuntimeError):
    """On a CUDA device the native kernels are required unless the user opts in to the reference codec."""


# ---- the device side ---------------------------------------------------------------------------------


class DeviceKV:
    """The device KV pool's per-layer tensors and pointer tables, read live from their owner.

    `names` are the owner's attributes holding one list of per-layer tensors per device buffer, in the
    order PageLayout's StreamSpec.buffer indexes (MHA: k_buffer, v_buffer; MLA: kv_buffer). `tables`
    are the owner's own per-buffer uint64/int64 [L] device tensors of layer data pointers, or None.
    """

    def __init__(self, owner: Any, names: Sequence[str], tables: Sequence[str | None] | None = None):
        self.owner = owner
        self.names = tuple(names)
        self.table_names = tuple(tables) if tables is not None else (None,) * len(self.names)
        assert len(self.table_names) == len(self.names)

    @classmethod
    def from_lists(cls, buffers: Sequence[Sequence[torch.Tensor]]) -> DeviceKV:
        """Plain lists buffers[b][layer] (tests, tools). A tensor replaced inside a list is seen."""
        owner = SimpleNamespace(**{f"buffer{b}": per for b, per in enumerate(buffers)})
        return cls(owner, [f"buffer{b}" for b in range(len(buffers))])

    @classmethod
    def from_sglang_pool(cls, device_pool: Any) -> DeviceKV:
        """SGLang's MHATokenToKVPool (k_buffer/v_buffer, k_data_ptrs/v_data_ptrs) or MLATokenToKVPool
        (kv_buffer, data_ptrs). Attributes are read on every access, so a rebuilt pool is followed."""
        if hasattr(device_pool, "kv_buffer") and not hasattr(device_pool, "v_buffer"):
            return cls(device_pool, ["kv_buffer"], ["data_ptrs"])
        return cls(device_pool, ["k_buffer", "v_buffer"], ["k_data_ptrs", "v_data_ptrs"])

    def buffers(self) -> list[Sequence[torch.Tensor]]:
        return [getattr(self.owner, n) for n in self.names]

    def layer(self, layer: int) -> list[torch.Tensor]:
        return [getattr(self.owner, n)[layer] for n in self.names]

    def tables(self) -> list[torch.Tensor | None]:
        return [getattr(self.owner, t, None) if t else None for t in self.table_names]

    @property
    def device(self) -> torch.device:
        return getattr(self.owner, self.names[0])[0].device


def as_device_kv(device_buffers: Any) -> DeviceKV:
    """DeviceKV from a DeviceKV, an SGLang device pool, or plain lists buffers[b][layer]."""
    if isinstance(device_buffers, DeviceKV):
        return device_buffers
    if hasattr(device_buffers, "k_buffer") or hasattr(device_buffers, "kv_buffer"):
        return DeviceKV.from_sglang_pool(device_buffers)
    return DeviceKV.from_lists(device_buffers)


# ---- the interface ------------------------------------------------------------------------------------


class PageCodec(ABC):
    """Quantize device rows into host pages and dequantize them back, layer by layer (module docstring)."""

    name: str = "?"

    def __init__(self, layout: PageLayout, device_kv: DeviceKV, host_pages: torch.Tensor):
        if host_pages.dtype != torch.uint8 or host_pages.dim() != 2 or host_pages.size(1) != layout.page_bytes:
            raise ValueError(f"host_pages must be uint8 [num_pages, {layout.page_bytes}], got "
                             f"{host_pages.dtype} {tuple(host_pages.shape)}")
        self.layout = layout
        self.device_kv = device_kv
        self.host_pages = host_pages
        self.num_pages = host_pages.size(0)

    @abstractmethod
    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        """Quantize the pages at `device_rows` (whole pages) into host pages `host_page_ids`, and the
        refinement planes that `planes` places (module docstring)."""

    @abstractmethod
    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        """Dequantize local layer `layer` of host pages `page_ids` into the device rows; pages that
        `planes` gives a refinement plane at the top precision. `cpu_page_ids`: the same ids on the CPU."""

    def pages_written(self, host_page_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Host pages were overwritten from outside the codec (an L3 page set into L2)."""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise IndexError for a bad index that an earlier asynchronous call met (no-op if none)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Drain and release the codec's streams and events; the codec is unusable afterwards."""

    def describe(self) -> str:
        """For the pool's start-up log line: the codec's name and what it runs on."""
        return self.name

    def _planes(self, planes: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Check a planes argument: CPU int64 [2, n], offsets -1 or whole planes inside the host buffer.
        The tensor a load passes for every layer is checked on its first call only (callers pass a new
        tensor when offsets change, as the module docstring's contract says)."""
        if planes is None:
            return None
        if planes is getattr(self, "_planes_checked", None) and planes.shape[1] == n:
            return planes
        if planes.device.type != "cpu" or planes.dtype != torch.int64 or tuple(planes.shape) != (2, n):
            raise ValueError(f"planes must be a CPU int64 [2, {n}] tensor, got {planes.dtype} {tuple(planes.shape)} "
                             f"on {planes.device}")
        rl = self.refinement
        bound = self.num_pages * self.host_pages.stride(0)
        for s in range(2):
            live = planes[s][planes[s] >= 0]
            if not live.numel():
                continue
            size = rl.plane_bytes.get(s)
            if size is None:
                raise ValueError(f"planes give stream {s} a refinement plane, this layout has none for it")
            if int(live.max()) > bound - size:
                raise IndexError(f"kvtuner_hicache: refinement plane offset {int(live.max())} + {size} B outside the "
                                 f"host buffer ({bound} B)")
        if bool((planes < -1).any()):
            raise IndexError("kvtuner_hicache: refinement plane offsets must be >= 0 or -1")
        planes = planes.contiguous()
        self._planes_checked = planes
        return planes

    @property
    def refinement(self) -> RefinementLayout:
        """Where each chunk's refinement codes sit in its stream's plane (built on first use)."""
        rl = getattr(self, "_refinement", None)
        if rl is None:
            rl = self._refinement = RefinementLayout(self.layout)
        return rl

    def _host_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type != "cpu" or ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
        n = ids.numel()
        if n == 0:
            return ids
        if n <= _LIST_CHECK_MAX:  # a Python list is cheaper than two tensor reductions for few ids (~1 against ~8 us)
            lst = ids.tolist()
            lo, hi = min(lst), max(lst)
        else:
            lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= self.num_pages:
            bad = ids[(ids < 0) | (ids >= self.num_pages)][0].item()
            raise IndexError(f"kvtuner_hicache: host page id {bad} out of range [0, {self.num_pages})")
        return ids


class WrappingCodec(PageCodec):
    """A codec around another one (debug capture, the bf16 tail store): forwards everything to `inner`.

    Subclasses override backup/load_layer (calling the inner codec) and extend `describe`."""

    def __init__(self, inner: PageCodec):
        super().__init__(inner.layout, inner.device_kv, inner.host_pages)
        self.inner = inner
        self.name = inner.name

    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        self.inner.backup(host_page_ids, device_rows, planes)

    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        self.inner.load_layer(layer, page_ids, device_rows, planes, cpu_page_ids=cpu_page_ids)

    def pages_written(self, host_page_ids: Sequence[int]) -> None:
        self.inner.pages_written(host_page_ids)

    def check(self) -> None:
        self.inner.check()

    def shutdown(self) -> None:
        self.inner.shutdown()

    def describe(self) -> str:
        return self.inner.describe()


# ---- reference (pure torch) ----------------------------------------------------------------------------


class ReferenceCodec(PageCodec):
    """The ground-truth codec (quant/reference.py) behind the same interface: CPU pools and tests, and
    an explicit opt-in on CUDA (KVTQ_ALLOW_REFERENCE_CODEC=1). Synchronous; indices checked on the host."""

    name = "reference"

    def __init__(self, layout: PageLayout, device_kv: DeviceKV, host_pages: torch.Tensor,
                 staging_pages: int = STAGING_PAGES):
        super().__init__(layout, device_kv, host_pages)
        self.staging_pages = max(1, staging_pages)
        self._closed = False

    def _rows(self, rows: torch.Tensor, bound: int) -> torch.Tensor:
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= bound):
            bad = rows[(rows < 0) | (rows >= bound)][0].item()
            raise IndexError(f"kvtuner_hicache: device row {bad} out of range [0, {bound})")
        return rows

    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        assert not self._closed, "codec was shut down"
        ids = self._host_ids(host_page_ids)
        ps = self.layout.page_size
        n = ids.numel()
        if device_rows.numel() != n * ps:
            raise ValueError(f"{device_rows.numel()} device rows for {n} pages of {ps}")
        planes = self._planes(planes, n)
        if n == 0:
            return
        bufs = self.device_kv.buffers()
        self._rows(device_rows, bufs[0][0].size(0))
        dev = bufs[0][0].device
        for start in range(0, n, self.staging_pages):
            m = min(self.staging_pages, n - start)
            staged = torch.empty(m, self.layout.page_bytes, dtype=torch.uint8, device=dev)
            reference.encode_pages(self.layout, bufs, device_rows[start * ps:(start + m) * ps], staged)
            self.host_pages[ids[start:start + m]] = staged.to(self.host_pages.device)
        if planes is None:
            return
        rows = device_rows.reshape(n, ps)
        for s in self.refinement.streams:
            sel = torch.nonzero(planes[s] >= 0).flatten()
            if sel.numel():
                plane = encode_planes(self.refinement, s, bufs, rows[sel.to(rows.device)].reshape(-1))
                self._flat()[self._spans(planes[s, sel], plane.shape[1])] = plane.reshape(-1)

    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        assert not self._closed, "codec was shut down"
        ids = self._host_ids(page_ids)
        if cpu_page_ids is not None and layer == 0 and not torch.equal(self._host_ids(cpu_page_ids), ids):
            raise ValueError("cpu_page_ids are not the pages of page_ids")
        planes = self._planes(planes, ids.numel())
        bufs = self.device_kv.layer(layer)
        self._rows(device_rows, bufs[0].size(0))
        reference.decode_layer(self.layout, layer, self.host_pages, ids, bufs, device_rows)
        if planes is None:
            return
        rows = device_rows.reshape(ids.numel(), self.layout.page_size)
        for s in self.refinement.streams:
            c = self.refinement.chunk(s, layer)
            sel = torch.nonzero(planes[s] >= 0).flatten() if c is not None else None
            if sel is None or not sel.numel():
                continue
            spec = c.spec
            raw = self.host_pages[ids[sel], spec.offset: spec.offset + spec.nbytes]
            width = c.offset + c.nbytes  # the plane bytes up to this chunk's end
            plane = self._flat()[self._spans(planes[s, sel], width)].reshape(sel.numel(), width)
            load_top(self.layout, c, raw, plane, bufs[self.layout.streams[s].buffer],
                     rows[sel.to(rows.device)].reshape(-1))

    def _flat(self) -> torch.Tensor:
        """The host buffer as one byte vector (planes live between and after the pages)."""
        hp = self.host_pages
        return torch.as_strided(hp, (self.num_pages * hp.stride(0),), (1,))

    @staticmethod
    def _spans(offsets: torch.Tensor, width: int) -> torch.Tensor:
        """Flat byte indices of `width` bytes at each offset, page-major."""
        return (offsets.unsqueeze(1) + torch.arange(width, dtype=torch.int64)).reshape(-1)

    def shutdown(self) -> None:
        self._closed = True

    def describe(self) -> str:
        return "reference (pure torch)"


# ---- native (torch.ops.kvtq) ---------------------------------------------------------------------------


class NativeCodec(PageCodec):
    """The CUDA kernels, with everything resolved once: the layout's plan, the mapped address of the
    host pages, the staging area, an error sink and an owned backup stream with its events."""

    name = "native"

    def __init__(self, layout: PageLayout, device_kv: DeviceKV, host_pages: torch.Tensor, device: torch.device,
                 *, staging: torch.Tensor | None = None, staging_pages: int = STAGING_PAGES,
                 load_blocks: int | None = None, fuse_pages: int = FUSE_PAGES,
                 fused_blocks_per_layer: int = FUSED_BLOCKS_PER_LAYER, staged_pages: int | None = None,
                 staged_group: int | None = None, staged_min_pages: int | None = None,
                 direct_pages: int = DIRECT_BACKUP_PAGES, all_classes_pages: int = ALL_CLASSES_PAGES):
        super().__init__(layout, device_kv, host_pages)
        ops = native.ops()
        self.plan = native.plan_for(layout)
        if self.plan.reason is not None:
            raise NativeCodecUnavailable(f"the native kernels do not support this page layout: {self.plan.reason}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if host_pages.device.type == "cpu" and not host_pages.is_pinned():
            raise ValueError("host_pages must be pinned memory (the load kernel reads it zero-copy)")
        self.blocks = native.load_blocks() if load_blocks is None else int(load_blocks)
        self.err = native.ErrorSink(device)
        pages_ptr = int(ops.mapped_pointer(host_pages))  # resolved once: never per call
        self._pages_ptr = pages_ptr
        self._buffer_bytes = self.num_pages * host_pages.stride(0)  # what plane offsets may address
        # direct backups write through pages_ptr: only where every host page starts 16-byte aligned
        direct_ok = host_pages.dim() == 2 and pages_ptr % 16 == 0 and host_pages.stride(0) % 16 == 0
        self.direct_pages = max(0, int(direct_pages)) if direct_ok else 0
        self.all_classes_pages = max(0, int(all_classes_pages))
        self._planes_key: torch.Tensor | None = None  # a load's CPU plane offsets and their GPU copy
        self._planes_dev: torch.Tensor | None = None
        self._cfg = native.decode_cfg(host_pages, pages_ptr, layout, self.plan, self.blocks, self.err)
        self._chunks, self._units, self._header = self.plan.device_tables(device)
        if staging is None:
            staging = torch.empty(max(1, min(staging_pages, self.num_pages)), layout.page_bytes, dtype=torch.uint8,
                                  device=device)
        if staging.device != device or staging.dim() != 2 or staging.size(1) != layout.page_bytes:
            raise ValueError(f"staging must be uint8 [pages, {layout.page_bytes}] on {device}")
        self.staging = staging
        self._side = torch.classes.kvtq.BackupStream(device.index)
        self._decode = ops.decode.default
        self._decode_layers = ops.decode_layers.default
        self._decode_table = ops.decode_table.default
        self._backup = ops.backup.default
        self.fuse_pages = int(fuse_pages) if layout.num_layers > 1 else 0
        self.fused_blocks_per_layer = int(fused_blocks_per_layer)
        self._desc_fused = torch.stack(self.plan.dec_desc_small)  # [L, streams, fields]: small loads
        self._fused_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fused_ids: torch.Tensor | None = None  # the index tensors of the load decoded at layer 0
        self._fused_rows: torch.Tensor | None = None
        # per-layer decode descriptors, and the batch size from which big units fill the grid
        self._desc_big = self.plan.dec_desc
        self._desc_small = self.plan.dec_desc_small
        thr = 2 * self.blocks if self.blocks > 0 else 256
        self._big_from = [-(-thr // max(1, u)) for u in self.plan.dec_units_big]
        self._nbuf = self.plan.nbuf
        self._key: tuple[list[list[torch.Tensor]], list[Any]] | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._geom: torch.Tensor | None = None
        self._closed = False
        self.pointer_rebuilds = 0
        self._refresh_pointers()
        # mid-size loads through the copy engine (None: defaults and KVTQ_LOAD_* variables; 0 pages: off)
        self.staged = StagedLoad(layout, self.plan, host_pages, device, self.err, group_layers=staged_group,
                                 max_pages=staged_pages, min_pages=staged_min_pages,
                                 refinement=self.refinement if layout.cfg.elastic else None)
        # a staged load's index tensors as passed (its identity)
        self._staged_key: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- pointer tables: the owner's, verified once; rebuilt when a layer tensor is replaced --

    def _identity(self) -> tuple[list[list[torch.Tensor]], list[Any]]:
        """What the pointer tables were built from: a copy of each layer list and the owner's tables."""
        bufs = self.device_kv.buffers()[: self._nbuf]
        return [list(per) for per in bufs], list(self.device_kv.tables()[: self._nbuf])

    def _same_identity(self) -> bool:
        """True while every layer tensor and table is the object the tables were built from. Compares each
        layer list in place (no tuple of every tensor per call: run 16 timed the old check at 7 us a backup)."""
        key = self._key
        if key is None:
            return False
        seen_bufs, seen_tables = key
        bufs = self.device_kv.buffers()
        for b, seen in enumerate(seen_bufs):
            per = bufs[b]
            if len(per) != len(seen) or not all(map(operator.is_, per, seen)):
                return False
        return all(map(operator.is_, self.device_kv.tables()[: self._nbuf], seen_tables))

    def _refresh_pointers(self) -> None:
        bufs = self.device_kv.buffers()[: self._nbuf]
        rs, hs, nr, dtype = native.validate_buffers(self.layout, bufs)
        if bufs[0][0].device != self.device:
            raise ValueError(f"device buffers on {bufs[0][0].device}, codec on {self.device}")
        want = [[t.data_ptr() for t in per] for per in bufs]
        tabs: list[torch.Tensor] = []
        for b, table in enumerate(self.device_kv.tables()[: self._nbuf]):
            ok = (table is not None and table.device == self.device and table.element_size() == 8
                  and table.is_contiguous() and table.numel() == len(want[b]))
            if ok:
                t64 = table.view(torch.int64)
                ok = [v & 0xFFFFFFFFFFFFFFFF for v in t64.tolist()] == want[b]  # one D2H read per rebuild
            if ok:
                tabs.append(t64)
            else:
                if table is not None:
                    log.warning("kvtuner_hicache: the device pool's pointer table %d does not match its layer "
                                "tensors; using the codec's own", b)
                tabs.append(torch.tensor(want[b], dtype=torch.int64).to(self.device))
        self._tables = (tabs[0], tabs[1] if len(tabs) > 1 else tabs[0])
        self._geom = native.geometry(self.layout, self.plan, rs, hs, nr, dtype, self.err)
        if self.fuse_pages > 0:  # the one-launch load's per-layer arguments hold the layer addresses
            self._fused_table = self._decode_table(self._desc_fused, self._cfg, list(bufs[0]), list(bufs[-1]),
                                                   self.err.word)
        self._key = self._identity()
        self.pointer_rebuilds += 1

    def _pointers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._same_identity():
            self._refresh_pointers()
        assert self._tables is not None
        return self._tables

    # -- the interface --

    def check(self) -> None:
        self.err.check()

    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        if self._closed:
            raise RuntimeError("kvtuner_hicache: backup on a codec that was shut down")
        self.err.check()
        ids = self._host_ids(host_page_ids)  # range-checked on the host before anything is enqueued
        planes = self._planes(planes, ids.numel())
        if ids.numel() == 0:
            return
        rows = device_rows
        if rows.device != self.device or rows.dtype != torch.int64 or not rows.is_contiguous():
            rows = rows.to(device=self.device, dtype=torch.int64).contiguous()
        p0, p1 = self._pointers()
        self._issue_backup(p0, p1, rows, ids, planes)

    def _issue_backup(self, p0: torch.Tensor, p1: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                      planes: torch.Tensor | None = None) -> None:
        """The op call of a backup whose arguments are checked (bench_transfer times it alone)."""
        if planes is None:
            self._backup(self._chunks, self._units, p0, p1, rows, self._header, self.staging, self.host_pages, ids,
                         self._geom, self.err.word, self._side, None, 0, 0, self._pages_ptr, self.direct_pages,
                         self.all_classes_pages)
            return
        self._backup(self._chunks, self._units, p0, p1, rows, self._header, self.staging, self.host_pages, ids,
                     self._geom, self.err.word, self._side, planes.to(self.device, non_blocking=True),
                     self._pages_ptr, self._buffer_bytes, self._pages_ptr, self.direct_pages, self.all_classes_pages)

    def _plane_src(self, planes: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The GPU copy of a load's plane offsets: made on the first layer that passes them, then reused."""
        if planes is None:
            return None
        if planes is not self._planes_key:
            self._planes_dev = self._planes(planes, n).to(self.device, non_blocking=True)
            self._planes_key = planes
        return self._planes_dev

    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        if self._staged_key is not None:
            if (layer > 0 and page_ids is self._staged_key[0] and device_rows is self._staged_key[1]
                    and self.staged.expects(layer)):
                self.staged.layer(layer)  # one call into C++: the ring holds the load's arguments
                return
            self._staged_key = None
        if self._fused_ids is not None:
            if layer > 0 and page_ids is self._fused_ids and device_rows is self._fused_rows:
                return  # decoded by this load's layer-0 call
            self._fused_ids = self._fused_rows = None
        if self.err.pending():
            self.err.check()
        ids, rows = page_ids, device_rows
        if not ids.is_cuda:
            ids = self._host_ids(ids).to(self.device, non_blocking=True)
        if not rows.is_cuda:
            rows = rows.to(device=self.device, dtype=torch.int64)
        if (layer == 0 and cpu_page_ids is not None and (planes is None or self.staged.takes_planes)
                and self.staged.fits(ids.numel())):
            host_ids = self._host_ids(cpu_page_ids)  # range-checked before anything is enqueued
            if host_ids.numel() != ids.numel():
                raise ValueError(f"{host_ids.numel()} cpu_page_ids for a load of {ids.numel()} pages")
            if not rows.is_contiguous():
                rows = rows.contiguous()
            self._pointers()  # a replaced layer tensor bumps the generation: the ring rebuilds its arguments
            self.staged.begin(host_ids, rows, self.pointer_rebuilds,
                              lambda: self.device_kv.buffers()[: self._nbuf], self._planes(planes, ids.numel()))
            self._staged_key = (page_ids, device_rows)
            return
        if layer == 0 and 0 < ids.numel() <= self.fuse_pages:
            self._pointers()  # a replaced layer tensor rebuilds the table first
            assert self._fused_table is not None
            table, info = self._fused_table
            self._decode_layers(table, info, self._cfg, ids, rows, self.err.word, self.fused_blocks_per_layer,
                                self._plane_src(planes, ids.numel()))
            self._fused_ids, self._fused_rows = page_ids, device_rows
            return
        d = self.device_kv.layer(layer)  # live tensors: a replaced layer tensor is used at once
        desc = self._desc_big[layer] if ids.numel() >= self._big_from[layer] else self._desc_small[layer]
        self._decode(desc, self._cfg, ids, rows, d[0], d[-1], self.err.word, self._plane_src(planes, ids.numel()))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._side.release()  # waits for the side stream's copies, destroys the stream and its events
        self.staged.shutdown()
        torch.cuda.current_stream(self.device).synchronize()
        self.err.check()

    def describe(self) -> str:
        return f"native ({native.build_name()}; {self.staged.describe()})"


# ---- the factory ---------------------------------------------------------------------------------------


def _allow_reference(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get(ENV_ALLOW_REFERENCE, "").strip().lower() not in ("", "0", "false", "no")


def make_codec(layout: PageLayout, device_buffers: Any, host_pages: torch.Tensor, device: torch.device | str, *,
               staging: torch.Tensor | None = None, staging_pages: int = STAGING_PAGES, load_blocks: int | None = None,
               allow_reference: bool | None = None, capture_meta: dict | None = None) -> PageCodec:
    """Choose and build the pool's codec, once.

    device_buffers: a DeviceKV, an SGLang device pool (MHA/MLA) or plain lists buffers[b][layer].
    host_pages: uint8 [num_pages, page_bytes], pinned on a CUDA host (a view of the host pool's rows).
    On a CPU device: ReferenceCodec. On CUDA: NativeCodec; if the kernels are missing, broken or do not
    support the layout, NativeCodecUnavailable (with how to install them) unless the user opted in to
    the reference codec (`allow_reference`, else env KVTQ_ALLOW_REFERENCE_CODEC=1): then a WARNING and
    ReferenceCodec. With KVTQ_CAPTURE_DIR set, the codec is wrapped in a CapturingCodec (debug).
    """
    dev = torch.device(device)
    kv = as_device_kv(device_buffers)
    codec: PageCodec
    if dev.type != "cuda":
        codec = ReferenceCodec(layout, kv, host_pages, staging_pages)
    else:
        reason = None
        if not native.available():
            reason = native.unavailable_reason()
        else:
            try:
                codec = NativeCodec(layout, kv, host_pages, dev, staging=staging, staging_pages=staging_pages,
                                    load_blocks=load_blocks)
            except NativeCodecUnavailable as e:
                reason = str(e)
        if reason is not None:
            if not _allow_reference(allow_reference):
                raise NativeCodecUnavailable(
                    f"kvtuner_hicache: the native CUDA kernels cannot serve this pool: {reason}. To run with the "
                    f"slow pure-torch reference codec instead, set {ENV_ALLOW_REFERENCE}=1.")
            log.warning("kvtuner_hicache: SLOW reference codec on %s (%s=1): %s", dev, ENV_ALLOW_REFERENCE, reason)
            codec = ReferenceCodec(layout, kv, host_pages, staging_pages)
    from kvtuner_hicache.quant import capture

    return capture.wrap_if_enabled(codec, capture_meta)


__all__ = ["ENV_ALLOW_REFERENCE", "STAGING_PAGES", "DeviceKV", "NativeCodec", "NativeCodecUnavailable", "PageCodec",
           "ReferenceCodec", "WrappingCodec", "as_device_kv", "make_codec"]
