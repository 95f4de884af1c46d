"""Staged loads: the copy engine moves a batch's packed bytes into GPU staging, the kernel decodes from there.

A per-layer load that reads pinned host pages zero-copy (the decode kernel's own PCIe reads) pays a fixed
ramp and tail per launch, so at a few MB per layer it moves well below the PCIe rate (docs/benchmarks.md).
A staged load instead copies the layers of every page of the batch, a group of consecutive layers at a
time, into a GPU staging area with the copy engine, on a side stream, and decodes each layer from device
memory on the caller's stream. The mechanics live in the native `StagedRing` (kvtq_ops.cpp): a load of n
pages uses as many group slots as the staging area holds at n pages (all groups for small n, so every copy
is in flight from layer 0; at least two), and each per-layer call is one call into C++ (run 11 measured
40 us of host time per layer for the Python version of this loop; docs/benchmarks.md).

Lifecycle (the NativeCodec's side of the contract):

    staged = StagedLoad(layout, plan, host_pages, device, err)     # once per pool: geometry only
    staged.fits(n)                                                  # can a batch of n pages go this way?
                                                                    # (the first yes allocates staging + ring)
    staged.begin(cpu_page_ids, device_rows, generation, buffers)    # layer 0: enqueue copies, decode layer 0
    staged.layer(layer)                                             # every later layer, in order 1..L-1
    staged.shutdown()                                               # drains the ring's stream

Stream contract: `begin` and `layer` only enqueue work (copies on the ring's own stream, decodes on the
caller's current stream) and never synchronize. When `layer(l)` returns, layer l's device rows are
written by work on the caller's stream, which is all SGLang's per-layer events need. A copy into a slot
waits, on the GPU, for the decodes that last read it; a load's first copies wait for the previous load's
decodes (all that its caller had enqueued, if it stopped early). Host pages are read asynchronously: like
a zero-copy load, the owner keeps them in place until the caller's stream has run the load (SGLang does:
pages being loaded are pinned in the radix tree). The ring's decode arguments hold the addresses of the
owner's layer tensors: `generation` changes when one is replaced, and `begin` rebuilds them.

Memory: 2 x `max_pages` x (bytes of the largest group of one page) of GPU memory, allocated by the first
staged load (none if it does not fit: a WARNING, and loads stay zero-copy).
Environment: KVTQ_LOAD_GROUP (layers per copy group, default 4: in run 12's sweep of 1-28 it was the
fastest or within 0.7 % of it at 64-256 pages; 7 was 4 % faster for KV4 at 32), KVTQ_LOAD_STAGING_PAGES
(the largest staged batch; staging holds two groups of it; default 256; 0 turns staged loads off),
KVTQ_LOAD_STAGED_MIN (smallest batch, default 32).
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
_DESC_PLANE_OFFSET = 15  # field 15 (kvtq_kernels.h DecodeStream.plane_off): refinement codes in the plane


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
    `pitch`: the staging row size (the largest group, areas 128-byte aligned).

    With `refinement` (elastic pools), a staging row also has room for the group's refinement codes of every
    stream after the page's chunks: `plane_copies[g][s]` = (offset in the stream's plane, nbytes, dst_off)
    (nbytes 0: the group has no refinable chunk of stream s), and `plane_offsets[layer][s]` = where that
    layer's refinement codes of stream s sit in the staging row (0 for a chunk without them).
    """

    def __init__(self, layout: PageLayout, group_layers: int, refinement: Any = None):
        L = layout.num_layers
        S = len(layout.streams)
        g = max(1, group_layers)
        self.groups = [(a, min(L, a + g)) for a in range(0, L, g)]
        self.group_of = [a // g for a in range(L)]
        self.copies: list[list[list[int]]] = []
        self.plane_copies: list[list[list[int]]] = []
        self.offsets: list[list[int]] = [[0] * S for _ in range(L)]
        self.plane_offsets: list[list[int]] = [[0] * S for _ in range(L)]
        self.pitch = 0
        for a, b in self.groups:
            rows, dst = [], 0
            for s in range(S):
                first, last = layout.chunk(s, a), layout.chunk(s, b - 1)
                nbytes = last.offset + last.nbytes - first.offset
                rows.append([first.offset, nbytes, dst])
                for layer in range(a, b):
                    self.offsets[layer][s] = dst + layout.chunk(s, layer).offset - first.offset
                dst += _aligned(nbytes)
            self.copies.append(rows)
            planes = []
            for s in range(S):
                rcs = [c for layer in range(a, b) if refinement is not None
                       and (c := refinement.chunk(s, layer)) is not None]
                if not rcs:
                    planes.append([0, 0, 0])
                    continue
                first_off = rcs[0].offset
                nbytes = rcs[-1].offset + rcs[-1].nbytes - first_off
                planes.append([first_off, nbytes, dst])
                for c in rcs:
                    self.plane_offsets[c.layer][s] = dst + c.offset - first_off
                dst += _aligned(nbytes)
            self.plane_copies.append(planes)
            self.pitch = max(self.pitch, dst)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class StagedLoad:
    """Copy-engine staging of a load's pages through the native StagedRing (module docstring)."""

    def __init__(self, layout: PageLayout, plan: Any, host_pages: torch.Tensor, device: torch.device, err: Any, *,
                 group_layers: int | None = None, max_pages: int | None = None, min_pages: int | None = None,
                 refinement: Any = None):
        """`refinement`: the RefinementLayout of an elastic pool (staging rows then hold the refinement codes
        of a group too, and loads that pass planes are staged); None for fixed pools."""
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
        geo = StagedGeometry(layout, g, refinement)
        self.groups, self.pitch = geo.groups, geo.pitch
        self.takes_planes = refinement is not None and bool(refinement.streams)
        self.copies = torch.tensor(geo.copies, dtype=torch.int64)  # [groups, streams, 3]
        pc = [(rows + [[0, 0, 0]] * 2)[:2] for rows in geo.plane_copies]  # two stream rows, as planes have
        self.plane_copies = torch.tensor(pc, dtype=torch.int64).reshape(len(geo.groups), 2, 3)
        self.group_first = torch.tensor([a for a, _ in geo.groups] + [L], dtype=torch.int64)
        desc = []  # the decode descriptors of each layer with the chunk offsets of its staging row
        for layer in range(L):
            d = plan.dec_desc[layer].clone()
            for s, off in enumerate(geo.offsets[layer]):
                d[s, _DESC_OFFSET] = off
                d[s, _DESC_PLANE_OFFSET] = geo.plane_offsets[layer][s]
            desc.append(d)
        self.desc = torch.stack(desc) if desc else None  # [L, streams, fields]
        self.enabled = self.max_pages >= self.min_pages and L > 0
        self.staging_bytes = 2 * self.max_pages * self.pitch if self.enabled else 0  # what `_allocate` takes
        self.staging: torch.Tensor | None = None  # allocated by the first staged load (`_allocate`)
        self.ring: Any = None  # torch.classes.kvtq.StagedRing, made with the staging area
        self.slots = 0  # group slots of the last load (all groups: every copy in flight from layer 0)
        self._bound = -1  # the generation of layer tensors the ring's decode arguments hold
        self._next = -1  # the layer the load in flight expects next; -1: none
        self._closed = False
        if not self.enabled:
            return
        self._native, self._plan = native, plan

    def fits(self, n: int) -> bool:
        """Whether a batch of n pages goes through staging (else the caller decodes zero-copy)."""
        return self.enabled and not self._closed and self.min_pages <= n <= self.max_pages and self._allocate()

    def _allocate(self) -> bool:
        """The staging area and its ring, made on first use (a pool that never loads a mid-size batch holds none).
        If the GPU has no room for it, staged loads are turned off with a WARNING and loads stay zero-copy."""
        if self.ring is not None:
            return True
        try:
            self.staging = torch.empty(self.staging_bytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as e:
            self.enabled = False
            logger.warning("kvtuner_hicache: no GPU memory for %.0f MiB of load staging (%s); loads of %d-%d pages "
                           "decode zero-copy from pinned memory instead (slower; KVTQ_LOAD_STAGING_PAGES sizes it)",
                           self.staging_bytes / 2**20, e, self.min_pages, self.max_pages)
            return False
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.ring = torch.classes.kvtq.StagedRing(idx, self.staging, self.host_pages, self.copies, self.group_first,
                                                  self.plane_copies, self.pitch, self.max_pages)
        self._layer = self.ring.layer  # bound once: the per-layer call is this one method
        return True

    def describe(self) -> str:
        if not self.enabled:
            return "staged loads off"
        return (f"staged loads of {self.min_pages}-{self.max_pages} pages, {self.groups[0][1]} layers per copy"
                f"{' with refinement planes' if self.takes_planes else ''}, "
                f"{self.staging_bytes / 2**20:.0f} MiB of GPU staging")

    def begin(self, cpu_page_ids: torch.Tensor, device_rows: torch.Tensor, generation: int,
              buffers: Any, planes: torch.Tensor | None = None) -> None:
        """Layer 0 of a load: host page ids (CPU int64) of `fits` size, its device rows (CUDA int64), and the
        generation of the owner's layer tensors; `buffers()` returns them ([layer tensors] per buffer) when
        the ring's decode arguments must be rebuilt. `planes`: the load's refinement-plane offsets (CPU int64
        [2, n], checked by the caller; only where `takes_planes`). Enqueues the copies the staging holds, then
        layer 0."""
        assert self.ring is not None, "begin() after fits()"
        if generation != self._bound:
            bufs = buffers()
            stage_cfg = self._native.decode_cfg(self.staging.view(-1, self.pitch), self.staging.data_ptr(),
                                                self.layout, self._plan, 0, self.err, row_bytes=self.pitch)
            self.ring.set_layers(self.desc, stage_cfg, list(bufs[0]), list(bufs[-1]), self.err.word)
            self._bound = generation
        self.slots = self.ring.begin(cpu_page_ids, device_rows, planes)
        self._next = 0
        self.layer(0)

    def expects(self, layer: int) -> bool:
        """Whether `layer` is the next layer of the current staged load."""
        return layer == self._next

    def layer(self, layer: int) -> None:
        """Decode `layer` of the current load from staging into the device rows (caller's stream)."""
        self._layer(layer)  # checks the order itself
        self._next = layer + 1 if layer + 1 < self.layout.num_layers else -1

    def shutdown(self) -> None:
        """Wait for the ring's copies; the staged path is off afterwards."""
        if self.ring is not None and not self._closed:
            self.ring.release()
        self._closed = True
