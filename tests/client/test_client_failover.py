"""Clients that follow the leader (engine/client/failover.py, docs/client.md
"Several addresses"): several fake servers on free ports (tests/support/
fake_server.py) answer not_leader naming another, drop connections after
applying a pipeline, answer unavailable n times or never answer; and one real
server restarted under a pipeline of payments. Every scenario runs on the
compiled hot path and on its plain-Python twin (the `impl` fixture), and one
test runs a scenario on both and compares what each saw.
"""
import asyncio
import re
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine
from engine import client as client_module
from engine.ports import free_port
from engine.client import (AsyncClient, Client, ConnectionLost, OutcomeUnknown,
                           RetryDeadlineExceeded)
from engine.client.failover import (FINAL, LOST, NOT_SENT, REFUSED, RESENDABLE, FailoverAsyncClient,
                                    FailoverClient, RetryPolicy, backoff_ms, classify,
                                    leader_from_message, parse_addresses)
from engine.protocol.errors import BadBody, Busy, NotLeader, Unavailable
from engine.protocol.ops import OP_CODES, OP_EXPIRE, OP_PAY, OP_PAYMENT_CODE, OP_SETTLE, OP_TOPUP
from engine.protocol.records import PAY_RESULT

from support import ROOT
from support.fake_server import FakeServer
from support.servers import RealServer, pay_batch, setup_world

FAST = dict(retry_deadline_ms=5_000, backoff_initial_ms=5, backoff_max_ms=50)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def at(server):
    return f"127.0.0.1:{server.port}"


def ops_received(server, connection=None):
    return [op for conn, op, _ in server.received if connection is None or conn == connection]


def pay_ids(server):
    """The payment ids of every PAY frame the server received, in order."""
    return [int(i) for _, op, body in server.received if op == OP_PAY
            for i in np.frombuffer(body, client_module.PAY_RECORD)["id"]]


# -- the pieces ---------------------------------------------------------------------

def test_backoff_grows_to_its_cap_with_jitter_inside_the_step():
    for draw in (0.0, 0.5, 0.999):
        pauses = [backoff_ms(n, 50, 2_000, draw) for n in range(40)]
        assert pauses == sorted(pauses)                      # never shorter after more failures
        assert max(pauses) < 2_000 and pauses[-1] == pauses[10]   # capped
    assert backoff_ms(0, 50, 2_000, 0.0) == 25 and backoff_ms(1, 50, 2_000, 0.0) == 50
    assert backoff_ms(3, 50, 2_000, 0.5) == 400 * 0.75
    assert backoff_ms(10**9, 50, 2_000, 0.0) == 1_000        # huge counts stay bounded
    for bad in ((-1, 50, 2_000, 0.0), (0, 50, 2_000, 1.0), (0, 50, 2_000, -0.1)):
        with pytest.raises(ValueError):
            backoff_ms(*bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 60_000), st.integers(0, 60_000),
       st.floats(0, 1, exclude_max=True))
def test_backoff_is_bounded_by_the_step_it_jitters(failures, initial_ms, extra_ms, draw):
    max_ms = min(initial_ms + extra_ms, 60_000)
    step = min(max_ms, initial_ms * 2 ** min(failures, 32))
    assert step / 2 <= backoff_ms(failures, initial_ms, max_ms, draw) <= step <= max_ms


def test_retry_policy_refuses_unbounded_settings():
    policy = RetryPolicy(1_000, 10, 100, draw=lambda: 0.0)
    assert [policy.pause_s(n) for n in range(6)] == [0.005, 0.01, 0.02, 0.04, 0.05, 0.05]
    for bad in (dict(retry_deadline_ms=600_001), dict(retry_deadline_ms=-1),
                dict(backoff_initial_ms=0), dict(backoff_max_ms=5),
                dict(backoff_max_ms=60_001), dict(retry_deadline_ms=True)):
        args = dict(retry_deadline_ms=1_000, backoff_initial_ms=10, backoff_max_ms=100) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            RetryPolicy(**args)


