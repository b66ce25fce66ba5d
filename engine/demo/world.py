"""A deterministic O2O world (merchants, wallets, campaigns, coupons) and its
scan-to-pay traffic, for the demo, the benchmarks and the tests.

Everything is drawn from one seeded `numpy.random.Generator` and built with
array operations, so the standard world (1M users, 3M coupons) takes seconds
of generation; the rest of `build()` is the engine's own time. The same spec
and seed always give the same calls in the same order, hence the same engine
digest.

Two presets:
- `World.standard()`: the benchmark workload (1M users, 10k merchants, 1k
  stocks, 3 coupons per user).
- `World.demo()`: a small, narratable mall (a hotel, cafes, a taxi service,
  retail shops) with named platform and merchant campaigns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.records import ISSUE_RECORD, PAY_NO_COUPONS, PAY_RECORD
from engine.protocol.status import Status

MAP_ITEMS_PER_CALL = 50_000       # large map calls; the engine parses them in one go
DAY_MS = 86_400_000
TZ_OFFSET_MS = 8 * 3_600_000      # engine default time zone, UTC+8

# A Saturday, 09:00 local (UTC+8): 2024-06-15 01:00 UTC. The demo's weekend.
DEMO_START_MS = 1_718_413_200_000
STANDARD_NOW_MS = 1_700_000_000_000

# Categories: index -> (name, tag, amount range in fen, amount rounding in fen,
# fee_bps, goods tags a payment there may carry).
CATEGORIES = (
    ("cafe",   1, (1_500, 4_000),     100, 38,  (11, 12)),
    ("taxi",   2, (2_000, 8_000),     1,   60,  (21,)),
    ("hotel",  3, (50_000, 300_000),  100, 100, (31, 32)),
    ("retail", 4, (5_000, 80_000),    10,  60,  (41, 42, 43)),
    ("dining", 5, (3_000, 20_000),    100, 60,  (51,)),
)
CAFE, TAXI, HOTEL, RETAIL, DINING = range(len(CATEGORIES))
DISTRICT_TAG_BASE = 100
MALL_TAG_BASE = 1_000

ProgressFn = Callable[[str, int, int], None]   # (stage, done, total)


class WorldBuildError(RuntimeError):
    """An item of the world was refused by the engine: the world is not what
    the spec says, so nothing measured on it would mean anything."""


@dataclass(frozen=True)
class World:
    """What to build. Sizes are explicit limits, amounts in fen."""

    users: int = 10_000
    merchants: int = 100
    stocks: int = 20
    coupons_per_user: int = 3
    seed: int = 1
    districts: int = 8
    malls: int = 4
    topup_per_user_min: int = 200_000          # 2,000 CNY
    topup_per_user_max: int = 2_000_000        # 20,000 CNY
    payer_skew: float = 0.7                    # bounded Zipf exponent over users
    merchant_skew: float = 0.8                 # bounded Zipf exponent over merchants
    no_coupon_share: float = 0.03              # payments with the no-coupon flag
    now_ms: int = STANDARD_NOW_MS
    ids_scrambled: bool = True                 # hash-like u64 ids instead of 1..n
    preset: str = "custom"

    @staticmethod
    def standard(seed: int = 1) -> "World":
        """The benchmark workload. Wallets are topped up far beyond what ten
        million payments could spend, so no benchmark round fails for funds."""
        return World(
            users=1_000_000, merchants=10_000, stocks=1_000, coupons_per_user=3,
            seed=seed, districts=50, malls=200,
            topup_per_user_min=10**11, topup_per_user_max=10**11,
            preset="standard",
        )

    @staticmethod
    def demo(seed: int = 7, users: int = 100_000) -> "World":
        """The narratable mall. Merchants and campaigns are fixed (see
        `_demo_merchants`, `_demo_stocks`); `users` scales the crowd."""
        return World(
            users=users, merchants=len(_DEMO_NAMED_MERCHANTS) + _DEMO_SHOPS,
            stocks=len(_DEMO_CAMPAIGNS), coupons_per_user=3, seed=seed,
            districts=3, malls=1, now_ms=DEMO_START_MS, ids_scrambled=False,
            preset="demo",
        )

    def replace(self, **changes) -> "World":
        return dataclasses.replace(self, **changes)


@dataclass
class WorldInfo:
    """What `build()` made: the ids and the facts traffic generation needs."""

    spec: World
    now_ms: int
    user_ids: np.ndarray              # u64, by user index
    payer_rank_users: np.ndarray      # i64: popularity rank -> user index
    merchant_ids: np.ndarray          # u64, by merchant index
    merchant_category: np.ndarray     # u8 index into CATEGORIES
    merchant_cdf: np.ndarray          # f64 cumulative popularity, by merchant index
    merchant_names: list[str]
    stock_ids: np.ndarray             # u64, by stock index
    stock_names: list[str]
    stock_defs: list[dict]            # the STOCKS items as sent
    coupon_ids: np.ndarray            # u64, sorted
    coupon_stocks: np.ndarray         # u64 stock id of coupon_ids[i]
    seconds: dict = field(default_factory=dict)   # build stage -> seconds
    merchant_mall: np.ndarray | None = None       # bool, by merchant index: in a mall
    coupon_users: np.ndarray | None = None        # u64 user id of coupon_ids[i]

    def stock_of_coupons(self, coupons: np.ndarray) -> np.ndarray:
        """Stock id of each given coupon id (0 for 0 or an unknown id)."""
        coupons = np.asarray(coupons, np.uint64)
        at = np.searchsorted(self.coupon_ids, coupons)
        at = np.minimum(at, len(self.coupon_ids) - 1)
        known = (self.coupon_ids[at] == coupons) & (coupons != 0)
        return np.where(known, self.coupon_stocks[at], np.uint64(0))


# ---------------------------------------------------------------- ids, draws

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def scramble_ids(x: np.ndarray) -> np.ndarray:
    """A bijection on u64 (splitmix64's finalizer) with 0 -> 0: distinct
    nonzero inputs give distinct nonzero, hash-like ids, as real systems
    have, so the engine's index is not flattered by dense keys."""
    x = np.array(x, dtype=np.uint64)
    x ^= x >> np.uint64(30)
    x *= _MIX_1
    x ^= x >> np.uint64(27)
    x *= _MIX_2
    x ^= x >> np.uint64(31)
    return x


def _ids(spec: World, n: int, namespace: int) -> np.ndarray:
    """Ids 1..n, scrambled per namespace when the spec asks for it."""
    seq = np.arange(1, n + 1, dtype=np.uint64)
    if not spec.ids_scrambled:
        return seq
    # The namespace goes into the high bits first, so users and coupons of the
    # same index get unrelated ids; still a bijection, still never 0.
    return scramble_ids(seq + (np.uint64(namespace) << np.uint64(56)))


def zipf_ranks(rng: np.random.Generator, n: int, skew: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(rank k) ~ (k + 1) ** -skew: a few heavy hitters
    and a long tail. Inverse CDF of the continuous approximation, so it is one
    vector expression instead of a table of n weights."""
    assert n >= 1 and 0.0 < skew and skew != 1.0
    u = rng.random(size)
    e = 1.0 - skew
    k = (1.0 + u * ((n + 1.0) ** e - 1.0)) ** (1.0 / e) - 1.0
    return np.clip(k.astype(np.int64), 0, n - 1)


def zipf_weights(n: int, skew: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    return w / w.sum()


def draw_amounts(rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
    """Payment amounts in fen by category: log-normal around the geometric
    middle of the category's range, clipped to it, rounded as prices are."""
    amounts = np.empty(len(categories), np.int64)
    for c, (_name, _tag, (lo, hi), unit, _fee, _goods) in enumerate(CATEGORIES):
        sel = np.nonzero(categories == c)[0]
        if len(sel) == 0:
            continue
        mu = (np.log(lo) + np.log(hi)) / 2.0
        sigma = (np.log(hi) - np.log(lo)) / 5.0
        raw = np.clip(rng.lognormal(mu, sigma, len(sel)), lo, hi)
        amounts[sel] = np.maximum(unit, (raw // unit).astype(np.int64) * unit)
    return amounts


def _goods_tags(rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
    goods = np.zeros(len(categories), np.uint32)
    for c, cat in enumerate(CATEGORIES):
        sel = np.nonzero(categories == c)[0]
        if len(sel):
            goods[sel] = rng.choice(np.array(cat[5], np.uint32), len(sel))
    return goods


# ---------------------------------------------------------------- the demo mall

_DEMO_SHOPS = 180   # the long tail of generic mall shops and restaurants

# name, category, districts (0 Riverside, 1 Old Town, 2 Airport), in mall
_DEMO_NAMED_MERCHANTS = (
    ("Grand Riverside Hotel", HOTEL, 0, True),
    ("Harbor Inn", HOTEL, 2, False),
    ("Starlight Coffee (Mall)", CAFE, 0, True),
    ("Starlight Coffee (Old Town)", CAFE, 1, False),
    ("Lotus Tea House", CAFE, 1, False),
    ("Jetlag Espresso", CAFE, 2, False),
    ("Swift Taxi", TAXI, 0, False),
    ("Bamboo Books", RETAIL, 0, True),
    ("Nova Electronics", RETAIL, 0, True),
    ("Petal Fashion", RETAIL, 0, True),
    ("Old Town Market", RETAIL, 1, False),
    ("Dumpling Garden", DINING, 0, True),
)
DEMO_DISTRICTS = ("Riverside", "Old Town", "Airport")
DEMO_MALL = "Riverside Mall"


def _demo_merchants(spec: World, rng: np.random.Generator):
    """(names, categories, districts, in_mall, popularity weights)."""
    names = [m[0] for m in _DEMO_NAMED_MERCHANTS]
    cats = [m[1] for m in _DEMO_NAMED_MERCHANTS]
    dists = [m[2] for m in _DEMO_NAMED_MERCHANTS]
    mall = [m[3] for m in _DEMO_NAMED_MERCHANTS]
    shop_cats = rng.choice([RETAIL, DINING, CAFE], _DEMO_SHOPS, p=[0.6, 0.3, 0.1])
    shop_dists = rng.choice(3, _DEMO_SHOPS, p=[0.6, 0.3, 0.1])
    for i in range(_DEMO_SHOPS):
        cat = int(shop_cats[i])
        dist = int(shop_dists[i])
        names.append(f"{DEMO_DISTRICTS[dist]} {CATEGORIES[cat][0]} #{i + 1}")
        cats.append(cat)
        dists.append(dist)
        mall.append(dist == 0 and bool(rng.random() < 0.7))
    # Named merchants are the busy ones (the taxi and the mall cafe first);
    # the generic shops share a Zipf tail.
    named = np.array([0.3, 0.1, 6.0, 2.5, 1.5, 1.0, 8.0, 1.5, 1.2, 1.5, 1.0, 2.0])
    tail = zipf_weights(_DEMO_SHOPS, spec.merchant_skew) * 12.0
    w = np.concatenate([named, tail])
    return names, np.array(cats, np.uint8), np.array(dists), np.array(mall), w / w.sum()


# name, definition (ids of merchants by name resolved in _demo_stocks), coupon weight
_DEMO_CAMPAIGNS = (
    ("Mall weekend 10% off, cap 20 CNY",
     dict(funder="platform", kind="percent", value=1_000, cap=2_000, tags=["mall"],
          stacking="stackable", budget=30_000_000, slots="weekend"), 5.0),
    ("New user 5 CNY off 20",
     dict(funder="platform", kind="fixed", value=500, min_spend=2_000,
          stacking="stackable", budget=50_000_000, per_user_limit=1,
          validity_ms=7 * DAY_MS), 6.0),
    ("Coffee lovers 2 CNY off any cafe",
     dict(funder="platform", kind="fixed", value=200, min_spend=1_000, tags=["cafe"],
          stacking="stackable", budget=5_000_000), 4.0),
    ("Old Town 15% off, cap 50 CNY",
     dict(funder="platform", kind="percent", value=1_500, cap=5_000, tags=["Old Town"],
          stacking="exclusive", budget=30_000_000), 2.0),
    ("Swift Taxi 8 CNY off 30",
     dict(funder="platform", kind="fixed", value=800, min_spend=3_000,
          merchants=["Swift Taxi"], stacking="stackable", budget=40_000_000), 4.0),
    ("Starlight Coffee 3 off 15",
     dict(funder="merchant", merchant="Starlight Coffee (Mall)", kind="fixed", value=300,
          min_spend=1_500, stacking="stackable", budget=12_000_000), 3.0),
    ("Grand Riverside Hotel 200 off 1000",
     dict(funder="merchant", merchant="Grand Riverside Hotel", kind="fixed", value=20_000,
          min_spend=100_000, stacking="exclusive", budget=50_000_000), 0.5),
    ("Bamboo Books 10% off",
     dict(funder="merchant", merchant="Bamboo Books", kind="percent", value=1_000,
          stacking="stackable", budget=2_000_000), 1.0),
    ("Petal Fashion 50 off 300",
     dict(funder="merchant", merchant="Petal Fashion", kind="fixed", value=5_000,
          min_spend=30_000, stacking="exclusive", budget=5_000_000), 1.0),
    ("Airport 20 CNY off 100",
     dict(funder="platform", kind="fixed", value=2_000, min_spend=10_000, tags=["Airport"],
          stacking="exclusive", budget=4_000_000), 1.0),
    ("Dumpling Garden 12 off 60 (lunch)",
     dict(funder="merchant", merchant="Dumpling Garden", kind="fixed", value=1_200,
          min_spend=6_000, stacking="stackable", budget=3_000_000, slots="lunch"), 1.0),
)


def _demo_stocks(spec: World, now_ms: int, names: list[str]):
    """(names, STOCKS items, coupon weights) of the demo's campaigns."""
    by_name = {n: i for i, n in enumerate(names)}
    tag_of = {"mall": MALL_TAG_BASE, "cafe": CATEGORIES[CAFE][1]}
    tag_of.update({d: DISTRICT_TAG_BASE + i for i, d in enumerate(DEMO_DISTRICTS)})
    slots = {
        "weekend": [[5, 0, 1440], [6, 0, 1440]],              # Saturday, Sunday
        "lunch": [[d, 11 * 60, 14 * 60] for d in range(7)],   # 11:00-14:00 daily
    }
    stock_names, defs, weights = [], [], []
    for i, (name, d, weight) in enumerate(_DEMO_CAMPAIGNS):
        item = dict(d, id=i + 1, name=name, valid_from=now_ms - DAY_MS,
                    valid_until=now_ms + 30 * DAY_MS)
        if "merchant" in item:
            item["merchant"] = by_name[item["merchant"]] + 1   # demo merchant ids are 1..n
        if "merchants" in item:
            item["merchants"] = [by_name[m] + 1 for m in item["merchants"]]
        if "tags" in item:
            item["tags"] = [tag_of[t] for t in item["tags"]]
        if "slots" in item:
            item["slots"] = slots[item["slots"]]
        stock_names.append(name)
        defs.append(item)
        weights.append(weight)
    w = np.array(weights)
    return stock_names, defs, w / w.sum()


# ---------------------------------------------------------------- the standard world

def _standard_merchants(spec: World, rng: np.random.Generator):
    n = spec.merchants
    cats = rng.choice(len(CATEGORIES), n, p=[0.30, 0.05, 0.05, 0.30, 0.30]).astype(np.uint8)
    dists = rng.integers(0, spec.districts, n)
    mall = rng.random(n) < 0.4
    names = []  # 10k names would only be noise; the demo has names
    w = zipf_weights(n, spec.merchant_skew)[rng.permutation(n)]
    return names, cats, dists, mall, w


def _standard_stocks(spec: World, rng: np.random.Generator, now_ms: int,
                     merchant_ids: np.ndarray, merchant_cats: np.ndarray,
                     merchant_w: np.ndarray):
    """A mix: 40 % merchant-funded; platform ones scoped by tags, by merchant
    list, by both, or not at all; 70 % fixed; 15 % exclusive; large budgets."""
    n = spec.stocks
    m = len(merchant_ids)
    merchant_funded = rng.random(n) < 0.4
    percent = rng.random(n) < 0.3
    exclusive = rng.random(n) < 0.15
    scope = rng.choice(4, n, p=[0.45, 0.3, 0.15, 0.10])  # tags, merchants, both, all
    # Merchant stocks belong to popular merchants more often, as in life.
    owners = np.searchsorted(np.cumsum(merchant_w), rng.random(n) * merchant_w.sum())
    owners = np.minimum(owners, m - 1)
    fixed_value = (rng.integers(3, 31, n) * 100).astype(np.int64)       # 3..30 CNY
    pct_value = rng.choice([500, 800, 1000, 1500, 2000], n)
    cap = rng.choice([0, 1_000, 2_000, 5_000, 10_000], n)
    min_mult = rng.integers(2, 11, n)
    budget = np.where(rng.random(n) < 0.1, 0,
                      (10 ** rng.uniform(9, 11, n)).astype(np.int64))
    validity = np.where(rng.random(n) < 0.3, 90 * DAY_MS, 0)
    goods = rng.random(n) < 0.05
    names, defs = [], []
    for i in range(n):
        item = {
            "id": i + 1, "kind": "percent" if percent[i] else "fixed",
            "value": int(pct_value[i] if percent[i] else fixed_value[i]),
            "min_spend": 0 if percent[i] else int(fixed_value[i] * min_mult[i]),
            "valid_from": now_ms - 30 * DAY_MS, "valid_until": now_ms + 365 * DAY_MS,
            "budget": int(budget[i]),
            "stacking": "exclusive" if exclusive[i] else "stackable",
        }
        if percent[i]:
            item["cap"] = int(cap[i])
        if validity[i]:
            item["validity_ms"] = int(validity[i])
        if merchant_funded[i]:
            item["funder"] = "merchant"
            item["merchant"] = int(merchant_ids[owners[i]])
            cat = int(merchant_cats[owners[i]])
        else:
            item["funder"] = "platform"
            cat = int(rng.integers(len(CATEGORIES)))
            if scope[i] in (0, 2):
                tags = [CATEGORIES[cat][1]]
                if rng.random() < 0.5:
                    tags.append(DISTRICT_TAG_BASE + int(rng.integers(spec.districts)))
                if rng.random() < 0.3:
                    tags.append(MALL_TAG_BASE + int(rng.integers(spec.malls)))
                item["tags"] = tags
            if scope[i] in (1, 2):
                count = int(rng.integers(5, 201))
                picks = np.unique(rng.integers(0, m, count))
                item["merchants"] = [int(x) for x in merchant_ids[picks]]
        if goods[i]:
            item["goods_tags"] = [int(g) for g in CATEGORIES[cat][5]]
        kind = f"{item['value'] // 100} CNY off" if item["kind"] == "fixed" else \
            f"{item['value'] / 100:g}% off"
        names.append(f"{item['funder']} #{i + 1} {kind}")
        defs.append(item)
    weights = np.where(merchant_funded, 0.5, 1.0)
    return names, defs, weights / weights.sum()


# ---------------------------------------------------------------- build

def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _check(what: str, results: list[dict], first_index: int = 0) -> None:
    for i, r in enumerate(results):
        if r["status"] != Status.ok:
            raise WorldBuildError(f"{what} item {first_index + i}: {r}")


@contextlib.contextmanager
def _timed(seconds: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


def _coupon_stocks(rng: np.random.Generator, users: int, per_user: int,
                   stock_w: np.ndarray, rounds_max: int = 32) -> np.ndarray:
    """(users, per_user) stock indexes drawn by weight, distinct within a
    user (so per_user_limit never refuses one); a user whose draws still
    collide after rounds_max gets -1 in that slot (not issued)."""
    cdf = np.cumsum(stock_w)
    cdf[-1] = 1.0
    draw = lambda k: np.searchsorted(cdf, rng.random(k), side="right")  # noqa: E731
    picks = draw(users * per_user).reshape(users, per_user).astype(np.int64)
    for _ in range(rounds_max):
        s = np.sort(picks, axis=1)
        dup_rows = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
        if len(dup_rows) == 0:
            return picks
        # Redraw the later slot of each duplicated pair.
        for j in range(1, per_user):
            rows = dup_rows[(picks[dup_rows, :j] == picks[dup_rows, j:j + 1]).any(axis=1)]
            picks[rows, j] = draw(len(rows))
    for j in range(1, per_user):
        clash = (picks[:, :j] == picks[:, j:j + 1]).any(axis=1)
        picks[clash, j] = -1
    return picks


def build(engine, spec: World, progress: ProgressFn | None = None,
          issue: bool = True) -> WorldInfo:
    """Create the world in `engine`: merchants, wallets, top-ups, stocks, then
    coupons issued in full batches (with issue=False, not yet: the demo issues
    them later, with `issue_coupons`). Raises WorldBuildError on any refused item."""
    rng = np.random.default_rng(spec.seed)
    seconds: dict = {}
    note = progress or (lambda stage, done, total: None)
    now_ms = spec.now_ms

    with _timed(seconds, "generate"):
        merchant_ids = _ids(spec, spec.merchants, namespace=2)
        if spec.preset == "demo":
            # Campaign definitions refer to merchants 1..n by name.
            assert not spec.ids_scrambled and spec.merchants == len(_DEMO_NAMED_MERCHANTS) + _DEMO_SHOPS
            m_names, m_cats, m_dists, m_mall, m_w = _demo_merchants(spec, rng)
        else:
            m_names, m_cats, m_dists, m_mall, m_w = _standard_merchants(spec, rng)
        user_ids = _ids(spec, spec.users, namespace=1)
        payer_rank_users = rng.permutation(spec.users)
        topups = rng.integers(spec.topup_per_user_min, spec.topup_per_user_max + 1,
                              spec.users, dtype=np.int64)
        if spec.preset == "demo":
            s_names, s_defs, s_w = _demo_stocks(spec, now_ms, m_names)
        else:
            s_names, s_defs, s_w = _standard_stocks(spec, rng, now_ms, merchant_ids, m_cats, m_w)
        stock_ids = np.array([d["id"] for d in s_defs], np.uint64)
        picks = _coupon_stocks(rng, spec.users, spec.coupons_per_user, s_w)
        coupon_ids = _ids(spec, spec.users * spec.coupons_per_user, namespace=3)
        coupon_user = np.repeat(np.arange(spec.users), spec.coupons_per_user)
        flat = picks.reshape(-1)
        keep = flat >= 0
        coupon_ids, coupon_user, flat = coupon_ids[keep], coupon_user[keep], flat[keep]

    with _timed(seconds, "merchants"):
        items = _merchant_items(spec, merchant_ids, m_cats, m_dists, m_mall)
        _call_chunked(engine, "MERCHANTS", "merchants", items, note)

    with _timed(seconds, "wallets"):
        _call_chunked(engine, "WALLETS", "users", user_ids.tolist(), note)

    with _timed(seconds, "topups"):
        uid, amt = user_ids.tolist(), topups.tolist()
        for lo, hi in _chunks(spec.users, MAP_ITEMS_PER_CALL):
            items = [{"id": i + 1, "user": uid[i], "amount": amt[i]} for i in range(lo, hi)]
            _check("TOPUP", engine.call("TOPUP", {"topups": items})["results"], lo)
            note("topups", hi, spec.users)

    with _timed(seconds, "stocks"):
        _call_chunked(engine, "STOCKS", "stocks", s_defs, note)

    if issue:
        with _timed(seconds, "issue"):
            _issue_all(engine, coupon_ids, stock_ids[flat], user_ids[coupon_user], note)

    order = np.argsort(coupon_ids)
    return WorldInfo(
        spec=spec, now_ms=now_ms, user_ids=user_ids, payer_rank_users=payer_rank_users,
        merchant_ids=merchant_ids, merchant_category=m_cats,
        merchant_cdf=np.cumsum(m_w) / np.sum(m_w), merchant_names=m_names,
        stock_ids=stock_ids, stock_names=s_names, stock_defs=s_defs,
        coupon_ids=coupon_ids[order], coupon_stocks=stock_ids[flat][order],
        seconds=seconds, merchant_mall=np.asarray(m_mall, bool),
        coupon_users=user_ids[coupon_user][order],
    )


def _merchant_items(spec: World, merchant_ids, m_cats, m_dists, m_mall) -> list[dict]:
    """The MERCHANTS items: category and district tags, and a mall's tag."""
    items = []
    for i in range(spec.merchants):
        cat = int(m_cats[i])
        tags = [CATEGORIES[cat][1], DISTRICT_TAG_BASE + int(m_dists[i])]
        if m_mall[i]:
            tags.append(MALL_TAG_BASE + (0 if spec.preset == "demo" else i % spec.malls))
        items.append({"id": int(merchant_ids[i]), "fee_bps": CATEGORIES[cat][4], "tags": tags})
    return items


def issue_coupons(engine, info: WorldInfo, progress: ProgressFn | None = None) -> None:
    """Issue the world's coupons, for a world built with issue=False."""
    with _timed(info.seconds, "issue"):
        _issue_all(engine, info.coupon_ids, info.coupon_stocks, info.coupon_users,
                   progress or (lambda stage, done, total: None))


def _call_chunked(engine, op: str, key: str, items: list, note: ProgressFn) -> None:
    stage = op.lower()
    for lo, hi in _chunks(len(items), MAP_ITEMS_PER_CALL):
        _check(op, engine.call(op, {key: items[lo:hi]})["results"], lo)
        note(stage, hi, len(items))


def _issue_all(engine, coupons: np.ndarray, stocks: np.ndarray, users: np.ndarray,
               note: ProgressFn) -> None:
    n = len(coupons)
    for lo, hi in _chunks(n, BATCH_RECORDS_MAX):
        batch = np.zeros(hi - lo, ISSUE_RECORD)
        batch["coupon"] = coupons[lo:hi]
        batch["stock"] = stocks[lo:hi]
        batch["user"] = users[lo:hi]
        res = engine.issue(batch)
        bad = np.nonzero(res["status"] != Status.ok)[0]
        if len(bad):
            raise WorldBuildError(f"ISSUE record {lo + bad[0]}: status {res['status'][bad[0]]}"
                                  f" ({len(bad)} refused in this batch)")
        note("issue", hi, n)


# ---------------------------------------------------------------- traffic

def pay_batches(info: WorldInfo, n_batches: int, batch_records: int = BATCH_RECORDS_MAX,
                seed: int | None = None, start_payment_id: int = 1,
                no_coupon_share: float | None = None) -> Iterator[np.ndarray]:
    """Yield n_batches PAY_RECORD arrays of scan-to-pay traffic: payers by a
    bounded Zipf over users, merchants by popularity, amounts by the
    merchant's category, automatic coupon selection except a share with the
    no-coupon flag. Payment ids are start_payment_id, +1, ... (unique)."""
    assert 1 <= batch_records <= BATCH_RECORDS_MAX
    assert n_batches >= 0 and start_payment_id >= 1
    spec = info.spec
    rng = np.random.default_rng([spec.seed, 0x9A7, seed if seed is not None else 0])
    share = spec.no_coupon_share if no_coupon_share is None else no_coupon_share
    users = len(info.user_ids)
    merchants = len(info.merchant_ids)
    next_id = start_payment_id
    for _ in range(n_batches):
        batch = np.zeros(batch_records, PAY_RECORD)
        batch["id"] = np.arange(next_id, next_id + batch_records, dtype=np.uint64)
        next_id += batch_records
        ranks = zipf_ranks(rng, users, spec.payer_skew, batch_records)
        batch["payer"] = info.user_ids[info.payer_rank_users[ranks]]
        m = np.minimum(np.searchsorted(info.merchant_cdf, rng.random(batch_records)),
                       merchants - 1)
        batch["merchant"] = info.merchant_ids[m]
        cats = info.merchant_category[m]
        batch["amount"] = draw_amounts(rng, cats)
        batch["goods_tag"] = _goods_tags(rng, cats)
        batch["flags"] = np.where(rng.random(batch_records) < share, PAY_NO_COUPONS, 0)
        batch["user_data"] = rng.integers(1, 2**63, batch_records, dtype=np.uint64)
        yield batch


def make_engine(clock: Callable[[], int], capacity: dict | None = None):
    """The embedded engine with capacity hints when it takes them."""
    from engine import Engine

    if capacity is None:
        return Engine(clock=clock)
    try:
        return Engine(clock=clock, capacity=capacity)
    except TypeError:   # an engine without capacity hints: they are only hints
        return Engine(clock=clock)


def capacity_for(spec: World, payments: int) -> dict:
    """Capacity hints for the world and `payments` payments (the engine
    sizes the visits by the payments)."""
    return {"users": spec.users, "coupons": spec.users * spec.coupons_per_user,
            "payments": payments}
