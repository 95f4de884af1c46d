"""The bf16 tail store behind --kvtuner-hicache-residual-length R (HiCache meaning of KIVI's residual).

`ResidualTailCodec` wraps the pool's codec, so the pool's hot methods know nothing of it: the last
ceil(R / page_size) pages of every backup op are also kept in full precision, in a host-side LRU
sized to 1/8 of the host byte budget (the copy is synchronous: opt-in, measured to buy little once
keys are per channel, docs/accuracy.md). In SGLang 0.5.17 one backup op is one radix
node: `HiCacheController.write()` queues one op and runs `start_writing()` at once, so the tail
of an op is the tail of a node (if ops were ever merged, only the last node would get a tail:
still correct, only less precise). A load uses the exact copy for pages that still have one and
the quantized page otherwise. L3 only ever sees the quantized page. Entries die with their host
page (free/clear/overwrite), so a reused page id never loads another node's tail.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

from kvtuner_hicache.quant.codec import PageCodec, WrappingCodec

logger = logging.getLogger(__name__)


class ResidualTailStore:
    """Host LRU of bf16 copies of tail pages, keyed by host page id (entries die with their page)."""

    def __init__(self, device_buffers: list[Any], page_size: int, residual_length: int, budget_bytes: int,
                 pin_memory: bool):
        self.page_size = ps = page_size
        self.dtype = device_buffers[0][0].dtype
        # one tensor per device buffer: [slot, layer, token, heads, dim] (MLA: heads=1, dim=576)
        self.shapes = [tuple(per_layer[0].shape[1:]) for per_layer in device_buffers]
        layers = len(device_buffers[0])
        slot_bytes = sum(layers * ps * h * d for h, d in self.shapes) * self.dtype.itemsize
        self.capacity = max(0, int(budget_bytes // slot_bytes))
        self.tail_pages = -(-residual_length // ps)
        self.buffers = [
            torch.empty((self.capacity, layers, ps, h, d), dtype=self.dtype, pin_memory=pin_memory)
            for h, d in self.shapes
        ]
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # host page id -> slot, LRU order
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.lock = threading.Lock()  # backup/load run on the scheduler thread, free() may not
        logger.info("kvtuner_hicache bf16 tail store: last %d page(s) per node, %d page slots, %.2f GB",
                    self.tail_pages, self.capacity, self.capacity * slot_bytes / 1e9)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def drop(self, page_ids: list[int]) -> None:
        with self.lock:
            for p in page_ids:
                slot = self.slot_of.pop(p, None)
                if slot is not None:
                    self.free_slots.append(slot)

    def clear(self) -> None:
        with self.lock:
            self.slot_of.clear()
            self.free_slots = list(range(self.capacity - 1, -1, -1))

    def _take_slot(self, page_id: int) -> int:
        if page_id in self.slot_of:
            self.slot_of.move_to_end(page_id)
            return self.slot_of[page_id]
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            _, slot = self.slot_of.popitem(last=False)  # evict the least recently used tail
        self.slot_of[page_id] = slot
        return slot

    # ---- backup: copy the op's last pages ---------------------------------------------------------

    def on_backup(self, page_ids: list[int], device_indices: torch.Tensor, device_buffers: list[Any]) -> None:
        if self.capacity == 0:
            return
        ps = self.page_size
        k = min(self.tail_pages, len(page_ids))
        self.drop(page_ids[:-k] if k else page_ids)  # stale tails of re-written pages
        if k == 0:
            return
        with self.lock:
            slots = [self._take_slot(p) for p in page_ids[-k:]]
        rows = device_indices[-k * ps :]
        slot_t = torch.tensor(slots, dtype=torch.int64)
        for b, per_layer in enumerate(device_buffers):
            h, d = self.shapes[b]
            x = torch.stack([buf[rows] for buf in per_layer])  # [L, k*ps, h, d] on the device
            x = x.reshape(len(per_layer), k, ps, h, d).transpose(0, 1)
            self.buffers[b][slot_t] = x.to("cpu", non_blocking=False)

    # ---- load ----------------------------------------------------------------------------------

    def plan_load(self, page_ids: list[int], device_indices: torch.Tensor) -> tuple | None:
        """Which loaded pages have an exact copy: (slots, device rows) or None."""
        ps = self.page_size
        with self.lock:
            hits = [(i, self.slot_of[p]) for i, p in enumerate(page_ids) if p in self.slot_of]
            for i, _ in hits:
                self.slot_of.move_to_end(page_ids[i])
        if not hits:
            return None
        pos = torch.tensor([i for i, _ in hits], dtype=torch.int64, device=device_indices.device)
        rows = (pos[:, None] * ps + torch.arange(ps, device=pos.device)).reshape(-1)
        return torch.tensor([s for _, s in hits], dtype=torch.int64), device_indices[rows]

    def load_layer(self, plan: tuple, layer: int, buffers: list[torch.Tensor]) -> None:
        slots, dev_rows = plan
        for b, dst in enumerate(buffers):
            h, d = self.shapes[b]
            dst[dev_rows] = self.buffers[b][slots, layer].reshape(-1, h, d).to(dst.device, non_blocking=True)


class ResidualTailCodec(WrappingCodec):
    """The pool's codec plus the bf16 tail store: backups also copy their tail pages, loads overwrite
    the dequantized rows of pages that still have an exact copy."""

    def __init__(self, inner: PageCodec, store: ResidualTailStore):
        super().__init__(inner)
        self.store = store
        self._plan_ids: torch.Tensor | None = None
        self._plan: tuple | None = None

    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        self.inner.backup(host_page_ids, device_rows, planes)
        self.store.on_backup([int(p) for p in host_page_ids.tolist()], device_rows, self.device_kv.buffers())

    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        self.inner.load_layer(layer, page_ids, device_rows, planes, cpu_page_ids=cpu_page_ids)
        if layer == 0 or self._plan_ids is not page_ids:  # one plan per load (the ids tensor is reused)
            self._plan_ids = page_ids
            ids = cpu_page_ids if cpu_page_ids is not None else page_ids  # the CPU copy needs no device read
            self._plan = self.store.plan_load([int(p) for p in ids.tolist()], device_rows)
        if self._plan is not None:
            self.store.load_layer(self._plan, layer, self.device_kv.layer(layer))

    def pages_written(self, host_page_ids) -> None:
        self.store.drop([int(p) for p in host_page_ids])
        self.inner.pages_written(host_page_ids)

    def describe(self) -> str:
        return f"{self.inner.describe()} + bf16 tail store ({self.store.capacity} pages)"

