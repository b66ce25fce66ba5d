"""New nodes join by themselves (docs/replication.md, "Snapshots in the
store"): the leader publishes its snapshots to a JetStream object store and
trims the stream below the oldest one kept; a node with an empty data
directory starts from the newest snapshot there and the stream after it,
refusing a corrupt one loudly and taking an older one. A node whose state
is behind the trimmed point is refused at start when nothing covers the gap,
and stops loudly when it finds out while running."""
import os
import re
import signal
import time

import numpy as np
import pytest
from nats.js.api import ObjectMeta

from engine.replication.snapshot_store import SnapshotStore
from support.replicas import Node, stopped_loudly, wait_for_leader, wait_for_seq
from engine.protocol.records import PAY_RECORD
from support.failover import build_world

LEASE_MS = 4000
SNAPSHOT_EVERY = 5                  # commands between snapshots: several within the test
CHECKPOINT_EVERY = 7                # a digest the joined node checks live
KEEP = 2
SETTLE_TIMEOUT_S = 30.0
REFUSED_TIMEOUT_S = 60.0            # a refused start connects to NATS first
EXIT_REFUSED = 2                    # `scanpay serve`: a start refused in one line


def make_node(directory: str, logs, name: str) -> Node:
    return Node(directory, logs.cluster.servers, LEASE_MS, name,
                snapshot_every_entries=SNAPSHOT_EVERY, checkpoint_every_entries=CHECKPOINT_EVERY,
                store_snapshots=KEEP)


@pytest.fixture
def started(logs, tmp_path):
    made = []

    def start(name: str) -> Node:
        node = make_node(str(tmp_path), logs, name)
        made.append(node)
        return node.start()
    yield start
    for node in made:
        node.stop()


def write(leader: Node, first_id: int, count: int) -> None:
    """`count` one-payment PAY batches (users 1 to 3 at merchant 1)."""
    records = np.zeros(1, PAY_RECORD)
    records["merchant"], records["amount"] = 1, 100
    with leader.client() as c:
        for i in range(count):
            records["id"], records["payer"] = first_id + i, 1 + i % 3
            assert c.pay(records)["status"][0] == 0


def store_of(logs):
    loop, stream = logs.stream()
    store = SnapshotStore(stream, KEEP)
    loop.call(store.open(3, False), 20)
    return loop, stream, store


def settled_store(logs, leader: Node | None, past: int = 0) -> tuple:
    """Once the leader has published and trimmed (beyond stream message
    `past`): (entries, stream first seq). A finished snapshot is reaped, so
    published, at the next write: with a running `leader`, one payment per
    poll; without, until the store stays the same for a poll."""
    loop, stream, store = store_of(logs)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    seen, next_id = None, 10_000
    while True:
        entries = loop.call(store.entries(), 10)
        first = loop.call(stream.first_seq(), 10)
        now = ([e.name for e in entries], first)
        trimmed = len(entries) == KEEP and first == entries[0].stream_seq and first > past + 1
        if trimmed and (leader is not None or now == seen):
            return entries, first
        assert time.monotonic() < deadline, now
        seen = now
        if leader is not None:
            write(leader, next_id, 1)
            next_id += 1
        time.sleep(0.3)


def joins_and_agrees(leader: Node, fresh: Node, next_id: int) -> None:
    """`fresh` reaches the leader's stream seq, then checks a checkpoint
    digest live (a mismatch would stop it) and agrees with the leader."""
    wait_for_seq(fresh, leader.hello()["stream_seq"])
    # Paced: with a snapshot every 5 commands and 2 kept, a node that lags
    # by two snapshots finds its next messages trimmed and stops (rightly).
    for step in range(0, 2 * CHECKPOINT_EVERY, 2):
        write(leader, next_id + step, 2)
        at = leader.hello()["stream_seq"]
        wait_for_seq(fresh, at)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while fresh.hello()["checkpoint"] != leader.hello()["checkpoint"]:
        assert time.monotonic() < deadline, (fresh.hello(), leader.hello())
        time.sleep(0.1)
    assert fresh.running(), fresh.log_tail()
    query = {"users": [1, 2, 3], "merchants": [1]}
    with leader.client() as c, fresh.client() as f:
        expected = c.call("BALANCES", query)
        got = f.call("BALANCES", query)
        assert got.pop("stream_seq") >= expected.pop("stream_seq") - 1
        assert got == expected
        assert f.call("AUDIT", {})["ok"]


def test_a_fresh_node_joins_from_the_store_after_the_stream_was_trimmed(started, logs):
    leader = started("s0")
    assert wait_for_leader([leader]) is leader
    build_world(leader)
    write(leader, 1, 6 * SNAPSHOT_EVERY)
    entries, first = settled_store(logs, leader)
    assert first > 1, "the stream was not trimmed"
    fresh = started("s1")
    joined = re.findall(r"joined from snapshot (snapshot-\d+-\d+) ", open(fresh.log_path).read())
    # (the leader, idle meanwhile, may have published a newer one since)
    assert len(joined) == 1 and joined[0] >= entries[-1].name, fresh.log_tail()
    joins_and_agrees(leader, fresh, 1000)


