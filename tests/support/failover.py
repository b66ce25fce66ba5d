"""Load and checks for the replication tests (tests/replication/): gateways
that pipeline PAY frames to whichever node the test says leads and note the
figures of every payment answered `ok`, and the checks that those payments,
the balances and the checkpoints' digests agree across nodes."""
import asyncio
import threading
import time

import numpy as np

from engine.protocol import frame
from engine.protocol.ops import OP_PAY
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from engine.protocol.status import Status
from support.replicas import Node, wait_for_seq
from support.servers import pay_frame

GATEWAYS = 4
WINDOW_FRAMES = 8                   # PAY frames each gateway keeps in flight
RECORDS_PER_FRAME = 4
# Payments whose frames were in flight at any moment: more answered ok after
# a moment means a frame sent after it was answered (an append after it).
IN_FLIGHT_PAYMENTS_MAX = GATEWAYS * WINDOW_FRAMES * RECORDS_PER_FRAME
USERS = 8
REPLY_TIMEOUT_S = 1.0               # then the gateway goes to the leader the test names
LOOKUP_CHUNK = 1000
CHECKPOINT_EVERY = 100              # commands between state digests (the nodes' setting)


class Load:
    """Gateways on their own thread and event loop, sending to `leader`.
    Gateways are numbered from `first_gateway` (payment ids carry the
    number: a later Load with other numbers sends other ids)."""

    def __init__(self, leader: Node, first_gateway: int = 1):
        self.leader = leader
        self.first_gateway = first_gateway
        self.acked = {}             # payment id -> (cash, discount, fee, timestamp)
        self.errors = 0
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)
        self.thread.start()

    async def main(self) -> None:
        await asyncio.gather(*(self.gateway(self.first_gateway + g) for g in range(GATEWAYS)))

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
                    writer.write(pay_frame(index, sent, RECORDS_PER_FRAME))
                    sent += 1
                while not self.stopping:
                    if not await self.one_reply(reader):
                        break               # an error frame: to the leader again
                    writer.write(pay_frame(index, sent, RECORDS_PER_FRAME))
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


# How long a checkpoint's digest may take after its writes (a small state's
# digest child, niced, on a machine other tenants keep busy).
DIGEST_WAIT_S = 30.0


def pass_a_checkpoint(leader: Node, first_id: int = 1 << 50, every: int = CHECKPOINT_EVERY
                      ) -> None:
    """One-payment writes (ids from `first_id`, at most 3 * `every`, the
    nodes' checkpoint interval) until the leader appends a new checkpoint
    record: every running node then applies that command live and checks it
    (a node restarted by the test replayed the older ones and has no digest
    there)."""
    before = (leader.hello()["checkpoint"] or {}).get("seq", 0)
    records = np.zeros(1, PAY_RECORD)
    records["payer"], records["merchant"], records["amount"] = 1, 1, 100
    with leader.client() as c:
        for i in range(3 * every):
            records["id"] = first_id + i
            assert c.pay(records)["status"][0] == Status.ok
            if i % 10 == 0 and (leader.hello()["checkpoint"] or {}).get("seq", 0) > before:
                return
    # The writes crossed three checkpoint seqs; a digest child niced on a
    # busy machine may still be computing the last (its record is appended
    # when it is done, writes or not).
    deadline = time.monotonic() + DIGEST_WAIT_S
    while (leader.hello()["checkpoint"] or {}).get("seq", 0) <= before:
        assert time.monotonic() < deadline, (
            f"no checkpoint after {before} in {3 * every} writes and {DIGEST_WAIT_S:g} s")
        time.sleep(0.1)


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


# A node whose digest children are all busy (a big state, under load) skips
# a checkpoint (engine/replication/checkpoint.py, CHILDREN_MAX) and shows
# the one before: then another is passed, at most this many in all.
CONVERGE_TRIES = 4


def pass_checkpoints_until_agreed(leader: Node, nodes: list, first_id: int = 1 << 50,
                                  every: int = CHECKPOINT_EVERY,
                                  agree_timeout_s: float = 15.0) -> tuple[int, int]:
    """Checkpoints passed (pass_a_checkpoint) until every node shows the same
    last one, at most CONVERGE_TRIES: (how many passed, the next id free)."""
    for passed in range(1, CONVERGE_TRIES + 1):
        pass_a_checkpoint(leader, first_id, every)
        first_id += 3 * every
        try:
            checkpoints_agree(nodes, agree_timeout_s)
            return passed, first_id
        except AssertionError:
            if passed == CONVERGE_TRIES:
                raise
    raise AssertionError("unreachable")


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
