"""Plain-Python reference of the money lifecycle (docs/reference/rules.md
"Two-phase payments", "Refunds", "Reversal", "Settlement", with their Scanpay
notes; shapes in docs/reference/protocol.md, CAPTURE to STATEMENT).

`MoneyReference` extends `tests/support/reference.py`'s `Reference` (PAY direct, ISSUE,
the setup and read map ops) with:

- PAY with the authorize flag 4 (AUTHORIZE): hold, locked coupons, reserved
  budget, `hold_expires_at = now + hold_ms`;
- expiry of holds before every command (and, for a read that finds a due hold,
  a kept stamp: the engine journals an internal EXPIRE command first);
- CAPTURE, VOID, REFUND, REVERSE, GET_PAYMENTS, SETTLE, STATEMENT map ops;
- the binary batches `capture(records)` (CAPTURE_RECORD -> PAY_RESULT) and
  `refund(records)` (REFUND_RECORD -> REFUND_RESULT);
- tombstones (reversals of payments never seen);
- cumulative floor refund shares in Python ints (exact, unbounded);
- settlement periods, payouts merchant -> bank, the settlement history;
- canonical() with every lifecycle column of engine/core/canonical.py.

It was written from the two documents only (not from ext/kernel.pyx). Money is
Python `int` everywhere; numpy appears only at the record boundary.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from engine.core import canonical
from engine.protocol.errors import BadBody, UnknownOp
from engine.protocol.records import (
    CAPTURE_RECORD, PAY_AUTHORIZE, PAY_FLAGS_KNOWN, PAY_NO_COUPONS, PAY_RESULT,
    REFUND_RECORD, REFUND_RESULT, RESULT_AUTHORIZED, RESULT_DUPLICATE)
from engine.protocol.limits import AMOUNT_MAX, AMOUNT_MIN
from engine.protocol.status import STATUS_NAMES, Status

from support.reference import (Reference, _invalid, _is_i64, _is_int, _is_u32, _is_u64,
                       _status_item, _table)

HOLD_MS_DEFAULT = 7 * 24 * 3600 * 1000      # docs/reference/rules.md: hold_ms default 7 days
DAY_MS = 86_400_000
GET_PAYMENTS_IDS_MAX = 100_000              # the engine's limit (not in the docs)

AUTHORIZED = canonical.PAYMENT_AUTHORIZED
COMPLETED = canonical.PAYMENT_COMPLETED
PARTIALLY_REFUNDED = canonical.PAYMENT_PARTIALLY_REFUNDED
REFUNDED = canonical.PAYMENT_REFUNDED
VOIDED = canonical.PAYMENT_VOIDED
EXPIRED = canonical.PAYMENT_EXPIRED
PAID_STATES = (COMPLETED, PARTIALLY_REFUNDED, REFUNDED)

# The map operations this file adds, and which of all of them only read.
MONEY_WRITE_OPS = ("CAPTURE", "VOID", "REFUND", "REVERSE", "SETTLE")
MONEY_READ_OPS = ("GET_PAYMENTS", "STATEMENT")
READ_ONLY_OPS = ("QUOTE", "BALANCES", "COUPONS", "AUDIT") + MONEY_READ_OPS


# ---------------------------------------------------------------------------
# State this scope adds
# ---------------------------------------------------------------------------

@dataclass
class LifePayment:
    """One payment (PAY or AUTHORIZE) through its whole life: the columns of
    canonical.PAYMENTS, plus the results that CAPTURE and VOID replay."""
    request: np.void            # the PayRecord as sent
    result: np.void             # the original PAY/AUTHORIZE result, no duplicate flag
    user: int                   # the payer after resolving a payment code
    merchant: int
    coupons: list               # result.coupons, nonzero, in applied order
    applied: list               # applied part (authorized: reserved part) of coupons[i]
    state: int
    amount: int                 # T: authorized amount, the captured amount once captured
    authorized_amount: int      # 0 for a direct PAY
    cash: int                   # posted (authorized: the hold)
    discount: int               # posted (authorized: the reservation)
    fee: int                    # posted (authorized: the fee it would pay)
    created_at: int
    completed_at: int = 0       # 0 until completed
    ended_at: int = 0           # void or expiry time
    hold_expires_at: int = 0    # 0 for a direct PAY
    day: int = 0                # the engine day it was made (paid or authorized)
    released: int = 0           # bit i: coupons[i] released at capture
    reversed: bool = False      # ended by REVERSE
    refunded_part: list = field(default_factory=lambda: [0, 0, 0, 0])
    refunded_amount: int = 0    # R
    refunded_cash: int = 0
    refunded_fee: int = 0
    capture_result: np.void | None = None   # replayed by CAPTURE (same amount)
    void_result: np.void | None = None      # replayed by VOID

    def kept(self) -> list:
        """(index, coupon id) of the coupons still applied (not released at capture)."""
        return [(i, c) for i, c in enumerate(self.coupons) if not self.released >> i & 1]


@dataclass
class Period:
    """A merchant's totals since the last settlement (docs/reference/rules.md "Settlement")."""
    active: bool = False
    gross: int = 0
    merchant_discount: int = 0
    platform_discount: int = 0
    fees: int = 0
    refund_cash: int = 0
    refund_platform_discount: int = 0
    refund_merchant_discount: int = 0
    refund_fee: int = 0
    settled_balance: int = 0    # the merchant's balance right after the last payout


