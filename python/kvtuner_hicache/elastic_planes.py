"""Which elastic pages hold refinement planes, where those planes live, and who gives them up first.

An elastic host pool (issue 15, `sglang_ext/elastic_pool.py`) stores every page at its floor
precision in the page's own row, a byte-valid fixed page of the floor config. A page above the floor
also owns one *refinement plane* per elastic stream (keys, values): the extra bits that make its 4-bit
codes 8-bit ones (`quant/elastic_pages.py`). Planes have no rows of their own: they live in rows that
SGLang has not allocated, `halves` planes to a row ("host rows"). The pool takes such a row from its
base allocator on its own behalf, so SGLang's allocator never hands it out, and gives it back as soon
as it holds no plane.

Lifecycle contract (this class is the only writer of its state; the pool serialises every call
under its lock):

- `admit(pages)` gives one backup batch's pages planes. A plane comes from a half-used host row, else a
  fresh row (`take_row`), else by demoting the coldest plane of a page colder than the batch (never
  one of the batch itself); otherwise the page stays at its floor for that stream.
- `touch(pages)` marks pages used (backup, load, prefetch): demotion takes the coldest first.
- `reclaim(rows)` frees whole rows for SGLang's allocator: pairs half-used host rows (one plane
  move each, `move_plane`), demoting the coldest planes (values before keys of the same page)
  until enough rows are free or no plane is left. Pages at the floor are never touched here:
  evicting them is SGLang's decision once every page is at the floor.
- `drop(pages)` forgets freed pages (their planes go, no demotion counted).
- `version` changes whenever any (page, stream) -> slot mapping does, so a reader may cache slot lookups.

Recency is a counter, not a clock; a stale heap entry (page touched again, plane gone) is skipped
when popped, so every operation is O(log n) amortised.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Slot = tuple[int, int]  # (host row, half)


@dataclass
class PlaneStats:
    """Counters for the pool's start-up and periodic log lines and for benchmarks."""

    demotions: list[int] = field(default_factory=lambda: [0, 0])  # per stream
    moves: int = 0
    admitted_planes: int = 0
    refused_planes: int = 0  # a page admitted below its top because nothing colder could give room
    dropped_pages: int = 0


