"""engine/server/lone_sync.py over real sockets: a lone request's journal
write, fdatasync and reply on the lone-sync thread (ext/outlet.pyx
`Syncer`, held or failed through its test hooks); what arrives meanwhile
waits for the group-commit sync thread. No reply leaves before its
fdatasync, none is lost, duplicated or out of order, and a failed
fdatasync fails the journal as one on the sync thread does."""
import asyncio
import errno
import random

import msgspec
import numpy as np
import pytest

from engine import Engine
from engine.protocol.records import PAY_RESULT
from engine.protocol.status import Status
from engine.server.lone_sync import LONE_AFTER_GROUP_S
from support.wire import (Raw, all_released, error_of, pay_body, run, started_with_world,
                          until)

PAY = 16
HELD = []                           # syncers a test held: released after it, pass or fail


@pytest.fixture(autouse=True)
def release_held():
    yield
    while HELD:
        HELD.pop().hold_before_fdatasync(False)


def ok_ids(reply) -> list[int]:
    """The ids of a PAY reply whose records are all ok."""
    _op, flags, _rid, body = reply
    assert not flags, error_of(reply)
    results = np.frombuffer(body, PAY_RESULT)
    assert (results["status"] == Status.ok).all(), results
    return results["id"].tolist()


async def held_lone_pay(server, client, first_id: int, request_id: int):
    """A PAY whose fsync is a lone sync, held before its fdatasync: (its id,
    the task receiving its reply). The first write after a segment roll
    rewrites the manifest on the sync thread instead, so a few may go that
    way first (bounded)."""
    syncer = server.writer.lone.syncer
    HELD.append(syncer)
    syncer.hold_before_fdatasync(True)
    for pay_id in range(first_id, first_id + 20):
        client.send(PAY, request_id, pay_body([pay_id], amount=1))
        reply = asyncio.ensure_future(client.recv(timeout=30))
        await until(lambda: syncer.held or reply.done(), "the PAY's fsync")
        if syncer.held:
            return pay_id, reply
        assert ok_ids(reply.result()) == [pay_id]
        await all_released(server)
        await asyncio.sleep(LONE_AFTER_GROUP_S)     # none just after a group fsync
    raise AssertionError("no PAY took the lone sync")


def reopened_payments(data) -> int:
    with Engine(data) as engine:
        return engine.counts()["payments"]


def test_a_lone_reply_leaves_only_after_its_fdatasync(tmp_path):
    """A lone PAY on an idle journal: written by the lone-sync thread, and
    its reply sent by that thread, but only once its fdatasync returned;
    held before it, the entry is written but not durable and no reply is out."""
    async def main():
        server, c = await started_with_world(tmp_path)
        await all_released(server)
        journal, lone = server.engine.storage.journal, server.writer.lone
        syncs = lone.syncs
        pay_id, reply = await held_lone_pay(server, c, 100, 1)
        assert lone.syncs == syncs + 1 and lone.job is not None
        written = journal.last_seq
        assert journal.durable_seq < written
        await until(lambda: server.writer.deliveries, "the PAY applied, its reply queued")
        await asyncio.sleep(0.2)
        assert not reply.done()                     # no reply before the fdatasync
        assert server.engine.counts()["payments"] >= 1     # applied, not acknowledged
        server.writer.lone.syncer.hold_before_fdatasync(False)
        assert ok_ids(await reply) == [pay_id]
        await all_released(server)                  # (the reply can arrive first)
        assert journal.durable_seq == written
        from prometheus_client import generate_latest
        text = generate_latest(server.metrics.registry).decode()
        assert 'scanpay_pay_reply_writes_total{sender="sync_thread"}' in text
        sent_here = float(text.split('scanpay_pay_reply_writes_total{sender="sync_thread"} ')[1]
                          .split()[0])
        assert sent_here >= 1                       # by the lone-sync thread
        assert float(text.split("\nscanpay_lone_syncs_total ")[1].split()[0]) == lone.syncs
        await server.stop()
        assert reopened_payments(str(tmp_path / "data")) == pay_id - 99
    run(main())


