"""Growth without stalls (issue 16): tables that grow in row spaces and
indexes that resize a step at a time give the same results and digests as
an engine sized up front.

Under `tiny_growth` (tests/support/growth.py) every table starts with one
row, moves into a row space after a few, outgrows that space's reservation
(and moves again), and every index resize moves a row or two per reserve,
so lookups run across two tables most of the time. `Twin` feeds each call to
such an engine and to one sized up front and requires identical results;
hypothesis draws the sequences.

Run: .venv/bin/python -m pytest tests/core/test_growth.py
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine._kernel import LayoutError, Ledger, populate_stats, tune_growth

import test_differential_membership as membership
from support import differential_pair
from support.growth import STEPS_MAX, Twin, World, row_space, tiny_growth


# ---------------------------------------------------------------------------
# The kernel's pieces
# ---------------------------------------------------------------------------

def test_an_index_resize_moves_a_step_per_reserve_and_finds_every_row_meanwhile():
    with tiny_growth(move_rows_min=4, move_per_row=1):
        ledger = Ledger()
        ids = [(k * 2654435761) % 2**61 + 1 for k in range(1, 400)]
        resizing_seen = 0
        for n, key in enumerate(ids):
            ledger.append("users", key)
            resizing_seen = max(resizing_seen, ledger.users_ix.resizing)
            # every id added so far is found, in whichever table it is
            assert all(ledger.find("users", k) == i for i, k in enumerate(ids[:n + 1]))
            assert ledger.find("users", key + 1) == -1
            assert ledger.users_ix.count == n + 1
        assert resizing_seen > 4, "no resize ran across several reserves"
        ledger.dump()                   # a dump settles the index: one table
        assert ledger.users_ix.resizing == 0
        assert all(ledger.find("users", k) == i for i, k in enumerate(ids))


def test_step_resizes_moves_a_bounded_step_of_every_resize_under_way():
    """What an idle writer calls: each call moves at most its entries per
    index, lookups find every id in between, and 0 once none is under way."""
    with tiny_growth(move_rows_min=1, move_per_row=1):
        ledger = Ledger()
        for key in range(1, 800):           # the resize from 1,024 to 4,096 buckets at 717
            ledger.append("users", key * 3)
        left = ledger.users_ix.resizing
        assert left > 10, "no resize left under way"
        with pytest.raises(ValueError):
            ledger.step_resizes(0)
        steps = 0
        while ledger.users_ix.resizing and steps < 200:
            moved = ledger.step_resizes(5)
            assert moved == min(5, left) and ledger.users_ix.resizing == left - moved
            left -= moved
            steps += 1
            assert ledger.find("users", 3 * 350) == 349 and ledger.find("users", 4) == -1
        assert ledger.users_ix.resizing == 0 and ledger.step_resizes(5) == 0
        assert all(ledger.find("users", k * 3) == k - 1 for k in range(1, 800))


def grow_until_resize(ledger: Ledger, keys) -> tuple[int, int]:
    """Users appended from `keys` until the index starts a resize: (its
    rows then, the buckets of the table before it)."""
    capacity = ledger.users_ix.capacity
    for key in keys:                                # bounded by keys
        ledger.append("users", key)
        if ledger.users_ix.capacity != capacity:
            return ledger.users_ix.count, capacity
    raise AssertionError("no resize")


def grown_ledger() -> Ledger:
    """A ledger whose users index has resized with rows in it, and is done."""
    ledger = Ledger()
    grow_until_resize(ledger, range(1, 100))
    while ledger.users_ix.resizing:                 # bounded: it moves 1,024 a step
        ledger.step_resizes(1024)
    return ledger


def test_a_grown_index_resizes_at_grow_pct_once_its_next_table_is_in():
    """Past grow_pct a grown index resizes only once the populate thread has
    faulted in the table it moves into, and waits for it up to the load
    limit (70 %): a resize into pages not yet in stalls the writer."""
    keys = iter(range(1_000, 10**7, 3))
    settings = {"move_rows_min": 1, "move_per_row": 16, "grow_pct": 50, "prepare_pct": 35}
    with tiny_growth(**settings, populate_mode=0):  # nothing faults a prepared table in
        ledger = grown_ledger()
        rows, capacity = grow_until_resize(ledger, keys)
        assert not ledger.users_ix.next_table_ready
        assert capacity * 70 < rows * 100 <= capacity * 70 + 100
    with tiny_growth(**settings, populate_mode=2):  # the populate thread does
        ledger = grown_ledger()
        capacity = ledger.users_ix.capacity
        while ledger.users_ix.count * 100 <= capacity * 40:   # prepared at 35 %
            ledger.append("users", next(keys))
        deadline = time.monotonic() + 10
        while not ledger.users_ix.next_table_ready:     # the thread faults it in
            assert time.monotonic() < deadline, "the populate thread never did"
            time.sleep(0.01)
        rows, capacity = grow_until_resize(ledger, keys)
        assert capacity * 50 < rows * 100 <= capacity * 50 + 100


def test_a_table_in_a_row_space_grows_in_place():
    with tiny_growth(space_bytes_max=1 << 30):
        ledger = Ledger()
        first = ledger.append("users", 1)
        ledger.topup(first, 5)
        for key in range(2, 2000):
            ledger.append("users", key)
        before = ledger.users                   # a view of the rows so far
        address = before.ctypes.data
        for key in range(2000, 20_000):
            ledger.append("users", key)
        ledger.topup(first, 7)
        assert ledger.users.ctypes.data == address, "the rows moved"
        assert len(ledger.users) > len(before)
        # the old view is the same memory: it sees the later write
        assert int(before["balance"][first]) == int(ledger.users["balance"][first]) == 12


def test_a_table_outgrowing_its_reservation_moves_once_and_keeps_its_rows():
    with tiny_growth(space_bytes_max=64 << 10):
        ledger = Ledger()
        for key in range(1, 5000):              # 200 kB of rows: past 64 kB
            ledger.append("users", key)
        ledger.topup(ledger.find("users", 4321), 9)
        assert int(ledger.users["balance"][ledger.find("users", 4321)]) == 9
        assert [ledger.find("users", k) for k in (1, 2500, 4999)] == [0, 2499, 4998]


def test_the_populate_thread_faults_in_pages_ahead_of_the_rows_reserved():
    with tiny_growth(space_bytes_max=1 << 30):
        ledger = Ledger()
        for key in range(1, 5000):
            ledger.append("users", key)
        before = populate_stats()["thread_bytes"]
        ledger.reserve("users", 4096)           # and the thread 8 x 4,096 rows beyond
        space = row_space(ledger.users)
        ahead = (ledger.n_users + 9 * 4096) * ledger.users.itemsize
        deadline = time.monotonic() + 30
        while space.populated < ahead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert space.populated >= ahead and space.committed >= ahead
        assert populate_stats()["thread_bytes"] > before
        assert len(ledger.users) == ledger.n_users + 4096     # the capacity shown: the reserve
        assert ledger.find("users", 4999) == 4998


def test_a_large_populate_job_does_not_hold_up_a_small_one():
    """The thread takes its jobs in turns, a chunk each: the next rows'
    pages of a table growing batch by batch are not held up behind a jump of
    another table (a capacity hint, an index table prepared for a resize),
    or the writer catches up with them and faults them in itself."""
    with tiny_growth(space_bytes_max=1 << 30):
        large, small = Ledger(), Ledger()
        for ledger in (large, small):
            for key in range(1, 5000):
                ledger.append("users", key)
        large.reserve("users", 2_000_000)       # 80 MB of pages: 20 chunks for the thread
        small.reserve("users", 4096)            # then 9 x 4,096 rows' pages
        large_space, small_space = row_space(large.users), row_space(small.users)
        small_end = (small.n_users + 9 * 4096) * small.users.itemsize
        large_end = len(large.users) * large.users.itemsize
        deadline = time.monotonic() + 30
        while small_space.populated < small_end and time.monotonic() < deadline:
            time.sleep(0.001)
        large_populated = large_space.populated
        assert small_space.populated >= small_end
        assert large_populated < large_end, "the small job waited for the large one"


def test_releasing_the_free_pages_keeps_the_used_rows():
    """What the audit child does after the fork (engine/server/audit_fork.py):
    the pages past the used rows go, the rows stay, and the free rows read
    as zero, as a later append expects."""
    with tiny_growth(space_bytes_max=1 << 30):
        ledger = Ledger()
        for key in range(1, 30_000):
            ledger.append("users", key)
        ledger.topup(ledger.find("users", 777), 5)
        before = ledger.users[:ledger.n_users].copy()
        ledger.release_free_pages()
        assert ledger.users[:ledger.n_users].tobytes() == before.tobytes()
        assert not ledger.users[ledger.n_users:].view(np.uint8).any()
        slot = ledger.append("users", 10**9)
        assert ledger.find("users", 10**9) == slot == 29_999


def test_a_snapshot_index_of_the_old_encoding_loads():
    """Snapshots written before issue 16 store an empty entry as -1 and the
    slot as is; the present encoding stores slot + 1 and 0 for empty."""
    ledger = Ledger()
    for key in range(1, 300):
        ledger.append("users", key * 7)
    arrays, scalars = ledger.dump()
    new = arrays["users_ix"]
    old = np.where(new == 0, -1, new - (1 << 32))
    assert (old < 0).any() and not (new < 0).any()
    loaded = Ledger.load({**arrays, "users_ix": old}, scalars)
    assert [loaded.find("users", k * 7) for k in (1, 150, 299)] == [0, 149, 298]
    assert loaded.find("users", 8) == -1 and loaded.users_ix.count == 299


def mix64(ids: np.ndarray) -> np.ndarray:
    """The kernel's id hash (ext/index.pxd), over uint64 ids."""
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x