class PlaneTable:
    """Refinement planes of an elastic pool: placement in host rows, recency, demotion order."""

    def __init__(
        self,
        streams: Sequence[int],
        halves: int,
        take_row: Callable[[], int | None],
        release_row: Callable[[int], None],
        move_plane: Callable[[Slot, Slot], None],
        demotion_order: Sequence[int] | None = None,
    ):
        if halves < 1:
            raise ValueError("a host row must hold at least one plane")
        self.streams = tuple(streams)  # the elastic streams (indices into the page layout's streams)
        # which stream of a page gives up its plane first: values before keys by default
        order = tuple(demotion_order) if demotion_order is not None else tuple(sorted(self.streams, reverse=True))
        if sorted(order) != sorted(self.streams):
            raise ValueError(f"demotion order {order} must name the elastic streams {self.streams}")
        self._rank = {s: i for i, s in enumerate(order)}
        # a page's held streams after gaining / losing one, for every subset of the streams (a handful): the census
        # changes by table lookups, not by scanning the page's slots
        subsets = [tuple(s for i, s in enumerate(self.streams) if m >> i & 1) for m in range(1 << len(self.streams))]
        self._plus = {(h, s): tuple(x for x in self.streams if x in h or x == s) for h in subsets for s in self.streams}
        self._minus = {(h, s): tuple(x for x in h if x != s) for h in subsets for s in self.streams}
        self.halves = halves
        self._take_row, self._release_row, self._move = take_row, release_row, move_plane
        self.stats = PlaneStats()
        self.clear()

    def clear(self) -> None:
        """Forget everything (the pool's rows were all freed by SGLang's clear)."""
        self.version = getattr(self, "version", 0) + 1  # changes whenever any page's plane slot does
        self._slot: dict[tuple[int, int], Slot] = {}  # (page, stream) -> slot; only _set/_unset write it
        self._held: dict[int, tuple[int, ...]] = {}  # page -> the streams it holds planes of (pages with >= 1)
        self.census: Counter[tuple[int, ...]] = Counter()  # streams held -> pages (kept as planes come and go)
        self._owner: dict[Slot, tuple[int, int]] = {}
        self._free_halves: dict[int, list[int]] = {}  # host row -> its free halves (rows with >= 1 plane)
        self._partial: set[int] = set()  # host rows with a free half
        self._touch: dict[int, int] = {}
        self._heap: list[tuple[int, int, int, int]] = []  # (touch, stream rank, page, stream)
        self._clock = itertools.count(1)

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def host_rows(self) -> int:
        return len(self._free_halves)

    @property
    def planes(self) -> int:
        return len(self._slot)

    def slot_of(self, page: int, stream: int) -> Slot | None:
        return self._slot.get((page, stream))

    def slots_of(self, pages: Sequence[int], stream: int) -> list[Slot | None]:
        """slot_of for every page of a batch (one list comprehension: the pool calls this per backup and load)."""
        get = self._slot.get
        return [get((p, stream)) for p in pages]

    def pages_with_planes(self) -> set[int]:
        return set(self._held)

    def streams_of(self, page: int) -> tuple[int, ...]:
        """The streams whose plane `page` holds now."""
        return self._held.get(page, ())

    def _set(self, owner: tuple[int, int], slot: Slot) -> None:
        """Give `owner` (page, stream), which holds no plane, the plane at `slot`."""
        old = self._held.get(owner[0], ())
        self._slot[owner] = slot
        self.version += 1
        self._recount(owner[0], old, self._plus[(old, owner[1])])

    def _unset(self, owner: tuple[int, int]) -> Slot | None:
        slot = self._slot.pop(owner, None)
        if slot is not None:
            self.version += 1
            old = self._held[owner[0]]
            self._recount(owner[0], old, self._minus[(old, owner[1])])
        return slot

    def _recount(self, page: int, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        census = self.census
        if old:
            n = census[old] - 1
            if n:
                census[old] = n
            else:
                del census[old]
        if new:
            self._held[page] = new
            census[new] += 1
        else:
            del self._held[page]

    def is_host_row(self, row: int) -> bool:
        return row in self._free_halves

    # ---- recency ---------------------------------------------------------------------------------

    def next_touch(self) -> int:
        return next(self._clock)

    def touch(self, pages: Iterable[int]) -> None:
        for p in pages:
            t = next(self._clock)
            self._touch[p] = t
            for s in self.streams:
                if (p, s) in self._slot:
                    heapq.heappush(self._heap, (t, self._rank[s], p, s))
        self._maybe_rebuild_heap()

    def _maybe_rebuild_heap(self) -> None:
        if len(self._heap) > 4 * len(self._slot) + 1024:  # stale entries dominate: rebuild
            self._heap = [(self._touch[p], self._rank[s], p, s) for (p, s) in self._slot]
            heapq.heapify(self._heap)

    def _pop_coldest(self, colder_than: int | None = None) -> tuple[int, int] | None:
        """Remove and return the coldest live (page, stream) whose touch is < colder_than (any if None)."""
        while self._heap:
            t, _, p, s = self._heap[0]
            if (p, s) not in self._slot or self._touch.get(p) != t:
                heapq.heappop(self._heap)  # stale
                continue
            if colder_than is not None and t >= colder_than:
                return None
            heapq.heappop(self._heap)
            return p, s
        return None

    # ---- placement -------------------------------------------------------------------------------

    def _free_slot(self, slot: Slot) -> None:
        row, half = slot
        del self._owner[slot]
        free = self._free_halves[row]
        free.append(half)
        if len(free) == self.halves:  # empty: back to SGLang's allocator at once
            del self._free_halves[row]
            self._partial.discard(row)
            self._release_row(row)
        else:
            self._partial.add(row)

    def _use_slot(self, slot: Slot, owner: tuple[int, int]) -> None:
        row, half = slot
        free = self._free_halves[row]
        free.remove(half)
        if not free:
            self._partial.discard(row)
        self._owner[slot] = owner
        self._set(owner, slot)

    def _demote(self, page: int, stream: int) -> Slot:
        """Take `page`'s plane of `stream` away; returns the slot it held (still marked used)."""
        slot = self._unset((page, stream))
        assert slot is not None
        self.stats.demotions[stream] += 1
        return slot

    def _claim(self, touch: int, owner: tuple[int, int]) -> bool:
        """Give `owner` a plane slot: a free half of a used row, else a fresh row, else the slot of the coldest
        plane touched before `touch` (a demotion: the slot passes straight to `owner`). False: no room."""
        if self._partial:
            row = next(iter(self._partial))
            self._use_slot((row, self._free_halves[row][-1]), owner)
            return True
        row = self._take_row()
        if row is not None:
            self._free_halves[row] = list(range(self.halves))
            self._partial.add(row)
            self._use_slot((row, self.halves - 1), owner)
            return True
        victim = self._pop_coldest(colder_than=touch)
        if victim is None:
            return False
        slot = self._demote(*victim)
        self._owner[slot] = owner
        self._set(owner, slot)
        return True

    def admit(self, pages: Sequence[int], streams: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """New pages (one backup batch, all equally hot): give each a plane per stream where room can be
        made, never by demoting a page of the same batch. Returns per page the streams that hold a plane
        (the caller encodes exactly those)."""
        want = sorted(self.streams if streams is None else streams, key=lambda s: -self._rank[s])  # keys first
        t = next(self._clock)
        for p in pages:
            self._touch[p] = t
            for s in want:
                assert (p, s) not in self._slot, f"page {p} already holds a stream-{s} plane"
                if not self._claim(t, (p, s)):
                    self.stats.refused_planes += 1
                    continue
                heapq.heappush(self._heap, (t, self._rank[s], p, s))
                self.stats.admitted_planes += 1
        return [self.streams_of(p) for p in pages]

    def drop(self, pages: Iterable[int]) -> None:
        """Pages freed by SGLang: their planes go (not demotions) and their recency is forgotten."""
        for p in pages:
            for s in self.streams:
                slot = self._unset((p, s))
                if slot is not None:
                    self._free_slot(slot)
            if self._touch.pop(p, None) is not None:
                self.stats.dropped_pages += 1

    def demote_coldest(self) -> tuple[int, int] | None:
        """Demote the coldest plane of any page; returns (page, stream) or None when no plane is left."""
        victim = self._pop_coldest()
        if victim is None:
            return None
        self._free_slot(self._demote(*victim))
        return victim

    def reclaim(self, rows: int) -> int:
        """Give up to `rows` whole rows back to SGLang's allocator; returns how many were given back."""
        released = 0
        while released < rows:
            if len(self._partial) >= 2:
                released += self._compact_one()
                continue
            before = self.host_rows
            if self.demote_coldest() is None:
                break
            released += before - self.host_rows
        return released

    def _compact_one(self) -> int:
        """Empty the half-used host row with the fewest planes into the others; 1 if a row was freed."""
        src = min(self._partial, key=lambda r: self.halves - len(self._free_halves[r]))
        moved_out = [(h, self._owner[(src, h)]) for h in range(self.halves) if (src, h) in self._owner]
        for half, owner in moved_out:
            dst_row = next((r for r in self._partial if r != src), None)
            if dst_row is None:
                return 0
            dst = (dst_row, self._free_halves[dst_row][-1])
            self._move((src, half), dst)
            self.stats.moves += 1
            self._unset(owner)
            self._owner.pop((src, half))
            self._free_halves[src].append(half)
            self._use_slot(dst, owner)
        if len(self._free_halves.get(src, ())) == self.halves:
            del self._free_halves[src]
            self._partial.discard(src)
            self._release_row(src)
            return 1
        return 0


__all__ = ["PlaneStats", "PlaneTable", "Slot"]
