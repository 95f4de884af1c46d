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
- `backup_from_device_all_layer` asks the plane table which streams each new page gets a plane of
  (new pages are the hottest; they may take the plane of a colder page), then makes one codec call
  that writes the floor pages and those planes (`codec.backup(..., planes=offsets)`: on a GPU the
  encode kernel writes the planes into pinned host memory itself);
- `load_to_device_per_layer` makes one codec call per layer with the load's plane offsets (looked up
  under the pool lock, cached until the plane table changes), so every page decodes at the precision
  it holds in the same launch; layer 0 counts as a touch and adds the page's tokens to
  `served_tokens_by_bits`;
- slot fences: the native codec reads and writes planes asynchronously, on the caller's CUDA stream.
  Every plane slot remembers the CUDA event after the last load that read it and after the backup that
  wrote it. A backup that writes a slot a queued load still reads makes its stream wait for that load
  (on the GPU, no host wait); the CPU touches a slot (a plane move's source and destination, a row
  handed back to SGLang) only once both events of that slot completed, waiting for them if they have
  not. The slots that demotion and moves take are the coldest, long since loaded, so these waits are
  rare; the pool never waits for a whole stream (SGLang's streams also wait for the forward pass);
- L3 (`elastic_l3.py`): a page goes to L3 as its floor page (the object a fixed pool of the floor config
  writes and reads) plus one object per plane it holds at that moment (`kvtq_copy_planes`, copied out
  under the lock); a page read from L3 enters at the floor and is touched, and the plane objects the
  reader found valid are admitted like a backup's planes (`kvtq_admit_planes`), unless the page was
  freed since the read began (a per-page generation, `kvtq_generations`);
- `free` (SGLang's eviction) drops the page's planes and counts an eviction.

Every method that reads or writes plane state holds `self.lock`, the base pool's RLock, which the
base's own alloc/free take as well (one lock, no ordering to get wrong). The codec is the fixed
pool's: the native kernels on CUDA (the plane decode and encode are in the same launches as the floor),
the reference codec on CPU device pools (synchronous, so the fences are no-ops there).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from kvtuner_hicache.config import ConfigError
from kvtuner_hicache.elastic_planes import PlaneTable, Slot
from kvtuner_hicache.page_format import ALIGN
from kvtuner_hicache.quant.elastic_pages import PLANE_LAYOUT_VERSION, RefinementLayout
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
        self.planes: PlaneTable | None = None  # the base init calls clear() before the table exists
        self._spare_rows: list[int] = []  # rows taken from SGLang's allocator, not yet given a plane
        self._released: list[int] = []  # rows handed back, not yet freed in SGLang's allocator
        self._row_want = 1  # rows the next refill of _spare_rows takes
        self._generation: dict[int, int] = {}  # page -> times freed (an L3 read admits planes only if unchanged)
        self._epoch = 0  # clear() count
        self._slot_reads: dict[Slot, Any] = {}  # slot -> CUDA event after the last load that read it
        self._slot_writes: dict[Slot, Any] = {}  # slot -> CUDA event after the backup that wrote it
        super().__init__(device_pool, **kwargs)
        self.refinement = RefinementLayout(self.page_layout)
        if not self.refinement.streams:
            raise ConfigError("--kvtuner-hicache-elastic needs at least one 2- or 4-bit asymmetric layer (the floor "
                              "comes from the bit flags or the per-layer table; b-bit layers get b more bits)")
        self._last_plane_layer = max(c.layer for cs in self.refinement.chunks.values() for c in cs)
        widest = max(self.refinement.plane_bytes.values())
        halves = self.row_stride // ((widest + ALIGN - 1) // ALIGN * ALIGN)
        half_stride = self.row_stride // halves // ALIGN * ALIGN
        self.plane_halves, self.half_stride = halves, half_stride
        self._halves = torch.as_strided(self.kv_buffer, (self.page_num, halves, half_stride),
                                        (self.row_stride, half_stride, 1))
        self._cuda = torch.device(device_pool.device).type == "cuda"
        self._load_planes: torch.Tensor | None = None  # the current load's plane offsets ...
        self._load_slots: list[Slot] = []  # ... the slots they name ...
        self._load_planes_key: tuple[Any, int] | None = None  # ... valid for (load ids, plane table version)
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
            "coldest page first, values before keys; L3 stores floor pages plus plane objects (copying backends)",
            self.page_num, floor_bits, self.size, top_bits, top_pages * self.page_size, PLANE_LAYOUT_VERSION,
            "/".join(str(self.refinement.plane_bytes[s]) for s in self.refinement.streams), halves,
        )

    # ---- rows for planes: taken from and given back to the base allocator ------------------------

    # SGLang's allocator costs tens of microseconds per call, so rows move in batches: a backup takes the
    # rows its planes may need in one call (`_row_want`) and gives the unused ones back in one call; rows
    # handed back during a reclaim or a drop are freed together when it ends (`_flush_rows`).

    def _take_row(self) -> int | None:
        if not self._spare_rows:
            ps = self.page_size
            k = min(self._row_want, super().available_size() // ps) if self._row_want else 0
            idx = super().alloc(k * ps) if k > 0 else None
            if idx is None or idx.numel() == 0:
                self._row_want = 0  # none free: do not ask again until the next flush
                return None
            self._spare_rows = (idx[::ps] // ps).tolist()[::-1]
        return self._spare_rows.pop()

    def _release_row(self, row: int) -> None:
        for half in range(self.plane_halves):  # SGLang may write the row from the CPU (an L3 page) at once
            self._slot_idle((row, half))
        self._released.append(row)

    def _flush_rows(self) -> None:
        """Give the rows taken but not used, and the rows handed back, to SGLang's allocator in one call."""
        rows = self._released + self._spare_rows
        self._released, self._spare_rows, self._row_want = [], [], 1
        if rows:
            ps = self.page_size
            r = torch.tensor(rows, dtype=torch.int64)
            super().free((r[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1))

    def _move_plane(self, src: Slot, dst: Slot) -> None:
        self._slot_idle(src)
        self._slot_idle(dst)
        self._halves[dst[0], dst[1]].copy_(self._halves[src[0], src[1]])

    def _offsets(self, page_ids: list[int]) -> tuple[torch.Tensor | None, list[Slot]]:
        """The codec's planes argument for `page_ids` (CPU int64 [2, n]; None when no page has a plane)
        and the slots it names. A slot's offset is its byte offset from the start of the host buffer (what the
        codec addresses)."""
        offs = [[-1] * len(page_ids), [-1] * len(page_ids)]
        slots: list[Slot] = []
        rs, hs = self.row_stride, self.half_stride
        for s in self.refinement.streams:
            held = self.planes.slots_of(page_ids, s)
            if any(held):
                offs[s] = [-1 if sl is None else sl[0] * rs + sl[1] * hs for sl in held]
                slots += [sl for sl in held if sl is not None]
        return (torch.tensor(offs, dtype=torch.int64) if slots else None), slots

    # ---- slot fences: no slot is reused while a kernel enqueued earlier may still use it ----------

    def _event(self) -> Any:
        """A CUDA event recorded now on the current stream (None on CPU: the reference codec is synchronous)."""
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _slot_idle(self, slot: Slot) -> None:
        """Before the CPU reads or writes `slot`: the kernels that read or wrote it have run."""
        for events in (self._slot_reads, self._slot_writes):
            ev = events.pop(slot, None)
            if ev is not None and not ev.query():
                ev.synchronize()

    def _wait_for_readers(self, slots: list[Slot]) -> None:
        """Before a backup writes `slots` on the current stream: that stream waits (on the GPU) for the
        queued loads that still read them."""
        events = {id(ev): ev for sl in slots if (ev := self._slot_reads.get(sl)) is not None}  # one per load
        pending = [ev for ev in events.values() if not ev.query()]
        if pending:
            stream = torch.cuda.current_stream()
            for ev in pending:
                stream.wait_event(ev)

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
            self.planes.reclaim(-(-short // self.page_size))  # moves and row hand-backs wait per slot
            self._flush_rows()
            got = super().alloc(need_size)
            self._report(before)  # after the allocation: the published census counts the new pages
            return got

    def free(self, indices: torch.Tensor) -> int:
        with self.lock:
            if self.planes is not None and indices.numel():
                pages = torch.unique(indices.cpu() // self.page_size).tolist()
                self.planes.drop(pages)  # a row handed back waits for its slots
                self.evicted_pages += len(pages)
                for p in pages:
                    self._generation[p] = self._generation.get(p, 0) + 1
            freed = super().free(indices)
            self._flush_rows()
            self.publish_metrics()
            return freed

    def clear(self) -> None:
        with self.lock:
            for slot in list(self._slot_reads) + list(self._slot_writes):
                self._slot_idle(slot)
            self._released, self._spare_rows = [], []  # every row goes back below
            self._epoch += 1
            super().clear()
            if self.planes is not None:
                self.planes.clear()

    # ---- GPU <-> host ------------------------------------------------------------------------------

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices, io_backend) -> None:
        ids = self._backup_page_ids(host_indices, io_backend)
        page_ids = ids.tolist()
        with self.lock:
            before = sum(self.planes.stats.demotions)
            self._row_want = -(-len(page_ids) * len(self.refinement.streams) // self.plane_halves)
            self.planes.admit(page_ids)
            self._flush_rows()  # the rows admission did not use
            planes, slots = self._offsets(page_ids)
            if planes is not None and self._cuda:
                self._wait_for_readers(slots)  # a slot admission took from a demoted page may still be read
            self.codec.backup(ids, device_indices, planes)
            ev = self._event() if planes is not None else None
            if ev is not None:
                for sl in slots:
                    self._slot_writes[sl] = ev
            self._report(before)

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id, io_backend,
                                 *, is_draft: bool = False) -> None:
        ids = self._load_ids(host_indices, layer_id, io_backend, is_draft)
        cpu_ids = self._load_cpu_page_ids
        readable = cpu_ids if cpu_ids is not None else ids  # the GPU ids cost a device read (waits for the stream)
        with self.lock:
            page_ids = readable.tolist() if layer_id == 0 else None
            if page_ids is not None:
                for label, n in Counter(map(self._label, map(self.planes.streams_of, page_ids))).items():
                    self.served_tokens_by_bits[label] += n * self.page_size
                self.planes.touch(page_ids)
                self.publish_metrics()
            cached = self._load_planes_key
            fresh = cached is None or cached[0] is not ids or cached[1] != self.planes.version
            if fresh:  # a new load, or planes moved since
                self._load_planes, self._load_slots = self._offsets(page_ids if page_ids is not None else readable.tolist())
                self._load_planes_key = (ids, self.planes.version)
            planes = self._load_planes
            self.codec.load_layer(layer_id, ids, device_indices, planes, cpu_page_ids=cpu_ids)
            # the event after the layer-0 call covers a one-launch load, the one after the last layer with
            # planes the per-layer launches
            if planes is not None and (fresh or layer_id == self._last_plane_layer):
                ev = self._event()
                if ev is not None:
                    for sl in self._load_slots:
                        self._slot_reads[sl] = ev

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        super().set_from_flat_data_page(index, data_page)
        with self.lock:
            self.planes.touch([int(index) // self.page_size])

    def kvtq_write_pages(self, ids: list[int], rows: torch.Tensor) -> None:
        super().kvtq_write_pages(ids, rows)
        with self.lock:
            self.planes.touch(ids)

    # ---- L3: planes as objects beside the floor pages (elastic_l3.py) -----------------------------

    def kvtq_copy_planes(self, page_ids: list[int], header_bytes: int) -> list[tuple[int, int, torch.Tensor]]:
        """(index into page_ids, stream, uint8 [header_bytes + plane bytes]) for every plane the pages hold
        now, the plane copied after `header_bytes` (the caller writes the header)."""
        out = []
        with self.lock:
            for i, p in enumerate(page_ids):
                for s in self.planes.streams_of(p):
                    sl = self.planes.slot_of(p, s)
                    ev = self._slot_writes.get(sl)
                    if ev is not None and not ev.query():
                        ev.synchronize()  # the backup kernel writing it has not run yet
                    n = self.refinement.plane_bytes[s]
                    obj = torch.empty(header_bytes + n, dtype=torch.uint8)
                    obj[header_bytes:].copy_(self._halves[sl[0], sl[1], :n])
                    out.append((i, s, obj))
        return out

    def kvtq_generations(self, page_ids: list[int]) -> list[tuple[int, int]]:
        """A token per page that changes when the page is freed (or the pool cleared)."""
        with self.lock:
            return [(self._epoch, self._generation.get(p, 0)) for p in page_ids]

    def kvtq_admit_planes(self, page_ids: list[int], generations: list[tuple[int, int]],
                          planes: dict[int, list[torch.Tensor | None]]) -> int:
        """Give pages just read from L3 the verified planes read beside them (`planes[stream][i]`, None:
        none), where room can be made as for a backup (one admission per set of streams, so a page's
        planes never displace each other), skipping pages freed since `generations` was taken and planes
        a page holds already; returns how many planes were admitted."""
        with self.lock:
            now = [(self._epoch, self._generation.get(p, 0)) for p in page_ids]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(page_ids):
                if generations[i] != now[i]:
                    continue  # freed (and maybe handed out again) since the read began
                want = tuple(st for st in self.refinement.streams
                             if planes.get(st) is not None and planes[st][i] is not None
                             and self.planes.slot_of(p, st) is None)
                if want:
                    groups.setdefault(want, []).append(i)
            before = sum(self.planes.stats.demotions)
            admitted = 0
            for want, idx in groups.items():
                self._row_want = -(-len(idx) * len(want) // self.plane_halves)
                granted = self.planes.admit([page_ids[i] for i in idx], streams=list(want))
                self._flush_rows()
                for i, got in zip(idx, granted, strict=True):
                    for st in want:
                        if st in got:
                            sl = self.planes.slot_of(page_ids[i], st)
                            self._slot_idle(sl)
                            pl = planes[st][i]
                            self._halves[sl[0], sl[1], : pl.numel()].copy_(pl)
                            admitted += 1
            if groups:
                self._report(before)
            return admitted

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