def test_failures_are_sorted_by_what_they_say_about_the_request():
    def frame_error(cls, request_id):
        error = cls("x")
        error.request_id = request_id
        return error
    assert classify(frame_error(NotLeader, 3)) == REFUSED
    assert classify(frame_error(Unavailable, 3)) == REFUSED
    assert classify(frame_error(Busy, 3)) == REFUSED
    assert classify(frame_error(Busy, 0)) == LOST           # too many connections: ended it
    assert classify(frame_error(BadBody, 3)) == FINAL
    assert classify(ConnectionLost("gone")) == LOST
    assert classify(client_module.not_sent("never left")) == NOT_SENT
    assert classify(TimeoutError("no reply")) == LOST
    assert classify(client_module.ProtocolError("broken")) == FINAL
    assert classify(ValueError("bad amount")) == FINAL


def test_the_leader_named_by_not_leader():
    assert leader_from_message("not leader; leader is 127.0.0.1:7412") == "127.0.0.1:7412"
    assert leader_from_message("not leader; leader is [::1]:7412.") == "[::1]:7412"
    assert leader_from_message("leader is h2.example:7411") == "h2.example:7411"
    assert leader_from_message("not leader; leader is unknown") is None
    assert leader_from_message("not leader") is None
    assert leader_from_message("") is None


def test_addresses_from_a_list_or_a_comma_separated_string():
    labels = [a.label for a in parse_addresses("h1:7001, h2 ,h1:7001,[::1]:7003", 7411)]
    assert labels == ["h1:7001", "h2:7411", "[::1]:7003"]
    assert [a.label for a in parse_addresses(["127.0.0.1:1", "2"])] == ["127.0.0.1:1",
                                                                         "127.0.0.1:2"]
    assert parse_addresses("x", unix="/run/scanpay.sock")[0].unix == "/run/scanpay.sock"
    for bad in (",", [], ["h:99999"], [f"h:{i}" for i in range(1, 66)], [7411]):
        with pytest.raises(ValueError):
            parse_addresses(bad)


def test_every_op_is_in_the_docs_table_as_the_client_treats_it():
    """docs/client.md's table says, for every op, whether it is sent again
    after it may have been applied; RESENDABLE is what the client does."""
    text = (Path(ROOT) / "docs" / "client.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| sent again \| (sent again|OutcomeUnknown) \|",
                           text, re.M))
    expected = {name: "sent again" if code in RESENDABLE else "OutcomeUnknown"
                for name, code in OP_CODES.items() if code != OP_EXPIRE}
    assert rows == expected
    assert OP_PAYMENT_CODE not in RESENDABLE and OP_SETTLE not in RESENDABLE


def test_one_address_without_retries_is_the_plain_client(impl):
    with FakeServer() as a, FakeServer() as b:
        async def main():
            for plain in (await AsyncClient.connect("127.0.0.1", a.port),
                          await AsyncClient.connect([at(a)])):
                assert type(plain) is AsyncClient
                plain.close()
            several = await AsyncClient.connect(f"{at(a)},{at(b)}")
            assert isinstance(several, FailoverAsyncClient) and several.address == at(a)
            one = await AsyncClient.connect(at(a), retry_deadline_ms=1_000)
            assert isinstance(one, FailoverAsyncClient)
            for c in (several, one):
                c.close()
                await c.wait_closed()
        run(main())
        assert type(Client.connect("127.0.0.1", a.port)) is Client
        with Client.connect([at(a), at(b)]) as c:
            assert isinstance(c, FailoverClient) and c.address == at(a)


# -- following the leader --------------------------------------------------------------

def test_not_leader_sends_the_client_to_the_leader_it_names(impl):
    """The follower names a leader the client was not given: the client adds
    it, goes there, and what the follower refused is applied there once."""
    with FakeServer() as follower, FakeServer() as leader:
        follower.not_leader, leader.remember = at(leader), True

        async def main():
            async with await AsyncClient.connect([at(follower)], **FAST) as c:
                results = await asyncio.gather(*(
                    c.pay_one(id=i, payer=1, merchant=2, amount=100 + i) for i in range(1, 21)))
                topup = await c.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 5}]})
                assert c.address == at(leader) and c.addresses == [at(follower), at(leader)]
                return results, topup
        results, topup = run(main())
        assert [(r.id, r.cash, r.ok, r.duplicate) for r in results] == [
            (i, 100 + i, True, False) for i in range(1, 21)]
        assert topup["echo"]["topups"][0]["id"] == 1
        assert sorted(pay_ids(leader)) == list(range(1, 21))      # each once, on the leader
        assert ops_received(follower) == [OP_PAY]                  # one coalesced frame refused
        assert ops_received(leader).count(OP_TOPUP) == 1


