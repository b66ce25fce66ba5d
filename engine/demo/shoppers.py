"""The demo's shoppers: who goes to Riverside Mall, and how a coupon changes it.

Every payment of the demo comes from this behaviour model, before the
targeted campaigns and after them:

- Mall visits. Each day (a period of at most 24 hours) every shopper decides
  whether to go to the mall, with probability sigmoid(u):

      u = preference(home district) + its own taste
          + WEEKEND_BOOST                on a Saturday or a Sunday
          - LAPSE_DROP                   after a life event (moved, new job), if any
          + COUPON_PULL * attention      while it holds an unused campaign coupon

      attention   = STRANGER_ATTENTION + (1 - STRANGER_ATTENTION) * familiarity
      familiarity = 1 - exp(-(its mall payments so far) / FAMILIARITY_VISITS)

  A visit is one payment at a mall merchant, and a few more (Poisson), at
  random times of the day.
- Everything else: the rest of each batch is payments elsewhere in the city,
  payers by a bounded Zipf over users, as in engine/demo/world.py.

A coupon reminds a shopper of a place, and the reminder is worth more the
better it knows the place: the same coupon and the same rule for everyone.
The segments differ in what their history made of them. Lapsed regulars went
to the mall often (familiar) until a life event lowered their preference: a
coupon brings many of them back. Shoppers new to the mall live elsewhere or
do not care for it: a coupon from a place they do not know barely moves them,
and those who come anyway redeem it. Nothing here says what the lift of a
campaign is: the engine measures it (LIFT) from the payments this model makes
through the ordinary PAY path, holdout against treated.

A shopper holds a coupon from the moment the campaign issued it (read back
with COUPONS) until a payment's reply shows it applied (`redeemed`); each day's
decision reads what it holds then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from engine.demo.world import DAY_MS, TZ_OFFSET_MS, WorldInfo, _goods_tags, draw_amounts, zipf_ranks
from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.records import PAY_NO_COUPONS, PAY_RECORD

HISTORY_DAYS = 56                   # the eight weeks before the weekend
HOME_SHARES = (0.5, 0.3, 0.2)       # Riverside, Old Town, Airport (world.DEMO_DISTRICTS)
HOME_PREFERENCE = (-3.2, -5.2, -5.7)  # mean utility of a day at the mall, by home district
TASTE_SD = 1.0                      # each shopper's own taste around it
WEEKEND_BOOST = 0.7                 # malls are busier on Saturdays and Sundays
LAPSE_SHARE = 0.3                   # shoppers with a life event in the eight weeks
LAPSE_DROP = 3.0                    # what the event takes from the mall's utility
COUPON_PULL = 2.5                   # a held campaign coupon, to a shopper who knows the mall
STRANGER_ATTENTION = 0.05           # the share of that pull on a shopper who never went
FAMILIARITY_VISITS = 3.0            # mall payments that make a shopper familiar (1 - 1/e)
EXTRA_PAYMENTS_MEAN = 0.7           # payments of a visit after its first (Poisson)
NEVER_MS = 2**63 - 1
SATURDAY = 5                        # weekday numbers, Monday 0


@dataclass
class Shoppers:
    """The latent traits of every user (by user index) and what they hold."""

    preference: np.ndarray      # f64 utility of a day at the mall, before any life event
    lapse_ms: np.ndarray        # i64 engine time of the life event (NEVER_MS: none)
    mall_payments: np.ndarray   # i64 payments the shopper made at the mall so far
    holding: np.ndarray         # bool: holds an unused campaign coupon
    mall: np.ndarray            # merchant indexes in the mall, and their popularity cdf
    mall_cdf: np.ndarray
    other: np.ndarray           # merchant indexes elsewhere, and their cdf
    other_cdf: np.ndarray
    user_order: np.ndarray      # argsort of the user ids (to find a payer's index)

    def index_of(self, info: WorldInfo, user_ids: np.ndarray) -> np.ndarray:
        at = np.searchsorted(info.user_ids, user_ids, sorter=self.user_order)
        return self.user_order[np.minimum(at, len(self.user_order) - 1)]

    def utility(self, now_ms: int) -> np.ndarray:
        """Every shopper's utility of a day at the mall starting at now_ms."""
        u = self.preference - LAPSE_DROP * (self.lapse_ms <= now_ms)
        if weekday(now_ms) >= SATURDAY:
            u = u + WEEKEND_BOOST
        familiarity = 1.0 - np.exp(-self.mall_payments / FAMILIARITY_VISITS)
        attention = STRANGER_ATTENTION + (1.0 - STRANGER_ATTENTION) * familiarity
        return u + COUPON_PULL * attention * self.holding

    def hold(self, info: WorldInfo, user_ids: np.ndarray) -> None:
        """These users were issued a campaign coupon."""
        self.holding[self.index_of(info, np.asarray(user_ids, np.uint64))] = True

    def redeemed(self, info: WorldInfo, batch: np.ndarray, results: np.ndarray,
                 coupon_ranges: list[tuple[int, int]]) -> None:
        """Payers whose payment applied a campaign coupon (a coupon id in one
        of the [first, last] ranges) no longer hold one."""
        applied = results["coupons"]
        used = np.zeros(len(batch), bool)
        for first, last in coupon_ranges:
            used |= ((applied >= np.uint64(first)) & (applied <= np.uint64(last))).any(axis=1)
        if used.any():
            self.holding[self.index_of(info, batch["payer"][used])] = False


