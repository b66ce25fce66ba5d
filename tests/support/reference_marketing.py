"""Plain-Python reference of precision marketing (docs/reference/rules.md
"Precision marketing"; docs/reference/protocol.md, "Precision marketing, ops
51-54": SEGMENTS, SEGMENT, CAMPAIGNS, LIFT).

`MarketingReference` extends `MembershipReference` with saved segments,
targeted campaigns with a holdout, and their lift. Written from the two
documents only (not from engine/core/segments.py, lift.py, campaigns.py or
ext/marketing.pyx): one loop over every payment and every user, SipHash-2-4
over bytes as its paper defines it, and the statistics with Fractions and
80-digit Decimals (the engine uses integer square roots), Student's t
quantiles computed from the t distribution. Nothing here is fast; it is
meant to be obviously right.

- SEGMENTS / SEGMENT: the definition's checks in the documented order; a
  segment evaluated over every wallet at the time of the call.
- CAMPAIGNS: a key of two u64 draws per item from `key_source` (in item
  order, for every item), the holdout test, the treated users' coupons
  issued one by one by this reference's own ISSUE (`_issue_one`).
- LIFT: the figures, intervals and costs of the reply.
- canonical(): the tables stock_names (in reference.py), segments,
  segment_lists, campaigns, campaign_lists, campaign_members.
"""
from __future__ import annotations

import math
import secrets
import struct
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction

import numpy as np

from engine.protocol.errors import BadBody
from engine.protocol.records import ISSUE_RECORD, RESULT_DUPLICATE
from engine.protocol.status import Status

from support.reference import _invalid, _is_int, _is_name, _is_u32, _is_u64, _status_item, _table
from support.reference_membership import MembershipReference
from support.reference_money import COMPLETED, PARTIALLY_REFUNDED

DAY_MS = 86_400_000
U64_MAX = 2**64 - 1
I63_MAX = 2**63 - 1
COUNT_MAX = 2**62
DAYS_MAX = 36_600
LIST_MAX = 4096
PAGE_MAX = 1024
SEGMENTS_MAX = CAMPAIGNS_MAX = 4096
CAMPAIGN_ITEMS_MAX = 64
BPS = 10_000
Z = Fraction(1_959_964, 1_000_000)
T_DFS = tuple(range(1, 31)) + (40, 50, 60, 80, 100, 120, 200, 500, 1000)
Z_BEYOND_DF = 10_000
EACH_OUTCOME_MIN = 5
PPM = 10**6

SEGMENT_FIELDS = {"name", "merchants", "tags", "from", "until", "days", "payments_min",
                  "payments_max", "gmv_min", "gmv_max", "recency_days_min", "recency_days_max",
                  "never_paid", "program", "points_min"}
CAMPAIGN_FIELDS = {"id", "name", "segment", "stock", "holdout_bps", "coupon_base"}


# ---------------------------------------------------------------------------
# SipHash-2-4 (Aumasson, Bernstein: "SipHash: a fast short-input PRF", 2012)
# ---------------------------------------------------------------------------

def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & U64_MAX


def _sipround(v: list) -> None:
    v[0] = (v[0] + v[1]) & U64_MAX; v[1] = _rotl(v[1], 13) ^ v[0]; v[0] = _rotl(v[0], 32)
    v[2] = (v[2] + v[3]) & U64_MAX; v[3] = _rotl(v[3], 16) ^ v[2]
    v[0] = (v[0] + v[3]) & U64_MAX; v[3] = _rotl(v[3], 21) ^ v[0]
    v[2] = (v[2] + v[1]) & U64_MAX; v[1] = _rotl(v[1], 17) ^ v[2]; v[2] = _rotl(v[2], 32)


def siphash24(key: bytes, message: bytes) -> int:
    """SipHash-2-4 of any message under a 16-byte key, as the paper defines it."""
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]
    tail = len(message) % 8
    padded = message[:len(message) - tail] + message[len(message) - tail:] \
        + bytes(7 - tail) + bytes([len(message) & 0xFF])
    for (m,) in struct.iter_unpack("<Q", padded):
        v[3] ^= m
        _sipround(v)
        _sipround(v)
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        _sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def held_out(k0: int, k1: int, campaign: int, user: int, holdout_bps: int) -> bool:
    """protocol.md CAMPAIGNS: SipHash-2-4 keyed le64(k0)||le64(k1) of
    le64(campaign)||le64(user), modulo 10,000, below holdout_bps."""
    digest = siphash24(struct.pack("<QQ", k0, k1), struct.pack("<QQ", campaign, user))
    return digest % BPS < holdout_bps