def test_hello_role_picks_the_leader_among_the_addresses(impl):
    with FakeServer(role="follower") as follower, FakeServer(role="leader") as leader:
        async def main():
            async with await AsyncClient.connect(f"{at(follower)},{at(leader)}", **FAST) as c:
                assert c.address == at(leader) and c.server_info.role == "leader"
                return await c.pay_one(id=5, payer=1, merchant=2, amount=3)
        assert run(main()).ok
        assert follower.received == [] and pay_ids(leader) == [5]
        with Client.connect([at(follower), at(leader)], **FAST) as c:
            assert c.address == at(leader) and c.pay_one(id=6, payer=1, merchant=2, amount=3).ok


def test_a_server_without_role_is_used_until_it_says_not_leader(impl):
    """An older server sends no role: the first that connects is used."""
    with FakeServer() as follower, FakeServer() as leader:
        follower.not_leader = at(leader)
        with Client.connect([at(follower), at(leader)], **FAST) as c:
            assert c.server_info.role == "" and c.address == at(follower)
            assert c.pay_one(id=9, payer=1, merchant=2, amount=4).cash == 4
            assert c.address == at(leader) and c.retries == 1
        assert pay_ids(follower) == [9] and pay_ids(leader) == [9]


def test_a_not_leader_naming_itself_or_no_one_sends_the_client_searching(impl):
    """A stale answer (the follower names itself) or none ("leader is
    unknown" during an election) makes the client try its other addresses
    instead of asking the same server again and again."""
    with FakeServer() as a, FakeServer() as b, FakeServer() as leader:
        a.not_leader, b.not_leader = at(a), "unknown"
        with Client.connect([at(a), at(b), at(leader)], **FAST) as c:
            assert c.pay_one(id=4, payer=1, merchant=2, amount=7).cash == 7
            assert c.address == at(leader) and c.addresses == [at(a), at(b), at(leader)]
        assert (pay_ids(a), pay_ids(b), pay_ids(leader)) == ([4], [4], [4])

        async def main():
            async with await AsyncClient.connect([at(a), at(b), at(leader)], **FAST) as c:
                return (await c.pay_one(id=5, payer=1, merchant=2, amount=8)).cash, c.address
        assert run(main()) == (8, at(leader))
        assert (pay_ids(a), pay_ids(b), pay_ids(leader)) == ([4, 5], [4, 5], [4, 5])


def test_a_pool_over_several_addresses_follows_the_leader(impl):
    with FakeServer() as follower, FakeServer() as leader:
        follower.not_leader = at(leader)

        async def main():
            pool = await client_module.create_pool([at(follower), at(leader)], min_size=2,
                                                   max_size=2, **FAST)

            async def pay(i):
                async with pool.acquire() as conn:
                    return (await conn.pay_one(id=i, payer=1, merchant=2, amount=i)).cash
            try:
                assert await asyncio.gather(*(pay(i) for i in range(1, 41))) == list(range(1, 41))
                assert pool.size == 2 and pool.replaced == 0
            finally:
                await pool.close()
        run(main())
        assert sorted(pay_ids(leader)) == list(range(1, 41))


# -- lost connections ---------------------------------------------------------------------

def test_a_pay_sent_again_after_a_dropped_connection_gets_its_original_result(impl):
    """The server applies the PAY and drops the connection before replying:
    the client reconnects and sends it again, and the server's answer is the
    original result, flagged duplicate."""
    with FakeServer() as server:
        server.remember, server.swallow = True, 1

        async def main():
            async with await AsyncClient.connect(at(server), **FAST) as c:
                return await c.pay_one(id=7, payer=1, merchant=2, amount=250), c.retries
        result, retries = run(main())
        assert (result.id, result.ok, result.cash, result.duplicate) == (7, True, 250, True)
        assert retries == 1 and pay_ids(server) == [7, 7] and server.connections == 2
        server.swallow = 1
        with Client.connect(at(server), **FAST) as c:
            again = c.pay_one(id=8, payer=1, merchant=2, amount=300)
        assert (again.id, again.cash, again.duplicate) == (8, 300, True)


