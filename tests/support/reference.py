"""Plain-Python reference implementation of docs/reference/rules.md (issues 1-5).

This is the oracle the differential tests hold the Cython engine to. It is
written for clarity, not speed: dicts and small dataclasses, one function per
rule, comments citing the step of docs/reference/rules.md ("Paying" steps 1-8)
or the **Scanpay** note of docs/reference/rules.md or protocol.md ("ext: ...")
that each piece implements.

Scope now: PAY (without the authorize flag), ISSUE and the map operations
MERCHANTS, WALLETS, TOPUP, STOCKS, PAYMENT_CODE, QUOTE, BALANCES, COUPONS,
AUDIT. Every other operation raises `UnknownOp`.

Money is Python `int` everywhere (unbounded, so intermediate products such as
`amount * value` are exact); numpy appears only at the record boundary.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from engine.core import canonical
from engine.protocol.errors import BadBody, UnknownOp
from engine.protocol.records import (
    ISSUE_RECORD, ISSUE_RESULT, PAY_AUTHORIZE, PAY_FLAGS_KNOWN, PAY_NO_COUPONS,
    PAY_PAYER_IS_CODE, PAY_RECORD, PAY_RESULT, RESULT_DUPLICATE)
from engine.protocol.limits import (
    AMOUNT_MAX, AMOUNT_MIN, BANK_DEBT_MAX, BATCH_RECORDS_MAX, COUPONS_PAGE_MAX,
    COUPONS_PER_PAYMENT_MAX, PAYMENT_CODE_MAX, PAYMENT_CODE_MIN, PAYMENT_CODE_TTL_MS,
    QUOTE_EXPLAIN_MAX, WALLET_BALANCE_MAX)
from engine.protocol.status import STATUS_NAMES, Status

MAX_BATCH = BATCH_RECORDS_MAX    # ext: Batches
U32 = 2**32
U64 = 2**64
I64_MIN, I64_MAX = -2**63, 2**63 - 1
TIME_MAX = 2**63 - 1             # ext: STOCKS, valid_from/valid_until/validity_ms
COUNT_MAX = 2**62                # ext: STOCKS, budget/max_issued/per_user_limit
LIST_MAX = 4096                  # ext: STOCKS, merchants/tags/goods_tags
SLOTS_MAX = 64                   # ext: STOCKS, slots
MERCHANT_TAGS_MAX = 16           # ext: MERCHANTS, tags
DAY_MS = 86_400_000
CODE_DRAWS_MAX = 64              # bounded redraw loop of PAYMENT_CODE
NAME_BYTES = 128                 # ext: STOCKS, SEGMENTS, CAMPAIGNS `name`

# Stock enums as stored (the canonical numbering).
FUNDERS = {"platform": canonical.FUNDER_PLATFORM, "merchant": canonical.FUNDER_MERCHANT}
KINDS = {"fixed": canonical.KIND_FIXED, "percent": canonical.KIND_PERCENT}
STACKINGS = {"exclusive": canonical.STACKING_EXCLUSIVE,
             "stackable": canonical.STACKING_STACKABLE}

# A list inside a map: MessagePack gives `list`; in process a tuple is taken too.
LISTS = (list, tuple)

# The columns of canonical.STOCKS this reference keeps (later work adds others).
STOCK_COLUMNS = ("id", "funder", "merchant", "kind", "stacking", "value", "cap",
                 "min_spend", "valid_from", "valid_until", "validity_ms", "budget",
                 "max_issued", "per_user_limit", "daily_budget", "per_user_daily_limit",
                 "spent", "reserved", "issued", "campaign", "day", "day_spent")

# Map operations in scope; the others are `unknown_op` (ext: Not yet supported).
STATE_CHANGING_OPS = ("MERCHANTS", "WALLETS", "TOPUP", "STOCKS", "PAYMENT_CODE")
READ_ONLY_OPS = ("QUOTE", "BALANCES", "COUPONS", "AUDIT")


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

@dataclass
class Merchant:
    id: int
    fee_bps: int = 0
    tags: set = field(default_factory=set)
    active: bool = True
    balance: int = 0          # merchant(m): what the platform owes m
    # Totals of the payments completed since the last settlement (SETTLE is
    # later work; the canonical tables carry them already).
    period_active: bool = False
    gross: int = 0
    merchant_discount: int = 0
    platform_discount: int = 0
    period_fees: int = 0


@dataclass
class Wallet:
    id: int
    balance: int = 0          # wallet(user)
    held: int = 0             # always 0 until AUTHORIZE lands

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass
class Stock:
    id: int
    funder: int
    merchant: int
    kind: int
    value: int
    cap: int
    min_spend: int
    valid_from: int
    valid_until: int
    validity_ms: int
    merchants: frozenset
    tags: frozenset
    goods_tags: frozenset
    budget: int
    max_issued: int
    per_user_limit: int
    stacking: int
    daily_budget: int
    per_user_daily_limit: int
    slots: frozenset          # of (weekday, start_minute, end_minute)
    spent: int = 0
    reserved: int = 0         # always 0 until AUTHORIZE lands
    issued: int = 0
    campaign: int = 0         # balance of campaign(stock); platform stocks only
    day: int = 0              # the engine day of the latest payment using the stock
    day_spent: int = 0        # the net discount of that day's payments
    name: str = ""            # ext: STOCKS `name`

    def definition(self) -> tuple:
        """What STOCKS compares for a duplicate (ext: STOCKS): every field of the
        request, defaults filled in, lists as sets."""
        return (self.funder, self.merchant, self.kind, self.value, self.cap,
                self.min_spend, self.valid_from, self.valid_until, self.validity_ms,
                self.merchants, self.tags, self.goods_tags, self.budget,
                self.max_issued, self.per_user_limit, self.stacking,
                self.daily_budget, self.per_user_daily_limit, self.slots, self.name)


@dataclass
class Coupon:
    id: int
    stock: int
    user: int
    state: int = canonical.COUPON_AVAILABLE
    expires_at: int = 0
    payment: int = 0


@dataclass
class Payment:
    request: np.void          # the PayRecord as sent
    result: np.void           # the original PayResult, without the duplicate flag
    user: int                 # the payer after resolving a payment code
    applied: list             # applied discount of result.coupons[i]
    day: int = 0              # the engine day it was made (Campaign controls)
    state: int = canonical.PAYMENT_COMPLETED


@dataclass
class Topup:
    id: int
    user: int
    amount: int


@dataclass
class PaymentCode:
    code: int
    user: int
    expires_at: int
    used: bool = False


@dataclass
class Plan:
    """The outcome of Paying steps 3-6 for one request (shared by PAY and QUOTE)."""
    status: int
    user: int = 0
    chosen: list = field(default_factory=list)    # [(Coupon, applied)] in applied order
    cash: int = 0
    discount: int = 0
    fee: int = 0
    explain: list = field(default_factory=list)   # QUOTE's explain entries
    code: PaymentCode | None = None


# ---------------------------------------------------------------------------
# Small validators for map values (ext: General)
# ---------------------------------------------------------------------------

def _is_int(x) -> bool:
    """A MessagePack integer: a Python int, never a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_u64(x) -> bool:
    return _is_int(x) and 0 <= x < U64


