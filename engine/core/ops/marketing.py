"""Map operations of precision marketing: SEGMENTS, SEGMENT, CAMPAIGNS, LIFT
(docs/reference/protocol.md; docs/reference/rules.md, "Precision marketing").

Coupons are issued only by the kernel's ISSUE path (`Ledger.issue`, in
batches), so every stock limit applies exactly as it does to ISSUE; segment
definitions and campaign groups are Python-held state (engine/core/state.py),
kept in snapshots and the canonical tables.
"""
import numpy as np

from engine import _marketing
from engine.core import lift as stats
from engine.core import segments
from engine.core.campaigns import MEMBER, REQUEST_KEYS, Campaign
from engine.core.command import DRAWS_MAX
from engine.core.ops.query import require_map
from engine.core.ops.setup import each_item, list_items
from engine.core.state import State
from engine.core.validate import (I63_MAX, U64_MAX, Invalid, display_name, failure, integer, item_id,
                                  only_keys, result, u64)
from engine.protocol.limits import (BATCH_RECORDS_MAX, CAMPAIGNS_MAX, CAMPAIGNS_PER_REQUEST_MAX,
                                    SEGMENT_PAGE_MAX, SEGMENTS_MAX)
from engine.protocol.records import ISSUE_RECORD, ISSUE_RESULT, RESULT_DUPLICATE
from engine.protocol.status import STATUS_OK, Status

KEY_DRAWS = 2                       # a campaign's 128-bit SipHash key: two u64 draws
assert KEY_DRAWS * CAMPAIGNS_PER_REQUEST_MAX <= DRAWS_MAX
CAMPAIGN_KEYS = frozenset({"id", "name", "segment", "stock", "holdout_bps", "coupon_base"})
SEGMENT_READ_KEYS = frozenset({"id", "definition", "after", "limit"})
LIFT_KEYS = frozenset({"campaign", "from", "until"})


# -- SEGMENTS ---------------------------------------------------------------

def segments_op(state: State, request, now: int, draws) -> dict:
    return each_item(list_items(request, "segments"), lambda i: define_segment(state, i))


def define_segment(state: State, item) -> dict:
    segment_id, d = segments.definition(item)
    if segments.program_missing(state.ledger, d):
        return failure(Status.program_not_found)
    if segment_id not in state.segments and len(state.segments) >= SEGMENTS_MAX:
        raise Invalid(f"at most {SEGMENTS_MAX} segments")
    state.segments[segment_id] = d          # defined or replaced
    return result()


# -- SEGMENT ----------------------------------------------------------------