def test_pipelined_requests_on_a_broken_connection_are_resent_or_failed_in_order(impl):
    """Five requests in flight when the connection breaks (all applied, none
    answered): the idempotent ones are sent again in their order, the others
    raise OutcomeUnknown and are not sent again."""
    with FakeServer() as server:
        server.remember, server.swallow = True, 5

        async def main():
            async with await AsyncClient.connect(at(server), **FAST) as c:
                return await asyncio.gather(
                    c.pay(pay_batch(1, start_id=1)),
                    c.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 5}]}),
                    c.call("PAYMENT_CODE", {"user": 1}),
                    c.pay(pay_batch(1, start_id=2)),
                    c.call("SETTLE", {}), return_exceptions=True)
        pay1, topup, code, pay2, settle = run(main())
        assert pay1["id"][0] == 1 and pay1["flags"][0] == 1             # duplicate
        assert pay2["id"][0] == 2 and pay2["flags"][0] == 1
        assert topup == {"echo": {"topups": [{"id": 1, "user": 1, "amount": 5}]}}
        for unknown, op in ((code, OP_PAYMENT_CODE), (settle, OP_SETTLE)):
            assert isinstance(unknown, OutcomeUnknown) and unknown.op == op
            assert "not idempotent, so it was not sent again" in str(unknown)
        assert ops_received(server, 0) == [OP_PAY, OP_TOPUP, OP_PAYMENT_CODE, OP_PAY, OP_SETTLE]
        assert ops_received(server, 1) == [OP_PAY, OP_TOPUP, OP_PAY]    # in their order
        assert pay_ids(server) == [1, 2, 1, 2]


def test_a_request_that_never_left_is_sent_again_whatever_its_op(impl):
    """A frame still in the client's buffer when the connection drops was
    not sent: even PAYMENT_CODE goes again (plain client: ConnectionLost with
    sent False)."""
    with FakeServer() as server:
        async def main():
            async with await AsyncClient.connect("127.0.0.1", server.port) as plain:
                call = asyncio.ensure_future(plain.call("PAYMENT_CODE", {"user": 1}))
                await asyncio.sleep(0)               # queued in this tick, not written yet
                plain._fail(ConnectionLost("dropped"))
                with pytest.raises(ConnectionLost) as lost:
                    await call
                assert lost.value.sent is False and "before the request was sent" in str(lost.value)
            async with await AsyncClient.connect(at(server), **FAST) as c:
                call = asyncio.ensure_future(c.call("PAYMENT_CODE", {"user": 2}))
                await asyncio.sleep(0)
                c._conn._fail(ConnectionLost("dropped"))
                return await call, c.retries
        reply, retries = run(main())
        assert reply == {"echo": {"user": 2}} and retries == 1
        assert ops_received(server) == [OP_PAYMENT_CODE]     # the plain one never left either


def test_an_op_that_is_not_idempotent_is_not_sent_again_when_its_outcome_is_unknown(impl):
    with FakeServer() as server:
        server.swallow = 1

        async def main():
            async with await AsyncClient.connect(at(server), **FAST) as c:
                with pytest.raises(OutcomeUnknown, match="SETTLE may or may not have been"):
                    await c.call("SETTLE", {})
                return await c.call("BALANCES", {"users": [1]})      # the client goes on
        assert run(main()) == {"echo": {"users": [1]}}
        server.swallow = 1
        with Client.connect(at(server), **FAST) as c:
            with pytest.raises(OutcomeUnknown) as unknown:
                c.call("PAYMENT_CODE", {"user": 1})
            assert isinstance(unknown.value.cause, ConnectionLost)
            assert c.call("PING" if False else "BALANCES", {}) == {"echo": {}}
        assert ops_received(server).count(OP_SETTLE) == 1
        assert ops_received(server).count(OP_PAYMENT_CODE) == 1


def test_a_stuck_server_is_left_for_the_next_after_the_timeout(impl):
    """A leader that stops answering (SIGSTOP, a partition) keeps the
    connection open: after timeout_ms the client drops it and tries the
    next address; a PAY goes again, a PAYMENT_CODE's outcome is unknown."""
    with FakeServer() as stuck, FakeServer() as leader:
        stuck.swallow = 10**9                            # applies, never answers
        leader.remember = True

        async def main():
            async with await AsyncClient.connect([at(stuck), at(leader)], timeout_ms=300,
                                                 **FAST) as c:
                assert c.address == at(stuck)
                paid, code = await asyncio.gather(
                    c.pay_one(id=3, payer=1, merchant=2, amount=9),
                    c.call("PAYMENT_CODE", {"user": 1}), return_exceptions=True)
                return paid, code, c.address
        paid, code, address = run(main())
        assert paid.cash == 9 and address == at(leader)
        assert isinstance(code, OutcomeUnknown) and isinstance(code.cause, TimeoutError)
        assert pay_ids(stuck) == [3] and pay_ids(leader) == [3]
        assert OP_PAYMENT_CODE not in ops_received(leader)


