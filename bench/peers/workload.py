"""The shared workload, the one coupon rule every peer implements, and the
canonical final state every peer's result is checked against.

The workload is cut into shards: a shard owns its users, and its users hold
coupons only of the shard's stocks. Payments of one shard touch only that
shard's wallets, coupons and stocks (merchants are shared, but a merchant
credit does not depend on order). So any interleaving of the shards that
keeps each shard's own order ends in the same state: one caller per shard
may run at full concurrency and every peer must still end identical.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random

from engine.protocol.status import Status

KIND_FIXED, KIND_PERCENT = 0, 1
VALID_UNTIL_MS = 2**62          # no coupon expires during a run
BPS = 10_000
# The outcomes tallied per run (and compared across peers).
OUTCOMES = ("ok", "duplicate", "insufficient_funds", "payer_not_found")


@dataclasses.dataclass(frozen=True)
class Stock:
    id: int
    kind: int                   # KIND_FIXED or KIND_PERCENT
    value: int                  # minor units off (fixed) or basis points (percent)
    cap: int                    # percent only; 0 = no cap
    min_spend: int
    budget: int                 # > 0: every stock here has a budget


@dataclasses.dataclass(frozen=True)
class Payment:
    id: int
    payer: int
    merchant: int
    amount: int


@dataclasses.dataclass
class Workload:
    seed: int
    shards: int
    users: dict[int, int]                 # user id -> opening balance
    merchants: dict[int, int]             # merchant id -> fee_bps
    stocks: dict[int, Stock]
    coupons: dict[int, tuple[int, int]]   # coupon id -> (stock id, user id)
    payments: list[Payment]               # in the global order

    def shard_of(self, payer: int) -> int:
        return payer % self.shards

    def by_shard(self, payments: list[Payment] | None = None) -> list[list[Payment]]:
        """The payments of each shard, each in the global order."""
        lanes: list[list[Payment]] = [[] for _ in range(self.shards)]
        for p in self.payments if payments is None else payments:
            lanes[self.shard_of(p.payer)].append(p)
        return lanes

    def lanes(self, callers: int, payments: list[Payment] | None = None) -> list[list[Payment]]:
        """One list per caller: caller c runs shards c, c + callers, ... in
        the global order (a shard never has two callers)."""
        if not 1 <= callers <= self.shards:
            raise ValueError(f"callers must be 1..{self.shards} (the shards), got {callers}")
        mine = [[] for _ in range(callers)]
        for p in self.payments if payments is None else payments:
            mine[self.shard_of(p.payer) % callers].append(p)
        return mine


def generate(seed: int, *, users: int, merchants: int, payments: int, shards: int,
             stocks_per_shard: int = 4) -> Workload:
    """A deterministic workload: the same seed and sizes give the same lists."""
    if users < shards or payments < 1 or merchants < 1 or shards < 1:
        raise ValueError("need users >= shards >= 1, merchants >= 1, payments >= 1")
    rng = random.Random(seed)
    wallets = {}
    for uid in range(1, users + 1):
        # A third are nearly empty, so that insufficient funds really happen.
        low = rng.random() < 0.3
        wallets[uid] = rng.randint(300, 6_000) if low else rng.randint(50_000, 600_000)
    fees = {10_000 + m: rng.choice((0, 30, 60, 100, 250, 600)) for m in range(merchants)}
    stocks = {}
    for shard in range(shards):
        for k in range(stocks_per_shard):
            sid = 1 + shard * stocks_per_shard + k
            percent = rng.random() < 0.4
            stocks[sid] = Stock(
                id=sid, kind=KIND_PERCENT if percent else KIND_FIXED,
                value=rng.randint(500, 3_000) if percent else rng.choice((100, 300, 500, 1_000, 2_000)),
                cap=rng.choice((0, 500, 1_500)) if percent else 0,
                min_spend=rng.choice((0, 0, 1_000, 5_000)),
                # Half the stocks have budgets that run out within a run.
                budget=rng.choice((5_000, 20_000, 80_000)) * max(1, payments // 20_000)
                if rng.random() < 0.5 else 10**12)
    coupons = {}
    cid = 1
    for uid in range(1, users + 1):
        own = [1 + (uid % shards) * stocks_per_shard + k for k in range(stocks_per_shard)]
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            coupons[cid] = (rng.choice(own), uid)
            cid += 1
    merchant_ids = sorted(fees)
    pays: list[Payment] = []
    for pid in range(1, payments + 1):
        roll = rng.random()
        if pays and roll < 0.05:            # a gateway re-sends an earlier request
            pays.append(pays[rng.randrange(len(pays))])
            continue
        payer = users + 1 + rng.randrange(1_000) if roll < 0.07 else rng.randint(1, users)
        amount = int(10 ** rng.uniform(2, 4.5))                  # 1.00 .. 316.23 CNY
        pays.append(Payment(pid, payer, rng.choice(merchant_ids), amount))
    return Workload(seed, shards, wallets, fees, stocks, coupons, pays)


def discount_of(stock: Stock, amount: int) -> int:
    """docs/reference/rules.md step 4: the discount d a coupon of `stock` gives on `amount`."""
    if stock.kind == KIND_FIXED:
        return min(stock.value, amount)
    d = amount * stock.value // BPS
    return min(d, stock.cap) if stock.cap else d


def best_coupon(amount: int, held) -> tuple[int, int, int] | None:
    """The coupon applied: `held` is (coupon id, Stock, stock spent) for the
    payer's unused coupons. Candidates need min_spend <= amount, d >= 1 and
    budget - spent >= d; the largest d wins, then the smaller coupon id.
    Scanpay's auto selection gives the same answer here: every stock is
    exclusive (one coupon per payment) and all coupons share one expiry.
    Returns (coupon id, stock id, d) or None."""
    best = None
    for coupon, stock, spent in held:
        if amount < stock.min_spend:
            continue
        d = discount_of(stock, amount)
        if d < 1 or stock.budget - spent < d:
            continue
        if best is None or d > best[2] or (d == best[2] and coupon < best[0]):
            best = (coupon, stock.id, d)
    return best


def fee_of(amount: int, fee_bps: int) -> int:
    """docs/reference/rules.md step 7, base = amount (every stock here is platform-funded)."""
    return (amount * fee_bps + 5_000) // BPS


@dataclasses.dataclass
class FinalState:
    """What is compared across peers."""
    users: dict[int, int]                 # balance
    merchants: dict[int, int]             # balance
    spent: dict[int, int]                 # stock id -> discount spent
    used: dict[int, int]                  # coupon id -> the payment that used it
    fees: int
    outcomes: dict[str, int]              # OUTCOMES -> count over the run

    def listing(self) -> str:
        lines = [f"user {k} {v}" for k, v in sorted(self.users.items())]
        lines += [f"merchant {k} {v}" for k, v in sorted(self.merchants.items())]
        lines += [f"stock {k} {v}" for k, v in sorted(self.spent.items())]
        lines += [f"coupon {k} {v}" for k, v in sorted(self.used.items())]
        lines.append(f"fees {self.fees}")
        lines += [f"outcome {k} {self.outcomes.get(k, 0)}" for k in OUTCOMES]
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        return hashlib.sha256(self.listing().encode()).hexdigest()


def diff(expected: FinalState, got: FinalState, limit: int = 20) -> list[str]:
    """The first `limit` lines that differ between two listings."""
    a = set(expected.listing().splitlines())
    b = set(got.listing().splitlines())
    out = [f"- {line}" for line in sorted(a - b)[:limit]]
    out += [f"+ {line}" for line in sorted(b - a)[:limit]]
    return out


def outcome_name(status: int, duplicate: bool) -> str:
    if status == Status.ok:
        return "duplicate" if duplicate else "ok"
    name = Status(status).name
    if name not in OUTCOMES:
        raise AssertionError(f"the workload never expects {name}")
    return name


def tally(names) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for name in names:
        counts[name] += 1
    return counts