def segment_op(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{id | definition, after?, limit?}")
    try:
        only_keys(request, SEGMENT_READ_KEYS)
        if ("id" in request) == ("definition" in request):
            raise Invalid("name exactly one of `id` (a saved segment) and `definition`")
        after = u64(request, "after", default=0)
        limit = integer(request, "limit", 0, SEGMENT_PAGE_MAX, default=0)
        if "id" in request:
            d = state.segments.get(u64(request, "id"))
        else:
            d = segments.definition(request["definition"], with_id=False)[1]
    except Invalid as e:
        return failure(e.status, str(e))
    if d is None:
        return failure(Status.segment_not_found)
    if segments.program_missing(state.ledger, d):
        return failure(Status.program_not_found)
    ids = segments.evaluate(state, d, now)
    start = int(np.searchsorted(ids, np.uint64(after), side="right"))
    page = ids[start:start + limit]
    reply = {"status": STATUS_OK, "count": len(ids), "at": now, "users": page.tolist()}
    if limit and start + limit < len(ids):
        reply["next"] = int(page[-1])
    return reply


# -- CAMPAIGNS --------------------------------------------------------------

def draw_campaign_keys(state: State, request, draw) -> list[int]:
    """Outside the apply: a fresh 128-bit key for every item (a duplicate
    or a failing item leaves its key unused; the journal keeps them all)."""
    items = list_items(request, "campaigns")
    return [draw() for _ in range(KEY_DRAWS * len(items))]


def campaigns_op(state: State, request, now: int, draws) -> dict:
    items = list_items(request, "campaigns")
    assert len(draws) == KEY_DRAWS * len(items), "a campaign's key was not drawn"
    keys = iter(zip(draws[0::2], draws[1::2]))
    return each_item(items, lambda item: create_campaign(state, item, now, next(keys)))


def campaign_request(item) -> tuple[int, dict]:
    campaign_id = item_id(item, CAMPAIGN_KEYS)
    request = {"name": display_name(item), "segment": u64(item, "segment"),
               "stock": u64(item, "stock"),
               "holdout_bps": integer(item, "holdout_bps", 0, _marketing.HOLDOUT_SCALE),
               "coupon_base": integer(item, "coupon_base", 1, U64_MAX)}
    assert tuple(request) == REQUEST_KEYS
    return campaign_id, request


def create_campaign(state: State, item, now: int, key: tuple[int, int]) -> dict:
    campaign_id, request = campaign_request(item)
    known = state.campaigns.get(campaign_id)
    if known is not None:
        if known.request != request:
            return failure(Status.exists_with_different_fields)
        return {"status": STATUS_OK, "id": campaign_id, **known.summary(), "duplicate": True}
    d = state.segments.get(request["segment"])
    if d is None:
        return failure(Status.segment_not_found)
    ledger = state.ledger
    if request["stock"] == 0 or ledger.find("stocks", request["stock"]) < 0:
        return failure(Status.stock_not_found)
    if len(state.campaigns) >= CAMPAIGNS_MAX:
        raise Invalid(f"at most {CAMPAIGNS_MAX} campaigns")
    users = segments.evaluate(state, d, now)
    if len(users) and request["coupon_base"] > U64_MAX - (len(users) - 1):
        raise Invalid(f"the segment has {len(users)} users: coupon ids from `coupon_base` "
                      f"would pass 2**64 - 1")
    held = np.zeros(len(users), np.uint8)
    _marketing.holdout(users, key[0], key[1], campaign_id, request["holdout_bps"], held)
    members = np.zeros(len(users), MEMBER)
    members["user"], members["holdout"] = users, held
    campaign = Campaign(request, now, d["merchants"], d["tags"], members)
    issue(state, campaign, now)
    state.campaigns[campaign_id] = campaign
    return {"status": STATUS_OK, "id": campaign_id, **campaign.summary()}


def issue(state: State, campaign: Campaign, now: int) -> None:
    """The treated members' coupons through the kernel's ISSUE, in batches
    in user id order; each member's status and duplicate flag recorded."""
    members = campaign.members
    treated = np.flatnonzero(members["holdout"] == 0)
    records = np.zeros(len(treated), ISSUE_RECORD)
    records["coupon"] = campaign.coupon_ids()[treated]
    records["stock"] = campaign.request["stock"]
    records["user"] = members["user"][treated]
    state.ledger.reserve("coupons", len(records))
    for at in range(0, len(records), BATCH_RECORDS_MAX):    # bounded by the segment's size
        batch = records[at:at + BATCH_RECORDS_MAX]
        out = np.zeros(len(batch), ISSUE_RESULT)
        state.ledger.issue(batch.view(np.uint8), now, out.view(np.uint8))
        rows = treated[at:at + len(batch)]
        members["status"][rows] = out["status"]
        members["duplicate"][rows] = (out["flags"] & RESULT_DUPLICATE) != 0


# -- LIFT -------------------------------------------------------------------

def lift_op(state: State, request, now: int, draws) -> dict:
    request = require_map(request, "{campaign, from?, until?}")
    try:
        only_keys(request, LIFT_KEYS)
        campaign_id = u64(request, "campaign")
        campaign = state.campaigns.get(campaign_id)
        start = integer(request, "from", 0, I63_MAX, default=campaign.at if campaign else 0)
        until = integer(request, "until", 1, I63_MAX, default=0) or None
        if until is not None and start >= until:
            raise Invalid("`from` must be before `until`")
    except Invalid as e:
        return failure(e.status, str(e))
    if campaign is None:
        return failure(Status.campaign_not_found)
    return measure(state, campaign_id, campaign, start, until, now)


def measure(state: State, campaign_id: int, campaign: Campaign, start: int, until, now: int):
    ledger = state.ledger
    mask = segments.scope_mask(ledger, campaign.merchants, campaign.tags)
    seen = segments.Activity(ledger, mask, start, I63_MAX if until is None else until)
    slots = segments.user_order(state).slots_of(campaign.members["user"])
    held = campaign.members["holdout"] != 0
    groups = {name: group_sums(seen, slots[which])
              for name, which in (("treated", ~held), ("holdout", held))}
    redeemed, discount = campaign_discount(ledger, campaign, start, until)
    summary = campaign.summary()
    reply = {"status": STATUS_OK, "campaign": campaign_id, **campaign.request, "at": campaign.at,
             "from": start, "until": until, "now": now, "size": summary["size"],
             "issued": summary["issued"], "not_issued": summary["not_issued"],
             "treated": groups["treated"][1], "holdout": groups["holdout"][1],
             "redeemed": redeemed, "discount": discount,
             "cost_per_redemption": stats.ratio(discount, redeemed)}
    reply.update(stats.figures(groups["treated"][0], groups["holdout"][0], discount))
    return reply


def group_sums(seen: segments.Activity, slots: np.ndarray) -> tuple[stats.Group, dict]:
    """(the statistics' sums, the reply's figures) of one group."""
    count, gmv = seen.count[slots], seen.gmv[slots]
    paid = count > 0
    users, converted = len(slots), int(paid.sum())
    total = sum(gmv[paid].tolist())                 # exact: Python ints
    squares = sum(g * g for g in gmv[paid].tolist())
    figures = {"users": users, "converted": converted,
               "new_converted": int((paid & ~seen.before[slots]).sum()),
               "payments": int(count.sum()), "gmv": total,
               "conversion_ppm": stats.ratio(converted * stats.PPM, users),
               "gmv_per_user": stats.ratio(total, users)}
    return stats.Group(users, converted, total, squares), figures


def campaign_discount(ledger, campaign: Campaign, start: int, until) -> tuple[int, int]:
    """(redeemed, net discount) of the coupons this campaign issued, in the
    counted payments completed in the window."""
    ids = ledger.coupons["id"][:ledger.n_coupons]
    base, size = np.uint64(campaign.request["coupon_base"]), np.uint64(len(campaign.members))
    offset = ids - base                                 # wraps below base: masked next
    ours = (ids >= base) & (offset < size)
    ours[ours] = campaign.issued_mask()[offset[ours].astype(np.int64)]
    rows = segments.payment_rows(ledger)
    return _marketing.coupon_discount(rows, ours.astype(np.uint8), start,
                                      I63_MAX if until is None else until)