# -- refusals, and giving up ---------------------------------------------------------------

def test_unavailable_and_busy_are_sent_again_even_for_an_op_that_is_not_idempotent(impl):
    """They mean nothing was applied (protocol.md), so any op goes again."""
    with FakeServer() as server:
        server.unavailable = 3

        async def main():
            async with await AsyncClient.connect(at(server), **FAST) as c:
                return await c.call("SETTLE", {}), c.retries
        assert run(main()) == ({"echo": {}}, 3)
        server.unavailable = 2
        with Client.connect(at(server), **FAST) as c:
            assert c.call("PAYMENT_CODE", {"user": 1}) == {"echo": {"user": 1}}
        assert ops_received(server) == [OP_SETTLE] * 4 + [OP_PAYMENT_CODE] * 3


def test_the_client_gives_up_at_the_deadline_with_a_clear_error(impl):
    with FakeServer() as server:
        server.unavailable = 10**9
        settings = dict(retry_deadline_ms=300, backoff_initial_ms=10, backoff_max_ms=40)

        async def main():
            async with await AsyncClient.connect(at(server), **settings) as c:
                started = time.monotonic()
                with pytest.raises(RetryDeadlineExceeded) as gave_up:
                    await c.pay_one(id=1, payer=1, merchant=2, amount=3)
                return gave_up.value, time.monotonic() - started
        error, elapsed_s = run(main())
        assert 0.3 <= elapsed_s < 10                      # at the deadline, not forever
        assert isinstance(error.last_error, Unavailable) and error.op == OP_PAY
        assert error.attempts == len(server.received) > 2
        assert str(error).startswith("PAY not done within retry_deadline_ms=300 (")
        assert "last error: Unavailable: fake unavailable" in str(error)
        with Client.connect(at(server), **settings) as c:
            with pytest.raises(RetryDeadlineExceeded, match="last error: Unavailable"):
                c.call("TOPUP", {"topups": []})


def test_no_server_reachable_gives_up_at_the_deadline_naming_the_last_one(impl):
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    settings = dict(retry_deadline_ms=200, backoff_initial_ms=10, backoff_max_ms=40)
    with pytest.raises(RetryDeadlineExceeded, match="ConnectionRefusedError"):
        run(AsyncClient.connect(dead, **settings))
    with pytest.raises(RetryDeadlineExceeded, match=re.escape(dead[1]) + ": ConnectionRefused"):
        Client.connect(dead, **settings)


def test_an_error_no_retry_cures_is_raised_at_once(impl):
    with FakeServer(keys={"gw-1": "a-secret-of-sixteen+"}) as server:
        with pytest.raises(client_module.NotAuthenticated):
            run(AsyncClient.connect([at(server)], key_id="gw-1", secret="wrong-secret-000",
                                    **FAST))
        with pytest.raises(client_module.NotAuthenticated):
            Client.connect([at(server)], key_id="gw-1", secret="wrong-secret-000", **FAST)

        async def main():
            async with await AsyncClient.connect([at(server)], key_id="gw-1",
                                                 secret="a-secret-of-sixteen+", **FAST) as c:
                with pytest.raises(ValueError, match="amount"):
                    await c.pay_one(id=1, payer=1, merchant=2, amount=1.5)
                with pytest.raises(client_module.UnknownOp):
                    await c.call(99, {})
                return c.retries
        assert run(main()) == 0


# -- the twins ---------------------------------------------------------------------------

def failover_scenario():
    """A follower naming the leader, a connection dropped under a pipeline
    of pay_one calls after they were applied, then a stuck moment of
    unavailable: what the callers got and what the servers saw."""
    with FakeServer() as follower, FakeServer() as leader:
        follower.not_leader, leader.remember = at(leader), True

        async def main():
            async with await AsyncClient.connect([at(follower)], **FAST) as c:
                first = await asyncio.gather(*(
                    c.pay_one(id=i, payer=1, merchant=2, amount=i, coupons=iter([i])) for i in range(1, 9)))
                leader.swallow = 2
                second = await asyncio.gather(
                    c.pay(pay_batch(3, start_id=20)), c.issue_one(coupon=5, stock=1, user=1),
                    c.pay_one(id=1, payer=1, merchant=2, amount=1, coupons=[1]))
                leader.unavailable = 2
                third = await c.issue_one(coupon=5, stock=1, user=1)
                return first, second, third, c.retries
        first, second, third, retries = run(main())
        rows = msgspec.structs.astuple
        return ([rows(r) for r in first], second[0].tobytes(), rows(second[1]), rows(second[2]),
                rows(third), retries, follower.received, leader.received)


