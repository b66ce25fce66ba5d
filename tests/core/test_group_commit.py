"""Adaptive group commit (engine/core/group_commit.py): a lone request is synced
at once, the window is taken only while many requesters share an fsync, and
concurrent requests share fsyncs. The decision is tested, not the time."""
import threading
import time

import msgspec
import pytest

from engine import Engine
from engine.core.dispatch import MAP_OPS
from engine.core.group_commit import COMMIT_SIBLINGS_DEFAULT, commit_wait_s
from support.faulty_fs import FaultyFs

WINDOW_S = 0.0015
WALLETS = MAP_OPS["WALLETS"].code


def wallets(user: int) -> bytes:
    return msgspec.msgpack.encode({"users": [user]})


def test_a_lone_request_is_synced_with_no_added_wait():
    # However recent the last fsync: at once.
    for since_s in (0.0, 0.0002, 0.001):
        assert commit_wait_s(WINDOW_S, COMMIT_SIBLINGS_DEFAULT, 1, since_s) == 0.0
    # The fixed window (commit_siblings = 0) made it wait the rest of the window.
    assert commit_wait_s(WINDOW_S, 0, 1, 0.0005) == pytest.approx(0.001)


def test_the_window_is_taken_only_for_enough_requesters_and_is_bounded():
    siblings = COMMIT_SIBLINGS_DEFAULT
    assert commit_wait_s(WINDOW_S, siblings, siblings - 1, 0.0005) == 0.0
    assert commit_wait_s(WINDOW_S, siblings, siblings, 0.0005) == pytest.approx(0.001)
    assert commit_wait_s(WINDOW_S, siblings, 500, 0.0) == pytest.approx(WINDOW_S)
    # Never more than one window, and nothing once it has passed.
    assert commit_wait_s(WINDOW_S, siblings, 500, -5.0) == pytest.approx(WINDOW_S)
    assert commit_wait_s(WINDOW_S, siblings, 500, 0.002) == 0.0
    # No window configured (the embedded engine): never a wait.
    assert commit_wait_s(0.0, 0, 500, 0.0) == 0.0
    with pytest.raises(ValueError):
        commit_wait_s(WINDOW_S, -1, 1, 0.0)


class SleepLog:
    """engine.core.engine's `time`, noting every sleep (the sync thread's window)."""
    def __init__(self):
        self.sleeps_s = []

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.sleeps_s.append(seconds)
        time.sleep(seconds)


def test_an_engine_syncs_a_caller_paying_one_at_a_time_without_the_window(tmp_path,
                                                                           monkeypatch):
    import engine.core.engine as engine_module
    clock = SleepLog()
    monkeypatch.setattr(engine_module, "time", clock)
    # A 100 ms window: under the fixed rule each write waited in it.
    with Engine(str(tmp_path / "adaptive"), commit_interval_us=100_000) as eng:
        for user in range(1, 6):
            _, durable = eng.write_command(WALLETS, wallets(user))
            durable.result(timeout=10)
        assert clock.sleeps_s == [] and eng.commit_waits == 0
    with Engine(str(tmp_path / "fixed"), commit_interval_us=100_000, commit_siblings=0) as eng:
        for user in range(1, 4):
            _, durable = eng.write_command(WALLETS, wallets(user))
            durable.result(timeout=10)
        assert len(clock.sleeps_s) >= 2 and eng.commit_waits >= 2


class SlowFs(FaultyFs):
    """A slow disk: requests pile up while an fsync runs (`syncing` is set
    once one has begun)."""
    def __init__(self):
        super().__init__()
        self.syncing = threading.Event()

    def fdatasync(self, fd):
        self.syncing.set()
        time.sleep(0.02)
        super().fdatasync(fd)


def test_requests_made_during_an_fsync_share_the_next_one_and_take_the_window(tmp_path):
    datadir = str(tmp_path / "data")
    fs = SlowFs()
    with Engine(datadir, fs=fs, commit_interval_us=100_000) as eng:
        syncs = []                          # the journal syncs run
        storage_sync = eng.storage.sync
        eng.storage.sync = lambda: syncs.append(1) or storage_sync()
        first = eng.write_command(WALLETS, wallets(1))[1]
        assert fs.syncing.wait(timeout=10)  # its fsync began at once
        # 20 requesters, one command each, while the first fsync runs.
        rest = [eng.write_command(WALLETS, wallets(user))[1] for user in range(2, 22)]
        seqs = [f.result(timeout=10) for f in [first, *rest]]
        assert seqs == sorted(seqs) and seqs[-1] == eng.storage.journal.last_seq
        assert len(syncs) == 2              # 21 commands, two fsyncs
        assert eng.commit_waits == 1        # the busy group waited; the lone first did not
    with Engine(datadir) as again:
        assert again.call("BALANCES", {"users": [1, 21]})["users"][1]["status"] == 0


def test_requesters_from_many_threads_share_fsyncs(tmp_path):
    with Engine(str(tmp_path / "data"), fs=SlowFs(), commit_interval_us=1500) as eng:
        syncs = []
        storage_sync = eng.storage.sync
        eng.storage.sync = lambda: syncs.append(1) or storage_sync()
        lock = threading.Lock()             # the engine has one writer: callers take turns
        durables = []

        def caller(base: int) -> None:
            for k in range(5):
                with lock:
                    durables.append(eng.write_command(WALLETS, wallets(base + k))[1])
        threads = [threading.Thread(target=caller, args=(100 * t + 1,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        for durable in durables:
            durable.result(timeout=10)
        assert len(durables) == 40 and len(syncs) < 40


def test_a_server_shares_fsyncs_among_connections_paying_at_once(tmp_path):
    """Connections paying while an fsync runs share the next one, and it
    takes the window: the writer counts each connection's share of a batch
    as a requester (one batch of 15 connections is 15, not 1)."""
    import asyncio

    import numpy as np
    from engine.protocol.records import PAY_RESULT
    from engine.protocol.status import Status
    from support.wire import Raw, all_released, pay_body, started, world

    class SlowerFs(SlowFs):
        def fdatasync(self, fd):
            time.sleep(0.03)                # the others all arrive during one
            super().fdatasync(fd)

    async def main():
        fs = SlowerFs()
        # A 100 ms window: longer than the slow fsync, so a wait remains.
        eng = Engine(str(tmp_path / "data"), fs=fs, commit_interval_us=100_000)
        server = await started(tmp_path, engine=eng)
        setup = await Raw.open(server)
        await world(setup)
        clients = [await Raw.open(server) for _ in range(16)]
        syncs = []
        storage_sync = eng.storage.sync
        eng.storage.sync = lambda: syncs.append(1) or storage_sync()
        fs.syncing.clear()
        waits = eng.commit_waits
        clients[0].send(16, 0, pay_body([1000], amount=1))
        for _ in range(1000):               # its fsync has begun (at once: idle)
            if fs.syncing.is_set():
                break
            await asyncio.sleep(0.001)
        for n, c in enumerate(clients[1:], 1):
            c.send(16, n, pay_body([1000 + n], amount=1))
        replies = [await c.recv(timeout=10) for c in clients]
        assert [rid for _op, _flags, rid, _body in replies] == list(range(16))
        assert all((np.frombuffer(body, PAY_RESULT)["status"] == Status.ok).all()
                   for _op, _flags, _rid, body in replies)
        assert len(syncs) == 2, syncs       # the lone first, then the 15 together
        assert eng.commit_waits == waits + 1    # only the 15 waited for the window
        await all_released(server)          # and the operator's metric says so
        assert server.metrics.commit_waits._value.get() == 1
        await server.stop()
    asyncio.run(main())
