"""What durability costs: Engine(path) against the in-memory Engine on the
same batches, replay rate, restart time with a snapshot, snapshot pause.

    .venv/bin/python -m pytest bench/ -k bench_durable --benchmark-only -p no:cacheprovider

(bench/conftest.py collects bench_*.py files from the directory; naming the
file itself on the command line would collect it twice.)

The world is engine/demo/world.py's standard world scaled to DURABLE_USERS users
(SCANPAY_DURABLE_USERS to change it), built twice with `build`: once in an
in-memory engine, once in a durable one (every build call journaled). Then
every PAY round applies one fresh batch of 8190 payments (automatic coupon
selection) to both, in-memory first, and times each: the ratio is the cost of
journaling the 655 KB entry and waiting for its fdatasync (which overlaps the
kernel's apply: engine/core/engine.py `_write`).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from engine import Engine
from engine.protocol.records import PAY_RESULT
from engine.protocol.status import Status
from engine.storage.snapshot import list_snapshots
from engine.demo.world import BATCH_RECORDS_MAX, World, build, capacity_for, pay_batches

from _common import SUMMARY, load, machine

DURABLE_USERS = int(os.environ.get("SCANPAY_DURABLE_USERS", "300000"))
PAY_ROUNDS = 120                     # 120 x 8190 ~ 1M payments through each engine
TARGET_DURABLE_PAYMENTS_PER_SECOND = 1_000_000
TARGET_DURABILITY_COST = 0.30        # durable at most 30 % slower than in-memory
SNAPSHOT_REPEATS = 3


class Pair:
    def __init__(self, tmp):
        self.spec = World.standard().replace(users=DURABLE_USERS,
                                             merchants=max(100, DURABLE_USERS // 100))
        capacity = capacity_for(self.spec, 2_000_000)
        clock = lambda: self.spec.now_ms  # noqa: E731
        self.dir = str(tmp / "data")
        self.memory = Engine(clock=clock, capacity=capacity)
        t0 = time.perf_counter()
        self.info = build(self.memory, self.spec)
        self.memory_build_s = time.perf_counter() - t0
        self.durable = Engine(self.dir, clock=clock, capacity=capacity)
        t0 = time.perf_counter()
        build(self.durable, self.spec)
        self.durable_build_s = time.perf_counter() - t0
        assert self.memory.digest() == self.durable.digest()
        # The snapshot the replay benchmark starts from: the built world.
        self.world_snapshot = self.durable.snapshot()
        self.batches = pay_batches(self.info, 10**6, seed=71, no_coupon_share=0.0)
        self.paid_batches = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("durable"))
    SUMMARY["durable world"] = (
        f"{p.spec.users:,} users, {len(p.info.coupon_ids):,} coupons: built in "
        f"{p.memory_build_s:.1f} s in memory, {p.durable_build_s:.1f} s durable")
    yield p
    p.durable.close()


def test_durable_pay_vs_in_memory(benchmark, pair):
    """PAY of 8190 payments: durable Engine.pay (journal + fdatasync) timed by
    pytest-benchmark; the in-memory Engine.pay of the same batch timed just
    before it, for the ratio."""
    memory_s: list[float] = []
    outs: list[np.ndarray] = []

    def setup():
        batch = next(pair.batches)
        t0 = time.perf_counter()
        expected = pair.memory.pay(batch)
        memory_s.append(time.perf_counter() - t0)
        outs.append(expected)
        return (batch,), {}

    def durable_pay(batch):
        result = pair.durable.pay(batch)
        pair.paid_batches += 1
        assert result.tobytes() == outs[-1].tobytes()

    fsyncs = pair.durable.storage.journal.fsync_count
    benchmark.pedantic(durable_pay, setup=setup, rounds=PAY_ROUNDS, iterations=1,
                       warmup_rounds=2)
    fsyncs = pair.durable.storage.journal.fsync_count - fsyncs
    stats = benchmark.stats.stats
    durable_rate = BATCH_RECORDS_MAX / stats.median
    memory_rate = BATCH_RECORDS_MAX / statistics.median(memory_s)
    cost = 1 - durable_rate / memory_rate
    ok = float(np.mean(np.concatenate(outs)["status"] == Status.ok))
    benchmark.extra_info.update(
        durable_payments_per_second=durable_rate, memory_payments_per_second=memory_rate,
        durable_mean_payments_per_second=BATCH_RECORDS_MAX / stats.mean,
        memory_mean_payments_per_second=BATCH_RECORDS_MAX / statistics.mean(memory_s),
        durability_cost=cost, fsyncs=fsyncs, ok_share=ok, machine=machine(), load=load())
    SUMMARY["durable PAY"] = (
        f"{durable_rate:,.0f} payments/s median (mean {BATCH_RECORDS_MAX / stats.mean:,.0f}), "
        f"target {TARGET_DURABLE_PAYMENTS_PER_SECOND:,}; one fdatasync per batch ({fsyncs})")
    SUMMARY["in-memory PAY, same batches"] = (
        f"{memory_rate:,.0f} payments/s median (mean "
        f"{BATCH_RECORDS_MAX / statistics.mean(memory_s):,.0f}); ok {ok:.1%}")
    SUMMARY["durability cost"] = (
        f"{cost:.1%} of in-memory throughput (durable/in-memory = {1 - cost:.2f}; "
        f"target < {TARGET_DURABILITY_COST:.0%}); {load()}")
    assert pair.memory.digest() == pair.durable.digest()


def test_replay_rate(benchmark, pair):
    """Reopen: the world snapshot plus the journal of the PAY rounds (full
    batches) replayed through `_execute`, as Engine(path) does at start."""
    if pair.paid_batches == 0:
        pytest.skip("needs test_durable_pay_vs_in_memory first")
    digest = pair.durable.digest()
    pair.durable.close()
    replayed = {}
    original = Engine._replay

    def timed_replay(self):
        t0 = time.perf_counter()
        original(self)
        replayed["s"] = time.perf_counter() - t0

    opened = {}

    def reopen():
        t0 = time.perf_counter()
        pair.durable = Engine(pair.dir, clock=lambda: pair.spec.now_ms)
        opened["s"] = time.perf_counter() - t0

    Engine._replay = timed_replay
    try:
        benchmark.pedantic(reopen, rounds=1, iterations=1)
    finally:
        Engine._replay = original
    open_s = opened["s"]
    assert pair.durable.digest() == digest
    entries = pair.durable.storage.journal.last_seq - pair.durable.storage.snapshot_seq
    payments = pair.paid_batches * BATCH_RECORDS_MAX
    rate = payments / replayed["s"]
    benchmark.extra_info.update(replay_payments_per_second=rate, entries=entries,
                                replay_seconds=replayed["s"], reopen_seconds=open_s)
    SUMMARY["replay"] = (
        f"{rate:,.0f} payments/s: {entries} journal entries ({pair.paid_batches} batches of "
        f"{BATCH_RECORDS_MAX}) in {replayed['s']:.2f} s; whole reopen {open_s:.2f} s "
        f"(snapshot load + replay); {load()}")


def test_snapshot_pause_and_restart_time(benchmark, pair):
    """Snapshot of the whole state (fork: pause_ms; child writes), then a
    restart from it: open = snapshot load + (empty) tail replay."""
    pauses, writes = [], []
    for _ in range(SNAPSHOT_REPEATS):
        info = pair.durable.snapshot()
        assert info["ok"]
        pauses.append(info["pause_ms"])
        writes.append(info["write_ms"])
    size = list_snapshots(pair.dir)[-1].bytes
    counts = pair.durable.counts()
    digest = pair.durable.digest()
    pair.durable.close()
    opened = {}

    def restart():
        t0 = time.perf_counter()
        pair.durable = Engine(pair.dir, clock=lambda: pair.spec.now_ms)
        opened["s"] = time.perf_counter() - t0

    benchmark.pedantic(restart, rounds=1, iterations=1)
    restart_s = opened["s"]
    benchmark.extra_info.update(pause_ms=pauses, write_ms=writes, snapshot_bytes=size,
                                restart_seconds=restart_s, counts=counts)
    assert pair.durable.digest() == digest
    state = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
    SUMMARY["snapshot pause"] = (
        f"pause_ms {', '.join(f'{p:.1f}' for p in pauses)} (fork); written in "
        f"{', '.join(f'{w / 1000:.1f}' for w in writes)} s; {size / 1e6:,.0f} MB ({state})")
    SUMMARY["restart with a snapshot"] = (
        f"{restart_s:.2f} s for {size / 1e6:,.0f} MB of snapshot ({state}); {load()}")