def _is_u32(x) -> bool:
    return _is_int(x) and 0 <= x < U32


def _is_i64(x) -> bool:
    return _is_int(x) and I64_MIN <= x <= I64_MAX


def _in_range(x, lo: int, hi: int) -> bool:
    return _is_int(x) and lo <= x <= hi


def _is_name(x) -> bool:
    """ext: a display name: a string of at most NAME_BYTES (UTF-8) with no
    control character (nor a lone surrogate, which has no UTF-8)."""
    if not isinstance(x, str) or any(ord(c) < 0x20 or 0xD800 <= ord(c) < 0xE000 for c in x):
        return False
    return len(x.encode("utf-8")) <= NAME_BYTES


class _Invalid(Exception):
    """An `invalid_argument` outcome with its message."""


def _status_item(status: int, **extra) -> dict:
    """A list item's result (ext: General): {status} or {status, error}."""
    out = {"status": int(status)}
    if status != Status.ok:
        out["error"] = STATUS_NAMES[int(status)]
    out.update(extra)
    return out


def _invalid(message: str, **extra) -> dict:
    return _status_item(Status.invalid_argument, message=message, **extra)


def _table(name: str, rows: list) -> np.ndarray:
    """Canonical table `name` from dicts of column values; columns a row does
    not name are 0."""
    dtype = canonical.TABLES[name][0]
    table = np.zeros(len(rows), dtype)
    for i, row in enumerate(rows):
        for key, value in row.items():
            table[key][i] = value
    return canonical.normalize(name, table)


# ---------------------------------------------------------------------------
# The reference engine
# ---------------------------------------------------------------------------