def test_a_corrupt_newest_snapshot_is_refused_and_an_older_one_used(started, logs):
    leader = started("s0")
    assert wait_for_leader([leader]) is leader
    build_world(leader)
    write(leader, 1, 6 * SNAPSHOT_EVERY)
    settled_store(logs, leader)
    leader.stop()                       # nothing publishes while the test corrupts the store
    entries, _first = settled_store(logs, None)
    loop, _stream, store = store_of(logs)
    newest = entries[-1]
    got = loop.call(store.store.get(newest.name), 20)
    data = bytearray(got.data)
    data[len(data) // 2] ^= 0x01        # one bit; the description keeps the true SHA-256
    loop.call(store.store.put(newest.name, bytes(data), meta=ObjectMeta(
        name=newest.name, description=got.info.description)), 20)
    fresh = started("s1")
    lines = [line for line in open(fresh.log_path) if "snapshot store: refusing" in line]
    assert len(lines) == 1 and newest.name in lines[0] and "checksum mismatch" in lines[0], \
        fresh.log_tail()
    assert f"joined from snapshot {entries[-2].name}" in open(fresh.log_path).read()
    leader.start()
    now_leader = wait_for_leader([leader, fresh])
    other = fresh if now_leader is leader else leader
    joins_and_agrees(now_leader, other, 1000)


def log_since(node: Node, offset: int) -> list[str]:
    with open(node.log_path, errors="replace") as f:
        f.seek(offset)
        return f.read().splitlines()


def leader_and_follower_at_the_same_point(started) -> tuple[Node, Node, int]:
    """A leader and a follower that has applied the world and two
    payments: (leader, follower, the stream seq they are at)."""
    leader = started("s0")
    assert wait_for_leader([leader]) is leader
    follower = started("s1")
    build_world(leader)
    write(leader, 1, 2)
    at = wait_for_seq(follower, leader.hello()["stream_seq"])["stream_seq"]
    return leader, follower, at


def test_a_follower_behind_the_trimmed_stream_stops_loudly_and_a_restart_joins(started, logs):
    leader, follower, at = leader_and_follower_at_the_same_point(started)
    follower.signal(signal.SIGSTOP)     # it falls behind while the leader trims
    write(leader, 10, 6 * SNAPSHOT_EVERY)
    _entries, first = settled_store(logs, leader, past=at)
    follower.signal(signal.SIGCONT)
    line = stopped_loudly(follower, f"state ends at stream message {at}, but the stream was "
                                    f"trimmed and starts at ")
    # (the idle leader may have published and trimmed once more since)
    assert int(re.search(r"trimmed and starts at (\d+)", line).group(1)) >= first, line
    assert "restart the node" in line
    offset = os.path.getsize(follower.log_path)
    follower.start()                    # the restart the line asks for joins from the store
    assert any("joined from snapshot" in line for line in log_since(follower, offset)), \
        follower.log_tail()
    joins_and_agrees(leader, follower, 1000)


def test_a_start_behind_the_trimmed_stream_is_refused_until_a_snapshot_covers_it(started,
                                                                                    logs):
    leader, follower, at = leader_and_follower_at_the_same_point(started)
    follower.stop()
    write(leader, 10, 6 * SNAPSHOT_EVERY)
    settled_store(logs, leader, past=at)
    leader.stop()
    entries, first = settled_store(logs, None)
    loop, _stream, store = store_of(logs)
    for stored in entries:              # the store lost its snapshots (deleted by hand)
        loop.call(store.store.delete(stored.name), 20)
    kept = sorted(os.listdir(follower.data))
    offset = os.path.getsize(follower.log_path)
    follower.start(wait=False)
    assert follower.process.wait(REFUSED_TIMEOUT_S) == EXIT_REFUSED, follower.log_tail()
    lines = log_since(follower, offset)
    refusals = [line for line in lines if line.startswith("scanpay serve:")]
    assert len(refusals) == 1 and not any("Traceback" in line for line in lines), lines
    assert f"the stream starts at message {first} (trimmed)" in refusals[0]
    assert "scanpay_snapshots_0" in refusals[0] and "restore one there" in refusals[0]
    assert sorted(os.listdir(follower.data)) == kept, "a refused start changed its data"
    leader.start()                      # its next snapshots fill the store again
    assert wait_for_leader([leader]) is leader
    settled_store(logs, leader)
    follower.start()
    joins_and_agrees(leader, follower, 1000)


def snapshot_forked_by_the_last_write(leader: Node) -> int:
    """One-payment writes until the one that starts a snapshot: its command
    seq. The engine reaps a finished snapshot only at a later write, so none
    reaps this one."""
    from engine.storage.snapshot import list_snapshots
    with leader.client() as c:
        for i in range(4 * SNAPSHOT_EVERY):
            write(leader, 100 + i, 1)
            seq = c.call("AUDIT", {})["seq"]
            deadline = time.monotonic() + 2.0   # the forked child writes it meanwhile
            while time.monotonic() < deadline:
                newest = list_snapshots(leader.data)
                if newest and newest[-1].seq == seq:
                    return seq
                time.sleep(0.05)
    raise AssertionError(f"no snapshot at the last write in {4 * SNAPSHOT_EVERY} writes")


def test_an_idle_leader_publishes_its_newest_snapshot(started, logs):
    leader = started("s0")
    assert wait_for_leader([leader]) is leader
    build_world(leader)
    seq = snapshot_forked_by_the_last_write(leader)
    loop, _stream, store = store_of(logs)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not any(stored.seq == seq for stored in loop.call(store.entries(), 10)):
        assert time.monotonic() < deadline, (seq, loop.call(store.entries(), 10))
        time.sleep(0.2)
    with leader.client() as c:
        assert c.call("AUDIT", {})["seq"] == seq, "a write came in: the test proves nothing"
