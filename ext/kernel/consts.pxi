# Status codes, record flags, state enums and limits the kernel compiles in.

# Status codes: compile-time copies of engine/protocol/status.py, checked equal
# to it at import (check_constants below).
cdef enum:
    ST_OK = 0
    ST_INVALID_ID = 1
    ST_INVALID_AMOUNT = 2
    ST_INVALID_FLAGS = 3
    ST_MERCHANT_NOT_FOUND = 4
    ST_MERCHANT_INACTIVE = 5
    ST_PAYER_NOT_FOUND = 6
    ST_PAYMENT_CODE_INVALID = 7
    ST_INSUFFICIENT_FUNDS = 8
    ST_EXISTS_WITH_DIFFERENT_FIELDS = 9
    ST_COUPON_NOT_FOUND = 11
    ST_COUPON_NOT_OWNED = 12
    ST_COUPON_NOT_AVAILABLE = 13
    ST_COUPON_EXPIRED = 14
    ST_COUPON_NOT_APPLICABLE = 15
    ST_COUPON_BUDGET_EXHAUSTED = 16
    ST_COUPONS_NOT_STACKABLE = 17
    ST_STOCK_NOT_FOUND = 18
    ST_STOCK_ENDED = 19
    ST_STOCK_EXHAUSTED = 20
    ST_PER_USER_LIMIT = 21
    ST_USER_NOT_FOUND = 22
    ST_PAYMENT_NOT_FOUND = 23
    ST_PAYMENT_NOT_REFUNDABLE = 24
    ST_REFUND_EXCEEDS_PAYMENT = 25
    ST_PAYMENT_NOT_AUTHORIZED = 26
    ST_AUTHORIZATION_EXPIRED = 27
    ST_REVERSED = 10
    ST_PROGRAM_NOT_FOUND = 30
    ST_INSUFFICIENT_POINTS = 31
    ST_OFFER_NOT_FOUND = 32

# Explain reasons beyond status codes (QUOTE).
REASON_APPLIED = -1
REASON_NOT_CHOSEN = -2

cdef enum:
    PAY_NO_COUPONS = 1
    PAY_PAYER_IS_CODE = 2
    PAY_AUTHORIZE = 4
    PAY_FLAGS_KNOWN = 7
    RESULT_DUPLICATE = 1
    RESULT_AUTHORIZED = 2

    COUPON_AVAILABLE = 0
    COUPON_LOCKED = 1
    COUPON_USED = 2

    PAYMENT_AUTHORIZED = 0
    PAYMENT_COMPLETED = 1
    PAYMENT_PARTIALLY_REFUNDED = 2
    PAYMENT_REFUNDED = 3
    PAYMENT_VOIDED = 4
    PAYMENT_EXPIRED = 5

    FUNDER_PLATFORM = 0
    FUNDER_MERCHANT = 1
    KIND_FIXED = 0
    KIND_PERCENT = 1
    STACKING_EXCLUSIVE = 0

# Limits: their owner is engine/protocol/limits.py; the kernel takes them
# from it when it loads (a global, as before, not a literal of its own).
cdef int64_t AMOUNT_MAX = _limits.AMOUNT_MAX
cdef int64_t DAY_MS = 86400000
cdef int64_t MINUTE_MS = 60000
cdef int64_t BATCH_RECORDS_MAX = _limits.BATCH_RECORDS_MAX

cdef enum:
    AHEAD_RECORDS = 16      # how far the PAY prefetch pipeline looks ahead (a power of two)

cdef uint64_t PROGRAMS_MAX = 256            # every payment checks every program's scope
cdef uint64_t MERCHANTS_MAX = 1 << 24       # visit keys pack (user, merchant) slots in 64 bits
cdef uint64_t REWARD_ID_BASE = 1ULL << 63   # engine-made reward coupon ids: 2**63 + k
LIMITS = {"programs": PROGRAMS_MAX, "merchants": MERCHANTS_MAX, "reward_id_base": REWARD_ID_BASE}