@dataclass
class Refund:
    id: int
    payment: int
    amount: int
    cash: int
    discount: int
    fee: int


def _pad4(values: list) -> list:
    return list(values) + [0] * (4 - len(values))


def _pay_result(pid: int, status: int, now: int, flags: int = 0, cash: int = 0,
                discount: int = 0, fee: int = 0, coupons=()) -> np.void:
    out = np.zeros((), PAY_RESULT)
    out["id"], out["status"], out["flags"] = pid, int(status), flags
    out["cash"], out["discount"], out["fee"] = cash, discount, fee
    out["timestamp"] = now
    out["coupons"] = _pad4(list(coupons))
    return out


def _pay_result_map(result: np.void) -> dict:
    """ext: Shapes, PayResult maps: {id, status, flags, cash, discount, fee,
    timestamp, coupons} + error on failure + duplicate: true on a replay."""
    status = int(result["status"])
    out = {"id": int(result["id"]), "status": status, "flags": int(result["flags"]),
           "cash": int(result["cash"]), "discount": int(result["discount"]),
           "fee": int(result["fee"]), "timestamp": int(result["timestamp"]),
           "coupons": [int(c) for c in result["coupons"] if c != 0]}
    if status != Status.ok:
        out["error"] = STATUS_NAMES[status]
    if out["flags"] & RESULT_DUPLICATE:
        out["duplicate"] = True
    return out


def _replay(result: np.void) -> np.void:
    out = result.copy()
    out["flags"] |= RESULT_DUPLICATE
    return out


# ---------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------

