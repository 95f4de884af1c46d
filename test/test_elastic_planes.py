"""PlaneTable (elastic pool bookkeeping): placement, recency, demotion order, reclaim, data integrity.

A fake row allocator stands for the pool's base allocator and a dict for host memory: every plane
move copies the dict entry, so a plane that ends up under the wrong owner fails `_check`.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtuner_hicache.elastic_planes import PlaneTable

K, V = 0, 1


class Rows:
    """SGLang's allocator in miniature: `n` rows; SGLang's pages and plane rows both come from here."""

    def __init__(self, n: int):
        self.free = set(range(n))
        self.mem: dict[tuple[int, int], tuple[int, int]] = {}  # (row, half) -> what was written there
        self.table: PlaneTable | None = None

    def take_row(self) -> int | None:
        if not self.free:
            return None
        r = min(self.free)
        self.free.remove(r)
        return r

    def release(self, r: int) -> None:
        assert r not in self.free
        self.free.add(r)
        for h in range(4):
            self.mem.pop((r, h), None)

    def move(self, src, dst) -> None:
        self.mem[dst] = self.mem.pop(src)

    def sglang_alloc(self, n: int) -> list[int] | None:
        """What the pool's alloc does: reclaim rows from planes first, then take from the free set."""
        short = n - len(self.free)
        if short > 0:
            self.table.reclaim(short)
        if len(self.free) < n:
            return None
        got = sorted(self.free)[:n]
        self.free -= set(got)
        return got

    def backup(self, pages: list[int]) -> list[tuple[int, ...]]:
        granted = self.table.admit(pages)
        for p, streams in zip(pages, granted, strict=True):
            for s in streams:
                slot = self.table.slot_of(p, s)
                assert slot is not None, f"page {p} was granted a stream-{s} plane it no longer holds"
                self.mem[slot] = (p, s)
        return granted


def make(n_rows: int, halves: int = 2) -> tuple[Rows, PlaneTable]:
    rows = Rows(n_rows)
    rows.table = PlaneTable((K, V), halves, rows.take_row, rows.release, rows.move)
    return rows, rows.table


def _check(rows: Rows, table: PlaneTable, sglang_pages: set[int]) -> None:
    slots = {}
    for p in sglang_pages:
        for s in table.streams_of(p):
            slot = table.slot_of(p, s)
            assert slot not in slots, f"slot {slot} owned twice"
            slots[slot] = (p, s)
            assert rows.mem.get(slot) == (p, s), f"plane ({p}, {s}) lost its bytes"
            assert slot[0] not in sglang_pages and slot[0] not in rows.free, "plane in a row SGLang can see"
    assert table.planes == len(slots)
    held = Counter(table.streams_of(p) for p in sglang_pages if table.streams_of(p))
    assert table.census == held, "the incremental census drifted"
    host_rows = {sl[0] for sl in slots}
    assert table.host_rows == len(host_rows), "a row without planes was kept from SGLang"
    assert len(rows.free) + len(sglang_pages) + table.host_rows == len(rows.free | sglang_pages | host_rows)


def test_new_pages_get_both_planes_two_to_a_row_while_rows_are_free():
    rows, t = make(10)
    pages = rows.sglang_alloc(3)
    assert rows.backup(pages) == [(K, V)] * 3
    assert t.host_rows == 3 and len(rows.free) == 4  # 3 pages + 3 plane rows of 10
    _check(rows, t, set(pages))


def test_a_new_page_takes_the_coldest_pages_plane_values_first():
    rows, t = make(6)
    a = rows.sglang_alloc(3)
    for p in a:  # one backup each: three recencies
        rows.backup([p])  # 3 pages + 3 plane rows: pool full
    assert not rows.free
    t.touch([a[0]])  # a[1] is now the coldest, then a[2]
    # SGLang frees nothing; a fourth page cannot be allocated without demotions
    b = rows.sglang_alloc(1)
    assert b is not None
    # a[1] (coldest) lost V, then K; that freed a row (after a move) for b
    assert t.streams_of(a[1]) == ()
    assert t.streams_of(a[0]) == (K, V) and t.streams_of(a[2]) == (K, V)
    assert t.stats.demotions == [1, 1]
    rows.backup(b)  # the newest page takes planes from a[2], now the coldest holder, values first
    assert t.streams_of(b[0]) == (K, V)
    assert t.streams_of(a[2]) == ()
    _check(rows, t, set(a + b))


def test_values_go_before_keys_of_the_same_page():
    rows, t = make(8)
    pages = rows.sglang_alloc(2)
    for p in pages:
        rows.backup([p])
    assert t.demote_coldest() == (pages[0], V)
    assert t.demote_coldest() == (pages[0], K)
    assert t.demote_coldest() == (pages[1], V)


