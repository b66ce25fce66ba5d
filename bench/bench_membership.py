"""PAY with membership and every campaign control on, against PAY without
them, side by side in one run (issue 6's target: >= 70 %).

    .venv/bin/python -m pytest bench/ --benchmark-only -p no:cacheprovider -k membership

The world is the standard one at SCANPAY_MEMBERSHIP_USERS users (default
200,000, to keep the two builds short). "Full": a points program and a stamp
card covering every merchant, and on every stock a daily budget, a per-user
daily limit and slots covering the whole week (so controls are checked on
every candidate but admit as before). "Plain": the same world without them.
Rounds alternate plain/full so that both see the same machine load, and
which goes first alternates too; the figure is the median of the per-round
ratios (one noisy round moves it little), next to the ratio of the totals.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np

import engine.demo.world as world
from engine.protocol.records import PAY_RESULT
from engine.protocol.status import Status
from engine.demo.world import BATCH_RECORDS_MAX, World, build, pay_batches

from _common import SUMMARY, load, machine

USERS = int(os.environ.get("SCANPAY_MEMBERSHIP_USERS", "200000"))
BATCHES = 60
ROUNDS = 9                   # odd: the median round ratio is one round's
TARGET_SHARE = 0.70
WHOLE_WEEK = [[day, 0, 1440] for day in range(7)]


def with_controls(make_stocks):
    def stocks(*args, **kwargs):
        names, defs, weights = make_stocks(*args, **kwargs)
        for d in defs:
            d.update(daily_budget=2**61, per_user_daily_limit=1000, slots=WHOLE_WEEK)
        return names, defs, weights
    return stocks


def world_engine(full: bool, controls: bool | None = None, programs: int | None = None):
    """The standard world at USERS users; `full` turns on the controls and
    both programs, or `controls` and the first `programs` programs apart."""
    from engine import Engine
    controls = full if controls is None else controls
    programs = (2 if full else 0) if programs is None else programs
    spec = World.standard()
    spec = type(spec)(**{**spec.__dict__, "users": USERS})
    eng = Engine(clock=lambda: 1_700_000_000_000,
                 capacity={"users": USERS,
                           # 3 coupons a user, and room for the stamp card's
                           # rewards (at most one per 10 payments)
                           "coupons": 3 * USERS + ROUNDS * BATCHES * BATCH_RECORDS_MAX // 10,
                           "payments": 2 * ROUNDS * BATCHES * BATCH_RECORDS_MAX,
                           "visits": ROUNDS * BATCHES * BATCH_RECORDS_MAX,
                           # Sized as an operator with two programs would: a
                           # membership per user and program, an earning per
                           # payment and program.
                           "memberships": 2 * USERS,
                           "earnings": 2 * ROUNDS * BATCHES * BATCH_RECORDS_MAX})
    original = world._standard_stocks
    if controls:
        world._standard_stocks = with_controls(original)
    try:
        info = build(eng, spec)
    finally:
        world._standard_stocks = original
    if programs:
        # The card's reward: a small platform coupon good anywhere, so rewards
        # are redeemed as they would be, not hoarded by the heaviest payers.
        reward = 2**40
        eng.call("STOCKS", {"stocks": [{
            "id": reward, "funder": "platform", "kind": "fixed", "value": 100,
            "valid_from": 0, "valid_until": 2**62, "stacking": "stackable"}]})
        reply = eng.call("PROGRAMS", {"programs": [
            {"id": 1, "kind": "points", "rate": 5},
            {"id": 2, "kind": "stamps", "threshold": 1000, "stamps": 10,
             "reward_stock": reward}][:programs]})
        assert all(r["status"] == Status.ok for r in reply["results"]), reply
    return eng, info


def test_membership_and_controls_keep_the_pay_rate(benchmark):
    plain, plain_info = world_engine(False)
    full, full_info = world_engine(True)
    # As the server does after start-up: the worlds' Python objects stay out
    # of full collections, which would otherwise land inside timed rounds.
    gc.collect()
    gc.freeze()
    out = np.empty(BATCH_RECORDS_MAX, PAY_RESULT)
    seconds = {"plain": 0.0, "full": 0.0}
    cpu = {"plain": 0.0, "full": 0.0}
    round_shares = []

    def one_round(k: int) -> None:
        pair = [("plain", (plain, plain_info)), ("full", (full, full_info))]
        this_round = {}
        for name, (eng, info) in pair if k % 2 == 0 else pair[::-1]:
            batches = list(pay_batches(info, BATCHES, seed=100 + k,
                                       start_payment_id=1 + k * BATCHES * BATCH_RECORDS_MAX))
            started, started_cpu = time.perf_counter(), time.thread_time()
            for batch in batches:
                eng.kernel_pay(batch, info.now_ms, out)
            this_round[name] = time.perf_counter() - started
            seconds[name] += this_round[name]
            cpu[name] += time.thread_time() - started_cpu
        round_shares.append(this_round["plain"] / this_round["full"])

    rounds = iter(range(ROUNDS))
    benchmark.pedantic(lambda: one_round(next(rounds)), rounds=ROUNDS, iterations=1)
    payments = ROUNDS * BATCHES * BATCH_RECORDS_MAX
    rate = {k: payments / v for k, v in seconds.items()}
    rate_cpu = {k: payments / v for k, v in cpu.items()}
    share_total, share_cpu = rate["full"] / rate["plain"], rate_cpu["full"] / rate_cpu["plain"]
    share = statistics.median(round_shares)
    stats = full.call("STATS", {"merchants": [int(full_info.merchant_ids[0])]})["merchants"][0]
    assert stats["payments"] > 0 and full.audit()["ok"] and plain.audit()["ok"]
    benchmark.extra_info.update(plain_per_second=rate["plain"], full_per_second=rate["full"],
                                share=share, share_of_totals=share_total,
                                share_per_round=round_shares, share_per_cpu_second=share_cpu,
                                target_share=TARGET_SHARE, users=USERS, machine=machine(),
                                load=load())
    SUMMARY["PAY with membership + controls"] = (
        f"{rate['full']:,.0f}/s vs {rate['plain']:,.0f}/s plain: {share:.0%} median of "
        f"{ROUNDS} rounds ({min(round_shares):.0%}-{max(round_shares):.0%}; totals "
        f"{share_total:.0%}, {share_cpu:.0%} per CPU-s; target {TARGET_SHARE:.0%}); {load()}")


PART_BATCHES = 50
PART_ROUNDS = 3
PARTS = {"plain": (False, 0), "controls": (True, 0), "points": (False, 1),
         "points + stamps": (False, 2), "everything": (True, 2)}


def test_membership_cost_by_part(benchmark):
    """Which part costs: each of the controls, one program, two programs,
    and all of them, against plain, rounds interleaved in one process."""
    engines = {name: world_engine(False, controls, programs)
               for name, (controls, programs) in PARTS.items()}
    gc.collect()
    gc.freeze()
    out = np.empty(BATCH_RECORDS_MAX, PAY_RESULT)
    cpu = dict.fromkeys(PARTS, 0.0)

    def rounds():
        for k in range(PART_ROUNDS):
            for name, (eng, info) in engines.items():
                batches = list(pay_batches(info, PART_BATCHES, seed=300 + k, start_payment_id=1
                                           + k * PART_BATCHES * BATCH_RECORDS_MAX))
                started = time.thread_time()
                for batch in batches:
                    eng.kernel_pay(batch, info.now_ms, out)
                cpu[name] += time.thread_time() - started

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    payments = PART_ROUNDS * PART_BATCHES * BATCH_RECORDS_MAX
    rate = {name: payments / seconds for name, seconds in cpu.items()}
    benchmark.extra_info.update(per_cpu_second=rate, machine=machine(), load=load())
    SUMMARY["PAY by membership part"] = ", ".join(
        f"{name} {r / 1e6:.2f} M/s ({r / rate['plain']:.0%})" for name, r in rate.items()
    ) + f" per CPU-s; {load()}"