class MoneyReference(Reference):
    def __init__(self, clock=None, code_source=None, tz_offset_ms: int = 8 * 3600 * 1000,
                 hold_ms: int = HOLD_MS_DEFAULT):
        super().__init__(clock=clock, code_source=code_source, tz_offset_ms=tz_offset_ms)
        self.hold_ms = hold_ms
        self.payments: dict[int, LifePayment] = {}
        self.refunds: dict[int, Refund] = {}
        self.tombstones: set[int] = set()
        # ext: Keys, roles and merchant scope: reversals of unknown ids by a
        # scoped key, id -> the merchants whose PAYs they block.
        self.scoped_tombstones: dict[int, set] = {}
        self.periods: dict[int, Period] = {}     # merchant id -> Period
        self.settlements: list[dict] = []        # SETTLE replies, in order
        self.stock_day: dict[int, tuple] = {}    # stock id -> (day, day_spent)

    def period(self, merchant_id: int) -> Period:
        return self.periods.setdefault(merchant_id, Period())

    def engine_day(self, now: int) -> int:
        """ext: Campaign controls: engine days are (now + tz_offset_ms) // 1 day."""
        return (now + self.tz_offset_ms) // DAY_MS

    def _day_change(self, stock_id: int, day: int, delta: int) -> None:
        """ext: Campaign controls: every change to a payment's coupon parts
        (pay, authorize, capture, release, refund) counts on the payment's day.
        The stock keeps the last day with a change and that day's net discount;
        a change for an older day no longer moves it."""
        last, spent = self.stock_day.get(stock_id, (0, 0))
        if day > last:
            self.stock_day[stock_id] = (day, delta)
        elif day == last:
            self.stock_day[stock_id] = (day, spent + delta)

    # --- time and expiry (docs/reference/rules.md "Units, identities, time"; ext: Expiry of holds)

    def _stamp(self) -> int:
        """Every state-changing call: stamp max(previous, clock), keep it, and void
        every hold that has expired before applying anything."""
        now = super()._stamp()
        self._expire_due(now)
        return now

    def _due(self, now: int) -> list:
        return [p for p in self.payments.values()
                if p.state == AUTHORIZED and now >= p.hold_expires_at]

    def _expire_due(self, now: int) -> None:
        """A hold has expired when now >= hold_expires_at (half-open): state
        expired, ended_at = hold_expires_at (voiding does not depend on when)."""
        for p in self._due(now):
            self._release_authorization(p, EXPIRED, p.hold_expires_at)

    def _expire_for_read(self) -> None:
        """engine.read_command: a read that finds an expired hold first runs an
        internal EXPIRE command (journaled, so its stamp is kept), then answers."""
        if self._due(self._read_time()):
            self._stamp()

    # --- dispatch --------------------------------------------------------------

    def call(self, op: str, request: dict) -> dict:
        handlers = {"CAPTURE": self._capture_op, "VOID": self._void_op,
                    "REFUND": self._refund_op, "REVERSE": self._reverse_op,
                    "SETTLE": self._settle_op, "GET_PAYMENTS": self._get_payments_op,
                    "STATEMENT": self._statement_op}
        if op in READ_ONLY_OPS:
            self._expire_for_read()      # before anything, even a bad body
        if op in handlers:
            return handlers[op](request)
        return super().call(op, request)

    # =========================================================================
    # PAY and AUTHORIZE (docs/reference/rules.md "Paying", "Two-phase payments")
    # =========================================================================

    def _quote_op(self, request) -> dict:
        """QUOTE is PAY's computation with no effect, authorize flag or not."""
        if isinstance(request, dict) and _is_u32(request.get("flags", 0)) \
                and request.get("flags", 0) & PAY_AUTHORIZE:
            request = {**request, "flags": request["flags"] & ~PAY_AUTHORIZE}
        return super()._quote_op(request)

    def _pay_one(self, rec: np.void, now: int) -> np.void:
        pid, amount, flags = int(rec["id"]), int(rec["amount"]), int(rec["flags"])
        named = [int(c) for c in rec["coupons"] if c != 0]

        # Step 1: checks that need no state.
        if pid == 0:
            return self._fail(pid, Status.invalid_id, now)
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            return self._fail(pid, Status.invalid_amount, now)
        if flags & ~PAY_FLAGS_KNOWN or (named and flags & PAY_NO_COUPONS):
            return self._fail(pid, Status.invalid_flags, now)

        # Step 2: idempotency; a payment id reversed before it arrived.
        previous = self.payments.get(pid)
        if previous is not None:
            if previous.request.tobytes() == rec.tobytes():
                return _replay(previous.result)       # whatever the current state
            return self._fail(pid, Status.exists_with_different_fields, now)
        if pid in self.tombstones:
            return self._fail(pid, Status.reversed, now)
        if int(rec["merchant"]) in self.scoped_tombstones.get(pid, ()):
            return self._fail(pid, Status.reversed, now)

        # Steps 3-6 (shared with QUOTE).
        plan = self._plan(now, int(rec["payer"]), int(rec["merchant"]), amount, flags,
                          int(rec["goods_tag"]), named, want_explain=False)
        if plan.status != Status.ok:
            return self._fail(pid, plan.status, now)

        merchant_id = int(rec["merchant"])
        authorize = bool(flags & PAY_AUTHORIZE)
        day = self.engine_day(now)
        for coupon, applied in plan.chosen:
            self._day_change(coupon.stock, day, applied)
        wallet = self.wallets[plan.user]
        if authorize:
            # Two-phase: the cash is held (available drops, balance does not),
            # coupons locked, their discount reserved against the stock budget.
            wallet.held += plan.cash
            for coupon, applied in plan.chosen:
                self.stocks[coupon.stock].reserved += applied
                coupon.state = canonical.COUPON_LOCKED
                coupon.payment = pid
        else:
            self._post_payment(merchant_id, plan.user, amount, plan.cash, plan.fee,
                               plan.chosen, pid)
        if plan.code is not None:
            plan.code.used = True                     # consumed only by a success

        result = _pay_result(pid, Status.ok, now, RESULT_AUTHORIZED if authorize else 0,
                             plan.cash, plan.discount, plan.fee,
                             [c.id for c, _ in plan.chosen])
        self.payments[pid] = LifePayment(
            request=rec.copy(), result=result.copy(), user=plan.user, merchant=merchant_id,
            coupons=[c.id for c, _ in plan.chosen], applied=[a for _, a in plan.chosen],
            state=AUTHORIZED if authorize else COMPLETED, amount=amount,
            authorized_amount=amount if authorize else 0,
            cash=plan.cash, discount=plan.discount, fee=plan.fee, created_at=now,
            completed_at=0 if authorize else now,
            hold_expires_at=now + self.hold_ms if authorize else 0, day=day)
        return result

    def _post_payment(self, merchant_id: int, user: int, amount: int, cash: int, fee: int,
                      chosen: list, pid: int) -> None:
        """Paying step 7 (PAY, and CAPTURE with the recomputed parts):
        wallet -> merchant cash; campaign -> merchant each platform coupon's part;
        merchant -> fees the fee; coupons used; stocks' spent grows; the period
        totals of settlement."""
        merchant = self.merchants[merchant_id]
        self.wallets[user].balance -= cash
        merchant.balance += cash
        merchant_funded = 0
        for coupon, applied in chosen:
            stock = self.stocks[coupon.stock]
            if stock.funder == canonical.FUNDER_PLATFORM:
                stock.campaign -= applied
                merchant.balance += applied
            else:
                merchant_funded += applied
            stock.spent += applied
            coupon.state = canonical.COUPON_USED
            coupon.payment = pid
        merchant.balance -= fee
        self.fees += fee
        period = self.period(merchant_id)
        period.active = True
        period.gross += amount
        period.merchant_discount += merchant_funded
        period.platform_discount += sum(a for _, a in chosen) - merchant_funded
        period.fees += fee

    def _release_authorization(self, p: LifePayment, state: int, ended_at: int) -> None:
        """VOID / expiry / REVERSE of an authorization: the hold, the coupons and
        the reserved budget are released. The payment keeps its hold/reservation
        columns (ext: GET_PAYMENTS)."""
        self.wallets[p.user].held -= p.cash
        for coupon_id, reserved in zip(p.coupons, p.applied):
            coupon = self.coupons[coupon_id]
            self.stocks[coupon.stock].reserved -= reserved
            self._day_change(coupon.stock, p.day, -reserved)
            coupon.state = canonical.COUPON_AVAILABLE
            coupon.payment = 0
        p.state = state
        p.ended_at = ended_at

    # =========================================================================
    # CAPTURE (docs/reference/rules.md "Two-phase payments"; ext: CAPTURE)
    # =========================================================================

    def capture(self, records: np.ndarray) -> np.ndarray:
        """CAPTURE as a batch of CaptureRecords -> PayResults (extension)."""
        self._check_batch(records, CAPTURE_RECORD)
        now = self._stamp()
        out = np.zeros(len(records), PAY_RESULT)
        for i in range(len(records)):
            out[i] = self._capture_one(int(records[i]["payment"]), int(records[i]["amount"]),
                                       now)
        return out

    # ext: Keys, roles and merchant scope -------------------------------------

    def _scoped_items(self, request, key: str) -> tuple[list, set | None]:
        """A list op's items and its `scope` (None: every merchant)."""
        if isinstance(request, dict) and "scope" in request:
            scope = request["scope"]
            if not isinstance(scope, list) or not all(
                    _is_u64(m) and m > 0 for m in scope):
                raise BadBody("`scope` must be a list of merchant ids")
            rest = {k: v for k, v in request.items() if k != "scope"}
            return self._items(rest, key), set(scope)
        return self._items(request, key), None

    def _outside(self, pid: int, scope) -> bool:
        """The payment exists at a merchant outside `scope`."""
        p = self.payments.get(pid)
        return scope is not None and p is not None and p.merchant not in scope

    @staticmethod
    def _forbidden(ident: int) -> dict:
        return {"id": ident, "status": int(Status.forbidden), "error": "forbidden",
                "cash": 0, "discount": 0, "fee": 0}

    def _capture_op(self, request) -> dict:
        items, scope = self._scoped_items(request, "captures")
        now = self._stamp()
        results = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"payment", "amount"} \
                    or not _is_u64(item["payment"]) or not _is_i64(item["amount"]):
                results.append(_invalid("a capture is {payment: u64, amount: int}"))
                continue
            if self._outside(item["payment"], scope):
                results.append(self._forbidden(item["payment"]))
                continue
            results.append(_pay_result_map(self._capture_one(item["payment"], item["amount"],
                                                             now)))
        return {"results": results}

    def _capture_one(self, pid: int, amount: int, now: int) -> np.void:
        def fail(status):
            return _pay_result(pid, status, now)

        p = self.payments.get(pid)                  # tombstones are unknown here
        if p is None:
            return fail(Status.payment_not_found)
        if p.capture_result is not None:            # captured (then perhaps refunded)
            if amount == p.amount:
                return _replay(p.capture_result)
            return fail(Status.payment_not_authorized)
        if p.state in (VOIDED,) or p.authorized_amount == 0:   # voided, or a direct PAY
            return fail(Status.payment_not_authorized)
        if p.state == EXPIRED:
            return fail(Status.authorization_expired)
        assert p.state == AUTHORIZED
        if not 1 <= amount <= p.authorized_amount:
            return fail(Status.invalid_amount)

        # Recompute each locked coupon on the final amount, in applied order:
        # min spend re-checked, percent recomputed, min(d, amount left, its
        # reserved part) -- a capture never spends more of a budget than the
        # authorization reserved (docs/reference/rules.md); one that no
        # longer applies, or whose applied part is 0, is released. Time, scope
        # and controls are not re-checked.
        left, applied, released = amount, [], 0
        for i, coupon_id in enumerate(p.coupons):
            stock = self.stocks[self.coupons[coupon_id].stock]
            part = min(self.discount_of(stock, amount), left, p.applied[i]) \
                if amount >= stock.min_spend else 0
            if part == 0:
                released |= 1 << i
            left -= part
            applied.append(part)
        kept = [(self.coupons[c], a) for i, (c, a) in enumerate(zip(p.coupons, applied))
                if not released >> i & 1]
        discount = sum(applied)
        cash = amount - discount
        merchant = self.merchants[p.merchant]
        fee = self.fee_of(merchant, amount, kept)          # the merchant's fee_bps now
        wallet = self.wallets[p.user]
        # Cash beyond the hold draws on the available balance.
        if cash - p.cash > wallet.available:
            return fail(Status.insufficient_funds)        # the authorization stays

        # Release the hold and the reservation, then the postings of step 7.
        wallet.held -= p.cash
        for i, coupon_id in enumerate(p.coupons):
            coupon = self.coupons[coupon_id]
            self.stocks[coupon.stock].reserved -= p.applied[i]
            self._day_change(coupon.stock, p.day, applied[i] - p.applied[i])
            if released >> i & 1:
                coupon.state = canonical.COUPON_AVAILABLE
                coupon.payment = 0
        self._post_payment(p.merchant, p.user, amount, cash, fee, kept, pid)

        p.state, p.amount, p.cash, p.discount, p.fee = COMPLETED, amount, cash, discount, fee
        p.applied, p.released, p.completed_at = applied, released, now
        p.capture_result = _pay_result(pid, Status.ok, now, 0, cash, discount, fee,
                                       [c.id for c, _ in kept])
        return p.capture_result.copy()

    # =========================================================================
    # VOID (docs/reference/rules.md "Two-phase payments"; ext: VOID)
    # =========================================================================

    def _void_op(self, request) -> dict:
        items, scope = self._scoped_items(request, "payments")
        now = self._stamp()
        results = []
        for item in items:
            if not _is_u64(item):
                results.append(_invalid("a payment id is a u64"))
                continue
            if self._outside(item, scope):
                results.append(self._forbidden(item))
                continue
            results.append(_pay_result_map(self._void_one(item, now)))
        return {"results": results}

    def _void_one(self, pid: int, now: int) -> np.void:
        p = self.payments.get(pid)
        if p is None:
            return _pay_result(pid, Status.payment_not_found, now)
        if p.state == VOIDED:
            return _replay(p.void_result)
        if p.state == EXPIRED:
            return _pay_result(pid, Status.authorization_expired, now)
        if p.state != AUTHORIZED:
            return _pay_result(pid, Status.payment_not_authorized, now)
        return self._void_authorization(p, now)

    def _void_authorization(self, p: LifePayment, now: int) -> np.void:
        """Result: cash = the released hold, discount = the released reservation,
        coupons = the released coupons, fee 0."""
        self._release_authorization(p, VOIDED, now)
        pid = int(p.request["id"])
        p.void_result = _pay_result(pid, Status.ok, now, 0, p.cash, p.discount, 0, p.coupons)
        return p.void_result.copy()

    # =========================================================================
    # REFUND (docs/reference/rules.md "Refunds"; ext: REFUND, Refund arithmetic)
    # =========================================================================

    def refund(self, records: np.ndarray) -> np.ndarray:
        """REFUND as a batch of RefundRecords -> RefundResults (extension)."""
        self._check_batch(records, REFUND_RECORD)
        self._stamp()
        out = np.zeros(len(records), REFUND_RESULT)
        for i in range(len(records)):
            r = records[i]
            rid = int(r["id"])
            amount = int(r["amount"])
            if rid != 0 and AMOUNT_MIN <= amount <= AMOUNT_MAX and int(r["reserved"]) != 0:
                # Reserved bytes must be 0 (invalid_flags). Docs are silent on the
                # order; as PAY step 1 (id, amount, flags): after the id and amount.
                res = {"id": rid, "status": int(Status.invalid_flags)}
            else:
                res = self._refund_one(rid, int(r["payment"]), int(r["amount"]))
            out[i]["id"] = rid
            out[i]["status"] = res["status"]
            out[i]["flags"] = RESULT_DUPLICATE if res.get("duplicate") else 0
            out[i]["cash"] = res.get("cash", 0)
            out[i]["discount"] = res.get("discount", 0)
            out[i]["fee"] = res.get("fee", 0)
        return out

    def _refund_op(self, request) -> dict:
        items, scope = self._scoped_items(request, "refunds")
        self._stamp()
        results = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"id", "payment", "amount"} \
                    or not _is_u64(item["id"]) or not _is_u64(item["payment"]) \
                    or not _is_i64(item["amount"]):
                results.append(_invalid("a refund is {id: u64, payment: u64, amount: int}"))
                continue
            if self._outside(item["payment"], scope):
                results.append(self._forbidden(item["id"]))
                continue
            results.append(self._refund_one(item["id"], item["payment"], item["amount"]))
        return {"results": results}

    def _refund_one(self, rid: int, pid: int, amount: int) -> dict:
        """-> {id, status, cash, discount, fee} (+ error, duplicate)."""
        def result(status, cash=0, discount=0, fee=0, duplicate=False):
            out = {"id": rid, "status": int(status), "cash": cash, "discount": discount,
                   "fee": fee}
            if status != Status.ok:
                out["error"] = STATUS_NAMES[int(status)]
            if duplicate:
                out["duplicate"] = True
            return out

        if rid == 0:
            return result(Status.invalid_id)
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            return result(Status.invalid_amount)
        known = self.refunds.get(rid)
        if known is not None:
            if known.payment == pid and known.amount == amount:
                return result(Status.ok, known.cash, known.discount, known.fee, duplicate=True)
            return result(Status.exists_with_different_fields)
        p = self.payments.get(pid)
        if p is None:
            return result(Status.payment_not_found)
        if p.state not in (COMPLETED, PARTIALLY_REFUNDED):
            return result(Status.payment_not_refundable)
        if amount > p.amount - p.refunded_amount:
            return result(Status.refund_exceeds_payment)
        cash, discount, fee = self._refund_to(p, p.refunded_amount + amount)
        self.refunds[rid] = Refund(rid, pid, amount, cash, discount, fee)
        return result(Status.ok, cash, discount, fee)

    def _refund_to(self, p: LifePayment, total: int) -> tuple:
        """Refund the payment up to R = total, cumulatively: each part's total is
        floor(R * part / T); post the growth. Returns the growth (cash, discount,
        fee)."""
        T, R = p.amount, total
        merchant = self.merchants[p.merchant]
        period = self.period(p.merchant)
        period.active = True
        # cash: merchant(m) -> wallet(payer)
        cash = R * p.cash // T - p.refunded_cash
        merchant.balance -= cash
        self.wallets[p.user].balance += cash
        period.refund_cash += cash
        # each coupon: platform merchant(m) -> campaign(stock); merchant-funded moves
        # no money; the stock's spent shrinks by the part either way.
        discount = 0
        for i, coupon_id in enumerate(p.coupons):
            part = R * p.applied[i] // T - p.refunded_part[i]
            p.refunded_part[i] += part
            discount += part
            stock = self.stocks[self.coupons[coupon_id].stock]
            stock.spent -= part
            self._day_change(stock.id, p.day, -part)
            if stock.funder == canonical.FUNDER_PLATFORM:
                merchant.balance -= part
                stock.campaign += part
                period.refund_platform_discount += part
            else:
                period.refund_merchant_discount += part
        # fee: fees -> merchant(m)
        fee = R * p.fee // T - p.refunded_fee
        self.fees -= fee
        merchant.balance += fee
        period.refund_fee += fee
        p.refunded_amount, p.refunded_cash, p.refunded_fee = R, p.refunded_cash + cash, \
            p.refunded_fee + fee
        if R == T:
            p.state = REFUNDED
            for i, coupon_id in p.kept():     # the payment's coupons go back
                coupon = self.coupons[coupon_id]
                coupon.state = canonical.COUPON_AVAILABLE
                coupon.payment = 0
        else:
            p.state = PARTIALLY_REFUNDED
        return cash, discount, fee

    # =========================================================================
    # REVERSE (docs/reference/rules.md "Reversal"; ext: REVERSE)
    # =========================================================================

    def _reverse_op(self, request) -> dict:
        items, scope = self._scoped_items(request, "payments")
        now = self._stamp()
        results = []
        for item in items:
            if not _is_u64(item):
                results.append(_invalid("a payment id is a u64"))
                continue
            if self._outside(item, scope):
                results.append(self._forbidden(item))
                continue
            results.append(_pay_result_map(self._reverse_one(item, now, scope)))
        return {"results": results}

    def _reverse_one(self, pid: int, now: int, scope=None) -> np.void:
        if pid == 0:
            return _pay_result(pid, Status.invalid_id, now)
        p = self.payments.get(pid)
        if p is None and scope is not None:
            # A scoped key's tombstone blocks PAYs at its merchants only; an
            # unscoped one already there blocks them all.
            if pid not in self.tombstones and scope:
                self.scoped_tombstones[pid] = self.scoped_tombstones.get(pid, set()) | scope
            return _pay_result(pid, Status.ok, now)
        if p is None:
            self.tombstones.add(pid)          # a PAY with this id later fails `reversed`
            self.scoped_tombstones.pop(pid, None)     # which says more than a scoped one
            return _pay_result(pid, Status.ok, now)
        if p.state in (COMPLETED, PARTIALLY_REFUNDED):
            coupons = [c for _, c in p.kept()]
            cash, discount, fee = self._refund_to(p, p.amount)    # the rest, in full
            p.reversed = True
            return _pay_result(pid, Status.ok, now, 0, cash, discount, fee, coupons)
        if p.state == AUTHORIZED:
            p.reversed = True
            return self._void_authorization(p, now)
        return _pay_result(pid, Status.ok, now)   # reversed, voided, expired, refunded

    # =========================================================================
    # GET_PAYMENTS (ext: GET_PAYMENTS)
    # =========================================================================

    def _get_payments_op(self, request) -> dict:
        request = self._single(request)
        scope = request.get("scope")
        if set(request) - {"scope"} != {"ids"} or not isinstance(request["ids"], list) \
                or len(request["ids"]) > GET_PAYMENTS_IDS_MAX \
                or not all(_is_u64(i) for i in request["ids"]):
            return _invalid("GET_PAYMENTS takes {ids: [u64]}", results=[])
        scope = None if scope is None else set(scope)
        return {"status": 0, "results": [
            {"id": i, "status": int(Status.forbidden), "error": "forbidden"}
            if self._outside(i, scope) else self._payment_view(i) for i in request["ids"]]}

    def _payment_view(self, pid: int) -> dict:
        p = self.payments.get(pid)
        if p is None:                              # unknown, or a tombstone
            return {"id": pid, **_status_item(Status.payment_not_found)}
        coupons = []
        for i, coupon_id in enumerate(p.coupons):
            # Every coupon of the original result; `released` (an engine
            # extension the docs do not list) marks one dropped at capture.
            stock = self.stocks[self.coupons[coupon_id].stock]
            coupons.append({"coupon": coupon_id, "stock": stock.id,
                            "funder": canonical.FUNDER_NAMES[stock.funder],
                            "discount": p.applied[i], "refunded": p.refunded_part[i],
                            "released": bool(p.released >> i & 1)})
        return {"status": 0, "id": pid, "payer": p.user, "merchant": p.merchant,
                "amount": p.amount, "authorized_amount": p.authorized_amount,
                "cash": p.cash, "discount": p.discount, "fee": p.fee, "coupons": coupons,
                "refunded": {"amount": p.refunded_amount, "cash": p.refunded_cash,
                             "discount": sum(p.refunded_part), "fee": p.refunded_fee},
                "state": canonical.PAYMENT_STATE_NAMES[p.state],
                "user_data": int(p.request["user_data"]),
                "goods_tag": int(p.request["goods_tag"]),
                "created_at": p.created_at, "completed_at": p.completed_at,
                "hold_expires_at": p.hold_expires_at}

    # =========================================================================
    # SETTLE and STATEMENT (docs/reference/rules.md "Settlement"; ext: SETTLE, STATEMENT)
    # =========================================================================

    def _settle_op(self, request) -> dict:
        request = self._single(request)
        now = self._stamp()
        if request:
            return _invalid("SETTLE takes no keys")
        rows = []
        for merchant_id in sorted(self.merchants):
            period = self.period(merchant_id)
            if not period.active:
                continue
            merchant = self.merchants[merchant_id]
            refunds = (period.refund_cash + period.refund_platform_discount
                       - period.refund_fee)
            net = period.gross - period.merchant_discount - period.fees - refunds
            assert net == merchant.balance - period.settled_balance
            payout = max(0, merchant.balance)
            merchant.balance -= payout                       # merchant(m) -> bank
            self.bank += payout
            rows.append({"merchant": merchant_id, "gross": period.gross,
                         "merchant_discount": period.merchant_discount,
                         "platform_discount": period.platform_discount,
                         "fees": period.fees, "refund_cash": period.refund_cash,
                         "refund_platform_discount": period.refund_platform_discount,
                         "refund_merchant_discount": period.refund_merchant_discount,
                         "refund_fee": period.refund_fee, "refunds": refunds,
                         "net": net, "payout": payout})
            self.periods[merchant_id] = Period(settled_balance=merchant.balance)
        reply = {"status": 0, "settlement": len(self.settlements) + 1, "at": now,
                 "rows": rows}
        self.settlements.append(copy.deepcopy(reply))
        return reply

    def _statement_op(self, request) -> dict:
        request = self._single(request)
        n = request.get("settlement")
        if set(request) != {"settlement"} or not _is_int(n) \
                or not 1 <= n <= len(self.settlements):
            return _invalid("STATEMENT takes {settlement: n} of a past settlement")
        return copy.deepcopy(self.settlements[n - 1])

    # =========================================================================
    # Canonical state
    # =========================================================================

    def canonical(self) -> dict:
        """Every table of engine/core/canonical.py. Written out in full rather than
        extending Reference.canonical(), whose stocks table predates the
        campaign-control columns (day, day_spent) of canonical.STOCKS."""
        t = {}
        t["meta"] = _table("meta", [dict(now=self.stamp, fees=self.fees, bank=self.bank,
                                         settlements=len(self.settlements))])
        t["users"] = _table("users", [dict(id=w.id, balance=w.balance, held=w.held)
                                      for w in self.wallets.values()])
        rows = []
        for m in self.merchants.values():
            period = self.period(m.id)
            rows.append(dict(
                id=m.id, fee_bps=m.fee_bps, active=int(m.active), balance=m.balance,
                period_active=int(period.active), settled_balance=period.settled_balance,
                **{f: getattr(period, f) for f in canonical.SETTLEMENT_FIELDS}))
        t["merchants"] = _table("merchants", rows)
        t["merchant_tags"] = _table("merchant_tags", [
            dict(merchant=m.id, tag=tag) for m in self.merchants.values() for tag in m.tags])
        stock_rows = []
        for s in self.stocks.values():
            row = {f: getattr(s, f) for f in canonical.STOCKS.names if hasattr(s, f)}
            row["day"], row["day_spent"] = self.stock_day.get(s.id, (0, 0))
            stock_rows.append(row)
        t["stocks"] = _table("stocks", stock_rows)
        lists = []
        for s in self.stocks.values():
            for which, values in ((canonical.LIST_MERCHANTS, s.merchants),
                                  (canonical.LIST_TAGS, s.tags),
                                  (canonical.LIST_GOODS_TAGS, s.goods_tags)):
                lists += [dict(stock=s.id, list=which, value=v) for v in values]
        t["stock_lists"] = _table("stock_lists", lists)
        t["stock_slots"] = _table("stock_slots", [
            dict(stock=s.id, weekday=w, start=a, end=b)
            for s in self.stocks.values() for (w, a, b) in s.slots])
        t["coupons"] = _table("coupons", [
            dict(id=c.id, stock=c.stock, user=c.user, state=c.state,
                 expires_at=c.expires_at, payment=c.payment) for c in self.coupons.values()])
        t["payments"] = _table("payments", [
            dict(request=p.request, result=p.result, user=p.user, state=p.state,
                 released=p.released, reversed=int(p.reversed), applied=_pad4(p.applied),
                 refunded_part=p.refunded_part, amount=p.amount,
                 authorized_amount=p.authorized_amount, cash=p.cash, discount=p.discount,
                 fee=p.fee, refunded_amount=p.refunded_amount,
                 refunded_cash=p.refunded_cash, refunded_fee=p.refunded_fee,
                 created_at=p.created_at, completed_at=p.completed_at,
                 ended_at=p.ended_at, hold_expires_at=p.hold_expires_at, day=p.day)
            for p in self.payments.values()])
        t["topups"] = _table("topups", [dict(id=x.id, user=x.user, amount=x.amount)
                                        for x in self.topups.values()])
        t["codes"] = _table("codes", [
            dict(code=c.code, user=c.user, expires_at=c.expires_at, used=int(c.used))
            for c in self.codes.values()])
        t["refunds"] = _table("refunds", [
            dict(id=r.id, payment=r.payment, amount=r.amount, cash=r.cash,
                 discount=r.discount, fee=r.fee) for r in self.refunds.values()])
        t["tombstones"] = _table("tombstones", [dict(id=i) for i in self.tombstones])
        t["scoped_tombstones"] = _table("scoped_tombstones", [
            dict(id=i, merchant=m) for i, scope in self.scoped_tombstones.items()
            for m in scope])
        t["settlements"] = _table("settlements", [
            dict(settlement=s["settlement"], at=s["at"], **row)
            for s in self.settlements for row in s["rows"]])
        t["stock_names"] = _table("stock_names", [dict(stock=s.id, name=s.name.encode())
                                                  for s in self.stocks.values() if s.name])
        # Tables of later scopes (membership, analytics) are absent: empty.
        return t
