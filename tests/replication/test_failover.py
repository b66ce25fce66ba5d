"""Failover: SIGKILL the leader under pipelined load, again and again; pause
it past its lease (SIGSTOP) and let it come back (SIGCONT).

Gateways pipeline PAY frames to whichever node leads (the test tells them),
and note the figures of every payment answered `ok`. Whatever happens to
the leader, every one of those is on the node that leads at the end, with
the same figures; AUDIT holds there and on every follower, and the
followers hold the same balances once they reach the leader's stream seq.
"""
import asyncio
import random
import signal
import threading
import time

import numpy as np
import pytest

from engine.protocol import frame
from engine.protocol.ops import OP_PAY
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from engine.protocol.status import Status
from support.replicas import Node, wait_for_leader, wait_for_seq
from support.servers import pay_frame

LEASE_MS = 2000
GATEWAYS = 4
WINDOW_FRAMES = 8                   # PAY frames each gateway keeps in flight
USERS = 8
CYCLES = 5
REPLY_TIMEOUT_S = 1.0               # then the gateway goes to the leader the test names
FAILOVER_BOUND_S = 15.0             # a sanity bound; bench/ measures the real figure
LOOKUP_CHUNK = 1000
CHECKPOINT_EVERY = 100              # commands between state digests


class Load:
    """Gateways on their own thread and event loop, sending to `leader`."""

    def __init__(self, leader: Node):
        self.leader = leader
        self.acked = {}             # payment id -> (cash, discount, fee, timestamp)
        self.errors = 0
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)
        self.thread.start()

    async def main(self) -> None:
        await asyncio.gather(*(self.gateway(g + 1) for g in range(GATEWAYS)))

    async def gateway(self, index: int) -> None:
        sent = 0
        while not self.stopping:
            port = self.leader.port
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), REPLY_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                for _ in range(WINDOW_FRAMES):
                    writer.write(pay_frame(index, sent))
                    sent += 1
                while not self.stopping:
                    if not await self.one_reply(reader):
                        break               # an error frame: to the leader again
                    writer.write(pay_frame(index, sent))
                    sent += 1
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.02)

    async def one_reply(self, reader) -> bool:
        header = await asyncio.wait_for(reader.readexactly(frame.HEADER.size), REPLY_TIMEOUT_S)
        size, op, flags, _rid = frame.HEADER.unpack(header)
        body = await asyncio.wait_for(reader.readexactly(size), REPLY_TIMEOUT_S)
        if flags & frame.FLAG_ERROR:
            self.errors += 1
            return False
        assert op == OP_PAY
        for row in np.frombuffer(body, PAY_RESULT):
            if row["status"] == Status.ok:
                self.acked[int(row["id"])] = (int(row["cash"]), int(row["discount"]),
                                              int(row["fee"]), int(row["timestamp"]))
        return True

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(10)


def build_world(node: Node) -> None:
    with node.client() as c:
        c.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
        c.call("WALLETS", {"users": list(range(1, USERS + 1))})
        c.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**12}
                                    for u in range(1, USERS + 1)]})


def check_acked_on(node: Node, acked: dict) -> None:
    """Every payment answered ok is on `node` with the same figures."""
    ids = sorted(acked)
    wrong = []
    with node.client() as c:
        for at in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[at:at + LOOKUP_CHUNK]
            for r in c.call("GET_PAYMENTS", {"ids": chunk})["results"]:
                if r["status"] != Status.ok:
                    wrong.append((r["id"], "missing"))
                elif (r["cash"], r["discount"], r["fee"], r["created_at"]) != acked[r["id"]]:
                    wrong.append((r["id"], "figures"))
    assert not wrong, f"{len(wrong)} of {len(ids)} answered payments are wrong: {wrong[:5]}"


