"""Precision-elastic HiCache host pool (issue 15, `--kvtuner-hicache-elastic`): pages give up precision
before they give up their place.

Every page's own row holds its floor page (the bit flags or the per-layer table), byte for byte the
fixed pool's page, so L3, the storage proxy and the per-layer load of the floor are unchanged. A page
also holds, while there is room, one refinement plane per elastic stream (`quant/elastic_pages.py`:
b more bits on every b-bit chunk, b = 2 or 4), kept in rows SGLang has not allocated (`elastic_planes.PlaneTable`).

Lifecycle contract, on top of the fixed pool's:

- capacity is bytes: the row count is what the host budget holds at the floor (the fixed pool's
  sizing); `available_size()` counts rows that only hold planes as free, because `alloc()` takes
  them back (coldest planes demoted, values before keys, half-used rows paired) before it returns
  None. SGLang's eviction therefore runs only when every page is at its floor;
- `backup_from_device_all_layer` writes the floor page and then the planes of the streams the
  plane table granted (new pages are the hottest; they may take the plane of a colder page);
- `load_to_device_per_layer` decodes the floor, then overwrites the rows of pages that hold a plane
  for this layer with the top-precision decode (looked up under the pool lock per layer, so a page
  demoted by another thread mid-load is loaded at its floor for the remaining layers: correct values,
  lower precision); layer 0 counts as a touch and adds the page's tokens to `served_tokens_by_bits`;
- a page written from L3 (`set_from_flat_data_page`) enters at its floor: L3 holds floor pages only
  (the same objects a fixed pool of the floor config writes and reads), and it is touched;
- `free` (SGLang's eviction) drops the page's planes and counts an eviction.

Every method that reads or writes plane state holds `self.lock`, the base pool's RLock, which the
base's own alloc/free take as well (one lock, no ordering to get wrong). The planes are pure host
memory and written synchronously, so this pool runs with the reference codec on CPU device pools
only; on CUDA it refuses to build (the native mixed-precision decode is not written yet).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from kvtuner_hicache.config import ConfigError
from kvtuner_hicache.elastic_planes import PlaneTable, Slot
from kvtuner_hicache.page_format import ALIGN
from kvtuner_hicache.quant.elastic_pages import PLANE_LAYOUT_VERSION, RefinementLayout, encode_planes, load_top
from kvtuner_hicache.sglang_ext.elastic_metrics import ElasticMetrics, metrics_enabled
from kvtuner_hicache.sglang_ext.host_pool import QuantizedMHATokenToKVPoolHost

logger = logging.getLogger(__name__)

LOG_EVERY_DEMOTIONS = 1000  # one INFO line with the pool's counters per this many demotions


def _tp_rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(getattr(get_parallel(), "tp_rank", 0) or 0)
    except Exception:  # no published runtime context: a single rank
        return 0


class ElasticMHATokenToKVPoolHost(QuantizedMHATokenToKVPoolHost):
    """MHA/GQA host pool whose pages carry refinement planes while there is room (see the module doc)."""

    kvtq_elastic = True

    def __init__(self, device_pool: Any, **kwargs: Any):
        if str(device_pool.device) != "cpu":
            raise ConfigError(
                "--kvtuner-hicache-elastic runs on CPU device pools only in this release (the native "
                f"mixed-precision decode is not built yet; device here: {device_pool.device}); drop the flag on GPUs"
            )
        self.planes: PlaneTable | None = None  # the base init calls clear() before the table exists
        super().__init__(device_pool, **kwargs)
        self.refinement = RefinementLayout(self.page_layout)
        if not self.refinement.streams:
            raise ConfigError("--kvtuner-hicache-elastic needs at least one 2- or 4-bit asymmetric layer (the floor "
                              "comes from the bit flags or the per-layer table; b-bit layers get b more bits)")
        widest = max(self.refinement.plane_bytes.values())
        halves = self.row_stride // ((widest + ALIGN - 1) // ALIGN * ALIGN)
        half_stride = self.row_stride // halves // ALIGN * ALIGN
        self.plane_halves, self.half_stride = halves, half_stride
        self._halves = torch.as_strided(self.kv_buffer, (self.page_num, halves, half_stride),
                                        (self.row_stride, half_stride, 1))
        self._buffers = self._device_buffers(device_pool)
        self.planes = PlaneTable(self.refinement.streams, halves, self._take_row, self._release_row, self._move_plane)
        self.evicted_pages = 0
        self.served_tokens_by_bits: Counter[str] = Counter()
        self._labels: dict[tuple[int, ...], str] = {}
        self.metrics = ElasticMetrics(_tp_rank()) if metrics_enabled() else None
        floor_bits = self.refinement.top_bits_per_element(())
        top_bits = self.refinement.top_bits_per_element(self.refinement.streams)
        top_pages = self.page_num * halves // (halves + len(self.refinement.streams))
        logger.info(
            "kvtuner_hicache elastic host pool: %d pages; at the floor (%g code bits/element) %d tokens, all at "
            "the top (%g bits) %d tokens; refinement planes (layout v%d) of %s B, %d per row; demotion: "
            "coldest page first, values before keys; L3 holds floor pages",
            self.page_num, floor_bits, self.size, top_bits, top_pages * self.page_size, PLANE_LAYOUT_VERSION,
            "/".join(str(self.refinement.plane_bytes[s]) for s in self.refinement.streams), halves,
        )

    # ---- rows for planes: taken from and given back to the base allocator ------------------------

    def _take_row(self) -> int | None:
        ps = self.page_size
        if super().available_size() < ps:
            return None
        idx = super().alloc(ps)
        return None if idx is None or idx.numel() == 0 else int(idx[0]) // ps

    def _release_row(self, row: int) -> None:
        ps = self.page_size
        super().free(torch.arange(row * ps, (row + 1) * ps, dtype=torch.int64))

    def _move_plane(self, src: Slot, dst: Slot) -> None:
        self._halves[dst[0], dst[1]].copy_(self._halves[src[0], src[1]])

    # ---- allocation: planes give way before SGLang sees a full pool -----------------------------

    def available_size(self) -> int:
        with self.lock:
            held = self.planes.host_rows * self.page_size if self.planes is not None else 0
            return super().available_size() + held

    def alloc(self, need_size: int) -> torch.Tensor | None:
        with self.lock:
            short = need_size - super().available_size()
            if short <= 0 or self.planes is None:
                return super().alloc(need_size)
            before = sum(self.planes.stats.demotions)
            self.planes.reclaim(-(-short // self.page_size))
            got = super().alloc(need_size)
            self._report(before)  # after the allocation: the published census counts the new pages
            return got

    def free(self, indices: torch.Tensor) -> int:
        with self.lock:
            if self.planes is not None and indices.numel():
                pages = torch.unique(indices.cpu() // self.page_size).tolist()
                self.planes.drop(pages)
                self.evicted_pages += len(pages)
            freed = super().free(indices)
            self.publish_metrics()
            return freed

    def clear(self) -> None:
        with self.lock:
            super().clear()
            if self.planes is not None:
                self.planes.clear()

    # ---- GPU <-> host ------------------------------------------------------------------------------

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices, io_backend) -> None:
        super().backup_from_device_all_layer(device_pool, host_indices, device_indices, io_backend)
        ps = self.page_size
        page_ids = (host_indices[::ps] // ps).tolist()
        rows = device_indices.reshape(len(page_ids), ps)
        with self.lock:
            before = sum(self.planes.stats.demotions)
            granted = self.planes.admit(page_ids)
            for s in self.refinement.streams:
                sel = [i for i, g in enumerate(granted) if s in g]
                if not sel:
                    continue
                plane = encode_planes(self.refinement, s, self._buffers, rows[sel].reshape(-1))
                slots = [self.planes.slot_of(page_ids[i], s) for i in sel]
                r = torch.tensor([sl[0] for sl in slots], dtype=torch.int64)
                h = torch.tensor([sl[1] for sl in slots], dtype=torch.int64)
                self._halves[r, h, : plane.shape[1]] = plane
            self._report(before)

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id, io_backend,
                                 *, is_draft: bool = False) -> None:
        super().load_to_device_per_layer(device_pool, host_indices, device_indices, layer_id, io_backend,
                                         is_draft=is_draft)
        page_ids = self._load_page_ids.tolist()
        ps = self.page_size
        with self.lock:
            if layer_id == 0:
                for p in page_ids:
                    self.served_tokens_by_bits[self.bits_label(p)] += ps
                self.planes.touch(page_ids)
                self.publish_metrics()
            for s in self.refinement.streams:
                chunk = self.refinement.chunk(s, layer_id)
                if chunk is None:
                    continue
                sel = [(i, self.planes.slot_of(p, s)) for i, p in enumerate(page_ids)]
                sel = [(i, sl) for i, sl in sel if sl is not None]
                if not sel:
                    continue
                idx = torch.tensor([i for i, _ in sel], dtype=torch.int64)
                r = torch.tensor([sl[0] for _, sl in sel], dtype=torch.int64)
                h = torch.tensor([sl[1] for _, sl in sel], dtype=torch.int64)
                dst = device_indices.reshape(len(page_ids), ps)[idx].reshape(-1)
                spec = chunk.spec
                raw = self.pages[self._load_page_ids[idx], spec.offset : spec.offset + spec.nbytes]
                load_top(self.page_layout, chunk, raw, self._halves[r, h],
                         self._buffers[self.page_layout.streams[s].buffer][layer_id], dst)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        super().set_from_flat_data_page(index, data_page)
        with self.lock:
            self.planes.touch([int(index) // self.page_size])

    def kvtq_write_pages(self, ids: list[int], rows: torch.Tensor) -> None:
        super().kvtq_write_pages(ids, rows)
        with self.lock:
            self.planes.touch(ids)

    # ---- visibility --------------------------------------------------------------------------------

    def bits_label(self, page: int) -> str:
        """Mean code bits per element of `page` now ('8', '6', '4' for a K4V4 floor; metadata not counted)."""
        return self._label(self.planes.streams_of(page))

    def _label(self, streams: tuple[int, ...]) -> str:
        label = self._labels.get(streams)
        if label is None:  # a handful of stream sets per pool: computed once each
            label = self._labels[streams] = f"{self.refinement.top_bits_per_element(streams):g}"
        return label

    def elastic_stats(self) -> dict[str, Any]:
        """Pages per precision, demotions, plane moves and evictions, as one JSON-able dict."""
        with self.lock:
            ps = self.page_size
            by_bits: Counter[str] = Counter()
            for streams, n in self.planes.census.items():  # kept incrementally: no walk over the pages
                by_bits[self._label(streams)] += n
            above = sum(self.planes.census.values())
            used = self.page_num - super().available_size() // ps - self.planes.host_rows
            if used > above:
                by_bits[self._label(())] += used - above
            st = self.planes.stats
            names = [self.page_layout.streams[s].name for s in range(len(self.page_layout.streams))]
            return {
                "pages_by_bits": dict(by_bits),
                "plane_rows": self.planes.host_rows,
                "demotions": {names[s]: st.demotions[s] for s in self.refinement.streams},
                "plane_moves": st.moves,
                "planes_refused": st.refused_planes,
                "evicted_pages": self.evicted_pages,
                "served_tokens_by_bits": dict(self.served_tokens_by_bits),
            }

    def publish_metrics(self) -> None:
        """Push elastic_stats() to the Prometheus series (--enable-metrics) after every change: the census
        is incremental, so this costs a few series updates, not a walk over the pages."""
        if self.metrics is not None:
            self.metrics.publish(self.elastic_stats())

    def _report(self, demotions_before: int) -> None:
        """After a change: the periodic INFO line (per LOG_EVERY_DEMOTIONS demotions) and the metrics."""
        now = sum(self.planes.stats.demotions)
        if now // LOG_EVERY_DEMOTIONS > demotions_before // LOG_EVERY_DEMOTIONS:
            logger.info("kvtuner_hicache elastic host pool: %s", self.elastic_stats())
        self.publish_metrics()


__all__ = ["ElasticMHATokenToKVPoolHost"]
