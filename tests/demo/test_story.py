"""The demo's story (engine/demo/shoppers.py, story.py): two targeted
campaigns with a holdout, and a verdict measured by LIFT from payments a
behaviour model made, through the ordinary PAY path."""
import numpy as np

from engine import Engine
from engine.cli import report
from engine.demo import shoppers as behaviour, story
from engine.demo.world import DEMO_START_MS, World, build, issue_coupons
from engine.protocol.status import Status
from support.clock import Clock
from support.keys import Keys

WEEKEND_MS = 36 * 3_600_000


def weekend_campaigns(users: int, seed: int = 7, key_seed: int = 1):
    """A demo world of `users` shoppers, its eight weeks of mall visits, the
    campaigns on Saturday 09:00 and the weekend's mall visits (no other
    traffic). The holdout draw takes its keys from `key_seed`, so the groups
    are the same on every run. Returns (engine, info, shoppers, launched,
    redeemed seen)."""
    clock = Clock(behaviour.history_start(DEMO_START_MS))
    eng = Engine(clock=clock, key_source=Keys(key_seed))
    info = build(eng, World.demo(seed=seed, users=users), issue=False)
    shop = behaviour.shoppers(info, clock.now_ms, DEMO_START_MS)
    paid = 0
    for now, batch in behaviour.stream(info, shop, 1, 0, clock.now_ms, DEMO_START_MS, 1, 112):
        clock.now_ms = now
        # (No top-ups here: a shopper whose wallet ran dry stays dry.)
        assert set(eng.pay(batch)["status"].tolist()) <= {Status.ok, Status.insufficient_funds}
        paid += len(batch)
    clock.now_ms = DEMO_START_MS
    issue_coupons(eng, info)
    launched = story.launch(eng, info, shop, DEMO_START_MS)
    ranges = [r for r, _ in launched]
    redeemed = 0
    for now, batch in behaviour.stream(info, shop, 2, 0, DEMO_START_MS, DEMO_START_MS + WEEKEND_MS,
                                       paid + 1, 36):
        clock.now_ms = now
        results = eng.pay(batch)
        applied = results["coupons"]
        redeemed += sum(int(((applied >= first) & (applied <= last)).sum())
                        for first, last in ranges)
        shop.redeemed(info, batch, results, ranges)
    return eng, info, shop, launched, redeemed


def test_the_campaigns_exist_with_holdouts_and_lift_answers_for_both():
    eng, info, shop, launched, redeemed = weekend_campaigns(users=3_000)
    assert [r["status"] for _, r in launched] == [0, 0]
    issued = 0
    for t, ((first, last), r) in zip(story.TARGETED, launched):
        assert r["holdout"] > 0 and r["treated"] > 0 and r["issued"] == r["treated"]
        assert last - first + 1 == r["size"]
        lift = eng.call("LIFT", {"campaign": t.campaign})
        assert lift["status"] == 0 and lift["name"] == t.name
        assert lift["holdout"]["users"] == r["holdout"] and lift["treated"]["users"] == r["treated"]
        issued += r["issued"]
    # Each shopper holds its coupon until a reply shows it applied.
    lifts = [eng.call("LIFT", {"campaign": t.campaign}) for t in story.TARGETED]
    assert redeemed == sum(x["redeemed"] for x in lifts) > 0
    assert int(shop.holding.sum()) == issued - redeemed
    names = [s["name"] for s in eng.call("STATS", {"stocks": [101, 102]})["stocks"]]
    assert names == [t.stock_name for t in story.TARGETED]


def test_a_coupon_pulls_a_shopper_by_how_well_it_knows_the_mall():
    eng, info, shop, _, _ = weekend_campaigns(users=300)
    users = np.arange(2)
    shop.mall_payments[users] = [0, 50]           # a stranger, a regular
    shop.holding[users] = False
    before = shop.utility(DEMO_START_MS)[users]
    shop.holding[users] = True
    pull = shop.utility(DEMO_START_MS)[users] - before
    assert np.allclose(pull, [behaviour.COUPON_PULL * behaviour.STRANGER_ATTENTION,
                              behaviour.COUPON_PULL], rtol=1e-6)


def test_lapsed_regulars_pay_off_and_new_to_the_mall_does_not():
    """The story at 20,000 shoppers: LIFT finds the lapsed regulars' campaign
    brought extra payers at less than they are worth, and the same coupon
    did not pay off with shoppers new to the mall.

    The groups are drawn from a fixed key. Over 400 keys (2026-12-07) the
    lapsed campaign paid off every time, at 11.9-19.1 CNY per extra payer
    against the 20 CNY one is worth. The new-to-mall campaign, whose true
    effect is close to none, had a conversion interval clear of 0 with 17
    keys (4 %), as a 95 % interval does by chance, and then "paid off" at
    this size. A test on the OS CSPRNG's draw would fail that often."""
    eng, *_ = weekend_campaigns(users=20_000)
    figures = report.gather(report.Source.of_engine(eng), [], [t.campaign for t in story.TARGETED],
                            [], payer_value=story.PAYER_VALUE)
    lapsed, new = figures.campaigns
    assert lapsed["verdict"] == report.PAID_OFF and lapsed["incremental_payers"]["low"] > 0
    assert new["verdict"] != report.PAID_OFF
    assert report.verdict_lines(figures)[-1] == f"paid off: {lapsed['label']}"