def homes(hashes: np.ndarray, capacity: int, layout: int) -> np.ndarray:
    """Home buckets of `hashes` in a table of `capacity` buckets: index
    layout 1, the hash's low bits; 2 (the present one), its top bits."""
    bits = capacity.bit_length() - 1
    if layout == 1:
        return (hashes & np.uint64(capacity - 1)).astype(np.int64)
    return (hashes >> np.uint64(64 - bits)).astype(np.int64)


def placed(ids: np.ndarray, capacity: int, layout: int) -> np.ndarray:
    """An index table of `layout` over rows whose ids are `ids`, as the
    kernel's linear probing places them (slot + 1 high, fingerprint low)."""
    hashes = mix64(ids)
    table = np.zeros(capacity, np.int64)
    for slot, (h, b) in enumerate(zip(hashes.tolist(), homes(hashes, capacity, layout).tolist())):
        while table[b]:
            b = (b + 1) % capacity
        table[b] = (slot + 1) << 32 | h >> 32
    return table


def assert_in_runs_from_top_bit_homes(table: np.ndarray, ids_by_slot: np.ndarray) -> None:
    """Every entry of index `table` holds its id's fingerprint (the hash's
    top 32 bits) and sits in the run of full buckets from its home bucket,
    the hash's top bits (layout 2)."""
    capacity = len(table)
    at = np.nonzero(table)[0]
    hashes = mix64(ids_by_slot[(table[at] >> 32) - 1])
    assert ((table[at] & 0xFFFFFFFF) == (hashes >> np.uint64(32)).astype(np.int64)).all()
    for b, h in zip(at.tolist(), homes(hashes, capacity, 2).tolist()):
        run = [(h + d) % capacity for d in range((b - h) % capacity + 1)]
        assert table[run].all(), f"bucket {b}: not in the run from its home {h}"


