"""Precision marketing (issue 18) on the standard world: segment evaluation,
campaign issuance and LIFT over 1M users and 10M payments, and PAY with
campaigns and segments against PAY without them, side by side.

    .venv/bin/python -m pytest bench/ --benchmark-only -p no:cacheprovider -k marketing

- PAY side by side: two engines of the standard world at
  SCANPAY_MARKETING_PAY_USERS users (default 200,000). "Marketed" has 64
  saved segments and four campaigns with a 10 % holdout; "plain" has none,
  but holds exactly the coupons the campaigns issued (ISSUE of the same ids,
  stocks and users), so the two differ only by what marketing keeps. Rounds
  alternate which engine goes first; the figure is the median of the
  per-round ratios. Every round's results must be byte-identical.
- The standard world (1M users) with SCANPAY_MARKETING_PAYMENTS payments
  (default 10,000,000) spread over 90 days of engine time: SEGMENT (count
  only) for four definitions, CAMPAIGNS to the largest one (a fresh stock
  and coupon range per round), LIFT of that campaign.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np

from engine.demo.world import (BATCH_RECORDS_MAX, MALL_TAG_BASE, World, build, capacity_for,
                               pay_batches)
from engine.protocol.records import ISSUE_RECORD, PAY_RESULT
from engine.protocol.status import Status

from _common import SUMMARY, load, machine, rss_bytes

DAY_MS = 86_400_000
HISTORY_DAYS = 90
PAYMENTS = int(os.environ.get("SCANPAY_MARKETING_PAYMENTS", "10000000"))
PAY_USERS = int(os.environ.get("SCANPAY_MARKETING_PAY_USERS", "200000"))
PAY_BATCHES = 60
PAY_ROUNDS = 9                          # odd: the median round ratio is one round's
SAVED_SEGMENTS = 64
SEGMENT_ROUNDS = 5
CAMPAIGN_ROUNDS = 3
LIFT_BATCHES = 20                       # payments after the campaigns, before LIFT
MALL = MALL_TAG_BASE                    # the first mall's tag
SEGMENTS = {
    "lapsed mall regulars": {"tags": [MALL], "days": HISTORY_DAYS, "payments_min": 3,
                             "recency_days_min": 30},
    "new to the mall": {"tags": [MALL], "never_paid": True},
    "high spenders": {"days": HISTORY_DAYS, "gmv_min": 500_000},
    "active this week": {"days": 7, "payments_min": 1},
}


class Clock:
    def __init__(self, now_ms: int):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def stock(stock_id: int, name: str) -> dict:
    return {"id": stock_id, "funder": "platform", "kind": "fixed", "value": 500,
            "min_spend": 3000, "valid_from": 0, "valid_until": 2**62,
            "stacking": "stackable", "budget": 10**12, "name": name}


def engine_with_history(users: int, payments: int, more_payments: int):
    """The standard world at `users` users, then `payments` payments over
    HISTORY_DAYS days of engine time (the clock moves between batches), with
    room for `more_payments` (sized exactly: 10M payments take 4 GB)."""
    from engine import Engine
    spec = World.standard()
    spec = type(spec)(**{**spec.__dict__, "users": users})
    clock = Clock(spec.now_ms)
    eng = Engine(clock=clock, capacity=capacity_for(spec, payments + more_payments))
    info = build(eng, spec)
    batches = max(1, payments // BATCH_RECORDS_MAX)
    step_ms = HISTORY_DAYS * DAY_MS // batches
    for batch in pay_batches(info, batches, seed=18):
        clock.now_ms += step_ms
        eng.pay(batch)
    return eng, info, clock


# ---------------------------------------------------------------------------
# PAY with and without marketing state
# ---------------------------------------------------------------------------

def marketed_pair():
    """(plain, marketed, info): the same world and history; the marketed
    engine with saved segments and campaigns, the plain one with the same
    coupons issued by ISSUE."""
    timed = PAY_ROUNDS * PAY_BATCHES * BATCH_RECORDS_MAX
    plain, info, plain_clock = engine_with_history(PAY_USERS, PAY_USERS * 10, timed)
    marketed, _, clock = engine_with_history(PAY_USERS, PAY_USERS * 10, timed)
    assert plain.digest() == marketed.digest()
    stocks = [stock(2**50 + k, f"win back {k}") for k in range(4)]
    for eng in (plain, marketed):
        assert all(r["status"] == Status.ok for r in eng.call("STOCKS", {"stocks": stocks})["results"])
    definitions = list(SEGMENTS.values())
    marketed.call("SEGMENTS", {"segments": [
        {"id": i + 1, "name": f"segment {i + 1}", **definitions[i % len(definitions)]}
        for i in range(SAVED_SEGMENTS)]})
    reply = marketed.call("CAMPAIGNS", {"campaigns": [
        {"id": k + 1, "segment": k + 1, "stock": s["id"], "holdout_bps": 1000,
         "coupon_base": 2**60 + k * 2**32} for k, s in enumerate(stocks)]})
    assert all(r["status"] == Status.ok for r in reply["results"]), reply
    assert sum(r["issued"] for r in reply["results"]) > 0, reply
    rows = marketed.canonical()["campaign_members"]
    coupons = marketed.canonical()["coupons"]
    issued = coupons[coupons["id"] >= 2**60]
    plain_clock.now_ms = clock.now_ms
    for lo in range(0, len(issued), BATCH_RECORDS_MAX):
        part = issued[lo:lo + BATCH_RECORDS_MAX]
        records = np.zeros(len(part), ISSUE_RECORD)
        records["coupon"], records["stock"], records["user"] = part["id"], part["stock"], part["user"]
        assert (plain.issue(records)["status"] == Status.ok).all()
    assert len(rows) > 0
    return plain, marketed, info, len(issued)


def test_campaigns_and_segments_keep_the_pay_rate(benchmark):
    plain, marketed, info, coupons = marketed_pair()
    gc.collect()
    gc.freeze()
    outs = {"plain": np.empty(BATCH_RECORDS_MAX, PAY_RESULT),
            "marketed": np.empty(BATCH_RECORDS_MAX, PAY_RESULT)}
    seconds = {"plain": 0.0, "marketed": 0.0}
    shares = []
    now = marketed.state.now

    def one_round(k: int) -> None:
        pair = [("plain", plain), ("marketed", marketed)]
        batches = list(pay_batches(info, PAY_BATCHES, seed=1000 + k, start_payment_id=2**40
                                   + k * PAY_BATCHES * BATCH_RECORDS_MAX))
        took = dict.fromkeys(outs, 0.0)
        for batch in batches:
            for name, eng in pair if k % 2 == 0 else pair[::-1]:
                started = time.perf_counter()
                eng.kernel_pay(batch, now, outs[name])
                took[name] += time.perf_counter() - started
            assert np.array_equal(outs["plain"], outs["marketed"])
        for name in seconds:
            seconds[name] += took[name]
        shares.append(took["plain"] / took["marketed"])

    rounds = iter(range(PAY_ROUNDS))
    benchmark.pedantic(lambda: one_round(next(rounds)), rounds=PAY_ROUNDS, iterations=1)
    payments = PAY_ROUNDS * PAY_BATCHES * BATCH_RECORDS_MAX
    rate = {k: payments / v for k, v in seconds.items()}
    share = statistics.median(shares)
    benchmark.extra_info.update(plain_per_second=rate["plain"], marketed_per_second=rate["marketed"],
                                share=share, share_per_round=shares, campaign_coupons=coupons,
                                users=PAY_USERS, machine=machine(), load=load())
    SUMMARY["PAY with campaigns + segments"] = (
        f"{rate['marketed']:,.0f}/s vs {rate['plain']:,.0f}/s without: {share:.0%} median of "
        f"{PAY_ROUNDS} rounds ({min(shares):.0%}-{max(shares):.0%}), {coupons:,} campaign "
        f"coupons, {SAVED_SEGMENTS} segments, identical results; {load()}")


# ---------------------------------------------------------------------------
# Segments, campaigns and lift over 1M users and 10M payments
# ---------------------------------------------------------------------------

_BIG: dict = {}


def big_world():
    if not _BIG:
        started = time.perf_counter()
        eng, info, clock = engine_with_history(World.standard().users, PAYMENTS,
                                               LIFT_BATCHES * BATCH_RECORDS_MAX)
        _BIG.update(engine=eng, info=info, clock=clock,
                    build_seconds=time.perf_counter() - started)
        eng.call("SEGMENTS", {"segments": [{"id": i + 1, "name": name, **d}
                                           for i, (name, d) in enumerate(SEGMENTS.items())]})
    return _BIG


def test_segment_evaluation_over_1m_users_and_10m_payments(benchmark):
    world = big_world()
    eng = world["engine"]
    figures = {}

    def evaluate_all():
        for i, name in enumerate(SEGMENTS):
            started = time.perf_counter()
            reply = eng.call("SEGMENT", {"id": i + 1})
            figures.setdefault(name, []).append(time.perf_counter() - started)
            assert reply["status"] == Status.ok
            figures[name + " count"] = [reply["count"]]

    benchmark.pedantic(evaluate_all, rounds=SEGMENT_ROUNDS, iterations=1)
    medians = {name: statistics.median(figures[name]) for name in SEGMENTS}
    counts = {name: figures[name + " count"][0] for name in SEGMENTS}
    benchmark.extra_info.update(seconds=medians, counts=counts, users=eng.counts()["users"],
                                payments=eng.counts()["payments"], machine=machine(), load=load())
    SUMMARY["SEGMENT over 1M users"] = (
        f"{eng.counts()['payments']:,} payments: " + ", ".join(
            f"{name} {counts[name]:,} users in {medians[name] * 1000:.0f} ms"
            for name in SEGMENTS) + f" (median of {SEGMENT_ROUNDS}); {load()}")


def test_campaign_issuance_over_1m_users(benchmark):
    world = big_world()
    eng = world["engine"]
    results, seconds = [], []

    def one_campaign(k: int) -> None:
        stock_id = 2**50 + 100 + k
        assert eng.call("STOCKS", {"stocks": [stock(stock_id, f"welcome {k}")]})[
            "results"][0]["status"] == Status.ok
        started = time.perf_counter()
        reply = eng.call("CAMPAIGNS", {"campaigns": [
            {"id": 100 + k, "segment": 2, "stock": stock_id, "holdout_bps": 1000,
             "coupon_base": 2**61 + k * 2**32, "name": f"welcome {k}"}]})["results"][0]
        seconds.append(time.perf_counter() - started)
        assert reply["status"] == Status.ok and reply["issued"] == reply["treated"], reply
        results.append(reply)

    rounds = iter(range(CAMPAIGN_ROUNDS))
    benchmark.pedantic(lambda: one_campaign(next(rounds)), rounds=CAMPAIGN_ROUNDS, iterations=1)
    median = statistics.median(seconds)
    issued = results[0]["issued"]
    benchmark.extra_info.update(seconds=seconds, issued=issued, size=results[0]["size"],
                                coupons_per_second=issued / median, machine=machine(), load=load())
    SUMMARY["CAMPAIGNS over 1M users"] = (
        f"segment of {results[0]['size']:,}, {issued:,} coupons issued, "
        f"{results[0]['holdout']:,} held out: {median:.2f} s (median of {CAMPAIGN_ROUNDS}; "
        f"{issued / median:,.0f} coupons/s, segment evaluation included); {load()}")


def test_lift_over_1m_users(benchmark):
    world = big_world()
    eng, info, clock = world["engine"], world["info"], world["clock"]
    if not eng.state.campaigns:             # run alone: one campaign to measure
        eng.call("STOCKS", {"stocks": [stock(2**50 + 99, "welcome")]})
        eng.call("CAMPAIGNS", {"campaigns": [{"id": 99, "segment": 2, "stock": 2**50 + 99,
                                              "holdout_bps": 1000, "coupon_base": 2**62}]})
    for batch in pay_batches(info, LIFT_BATCHES, seed=19, start_payment_id=2**41):
        clock.now_ms += DAY_MS // LIFT_BATCHES
        eng.pay(batch)
    campaign = min(eng.state.campaigns)
    seconds = []

    def measure():
        started = time.perf_counter()
        reply = eng.call("LIFT", {"campaign": campaign})
        seconds.append(time.perf_counter() - started)
        assert reply["status"] == Status.ok, reply
        return reply

    benchmark.pedantic(measure, rounds=3, iterations=1)
    reply = measure()
    median = statistics.median(seconds)
    benchmark.extra_info.update(seconds=seconds, treated=reply["treated"]["users"],
                                redeemed=reply["redeemed"], machine=machine(), load=load(),
                                rss_bytes=rss_bytes()[0])
    SUMMARY["LIFT over 1M users"] = (
        f"{reply['treated']['users'] + reply['holdout']['users']:,} members, "
        f"{eng.counts()['payments']:,} payments: {median:.2f} s (median of 3); "
        f"conversion {reply['conversion']['diff_ppm']} ppm, {reply['conversion']['reason']}; "
        f"{load()}")
