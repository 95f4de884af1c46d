"""Staged loads: the copy engine moves a batch's packed bytes into GPU staging, the kernel decodes from there.

A per-layer load that reads pinned host pages zero-copy (the decode kernel's own PCIe reads) pays a fixed
ramp and tail per launch, so at a few MB per layer it moves well below the PCIe rate (docs/benchmarks.md).
A staged load instead copies the layers of every page of the batch, a group of consecutive layers at a
time, into a GPU staging area with the copy engine, on a side stream the codec owns, and decodes each
layer from device memory on the caller's stream. Copies of group g+1 run while group g is decoded.

Lifecycle (the NativeCodec's side of the contract):

    staged = StagedLoad(layout, plan, host_pages, device, err)     # once per pool: staging, stream, events
    staged.fits(n)                                                  # can a batch of n pages go this way?
    staged.begin(cpu_page_ids)                                      # layer 0: enqueue the first copies
    staged.layer(layer, device_rows, dst0, dst1)                    # every local layer, in order 0..L-1
    staged.shutdown()                                               # drains the side stream

Stream contract: `begin` and `layer` only enqueue work (copies on the owned side stream, decodes on the
caller's current stream) and never synchronize. When `layer(l)` returns, layer l's device rows are
written by work on the caller's stream, which is all SGLang's per-layer events need. The staging area
holds two groups (double buffering); a copy into a slot waits, on the GPU, for the decodes that last
read it, also across loads. Host pages are read asynchronously: like a zero-copy load, the owner keeps
them in place until the caller's stream has run the load (SGLang does: pages being loaded are pinned
in the radix tree).

Memory: 2 x `max_pages` x (bytes of the largest group of one page) of GPU memory, allocated by the first
staged load (none if it does not fit: a WARNING, and loads stay zero-copy).
Environment: KVTQ_LOAD_GROUP (layers per copy group, default 4), KVTQ_LOAD_STAGING_PAGES (pages per
group slot, default 256; 0 turns staged loads off), KVTQ_LOAD_STAGED_MIN (smallest batch, default 32).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from kvtuner_hicache.page_format import ALIGN, PageLayout

logger = logging.getLogger(__name__)

DEFAULT_GROUP_LAYERS = 4
DEFAULT_MAX_PAGES = 256
DEFAULT_MIN_PAGES = 32
_DESC_OFFSET = 0  # field 0 of a decode descriptor row: the chunk's byte offset in the (staged) page


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class StagedGeometry:
    """Where a staged load puts each chunk (pure layout arithmetic, no device).

    `groups`: [first, end) layer ranges of `group_layers` layers; `copies[g]`: one row (src_off, nbytes,
    dst_off) per stream, the stream's chunks of the group's layers (contiguous in a page: docs/page-format.md)
    into a staging row; `offsets[layer][stream]`: the chunk's byte offset in its group's staging row;
    `pitch`: the staging row size (the largest group, streams 128-byte aligned).
    """

    def __init__(self, layout: PageLayout, group_layers: int):
        L = layout.num_layers
        g = max(1, group_layers)
        self.groups = [(a, min(L, a + g)) for a in range(0, L, g)]
        self.group_of = [a // g for a in range(L)]
        self.copies: list[list[list[int]]] = []
        self.offsets: list[list[int]] = [[0] * len(layout.streams) for _ in range(L)]
        self.pitch = 0
        for a, b in self.groups:
            rows, dst = [], 0
            for s in range(len(layout.streams)):
                first, last = layout.chunk(s, a), layout.chunk(s, b - 1)
                nbytes = last.offset + last.nbytes - first.offset
                rows.append([first.offset, nbytes, dst])
                for layer in range(a, b):
                    self.offsets[layer][s] = dst + layout.chunk(s, layer).offset - first.offset
                dst += -(-nbytes // ALIGN) * ALIGN
            self.copies.append(rows)
            self.pitch = max(self.pitch, dst)


class StagedLoad:
    """Copy-engine staging of a load's pages, two layer groups at a time (module docstring)."""

    def __init__(self, layout: PageLayout, plan: Any, host_pages: torch.Tensor, device: torch.device, err: Any, *,
                 group_layers: int | None = None, max_pages: int | None = None, min_pages: int | None = None):
        from kvtuner_hicache.quant import native  # the library is loaded (the caller is a NativeCodec)

        self.layout = layout
        self.host_pages = host_pages
        self.device = device
        self.err = err
        L = layout.num_layers
        g = max(1, group_layers if group_layers is not None else _env_int("KVTQ_LOAD_GROUP", DEFAULT_GROUP_LAYERS))
        self.max_pages = max(0, max_pages if max_pages is not None else _env_int("KVTQ_LOAD_STAGING_PAGES",
                                                                                  DEFAULT_MAX_PAGES))
        self.min_pages = max(1, min_pages if min_pages is not None else _env_int("KVTQ_LOAD_STAGED_MIN",
                                                                                  DEFAULT_MIN_PAGES))
        geo = StagedGeometry(layout, g)
        self.groups, self.group_of, self.pitch = geo.groups, geo.group_of, geo.pitch
        self.copies = [torch.tensor(rows, dtype=torch.int64) for rows in geo.copies]
        self.desc = []  # the decode descriptors of each layer with the chunk offsets of its staging row
        for layer in range(L):
            d = plan.dec_desc[layer].clone()
            for s, off in enumerate(geo.offsets[layer]):
                d[s, _DESC_OFFSET] = off
            self.desc.append(d)
        self.enabled = self.max_pages >= self.min_pages and L > 0
        self.staging_bytes = 2 * self.max_pages * self.pitch if self.enabled else 0  # what `_allocate` takes
        self.staging: torch.Tensor | None = None  # allocated by the first staged load (`_allocate`)
        self.cfg: list[torch.Tensor] = []
        self.local_ids: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._local: torch.Tensor | None = None
        self._next = 0  # the layer the load expects next
        self._closed = False
        if not self.enabled:
            return
        self.ops = native.ops()
        self._native, self._plan = native, plan
        self.stream = torch.cuda.Stream(device)
        self.staged = [torch.cuda.Event(), torch.cuda.Event()]   # a group's copies are in its slot
        self.decoded = [torch.cuda.Event(), torch.cuda.Event()]  # the decodes that read a slot are done

    def fits(self, n: int) -> bool:
        """Whether a batch of n pages goes through staging (else the caller decodes zero-copy)."""
        return self.enabled and not self._closed and self.min_pages <= n <= self.max_pages and self._allocate()

    def _allocate(self) -> bool:
        """The staging area, made on first use (a pool that never loads a mid-size batch holds none). If the GPU
        has no room for it, staged loads are turned off with a WARNING and loads stay zero-copy."""
        if self.staging is not None:
            return True
        try:
            self.staging = torch.empty(2, self.max_pages, self.pitch, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as e:
            self.enabled = False
            logger.warning("kvtuner_hicache: no GPU memory for %.0f MiB of load staging (%s); loads of %d-%d pages "
                           "decode zero-copy from pinned memory instead (slower; KVTQ_LOAD_STAGING_PAGES sizes it)",
                           self.staging_bytes / 2**20, e, self.min_pages, self.max_pages)
            return False
        # device memory: decode with one block per unit (no PCIe latency to hide)
        self.cfg = [self._native.decode_cfg(self.staging[i], self.staging[i].data_ptr(), self.layout, self._plan, 0,
                                            self.err, row_bytes=self.pitch) for i in range(2)]
        self.local_ids = torch.arange(self.max_pages, dtype=torch.int64, device=self.device)
        return True

    def describe(self) -> str:
        if not self.enabled:
            return "staged loads off"
        return (f"staged loads of {self.min_pages}-{self.max_pages} pages, {self.groups[0][1]} layers per copy, "
                f"{self.staging_bytes / 2**20:.0f} MiB of GPU staging")

    def _copy(self, g: int) -> None:
        slot = g % 2
        self.stream.wait_event(self.decoded[slot])  # the last decodes that read this slot (maybe a past load)
        self.ops.stage_copies.default(self.host_pages, self._ids, self.staging[slot], self.copies[g], self.stream.cuda_stream)
        self.staged[slot].record(self.stream)

    def begin(self, cpu_page_ids: torch.Tensor) -> None:
        """Layer 0 of a load: host page ids (CPU int64, range-checked by the caller) of `fits` size."""
        if self._ids is not None:  # the last load stopped early: its enqueued decodes still read the slots
            cur = torch.cuda.current_stream(self.device)
            for ev in self.decoded:
                ev.record(cur)
        assert self.local_ids is not None, "begin() after fits()"
        self._ids = cpu_page_ids
        self._local = self.local_ids[: cpu_page_ids.numel()]
        self._next = 0
        for g in range(min(2, len(self.groups))):
            self._copy(g)

    def expects(self, layer: int) -> bool:
        """Whether `layer` is the next layer of the current staged load."""
        return self._ids is not None and layer == self._next

    def layer(self, layer: int, device_rows: torch.Tensor, dst0: torch.Tensor, dst1: torch.Tensor) -> None:
        """Decode `layer` of the current load from staging into the device rows (caller's stream)."""
        assert self.expects(layer), f"staged load expected layer {self._next}, got {layer}"
        g = self.group_of[layer]
        slot = g % 2
        first, end = self.groups[g]
        cur = torch.cuda.current_stream(self.device)
        if layer == first:
            cur.wait_event(self.staged[slot])
        self.ops.decode.default(self.desc[layer], self.cfg[slot], self._local, device_rows, dst0, dst1, self.err.word)
        self._next = layer + 1
        if layer == end - 1:
            self.decoded[slot].record(cur)
            if g + 2 < len(self.groups):
                self._copy(g + 2)
        if self._next == self.layout.num_layers:
            self._ids = self._local = None

    def shutdown(self) -> None:
        """Wait for the side stream's copies; the staged path is off afterwards."""
        if self.enabled and not self._closed:
            self.stream.synchronize()
        self._closed = True