def weekday(now_ms: int) -> int:
    """Monday 0 .. Sunday 6, local time (UTC+8)."""
    return ((now_ms + TZ_OFFSET_MS) // DAY_MS + 3) % 7      # 1970-01-01 was a Thursday


def shoppers(info: WorldInfo, start_ms: int, end_ms: int) -> Shoppers:
    """Draw every user's traits (deterministic for the world's seed); life
    events fall in [start_ms, end_ms)."""
    users = len(info.user_ids)
    rng = np.random.default_rng([info.spec.seed, 0x5409])
    home = rng.choice(len(HOME_SHARES), users, p=HOME_SHARES)
    preference = np.asarray(HOME_PREFERENCE)[home] + rng.normal(0.0, TASTE_SD, users)
    lapse_ms = np.where(rng.random(users) < LAPSE_SHARE,
                        rng.integers(start_ms, end_ms, users), NEVER_MS).astype(np.int64)
    weight = np.diff(info.merchant_cdf, prepend=0.0)
    in_mall = np.asarray(info.merchant_mall, bool)
    mall, other = np.flatnonzero(in_mall), np.flatnonzero(~in_mall)
    return Shoppers(preference, lapse_ms, np.zeros(users, np.int64), np.zeros(users, bool),
                    mall, _cdf(weight[mall]), other, _cdf(weight[other]),
                    np.argsort(info.user_ids, kind="stable"))


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _pick(rng: np.random.Generator, indexes: np.ndarray, cdf: np.ndarray, n: int) -> np.ndarray:
    return indexes[np.minimum(np.searchsorted(cdf, rng.random(n)), len(indexes) - 1)]


def visits(shop: Shoppers, rng: np.random.Generator, now_ms: int, day_share: float):
    """(user indexes, merchant indexes) of the mall payments of the day
    starting at now_ms (a share of a whole day: a shorter period)."""
    p = 1.0 / (1.0 + np.exp(-shop.utility(now_ms)))
    if day_share < 1.0:
        p = 1.0 - (1.0 - p) ** day_share
    visitors = np.flatnonzero(rng.random(len(p)) < p)
    users = np.repeat(visitors, 1 + rng.poisson(EXTRA_PAYMENTS_MEAN, len(visitors)))
    return users, _pick(rng, shop.mall, shop.mall_cdf, len(users))


def days(start_ms: int, end_ms: int) -> Iterator[tuple[int, int]]:
    """Consecutive periods [a, b) of at most a day covering [start_ms, end_ms)."""
    for a in range(start_ms, end_ms, DAY_MS):       # bounded: (end - start) / a day
        yield a, min(a + DAY_MS, end_ms)


def stream(info: WorldInfo, shop: Shoppers, seed: int, payments: int, start_ms: int,
           end_ms: int, first_id: int, steps_min: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(engine time, PAY records) of the payments of [start_ms, end_ms): the
    mall visits of each day, and payments elsewhere to make up `payments`
    (more when the visits alone are more), in batches of at most
    BATCH_RECORDS_MAX over at least `steps_min` instants. Ids from first_id."""
    rng = np.random.default_rng([info.spec.seed, 0x5409, seed])
    span = end_ms - start_ms
    # At least an instant a day: every day's visits have a batch of their own.
    steps = max(steps_min, -(-payments // BATCH_RECORDS_MAX), -(-span // DAY_MS))
    done = 0
    for a, b in days(start_ms, end_ms):
        lo, hi = -(-(a - start_ms) * steps // span), -(-(b - start_ms) * steps // span)
        assert hi > lo, "a day without an instant"
        users, merchants = visits(shop, rng, a, (b - a) / DAY_MS)
        slot = rng.integers(lo, hi, len(users))
        for step in range(lo, hi):                  # bounded: `steps` in all
            mine = slot == step
            total = payments * (step + 1) // steps - payments * step // steps
            now = start_ms + span * step // steps
            for batch in _batches(info, shop, rng, users[mine], merchants[mine], total):
                batch["id"] = np.arange(first_id + done, first_id + done + len(batch),
                                        dtype=np.uint64)
                done += len(batch)
                yield now, batch


def _batches(info: WorldInfo, shop: Shoppers, rng: np.random.Generator, users: np.ndarray,
             merchants: np.ndarray, total: int) -> Iterator[np.ndarray]:
    """The mall payments given and payments elsewhere up to `total` records,
    in batches of at most BATCH_RECORDS_MAX."""
    n = max(total, len(users))
    filler = n - len(users)
    spec = info.spec
    others = info.payer_rank_users[zipf_ranks(rng, len(info.user_ids), spec.payer_skew, filler)]
    payers = np.concatenate([users, others])
    where = np.concatenate([merchants, _pick(rng, shop.other, shop.other_cdf, filler)])
    order = rng.permutation(n)
    payers, where = payers[order], where[order]
    for at in range(0, n, BATCH_RECORDS_MAX):       # bounded: n / BATCH_RECORDS_MAX
        yield _records(info, shop, rng, payers[at:at + BATCH_RECORDS_MAX],
                       where[at:at + BATCH_RECORDS_MAX])


def _records(info: WorldInfo, shop: Shoppers, rng: np.random.Generator, users: np.ndarray,
             merchants: np.ndarray) -> np.ndarray:
    n = len(users)
    batch = np.zeros(n, PAY_RECORD)
    batch["payer"] = info.user_ids[users]
    batch["merchant"] = info.merchant_ids[merchants]
    cats = info.merchant_category[merchants]
    batch["amount"] = draw_amounts(rng, cats)
    batch["goods_tag"] = _goods_tags(rng, cats)
    batch["flags"] = np.where(rng.random(n) < info.spec.no_coupon_share, PAY_NO_COUPONS, 0)
    batch["user_data"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    in_mall = np.isin(merchants, shop.mall)
    np.add.at(shop.mall_payments, users[in_mall], 1)
    return batch


def history_start(weekend_ms: int) -> int:
    return weekend_ms - HISTORY_DAYS * DAY_MS