# The compile-time copies above, by their owners' names: check_constants()
# refuses to load a kernel whose copy differs from its owner.
KERNEL_STATUS = {
    "ok": ST_OK, "invalid_id": ST_INVALID_ID, "invalid_amount": ST_INVALID_AMOUNT,
    "invalid_flags": ST_INVALID_FLAGS, "merchant_not_found": ST_MERCHANT_NOT_FOUND,
    "merchant_inactive": ST_MERCHANT_INACTIVE, "payer_not_found": ST_PAYER_NOT_FOUND,
    "payment_code_invalid": ST_PAYMENT_CODE_INVALID,
    "insufficient_funds": ST_INSUFFICIENT_FUNDS,
    "exists_with_different_fields": ST_EXISTS_WITH_DIFFERENT_FIELDS,
    "reversed": ST_REVERSED, "coupon_not_found": ST_COUPON_NOT_FOUND,
    "coupon_not_owned": ST_COUPON_NOT_OWNED, "coupon_not_available": ST_COUPON_NOT_AVAILABLE,
    "coupon_expired": ST_COUPON_EXPIRED, "coupon_not_applicable": ST_COUPON_NOT_APPLICABLE,
    "coupon_budget_exhausted": ST_COUPON_BUDGET_EXHAUSTED,
    "coupons_not_stackable": ST_COUPONS_NOT_STACKABLE, "stock_not_found": ST_STOCK_NOT_FOUND,
    "stock_ended": ST_STOCK_ENDED, "stock_exhausted": ST_STOCK_EXHAUSTED,
    "per_user_limit": ST_PER_USER_LIMIT, "user_not_found": ST_USER_NOT_FOUND,
    "payment_not_found": ST_PAYMENT_NOT_FOUND,
    "payment_not_refundable": ST_PAYMENT_NOT_REFUNDABLE,
    "refund_exceeds_payment": ST_REFUND_EXCEEDS_PAYMENT,
    "payment_not_authorized": ST_PAYMENT_NOT_AUTHORIZED,
    "authorization_expired": ST_AUTHORIZATION_EXPIRED,
    "program_not_found": ST_PROGRAM_NOT_FOUND, "insufficient_points": ST_INSUFFICIENT_POINTS,
    "offer_not_found": ST_OFFER_NOT_FOUND,
}
# Status codes of the membership extension that status.py does not list yet
# (issue 15 moves them there); every other code must be in Status.
STATUS_PENDING_OWNER = frozenset({"program_not_found", "insufficient_points", "offer_not_found"})
KERNEL_RECORD_CONSTANTS = {
    "PAY_NO_COUPONS": PAY_NO_COUPONS, "PAY_PAYER_IS_CODE": PAY_PAYER_IS_CODE,
    "PAY_AUTHORIZE": PAY_AUTHORIZE, "PAY_FLAGS_KNOWN": PAY_FLAGS_KNOWN,
    "RESULT_DUPLICATE": RESULT_DUPLICATE, "RESULT_AUTHORIZED": RESULT_AUTHORIZED,
}
KERNEL_LIMITS = {"COUPONS_PER_PAYMENT_MAX": COUPONS_PER_PAYMENT_MAX,
                 "TAGS_PER_MERCHANT_MAX": TAGS_PER_MERCHANT_MAX}


def check_constants():
    """Each compile-time copy equals its owner's value, or ImportError."""
    wrong = []
    for name, code in KERNEL_STATUS.items():
        owner = getattr(_Status, name, None)
        if owner is None and name in STATUS_PENDING_OWNER:
            continue
        if owner is None or int(owner) != code:
            wrong.append(f"status {name}: kernel {code}, status.py {owner!r}")
    for name, value in KERNEL_RECORD_CONSTANTS.items():
        if getattr(_records, name) != value:
            wrong.append(f"{name}: kernel {value}, records.py {getattr(_records, name)}")
    for name, value in KERNEL_LIMITS.items():
        if getattr(_limits, name) != value:
            wrong.append(f"{name}: kernel {value}, limits.py {getattr(_limits, name)}")
    if wrong:
        raise ImportError("kernel constants differ from their owners: " + "; ".join(wrong))


check_constants()
