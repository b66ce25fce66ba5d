"""The demo's two targeted campaigns (ops 51-54, docs/reference/protocol.md):
the same coupon, 15 CNY off 60 at Riverside Mall, sent to two segments on
Saturday 09:00, each with a random holdout that gets nothing:

- "Welcome back": lapsed regulars, at least 4 payments at the mall in the
  last 28 days and none in the last 14;
- "First visit": shoppers who never paid at the mall.

Which one paid off is for LIFT to say, from the weekend's payments
(engine/demo/shoppers.py makes them; engine/cli/report.py reads the verdict).
Everything goes through `source.call`: an Engine in process or a Client.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.demo.shoppers import Shoppers
from engine.demo.world import DAY_MS, MALL_TAG_BASE, WorldInfo, WorldBuildError
from engine.protocol.limits import WIRE_LOOKUP_ITEMS_MAX
from engine.protocol.status import Status

COUPON_VALUE = 1_500                # 15 CNY off ...
COUPON_MIN_SPEND = 6_000            # ... a payment of 60 CNY or more
STOCK_ID_BASE = 101                 # the world's own stocks are 1..11
# What the mall reckons one extra shopper at the weekend is worth: a campaign
# paid off when each extra payer it brought cost at most this (the report's
# --payer-value; a business figure, not part of the shoppers' behaviour).
PAYER_VALUE = 2_000


@dataclass(frozen=True)
class Targeted:
    """One targeted campaign: its segment, its stock and the campaign item."""
    campaign: int
    name: str
    segment: dict
    stock_name: str
    budget: int                     # minor units; 0: unlimited
    holdout_bps: int
    coupon_base: int

    def coupon_range(self, size: int) -> tuple[int, int]:
        return self.coupon_base, self.coupon_base + max(size, 1) - 1


MALL = [MALL_TAG_BASE]
TARGETED = (
    Targeted(1, "Welcome back (lapsed regulars)",
             {"id": 1, "name": "Lapsed regulars", "tags": MALL, "days": 56,
              "payments_min": 4, "recency_days_min": 14},
             "Welcome back: 15 CNY off 60 at Riverside Mall", 8_000_000, 1_000, 10**12),
    Targeted(2, "First visit (new to the mall)",
             {"id": 2, "name": "New to the mall", "tags": MALL, "never_paid": True},
             "First visit: 15 CNY off 60 at Riverside Mall", 0, 1_000, 2 * 10**12),
)


def stock_item(t: Targeted, index: int, now_ms: int) -> dict:
    return {"id": STOCK_ID_BASE + index, "name": t.stock_name, "funder": "platform",
            "kind": "fixed", "value": COUPON_VALUE, "min_spend": COUPON_MIN_SPEND,
            "tags": MALL, "stacking": "stackable", "budget": t.budget,
            "valid_from": now_ms, "valid_until": now_ms + 2 * DAY_MS}


def launch(source, info: WorldInfo, shop: Shoppers, now_ms: int) -> list:
    """Create the stocks, segments and campaigns at engine time now_ms; mark
    the shoppers who were issued a coupon as holding one. Returns, for each
    campaign, ((first, last) its coupon id range, its CAMPAIGNS result)."""
    stocks = [stock_item(t, i, now_ms) for i, t in enumerate(TARGETED)]
    _check("STOCKS", source.call("STOCKS", {"stocks": stocks})["results"])
    _check("SEGMENTS", source.call("SEGMENTS", {"segments": [t.segment for t in TARGETED]})
           ["results"])
    items = [{"id": t.campaign, "name": t.name, "segment": t.segment["id"],
              "stock": STOCK_ID_BASE + i, "holdout_bps": t.holdout_bps,
              "coupon_base": t.coupon_base} for i, t in enumerate(TARGETED)]
    results = source.call("CAMPAIGNS", {"campaigns": items})["results"]
    _check("CAMPAIGNS", results)
    launched = []
    for t, r in zip(TARGETED, results):
        first, last = t.coupon_range(r["size"])
        shop.hold(info, holders(source, first, last) if r["size"] else np.zeros(0, np.uint64))
        launched.append(((first, last), r))
    return launched


def holders(source, first: int, last: int) -> np.ndarray:
    """The users holding the coupons first..last (the campaign's ids; a
    held-out user's id was never issued: coupon_not_found)."""
    users = []
    for at in range(first, last + 1, WIRE_LOOKUP_ITEMS_MAX):     # bounded by the range
        ids = list(range(at, min(at + WIRE_LOOKUP_ITEMS_MAX, last + 1)))
        users += [c["user"] for c in source.call("COUPONS", {"ids": ids})["results"]
                  if c["status"] == Status.ok]
    return np.array(users, np.uint64)


def _check(op: str, results: list) -> None:
    bad = [r for r in results if r.get("status") != 0]
    if bad:
        raise WorldBuildError(f"{op}: {bad[0]}")
