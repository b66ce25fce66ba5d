"""AUDIT in the server runs in a forked child (engine/server/audit_fork.py): payments
are applied and answered while it runs, its report is the state as of the
point the writer took it, it still finds corruption, and a child that dies
or hangs gives an error reply. A test hook in the child (CHILD_HOOK) holds
it back until the test opens a gate, so nothing here depends on timing."""
import asyncio
import os
import time

import numpy as np
import pytest

from engine.server import audit_fork
from engine.protocol.records import PAY_RECORD, PAY_RESULT
from engine.protocol.status import Status
from support.wire import Raw, dec, error_of, pay_body, run, started, started_with_world

AUDIT = 45
PAY = 16
GATE_WAIT_S_MAX = 60                    # a gate never opened lets the child go on
POLL_ROUNDS_MAX = 2_000                 # x 5 ms: how long a test waits for the server
AUDIT_REPLY_WAIT_S = 120


def gate_hook(path: str):
    """Holds the audit child until `path` exists (bounded)."""
    def hook():
        deadline = time.monotonic() + GATE_WAIT_S_MAX
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
    return hook


async def until(condition, what: str) -> None:
    for _ in range(POLL_ROUNDS_MAX):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the server never got to: {what}")


async def pay_ok(client, payment_id: int) -> None:
    _op, flags, _rid, body = await client.call(PAY, pay_body([payment_id]), payment_id)
    assert flags == 0 and np.frombuffer(body, PAY_RESULT)["status"][0] == Status.ok


async def send_audit(server, client, outstanding: int = 0) -> asyncio.Task:
    """Send AUDIT and wait until the writer has taken it from its queue.
    `outstanding`: the AUDITs still unanswered; first every other reply must
    be gone (a reply the sender thread sent leaves its slot a moment later)."""
    def pending() -> int:
        return sum(len(c.slots) for c in server.connections)
    await until(lambda: pending() == outstanding, "answering all but the AUDITs")
    client.send(AUDIT, 1, b"")
    task = asyncio.ensure_future(client.recv(timeout=AUDIT_REPLY_WAIT_S))
    await until(lambda: task.done() or pending() > outstanding, "receiving the AUDIT")
    await until(lambda: task.done() or not server.writer.queue, "taking the AUDIT")
    return task


async def audit_reply(client):
    """AUDIT and its reply. The child runs at the lowest priority: on a busy
    machine even a tiny state can take seconds, so wait long."""
    client.send(AUDIT, 1, b"")
    return await client.recv(timeout=AUDIT_REPLY_WAIT_S)


def report_of(reply) -> dict:
    _op, flags, _rid, body = reply
    assert flags == 0, dec(body)
    return dec(body)


def payments_checked(report: dict) -> str:
    return report["checks"]["payments_balanced"]["detail"]


def test_payments_are_answered_while_an_audit_runs(tmp_path, monkeypatch):
    gate = str(tmp_path / "gate")
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", gate_hook(gate))

    async def main():
        server, setup = await started_with_world(tmp_path)
        await setup.call(PAY, pay_body(list(range(1, 1001))), 1)
        auditor, payer = await Raw.open(server), await Raw.open(server)
        audit = await send_audit(server, auditor)
        # Counted, not timed: 50 payments one after another, each answered
        # (after its fsync) while the AUDIT has no reply yet. In the writer,
        # the AUDIT was answered before any of them was even applied.
        for payment_id in range(2001, 2051):
            await pay_ok(payer, payment_id)
            assert not audit.done(), f"AUDIT answered before payment {payment_id}"
        open(gate, "w").close()
        report = report_of(await audit)
        assert report["ok"] is True and set(report) == {"ok", "checks", "seq", "now"}
        # The state as of the point the writer took the AUDIT: 1,000
        # payments, at the journal entry then last.
        assert payments_checked(report) == "all 1000 payments (cash + discount = amount) ok"
        assert report["seq"] == server.engine.storage.journal.last_seq - 50
        assert report["now"] <= server.engine.state.now
        assert server.writer.audits.children == 1 and server.writer.audits.running is None
        await server.stop()
    run(main())


@pytest.mark.no_audit
def test_the_audit_child_reports_corruption():
    async def main():
        server, c = await started_with_world()
        await c.call(PAY, pay_body([1, 2, 3]), 1)
        # A hold no authorization accounts for (the debug kernel's test hook:
        # Python cannot write the ledger's tables).
        server.engine.state.ledger._debug_set_held(0, 1)
        report = report_of(await audit_reply(c))
        assert report["ok"] is False
        failed = {name for name, check in report["checks"].items() if not check["ok"]}
        assert "holds_match_authorizations" in failed, failed
        assert server.writer.audits.children == 1           # through the child
        _flags, refused = await c.map(AUDIT, {"full": True})  # a request that is not {}
        assert refused["status"] == Status.invalid_argument and "ok" not in refused
        await server.stop()
    run(main())


