# Status codes, record flags, state enums and limits the kernel compiles in.

# Status codes (engine/protocol/status.py).
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

cdef int64_t AMOUNT_MAX = 100000000000000
cdef int64_t DAY_MS = 86400000
cdef int64_t MINUTE_MS = 60000
cdef int64_t BATCH_RECORDS_MAX = 8190

cdef enum:
    AHEAD_RECORDS = 16      # how far the PAY prefetch pipeline looks ahead (a power of two)

cdef uint64_t PROGRAMS_MAX = 256            # every payment checks every program's scope
cdef uint64_t MERCHANTS_MAX = 1 << 24       # visit keys pack (user, merchant) slots in 64 bits
cdef uint64_t REWARD_ID_BASE = 1ULL << 63   # engine-made reward coupon ids: 2**63 + k
LIMITS = {"programs": PROGRAMS_MAX, "merchants": MERCHANTS_MAX, "reward_id_base": REWARD_ID_BASE}