# ---------------------------------------------------------------------------
# Student's t quantiles (for Welch), from the t distribution itself
# ---------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The incomplete beta function's continued fraction (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def t_upper_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom (t >= 0)."""
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1.0 - x))
    if x < (a + 1.0) / (a + b + 2.0):
        return 0.5 * front * _betacf(a, b, x) / a
    return 0.5 * (1.0 - front * _betacf(b, a, 1.0 - x) / b)


def t_975(df: int) -> Fraction:
    """Student's 97.5 % quantile, rounded up to 6 decimals (by bisection)."""
    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_upper_tail(mid, df) > 0.025 else (low, mid)
    return Fraction(math.ceil(high * PPM), PPM)


T_TABLE = {df: t_975(df) for df in T_DFS}


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

@dataclass
class Segment:
    name: str
    merchants: frozenset
    tags: frozenset
    start: int
    until: int | None
    days: int | None
    payments: tuple          # (min, max or None)
    gmv: tuple
    recency: tuple           # (min or None, max or None)
    never_paid: bool
    program: int | None
    points_min: int | None


@dataclass
class RefCampaign:
    request: tuple           # (name, segment, stock, holdout_bps, coupon_base)
    at: int
    merchants: frozenset
    tags: frozenset
    members: list            # [user, holdout, status, duplicate] by user id
    reply: dict              # the figures of its CAMPAIGNS result


class _Bad(Exception):
    def __init__(self, message: str, status: int = Status.invalid_argument):
        super().__init__(message)
        self.status = status


def _fail(e: _Bad) -> dict:
    return _invalid(str(e)) if e.status == Status.invalid_argument else _status_item(e.status)


def _opt(item: dict, key: str, lo: int, hi: int):
    """item[key] in lo..hi, or None when absent."""
    if key not in item:
        return None
    value = item[key]
    if not _is_int(value) or not lo <= value <= hi:
        raise _Bad(f"{key} must be an integer in {lo}..{hi}")
    return value


def _id_list(item: dict, key: str, ok) -> frozenset:
    value = item.get(key, [])
    if not isinstance(value, (list, tuple)) or len(value) > LIST_MAX or not all(map(ok, value)):
        raise _Bad(f"{key} must be a list of at most {LIST_MAX} ids")
    return frozenset(value)


def _name_of(item: dict) -> str:
    name = item.get("name", "")
    if not _is_name(name):
        raise _Bad("name must be printable text of at most 128 UTF-8 bytes")
    return name


def _minmax(item: dict, low_key: str, high_key: str, top: int, low_default):
    low, high = _opt(item, low_key, 0, top), _opt(item, high_key, 0, top)
    low = low_default if low is None else low
    if high is not None and high < (low or 0):
        raise _Bad(f"{high_key} below {low_key}")
    return low, high


def parse_segment(item, own_id: bool) -> tuple[int, Segment]:
    """protocol.md SEGMENTS: the checks of one item, in the documented order."""
    if not isinstance(item, dict):
        raise _Bad("a segment is a map")
    seg_id = 0
    if own_id:
        if "id" not in item or not _is_u64(item["id"]):
            raise _Bad("id must be a u64")
        if item["id"] == 0:
            raise _Bad("id 0", Status.invalid_id)
        seg_id = item["id"]
    if set(item) - SEGMENT_FIELDS - ({"id"} if own_id else set()):
        raise _Bad("unknown key")
    days = _opt(item, "days", 1, DAYS_MAX)
    if days is not None and ("from" in item or "until" in item):
        raise _Bad("days with from/until")
    start, until = _opt(item, "from", 0, I63_MAX) or 0, _opt(item, "until", 1, I63_MAX)
    if until is not None and start >= until:
        raise _Bad("from >= until")
    never = item.get("never_paid", False)
    if not isinstance(never, bool):
        raise _Bad("never_paid is a bool")
    program = item["program"] if "program" in item else None
    if program is not None and not _is_u64(program):
        raise _Bad("program is a u64")
    points = _opt(item, "points_min", 0, COUNT_MAX)
    if points is not None and program is None:
        raise _Bad("points_min needs program")
    return seg_id, Segment(
        _name_of(item), _id_list(item, "merchants", lambda v: _is_u64(v) and v != 0),
        _id_list(item, "tags", _is_u32), start, until, days,
        _minmax(item, "payments_min", "payments_max", COUNT_MAX, 0),
        _minmax(item, "gmv_min", "gmv_max", COUNT_MAX, 0),
        _minmax(item, "recency_days_min", "recency_days_max", DAYS_MAX, None),
        never, program, points)


