"""Status codes of records and map items, and error-frame codes: the one
owner of every code (docs/reference/protocol.md). The kernel's copies must
equal these."""
from enum import IntEnum


class Status(IntEnum):
    """Per-record / per-item outcome. The number travels in records, the name in maps."""

    ok = 0
    invalid_id = 1
    invalid_amount = 2
    invalid_flags = 3
    merchant_not_found = 4
    merchant_inactive = 5
    payer_not_found = 6
    payment_code_invalid = 7
    insufficient_funds = 8
    exists_with_different_fields = 9
    reversed = 10
    coupon_not_found = 11
    coupon_not_owned = 12
    coupon_not_available = 13
    coupon_expired = 14
    coupon_not_applicable = 15
    coupon_budget_exhausted = 16
    coupons_not_stackable = 17
    stock_not_found = 18
    stock_ended = 19
    stock_exhausted = 20
    per_user_limit = 21
    user_not_found = 22
    payment_not_found = 23
    payment_not_refundable = 24
    refund_exceeds_payment = 25
    payment_not_authorized = 26
    authorization_expired = 27
    forbidden = 28
    invalid_argument = 29
    # Membership and marketing (extension: PROGRAMS, REDEEM_POINTS).
    program_not_found = 30
    insufficient_points = 31
    offer_not_found = 32
    # Precision marketing (extension: SEGMENTS, SEGMENT, CAMPAIGNS, LIFT).
    segment_not_found = 33
    campaign_not_found = 34


class ErrorCode(IntEnum):
    """Codes of error frames: the whole request was refused."""

    bad_frame = 1
    frame_too_large = 2
    unknown_op = 3
    bad_body = 4
    not_authenticated = 5
    forbidden = 6
    busy = 7
    unavailable = 8
    unsupported_protocol = 9
    not_leader = 10        # replicated follower; the message names the leader's address


STATUS_NAMES = {s.value: s.name for s in Status}
STATUS_OK: int = Status.ok.value
"""Status.ok as a plain int, for the `status` of map replies (which carry plain ints)."""