def test_an_audit_while_one_runs_waits_for_the_next_child(tmp_path, monkeypatch):
    gate = str(tmp_path / "gate")
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", gate_hook(gate))
    monkeypatch.setattr(audit_fork, "AUDITS_WAITING_MAX", 2)

    async def main():
        server, setup = await started_with_world()
        first, second, third, fourth, payer = [await Raw.open(server) for _ in range(5)]
        audits = server.writer.audits
        running = await send_audit(server, first)
        assert audits.running is not None
        await pay_ok(payer, 7)
        waiting = [await send_audit(server, second, 1), await send_audit(server, third, 2)]
        assert len(audits.waiting) == 2 and audits.children == 1
        assert error_of(await (await send_audit(server, fourth, 3)))["name"] == "busy"
        open(gate, "w").close()
        before = report_of(await running)
        after = [report_of(await task) for task in waiting]
        assert payments_checked(before) == "all 0 payments (cash + discount = amount) ok"
        # One new child for both waiting AUDITs: the state after the payment.
        assert after[0] == after[1] and audits.children == 2
        assert payments_checked(after[0]) == "all 1 payments (cash + discount = amount) ok"
        await server.stop()
    run(main())


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_an_audit_child_that_dies_or_hangs_gives_an_error_reply(monkeypatch, failure):
    if failure == "dies":
        monkeypatch.setattr(audit_fork, "CHILD_HOOK", lambda: os._exit(7))
    else:
        monkeypatch.setattr(audit_fork, "CHILD_HOOK", lambda: time.sleep(GATE_WAIT_S_MAX))

    async def main():
        server, c = await started_with_world()
        audits = server.writer.audits
        if failure == "hangs":
            audits.timeout_s = 0.5          # the hook sleeps far longer
        error = error_of(await audit_reply(c))
        assert error["name"] == "unavailable" and error["retryable"] is True
        expected = "exit code 7" if failure == "dies" else "timed out"
        assert expected in error["message"], error["message"]
        assert audits.running is None                       # reaped, nothing leaks
        await pay_ok(c, 5)                                  # still serving
        monkeypatch.setattr(audit_fork, "CHILD_HOOK", None)
        audits.timeout_s = audit_fork.AUDIT_TIMEOUT_S
        assert report_of(await audit_reply(c))["ok"] is True
        await server.stop()
    run(main())


def test_a_graceful_stop_answers_a_running_audit(tmp_path, monkeypatch):
    gate = str(tmp_path / "gate")
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", gate_hook(gate))

    async def main():
        server, c = await started_with_world(tmp_path)
        audit = await send_audit(server, c)
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()          # the stop waits for the audit
        open(gate, "w").close()
        assert report_of(await audit)["ok"] is True
        await asyncio.wait_for(stopping, 30)
    run(main())


def test_the_audit_child_runs_under_sched_idle_until_the_server_stops(tmp_path, monkeypatch):
    """It takes a core only when no other thread wants one (a nice-19 child
    held one for its whole time slice while the writer waited); a stopping
    server lets it run like any other process."""
    gate = str(tmp_path / "gate")
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", gate_hook(gate))

    async def main():
        server, c = await started_with_world(tmp_path)
        audit = await send_audit(server, c)
        audits = server.writer.audits
        await until(lambda: audits.running is not None, "the audit child")
        pid = audits.running.pid
        await until(lambda: os.sched_getscheduler(pid) == os.SCHED_IDLE, "SCHED_IDLE")
        stopping = asyncio.ensure_future(server.stop())
        await until(lambda: os.sched_getscheduler(pid) == os.SCHED_OTHER, "normal priority")
        open(gate, "w").close()
        assert report_of(await audit)["ok"] is True
        await asyncio.wait_for(stopping, 30)
    run(main())


def test_payments_go_on_while_the_audit_child_exits(tmp_path, monkeypatch):
    """A child that has closed its pipe may still take long to exit (it
    frees gigabytes, at SCHED_IDLE). The event loop does not wait for it:
    payments are answered meanwhile, and the AUDIT once it has exited (here
    with no report: unavailable)."""
    closed, gate = str(tmp_path / "closed"), str(tmp_path / "gate")

    def close_then_wait():
        os.closerange(3, 1 << 16)           # the report pipe among them
        open(closed, "w").close()
        gate_wait = time.monotonic() + GATE_WAIT_S_MAX
        while not os.path.exists(gate) and time.monotonic() < gate_wait:
            time.sleep(0.005)
        os._exit(0)
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", close_then_wait)

    async def main():
        server, c = await started_with_world(tmp_path)
        auditor = await Raw.open(server)
        audit = await send_audit(server, auditor)
        await until(lambda: os.path.exists(closed), "the child closing its pipe")
        for payment_id in range(1, 21):
            await pay_ok(c, payment_id)
            assert not audit.done(), f"AUDIT answered before payment {payment_id}"
        open(gate, "w").close()
        error = error_of(await audit)
        assert error["name"] == "unavailable" and "not MessagePack" in error["message"]
        assert server.writer.audits.running is None
        await server.stop()
    run(main())


