"""Every limit of the protocol and of the rules, in one place (as
TigerBeetle's constants.zig), with asserts on how the limits relate.

Other modules import their limits from here; none writes the numbers again
(the tidy test checks the batch maximum). The kernel's copies (ext/) must
equal these. Pure Python: importable without the compiled kernel.
"""

# -- frames and batches (docs/reference/protocol.md) --------------------------

FRAME_HEADER_BYTES = 16                 # u32 size, u16 op, u16 flags, u64 request_id
FRAME_BYTES_MAX_DEFAULT = 1 << 20       # a frame's size limit, announced in HELLO as max_frame
BATCH_RECORDS_MAX = 8190                # records in one PAY/ISSUE/... frame: HELLO's max_batch
RECORD_BYTES_MAX = 80                   # the largest record: PayRecord and PayResult
COUPONS_PER_PAYMENT_MAX = 4             # coupon slots of a PayRecord / PayResult

# -- amounts and money (docs/reference/rules.md) -------------------------------

AMOUNT_MIN = 1                          # minor units
AMOUNT_MAX = 10**14
WALLET_BALANCE_MAX = 10**15
BANK_DEBT_MAX = 2**62
PAYMENT_CODE_MIN = 10**17
PAYMENT_CODE_MAX = 10**18               # exclusive
PAYMENT_CODE_TTL_MS = 60_000

# -- map operations -------------------------------------------------------------

# Items per list of a read request over the wire (GET_PAYMENTS and COUPONS
# `ids`, the lists of BALANCES and STATS): a longer one is bad_body
# (check_lookup_lists, from MapOp.check_body in the server). One GET_PAYMENTS
# of 100,000 ids made an 11.4 MB reply and held every payment back for 0.5 s
# while it was built; 1,024 bound a reply to about 0.5 MB.
WIRE_LOOKUP_ITEMS_MAX = 1024
LOOKUP_IDS_MAX = 100_000                # the embedded Engine's own limit
COUPONS_PAGE_MAX = 1024                 # COUPONS {user}: coupons per reply (then `next`)
QUOTE_EXPLAIN_MAX = 1024                # QUOTE explain entries per reply (then explain_omitted)
TAGS_PER_MERCHANT_MAX = 16
STOCK_LIST_LENGTH_MAX = 4096            # merchants or tags listed by one stock or program
STOCK_SLOTS_MAX = 64
OFFERS_MAX = 64                         # offers of one points program
SCOPE_MERCHANTS_MAX = 100_000           # merchants in one scope (a key's list is far shorter)
NAME_BYTES_MAX = 128                    # a stock's, segment's or campaign's name, in UTF-8 bytes

# -- precision marketing (SEGMENTS, SEGMENT, CAMPAIGNS, LIFT) ------------------

SEGMENTS_MAX = 4096                     # saved segments (each is evaluated over every payment)
CAMPAIGNS_MAX = 4096                    # campaigns (each keeps its frozen groups)
# CAMPAIGNS items per request: each draws a 128-bit key (two u64 draws), and a
# journal entry holds at most DRAWS_MAX (engine/core/command.py) draws.
CAMPAIGNS_PER_REQUEST_MAX = 64
SEGMENT_PAGE_MAX = 1024                 # SEGMENT: user ids per reply (then `next`)
SEGMENT_DAYS_MAX = 36_600               # a window of the last n days: about a century

# -- how they relate ------------------------------------------------------------

# A full batch of the largest record fits in a frame of the default size,
# so a server with default settings accepts what HELLO announces.
assert FRAME_HEADER_BYTES + BATCH_RECORDS_MAX * RECORD_BYTES_MAX <= FRAME_BYTES_MAX_DEFAULT
assert 1 <= COUPONS_PER_PAYMENT_MAX <= 8        # a payment's `released` mask is one byte
assert 1 <= AMOUNT_MIN <= AMOUNT_MAX < WALLET_BALANCE_MAX < BANK_DEBT_MAX < 2**63
# A full batch at the largest amount cannot overflow an i64 sum.
assert BATCH_RECORDS_MAX * AMOUNT_MAX < 2**63
assert 0 < PAYMENT_CODE_MIN < PAYMENT_CODE_MAX < 2**64
assert 1 <= WIRE_LOOKUP_ITEMS_MAX <= LOOKUP_IDS_MAX
assert 1 <= COUPONS_PAGE_MAX <= LOOKUP_IDS_MAX and 1 <= QUOTE_EXPLAIN_MAX
assert 1 <= SEGMENT_PAGE_MAX <= WIRE_LOOKUP_ITEMS_MAX