def pass_a_checkpoint(leader: Node) -> None:
    """One-payment writes until the leader appends a new checkpoint record:
    every running node then applies that command live and checks it (a node
    restarted by the test replayed the older ones and has no digest there)."""
    before = (leader.hello()["checkpoint"] or {}).get("seq", 0)
    records = np.zeros(1, PAY_RECORD)
    records["payer"], records["merchant"], records["amount"] = 1, 1, 100
    with leader.client() as c:
        for i in range(3 * CHECKPOINT_EVERY):
            records["id"] = (1 << 50) + i
            assert c.pay(records)["status"][0] == Status.ok
            if i % 10 == 0 and (leader.hello()["checkpoint"] or {}).get("seq", 0) > before:
                return
    raise AssertionError(f"no checkpoint after {before} in {3 * CHECKPOINT_EVERY} writes")


def checkpoints_agree(nodes: list, timeout_s: float = 15.0) -> dict:
    """Once writes stop, the leader appends its last digest and every node
    checks it: all nodes then show the same last checkpoint."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {node.name: node.hello()["checkpoint"] for node in nodes}
        first = next(iter(seen.values()))
        if first is not None and all(c == first for c in seen.values()):
            return first
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)


def check_converged(leader: Node, nodes: list) -> None:
    """Every node agrees on the last checkpoint's digest and, at the
    leader's stream seq, holds the same balances; AUDIT holds on each."""
    checkpoint = checkpoints_agree(nodes)
    assert checkpoint["seq"] >= CHECKPOINT_EVERY, checkpoint
    at = leader.hello()["stream_seq"]
    query = {"users": list(range(1, USERS + 1)), "merchants": [1]}
    with leader.client() as c:
        expected = {k: v for k, v in c.call("BALANCES", query).items() if k != "stream_seq"}
    for node in nodes:
        wait_for_seq(node, at)
        with node.client() as c:
            reply = c.call("BALANCES", query)
            assert reply.pop("stream_seq") >= at, node.name     # (records change no balance)
            assert reply == expected, node.name
            audit = c.call("AUDIT", {})
            assert audit["ok"], (node.name, audit)


@pytest.fixture
def nodes(logs, tmp_path):
    made = []

    def make(count: int) -> list:
        made.extend(Node(str(tmp_path), logs.cluster.servers, LEASE_MS, f"s{i}",
                         checkpoint_every_entries=CHECKPOINT_EVERY) for i in range(count))
        for node in made:
            node.start()
        return made
    yield make
    for node in made:
        node.stop()


def test_sigkill_the_leader_under_pipelined_load_loses_no_answered_payment(nodes):
    group = nodes(3)
    leader = wait_for_leader(group)
    build_world(leader)
    load = Load(leader)
    rng = random.Random(17)
    failovers_s = []
    try:
        for _cycle in range(CYCLES):
            time.sleep(rng.uniform(0.3, 1.0))
            killed = load.leader
            started = time.monotonic()
            killed.signal(signal.SIGKILL)
            load.leader = wait_for_leader([n for n in group if n is not killed])
            failovers_s.append(time.monotonic() - started)
            killed.start()                  # back as a follower, replaying the stream
        time.sleep(0.5)
    finally:
        load.stop()
    assert len(load.acked) > 200, f"the load never got going ({len(load.acked)} acked)"
    print(f"failover after SIGKILL (s): {[round(s, 2) for s in failovers_s]}")
    assert max(failovers_s) < FAILOVER_BOUND_S, failovers_s
    leader = wait_for_leader(group)
    check_acked_on(leader, load.acked)
    pass_a_checkpoint(leader)
    check_converged(leader, group)


def test_a_paused_leader_is_refused_and_rejoins_as_a_follower(nodes):
    group = nodes(2)
    old = wait_for_leader(group)
    build_world(old)
    load = Load(old)
    try:
        time.sleep(0.5)
        old.signal(signal.SIGSTOP)
        new = wait_for_leader([n for n in group if n is not old])
        load.leader = new
        time.sleep(0.3)                     # the new leader appends meanwhile
        old.signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while old.hello()["role"] != "follower":
            assert time.monotonic() < deadline, old.log_tail()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        load.stop()
    assert wait_for_leader(group) is new
    log_text = open(old.log_path).read()
    assert "deposed:" in log_text or "lease lost" in log_text, old.log_tail()
    check_acked_on(new, load.acked)
    pass_a_checkpoint(new)
    check_converged(new, group)