def test_scanpay_audit_says_which_journal_entry_it_reflects(tmp_path):
    from support.servers import admin_main

    async def main():
        server, c = await started_with_world(tmp_path)
        await c.call(PAY, pay_body([1, 2]), 1)
        seq = server.engine.storage.journal.last_seq
        code, out, err = await asyncio.get_running_loop().run_in_executor(
            None, admin_main, ["audit", "--connect", server.config.listen])
        assert code == 0 and f"audit: ok (18 checks, as of journal entry {seq})" in err, err
        await server.stop()
    run(main())


def resident_mib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("Rss:"))


def test_the_audit_child_lets_go_of_the_free_rows_and_keeps_the_used_ones():
    """In the child, the tables' reserved rows (where the server appends) and
    the indexes the checks do not read are dropped, so that the server's
    writes do not fault page by page while the audit runs; the rows in use,
    which the checks read, are untouched. (Here in process: on an engine
    nothing writes to afterwards.)"""
    from engine import Engine
    eng = Engine(capacity={"payments": 500_000})
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
    eng.call("WALLETS", {"users": [1]})
    eng.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})
    assert (eng.pay(np.frombuffer(pay_body([1, 2, 3]), PAY_RECORD))["status"] == 0).all()
    digest, before_mib = eng.digest(), resident_mib()
    audit_fork.release_writer_pages(eng.state)
    # ~370 bytes a reserved payment row: ~180 MiB resident before
    assert resident_mib() < before_mib - 100
    assert eng.digest() == digest and eng.audit()["ok"]


def test_the_child_reports_what_the_engine_reports_in_process():
    """The child drops the indexes the checks do not read (big enough here to
    be dropped): its report on a world with coupons and payments is the one
    the embedded engine computes in process."""
    from engine.demo.world import World, build, make_engine, pay_batches
    spec = World(users=3000, merchants=60, stocks=12, coupons_per_user=3, seed=5, districts=4,
                 malls=4, topup_per_user_min=10**9, topup_per_user_max=10**9, preset="standard",
                 now_ms=1_700_000_000_000)
    eng = make_engine(lambda: spec.now_ms, {"payments": 300_000})
    info = build(eng, spec)
    for batch in pay_batches(info, 8, batch_records=1000, seed=3, start_payment_id=1):
        eng.pay(batch)

    async def main():
        server = await started(engine=eng)
        report = report_of(await audit_reply(await Raw.open(server)))
        await server.stop()
        return report
    report = run(main())
    expected = eng.audit()
    assert expected["ok"] is True and "all 8000 payments" in payments_checked(expected)
    assert {key: report[key] for key in ("ok", "checks")} == expected


def test_an_audit_that_saw_commands_a_storage_failure_dropped_is_unavailable(tmp_path,
                                                                            monkeypatch):
    """The child forks while a PAY is applied but its fsync is still held;
    the fsync then fails, so the PAY is dropped and the state rebuilt. The
    report the child sends afterwards checked a state holding that PAY: it
    must not come back as the ledger's AUDIT (unavailable, retryable), and
    the next AUDIT, on the rebuilt state, is ok without the PAY."""
    import errno

    from support.faulty_fs import GatedFs

    from engine import Engine
    audit_gate = str(tmp_path / "audit-gate")
    monkeypatch.setattr(audit_fork, "CHILD_HOOK", gate_hook(audit_gate))

    async def main():
        fs = GatedFs()
        engine = Engine(str(tmp_path / "data"), fs=fs)
        server, c = await started_with_world(engine=engine)
        payments_before = engine.counts()["payments"]
        fsync_gate = fs.hold_next()         # the held fsync succeeds; the next one fails
        c.send(PAY, 1, pay_body([1]))
        await until(fs.entered.is_set, "the held fsync")
        c.send(PAY, 2, pay_body([2]))       # applied behind it, durable never
        await until(lambda: engine.counts()["payments"] == payments_before + 2,
                    "the second PAY applied")
        auditor = await Raw.open(server)
        reply = await send_audit(server, auditor, outstanding=2)
        await until(lambda: server.writer.audits.running is not None, "the audit child")
        fs.fail("fdatasync", errno.EIO)
        fsync_gate.set()
        _op, flags, _rid, body = await c.recv()
        assert not flags and np.frombuffer(body, PAY_RESULT)["status"][0] == Status.ok
        assert error_of(await c.recv())["name"] == "unavailable"
        fs.heal()
        _flags, _reply = await c.map(43, {"users": [1]}, 3)     # rebuilds the state
        assert engine.counts()["payments"] == payments_before + 1
        open(audit_gate, "w").close()
        failed = error_of(await reply)
        assert failed["name"] == "unavailable" and failed["retryable"], failed
        assert report_of(await audit_reply(auditor))["ok"]
        await server.stop()
    run(main())