def test_an_id_sits_in_the_run_from_its_home_bucket_named_by_the_hash_top_bits():
    """Layout 2: an entry's home bucket follows from its fingerprint, so a
    resize moves entries without reading their rows, in bucket order."""
    with tiny_growth(move_rows_min=4, move_per_row=1):
        ledger = Ledger()
        for key in range(1, 3000):
            ledger.append("users", key * 7919)
        arrays, scalars = ledger.dump()
    table = np.asarray(arrays["users_ix"])
    assert np.count_nonzero(table) == 2999 and scalars["index_layout"] == 2
    assert_in_runs_from_top_bit_homes(table, np.asarray(arrays["users"]["id"]))


def test_a_snapshot_index_of_the_low_bits_layout_loads():
    """Snapshots written before index layout 2 (no "index_layout" in their
    scalars) place an id by its hash's low bits: loaded, every id is found."""
    ledger = Ledger()
    for key in range(1, 1200):
        ledger.append("users", key * 13)
    arrays, scalars = ledger.dump()
    ids = np.asarray(arrays["users"]["id"])
    old = placed(ids, len(arrays["users_ix"]), 1)
    legacy = {k: v for k, v in scalars.items() if k != "index_layout"}
    loaded = Ledger.load({**arrays, "users_ix": old}, legacy)
    assert [loaded.find("users", k * 13) for k in range(1, 1200)] == list(range(1199))
    assert loaded.find("users", 14) == -1 and loaded.users_ix.count == 1199
    table = np.asarray(loaded.dump()[0]["users_ix"])
    assert len(table) == len(old) and np.count_nonzero(table) == 1199
    assert_in_runs_from_top_bit_homes(table, ids)
    with pytest.raises(LayoutError):
        Ledger.load({**arrays}, {**scalars, "index_layout": 3})


def test_growth_settings_are_checked():
    with pytest.raises(ValueError):
        tune_growth(move_per_row=0)
    with pytest.raises(ValueError):
        tune_growth(rows_max=1)
    assert tune_growth() == tune_growth()


# ---------------------------------------------------------------------------
# Random sequences against a sized engine
# ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_an_engine_growing_at_every_step_matches_one_sized_up_front(data):
    with tiny_growth():
        world = World(data)
        for _ in range(data.draw(st.integers(3, STEPS_MAX))):
            world.step(data)
        world.eng.canonical()                   # compared table by table (Twin)
        world.eng.digest()
        assert world.eng.call("AUDIT", {})["ok"]


class GrowingPair(membership.Pair):
    """The membership differential scenario (engine against the reference)
    with a Twin as the engine: it also matches a sized engine call by call."""

    def __init__(self):
        super().__init__()
        self.eng = Twin(clock=self.clock, code_source=differential_pair.Codes(),
                        hold_ms=differential_pair.HOLD_MS)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_the_membership_scenario_growing_at_every_step(data):
    with tiny_growth():
        membership.run_scenario(GrowingPair(), data)