def test_the_compiled_and_the_python_hot_paths_fail_over_alike():
    outcomes = {}
    for name in sorted(client_module.IMPLEMENTATIONS):
        before = client_module.use_implementation(name)
        try:
            outcomes[name] = failover_scenario()
        finally:
            client_module.use_implementation(before)
    first = outcomes["python"]
    assert [r[:3] for r in first[0]] == [(i, 0, 0) for i in range(1, 9)]
    resent = np.frombuffer(first[7][0][2], client_module.PAY_RECORD)   # on the leader
    assert resent["coupons"][:, 0].tolist() == list(range(1, 9))   # given as iterators
    assert np.frombuffer(first[1], PAY_RESULT)["flags"].tolist() == [1, 1, 1]   # duplicates
    # the ISSUE frame came after the two the server swallowed: applied once, then again
    assert first[2][:3] == (5, 0, 0) and first[3][:3] == (1, 0, 1) and first[4][:3] == (5, 0, 1)
    # 8 not_leader, 3 lost, 2 unavailable; after the drop the search starts
    # after the leader, at the follower, whose not_leader sends 3 more back
    assert first[5] == 8 + 3 + 3 + 2
    assert all(outcome == first for outcome in outcomes.values()), outcomes.keys()


# -- a real server, restarted -------------------------------------------------------------

def restart(listen, data, running):
    """Stop the server (it answers what it applied and closes every
    connection) and start a new one on the same port from the same data."""
    running[0].__exit__(None, None, None)
    running[0] = RealServer(engine=Engine(data), listen=listen).__enter__()


def test_a_real_server_restarted_under_a_pipeline_applies_every_pay_exactly_once(impl, tmp_path):
    """24 callers keep pay_one calls in flight while the server restarts
    (from its journal, on the same port) and, later, while the connection is
    cut under them: every payment ends ok, with its own figures, and is in
    the ledger once (a retry of one that was applied is its duplicate)."""
    payments, workers = 1_200, 24
    listen, data = f"127.0.0.1:{free_port()}", str(tmp_path / "data")
    running = [RealServer(engine=Engine(data), listen=listen).__enter__()]
    amounts = {10_000 + i: 100 + i for i in range(payments)}
    try:
        results, balances, retries = run(pay_through_a_restart(listen, data, running, amounts,
                                                               workers))
        assert sorted(results) == sorted(amounts) and retries > 0
        for i, r in results.items():
            assert (r.id, r.status, r.cash, r.discount) == (i, 0, amounts[i], 0), r
        assert balances["users"][0]["balance"] == 10**9 - sum(amounts.values())   # once each
        assert balances["merchants"][0]["balance"] == sum(amounts.values())
        assert running[0].engine.counts()["payments"] == payments
    finally:
        running[0].__exit__(None, None, None)


async def pay_through_a_restart(listen, data, running, amounts, workers):
    async with await AsyncClient.connect(listen, retry_deadline_ms=20_000,
                                         backoff_initial_ms=20, backoff_max_ms=200) as c:
        await setup_world(c)
        ids, results = iter(amounts), {}

        async def pay():
            for i in ids:                    # shared: each id is paid by one worker
                results[i] = await c.pay_one(id=i, payer=1, merchant=2, amount=amounts[i])

        async def when_paid(share):
            for _ in range(10_000):
                if len(results) >= len(amounts) * share:
                    return
                await asyncio.sleep(0.002)

        async def break_things():
            await when_paid(0.25)
            await asyncio.get_running_loop().run_in_executor(None, restart, listen, data,
                                                             running)
            await when_paid(0.6)
            c._conn._transport.abort()       # the connection cut with calls in flight
        await asyncio.gather(*(pay() for _ in range(workers)), break_things())
        balances = await c.call("BALANCES", {"users": [1], "merchants": [2]})
        return results, balances, c.retries