def _within(value: int, bounds: tuple) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def _round(x: Fraction) -> int:
    """To the nearest integer, ties to even."""
    return round(x)


def _sqrt_bounds(d: Fraction, q: Fraction) -> tuple[int, int]:
    """(floor(d - sqrt(q)), ceil(d + sqrt(q))): estimated with 80-digit
    Decimals, then settled by exact comparisons in Fractions. The estimate
    alone is off by one when d + sqrt(q) is an integer and d is not a finite
    decimal (d = -2e9 / 3: the rounded Decimal lands just past the integer,
    and the ceiling goes one too far; hypothesis found it)."""
    with localcontext() as ctx:
        ctx.prec = 80
        root = (Decimal(q.numerator) / Decimal(q.denominator)).sqrt()
        mid = Decimal(d.numerator) / Decimal(d.denominator)
        low = int((mid - root).to_integral_value(ROUND_FLOOR))
        high = int((mid + root).to_integral_value(ROUND_CEILING))

    def below(k: int) -> bool:              # k <= d - sqrt(q)
        return d - k >= 0 and (d - k) ** 2 >= q

    def above(k: int) -> bool:              # k >= d + sqrt(q)
        return k - d >= 0 and (k - d) ** 2 >= q
    for _ in range(SETTLE_STEPS_MAX):       # the estimate is within one
        if below(low + 1):
            low += 1
        elif not below(low):
            low -= 1
        elif above(high - 1):
            high -= 1
        elif not above(high):
            high += 1
        else:
            return low, high
    raise AssertionError(f"_sqrt_bounds did not settle: {d}, {q}")


SETTLE_STEPS_MAX = 8


# ---------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------