def test_one_batch_gives_up_all_its_values_before_any_key():
    rows, t = make(8)
    pages = rows.sglang_alloc(2)
    rows.backup(pages)  # one batch: equally recent
    assert [t.demote_coldest() for _ in range(3)] == [(pages[0], V), (pages[1], V), (pages[0], K)]


def test_reclaim_frees_rows_only_when_every_page_is_at_the_floor_as_last_resort():
    rows, t = make(12)
    pages = rows.sglang_alloc(4)
    rows.backup(pages)  # 4 + 4 rows used
    assert len(rows.free) == 4
    got = rows.sglang_alloc(8)  # needs every row: all planes go
    assert got is not None and t.planes == 0 and t.host_rows == 0
    assert rows.sglang_alloc(1) is None  # now SGLang must evict
    _check(rows, t, set(pages + got))


def test_touch_reorders_demotion_and_drop_returns_rows():
    rows, t = make(8)
    pages = rows.sglang_alloc(3)
    rows.backup(pages)
    t.touch([pages[0]])
    assert t.demote_coldest()[0] == pages[1]
    t.drop([pages[2]])  # SGLang evicted it: its planes go without a demotion
    assert t.stats.demotions == [0, 1] and t.streams_of(pages[2]) == ()
    _check(rows, t, {pages[0], pages[1]})


def test_half_used_rows_are_paired_before_anything_hot_is_demoted():
    rows, t = make(9)
    pages = rows.sglang_alloc(3)
    rows.backup(pages)  # 3 pages, 3 plane rows (a page's K and V share a row), 3 rows free
    assert t.demote_coldest() == (pages[0], V)
    t.touch([pages[0]])
    assert t.demote_coldest() == (pages[1], V)  # two half-used rows now
    free_before, demotions = len(rows.free), list(t.stats.demotions)
    got = rows.sglang_alloc(free_before + 1)  # one row more than is free: pairing gives it
    assert got is not None
    assert t.stats.moves == 1 and t.stats.demotions == demotions
    assert [t.streams_of(p) for p in pages] == [(K,), (K,), (K, V)]
    _check(rows, t, set(pages) | set(got))


@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "demote"]), st.integers(0, 7)),
                max_size=60), st.sampled_from([1, 2, 3]))
@settings(max_examples=150, deadline=None)
def test_random_operations_keep_every_invariant(ops, halves):
    rows, t = make(16, halves)
    live: list[int] = []
    for op, arg in ops:
        if op == "alloc":
            got = rows.sglang_alloc(1 + arg % 3)
            if got is None:
                # SGLang's allocator only says no once no plane is left to give up
                assert t.planes == 0
                continue
            rows.backup(got)
            live += got
        elif op == "free" and live:
            p = live.pop(arg % len(live))
            t.drop([p])
            rows.free.add(p)
        elif op == "touch" and live:
            t.touch([live[arg % len(live)]])
        elif op == "demote":
            coldest = min((t._touch[p] for p in t.pages_with_planes()), default=None)
            victim = t.demote_coldest()
            if victim is not None:
                assert t._touch[victim[0]] == coldest  # always the coldest page holding a plane
        _check(rows, t, set(live))


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="at least one plane"):
        PlaneTable((K, V), 0, lambda: None, lambda r: None, lambda a, b: None)
    with pytest.raises(ValueError, match="demotion order"):
        PlaneTable((K, V), 2, lambda: None, lambda r: None, lambda a, b: None, demotion_order=(K,))


def test_a_batch_never_takes_planes_from_its_own_pages():
    """Found by the CPU server test: a backup batch larger than the room left used to demote its own
    earlier pages (equally hot) and hand the pool a stale grant."""
    rows, t = make(7)
    old = rows.sglang_alloc(1)
    rows.backup(old)  # 1 page + 1 plane row; 5 rows free
    batch = rows.sglang_alloc(5)  # exactly the free rows: nothing to reclaim
    granted = rows.backup(batch)
    # the first page takes the old page's planes (colder); the others cannot take any from their batch
    assert granted == [(K, V)] + [()] * 4 and t.streams_of(old[0]) == ()
    assert t.stats.refused_planes == 8
    _check(rows, t, set(old + batch))
    rows2, t2 = make(10)
    a = rows2.sglang_alloc(2)
    rows2.backup(a)  # 2 pages + 2 plane rows; 6 free
    b = rows2.sglang_alloc(5)  # 1 row left free
    granted = rows2.backup(b)
    # one free row for the first page of b, then a's planes (colder) for the next two; no page of b gives
    assert granted[:3] == [(K, V)] * 3 and all(g == () for g in granted[3:])
    assert all(t2.streams_of(p) == () for p in a)
    _check(rows2, t2, set(a + b))
