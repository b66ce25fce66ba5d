# Row layouts of the ledger's tables and of the wire records.
#
# Each table is a numpy array whose dtype matches one of these structs, field
# by field: ext/kernel/dtypes.pxi checks it at import against
# ext/kernel/layout.pxi (generated from this file by tools/generate_layout.py:
# rerun it after changing a struct). A payment touches every field of one wallet
# row, so a row per entity keeps it to one cache line.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, int64_t, uint64_t

cdef enum:
    TAGS_PER_MERCHANT_MAX = 16
    COUPONS_PER_PAYMENT_MAX = 4

cdef struct PayRecord:
    uint64_t id
    uint64_t payer
    uint64_t merchant
    int64_t amount
    uint32_t flags
    uint32_t goods_tag
    uint64_t coupons[COUPONS_PER_PAYMENT_MAX]
    uint64_t user_data

cdef struct PayResult:
    uint64_t id
    uint32_t status
    uint32_t flags
    int64_t cash
    int64_t discount
    int64_t fee
    uint64_t timestamp
    uint64_t coupons[COUPONS_PER_PAYMENT_MAX]

cdef struct IssueRecord:
    uint64_t coupon
    uint64_t stock
    uint64_t user
    uint64_t reserved

cdef struct IssueResult:
    uint64_t coupon
    uint32_t status
    uint32_t flags
    uint64_t expires_at

cdef struct CaptureRecord:
    uint64_t payment
    int64_t amount

cdef struct RefundRecord:
    uint64_t id
    uint64_t payment
    int64_t amount
    uint64_t reserved

cdef struct RefundResult:
    uint64_t id
    uint32_t status
    uint32_t flags
    int64_t cash
    int64_t discount
    int64_t fee

cdef struct User:
    uint64_t id
    int64_t balance
    int64_t held
    int32_t coupon_head     # newest coupon of the user, -1 when none
    int32_t coupon_count
    int32_t live_head       # the user's coupons that may still apply (see Coupon.next_live)
    int32_t membership_head # the user's newest membership, -1 none (see Membership.next)

cdef struct Merchant:
    uint64_t id
    int64_t balance
    int32_t fee_bps
    uint8_t active
    uint8_t tag_count
    uint8_t period_active   # activity since the last settlement
    uint8_t _pad
    uint32_t tags[TAGS_PER_MERCHANT_MAX]       # sorted, tag_count used
    # Since the last settlement (docs/reference/rules.md, Settlement):
    int64_t gross
    int64_t merchant_discount
    int64_t platform_discount
    int64_t fees
    int64_t refund_cash
    int64_t refund_platform_discount
    int64_t refund_merchant_discount
    int64_t refund_fee
    int64_t settled_balance # balance right after the last payout
    # STATS, kept as payments complete:
    int64_t stat_payments
    int64_t stat_gmv
    int64_t stat_unique_payers
    int64_t stat_repeat_payers
    int64_t stat_coupon_payments
    int64_t stat_points_issued

cdef struct Stock:
    uint64_t id
    uint64_t merchant_id    # funding merchant of a merchant stock, else 0
    int64_t value
    int64_t cap
    int64_t min_spend
    int64_t valid_from
    int64_t valid_until
    int64_t validity_ms
    int64_t budget
    int64_t max_issued
    int64_t per_user_limit
    int64_t daily_budget
    int64_t per_user_daily_limit
    int64_t spent
    int64_t reserved
    int64_t issued
    int64_t campaign        # balance of campaign(stock); platform stocks only
    int64_t day             # the engine day that day_spent counts
    int64_t day_spent       # net discount (spent + reserved) of payments of `day`
    int64_t stat_redeemed   # STATS
    int64_t stat_gmv
    int64_t stat_payers_new
    int64_t stat_payers_returning
    int32_t merchant        # slot of the funding merchant, -1 for platform
    int32_t list_at         # first of its entries in the u64 list pool
    int32_t merchants_count # sorted merchant ids, then
    int32_t tags_count      # sorted tags, then
    int32_t goods_count     # sorted goods tags
    int32_t slot_at         # first of its slots (3 x i32 each) in the slot pool
    int32_t slots_count
    uint8_t funder
    uint8_t kind
    uint8_t stacking

cdef struct Coupon:
    uint64_t id
    int64_t expires_at
    int32_t stock
    int32_t user
    int32_t next            # the user's next older coupon, -1 at the end
    int32_t payment         # payment slot that uses or locks it, -1 none
    int32_t next_live       # next in the user's live list: used coupons leave it
    uint8_t state
    uint8_t live            # on the live list

cdef struct Payment:
    int64_t applied[COUPONS_PER_PAYMENT_MAX]      # applied (or, while authorized, reserved) part of coupon i
    int64_t refunded_part[COUPONS_PER_PAYMENT_MAX]
    int64_t amount          # T: the captured amount once captured
    int64_t authorized_amount   # 0 for a direct PAY
    int64_t cash            # posted (or held, while authorized)
    int64_t discount
    int64_t fee
    int64_t refunded_amount # R
    int64_t refunded_cash
    int64_t refunded_fee
    int64_t created_at
    int64_t completed_at    # 0 until completed
    int64_t ended_at        # void or expiry time
    int64_t hold_expires_at # 0 for a direct PAY
    int64_t day             # engine day it was made: its coupons count there
    int32_t coupon[COUPONS_PER_PAYMENT_MAX]       # coupon slots of result.coupons
    int32_t earn_at         # its rows in the earnings table (set on completion)
    int32_t earn_count
    int32_t user            # payer's wallet slot
    int32_t merchant
    uint8_t state
    uint8_t coupon_count
    uint8_t released        # bit i: coupon i released at capture
    uint8_t reversed        # ended by REVERSE

cdef struct Refund:
    uint64_t id
    uint64_t payment        # payment id
    int64_t amount
    int64_t cash
    int64_t discount
    int64_t fee

cdef struct Tombstone:
    uint64_t id             # a payment id reversed before it was seen

cdef struct Code:
    uint64_t code
    int64_t expires_at
    int32_t user
    uint8_t used

cdef struct Program:
    uint64_t id
    uint64_t reward_stock_id
    int64_t rate            # points per 100 minor units of cash
    int64_t threshold       # stamps: minimum qualifying amount
    int64_t stamps          # stamps: stamps per reward
    int32_t reward_stock    # slot of the reward stock
    int32_t list_at         # scope in the u64 list pool: merchants, then tags
    int32_t merchants_count
    int32_t tags_count
    uint8_t kind            # 0 points, 1 stamps

cdef struct Membership:
    uint64_t key            # user slot * PROGRAMS_MAX + program slot + 1
    int64_t points
    int64_t stamps
    int32_t user
    int32_t program
    int32_t reward          # coupon slot of this cycle's reward, -1 none
    int32_t next            # the user's next older membership, -1 at the end

cdef struct Earning:
    int64_t points
    int64_t clawed
    int32_t payment
    int32_t program
    uint8_t stamped

cdef struct Visit:
    uint64_t key            # user slot * MERCHANTS_MAX + merchant slot + 1
    int64_t payments
    int32_t user
    int32_t merchant

cdef struct Redemption:
    uint64_t coupon
    int64_t price
    int32_t user
    int32_t program