def test_requests_during_a_lone_fsync_share_the_next_one_in_order(tmp_path):
    """While a lone fsync is held: pipelined PAYs on its connection, PAYs
    from two others, a TOPUP and a BALANCES read are applied behind it and
    wait; none is answered. Released, every reply arrives in request order,
    the next fsync (on the sync thread) covers them all, and a restart finds
    every payment."""
    async def main():
        server, a = await started_with_world(tmp_path)
        b, c = await Raw.open(server), await Raw.open(server)
        engine = server.engine
        lone_id, lone_reply = await held_lone_pay(server, a, 100, 1)
        before = engine.counts()["payments"]
        for k in range(5):
            a.send(PAY, 10 + k, pay_body([200 + k], amount=1))
            b.send(PAY, 20 + k, pay_body([300 + k], amount=1))
            c.send(PAY, 30 + k, pay_body([400 + k], amount=1))
        b.send(34, 40, msgspec.msgpack.encode(
            {"topups": [{"id": 9, "user": 2, "amount": 500}]}))
        c.send(43, 41, msgspec.msgpack.encode({"users": [2]}))
        await until(lambda: engine.counts()["payments"] == before + 15
                    and not server.writer.queue, "the PAYs applied")
        await asyncio.sleep(0.1)
        pending = list(server.writer.deliveries)    # none released: all wait for fsyncs
        assert len(pending) >= 5 and not any(durable is not None and durable.done()
                                             for durable, *_ in pending)
        assert not lone_reply.done()
        server.writer.lone.syncer.hold_before_fdatasync(False)
        assert ok_ids(await lone_reply) == [lone_id]
        for client, base, ids in ((a, 10, 200), (b, 20, 300), (c, 30, 400)):
            for k in range(5):
                reply = await client.recv()
                assert reply[2] == base + k and ok_ids(reply) == [ids + k]
        assert (await b.recv())[2] == 40
        _op, flags, rid, body = await c.recv()
        assert rid == 41 and not flags
        assert msgspec.msgpack.decode(body)["users"][0]["balance"] == 500
        await all_released(server)
        assert engine.storage.journal.durable_seq == engine.storage.journal.last_seq
        paid = engine.counts()["payments"]
        await server.stop()
        assert reopened_payments(str(tmp_path / "data")) == paid
    run(main())


def test_a_failed_lone_fdatasync_fails_the_journal_and_nothing_is_applied(tmp_path,
                                                                         monkeypatch):
    """The lone fsync fails (EIO): its PAY and one journaled behind it are
    answered unavailable, the journal drops them and the engine rebuilds;
    retried, each is applied once (not a duplicate), and survives a restart."""
    import engine.storage.durability as durability
    monkeypatch.setattr(durability, "RECOVER_INTERVAL_MS", 0)

    async def main():
        server, a = await started_with_world(tmp_path)
        b = await Raw.open(server)
        engine = server.engine
        server.writer.lone.syncer.fail_next_fdatasync(errno.EIO)
        lone_id, lone_reply = await held_lone_pay(server, a, 100, 1)
        before = engine.counts()["payments"]
        b.send(PAY, 2, pay_body([500], amount=1))
        await until(lambda: engine.counts()["payments"] == before + 1, "the second applied")
        server.writer.lone.syncer.hold_before_fdatasync(False)
        for reply in (await lone_reply, await b.recv()):
            error = error_of(reply)
            assert (error["name"], error["retryable"]) == ("unavailable", True)
        await all_released(server)
        for client, pay_id in ((a, lone_id), (b, 500)):
            assert ok_ids(await client.call(PAY, pay_body([pay_id], amount=1), 7)) == [pay_id]
        await all_released(server)
        paid = engine.counts()["payments"]
        assert paid == before + 1                   # (`before` had the held one): each once
        await server.stop()
        assert reopened_payments(str(tmp_path / "data")) == paid
    run(main())


def test_many_callers_switching_between_lone_and_group_syncs_lose_nothing(tmp_path):
    """Rounds of one caller paying alone (lone syncs, once the sync thread
    has synced no group for LONE_AFTER_GROUP_S) and then eight connections at once,
    each with 1-4 PAY frames in flight at random (group syncs on the sync
    thread): every reply arrives in request order and ok, and a restart
    finds every payment."""
    rounds, alone, together = 4, 5, 25
    rng = random.Random(16)

    async def caller(client, index: int, frames: int) -> None:
        sent = received = 0
        base = client.paid
        while received < frames:            # bounded: each turn receives one
            depth = rng.randint(1, 4)
            while sent < frames and sent - received < depth:
                client.send(PAY, base + sent, pay_body([10_000 * (index + 1) + base + sent],
                                                       amount=1))
                sent += 1
            reply = await client.recv(timeout=30)
            assert reply[2] == base + received
            assert ok_ids(reply) == [10_000 * (index + 1) + base + received]
            received += 1
        client.paid += frames

    async def main():
        server, first = await started_with_world(tmp_path)
        clients = [first] + [await Raw.open(server) for _ in range(7)]
        for client in clients:
            client.paid = 0
        lone, journal = server.writer.lone, server.engine.storage.journal
        syncs, fsyncs = lone.syncs, journal.fsync_count
        for _ in range(rounds):
            await asyncio.sleep(2 * LONE_AFTER_GROUP_S)
            for _ in range(alone):
                await caller(first, 0, 1)
            await asyncio.gather(*(caller(client, i, together)
                                   for i, client in enumerate(clients)))
        await all_released(server)
        assert lone.syncs - syncs >= rounds * (alone - 1)     # both paths were taken
        assert journal.fsync_count - fsyncs > lone.syncs - syncs
        paid = server.engine.counts()["payments"]
        assert paid == rounds * (alone + 8 * together)
        await server.stop()
        assert reopened_payments(str(tmp_path / "data")) == paid
    run(main())
