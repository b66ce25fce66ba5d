"""The peers benchmark (bench/peers/) stays honest: its rule subset, run by
the naive ledger and by SQLite, ends in exactly Scanpay's state, and a peer
that ends anywhere else is refused with a diff. (Servers are not started
here: PostgreSQL and Redis are checked by the benchmark itself.)"""
import dataclasses
import sys
import time

import pytest

from support import ROOT  # noqa: E402
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.peers import ledger, scanpay_peer, sqlite_peer  # noqa: E402
from bench.peers.__main__ import Mismatch, check  # noqa: E402
from bench.peers.workload import OUTCOMES, Workload, generate, tally  # noqa: E402

CLOCK = time.perf_counter


@pytest.fixture(scope="module")
def wl() -> Workload:
    return generate(3, users=300, merchants=20, payments=600, shards=4)


@pytest.fixture(scope="module")
def oracle(wl):
    return scanpay_peer.embedded(wl, wl.payments, batched=True, path=None, clock=CLOCK).state


def test_the_workload_exercises_every_outcome_and_coupons(oracle, wl):
    assert all(oracle.outcomes[name] > 0 for name in OUTCOMES), oracle.outcomes
    assert len(oracle.used) > 50
    # Budgets that run out: some stock has less left than its coupons' discount.
    assert any(s.budget - oracle.spent[s.id] < 2_000 for s in wl.stocks.values())


def test_naive_ledger_and_scanpay_one_at_a_time_end_in_the_batched_state(oracle, wl):
    runs = []
    check(ledger.run(wl, wl.payments, CLOCK), oracle, runs)
    check(scanpay_peer.embedded(wl, wl.payments, batched=False, path=None, clock=CLOCK),
          oracle, runs)
    assert [r.state.digest() for r in runs] == [oracle.digest()] * 2


def test_sqlite_with_many_callers_and_one_ends_in_scanpays_state(oracle, wl, tmp_path):
    runs = []
    check(sqlite_peer.run(str(tmp_path), wl, wl.payments, callers=4, clock=CLOCK), oracle, runs)
    prefix = wl.payments[:150]
    expected = scanpay_peer.embedded(wl, prefix, batched=True, path=None, clock=CLOCK).state
    check(sqlite_peer.run(str(tmp_path), wl, prefix, callers=1, clock=CLOCK), expected, runs)
    assert expected.digest() != oracle.digest()


def test_shards_run_one_after_another_end_in_the_same_state(oracle, wl):
    """The premise that lets callers run concurrently: any interleaving that
    keeps each shard's order ends in one state."""
    reordered = [p for lane in reversed(wl.lanes(wl.shards)) for p in lane]
    assert reordered != wl.payments
    assert ledger.run(wl, reordered, CLOCK).state.digest() == oracle.digest()


def test_a_peer_in_another_state_is_refused_with_the_difference(oracle, wl):
    run = ledger.run(wl, wl.payments, CLOCK)
    user = min(run.state.users)
    run.state = dataclasses.replace(run.state, users={**run.state.users,
                                                      user: run.state.users[user] + 1})
    runs = []
    with pytest.raises(Mismatch) as refused:
        check(run, oracle, runs)
    assert f"- user {user} {oracle.users[user]}" in str(refused.value)
    assert f"+ user {user} {oracle.users[user] + 1}" in str(refused.value)
    assert runs == []


def test_in_turns_each_peer_pays_every_payment_in_blocks_and_ends_in_scanpays_state(
        wl, tmp_path):
    """bench/peers/turns.py: one caller alternates blocks between the peers
    (here the naive ledger and SQLite, in process), each in payment order."""
    import asyncio
    import threading
    from bench.peers.turns import blocking_payer, in_turns
    prefix = wl.payments[:250]
    expected = scanpay_peer.embedded(wl, prefix, batched=True, path=None, clock=CLOCK).state
    book = ledger.Ledger(wl)
    db = str(tmp_path / "turns.db")
    sqlite_peer.setup(db, wl)
    conn = sqlite_peer.connect(db)
    calls = []

    def logged(name, pay):
        async def pay_k(k):
            calls.append((name, k))
            return await pay(k)
        return pay_k
    out = asyncio.run(in_turns({
        "ledger": logged("ledger", blocking_payer(book.pay, prefix)),
        "sqlite": logged("sqlite", blocking_payer(sqlite_peer.payer(conn, threading.Lock()),
                                                  prefix))}, len(prefix), 100))
    runs = [book.final_state(tally(out["ledger"][0])),
            sqlite_peer.final_state(conn, tally(out["sqlite"][0]))]
    assert [s.digest() for s in runs] == [expected.digest()] * 2
    assert [len(out[n][1]) for n in ("ledger", "sqlite")] == [250, 250]
    # Blocks of 100, 100 and 50 payments: in each, one peer's whole block, then the other's.
    for lo, size in ((0, 100), (100, 100), (200, 50)):
        at = 2 * lo
        halves = [calls[at:at + size], calls[at + size:at + 2 * size]]
        assert {h[0][0] for h in halves} == {"ledger", "sqlite"}
        for half in halves:
            assert len({name for name, _ in half}) == 1
            assert [k for _, k in half] == list(range(lo, lo + size))