class MarketingReference(MembershipReference):
    def __init__(self, *args, key_source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._key_source = key_source or (lambda: secrets.randbits(64))
        self.segments: dict[int, Segment] = {}
        self.campaigns: dict[int, RefCampaign] = {}

    def call(self, op: str, request: dict) -> dict:
        if op == "SEGMENTS":
            return self._segments_op(request)
        if op == "CAMPAIGNS":
            return self._campaigns_op(request)
        if op in ("SEGMENT", "LIFT"):
            self._expire_for_read()
            if not isinstance(request, dict):
                raise BadBody("expected a map")
            read = self._segment_op if op == "SEGMENT" else self._lift_op
            return read(request, self._read_time())
        return super().call(op, request)

    # --- SEGMENTS and SEGMENT -----------------------------------------------

    def _segments_op(self, request) -> dict:
        items = self._items(request, "segments")
        self._stamp()
        return {"results": [self._segment_item(item) for item in items]}

    def _segment_item(self, item) -> dict:
        try:
            seg_id, seg = parse_segment(item, own_id=True)
            self._check_program(seg)
            if seg_id not in self.segments and len(self.segments) >= SEGMENTS_MAX:
                raise _Bad("too many segments")
        except _Bad as e:
            return _fail(e)
        self.segments[seg_id] = seg
        return _status_item(Status.ok)

    def _check_program(self, seg: Segment) -> None:
        if seg.program is not None and seg.program not in self.programs:
            raise _Bad("no such program", Status.program_not_found)

    def _segment_op(self, request: dict, now: int) -> dict:
        try:
            if set(request) - {"id", "definition", "after", "limit"} \
                    or ("id" in request) == ("definition" in request):
                raise _Bad("id xor definition")
            after, limit = _opt(request, "after", 0, U64_MAX) or 0, _opt(request, "limit", 0, PAGE_MAX) or 0
            if "id" in request:
                if not _is_u64(request["id"]):
                    raise _Bad("id must be a u64")
                seg = self.segments.get(request["id"])
                if seg is None:
                    raise _Bad("unknown segment", Status.segment_not_found)
            else:
                seg = parse_segment(request["definition"], own_id=False)[1]
            self._check_program(seg)
        except _Bad as e:
            return _fail(e)
        users = self.evaluate(seg, now)
        page = [u for u in users if u > after][:limit]
        reply = {"status": 0, "count": len(users), "at": now, "users": page}
        if limit and len([u for u in users if u > after]) > limit:
            reply["next"] = page[-1]
        return reply

    def _counted(self, merchants: frozenset, tags: frozenset):
        """The counted payments (rules.md) at merchants in the scope, now."""
        for p in self.payments.values():
            if p.state not in (COMPLETED, PARTIALLY_REFUNDED):
                continue
            m = self.merchants[p.merchant]
            if merchants or tags:
                if p.merchant not in merchants and not (tags & m.tags):
                    continue
            yield p

    def evaluate(self, seg: Segment, now: int) -> list[int]:
        start, until = (now - seg.days * DAY_MS, None) if seg.days else (seg.start, seg.until)
        paid = {u: [] for u in self.wallets}
        ever = set()
        for p in self._counted(seg.merchants, seg.tags):
            ever.add(p.user)
            if p.completed_at >= start and (until is None or p.completed_at < until):
                paid[p.user].append(p)
        out = []
        for user in sorted(self.wallets):
            mine = paid[user]
            if not _within(len(mine), seg.payments):
                continue
            if not _within(sum(p.amount - p.refunded_amount for p in mine), seg.gmv):
                continue
            if seg.recency != (None, None):
                if not mine or not _within((now - max(p.completed_at for p in mine)) // DAY_MS,
                                           seg.recency):
                    continue
            if seg.never_paid and user in ever:
                continue
            if seg.program is not None:
                card = self.memberships.get((user, seg.program))
                if card is None or (seg.points_min is not None and card.points < seg.points_min):
                    continue
            out.append(user)
        return out

    # --- CAMPAIGNS ----------------------------------------------------------

    def _campaigns_op(self, request) -> dict:
        items = self._items(request, "campaigns")
        if len(items) > CAMPAIGN_ITEMS_MAX:
            raise BadBody("too many campaigns in one request")
        keys = [(self._key_source(), self._key_source()) for _ in items]
        now = self._stamp()
        return {"results": [self._campaign_item(item, key, now) for item, key in zip(items, keys)]}

    def _campaign_request(self, item) -> tuple[int, tuple]:
        if not isinstance(item, dict) or "id" not in item or not _is_u64(item["id"]):
            raise _Bad("id must be a u64")
        if item["id"] == 0:
            raise _Bad("id 0", Status.invalid_id)
        if set(item) - CAMPAIGN_FIELDS:
            raise _Bad("unknown key")
        for key in ("segment", "stock"):
            if not _is_u64(item.get(key)):
                raise _Bad(f"{key} must be a u64")
        bps, base = item.get("holdout_bps"), item.get("coupon_base")
        if not _is_int(bps) or not 0 <= bps <= BPS or not _is_u64(base) or base == 0:
            raise _Bad("holdout_bps in 0..10000, coupon_base in 1..2**64-1")
        return item["id"], (_name_of(item), item["segment"], item["stock"], bps, base)

    def _campaign_item(self, item, key: tuple, now: int) -> dict:
        try:
            cid, request = self._campaign_request(item)
            known = self.campaigns.get(cid)
            if known is not None:
                if known.request != request:
                    raise _Bad("other fields", Status.exists_with_different_fields)
                return {**known.reply, "duplicate": True}
            seg = self.segments.get(request[1])
            if seg is None:
                raise _Bad("no segment", Status.segment_not_found)
            if request[2] not in self.stocks:
                raise _Bad("no stock", Status.stock_not_found)
            users = self.evaluate(seg, now)
            if len(self.campaigns) >= CAMPAIGNS_MAX or request[4] + len(users) - 1 > U64_MAX:
                raise _Bad("too many campaigns, or coupon ids past 2**64-1")
        except _Bad as e:
            return _fail(e)
        members = []
        for rank, user in enumerate(users):
            if held_out(key[0], key[1], cid, user, request[3]):
                members.append([user, 1, 0, 0])
                continue
            rec = np.zeros((), ISSUE_RECORD)
            rec["coupon"], rec["stock"], rec["user"] = request[4] + rank, request[2], user
            out = self._issue_one(rec, now)
            members.append([user, 0, int(out["status"]), int(out["flags"]) & RESULT_DUPLICATE])
        campaign = RefCampaign(request, now, seg.merchants, seg.tags, members, {})
        campaign.reply = {"status": 0, "id": cid, **self._summary(campaign)}
        self.campaigns[cid] = campaign
        return campaign.reply

    @staticmethod
    def _summary(c: RefCampaign) -> dict:
        treated = [m for m in c.members if not m[1]]
        not_issued = {}
        for _user, _held, status, duplicate in treated:
            if status:
                name = Status(status).name
                not_issued[name] = not_issued.get(name, 0) + 1
            elif duplicate:
                not_issued["duplicate"] = not_issued.get("duplicate", 0) + 1
        return {"size": len(c.members), "treated": len(treated),
                "holdout": len(c.members) - len(treated),
                "issued": sum(1 for m in treated if m[2] == 0 and not m[3]),
                "not_issued": not_issued,
                "at": c.at}

    # --- LIFT ---------------------------------------------------------------

    def _lift_op(self, request: dict, now: int) -> dict:
        try:
            if set(request) - {"campaign", "from", "until"} or not _is_u64(request.get("campaign")):
                raise _Bad("{campaign, from?, until?}")
            c = self.campaigns.get(request["campaign"])
            start = _opt(request, "from", 0, I63_MAX)
            start = start if start is not None else (c.at if c else 0)
            until = _opt(request, "until", 1, I63_MAX)
            if until is not None and start >= until:
                raise _Bad("from >= until")
            if c is None:
                raise _Bad("no campaign", Status.campaign_not_found)
        except _Bad as e:
            return _fail(e)
        return self._lift(request["campaign"], c, start, until, now)

    def _lift(self, cid: int, c: RefCampaign, start: int, until, now: int) -> dict:
        inside, before = {}, set()
        for p in self._counted(c.merchants, c.tags):
            if p.completed_at < start:
                before.add(p.user)
            elif until is None or p.completed_at < until:
                inside.setdefault(p.user, []).append(p.amount - p.refunded_amount)
        groups = {}
        for label, flag in (("treated", 0), ("holdout", 1)):
            users = [m[0] for m in c.members if m[1] == flag]
            groups[label] = self._group(users, inside, before)
        redeemed, discount = self._campaign_coupons(c, start, until)
        summary = self._summary(c)
        name, segment, stock, bps, base = c.request
        reply = {"status": 0, "campaign": cid, "name": name, "segment": segment,
                 "stock": stock, "holdout_bps": bps, "coupon_base": base, "at": c.at,
                 "from": start, "until": until, "now": now, "size": summary["size"],
                 "issued": summary["issued"], "not_issued": summary["not_issued"],
                 "treated": groups["treated"][0], "holdout": groups["holdout"][0],
                 "redeemed": redeemed, "discount": discount,
                 "cost_per_redemption": _round(Fraction(discount, redeemed)) if redeemed else None}
        reply.update(lift_figures(groups["treated"][1], groups["holdout"][1], discount))
        return reply

    @staticmethod
    def _group(users: list, inside: dict, before: set) -> tuple[dict, list]:
        gmv = [sum(inside.get(u, [])) for u in users]
        paid = [u for u in users if u in inside]
        n = len(users)
        figures = {"users": n, "converted": len(paid),
                   "new_converted": sum(1 for u in paid if u not in before),
                   "payments": sum(len(inside.get(u, [])) for u in users), "gmv": sum(gmv),
                   "conversion_ppm": _round(Fraction(len(paid) * PPM, n)) if n else None,
                   "gmv_per_user": _round(Fraction(sum(gmv), n)) if n else None}
        return figures, [n, len(paid), gmv]

    def _campaign_coupons(self, c: RefCampaign, start: int, until) -> tuple[int, int]:
        ours = {c.request[4] + rank for rank, m in enumerate(c.members)
                if not m[1] and m[2] == 0 and not m[3]}
        redeemed = discount = 0
        for p in self.payments.values():
            if p.state not in (COMPLETED, PARTIALLY_REFUNDED) or p.completed_at < start \
                    or (until is not None and p.completed_at >= until):
                continue
            for i, coupon in enumerate(p.coupons):
                if coupon in ours and not p.released >> i & 1:
                    redeemed += 1
                    discount += p.applied[i] - p.refunded_part[i]
        return redeemed, discount

    # --- canonical ----------------------------------------------------------

    def canonical(self) -> dict:
        t = super().canonical()
        none = -1
        t["segments"] = _table("segments", [dict(
            id=i, name=s.name.encode(), **{"from": s.start},
            until=none if s.until is None else s.until, days=s.days or none,
            payments_min=s.payments[0], payments_max=none if s.payments[1] is None else s.payments[1],
            gmv_min=s.gmv[0], gmv_max=none if s.gmv[1] is None else s.gmv[1],
            recency_days_min=none if s.recency[0] is None else s.recency[0],
            recency_days_max=none if s.recency[1] is None else s.recency[1],
            never_paid=int(s.never_paid), program=s.program or 0,
            points_min=none if s.points_min is None else s.points_min)
            for i, s in self.segments.items()])
        t["segment_lists"] = _table("segment_lists", [
            dict(segment=i, list=k, value=v) for i, s in self.segments.items()
            for k, values in ((0, s.merchants), (1, s.tags)) for v in values])
        t["campaigns"] = _table("campaigns", [dict(
            id=i, name=c.request[0].encode(), segment=c.request[1], stock=c.request[2],
            holdout_bps=c.request[3], coupon_base=c.request[4], at=c.at)
            for i, c in self.campaigns.items()])
        t["campaign_lists"] = _table("campaign_lists", [
            dict(campaign=i, list=k, value=v) for i, c in self.campaigns.items()
            for k, values in ((0, c.merchants), (1, c.tags)) for v in values])
        t["campaign_members"] = _table("campaign_members", [
            dict(campaign=i, user=m[0], holdout=m[1], status=m[2], duplicate=m[3])
            for i, c in self.campaigns.items() for m in c.members])
        return t


# ---------------------------------------------------------------------------
# Lift's statistics (protocol.md LIFT), from the group sums
# ---------------------------------------------------------------------------

def _why(t: list, h: list, bounds) -> str | None:
    if t[0] == 0:
        return "no_treated"
    if h[0] == 0:
        return "no_holdout"
    if any(min(g[1], g[0] - g[1]) < EACH_OUTCOME_MIN for g in (t, h)):
        return "too_few"
    return "contains_zero" if bounds[0] <= 0 <= bounds[1] else None


def _t_for(df: Fraction) -> Fraction:
    if df > Z_BEYOND_DF:
        return Z
    tabled = [d for d in T_DFS if d <= df]
    return T_TABLE[tabled[-1] if tabled else 1]


def lift_figures(t: list, h: list, discount: int) -> dict:
    """t, h: [users, converted, per-user GMVs] of the treated and holdout groups."""
    out = {}
    conv = gmv = None
    if t[0] and h[0]:
        diff = Fraction(t[1], t[0]) - Fraction(h[1], h[0])
        var = sum((Fraction(g[1] * (g[0] - g[1]), g[0] ** 3) for g in (t, h)), Fraction(0))
        conv = (diff, Z * Z * var)
    if t[0] >= 2 and h[0] >= 2:
        parts = []
        for g in (t, h):
            mean = Fraction(sum(g[2]), g[0])
            parts.append(sum((x - mean) ** 2 for x in g[2]) / (g[0] - 1) / g[0])
        diff = Fraction(sum(t[2]), t[0]) - Fraction(sum(h[2]), h[0])
        se2 = parts[0] + parts[1]
        q = Fraction(0)
        if se2:
            df = se2 ** 2 / sum(p ** 2 / (g[0] - 1) for p, g in zip(parts, (t, h)))
            q = _t_for(df) ** 2 * se2
        gmv = (diff, q)
    for key, interval, scale, unit in (("conversion", conv, PPM, "_ppm"),
                                       ("gmv_per_user", gmv, 1, "")):
        bounds = _sqrt_bounds(interval[0] * scale, interval[1] * scale * scale) \
            if interval else (None, None)
        why = _why(t, h, bounds)
        out[key] = {f"diff{unit}": _round(interval[0] * scale) if interval else None,
                    f"low{unit}": bounds[0], f"high{unit}": bounds[1],
                    "conclusive": why is None, "reason": why}
    for key, interval in (("incremental_payers", conv), ("incremental_gmv", gmv)):
        if interval is None:
            out[key] = {"value": None, "low": None, "high": None}
            continue
        low, high = _sqrt_bounds(interval[0] * t[0], interval[1] * t[0] * t[0])
        out[key] = {"value": _round(interval[0] * t[0]), "low": low, "high": high}
    payers = out["incremental_payers"]
    exact = conv[0] * t[0] if conv else None
    out["cost_per_incremental_payer"] = {
        "value": _round(discount / exact) if exact is not None and exact > 0 else None,
        "low": discount // payers["high"] if conv and payers["high"] > 0 else None,
        "high": -(-discount // payers["low"]) if conv and payers["low"] > 0 else None}
    return out
