"""Plain-Python reference of membership and marketing (docs/reference/rules.md
"Membership and marketing"; docs/reference/protocol.md, PROGRAMS,
REDEEM_POINTS, STATS).

`MembershipReference` extends `tests/support/reference_money.py`'s `MoneyReference`
with:

- PROGRAMS (op 47): points programs (rate, offers) and stamp cards
  (threshold, stamps, reward_stock), scoped like a platform stock;
- earning on completion (a direct PAY, or a CAPTURE of an authorization):
  points `cash * rate // 100` in every covering points program, a stamp in
  every covering stamp card the payment qualifies for, the reward coupon
  `2**63 + k` issued in the same apply when the card fills;
- clawback on refunds (REFUND map and records, REVERSE of a completed
  payment): cumulative floor `R * earned // T`; on a full refund the stamp
  goes back (reward expired at once, or the card to -1 if it was used);
- REDEEM_POINTS (op 48): points into a coupon of an offered stock;
- BALANCES `memberships`; STATS (op 46) with every counter kept by the apply;
- canonical() with the tables programs, program_lists, program_offers,
  memberships, earnings, redemptions, visits, stock_stats, merchant_stats.

Written from the two documents only (not from ext/kernel.pyx or
engine/core/ops/membership.py).

Hooks into MoneyReference (which is not edited), each the smallest existing
method that sees the event:
- `_pay_one` (override, calls super): a direct PAY that succeeded (not a
  replay, no authorize flag) completes the payment;
- `_capture_one` (override, calls super): a CAPTURE that succeeded (not a
  replay) completes the payment;
- `_refund_to` (override, calls super): every refund (REFUND map/records and
  REVERSE of a completed payment) goes through it; clawback and, when R
  reaches T, the full-refund rules;
- `_balances_op` (override): the `memberships` key, the rest delegated;
- `call` (override): PROGRAMS, REDEEM_POINTS, STATS (read-only: expiry first,
  as the other reads);
- `canonical` (override, calls super): the membership tables replaced.

Choices where the docs are silent (also in the differential test's report):
- PROGRAMS: `rate` is required for points, `stamps` and `reward_stock` for
  stamp cards; `threshold` defaults to 0 and `offers`, `merchants`, `tags` to
  empty. `merchants` are nonzero u64 and lists hold at most 4,096 items (as a
  stock's). An offer is a map of exactly {stock: u64, price}; two offers of one
  stock with different prices are `invalid_argument` (the same pair twice
  collapses, lists are sets).
- A membership row is made by earning points (more than 0), by a stamp, or
  by a redemption; a payment that earns 0 points leaves no membership row
  (its earnings row exists, with points 0).
- Every qualifying payment is stamped (`stamped` 1); a full card (its reward
  could not issue) stays at N, and each further qualifying payment tries
  the issue again. `reward` (this cycle's coupon) is set when the reward
  issues and kept until the next reward replaces it or a full refund finds
  the card at 0 with it (then cleared): "the card is at 0 because that
  cycle's reward was issued" is `stamps == 0 and reward != 0`, so a stamp
  added and taken back again restores that state (refunds undo in any
  order).
- The reward coupon is "unused" only in state `available`, judged before the
  refund's own effects (a reward used by the refunded payment itself is
  "already used", though the refund then returns it); a `locked` one
  (held by an open authorization) counts as used, so the card goes to -1:
  expiring it would not stop the capture (a locked coupon stays applied past
  its time) and the customer would keep both the reward and the stamps. An
  unused one gets `expires_at = min(expires_at, now)`: one already past
  its time keeps its (earlier) expiry rather than being moved later to now.
- Reward ids: a counter k from 1, advanced past taken ids; only a successful
  issue uses a k. Programs are visited in id order.
- REDEEM_POINTS results: `{status, coupon, points, expires_at}`; on a failure
  `points` and `expires_at` are 0 (the PayResult convention), also for
  `invalid_id` (coupon 0), whose item is well-formed; a replay
  reports the current balance and the coupon's `expires_at`; a malformed item
  is `{status: 29, error, message}`.
- BALANCES: `memberships` is in the reply only when asked for; an error entry
  is `{user, program, status, error}`; the user is checked before the program.
- STATS: `gmv`, `payers_new`, `payers_returning` of a stock are not undone by
  refunds (only `redeemed` is, on a full refund). A coupon applied with a 0
  part still counts as redeemed / a coupon payment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.core import canonical
from engine.protocol.limits import AMOUNT_MAX, OFFERS_MAX
from engine.protocol.records import ISSUE_RECORD, PAY_AUTHORIZE, RESULT_DUPLICATE
from engine.protocol.status import STATUS_NAMES, Status

from support.reference import _invalid, _in_range, _is_u32, _is_u64, _table
from support.reference_money import MoneyReference

# Status codes of the extension (Membership and marketing).
PROGRAM_NOT_FOUND = Status.program_not_found
INSUFFICIENT_POINTS = Status.insufficient_points
OFFER_NOT_FOUND = Status.offer_not_found
NAMES = STATUS_NAMES

POINTS = canonical.PROGRAM_POINTS
STAMPS = canonical.PROGRAM_STAMPS
PROGRAM_KINDS = {"points": POINTS, "stamps": STAMPS}
REWARD_BASE = 2**63
PRICE_MAX = 2**62
RATE_MAX = 10000
STAMPS_MAX = 1000
LIST_MAX = 4096                   # as a stock's lists (ext: STOCKS)

COMMON_KEYS = {"id", "kind", "merchants", "tags"}
KIND_KEYS = {POINTS: {"rate", "offers"}, STAMPS: {"threshold", "stamps", "reward_stock"}}
REQUIRED = {POINTS: ("rate",), STAMPS: ("stamps", "reward_stock")}


def _item(status: int, **extra) -> dict:
    out = {"status": int(status)}
    if status != Status.ok:
        out["error"] = NAMES[int(status)]
    out.update(extra)
    return out


@dataclass
class Program:
    id: int
    kind: int
    merchants: frozenset = frozenset()
    tags: frozenset = frozenset()
    rate: int = 0
    offers: dict = field(default_factory=dict)     # stock id -> price
    threshold: int = 0
    stamps: int = 0
    reward_stock: int = 0

    def definition(self) -> tuple:
        return (self.kind, self.merchants, self.tags, self.rate,
                frozenset(self.offers.items()), self.threshold, self.stamps,
                self.reward_stock)


@dataclass
class Membership:
    points: int = 0
    stamps: int = 0
    reward: int = 0            # the last reward coupon issued, until a take-back at 0


@dataclass
class Earning:
    points: int = 0            # earned at completion
    clawed: int = 0            # taken back by refunds, cumulative
    stamped: int = 0


@dataclass
class StockStats:
    redeemed: int = 0
    gmv: int = 0
    payers_new: int = 0
    payers_returning: int = 0


@dataclass
class MerchantStats:
    payments: int = 0
    gmv: int = 0
    unique_payers: int = 0
    repeat_payers: int = 0
    coupon_payments: int = 0
    points_issued: int = 0


def _bps(part: int, whole: int) -> int:
    return part * 10000 // whole if whole else 0


class MembershipReference(MoneyReference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.programs: dict[int, Program] = {}
        self.memberships: dict[tuple, Membership] = {}     # (user, program)
        self.earnings: dict[tuple, Earning] = {}            # (payment, program)
        self.redemptions: dict[int, tuple] = {}             # coupon -> (user, program, stock, price)
        self.visits: dict[tuple, int] = {}                  # (user, merchant) -> payments
        self.stock_stats: dict[int, StockStats] = {}
        self.merchant_stats: dict[int, MerchantStats] = {}
        self.reward_k = 1                                   # next k of 2**63 + k

    # --- dispatch ------------------------------------------------------------

    def call(self, op: str, request: dict) -> dict:
        if op == "PROGRAMS":
            return self._programs_op(request)
        if op == "REDEEM_POINTS":
            return self._redeem_op(request)
        if op == "STATS":
            self._expire_for_read()           # a read: expire due holds first
            return self._stats_op(request)
        return super().call(op, request)

    # =========================================================================
    # PROGRAMS (ext: PROGRAMS)
    # =========================================================================

    def _programs_op(self, request) -> dict:
        items = self._items(request, "programs")
        self._stamp()
        return {"results": [self._program_item(item) for item in items]}

    def _program_item(self, item) -> dict:
        if not isinstance(item, dict) or "id" not in item or not _is_u64(item["id"]):
            return _invalid("program item must be a map with a u64 id")
        if item["id"] == 0:
            return _item(Status.invalid_id)
        try:
            program = self._parse_program(item)
        except ValueError as e:
            return _invalid(str(e))
        existing = self.programs.get(program.id)
        if existing is not None:
            if existing.definition() == program.definition():
                return _item(Status.ok, duplicate=True)
            return _item(Status.exists_with_different_fields)
        for sid in list(program.offers) + ([program.reward_stock] if program.kind == STAMPS
                                           else []):
            if sid not in self.stocks:          # 0 or unknown
                return _item(Status.stock_not_found)
        self.programs[program.id] = program
        return _item(Status.ok)

    @staticmethod
    def _parse_program(item: dict) -> Program:
        unknown = set(item) - COMMON_KEYS - KIND_KEYS[POINTS] - KIND_KEYS[STAMPS]
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(map(str, unknown))}")
        kind = item.get("kind")
        if not isinstance(kind, str) or kind not in PROGRAM_KINDS:
            raise ValueError("kind must be 'points' or 'stamps'")
        kind = PROGRAM_KINDS[kind]
        other = set(item) & KIND_KEYS[1 - kind]
        if other:
            raise ValueError(f"field(s) of the other kind: {sorted(other)}")
        for key in REQUIRED[kind]:
            if key not in item:
                raise ValueError(f"missing required key {key!r}")
        lists = {}
        for key, ok in (("merchants", lambda v: _is_u64(v) and v != 0), ("tags", _is_u32)):
            value = item.get(key, [])
            if not isinstance(value, list) or len(value) > LIST_MAX \
                    or not all(ok(v) for v in value):
                raise ValueError(f"{key} must be a list of at most {LIST_MAX} "
                                 + ("nonzero u64" if key == "merchants" else "u32"))
            lists[key] = frozenset(value)
        program = Program(id=item["id"], kind=kind, merchants=lists["merchants"],
                          tags=lists["tags"])
        if kind == POINTS:
            if not _in_range(item["rate"], 1, RATE_MAX):
                raise ValueError(f"rate must be in 1..{RATE_MAX}")
            program.rate = item["rate"]
            offers = item.get("offers", [])
            if not isinstance(offers, list) or len(offers) > OFFERS_MAX:
                raise ValueError(f"offers must be a list of at most {OFFERS_MAX}")
            for offer in offers:
                if not isinstance(offer, dict) or set(offer) != {"stock", "price"} \
                        or not _is_u64(offer["stock"]) \
                        or not _in_range(offer["price"], 1, PRICE_MAX):
                    raise ValueError("an offer is {stock: u64, price: 1..2**62}")
                known = program.offers.get(offer["stock"])
                if known is not None and known != offer["price"]:
                    raise ValueError("two offers of one stock with different prices")
                program.offers[offer["stock"]] = offer["price"]
        else:
            if not _in_range(item.get("threshold", 0), 0, AMOUNT_MAX):
                raise ValueError("threshold must be in 0..10**14")
            if not _in_range(item["stamps"], 1, STAMPS_MAX):
                raise ValueError(f"stamps must be in 1..{STAMPS_MAX}")
            if not _is_u64(item["reward_stock"]):
                raise ValueError("reward_stock must be a u64")
            program.threshold = item.get("threshold", 0)
            program.stamps = item["stamps"]
            program.reward_stock = item["reward_stock"]
        return program

    def covers(self, program: Program, merchant_id: int) -> bool:
        """Scope as a platform stock's: listed or tagged; both empty = every merchant."""
        if not program.merchants and not program.tags:
            return True
        merchant = self.merchants[merchant_id]
        return merchant_id in program.merchants or bool(program.tags & merchant.tags)

    def membership(self, user: int, program: int) -> Membership:
        return self.memberships.setdefault((user, program), Membership())

    # =========================================================================
    # Completion: earning, stamps, visits, stats (ext: Earning, clawback, stamps;
    # STATS)
    # =========================================================================

    def _pay_one(self, rec, now):
        result = super()._pay_one(rec, now)
        if result["status"] == Status.ok and not result["flags"] & RESULT_DUPLICATE \
                and not int(rec["flags"]) & PAY_AUTHORIZE:
            self._completed(self.payments[int(rec["id"])], now)
        return result

    def _capture_one(self, pid, amount, now):
        result = super()._capture_one(pid, amount, now)
        if result["status"] == Status.ok and not result["flags"] & RESULT_DUPLICATE:
            self._completed(self.payments[pid], now)
        return result

    def _completed(self, p, now: int) -> None:
        """A payment completed (PAY, or CAPTURE of an authorization): p.amount,
        p.cash and the kept coupons are final."""
        user, mid, pid = p.user, p.merchant, int(p.request["id"])
        before = self.visits.get((user, mid), 0)     # completed payments there before
        self.visits[(user, mid)] = before + 1
        ms = self.merchant_stats.setdefault(mid, MerchantStats())
        ms.payments += 1
        ms.gmv += p.amount
        if before == 0:
            ms.unique_payers += 1
        elif before == 1:
            ms.repeat_payers += 1
        kept = p.kept()
        if kept:
            ms.coupon_payments += 1
        for _, coupon_id in kept:
            ss = self.stock_stats.setdefault(self.coupons[coupon_id].stock, StockStats())
            ss.redeemed += 1
            ss.gmv += p.amount
            if before:
                ss.payers_returning += 1
            else:
                ss.payers_new += 1
        for prog in sorted(self.programs.values(), key=lambda x: x.id):
            if not self.covers(prog, mid):
                continue
            earning = self.earnings[(pid, prog.id)] = Earning()
            if prog.kind == POINTS:
                earning.points = p.cash * prog.rate // 100
                if earning.points:           # earning 0 points makes no membership
                    self.membership(user, prog.id).points += earning.points
                ms.points_issued += earning.points
            elif p.amount >= prog.threshold:
                earning.stamped = 1
                card = self.membership(user, prog.id)
                card.stamps = min(card.stamps + 1, prog.stamps)
                if card.stamps >= prog.stamps:
                    coupon_id = self._issue_reward(prog.reward_stock, user, now)
                    if coupon_id:
                        card.stamps, card.reward = 0, coupon_id

    def _issue_reward(self, stock_id: int, user: int, now: int) -> int:
        """The reward coupon 2**63 + k (the next k whose id is free), through
        ISSUE's checks. Returns its id, or 0 if the stock cannot issue."""
        k = self.reward_k
        while REWARD_BASE + k in self.coupons:
            k += 1
        rec = np.zeros((), ISSUE_RECORD)
        rec["coupon"], rec["stock"], rec["user"] = REWARD_BASE + k, stock_id, user
        if self._issue_one(rec, now)["status"] != Status.ok:
            return 0
        self.reward_k = k + 1
        return REWARD_BASE + k

    # =========================================================================
    # Refunds: clawback and the full-refund rules
    # =========================================================================

    def _refund_to(self, p, total: int) -> tuple:
        now = self.stamp                     # the refund call's kept stamp
        pid, T = int(p.request["id"]), p.amount
        mine = sorted((prog_id, e) for (epid, prog_id), e in self.earnings.items()
                      if epid == pid)
        if total == T:
            # A full refund takes the stamps back. "If the reward was already
            # used" is judged as the refund finds it, before its own effects:
            # a reward this very payment used still counts as used, though the
            # refund then returns it (docs/reference/rules.md Refunds: R = T).
            for prog_id, earning in mine:
                if earning.stamped:
                    self._take_stamp_back(self.membership(p.user, prog_id),
                                          self.programs[prog_id], now)
        out = super()._refund_to(p, total)
        R = p.refunded_amount
        for prog_id, earning in mine:        # points: the cumulative floor share
            if self.programs[prog_id].kind == POINTS:
                total_clawed = R * earning.points // T
                if total_clawed != earning.clawed:
                    self.membership(p.user, prog_id).points -= total_clawed - earning.clawed
                earning.clawed = total_clawed
        if R == T:
            for _, coupon_id in p.kept():    # returned by the full refund
                self.stock_stats[self.coupons[coupon_id].stock].redeemed -= 1
        return out

    def _take_stamp_back(self, card: Membership, prog: Program, now: int) -> None:
        if card.stamps == 0 and card.reward:
            reward = self.coupons[card.reward]
            if reward.state == canonical.COUPON_AVAILABLE:     # unused (expired or not)
                reward.expires_at = min(reward.expires_at, now)   # expires at once
                card.stamps = prog.stamps - 1
            else:
                card.stamps = -1
            card.reward = 0
        else:
            card.stamps -= 1

    # =========================================================================
    # REDEEM_POINTS (ext: REDEEM_POINTS)
    # =========================================================================

    def _redeem_op(self, request) -> dict:
        items = self._items(request, "redemptions")
        now = self._stamp()
        return {"results": [self._redeem_item(item, now) for item in items]}

    def _redeem_item(self, item, now: int) -> dict:
        if not isinstance(item, dict) or set(item) != {"coupon", "user", "program", "stock"} \
                or not all(_is_u64(v) for v in item.values()):
            return _invalid("a redemption is {coupon, user, program, stock}, each a u64")
        cid, user, prog_id, sid = item["coupon"], item["user"], item["program"], item["stock"]

        def fail(status):
            return _item(status, coupon=cid, points=0, expires_at=0)

        if cid == 0:
            return fail(Status.invalid_id)
        if cid in self.coupons:
            if self.redemptions.get(cid, (None,))[:3] == (user, prog_id, sid):
                card = self.memberships.get((user, prog_id), Membership())
                return _item(Status.ok, coupon=cid, points=card.points,
                             expires_at=self.coupons[cid].expires_at, duplicate=True)
            return fail(Status.exists_with_different_fields)
        prog = self.programs.get(prog_id)
        if prog is None or prog.kind != POINTS:
            return fail(PROGRAM_NOT_FOUND)
        if sid not in prog.offers:
            return fail(OFFER_NOT_FOUND)
        stock = self.stocks[sid]
        if now >= stock.valid_until:                        # ISSUE's checks
            return fail(Status.stock_ended)
        if stock.max_issued and stock.issued >= stock.max_issued:
            return fail(Status.stock_exhausted)
        if user not in self.wallets:
            return fail(Status.user_not_found)
        if stock.per_user_limit and sum(1 for c in self.coupons.values()
                                        if c.stock == sid and c.user == user) \
                >= stock.per_user_limit:
            return fail(Status.per_user_limit)
        price = prog.offers[sid]
        if self.memberships.get((user, prog_id), Membership()).points < price:
            return fail(INSUFFICIENT_POINTS)
        rec = np.zeros((), ISSUE_RECORD)
        rec["coupon"], rec["stock"], rec["user"] = cid, sid, user
        issued = self._issue_one(rec, now)
        assert issued["status"] == Status.ok, issued
        card = self.membership(user, prog_id)
        card.points -= price
        self.redemptions[cid] = (user, prog_id, sid, price)
        return _item(Status.ok, coupon=cid, points=card.points,
                     expires_at=int(issued["expires_at"]))

    # =========================================================================
    # BALANCES memberships (ext: BALANCES, extended)
    # =========================================================================

    def _balances_op(self, request) -> dict:
        request = self._single(request)
        if "memberships" not in request:
            return super()._balances_op(request)
        asked = request["memberships"]
        rest = {k: v for k, v in request.items() if k != "memberships"}
        if not isinstance(asked, list) or not all(
                isinstance(m, dict) and set(m) == {"user", "program"}
                and _is_u64(m["user"]) and _is_u64(m["program"]) for m in asked):
            return _invalid("memberships must be a list of {user: u64, program: u64}")
        reply = super()._balances_op(rest)
        if reply["status"] != Status.ok:
            return reply
        out = []
        for m in asked:
            user, prog = m["user"], m["program"]
            if user not in self.wallets:
                out.append({"user": user, "program": prog, **_item(Status.user_not_found)})
            elif prog not in self.programs:
                out.append({"user": user, "program": prog, **_item(PROGRAM_NOT_FOUND)})
            else:
                card = self.memberships.get((user, prog), Membership())
                out.append({"user": user, "program": prog, "status": 0,
                            "points": card.points, "stamps": card.stamps})
        reply["memberships"] = out
        return reply

    # =========================================================================
    # STATS (ext: STATS)
    # =========================================================================

    def _stats_op(self, request) -> dict:
        request = self._single(request)
        unknown = set(request) - {"stocks", "merchants"}
        if unknown:
            return _invalid(f"unknown key(s) {sorted(map(str, unknown))}")
        for key in ("stocks", "merchants"):
            ids = request.get(key, [])
            if not isinstance(ids, list) or not all(_is_u64(i) for i in ids):
                return _invalid(f"{key} must be a list of u64")
        stocks = []
        for sid in request.get("stocks", []):
            s = self.stocks.get(sid)
            if s is None:
                stocks.append({"id": sid, **_item(Status.stock_not_found)})
                continue
            ss = self.stock_stats.get(sid, StockStats())
            stocks.append({
                "id": sid, "status": 0, "name": s.name, "issued": s.issued,
                "redeemed": ss.redeemed,
                "redemption_rate_bps": _bps(ss.redeemed, s.issued),
                "discount_spent": s.spent,
                "budget_left": s.budget - s.spent - s.reserved if s.budget else -1,
                "gmv": ss.gmv, "payers_new": ss.payers_new,
                "payers_returning": ss.payers_returning})
        merchants = []
        for mid in request.get("merchants", []):
            if mid not in self.merchants:
                merchants.append({"id": mid, **_item(Status.merchant_not_found)})
                continue
            ms = self.merchant_stats.get(mid, MerchantStats())
            merchants.append({
                "id": mid, "status": 0, "payments": ms.payments, "gmv": ms.gmv,
                "unique_payers": ms.unique_payers, "repeat_payers": ms.repeat_payers,
                "repeat_payer_share_bps": _bps(ms.repeat_payers, ms.unique_payers),
                "coupon_payments": ms.coupon_payments,
                "coupon_payment_share_bps": _bps(ms.coupon_payments, ms.payments),
                "points_issued": ms.points_issued})
        return {"status": 0, "stocks": stocks, "merchants": merchants}

    # =========================================================================
    # Canonical state
    # =========================================================================

    def canonical(self) -> dict:
        t = super().canonical()
        progs = self.programs.values()
        t["programs"] = _table("programs", [
            dict(id=p.id, kind=p.kind, rate=p.rate, threshold=p.threshold, stamps=p.stamps,
                 reward_stock=p.reward_stock) for p in progs])
        t["program_lists"] = _table("program_lists", [
            dict(program=p.id, list=which, value=v) for p in progs
            for which, values in ((0, p.merchants), (1, p.tags)) for v in values])
        t["program_offers"] = _table("program_offers", [
            dict(program=p.id, stock=s, price=price) for p in progs
            for s, price in p.offers.items()])
        t["memberships"] = _table("memberships", [
            dict(user=u, program=g, points=m.points, stamps=m.stamps, reward=m.reward)
            for (u, g), m in self.memberships.items()])
        t["earnings"] = _table("earnings", [
            dict(payment=pid, program=g, points=e.points, clawed=e.clawed, stamped=e.stamped)
            for (pid, g), e in self.earnings.items()])
        t["redemptions"] = _table("redemptions", [
            dict(coupon=c, user=u, program=g, stock=s, price=price)
            for c, (u, g, s, price) in self.redemptions.items()])
        t["visits"] = _table("visits", [dict(user=u, merchant=m, payments=n)
                                        for (u, m), n in self.visits.items()])
        t["stock_stats"] = _table("stock_stats", [
            dict(stock=s, redeemed=x.redeemed, gmv=x.gmv, payers_new=x.payers_new,
                 payers_returning=x.payers_returning)
            for s, x in self.stock_stats.items()
            if x.redeemed or x.gmv or x.payers_new or x.payers_returning])
        t["merchant_stats"] = _table("merchant_stats", [
            dict(merchant=m, payments=x.payments, gmv=x.gmv, unique_payers=x.unique_payers,
                 repeat_payers=x.repeat_payers, coupon_payments=x.coupon_payments,
                 points_issued=x.points_issued)
            for m, x in self.merchant_stats.items() if x.payments])
        return t