class Reference:
    def __init__(self, clock=None, code_source=None, tz_offset_ms: int = 8 * 3600 * 1000):
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._code_source = code_source or (
            lambda: PAYMENT_CODE_MIN + secrets.randbelow(PAYMENT_CODE_MAX - PAYMENT_CODE_MIN))
        self.tz_offset_ms = tz_offset_ms
        self.stamp = 0                 # the kept stamp (meta.now)
        self.fees = 0                  # fees account
        self.bank = 0                  # bank account (minus all top-ups)
        self.topped_up = 0             # the bank's debt: all money ever topped up
        self.merchants: dict[int, Merchant] = {}
        self.wallets: dict[int, Wallet] = {}
        self.stocks: dict[int, Stock] = {}
        self.coupons: dict[int, Coupon] = {}
        self.payments: dict[int, Payment] = {}
        self.topups: dict[int, Topup] = {}
        self.codes: dict[int, PaymentCode] = {}

    # --- time (docs/reference/rules.md "Units, identities, time"; ext: Engine time) ----------

    def _stamp(self) -> int:
        """Stamp of a state-changing call: max(previous stamp, clock), kept."""
        self.stamp = max(self.stamp, int(self._clock()))
        return self.stamp

    def _read_time(self) -> int:
        """Evaluation time of a read-only call: the same max, not kept."""
        return max(self.stamp, int(self._clock()))

    # --- record batches ------------------------------------------------------

    @staticmethod
    def _check_batch(records, dtype) -> None:
        """ext: Batches: 1..BATCH_RECORDS_MAX records of the right dtype, else bad_body."""
        if not isinstance(records, np.ndarray) or records.dtype != dtype or records.ndim != 1:
            raise BadBody(f"expected a 1-d array of {dtype}")
        if not 1 <= len(records) <= MAX_BATCH:
            raise BadBody(f"a batch holds 1..{MAX_BATCH} records, got {len(records)}")

    def pay(self, records: np.ndarray) -> np.ndarray:
        self._check_batch(records, PAY_RECORD)
        now = self._stamp()
        out = np.zeros(len(records), PAY_RESULT)
        for i in range(len(records)):
            out[i] = self._pay_one(records[i].copy(), now)
        return out

    def issue(self, records: np.ndarray) -> np.ndarray:
        self._check_batch(records, ISSUE_RECORD)
        now = self._stamp()
        out = np.zeros(len(records), ISSUE_RESULT)
        for i in range(len(records)):
            out[i] = self._issue_one(records[i], now)
        return out

    # --- map operations --------------------------------------------------------

    def call(self, op: str, request: dict) -> dict:
        handlers = {
            "MERCHANTS": self._merchants_op, "WALLETS": self._wallets_op,
            "TOPUP": self._topup_op, "STOCKS": self._stocks_op,
            "PAYMENT_CODE": self._payment_code_op, "QUOTE": self._quote_op,
            "BALANCES": self._balances_op, "COUPONS": self._coupons_op,
            "AUDIT": self._audit_op,
        }
        if op not in handlers:
            raise UnknownOp(f"unknown or unsupported operation {op!r}")
        return handlers[op](request)

    # --- canonical state -------------------------------------------------------

    def canonical(self) -> dict:
        """The state as the canonical tables. Columns this scope never moves
        (settlement and refund totals, holds, ...) stay 0."""
        t = {}
        t["meta"] = _table("meta", [dict(now=self.stamp, fees=self.fees, bank=self.bank)])
        t["users"] = _table("users", [dict(id=w.id, balance=w.balance, held=w.held)
                                      for w in self.wallets.values()])
        t["merchants"] = _table("merchants", [
            dict(id=m.id, fee_bps=m.fee_bps, active=int(m.active), balance=m.balance,
                 period_active=int(m.period_active), gross=m.gross,
                 merchant_discount=m.merchant_discount,
                 platform_discount=m.platform_discount, fees=m.period_fees)
            for m in self.merchants.values()])
        t["merchant_tags"] = _table("merchant_tags", [
            dict(merchant=m.id, tag=tag) for m in self.merchants.values() for tag in m.tags])
        t["stocks"] = _table("stocks", [{f: getattr(s, f) for f in STOCK_COLUMNS}
                                        for s in self.stocks.values()])
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
                 applied=p.applied + [0] * (4 - len(p.applied)),
                 amount=int(p.request["amount"]), cash=int(p.result["cash"]),
                 discount=int(p.result["discount"]), fee=int(p.result["fee"]),
                 created_at=int(p.result["timestamp"]),
                 completed_at=int(p.result["timestamp"]), day=p.day)
            for p in self.payments.values()])
        t["topups"] = _table("topups", [dict(id=x.id, user=x.user, amount=x.amount)
                                        for x in self.topups.values()])
        t["codes"] = _table("codes", [
            dict(code=c.code, user=c.user, expires_at=c.expires_at, used=int(c.used))
            for c in self.codes.values()])
        t["stock_names"] = _table("stock_names", [dict(stock=s.id, name=s.name.encode())
                                                  for s in self.stocks.values() if s.name])
        for name in canonical.TABLES:      # tables of later work (refunds, ...): empty
            t.setdefault(name, _table(name, []))
        return t

    def digest(self) -> str:
        return canonical.digest(self.canonical())

    # =========================================================================
    # Rules shared by PAY and QUOTE
    # =========================================================================

    def discount_of(self, stock: Stock, amount: int) -> int:
        """Paying step 4: d of a coupon of `stock` on the original amount.
        fixed: min(value, amount); percent: min(amount*value//10000, cap or no cap)."""
        if stock.kind == canonical.KIND_FIXED:
            return min(stock.value, amount)
        d = amount * stock.value // 10000
        return min(d, stock.cap) if stock.cap else d

    def in_scope(self, stock: Stock, merchant: Merchant) -> bool:
        """Coupon stocks, scope: a merchant stock applies only at its merchant; a
        platform stock at a listed merchant or one carrying any listed tag; both
        lists empty = every merchant."""
        if stock.funder == canonical.FUNDER_MERCHANT:
            return stock.merchant == merchant.id
        if not stock.merchants and not stock.tags:
            return True
        return merchant.id in stock.merchants or bool(stock.tags & merchant.tags)

    @staticmethod
    def goods_tag_ok(stock: Stock, goods_tag: int) -> bool:
        """ext: STOCKS: goods_tags is a plain set test (empty = any goods)."""
        return not stock.goods_tags or goods_tag in stock.goods_tags

    def engine_day(self, now: int) -> int:
        """Days are in the engine's time zone (rules.md "Units, identities, time")."""
        return (now + self.tz_offset_ms) // DAY_MS

    def in_slots(self, stock: Stock, now: int) -> bool:
        """Campaign controls, slots (ext: STOCKS): weekly windows in the engine time
        zone; weekday 0 = Monday (epoch day 0 was a Thursday, hence + 3)."""
        if not stock.slots:
            return True
        t = now + self.tz_offset_ms
        weekday = (t // DAY_MS + 3) % 7
        minute = (t % DAY_MS) // 60_000
        return any(w == weekday and start <= minute < end for (w, start, end) in stock.slots)

    @staticmethod
    def budget_allows(stock: Stock, d: int) -> bool:
        """Paying step 4: budget left (budget - spent - reserved) >= d; 0 = unlimited."""
        return stock.budget == 0 or stock.budget - stock.spent - stock.reserved >= d

    def applicable(self, stock: Stock, merchant: Merchant, amount: int, goods_tag: int,
                   now: int) -> bool:
        """The `coupon_not_applicable` group of step 5 (and the matching part of
        the step 4 candidate filter): in scope, goods tag, min spend, stock window
        already open, inside a slot."""
        return (self.in_scope(stock, merchant)
                and self.goods_tag_ok(stock, goods_tag)
                and stock.min_spend <= amount
                and now >= stock.valid_from
                and self.in_slots(stock, now))

    # --- Campaign controls (docs/reference/rules.md "Campaign controls") --------

    def redeemed_today(self, user: int, stock_id: int, day: int) -> int:
        """The coupons of the stock the user has used or locked by payments of
        engine day `day`; a released or returned coupon is available again and
        no longer counts."""
        return sum(1 for c in self.coupons.values()
                   if c.user == user and c.stock == stock_id
                   and c.state != canonical.COUPON_AVAILABLE
                   and self.payments[c.payment].day == day)

    def within_daily_limit(self, stock: Stock, user: int, now: int) -> bool:
        """per_user_daily_limit (0 = none): the user has redeemed fewer
        coupons of the stock today than the limit."""
        return (stock.per_user_daily_limit == 0
                or self.redeemed_today(user, stock.id, self.engine_day(now))
                < stock.per_user_daily_limit)

    @staticmethod
    def coupon_parts(payment) -> list:
        """(coupon id, net discount) of each coupon of a payment; here every
        payment is a completed PAY that keeps its applied parts."""
        ids = [int(c) for c in payment.result["coupons"] if c != 0]
        return list(zip(ids, payment.applied))

    def day_discount(self, stock_id: int, day: int) -> int:
        """The stock's net discount of engine day `day`: what its coupons keep
        in the payments made that day (spent, plus reserved by the day's open
        authorizations), derived from the payments themselves."""
        return sum(part for p in self.payments.values() if p.day == day
                   for coupon_id, part in self.coupon_parts(p)
                   if self.coupons[coupon_id].stock == stock_id)

    def daily_budget_allows(self, stock: Stock, d: int, now: int) -> bool:
        """daily_budget (0 = none): d on top of today's net discount stays
        within it."""
        return (stock.daily_budget == 0
                or self.day_discount(stock.id, self.engine_day(now)) + d <= stock.daily_budget)

    def fee_of(self, merchant: Merchant, amount: int, chosen: list) -> int:
        """Paying step 7: fee = (base * fee_bps + 5000) // 10000, where base =
        amount - merchant-funded applied discounts."""
        merchant_funded = sum(applied for (c, applied) in chosen
                              if self.stocks[c.stock].funder == canonical.FUNDER_MERCHANT)
        base = amount - merchant_funded
        return (base * merchant.fee_bps + 5000) // 10000

    # --- Paying step 3 --------------------------------------------------------

    def _state_checks(self, now: int, merchant_id: int, payer: int, flags: int):
        """Step 3: merchant unknown / inactive; payer unknown; a payment code that
        is unknown, used or expired (dead at exactly 60 s: now >= expires_at).
        Returns (status, merchant, user id, code)."""
        merchant = self.merchants.get(merchant_id)
        if merchant is None:
            return Status.merchant_not_found, None, 0, None
        if not merchant.active:
            return Status.merchant_inactive, None, 0, None
        if flags & PAY_PAYER_IS_CODE:
            code = self.codes.get(payer)
            if code is None or code.used or now >= code.expires_at:
                return Status.payment_code_invalid, None, 0, None
            return Status.ok, merchant, code.user, code
        if payer not in self.wallets:
            return Status.payer_not_found, None, 0, None
        return Status.ok, merchant, payer, None

    # --- Paying steps 4-5, auto mode ---------------------------------------------

    def _auto_reason(self, coupon: Coupon, merchant: Merchant, amount: int,
                     goods_tag: int, now: int):
        """Why a coupon the payer holds is or is not a step-4 candidate, in the
        order of ext: QUOTE (auto mode). Returns (reason or None, d)."""
        stock = self.stocks[coupon.stock]
        d = self.discount_of(stock, amount)
        if coupon.state != canonical.COUPON_AVAILABLE:
            return Status.coupon_not_available, d
        if now >= coupon.expires_at:
            return Status.coupon_expired, d
        if (not self.applicable(stock, merchant, amount, goods_tag, now) or d < 1
                or not self.within_daily_limit(stock, coupon.user, now)):
            return Status.coupon_not_applicable, d
        if not self.budget_allows(stock, d) or not self.daily_budget_allows(stock, d, now):
            return Status.coupon_budget_exhausted, d
        return None, d

    @staticmethod
    def _select(candidates: list, amount: int) -> list:
        """Step 5: exact selection among candidates [(rank key, Coupon, d, stacking)].
        Returns the chosen [(Coupon, d)] in rank order."""
        ranked = sorted(candidates, key=lambda c: c[0])
        # Keep only the best-ranked coupon of each stock.
        best_of_stock, seen = [], set()
        for cand in ranked:
            if cand[1].stock not in seen:
                seen.add(cand[1].stock)
                best_of_stock.append(cand)
        options = [[]]                                   # no coupon
        exclusives = [c for c in best_of_stock if c[3] == canonical.STACKING_EXCLUSIVE]
        if exclusives:
            options.append([exclusives[0]])              # the best exclusive alone
        stackables = [c for c in best_of_stock if c[3] == canonical.STACKING_STACKABLE]
        if stackables:
            k = min(len(stackables), COUPONS_PER_PAYMENT_MAX)
            total = 0
            for i, c in enumerate(stackables[:COUPONS_PER_PAYMENT_MAX]):
                total += c[2]
                if total >= amount:
                    k = i + 1                            # smallest k reaching the amount
                    break
            options.append(stackables[:k])

        def preference(option):
            total = min(sum(c[2] for c in option), amount)
            first = option[0][0] if option else ()
            # larger total, then fewer coupons, then the first coupon ranking first
            return (-total, len(option), first)

        chosen = min(options, key=preference)
        return [(c[1], c[2]) for c in chosen]

    @staticmethod
    def _apply_in_order(chosen: list, amount: int) -> list:
        """Applied discounts: walk the coupons in order, each min(d, amount left)."""
        out, left = [], amount
        for coupon, d in chosen:
            applied = min(d, left)
            left -= applied
            out.append((coupon, applied))
        return out

    def _auto_plan(self, user: int, merchant: Merchant, amount: int, goods_tag: int,
                   now: int):
        """Steps 4-5 in auto mode. Returns (applied [(Coupon, applied)], reasons
        {coupon id: (reason or None, d)} for every coupon the payer holds)."""
        reasons, candidates = {}, []
        for coupon in self._coupons_of(user):
            reason, d = self._auto_reason(coupon, merchant, amount, goods_tag, now)
            reasons[coupon.id] = (reason, d)
            if reason is None:
                stock = self.stocks[coupon.stock]
                rank = (-d, coupon.expires_at, coupon.id)
                candidates.append((rank, coupon, d, stock.stacking))
        chosen = self._select(candidates, amount)
        return self._apply_in_order(chosen, amount), reasons

    # --- Paying step 5, explicit mode ---------------------------------------------

    def _explicit_check(self, coupon_id: int, user: int, merchant: Merchant, amount: int,
                        goods_tag: int, now: int, before: list):
        """Step 5, explicit mode: the first failing check of one named coupon,
        given the coupons named before it. Returns (status or None, coupon, d)."""
        coupon = self.coupons.get(coupon_id)
        if coupon is None:
            return Status.coupon_not_found, None, 0
        stock = self.stocks[coupon.stock]
        d = self.discount_of(stock, amount)
        if coupon.user != user:
            return Status.coupon_not_owned, coupon, d
        if coupon.state != canonical.COUPON_AVAILABLE:
            return Status.coupon_not_available, coupon, d
        if now >= coupon.expires_at:
            return Status.coupon_expired, coupon, d
        if (not self.applicable(stock, merchant, amount, goods_tag, now)
                or not self.within_daily_limit(stock, user, now)):
            return Status.coupon_not_applicable, coupon, d   # d = 0 is no failure here
        if not self.budget_allows(stock, d) or not self.daily_budget_allows(stock, d, now):
            return Status.coupon_budget_exhausted, coupon, d
        # Against the coupons before it: same stock twice, or exclusive with any other.
        for other in before:
            other_stock = self.stocks[other.stock]
            if (other.stock == coupon.stock
                    or stock.stacking == canonical.STACKING_EXCLUSIVE
                    or other_stock.stacking == canonical.STACKING_EXCLUSIVE):
                return Status.coupons_not_stackable, coupon, d
        return None, coupon, d

    def _explicit_plan(self, named: list, user: int, merchant: Merchant, amount: int,
                       goods_tag: int, now: int):
        """Step 5 in explicit mode. Returns (status, applied [(Coupon, applied)],
        per-mention results [(coupon id, status or None, d)])."""
        mentions, before, status, chosen = [], [], Status.ok, []
        for coupon_id in named:
            failure, coupon, d = self._explicit_check(
                coupon_id, user, merchant, amount, goods_tag, now, before)
            mentions.append((coupon_id, failure, d))
            if failure is not None and status == Status.ok:
                status = failure                 # the first failing check decides
            if coupon is not None and coupon.user == user:
                # ext: QUOTE, explicit mode: stackability is checked against the
                # coupons named before it that the payer holds, whether or not
                # they failed their own checks (a coupon not found or not the
                # payer's blocks nothing). Only QUOTE's explain can see this:
                # PAY stops at the first failing coupon.
                before.append(coupon)
            chosen.append((coupon, d))
        if status != Status.ok:
            return status, [], mentions
        return Status.ok, self._apply_in_order(chosen, amount), mentions

    # --- Paying steps 3-6 together ---------------------------------------------------

    def _plan(self, now: int, payer: int, merchant_id: int, amount: int, flags: int,
              goods_tag: int, named: list, want_explain: bool) -> Plan:
        status, merchant, user, code = self._state_checks(now, merchant_id, payer, flags)
        if status != Status.ok:                                  # step 3
            return Plan(status)
        explain_reasons = {}
        if flags & PAY_NO_COUPONS:
            applied = []
        elif named:
            status, applied, mentions = self._explicit_plan(
                named, user, merchant, amount, goods_tag, now)
            for coupon_id, failure, d in mentions:
                first = explain_reasons.get(coupon_id)
                if first is None or first[0] is None:
                    # a coupon named twice takes the reason of its first failing mention
                    explain_reasons[coupon_id] = (failure, d)
        else:
            applied, reasons = self._auto_plan(user, merchant, amount, goods_tag, now)
            explain_reasons = reasons
        plan = Plan(status, user=user, code=code)
        if status == Status.ok:
            plan.chosen = applied
            plan.discount = sum(a for (_, a) in applied)
            plan.cash = amount - plan.discount                   # step 6
            plan.fee = self.fee_of(merchant, amount, applied)    # step 7's fee
            if self.wallets[user].available < plan.cash:
                plan.status = Status.insufficient_funds
        if want_explain:
            plan.explain = self._explain(plan, user, amount, flags, named, explain_reasons)
        return plan

    def _explain(self, plan: Plan, user: int, amount: int, flags: int, named: list,
                 reasons: dict) -> list:
        """QUOTE's explain (docs/reference/rules.md QUOTE; ext: QUOTE): every coupon the payer
        holds, by coupon id."""
        applied = {c.id: a for (c, a) in plan.chosen}
        would_pay = plan.status in (Status.ok, Status.insufficient_funds)
        out = []
        for coupon in self._coupons_of(user):
            d = self.discount_of(self.stocks[coupon.stock], amount)
            if flags & PAY_NO_COUPONS:
                reason = "not_chosen"
            elif coupon.id in reasons:
                failure, d = reasons[coupon.id]
                if failure is not None:
                    reason = STATUS_NAMES[int(failure)]
                elif would_pay and coupon.id in applied:
                    reason = "applied"
                else:
                    reason = "not_chosen"
            else:                     # explicit mode, not named
                reason = "not_chosen"
            shown = applied[coupon.id] if reason == "applied" else d
            out.append({"coupon": coupon.id, "stock": coupon.stock,
                        "discount": shown, "reason": reason})
        return out

    def _coupons_of(self, user: int) -> list:
        return [c for c in sorted(self.coupons.values(), key=lambda c: c.id) if c.user == user]

    # =========================================================================
    # PAY
    # =========================================================================

    @staticmethod
    def _fail(record_id: int, status: int, now: int) -> np.void:
        """On a failure every field but id, status and timestamp is 0."""
        out = np.zeros((), PAY_RESULT)
        out["id"], out["status"], out["timestamp"] = record_id, int(status), now
        return out

    def _pay_one(self, rec: np.void, now: int) -> np.ndarray:
        pid = int(rec["id"])
        amount = int(rec["amount"])
        flags = int(rec["flags"])
        named = [int(c) for c in rec["coupons"] if c != 0]   # the nonzero slots, in order

        # Step 1: checks that need no state.
        if pid == 0:
            return self._fail(pid, Status.invalid_id, now)
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            return self._fail(pid, Status.invalid_amount, now)
        if flags & ~PAY_FLAGS_KNOWN or (named and flags & PAY_NO_COUPONS):
            return self._fail(pid, Status.invalid_flags, now)
        if flags & PAY_AUTHORIZE:
            # AUTHORIZE (flag 4) is a known flag bit but the two-phase lifecycle is
            # not implemented yet: for now every record with flag 4 is
            # `invalid_flags` (the money-lifecycle work replaces this).
            return self._fail(pid, Status.invalid_flags, now)

        # Step 2: idempotency. Only successful payments are remembered.
        previous = self.payments.get(pid)
        if previous is not None:
            if previous.request.tobytes() == rec.tobytes():
                replay = previous.result.copy()
                replay["flags"] |= RESULT_DUPLICATE
                return replay
            return self._fail(pid, Status.exists_with_different_fields, now)

        # Steps 3-6.
        plan = self._plan(now, int(rec["payer"]), int(rec["merchant"]), amount, flags,
                          int(rec["goods_tag"]), named, want_explain=False)
        if plan.status != Status.ok:
            return self._fail(pid, plan.status, now)             # nothing changes

        day = self.engine_day(now)
        self._post_pay(plan, self.merchants[int(rec["merchant"])], pid, amount, day)

        # Step 8: the result.
        result = np.zeros((), PAY_RESULT)
        result["id"] = pid
        result["status"] = Status.ok
        result["cash"] = plan.cash
        result["discount"] = plan.discount
        result["fee"] = plan.fee
        result["timestamp"] = now
        result["coupons"] = [c.id for c, _ in plan.chosen] + [0] * (4 - len(plan.chosen))
        self.payments[pid] = Payment(request=rec.copy(), result=result.copy(),
                                     user=plan.user, applied=[a for _, a in plan.chosen],
                                     day=day)
        return result

    def _post_pay(self, plan, merchant, pid: int, amount: int, day: int) -> None:
        """Step 7: postings, all or nothing."""
        self.wallets[plan.user].balance -= plan.cash             # wallet -> merchant: cash
        merchant.balance += plan.cash
        for coupon, applied in plan.chosen:
            stock = self.stocks[coupon.stock]
            if stock.funder == canonical.FUNDER_PLATFORM:        # campaign -> merchant
                stock.campaign -= applied
                merchant.balance += applied
            stock.spent += applied
            # Campaign controls: a payment's coupons count against its engine day.
            if stock.day != day:
                stock.day, stock.day_spent = day, 0
            stock.day_spent += applied
            coupon.state = canonical.COUPON_USED
            coupon.payment = pid
        merchant.balance -= plan.fee                             # merchant -> fees: fee
        self.fees += plan.fee
        # The period totals settlement reports (docs/reference/rules.md "Settlement").
        merchant_funded = sum(a for c, a in plan.chosen
                              if self.stocks[c.stock].funder == canonical.FUNDER_MERCHANT)
        merchant.period_active = True
        merchant.gross += amount
        merchant.merchant_discount += merchant_funded
        merchant.platform_discount += plan.discount - merchant_funded
        merchant.period_fees += plan.fee
        if plan.code is not None:
            plan.code.used = True                                # consumed only by a success

    # =========================================================================
    # ISSUE
    # =========================================================================

    def _issue_one(self, rec: np.void, now: int) -> np.ndarray:
        coupon_id, stock_id, user_id = int(rec["coupon"]), int(rec["stock"]), int(rec["user"])
        out = np.zeros((), ISSUE_RESULT)
        out["coupon"] = coupon_id

        def fail(status):
            out["status"] = int(status)
            return out

        if coupon_id == 0:                                   # own id 0
            return fail(Status.invalid_id)
        if int(rec["reserved"]) != 0:                        # reserved bytes must be 0
            return fail(Status.invalid_flags)
        existing = self.coupons.get(coupon_id)
        if existing is not None:                             # idempotency by coupon id
            if existing.stock == stock_id and existing.user == user_id:
                out["flags"] = RESULT_DUPLICATE
                out["expires_at"] = existing.expires_at
                return out
            return fail(Status.exists_with_different_fields)
        stock = self.stocks.get(stock_id)
        if stock is None:
            return fail(Status.stock_not_found)
        if now >= stock.valid_until:
            return fail(Status.stock_ended)
        if stock.max_issued and stock.issued >= stock.max_issued:
            return fail(Status.stock_exhausted)
        if user_id not in self.wallets:
            return fail(Status.user_not_found)
        if stock.per_user_limit:
            held = sum(1 for c in self.coupons.values()
                       if c.stock == stock_id and c.user == user_id)
            if held >= stock.per_user_limit:
                return fail(Status.per_user_limit)
        # expires_at = min(valid_until, issued_at + validity_ms) (validity_ms 0 = none)
        expires_at = stock.valid_until
        if stock.validity_ms:
            expires_at = min(expires_at, now + stock.validity_ms)
        self.coupons[coupon_id] = Coupon(coupon_id, stock_id, user_id, expires_at=expires_at)
        stock.issued += 1
        out["expires_at"] = expires_at
        return out

    # =========================================================================
    # List map operations (ext: General, MERCHANTS, WALLETS, TOPUP, STOCKS)
    # =========================================================================

    @staticmethod
    def _items(request, key: str) -> list:
        """The body must be a map holding exactly the list under its key."""
        if not isinstance(request, dict) or set(request) != {key} \
                or not isinstance(request[key], list):
            raise BadBody(f"expected a map {{{key}: [...]}}")
        return request[key]

    # --- MERCHANTS ---------------------------------------------------------------

    def _merchants_op(self, request) -> dict:
        items = self._items(request, "merchants")
        self._stamp()
        return {"results": [self._merchant_item(item) for item in items]}

    def _merchant_item(self, item) -> dict:
        if not isinstance(item, dict) or "id" not in item or not _is_u64(item["id"]):
            return _invalid("merchant item must be a map with a u64 id")
        if item["id"] == 0:
            return _status_item(Status.invalid_id)
        unknown = set(item) - {"id", "fee_bps", "tags", "active"}
        if unknown:
            return _invalid(f"unknown key(s) {sorted(map(str, unknown))}")
        if "fee_bps" in item and not _in_range(item["fee_bps"], 0, 10000):
            return _invalid("fee_bps must be an integer in 0..10000")
        if "tags" in item:
            tags = item["tags"]
            if not isinstance(tags, LISTS) or not all(_is_u32(t) for t in tags):
                return _invalid("tags must be a list of u32")
            if len(set(tags)) > MERCHANT_TAGS_MAX:
                return _invalid(f"at most {MERCHANT_TAGS_MAX} distinct tags")
        if "active" in item and not isinstance(item["active"], bool):
            return _invalid("active must be a bool")
        merchant = self.merchants.get(item["id"])
        if merchant is None:
            merchant = self.merchants[item["id"]] = Merchant(item["id"])
        if "fee_bps" in item:
            merchant.fee_bps = item["fee_bps"]
        if "tags" in item:
            merchant.tags = set(item["tags"])
        if "active" in item:
            merchant.active = item["active"]
        return _status_item(Status.ok)

    # --- WALLETS -----------------------------------------------------------------

    def _wallets_op(self, request) -> dict:
        items = self._items(request, "users")
        self._stamp()
        results = []
        for user in items:
            if not _is_u64(user):
                results.append(_invalid("user id must be a u64"))
            elif user == 0:
                results.append(_status_item(Status.invalid_id))
            elif user in self.wallets:
                results.append(_status_item(Status.ok, duplicate=True))
            else:
                self.wallets[user] = Wallet(user)
                results.append(_status_item(Status.ok))
        return {"results": results}

    # --- TOPUP -------------------------------------------------------------------

    def _topup_op(self, request) -> dict:
        items = self._items(request, "topups")
        self._stamp()
        return {"results": [self._topup_item(item) for item in items]}

    def _topup_item(self, item) -> dict:
        if not isinstance(item, dict):
            return _invalid("top-up item must be a map")
        if set(item) != {"id", "user", "amount"}:
            return _invalid("top-up item needs exactly the keys id, user, amount")
        if not _is_u64(item["id"]) or not _is_u64(item["user"]):
            return _invalid("id and user must be u64")
        if not _is_i64(item["amount"]):
            return _invalid("amount must be an i64 integer")
        tid, user, amount = item["id"], item["user"], item["amount"]
        if tid == 0:
            return _status_item(Status.invalid_id)
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            return _status_item(Status.invalid_amount)
        known = self.topups.get(tid)
        if known is not None:
            if known.user == user and known.amount == amount:
                return _status_item(Status.ok, duplicate=True)
            return _status_item(Status.exists_with_different_fields)
        wallet = self.wallets.get(user)
        if wallet is None:
            return _status_item(Status.user_not_found)
        if wallet.balance + amount > WALLET_BALANCE_MAX \
                or self.topped_up + amount > BANK_DEBT_MAX:
            return _status_item(Status.invalid_amount)
        # bank -> wallet(user)
        self.bank -= amount
        wallet.balance += amount
        self.topped_up += amount
        self.topups[tid] = Topup(tid, user, amount)
        return _status_item(Status.ok)

    # --- STOCKS ------------------------------------------------------------------

    STOCK_KEYS = {"id", "funder", "merchant", "kind", "value", "cap", "min_spend",
                  "valid_from", "valid_until", "validity_ms", "merchants", "tags",
                  "goods_tags", "budget", "max_issued", "per_user_limit", "stacking",
                  "daily_budget", "per_user_daily_limit", "slots", "name"}
    STOCK_REQUIRED = ("funder", "kind", "value", "valid_from", "valid_until", "stacking")

    def _stocks_op(self, request) -> dict:
        items = self._items(request, "stocks")
        self._stamp()
        return {"results": [self._stock_item(item) for item in items]}

    def _stock_item(self, item) -> dict:
        if not isinstance(item, dict) or "id" not in item or not _is_u64(item["id"]):
            return _invalid("stock item must be a map with a u64 id")
        if item["id"] == 0:
            return _status_item(Status.invalid_id)
        try:
            stock = self._parse_stock(item)
        except _Invalid as e:
            return _invalid(str(e))
        existing = self.stocks.get(stock.id)
        if existing is not None:
            if existing.definition() == stock.definition():
                return _status_item(Status.ok, duplicate=True)
            return _status_item(Status.exists_with_different_fields)
        if stock.funder == canonical.FUNDER_MERCHANT and stock.merchant not in self.merchants:
            return _status_item(Status.merchant_not_found)
        self.stocks[stock.id] = stock
        return _status_item(Status.ok)

    @staticmethod
    def _parse_stock(item: dict) -> Stock:
        """ext: STOCKS: every invalid_argument check; defaults filled in."""
        unknown = set(item) - Reference.STOCK_KEYS
        if unknown:
            raise _Invalid(f"unknown key(s) {sorted(map(str, unknown))}")
        for key in Reference.STOCK_REQUIRED:
            if key not in item:
                raise _Invalid(f"missing required key {key!r}")
        funder = item["funder"]
        if not isinstance(funder, str) or funder not in FUNDERS:
            raise _Invalid("funder must be 'platform' or 'merchant'")
        funder = FUNDERS[funder]
        if funder == canonical.FUNDER_MERCHANT and "merchant" not in item:
            raise _Invalid("a merchant stock needs 'merchant'")
        kind = item["kind"]
        if not isinstance(kind, str) or kind not in KINDS:
            raise _Invalid("kind must be 'fixed' or 'percent'")
        kind = KINDS[kind]
        stacking = item["stacking"]
        if not isinstance(stacking, str) or stacking not in STACKINGS:
            raise _Invalid("stacking must be 'exclusive' or 'stackable'")
        stacking = STACKINGS[stacking]
        value_max = AMOUNT_MAX if kind == canonical.KIND_FIXED else 10000
        if not _in_range(item["value"], 1, value_max):
            raise _Invalid(f"value must be in 1..{value_max}")
        for key in ("cap", "min_spend"):
            if not _in_range(item.get(key, 0), 0, AMOUNT_MAX):
                raise _Invalid(f"{key} must be in 0..10**14")
        for key in ("valid_from", "valid_until", "validity_ms"):
            if not _in_range(item.get(key, 0), 0, TIME_MAX):
                raise _Invalid(f"{key} must be in 0..2**63-1")
        if item["valid_from"] >= item["valid_until"]:
            raise _Invalid("valid_from must be before valid_until")
        for key in ("budget", "max_issued", "per_user_limit", "daily_budget",
                    "per_user_daily_limit"):
            if not _in_range(item.get(key, 0), 0, COUNT_MAX):
                raise _Invalid(f"{key} must be in 0..2**62")
        lists, slots = Reference._parse_stock_lists(item)
        name = item.get("name", "")
        if not _is_name(name):
            raise _Invalid("name must be printable text of at most 128 UTF-8 bytes")
        merchant = item.get("merchant", 0)
        if not _is_u64(merchant):
            raise _Invalid("merchant must be a u64")
        if funder == canonical.FUNDER_MERCHANT and (lists["merchants"] or lists["tags"]):
            raise _Invalid("a merchant stock cannot have merchants or tags lists")
        if funder == canonical.FUNDER_PLATFORM and merchant != 0:
            raise _Invalid("a platform stock cannot name a merchant")
        return Stock(
            id=item["id"], funder=funder, merchant=merchant, kind=kind,
            value=item["value"],
            cap=item.get("cap", 0) if kind == canonical.KIND_PERCENT else 0,
            min_spend=item.get("min_spend", 0),
            valid_from=item["valid_from"], valid_until=item["valid_until"],
            validity_ms=item.get("validity_ms", 0),
            merchants=lists["merchants"], tags=lists["tags"],
            goods_tags=lists["goods_tags"],
            budget=item.get("budget", 0), max_issued=item.get("max_issued", 0),
            per_user_limit=item.get("per_user_limit", 0), stacking=stacking,
            daily_budget=item.get("daily_budget", 0),
            per_user_daily_limit=item.get("per_user_daily_limit", 0),
            slots=frozenset(tuple(s) for s in slots), name=name)

    @staticmethod
    def _parse_stock_lists(item: dict) -> tuple[dict, list]:
        """ext: STOCKS: the merchants, tags and goods_tags lists (as frozensets)
        and the time slots of a stock item."""
        lists = {}
        for key, ok in (("merchants", lambda v: _is_u64(v) and v != 0),
                        ("tags", _is_u32), ("goods_tags", _is_u32)):
            value = item.get(key, [])
            if not isinstance(value, LISTS) or len(value) > LIST_MAX \
                    or not all(ok(v) for v in value):
                raise _Invalid(f"{key} must be a list of at most {LIST_MAX} "
                               + ("nonzero u64" if key == "merchants" else "u32"))
            lists[key] = frozenset(value)
        slots = item.get("slots", [])
        if not isinstance(slots, LISTS) or len(slots) > SLOTS_MAX:
            raise _Invalid(f"slots must be a list of at most {SLOTS_MAX} slots")
        for slot in slots:
            if not (isinstance(slot, LISTS) and len(slot) == 3
                    and _in_range(slot[0], 0, 6) and _in_range(slot[1], 0, 1440)
                    and _in_range(slot[2], 0, 1440) and slot[1] < slot[2]):
                raise _Invalid("a slot is [weekday 0..6, start, end] with "
                               "0 <= start < end <= 1440")
        return lists, slots

    # =========================================================================
    # Single-object map operations (ext: General, PAYMENT_CODE, QUOTE, ...)
    # =========================================================================

    @staticmethod
    def _single(request) -> dict:
        if not isinstance(request, dict):
            raise BadBody("expected a map")
        return request

    # --- PAYMENT_CODE ------------------------------------------------------------

    def _draw_code(self) -> int:
        """A fresh code, drawn again while it equals any code ever issued."""
        for _ in range(CODE_DRAWS_MAX):
            code = int(self._code_source())
            if code not in self.codes:
                return code
        raise RuntimeError("code source keeps returning issued codes")

    def _payment_code_op(self, request) -> dict:
        request = self._single(request)
        # ext: PAYMENT_CODE: drawn before the apply (and journaled with it).
        code = self._draw_code()
        now = self._stamp()
        if set(request) != {"user"} or not _is_u64(request["user"]):
            return _invalid("PAYMENT_CODE takes exactly {user: u64}")
        user = request["user"]
        if user not in self.wallets:
            return _status_item(Status.user_not_found)
        expires_at = now + PAYMENT_CODE_TTL_MS
        self.codes[code] = PaymentCode(code, user, expires_at)
        return {"status": 0, "code": code, "expires_at": expires_at}

    # --- QUOTE -------------------------------------------------------------------

    QUOTE_KEYS = {"payer", "merchant", "amount", "flags", "coupons", "goods_tag"}

    def _quote_op(self, request) -> dict:
        request = self._single(request)
        now = self._read_time()
        unknown = set(request) - self.QUOTE_KEYS
        if unknown:
            return _invalid(f"unknown key(s) {sorted(map(str, unknown))}")
        for key in ("payer", "merchant", "amount"):
            if key not in request:
                return _invalid(f"missing required key {key!r}")
        if not _is_u64(request["payer"]) or not _is_u64(request["merchant"]):
            return _invalid("payer and merchant must be u64")
        if not _is_i64(request["amount"]):
            return _invalid("amount must be an i64 integer")
        flags = request.get("flags", 0)
        if not _is_u32(flags):
            return _invalid("flags must be a u32")
        named = request.get("coupons", [])
        if not isinstance(named, LISTS) or len(named) > COUPONS_PER_PAYMENT_MAX \
                or not all(_is_u64(c) and c != 0 for c in named):
            return _invalid("coupons must be a list of at most 4 nonzero u64")
        goods_tag = request.get("goods_tag", 0)
        if not _is_u32(goods_tag):
            return _invalid("goods_tag must be a u32")
        amount = request["amount"]

        def reply(status, plan: Plan | None = None):
            out = {"status": int(status)}
            if status != Status.ok:
                out["error"] = STATUS_NAMES[int(status)]
            shows_payment = plan is not None and status in (Status.ok,
                                                             Status.insufficient_funds)
            out["cash"] = plan.cash if shows_payment else 0
            out["discount"] = plan.discount if shows_payment else 0
            out["fee"] = plan.fee if shows_payment else 0
            out["coupons"] = [c.id for c, _ in plan.chosen] if shows_payment else []
            out["explain"] = plan.explain if plan is not None else []
            if len(out["explain"]) > QUOTE_EXPLAIN_MAX:    # applied first, then by id
                kept = [e for e in out["explain"] if e["reason"] == "applied"]
                kept += [e for e in out["explain"]
                         if e["reason"] != "applied"][:max(QUOTE_EXPLAIN_MAX - len(kept), 0)]
                out["explain_omitted"] = len(out["explain"]) - len(kept)
                out["explain"] = sorted(kept, key=lambda e: e["coupon"])
            return out

        # Paying step 1 (no id, no idempotency).
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            return reply(Status.invalid_amount)
        if flags & ~PAY_FLAGS_KNOWN or (named and flags & PAY_NO_COUPONS):
            return reply(Status.invalid_flags)
        if flags & PAY_AUTHORIZE:
            # docs/reference/rules.md: QUOTE is PAY's computation "authorize flag or not". While
            # PAY refuses flag 4 (AUTHORIZE not implemented yet), QUOTE says what
            # that PAY would do: invalid_flags. The money-lifecycle work replaces this.
            return reply(Status.invalid_flags)
        plan = self._plan(now, request["payer"], request["merchant"], amount, flags,
                          goods_tag, named, want_explain=True)
        if plan.user == 0:                       # failed step 3: empty explain
            return reply(plan.status)
        return reply(plan.status, plan)

    # --- BALANCES ----------------------------------------------------------------

    def _balances_op(self, request) -> dict:
        request = self._single(request)
        unknown = set(request) - {"users", "merchants", "stocks"}
        if unknown:
            return _invalid(f"unknown key(s) {sorted(map(str, unknown))}")
        for key in ("users", "merchants", "stocks"):
            ids = request.get(key, [])
            if not isinstance(ids, LISTS) or not all(_is_u64(i) for i in ids):
                return _invalid(f"{key} must be a list of u64")
        users = []
        for uid in request.get("users", []):
            w = self.wallets.get(uid)
            users.append({"id": uid, "status": 0, "balance": w.balance, "held": w.held,
                          "available": w.available} if w else
                         {"id": uid, **_status_item(Status.user_not_found)})
        merchants = []
        for mid in request.get("merchants", []):
            m = self.merchants.get(mid)
            merchants.append({"id": mid, "status": 0, "balance": m.balance} if m else
                             {"id": mid, **_status_item(Status.merchant_not_found)})
        stocks = []
        for sid in request.get("stocks", []):
            s = self.stocks.get(sid)
            stocks.append({"id": sid, "status": 0, "spent": s.spent, "reserved": s.reserved,
                           "issued": s.issued, "budget": s.budget,
                           "campaign": s.campaign} if s else
                          {"id": sid, **_status_item(Status.stock_not_found)})
        return {"status": 0, "users": users, "merchants": merchants, "stocks": stocks,
                "fees": self.fees, "bank": self.bank}

    # --- COUPONS -----------------------------------------------------------------

    def _coupons_op(self, request) -> dict:
        request = self._single(request)
        now = self._read_time()
        if not (set(request) == {"ids"} or "user" in request
                and set(request) <= {"user", "after", "limit"}):
            return _invalid("COUPONS takes ids, or user (after?, limit?)", results=[])
        if "ids" in request:
            ids = request["ids"]
            if not isinstance(ids, LISTS) or not all(_is_u64(i) for i in ids):
                return _invalid("ids must be a list of u64", results=[])
            return {"status": 0, "results": [self._coupon_view(i, now) for i in ids]}
        user = request["user"]
        after, limit = request.get("after", 0), request.get("limit", COUPONS_PAGE_MAX)
        if not (_is_u64(user) and _is_u64(after) and _is_u64(limit)
                and 1 <= limit <= COUPONS_PAGE_MAX):
            return _invalid("user and after must be u64, limit 1..1024", results=[])
        if user not in self.wallets:
            return _status_item(Status.user_not_found, results=[])
        listed = [c for c in self._coupons_of(user) if c.id > after]
        reply = {"status": 0, "results": [self._coupon_view(c.id, now) for c in listed[:limit]]}
        if len(listed) > limit:             # a page: the next one starts after its last id
            reply["next"] = listed[limit - 1].id
        return reply

    def _coupon_view(self, coupon_id: int, now: int) -> dict:
        c = self.coupons.get(coupon_id)
        if c is None:
            return {"id": coupon_id, **_status_item(Status.coupon_not_found)}
        state = canonical.COUPON_STATE_NAMES[c.state]
        if c.state == canonical.COUPON_AVAILABLE and now >= c.expires_at:
            state = "expired"
        return {"id": c.id, "status": 0, "stock": c.stock, "user": c.user, "state": state,
                "expires_at": c.expires_at, "payment": c.payment}

    # --- AUDIT -------------------------------------------------------------------

    def _audit_op(self, request) -> dict:
        request = self._single(request)
        if request:
            return _invalid("AUDIT takes no keys")
        from engine.core import audit
        return audit.audit(self.canonical())
