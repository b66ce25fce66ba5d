# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ledger kernel: state tables and the batch apply of PAY and ISSUE.

State is a set of numpy arrays (one row per wallet, merchant, stock, coupon,
payment, payment code) with u64-id hash indexes. `pay` and `issue` apply a
whole batch of wire records in one call without the GIL and without a
Python object per record. The apply is deterministic: it reads no clock and
no randomness; the caller passes the batch's engine time.

Rules: docs/reference/rules.md, "Paying" and "Coupon stocks and coupons".
Comments cite its steps as "rules.md step N" (the numbered steps of "Paying").
"""
cimport cython
cimport numpy as cnp
import numpy as np
from libc.stdint cimport uint8_t, uint32_t, int32_t, int64_t, uint64_t
from libc.string cimport memcmp, memset

from tables cimport (PayRecord, PayResult, IssueRecord, IssueResult, User,
                     CaptureRecord, RefundRecord, RefundResult,
                     Program, Membership, Earning, Visit, Redemption,
                     Merchant, Stock, Coupon, Payment, Code, Refund, Tombstone)
from index cimport (Entry, Index, index_get, index_put, index_prefetch, index_guess,
                   row_id, LOAD_MAX_PCT, __builtin_prefetch, prefetch_row,
                   prefetch_for_write)

from engine.protocol.records import PAY_RECORD, PAY_RESULT

cnp.import_array()

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

cdef extern from *:
    ctypedef long long int128 "__int128"


cdef inline int64_t share_of(int64_t refunded, int64_t part, int64_t total) noexcept nogil:
    """floor(refunded * part / total) exactly: the product needs 128 bits."""
    return <int64_t>((<int128>refunded * <int128>part) / <int128>total)

USER = np.dtype([("id", "<u8"), ("balance", "<i8"), ("held", "<i8"),
                 ("coupon_head", "<i4"), ("coupon_count", "<i4"), ("live_head", "<i4"),
                 ("membership_head", "<i4")],
                align=True)
MERCHANT = np.dtype([("id", "<u8"), ("balance", "<i8"), ("fee_bps", "<i4"),
                     ("active", "u1"), ("tag_count", "u1"), ("period_active", "u1"),
                     ("_pad", "u1"), ("tags", "<u4", (16,))]
                    + [(f, "<i8") for f in (
                        "gross", "merchant_discount", "platform_discount", "fees",
                        "refund_cash", "refund_platform_discount",
                        "refund_merchant_discount", "refund_fee", "settled_balance",
                        "stat_payments", "stat_gmv", "stat_unique_payers",
                        "stat_repeat_payers", "stat_coupon_payments", "stat_points_issued")],
                    align=True)
STOCK = np.dtype([("id", "<u8"), ("merchant_id", "<u8")]
                 + [(f, "<i8") for f in (
                     "value", "cap", "min_spend", "valid_from", "valid_until",
                     "validity_ms", "budget", "max_issued", "per_user_limit",
                     "daily_budget", "per_user_daily_limit", "spent",
                     "reserved", "issued", "campaign", "day", "day_spent",
                     "stat_redeemed", "stat_gmv", "stat_payers_new",
                     "stat_payers_returning")]
                 + [(f, "<i4") for f in (
                     "merchant", "list_at", "merchants_count", "tags_count",
                     "goods_count", "slot_at", "slots_count")]
                 + [("funder", "u1"), ("kind", "u1"), ("stacking", "u1")],
                 align=True)
COUPON = np.dtype([("id", "<u8"), ("expires_at", "<i8"), ("stock", "<i4"),
                   ("user", "<i4"), ("next", "<i4"), ("payment", "<i4"),
                   ("next_live", "<i4"), ("state", "u1"), ("live", "u1")], align=True)
PAYMENT = np.dtype([("applied", "<i8", (4,)), ("refunded_part", "<i8", (4,))]
                   + [(f, "<i8") for f in (
                       "amount", "authorized_amount", "cash", "discount", "fee",
                       "refunded_amount", "refunded_cash", "refunded_fee",
                       "created_at", "completed_at", "ended_at", "hold_expires_at", "day")]
                   + [("coupon", "<i4", (4,)), ("earn_at", "<i4"), ("earn_count", "<i4"),
                      ("user", "<i4"), ("merchant", "<i4"),
                      ("state", "u1"), ("coupon_count", "u1"), ("released", "u1"),
                      ("reversed", "u1")], align=True)
REFUND = np.dtype([("id", "<u8"), ("payment", "<u8"), ("amount", "<i8"),
                   ("cash", "<i8"), ("discount", "<i8"), ("fee", "<i8")], align=True)
TOMBSTONE = np.dtype([("id", "<u8")])
PROGRAM = np.dtype([("id", "<u8"), ("reward_stock_id", "<u8"), ("rate", "<i8"),
                    ("threshold", "<i8"), ("stamps", "<i8"), ("reward_stock", "<i4"),
                    ("list_at", "<i4"), ("merchants_count", "<i4"), ("tags_count", "<i4"),
                    ("kind", "u1")], align=True)
MEMBERSHIP = np.dtype([("key", "<u8"), ("points", "<i8"), ("stamps", "<i8"), ("user", "<i4"),
                       ("program", "<i4"), ("reward", "<i4"), ("next", "<i4")], align=True)
EARNING = np.dtype([("points", "<i8"), ("clawed", "<i8"), ("payment", "<i4"),
                    ("program", "<i4"), ("stamped", "u1")], align=True)
VISIT = np.dtype([("key", "<u8"), ("payments", "<i8"), ("user", "<i4"), ("merchant", "<i4")],
                 align=True)
REDEMPTION = np.dtype([("coupon", "<u8"), ("price", "<i8"), ("user", "<i4"),
                       ("program", "<i4")], align=True)
cdef enum:
    AHEAD_RECORDS = 16      # how far the PAY prefetch pipeline looks ahead (a power of two)

cdef uint64_t PROGRAMS_MAX = 256            # every payment checks every program's scope
cdef uint64_t MERCHANTS_MAX = 1 << 24       # visit keys pack (user, merchant) slots in 64 bits
cdef uint64_t REWARD_ID_BASE = 1ULL << 63   # engine-made reward coupon ids: 2**63 + k
LIMITS = {"programs": PROGRAMS_MAX, "merchants": MERCHANTS_MAX, "reward_id_base": REWARD_ID_BASE}
CODE = np.dtype([("code", "<u8"), ("expires_at", "<i8"), ("user", "<i4"),
                 ("used", "u1")], align=True)

assert USER.itemsize == sizeof(User)
assert MERCHANT.itemsize == sizeof(Merchant)
assert STOCK.itemsize == sizeof(Stock)
assert COUPON.itemsize == sizeof(Coupon)
assert PAYMENT.itemsize == sizeof(Payment)
assert CODE.itemsize == sizeof(Code)
assert REFUND.itemsize == sizeof(Refund)
assert TOMBSTONE.itemsize == sizeof(Tombstone)
assert PROGRAM.itemsize == sizeof(Program) and MEMBERSHIP.itemsize == sizeof(Membership)
assert EARNING.itemsize == sizeof(Earning) and VISIT.itemsize == sizeof(Visit)
assert REDEMPTION.itemsize == sizeof(Redemption)
assert sizeof(PayRecord) == 80 and sizeof(PayResult) == 80
assert sizeof(IssueRecord) == 32 and sizeof(IssueResult) == 24


# The row arrays of each table (grown together) and the tables with no index.
TABLE_ROWS = {
    "users": ("users",), "merchants": ("merchants",), "coupons": ("coupons",),
    "stocks": ("stocks", "stock_mark", "stock_cand"),
    "payments": ("pay_req", "pay_res", "pay_meta"), "codes": ("codes",),
    "refunds": ("refunds",), "tombstones": ("tombstones",), "programs": ("programs",),
    "memberships": ("memberships",), "earnings": ("earnings",), "visits": ("visits",),
    "redemptions": ("redemptions",),
}
UNINDEXED_TABLES = frozenset({"earnings", "memberships"})   # memberships: see membership()


cdef inline void* data_of(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


cdef class IdIndex:
    """u64 id -> row slot over one table's rows (see index.pxd)."""
    cdef Index ix
    cdef object entries

    def __cinit__(self):
        self.entries = np.full(16, -1, np.int64)
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = 15
        self.ix.count = 0
        self.ix.rows = NULL
        self.ix.row_bytes = 0

    cdef void bind(self, object rows):
        """Point at the (possibly reallocated) rows array."""
        self.ix.rows = <const char*>data_of(rows)
        self.ix.row_bytes = rows.dtype.itemsize

    cdef reserve(self, int64_t count_need):
        """Grow so that `count_need` entries stay under the load limit."""
        cdef uint64_t capacity = self.ix.mask + 1
        if count_need * 100 <= <int64_t>capacity * LOAD_MAX_PCT:
            return
        while count_need * 100 > <int64_t>capacity * LOAD_MAX_PCT:
            capacity *= 2
        cdef int64_t count = self.ix.count, slot
        self.entries = np.full(capacity, -1, np.int64)
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = capacity - 1
        self.ix.count = 0
        # Every row 0..count-1 is indexed (rows are never removed), so the
        # rehash reads the rows in order, a stream, instead of chasing each
        # old entry's slot to a random row; the new buckets are prefetched.
        with nogil:
            for slot in range(count):
                if slot + 8 < count:
                    index_prefetch(&self.ix, row_id(&self.ix, <int32_t>(slot + 8)))
                index_put(&self.ix, row_id(&self.ix, <int32_t>slot), <int32_t>slot)
        assert self.ix.count == count

    def get(self, uint64_t key):
        return index_get(&self.ix, key)

    @property
    def nbytes(self):
        return self.entries.nbytes

    @property
    def count(self):
        return self.ix.count


cdef struct Cand:
    int64_t d
    int64_t expires_at
    uint64_t id
    int32_t slot
    int32_t stock


cdef struct Selection:
    int32_t count
    int32_t slot[4]
    int64_t d[4]            # discount on the original amount
    int64_t applied[4]
    int64_t total


cdef struct Clock:
    int64_t now
    int64_t day             # engine day, engine time zone
    int32_t weekday         # 0 = Monday, engine time zone
    int32_t minute          # minute of the local day


cdef inline bint ranks_before(const Cand* a, const Cand* b) noexcept nogil:
    # rules.md step 5: d descending, expires_at ascending, coupon id ascending.
    if a.d != b.d:
        return a.d > b.d
    if a.expires_at != b.expires_at:
        return a.expires_at < b.expires_at
    return a.id < b.id


cdef inline bint contains_u64(const uint64_t* sorted_values, int32_t n,
                              uint64_t value) noexcept nogil:
    """Branch-free binary search: scope lists are probed with random merchant
    ids, so a branch per step would mispredict half the time."""
    cdef const uint64_t* base = sorted_values
    cdef int32_t half
    if n <= 0:
        return False
    while n > 1:
        half = n >> 1
        base = base + half if base[half] <= value else base     # a cmov
        n -= half
    return base[0] == value


cdef inline int64_t discount_of(const Stock* s, int64_t amount) noexcept nogil:
    """rules.md step 4: d on the original amount."""
    cdef int64_t d
    if s.kind == KIND_FIXED:
        return s.value if s.value < amount else amount
    d = amount * s.value // 10000      # <= 10**18: fits in 64 bits
    if s.cap > 0 and d > s.cap:
        d = s.cap
    return d


cdef class Ledger:
    """All state of one engine, and the batch apply over it."""
    cdef public object users, merchants, stocks, coupons, codes
    cdef public object pay_req, pay_res, pay_meta, refunds, tombstones, auth_queue
    cdef public object programs, memberships, earnings, visits, redemptions, program_order
    cdef public object lists, slots
    cdef public IdIndex users_ix, merchants_ix, stocks_ix, coupons_ix
    cdef public IdIndex payments_ix, codes_ix, refunds_ix, tombstones_ix
    cdef public IdIndex programs_ix, visits_ix, redemptions_ix
    cdef public int64_t n_users, n_merchants, n_stocks, n_coupons
    cdef public int64_t n_payments, n_codes, n_lists, n_slots
    cdef public int64_t n_refunds, n_tombstones, auth_head, n_auth
    cdef public int64_t n_programs, n_memberships, n_earnings, n_visits, n_redemptions
    cdef public int64_t n_rewards
    cdef public int64_t fees, bank, tz_offset_ms, hold_ms
    cdef public int32_t coupons_per_user_max
    # Auto selection scratch: per-stock "best candidate" marks, candidates.
    cdef public object stock_mark, stock_cand, cands
    cdef int64_t generation

    cdef User* U
    cdef Merchant* M
    cdef Stock* S
    cdef Coupon* C
    cdef PayRecord* PQ
    cdef PayResult* PR
    cdef Payment* PM
    cdef Code* K
    cdef Refund* RF
    cdef Tombstone* TS
    cdef Program* PG
    cdef int32_t* PO
    cdef Membership* MS
    cdef Earning* EA
    cdef Visit* VS
    cdef Redemption* RD
    cdef int32_t* AQ
    cdef uint64_t* LP
    cdef int32_t* SP
    cdef int64_t* stock_mark_p
    cdef int32_t* stock_cand_p
    cdef Cand* cands_p
    cdef int64_t cands_capacity
    # The prefetch pipeline's guesses (wallet and merchant slot) of the next
    # AHEAD_RECORDS records, by record number mod AHEAD_RECORDS: each is
    # hashed once, when its record enters the pipeline, not at every stage.
    cdef int32_t ahead_user[AHEAD_RECORDS]
    cdef int32_t ahead_merchant[AHEAD_RECORDS]

    def __init__(self, int64_t tz_offset_ms=8 * 3600 * 1000,
                 int64_t hold_ms=7 * 24 * 3600 * 1000):
        self.tz_offset_ms = tz_offset_ms
        self.hold_ms = hold_ms
        self.refunds = np.zeros(64, REFUND)
        self.tombstones = np.zeros(64, TOMBSTONE)
        self.auth_queue = np.zeros(64, np.int32)
        self.refunds_ix = IdIndex()
        self.tombstones_ix = IdIndex()
        self.programs = np.zeros(16, PROGRAM)
        self.program_order = np.zeros(PROGRAMS_MAX, np.int32)
        self.memberships = np.zeros(1024, MEMBERSHIP)
        self.earnings = np.zeros(1024, EARNING)
        self.visits = np.zeros(1024, VISIT)
        self.redemptions = np.zeros(64, REDEMPTION)
        self.programs_ix = IdIndex()
        self.visits_ix = IdIndex()
        self.redemptions_ix = IdIndex()
        self.users = np.zeros(1024, USER)
        self.merchants = np.zeros(64, MERCHANT)
        self.stocks = np.zeros(64, STOCK)
        self.coupons = np.zeros(1024, COUPON)
        self.codes = np.zeros(64, CODE)
        self.pay_req = np.zeros(1024, PAY_RECORD)
        self.pay_res = np.zeros(1024, PAY_RESULT)
        self.pay_meta = np.zeros(1024, PAYMENT)
        self.lists = np.zeros(256, np.uint64)
        self.slots = np.zeros(3 * 64, np.int32)
        self.users_ix = IdIndex()
        self.merchants_ix = IdIndex()
        self.stocks_ix = IdIndex()
        self.coupons_ix = IdIndex()
        self.payments_ix = IdIndex()
        self.codes_ix = IdIndex()
        self.stock_mark = np.zeros(64, np.int64)
        self.stock_cand = np.zeros(64, np.int32)
        self.cands = np.zeros(16 * 48, np.uint8)
        self.cands_capacity = 16
        self.generation = 0
        self._bind()

    # -- table management -------------------------------------------------

    cdef _bind(self):
        """Refresh raw pointers after any array was (re)allocated."""
        self.U = <User*>data_of(self.users)
        self.M = <Merchant*>data_of(self.merchants)
        self.S = <Stock*>data_of(self.stocks)
        self.C = <Coupon*>data_of(self.coupons)
        self.K = <Code*>data_of(self.codes)
        self.RF = <Refund*>data_of(self.refunds)
        self.TS = <Tombstone*>data_of(self.tombstones)
        self.PG = <Program*>data_of(self.programs)
        self.PO = <int32_t*>data_of(self.program_order)
        self.MS = <Membership*>data_of(self.memberships)
        self.EA = <Earning*>data_of(self.earnings)
        self.VS = <Visit*>data_of(self.visits)
        self.RD = <Redemption*>data_of(self.redemptions)
        self.AQ = <int32_t*>data_of(self.auth_queue)
        self.PQ = <PayRecord*>data_of(self.pay_req)
        self.PR = <PayResult*>data_of(self.pay_res)
        self.PM = <Payment*>data_of(self.pay_meta)
        self.LP = <uint64_t*>data_of(self.lists)
        self.SP = <int32_t*>data_of(self.slots)
        self.stock_mark_p = <int64_t*>data_of(self.stock_mark)
        self.stock_cand_p = <int32_t*>data_of(self.stock_cand)
        self.cands_p = <Cand*>data_of(self.cands)
        self.users_ix.bind(self.users)
        self.merchants_ix.bind(self.merchants)
        self.stocks_ix.bind(self.stocks)
        self.coupons_ix.bind(self.coupons)
        self.payments_ix.bind(self.pay_req)
        self.codes_ix.bind(self.codes)
        self.refunds_ix.bind(self.refunds)
        self.tombstones_ix.bind(self.tombstones)
        self.programs_ix.bind(self.programs)
        self.visits_ix.bind(self.visits)
        self.redemptions_ix.bind(self.redemptions)

    @staticmethod
    def _grown(arr, int64_t need):
        cdef int64_t capacity = len(arr)
        if need <= capacity:
            return arr
        # Zeroed by writing, not calloc: the pages fault in here, at growth,
        # rather than one by one inside the batch apply. Rows past the used
        # count are always zero (nothing writes a row it does not keep), so
        # the kernel fills a new row's fields without clearing it first.
        grown = np.empty(max(need, capacity + capacity // 2), arr.dtype)
        grown[:capacity] = arr
        grown[capacity:].view(np.uint8).fill(0)
        return grown

    def reserve(self, str table, int64_t more):
        """Room for `more` new rows of `table` (rows and index)."""
        if table not in TABLE_ROWS:
            raise ValueError(f"unknown table {table!r}")
        cdef int64_t need = getattr(self, "n_" + table) + more
        for name in TABLE_ROWS[table]:
            setattr(self, name, self._grown(getattr(self, name), need))
        if table == "payments":     # each payment may become an authorization to expire
            self.auth_queue = self._grown(self.auth_queue, self.n_auth + more)
        self._bind()
        cdef IdIndex ix
        if table not in UNINDEXED_TABLES:
            ix = getattr(self, table + "_ix")
            # The rehash relies on it: rows 0..n-1 are exactly the indexed ones.
            assert ix.ix.count == need - more, f"{table}: index out of step with rows"
            ix.reserve(need)

    def rows(self, str table):
        """Rows in use in `table`."""
        if table not in TABLE_ROWS:
            raise ValueError(f"unknown table {table!r}")
        return getattr(self, "n_" + table)

    def append(self, str table, uint64_t key):
        """Add a zeroed row with id `key` (known absent) and return its slot."""
        assert key != 0
        self.reserve(table, 1)
        cdef int32_t slot
        if table == "users":
            slot = self.n_users
            self.U[slot].id = key
            self.U[slot].coupon_head = -1
            self.U[slot].live_head = -1
            self.U[slot].membership_head = -1
            index_put(&self.users_ix.ix, key, slot)
            self.n_users += 1
        elif table == "merchants":
            slot = self.n_merchants
            self.M[slot].id = key
            index_put(&self.merchants_ix.ix, key, slot)
            self.n_merchants += 1
        elif table == "stocks":
            slot = self.n_stocks
            self.S[slot].id = key
            self.S[slot].merchant = -1
            index_put(&self.stocks_ix.ix, key, slot)
            self.n_stocks += 1
        elif table == "codes":
            slot = self.n_codes
            self.K[slot].code = key
            index_put(&self.codes_ix.ix, key, slot)
            self.n_codes += 1
        elif table == "programs":
            assert self.n_programs < <int64_t>PROGRAMS_MAX
            slot = self.n_programs
            self.PG[slot].id = key
            index_put(&self.programs_ix.ix, key, slot)
            self.n_programs += 1
            self.sort_programs()
        else:
            raise ValueError(f"rows of {table!r} are added by the kernel only")
        return slot

    def find(self, str table, uint64_t key):
        """The slot of id `key` in `table`, or -1."""
        if table not in TABLE_ROWS or table in UNINDEXED_TABLES:
            raise ValueError(f"unknown table {table!r}")
        return (<IdIndex>getattr(self, table + "_ix")).get(key)

    def append_list(self, values):
        """Append u64 values to the stock list pool; return where they start."""
        cdef int64_t n = len(values)
        cdef int64_t at = self.n_lists
        self.lists = self._grown(self.lists, at + n)
        self.lists[at:at + n] = values
        self.n_lists = at + n
        self._bind()
        return at

    def append_slots(self, triples):
        """Append (weekday, start, end) slots; return the index of the first."""
        cdef int64_t n = len(triples)
        cdef int64_t at = self.n_slots
        self.slots = self._grown(self.slots, 3 * (at + n))
        for i, (w, s, e) in enumerate(triples):
            self.slots[3 * (at + i)] = w
            self.slots[3 * (at + i) + 1] = s
            self.slots[3 * (at + i) + 2] = e
        self.n_slots = at + n
        self._bind()
        return at

    # -- snapshots --------------------------------------------------------

    SCALARS = ("n_users", "n_merchants", "n_stocks", "n_coupons", "n_payments",
               "n_codes", "n_lists", "n_slots", "n_refunds", "n_tombstones",
               "n_programs", "n_memberships", "n_earnings", "n_visits", "n_redemptions",
               "n_rewards",
               "auth_head", "n_auth", "fees", "bank", "tz_offset_ms", "hold_ms",
               "coupons_per_user_max")
    INDEXES = ("users", "merchants", "stocks", "coupons", "payments", "codes",
               "refunds", "tombstones", "programs", "visits", "redemptions")
    ROWS = ("users", "merchants", "stocks", "coupons", "codes", "pay_req", "pay_res",
            "pay_meta", "lists", "slots", "refunds", "tombstones", "auth_queue",
            "programs", "memberships", "earnings", "visits", "redemptions")

    def dump(self):
        """(arrays, scalars): the whole ledger as views of its used rows."""
        arrays = {
            "users": self.users[:self.n_users],
            "merchants": self.merchants[:self.n_merchants],
            "stocks": self.stocks[:self.n_stocks],
            "coupons": self.coupons[:self.n_coupons],
            "codes": self.codes[:self.n_codes],
            "pay_req": self.pay_req[:self.n_payments],
            "pay_res": self.pay_res[:self.n_payments],
            "pay_meta": self.pay_meta[:self.n_payments],
            "lists": self.lists[:self.n_lists],
            "slots": self.slots[:3 * self.n_slots],
            "refunds": self.refunds[:self.n_refunds],
            "tombstones": self.tombstones[:self.n_tombstones],
            "auth_queue": self.auth_queue[:self.n_auth],
            "programs": self.programs[:self.n_programs],
            "memberships": self.memberships[:self.n_memberships],
            "earnings": self.earnings[:self.n_earnings],
            "visits": self.visits[:self.n_visits],
            "redemptions": self.redemptions[:self.n_redemptions],
        }
        for name in self.INDEXES:
            arrays[name + "_ix"] = (<IdIndex>getattr(self, name + "_ix")).entries
        scalars = {name: int(getattr(self, name)) for name in self.SCALARS}
        return arrays, scalars

    @classmethod
    def load(cls, arrays, scalars):
        """A ledger from dump() output (arrays are taken over, not copied)."""
        cdef Ledger ledger = cls(scalars["tz_offset_ms"], scalars["hold_ms"])
        cdef IdIndex ix
        for name in cls.ROWS:
            current = getattr(ledger, name)
            loaded = np.ascontiguousarray(arrays[name])
            assert loaded.dtype == current.dtype, f"{name}: dtype {loaded.dtype}"
            setattr(ledger, name, loaded if len(loaded) else current)
        for name in cls.SCALARS:
            setattr(ledger, name, scalars[name])
        n_stocks = max(ledger.n_stocks, 64)
        ledger.stock_mark = np.zeros(n_stocks, np.int64)
        ledger.stock_cand = np.zeros(n_stocks, np.int32)
        for name in cls.INDEXES:
            ix = getattr(ledger, name + "_ix")
            entries = np.ascontiguousarray(arrays[name + "_ix"], np.int64)
            capacity = len(entries)
            assert capacity >= 16 and capacity & (capacity - 1) == 0
            ix.entries = entries
            ix.ix.entries = <Entry*>data_of(entries)
            ix.ix.mask = capacity - 1
            ix.ix.count = int((entries >> 32 >= 0).sum())
        ledger._bind()
        ledger.sort_programs()
        ledger._reserve_cands()
        return ledger

    def user_coupon_slots(self, int32_t user):
        """Slots of a user's coupons, newest first."""
        out = []
        cdef int32_t c = self.U[user].coupon_head
        while c >= 0:
            out.append(c)
            c = self.C[c].next
        return out

    def sort_programs(self):
        """Programs apply in program id order, whatever order they were made in."""
        ids = self.programs["id"][:self.n_programs]
        self.program_order[:self.n_programs] = np.argsort(ids, kind="stable").astype(np.int32)

    cdef _reserve_cands(self):
        cdef int64_t need = self.coupons_per_user_max
        if need > self.cands_capacity:
            self.cands = np.zeros(need * sizeof(Cand), np.uint8)
            self.cands_capacity = need
            self._bind()

    # -- rules ------------------------------------------------------------

    cdef inline Clock clock_at(self, int64_t now) noexcept nogil:
        cdef Clock t
        cdef int64_t local = now + self.tz_offset_ms
        cdef int64_t day = local / DAY_MS
        cdef int64_t ms_of_day = local - day * DAY_MS
        if ms_of_day < 0:                   # floor division for local < 0
            ms_of_day += DAY_MS
            day -= 1
        t.now = now
        t.day = day
        t.weekday = <int32_t>(((day + 3) % 7 + 7) % 7)  # 1970-01-01 was a Thursday
        t.minute = <int32_t>(ms_of_day / MINUTE_MS)
        return t

    cdef inline bint in_scope(self, const Stock* s, int32_t m) noexcept nogil:
        cdef const Merchant* mr = &self.M[m]
        cdef int32_t i
        if s.funder == FUNDER_MERCHANT:
            return s.merchant == m
        if s.merchants_count == 0 and s.tags_count == 0:
            return True
        if s.merchants_count > 0 and contains_u64(self.LP + s.list_at,
                                                  s.merchants_count, mr.id):
            return True
        for i in range(mr.tag_count):
            if contains_u64(self.LP + s.list_at + s.merchants_count,
                            s.tags_count, mr.tags[i]):
                return True
        return False

    cdef inline bint in_slots(self, const Stock* s, const Clock* t) noexcept nogil:
        cdef int32_t i
        cdef const int32_t* slot
        if s.slots_count == 0:
            return True
        for i in range(s.slots_count):
            slot = self.SP + 3 * (s.slot_at + i)
            if slot[0] == t.weekday and slot[1] <= t.minute < slot[2]:
                return True
        return False

    cdef int check_coupon(self, int32_t c, int32_t m, int64_t amount,
                          uint32_t goods_tag, const Clock* t, bint explicit,
                          int64_t* d_out) noexcept nogil:
        """rules.md steps 4 and 5: whether coupon slot `c` may apply; its d."""
        cdef const Coupon* cp = &self.C[c]
        cdef const Stock* s = &self.S[cp.stock]
        cdef int64_t d = discount_of(s, amount)
        d_out[0] = d
        if cp.state != COUPON_AVAILABLE:
            return ST_COUPON_NOT_AVAILABLE
        if t.now >= cp.expires_at:
            return ST_COUPON_EXPIRED
        # Cheap tests first: all of these give the same status.
        if t.now < s.valid_from or amount < s.min_spend or not self.in_scope(s, m):
            return ST_COUPON_NOT_APPLICABLE
        if s.goods_count > 0 and not contains_u64(
                self.LP + s.list_at + s.merchants_count + s.tags_count,
                s.goods_count, goods_tag):
            return ST_COUPON_NOT_APPLICABLE
        if not self.in_slots(s, t):
            return ST_COUPON_NOT_APPLICABLE
        # A user holding fewer coupons than the limit cannot have reached it:
        # the walk over their coupons is needed only near the limit.
        if (s.per_user_daily_limit > 0
                and self.U[cp.user].coupon_count >= s.per_user_daily_limit
                and self.redeemed_today(cp.user, cp.stock, t.day) >= s.per_user_daily_limit):
            return ST_COUPON_NOT_APPLICABLE
        if not explicit and d < 1:
            return ST_COUPON_NOT_APPLICABLE
        if s.budget > 0 and s.budget - s.spent - s.reserved < d:
            return ST_COUPON_BUDGET_EXHAUSTED
        if s.daily_budget > 0 and (s.day_spent if s.day == t.day else 0) + d > s.daily_budget:
            return ST_COUPON_BUDGET_EXHAUSTED
        return ST_OK

    cdef int64_t redeemed_today(self, int32_t user, int32_t stock,
                                int64_t day) noexcept nogil:
        """Coupons of `stock` the user redeemed in payments of `day` (used or
        locked: a released or refunded coupon no longer counts)."""
        cdef int64_t count = 0
        cdef int32_t c = self.U[user].coupon_head
        while c >= 0:
            if (self.C[c].stock == stock and self.C[c].state != COUPON_AVAILABLE
                    and self.PM[self.C[c].payment].day == day):
                count += 1
            c = self.C[c].next
        return count

    cdef inline void count_day(self, Stock* s, int64_t day, int64_t delta) noexcept nogil:
        """Attribute a change of a stock's net discount to the payment's day;
        changes to payments of days already past move only those days."""
        if day == s.day:
            s.day_spent += delta
        elif day > s.day:
            s.day = day
            s.day_spent = delta

    cdef void select_auto(self, int32_t user, int32_t m, int64_t amount,
                          uint32_t goods_tag, const Clock* t,
                          Selection* sel) noexcept nogil:
        """rules.md step 5, automatic mode: the exact best option."""
        cdef Cand* cands = self.cands_p
        cdef int32_t count = 0, c, j, i, k, best_ex = -1, top_count = 0, prev = -1, nxt
        cdef int32_t top[4]
        cdef int64_t d, stack_sum = 0, stack_total, ex_total, left, a
        cdef bint take_ex
        cdef Cand cand
        self.generation += 1
        # Candidates, keeping only the best-ranked coupon of each stock. The
        # walk is over the live list; used coupons met on the way leave it, so
        # a heavy payer's history is not walked again on every payment.
        c = self.U[user].live_head
        while c >= 0:
            nxt = self.C[c].next_live
            if self.C[c].state == COUPON_USED:
                if prev < 0:
                    self.U[user].live_head = nxt
                else:
                    self.C[prev].next_live = nxt
                self.C[c].live = 0
                c = nxt
                continue
            prev = c
            if self.check_coupon(c, m, amount, goods_tag, t, False, &d) == ST_OK:
                cand.d = d
                cand.expires_at = self.C[c].expires_at
                cand.id = self.C[c].id
                cand.slot = c
                cand.stock = self.C[c].stock
                if self.stock_mark_p[cand.stock] == self.generation:
                    j = self.stock_cand_p[cand.stock]
                    if ranks_before(&cand, &cands[j]):
                        cands[j] = cand
                else:
                    self.stock_mark_p[cand.stock] = self.generation
                    self.stock_cand_p[cand.stock] = count
                    cands[count] = cand
                    count += 1
            c = nxt
        # The best exclusive coupon, and the top four stackable ones in rank order.
        for j in range(count):
            if self.S[cands[j].stock].stacking == STACKING_EXCLUSIVE:
                if best_ex < 0 or ranks_before(&cands[j], &cands[best_ex]):
                    best_ex = j
                continue
            i = top_count if top_count < 4 else 4
            while i > 0 and ranks_before(&cands[j], &cands[top[i - 1]]):
                if i < 4:
                    top[i] = top[i - 1]
                i -= 1
            if i < 4:
                top[i] = j
                if top_count < 4:
                    top_count += 1
        # Stack option: the smallest k whose discounts reach the amount.
        k = 0
        for i in range(top_count):
            stack_sum += cands[top[i]].d
            k = i + 1
            if stack_sum >= amount:
                break
        stack_total = stack_sum if stack_sum < amount else amount
        ex_total = cands[best_ex].d if best_ex >= 0 else 0
        sel.count = 0
        sel.total = 0
        if best_ex < 0 and top_count == 0:
            return
        if best_ex < 0:
            take_ex = False
        elif top_count == 0:
            take_ex = True
        elif ex_total != stack_total:
            take_ex = ex_total > stack_total
        elif k != 1:
            take_ex = True                  # fewer coupons
        else:
            take_ex = ranks_before(&cands[best_ex], &cands[top[0]])
        if take_ex:
            sel.count = 1
            sel.slot[0] = cands[best_ex].slot
            sel.d[0] = cands[best_ex].d
        else:
            sel.count = k
            for i in range(k):
                sel.slot[i] = cands[top[i]].slot
                sel.d[i] = cands[top[i]].d
        left = amount
        for i in range(sel.count):
            a = sel.d[i] if sel.d[i] < left else left
            sel.applied[i] = a
            left -= a
        sel.total = amount - left

    cdef int select_explicit(self, const PayRecord* r, int32_t user, int32_t m,
                             const Clock* t, Selection* sel,
                             int32_t* reasons) noexcept nogil:
        """rules.md step 5, explicit mode. Returns the first failing status.

        With `reasons` (QUOTE) every named coupon is checked and its status
        written to reasons[i]; without, the first failure ends the check.
        """
        cdef int32_t held[4]
        cdef int32_t held_count = 0, i, j, c, status = ST_OK, st
        cdef int64_t d, left, a
        sel.count = 0
        for i in range(4):
            if r.coupons[i] == 0:
                continue
            c = index_get(&self.coupons_ix.ix, r.coupons[i])
            if c < 0:
                st = ST_COUPON_NOT_FOUND
            elif self.C[c].user != user:
                st = ST_COUPON_NOT_OWNED
            else:
                st = self.check_coupon(c, m, r.amount, r.goods_tag, t, True, &d)
                for j in range(held_count):
                    if st != ST_OK:
                        break
                    if (self.C[held[j]].stock == self.C[c].stock
                            or self.S[self.C[c].stock].stacking == STACKING_EXCLUSIVE
                            or self.S[self.C[held[j]].stock].stacking == STACKING_EXCLUSIVE):
                        st = ST_COUPONS_NOT_STACKABLE
                held[held_count] = c
                held_count += 1
                if st == ST_OK:
                    sel.slot[sel.count] = c
                    sel.d[sel.count] = d
                    sel.count += 1
            if reasons != NULL:
                reasons[i] = st
            if st != ST_OK and status == ST_OK:
                status = st
                if reasons == NULL:
                    return status
        left = r.amount
        for i in range(sel.count):
            a = sel.d[i] if sel.d[i] < left else left
            sel.applied[i] = a
            left -= a
        sel.total = r.amount - left
        return status

    cdef int precheck(self, const PayRecord* r, bint has_id) noexcept nogil:
        """rules.md step 1: checks that need no state."""
        if has_id and r.id == 0:
            return ST_INVALID_ID
        if r.amount < 1 or r.amount > AMOUNT_MAX:
            return ST_INVALID_AMOUNT
        if r.flags & ~(<uint32_t>PAY_FLAGS_KNOWN):
            return ST_INVALID_FLAGS
        if r.flags & PAY_NO_COUPONS and (r.coupons[0] | r.coupons[1]
                                         | r.coupons[2] | r.coupons[3]):
            return ST_INVALID_FLAGS
        return ST_OK

    cdef int resolve(self, const PayRecord* r, int64_t now, int32_t* m,
                     int32_t* user, int32_t* code, int32_t user_guess=-1,
                     int32_t merchant_guess=-1) noexcept nogil:
        """rules.md step 3: merchant, then payer (by user id or payment code). A
        guessed slot whose row holds the id sought is that id's slot (ids are
        unique), which spares a second hash probe."""
        if merchant_guess >= 0 and self.M[merchant_guess].id == r.merchant:
            m[0] = merchant_guess
        else:
            m[0] = index_get(&self.merchants_ix.ix, r.merchant)
        if m[0] < 0:
            return ST_MERCHANT_NOT_FOUND
        if not self.M[m[0]].active:
            return ST_MERCHANT_INACTIVE
        code[0] = -1
        if r.flags & PAY_PAYER_IS_CODE:
            code[0] = index_get(&self.codes_ix.ix, r.payer)
            if (code[0] < 0 or self.K[code[0]].used
                    or now >= self.K[code[0]].expires_at):
                return ST_PAYMENT_CODE_INVALID
            user[0] = self.K[code[0]].user
        elif user_guess >= 0 and self.U[user_guess].id == r.payer:
            user[0] = user_guess
        else:
            user[0] = index_get(&self.users_ix.ix, r.payer)
            if user[0] < 0:
                return ST_PAYER_NOT_FOUND
        return ST_OK

    cdef int select(self, const PayRecord* r, int32_t user, int32_t m,
                    const Clock* t, Selection* sel, int32_t* reasons) noexcept nogil:
        sel.count = 0
        sel.total = 0
        if r.flags & PAY_NO_COUPONS:
            return ST_OK
        if r.coupons[0] | r.coupons[1] | r.coupons[2] | r.coupons[3]:
            return self.select_explicit(r, user, m, t, sel, reasons)
        self.select_auto(user, m, r.amount, r.goods_tag, t, sel)
        return ST_OK

    cdef inline int64_t merchant_funded(self, const Selection* sel) noexcept nogil:
        cdef int64_t total = 0
        cdef int32_t i
        for i in range(sel.count):
            if self.S[self.C[sel.slot[i]].stock].funder == FUNDER_MERCHANT:
                total += sel.applied[i]
        return total

    cdef inline int64_t fee_of(self, int64_t amount, int64_t merchant_discount,
                               int32_t m) noexcept nogil:
        """rules.md step 7: fee = (base * fee_bps + 5000) // 10000, rounded half up."""
        return ((amount - merchant_discount) * self.M[m].fee_bps + 5000) / 10000

    cdef void pay_one(self, const PayRecord* r, PayResult* out,
                      const Clock* t, int32_t user_guess, int32_t merchant_guess) noexcept nogil:
        """rules.md steps 1-7 ("Paying") for one record; the guesses are the
        prefetch pipeline's (see resolve)."""
        cdef int32_t m, user, code, p, i, c
        cdef int st
        cdef int64_t cash, fee, merchant_discount, a
        cdef bint authorize = r.flags & PAY_AUTHORIZE
        cdef Selection sel
        cdef Stock* s
        cdef Payment* pm
        memset(out, 0, sizeof(PayResult))
        out.id = r.id
        out.timestamp = <uint64_t>t.now
        st = self.precheck(r, True)
        if st != ST_OK:
            out.status = st
            return
        # rules.md step 2: idempotency by payment id, byte-for-byte replay.
        p = index_get(&self.payments_ix.ix, r.id)
        if p >= 0:
            if memcmp(&self.PQ[p], r, sizeof(PayRecord)) == 0:
                out[0] = self.PR[p]
                out.flags |= RESULT_DUPLICATE
            else:
                out.status = ST_EXISTS_WITH_DIFFERENT_FIELDS
            return
        if index_get(&self.tombstones_ix.ix, r.id) >= 0:
            out.status = ST_REVERSED
            return
        st = self.resolve(r, t.now, &m, &user, &code, user_guess, merchant_guess)
        if st == ST_OK:
            st = self.select(r, user, m, t, &sel, NULL)
        if st != ST_OK:
            out.status = st
            return
        # rules.md step 6: cash from the wallet's available balance, or nothing changes.
        cash = r.amount - sel.total
        if self.U[user].balance - self.U[user].held < cash:
            out.status = ST_INSUFFICIENT_FUNDS
            return
        merchant_discount = self.merchant_funded(&sel)
        fee = self.fee_of(r.amount, merchant_discount, m)
        # rules.md step 7 (or, authorizing, the hold): all at once.
        p = <int32_t>self.n_payments
        self.n_payments += 1
        out.cash = cash
        out.discount = sel.total
        out.fee = fee
        if authorize:
            out.flags = RESULT_AUTHORIZED
        self.PQ[p] = r[0]
        pm = &self.PM[p]                    # a zeroed row: see _grown
        pm.user = user
        pm.merchant = m
        pm.coupon_count = <uint8_t>sel.count
        pm.amount = r.amount
        pm.cash = cash
        pm.discount = sel.total
        pm.fee = fee
        pm.created_at = t.now
        pm.day = t.day
        for i in range(4):
            pm.coupon[i] = -1
        for i in range(sel.count):
            c = sel.slot[i]
            a = sel.applied[i]
            out.coupons[i] = self.C[c].id
            pm.applied[i] = a
            pm.coupon[i] = c
            self.C[c].payment = p
            s = &self.S[self.C[c].stock]
            self.count_day(s, t.day, a)
            if authorize:
                self.C[c].state = COUPON_LOCKED
                s.reserved += a
            else:
                self.C[c].state = COUPON_USED
                s.spent += a
                if s.funder == FUNDER_PLATFORM:
                    s.campaign -= a
        self.PR[p] = out[0]
        index_put(&self.payments_ix.ix, r.id, p)
        if authorize:
            pm.state = PAYMENT_AUTHORIZED
            pm.authorized_amount = r.amount
            pm.hold_expires_at = t.now + self.hold_ms
            self.U[user].held += cash
            self.AQ[self.n_auth] = p
            self.n_auth += 1
        else:
            pm.state = PAYMENT_COMPLETED
            pm.completed_at = t.now
            self.U[user].balance -= cash
            self.post_completion(pm, m, r.amount, merchant_discount, sel.total - merchant_discount, fee)
            self.complete(p, t.now)
        if code >= 0:
            self.K[code].used = 1

    cdef inline void post_completion(self, Payment* pm, int32_t m, int64_t amount,
                                     int64_t merchant_discount, int64_t platform_discount,
                                     int64_t fee) noexcept nogil:
        """rules.md step 7 for the merchant and the fee account, and the period totals
        that settlement reports."""
        cdef Merchant* mr = &self.M[m]
        mr.balance += amount - merchant_discount - fee
        self.fees += fee
        mr.gross += amount
        mr.merchant_discount += merchant_discount
        mr.platform_discount += platform_discount
        mr.fees += fee
        mr.period_active = 1

    # -- two-phase payments -------------------------------------------------

    cdef inline void make_available(self, int32_t c) noexcept nogil:
        """A coupon back to available (released, or returned by a full
        refund): on its user's live list again if the walk had dropped it."""
        cdef int32_t u = self.C[c].user
        self.C[c].state = COUPON_AVAILABLE
        self.C[c].payment = -1
        if not self.C[c].live:
            self.C[c].next_live = self.U[u].live_head
            self.U[u].live_head = c
            self.C[c].live = 1

    cdef void release(self, int32_t p, uint8_t state, int64_t now) noexcept nogil:
        """Void an authorization: the hold, the coupons and their reservation."""
        cdef Payment* pm = &self.PM[p]
        cdef int32_t i, c
        self.U[pm.user].held -= pm.cash
        for i in range(pm.coupon_count):
            c = pm.coupon[i]
            self.S[self.C[c].stock].reserved -= pm.applied[i]
            self.count_day(&self.S[self.C[c].stock], pm.day, -pm.applied[i])
            self.make_available(c)
        pm.state = state
        pm.ended_at = now

    cdef void expire_due(self, int64_t now) noexcept nogil:
        """Void every authorization whose hold has expired. Holds expire in
        the order they were made (hold_ms is one engine setting), so a FIFO
        of authorizations finds them without a scan."""
        cdef int32_t p
        while self.auth_head < self.n_auth:
            p = self.AQ[self.auth_head]
            if self.PM[p].state == PAYMENT_AUTHORIZED:
                if self.PM[p].hold_expires_at > now:
                    return
                self.release(p, PAYMENT_EXPIRED, self.PM[p].hold_expires_at)
            self.auth_head += 1

    def expire(self, int64_t now):
        """Apply expiry of holds at engine time `now` (every command does)."""
        self.expire_due(now)

    def expiry_due(self, int64_t now):
        """Whether some hold has expired at `now` (read-only)."""
        cdef int64_t i = self.auth_head
        cdef int32_t p
        while i < self.n_auth:
            p = self.AQ[i]
            if self.PM[p].state == PAYMENT_AUTHORIZED:
                return self.PM[p].hold_expires_at <= now
            i += 1
        return False

    cdef void result_of(self, int32_t p, PayResult* out, bint released_only,
                        int64_t timestamp) noexcept nogil:
        """A PayResult from a payment's current parts (capture, void replays)."""
        cdef Payment* pm = &self.PM[p]
        cdef int32_t i, k = 0
        memset(out, 0, sizeof(PayResult))
        out.id = self.PQ[p].id
        out.cash = pm.cash
        out.discount = pm.discount
        out.timestamp = <uint64_t>timestamp
        for i in range(pm.coupon_count):
            if released_only or not (pm.released >> i) & 1:
                out.coupons[k] = self.C[pm.coupon[i]].id
                k += 1

    cdef int capture_one(self, uint64_t payment_id, int64_t amount, int64_t now,
                         PayResult* out) noexcept nogil:
        cdef int32_t p = index_get(&self.payments_ix.ix, payment_id)
        cdef Payment* pm
        cdef int32_t i, c, m
        cdef int64_t left, d, a, cash, fee, merchant_discount = 0, hold, total
        cdef int64_t applied[4]
        cdef Stock* s
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        pm = &self.PM[p]
        if pm.authorized_amount == 0 or pm.state == PAYMENT_VOIDED:
            return ST_PAYMENT_NOT_AUTHORIZED
        if pm.state == PAYMENT_EXPIRED:
            return ST_AUTHORIZATION_EXPIRED
        if pm.state != PAYMENT_AUTHORIZED:      # captured: replay the same capture
            if amount != pm.amount:
                return ST_PAYMENT_NOT_AUTHORIZED
            self.result_of(p, out, False, pm.completed_at)
            out.fee = pm.fee
            out.flags = RESULT_DUPLICATE
            return ST_OK
        if amount < 1 or amount > pm.authorized_amount:
            return ST_INVALID_AMOUNT
        # Coupons again on the final amount, in their applied order; time,
        # scope and controls are not re-checked.
        left = amount
        for i in range(pm.coupon_count):
            s = &self.S[self.C[pm.coupon[i]].stock]
            d = discount_of(s, amount) if amount >= s.min_spend else 0
            if d > pm.applied[i]:       # never spend more than was reserved
                d = pm.applied[i]
            a = d if d < left else left
            applied[i] = a
            left -= a
            if s.funder == FUNDER_MERCHANT:
                merchant_discount += a
        total = amount - left
        cash = amount - total
        m = pm.merchant
        fee = self.fee_of(amount, merchant_discount, m)
        hold = pm.cash
        if self.U[pm.user].balance - (self.U[pm.user].held - hold) < cash:
            return ST_INSUFFICIENT_FUNDS
        self.U[pm.user].held -= hold
        self.U[pm.user].balance -= cash
        for i in range(pm.coupon_count):
            c = pm.coupon[i]
            s = &self.S[self.C[c].stock]
            s.reserved -= pm.applied[i]
            self.count_day(s, pm.day, applied[i] - pm.applied[i])
            pm.applied[i] = applied[i]
            if applied[i] == 0:
                pm.released |= 1 << i
                self.make_available(c)
                continue
            self.C[c].state = COUPON_USED
            s.spent += applied[i]
            if s.funder == FUNDER_PLATFORM:
                s.campaign -= applied[i]
        pm.amount = amount
        pm.cash = cash
        pm.discount = total
        pm.fee = fee
        pm.completed_at = now
        pm.state = PAYMENT_COMPLETED
        self.post_completion(pm, m, amount, merchant_discount, total - merchant_discount, fee)
        self.complete(p, now)
        self.result_of(p, out, False, now)
        out.fee = fee
        return ST_OK

    cdef int void_one(self, uint64_t payment_id, int64_t now, PayResult* out) noexcept nogil:
        cdef int32_t p = index_get(&self.payments_ix.ix, payment_id)
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        if self.PM[p].state == PAYMENT_VOIDED:
            self.result_of(p, out, True, self.PM[p].ended_at)
            out.flags = RESULT_DUPLICATE
            return ST_OK
        if self.PM[p].state == PAYMENT_EXPIRED:
            return ST_AUTHORIZATION_EXPIRED
        if self.PM[p].state != PAYMENT_AUTHORIZED:
            return ST_PAYMENT_NOT_AUTHORIZED
        self.release(p, PAYMENT_VOIDED, now)
        self.result_of(p, out, True, now)
        return ST_OK

    # -- refunds and reversals --------------------------------------------

    cdef void refund_parts(self, int32_t p, int64_t amount, int64_t now, int64_t* cash_out,
                           int64_t* discount_out, int64_t* fee_out) noexcept nogil:
        """Refund `amount` more of payment p: each part grows to its
        cumulative floor share, so partial refunds add up to a full one."""
        cdef Payment* pm = &self.PM[p]
        cdef Merchant* mr = &self.M[pm.merchant]
        cdef int64_t r = pm.refunded_amount + amount, t = pm.amount
        cdef int64_t cash, fee, part, discount = 0
        cdef int32_t i, c
        cdef Stock* s
        cash = share_of(r, pm.cash, t) - pm.refunded_cash
        fee = share_of(r, pm.fee, t) - pm.refunded_fee
        mr.balance -= cash
        self.U[pm.user].balance += cash
        for i in range(pm.coupon_count):
            if (pm.released >> i) & 1:
                continue
            part = share_of(r, pm.applied[i], t) - pm.refunded_part[i]
            pm.refunded_part[i] += part
            discount += part
            s = &self.S[self.C[pm.coupon[i]].stock]
            s.spent -= part
            self.count_day(s, pm.day, -part)
            if s.funder == FUNDER_PLATFORM:
                s.campaign += part
                mr.balance -= part
                mr.refund_platform_discount += part
            else:
                mr.refund_merchant_discount += part
        self.fees -= fee
        mr.balance += fee
        mr.refund_cash += cash
        mr.refund_fee += fee
        mr.period_active = 1
        pm.refunded_amount = r
        pm.refunded_cash += cash
        pm.refunded_fee += fee
        self.claw_back(p, r, now)
        if r == t:
            pm.state = PAYMENT_REFUNDED
            for i in range(pm.coupon_count):
                if not (pm.released >> i) & 1:
                    c = pm.coupon[i]
                    self.make_available(c)
                    self.S[self.C[c].stock].stat_redeemed -= 1
        else:
            pm.state = PAYMENT_PARTIALLY_REFUNDED
        cash_out[0] = cash
        discount_out[0] = discount
        fee_out[0] = fee

    cdef int refund_one(self, uint64_t refund_id, uint64_t payment_id, int64_t amount,
                        int64_t now, Refund* out) noexcept nogil:
        cdef int32_t f, p
        memset(out, 0, sizeof(Refund))
        out.id = refund_id
        out.payment = payment_id
        out.amount = amount
        if refund_id == 0:
            return ST_INVALID_ID
        if amount < 1 or amount > AMOUNT_MAX:
            return ST_INVALID_AMOUNT
        f = index_get(&self.refunds_ix.ix, refund_id)
        if f >= 0:
            if self.RF[f].payment != payment_id or self.RF[f].amount != amount:
                return ST_EXISTS_WITH_DIFFERENT_FIELDS
            out[0] = self.RF[f]
            return -1                           # a replay
        p = index_get(&self.payments_ix.ix, payment_id)
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        if self.PM[p].state != PAYMENT_COMPLETED and self.PM[p].state != PAYMENT_PARTIALLY_REFUNDED:
            return ST_PAYMENT_NOT_REFUNDABLE
        if amount > self.PM[p].amount - self.PM[p].refunded_amount:
            return ST_REFUND_EXCEEDS_PAYMENT
        self.refund_parts(p, amount, now, &out.cash, &out.discount, &out.fee)
        f = <int32_t>self.n_refunds
        self.n_refunds += 1
        self.RF[f] = out[0]
        index_put(&self.refunds_ix.ix, refund_id, f)
        return ST_OK

    cdef int reverse_one(self, uint64_t payment_id, int64_t now, PayResult* out) noexcept nogil:
        cdef int32_t p, t
        cdef Payment* pm
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if payment_id == 0:
            return ST_INVALID_ID
        p = index_get(&self.payments_ix.ix, payment_id)
        if p < 0:
            if index_get(&self.tombstones_ix.ix, payment_id) < 0:
                t = <int32_t>self.n_tombstones
                self.n_tombstones += 1
                self.TS[t].id = payment_id
                index_put(&self.tombstones_ix.ix, payment_id, t)
            return ST_OK
        pm = &self.PM[p]
        if pm.state == PAYMENT_AUTHORIZED:
            self.release(p, PAYMENT_VOIDED, now)
            pm.reversed = 1
            self.result_of(p, out, True, now)
        elif pm.state == PAYMENT_COMPLETED or pm.state == PAYMENT_PARTIALLY_REFUNDED:
            self.result_of(p, out, False, now)
            self.refund_parts(p, pm.amount - pm.refunded_amount, now, &out.cash,
                              &out.discount, &out.fee)
            pm.reversed = 1
        return ST_OK

    def pay(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """Apply a batch of PayRecords (raw bytes) at engine time `now`."""
        cdef int64_t n = records.shape[0] // sizeof(PayRecord)
        assert 1 <= n <= BATCH_RECORDS_MAX
        assert records.shape[0] == n * sizeof(PayRecord)
        assert out.shape[0] == n * sizeof(PayResult)
        self.reserve("payments", n)
        self.reserve_completions(n)
        self._reserve_cands()
        cdef const PayRecord* rec = <const PayRecord*>&records[0]
        cdef PayResult* res = <PayResult*>&out[0]
        cdef Clock t = self.clock_at(now)
        cdef int64_t i
        with nogil:
            for i in range(-AHEAD_RECORDS, 0):      # fill the pipeline
                self.prefetch(rec, n, i)
            for i in range(n):
                self.prefetch(rec, n, i)
                self.pay_one(&rec[i], &res[i], &t, self.ahead_user[i & (AHEAD_RECORDS - 1)],
                             self.ahead_merchant[i & (AHEAD_RECORDS - 1)])

    cdef inline void prefetch(self, const PayRecord* rec, int64_t n,
                              int64_t i) noexcept nogil:
        """Overlap the cache misses of later records with this one's work.

        A payment's misses form a chain (index bucket -> wallet row -> coupon
        rows); loading each link a few records ahead keeps many misses in
        flight instead of one. Purely a hint: no state is read for effect.
        Each stage reads only lines an earlier stage prefetched a few records
        ago, so no stage waits on a miss of its own.
        """
        cdef int64_t j
        cdef int32_t user, m
        cdef size_t line
        cdef const PayRecord* r
        if i + 2 * AHEAD_RECORDS < n:            # the records themselves
            __builtin_prefetch(&rec[i + 2 * AHEAD_RECORDS])
        # The rows this batch appends (reserved before the loop): a stream
        # of first writes, fetched a few payments ahead.
        if i + AHEAD_RECORDS < n:
            for line in range(0, sizeof(Payment), 64):
                prefetch_for_write(<const char*>&self.PM[self.n_payments + AHEAD_RECORDS] + line)
            if self.n_programs:
                prefetch_for_write(&self.EA[self.n_earnings + AHEAD_RECORDS * self.n_programs])
        j = i + AHEAD_RECORDS - 1
        if 0 <= j < n:
            r = &rec[j]
            index_prefetch(&self.payments_ix.ix, r.id)
            if not (r.flags & PAY_PAYER_IS_CODE):
                index_prefetch(&self.users_ix.ix, r.payer)
        j = i + 10
        if 0 <= j < n:
            r = &rec[j]
            user = -1 if r.flags & PAY_PAYER_IS_CODE else index_guess(&self.users_ix.ix, r.payer)
            self.ahead_user[j & (AHEAD_RECORDS - 1)] = user
            self.ahead_merchant[j & (AHEAD_RECORDS - 1)] = index_guess(
                &self.merchants_ix.ix, r.merchant)
            if user >= 0:
                prefetch_row(&self.U[user], sizeof(User))
            m = self.ahead_merchant[j & (AHEAD_RECORDS - 1)]
            if m >= 0:          # a payment touches most of its merchant's row
                for line in range(0, sizeof(Merchant), 64):
                    __builtin_prefetch(<const char*>&self.M[m] + line)
        j = i + 6
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 0)
                self.prefetch_completion(user, self.ahead_merchant[j & (AHEAD_RECORDS - 1)], False)
        j = i + 3
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 1)
                self.prefetch_completion(user, self.ahead_merchant[j & (AHEAD_RECORDS - 1)], True)
        j = i + 1
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 2)

    cdef inline void prefetch_coupon(self, int32_t user, int32_t skip) noexcept nogil:
        """Prefetch the user's coupon `skip` links down the list; the links
        before it were prefetched by earlier stages."""
        cdef int32_t c = self.U[user].live_head
        while c >= 0 and skip > 0:
            c = self.C[c].next_live
            skip -= 1
        if c >= 0:
            prefetch_row(&self.C[c], sizeof(Coupon))

    cdef inline void prefetch_completion(self, int32_t user, int32_t m,
                                         bint rows) noexcept nogil:
        """The visit and membership lines a completion will touch: their
        index buckets first, their rows (by the bucket's guess) later."""
        cdef int32_t g, k
        cdef uint64_t key
        if m < 0:
            return
        key = <uint64_t>user * MERCHANTS_MAX + <uint64_t>m + 1
        if rows:
            k = index_guess(&self.visits_ix.ix, key)
            if k >= 0:
                prefetch_row(&self.VS[k], sizeof(Visit))
        else:
            index_prefetch(&self.visits_ix.ix, key)
        # The user's memberships, one link per stage (most users have one
        # or two): the wallet row, loaded by now, holds the first.
        k = self.U[user].membership_head
        if rows and k >= 0:
            k = self.MS[k].next
        if k >= 0:
            prefetch_row(&self.MS[k], sizeof(Membership))

    # -- batch entry points of the money lifecycle -------------------------

    def capture(self, const uint64_t[::1] payments, const int64_t[::1] amounts,
                int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        assert amounts.shape[0] == n and out.shape[0] == n * sizeof(PayResult)
        self.reserve_completions(n)
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                res[i].status = self.capture_one(payments[i], amounts[i], now, &res[i])

    def void(self, const uint64_t[::1] payments, int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        assert out.shape[0] == n * sizeof(PayResult)
        with nogil:
            for i in range(n):
                res[i].status = self.void_one(payments[i], now, &res[i])

    def reverse(self, const uint64_t[::1] payments, int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        assert out.shape[0] == n * sizeof(PayResult)
        self.reserve("tombstones", n)
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                res[i].status = self.reverse_one(payments[i], now, &res[i])

    def refund(self, const uint64_t[::1] ids, const uint64_t[::1] payments,
               const int64_t[::1] amounts, int64_t now, uint8_t[::1] out,
               int32_t[::1] status):
        """Refunds; status[i] is a status code, or -1 for a replay."""
        cdef int64_t n = ids.shape[0], i
        assert payments.shape[0] == n and amounts.shape[0] == n and status.shape[0] == n
        assert out.shape[0] == n * sizeof(Refund)
        self.reserve("refunds", n)
        cdef Refund* res = <Refund*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                status[i] = self.refund_one(ids[i], payments[i], amounts[i], now, &res[i])

    def capture_records(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """CAPTURE_RECORDS: a batch of CaptureRecords -> PayResults."""
        cdef int64_t n = records.shape[0] // sizeof(CaptureRecord), i
        assert 1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(PayResult)
        self.reserve_completions(n)
        cdef const CaptureRecord* rec = <const CaptureRecord*>&records[0]
        cdef PayResult* res = <PayResult*>&out[0]
        with nogil:
            for i in range(n):
                res[i].status = self.capture_one(rec[i].payment, rec[i].amount, now, &res[i])

    def refund_records(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """REFUND_RECORDS: a batch of RefundRecords -> RefundResults."""
        cdef int64_t n = records.shape[0] // sizeof(RefundRecord), i
        assert 1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(RefundResult)
        self.reserve("refunds", n)
        cdef const RefundRecord* rec = <const RefundRecord*>&records[0]
        cdef RefundResult* res = <RefundResult*>&out[0]
        cdef Refund row
        cdef int st
        with nogil:
            for i in range(n):
                memset(&res[i], 0, sizeof(RefundResult))
                res[i].id = rec[i].id
                if rec[i].id != 0 and 1 <= rec[i].amount <= AMOUNT_MAX and rec[i].reserved != 0:
                    res[i].status = ST_INVALID_FLAGS
                    continue
                st = self.refund_one(rec[i].id, rec[i].payment, rec[i].amount, now, &row)
                if st > 0:
                    res[i].status = st
                    continue
                res[i].flags = RESULT_DUPLICATE if st < 0 else 0
                res[i].cash = row.cash
                res[i].discount = row.discount
                res[i].fee = row.fee

    def settle(self):
        """Close the period: one row per merchant with activity, by merchant
        id; pays out positive balances to the bank."""
        cdef Merchant* mr
        cdef int64_t refunds, net, payout
        rows = []
        active = [m for m in range(self.n_merchants) if self.M[m].period_active]
        active.sort(key=lambda m: self.M[m].id)
        for m in active:
            mr = &self.M[<int32_t>m]
            refunds = mr.refund_cash + mr.refund_platform_discount - mr.refund_fee
            net = mr.gross - mr.merchant_discount - mr.fees - refunds
            assert net == mr.balance - mr.settled_balance, "settlement does not reconcile"
            payout = mr.balance if mr.balance > 0 else 0
            rows.append({"merchant": mr.id, "gross": mr.gross,
                         "merchant_discount": mr.merchant_discount,
                         "platform_discount": mr.platform_discount, "fees": mr.fees,
                         "refund_cash": mr.refund_cash,
                         "refund_platform_discount": mr.refund_platform_discount,
                         "refund_merchant_discount": mr.refund_merchant_discount,
                         "refund_fee": mr.refund_fee, "refunds": refunds, "net": net,
                         "payout": payout})
            mr.balance -= payout
            self.bank += payout
            mr.settled_balance = mr.balance
            mr.gross = mr.merchant_discount = mr.platform_discount = mr.fees = 0
            mr.refund_cash = mr.refund_platform_discount = 0
            mr.refund_merchant_discount = mr.refund_fee = 0
            mr.period_active = 0
        return rows

    cdef int issue_check(self, int32_t s, int32_t u, int64_t now) noexcept nogil:
        """The checks of ISSUE after the stock is known, in rules.md order."""
        cdef Stock* st = &self.S[s]
        cdef int32_t c
        cdef int64_t owned = 0
        if now >= st.valid_until:
            return ST_STOCK_ENDED
        if st.max_issued > 0 and st.issued >= st.max_issued:
            return ST_STOCK_EXHAUSTED
        if u < 0:
            return ST_USER_NOT_FOUND
        if st.per_user_limit > 0:
            # Coupons are never deleted, so the user's list counts every issue.
            c = self.U[u].coupon_head
            while c >= 0:
                owned += self.C[c].stock == s
                c = self.C[c].next
            if owned >= st.per_user_limit:
                return ST_PER_USER_LIMIT
        return ST_OK

    cdef int32_t issue_create(self, uint64_t coupon_id, int32_t s, int32_t u,
                              int64_t now) noexcept nogil:
        """A new available coupon (capacity reserved by the caller)."""
        cdef Stock* st = &self.S[s]
        cdef int32_t c = <int32_t>self.n_coupons
        self.n_coupons += 1
        self.C[c].id = coupon_id
        self.C[c].stock = s
        self.C[c].user = u
        self.C[c].state = COUPON_AVAILABLE
        self.C[c].payment = -1
        self.C[c].expires_at = st.valid_until
        if st.validity_ms > 0 and st.validity_ms < st.valid_until - now:
            self.C[c].expires_at = now + st.validity_ms
        self.C[c].next = self.U[u].coupon_head
        self.U[u].coupon_head = c
        self.C[c].next_live = self.U[u].live_head
        self.U[u].live_head = c
        self.C[c].live = 1
        self.U[u].coupon_count += 1
        if self.U[u].coupon_count > self.coupons_per_user_max:
            self.coupons_per_user_max = self.U[u].coupon_count
        index_put(&self.coupons_ix.ix, coupon_id, c)
        st.issued += 1
        return c

    cdef void issue_one(self, const IssueRecord* r, IssueResult* out,
                        int64_t now) noexcept nogil:
        cdef int32_t c, s, u
        memset(out, 0, sizeof(IssueResult))
        out.coupon = r.coupon
        if r.coupon == 0:
            out.status = ST_INVALID_ID
            return
        if r.reserved != 0:
            out.status = ST_INVALID_FLAGS
            return
        c = index_get(&self.coupons_ix.ix, r.coupon)
        if c >= 0:
            if (self.S[self.C[c].stock].id == r.stock
                    and self.U[self.C[c].user].id == r.user):
                out.flags = RESULT_DUPLICATE
                out.expires_at = <uint64_t>self.C[c].expires_at
            else:
                out.status = ST_EXISTS_WITH_DIFFERENT_FIELDS
            return
        s = index_get(&self.stocks_ix.ix, r.stock)
        if s < 0:
            out.status = ST_STOCK_NOT_FOUND
            return
        u = index_get(&self.users_ix.ix, r.user)
        out.status = self.issue_check(s, u, now)
        if out.status != ST_OK:
            return
        c = self.issue_create(r.coupon, s, u, now)
        out.expires_at = <uint64_t>self.C[c].expires_at

    # -- membership: points, stamps, stats ----------------------------------

    cdef inline bint covers(self, const Program* pg, int32_t m) noexcept nogil:
        cdef const Merchant* mr = &self.M[m]
        cdef int32_t i
        if pg.merchants_count == 0 and pg.tags_count == 0:
            return True
        if pg.merchants_count > 0 and contains_u64(self.LP + pg.list_at,
                                                   pg.merchants_count, mr.id):
            return True
        for i in range(mr.tag_count):
            if contains_u64(self.LP + pg.list_at + pg.merchants_count,
                            pg.tags_count, mr.tags[i]):
                return True
        return False

    cdef int32_t membership(self, int32_t u, int32_t g, bint create) noexcept nogil:
        """The (user, program) row, made on first use when `create`. Found
        on the user's own list (a user is in a few programs), which the PAY
        pipeline prefetches: no hash index, whose insert on a user's first
        payment in a program was a random miss."""
        cdef uint64_t key = <uint64_t>u * PROGRAMS_MAX + <uint64_t>g + 1
        cdef int32_t k = self.U[u].membership_head
        while k >= 0 and self.MS[k].program != g:
            k = self.MS[k].next
        if k >= 0 or not create:
            return k
        k = <int32_t>self.n_memberships
        self.n_memberships += 1
        self.MS[k].key = key
        self.MS[k].points = 0
        self.MS[k].stamps = 0
        self.MS[k].user = u
        self.MS[k].program = g
        self.MS[k].reward = -1
        self.MS[k].next = self.U[u].membership_head
        self.U[u].membership_head = k
        return k

    def find_membership(self, int32_t user, int32_t program):
        """The (user slot, program slot) membership row, or -1."""
        assert 0 <= user < self.n_users and 0 <= program < self.n_programs
        return self.membership(user, program, False)

    cdef int32_t reward(self, const Program* pg, int32_t u, int64_t now) noexcept nogil:
        """Issue a stamp card's reward coupon, or -1 when the stock can't."""
        cdef uint64_t k
        if self.issue_check(pg.reward_stock, u, now) != ST_OK:
            return -1
        k = <uint64_t>self.n_rewards + 1
        while index_get(&self.coupons_ix.ix, REWARD_ID_BASE + k) >= 0:
            k += 1
        self.n_rewards = <int64_t>k
        index_prefetch(&self.coupons_ix.ix, REWARD_ID_BASE + k + 1)     # the next reward's
        return self.issue_create(REWARD_ID_BASE + k, pg.reward_stock, u, now)

    cdef void complete(self, int32_t p, int64_t now) noexcept nogil:
        """A payment completed (PAY, or CAPTURE): stats, points, stamps."""
        cdef Payment* pm = &self.PM[p]
        cdef Merchant* mr = &self.M[pm.merchant]
        cdef uint64_t key = <uint64_t>pm.user * MERCHANTS_MAX + <uint64_t>pm.merchant + 1
        cdef int32_t v = index_get(&self.visits_ix.ix, key), i, g, e, k, j
        cdef int64_t prior, points
        cdef bint with_coupon = False
        cdef Stock* s
        cdef Program* pg
        if v < 0:
            v = <int32_t>self.n_visits
            self.n_visits += 1
            self.VS[v].key = key
            self.VS[v].payments = 0
            self.VS[v].user = pm.user
            self.VS[v].merchant = pm.merchant
            index_put(&self.visits_ix.ix, key, v)
        prior = self.VS[v].payments
        self.VS[v].payments += 1
        mr.stat_payments += 1
        mr.stat_gmv += pm.amount
        if prior == 0:
            mr.stat_unique_payers += 1
        elif prior == 1:
            mr.stat_repeat_payers += 1
        for i in range(pm.coupon_count):
            if (pm.released >> i) & 1:
                continue
            with_coupon = True
            s = &self.S[self.C[pm.coupon[i]].stock]
            s.stat_redeemed += 1
            s.stat_gmv += pm.amount
            if prior == 0:
                s.stat_payers_new += 1
            else:
                s.stat_payers_returning += 1
        if with_coupon:
            mr.stat_coupon_payments += 1
        pm.earn_at = <int32_t>self.n_earnings
        pm.earn_count = 0
        for j in range(self.n_programs):
            g = self.PO[j]                  # in program id order
            pg = &self.PG[g]
            if not self.covers(pg, pm.merchant):
                continue
            e = <int32_t>self.n_earnings
            self.n_earnings += 1
            pm.earn_count += 1
            self.EA[e].points = 0
            self.EA[e].clawed = 0
            self.EA[e].payment = p
            self.EA[e].program = g
            self.EA[e].stamped = 0
            if pg.kind == 0:
                points = pm.cash * pg.rate // 100      # <= 10**18
                self.EA[e].points = points
                if points > 0:
                    self.MS[self.membership(pm.user, g, True)].points += points
                    mr.stat_points_issued += points
            elif pm.amount >= pg.threshold:
                self.EA[e].stamped = 1
                k = self.membership(pm.user, g, True)
                self.MS[k].stamps += 1
                if self.MS[k].stamps >= pg.stamps:
                    i = self.reward(pg, pm.user, now)
                    if i >= 0:
                        self.MS[k].stamps = 0
                        self.MS[k].reward = i
                    else:                   # the card stays full until it can
                        self.MS[k].stamps = pg.stamps

    cdef void claw_back(self, int32_t p, int64_t refunded, int64_t now) noexcept nogil:
        """A refund takes back its share of points; a full one, the stamp."""
        cdef Payment* pm = &self.PM[p]
        cdef Earning* ea
        cdef Program* pg
        cdef int32_t e, k, r
        cdef int64_t target
        for e in range(pm.earn_at, pm.earn_at + pm.earn_count):
            ea = &self.EA[e]
            pg = &self.PG[ea.program]
            if pg.kind == 0:
                if ea.points > 0:
                    target = share_of(refunded, ea.points, pm.amount)
                    k = self.membership(pm.user, ea.program, False)
                    self.MS[k].points -= target - ea.clawed
                    ea.clawed = target
            elif ea.stamped and refunded == pm.amount:
                k = self.membership(pm.user, ea.program, False)
                r = self.MS[k].reward
                if self.MS[k].stamps > 0:
                    self.MS[k].stamps -= 1
                elif self.MS[k].stamps == 0 and r >= 0 and self.C[r].state == COUPON_AVAILABLE:
                    if self.C[r].expires_at > now:
                        self.C[r].expires_at = now
                    self.MS[k].stamps = pg.stamps - 1
                    self.MS[k].reward = -1
                else:
                    self.MS[k].stamps -= 1
                    self.MS[k].reward = -1

    def redeem(self, uint64_t coupon_id, uint64_t user_id, uint64_t program_id,
               uint64_t stock_id, int64_t price, int64_t now):
        """REDEEM_POINTS for one item: (status, duplicate, expires_at, points).
        `price` is the program's offer for the stock, -1 when not offered."""
        cdef int32_t r, c, g, s, u, k
        cdef int st
        if coupon_id == 0:
            return ST_INVALID_ID, False, 0, 0
        r = index_get(&self.redemptions_ix.ix, coupon_id)
        c = index_get(&self.coupons_ix.ix, coupon_id)
        if r >= 0:
            same = (self.U[self.RD[r].user].id == user_id
                    and self.PG[self.RD[r].program].id == program_id
                    and self.S[self.C[c].stock].id == stock_id)
            if not same:
                return ST_EXISTS_WITH_DIFFERENT_FIELDS, False, 0, 0
            k = self.membership(self.RD[r].user, self.RD[r].program, False)
            return ST_OK, True, self.C[c].expires_at, self.MS[k].points
        if c >= 0:
            return ST_EXISTS_WITH_DIFFERENT_FIELDS, False, 0, 0
        g = index_get(&self.programs_ix.ix, program_id) if program_id else -1
        if g < 0 or self.PG[g].kind != 0:
            return ST_PROGRAM_NOT_FOUND, False, 0, 0
        if price < 0:
            return ST_OFFER_NOT_FOUND, False, 0, 0
        s = index_get(&self.stocks_ix.ix, stock_id)
        assert s >= 0, "an offer names a known stock"
        u = index_get(&self.users_ix.ix, user_id) if user_id else -1
        st = self.issue_check(s, u, now)
        if st != ST_OK:
            return st, False, 0, 0
        k = self.membership(u, g, False)
        if k < 0 or self.MS[k].points < price:
            return ST_INSUFFICIENT_POINTS, False, 0, 0
        self.reserve("coupons", 1)
        self.reserve("redemptions", 1)
        self.MS[k].points -= price
        c = self.issue_create(coupon_id, s, u, now)
        r = <int32_t>self.n_redemptions
        self.n_redemptions += 1
        self.RD[r].coupon = coupon_id
        self.RD[r].price = price
        self.RD[r].user = u
        self.RD[r].program = g
        index_put(&self.redemptions_ix.ix, coupon_id, r)
        return ST_OK, False, self.C[c].expires_at, self.MS[k].points

    def reserve_payments(self, int64_t n):
        """Room for n more payments and all that completing them may add."""
        self.reserve("payments", n)
        self.reserve_completions(n)

    cdef void reserve_completions(self, int64_t n):
        """Room for what n completing payments may add: visits, earnings,
        memberships, reward coupons."""
        self.reserve("visits", n)
        if self.n_programs:
            self.reserve("earnings", n * self.n_programs)
            self.reserve("memberships", n * self.n_programs)
            self.reserve("coupons", n * self.n_programs)

    def issue(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """Apply a batch of IssueRecords (raw bytes) at engine time `now`."""
        cdef int64_t n = records.shape[0] // sizeof(IssueRecord)
        assert 1 <= n <= BATCH_RECORDS_MAX
        assert records.shape[0] == n * sizeof(IssueRecord)
        assert out.shape[0] == n * sizeof(IssueResult)
        self.reserve("coupons", n)
        cdef const IssueRecord* rec = <const IssueRecord*>&records[0]
        cdef IssueResult* res = <IssueResult*>&out[0]
        cdef int64_t i
        with nogil:
            for i in range(n):
                self.issue_one(&rec[i], &res[i], now)

    def quote(self, const uint8_t[::1] record, int64_t now):
        """PAY's computation for one PayRecord, with no effect.

        Returns (status, cash, discount, fee, coupon ids, explain) where
        explain is [(coupon id, stock id, discount, reason)] by coupon id and
        reason is a status code, REASON_APPLIED or REASON_NOT_CHOSEN.
        """
        assert record.shape[0] == sizeof(PayRecord)
        self._reserve_cands()
        cdef const PayRecord* r = <const PayRecord*>&record[0]
        cdef Clock t = self.clock_at(now)
        cdef Selection sel
        cdef int32_t reasons[4]
        cdef int32_t m, user, code, c, i
        cdef int64_t d, cash = 0, fee = 0
        cdef int st = self.precheck(r, False)
        if st == ST_OK:
            st = self.resolve(r, now, &m, &user, &code)
        if st != ST_OK:
            return st, 0, 0, 0, [], []
        for i in range(4):
            reasons[i] = ST_OK
        st = self.select(r, user, m, &t, &sel, reasons)
        if st == ST_OK:
            cash = r.amount - sel.total
            fee = self.fee_of(r.amount, self.merchant_funded(&sel), m)
            if self.U[user].balance - self.U[user].held < cash:
                st = ST_INSUFFICIENT_FUNDS
        applied = {}
        if st in (ST_OK, ST_INSUFFICIENT_FUNDS):
            for i in range(sel.count):
                applied[sel.slot[i]] = sel.applied[i]
        explicit = not (r.flags & PAY_NO_COUPONS) and bool(
            r.coupons[0] | r.coupons[1] | r.coupons[2] | r.coupons[3])
        named = {}
        if explicit:
            for i in range(4):
                c = index_get(&self.coupons_ix.ix, r.coupons[i]) if r.coupons[i] else -1
                if c >= 0 and self.C[c].user == user:
                    if named.get(c, ST_OK) == ST_OK:
                        named[c] = reasons[i]
        explain = []
        for c in self.user_coupon_slots(user):
            d = discount_of(&self.S[self.C[c].stock], r.amount)
            if c in applied:
                reason, d = REASON_APPLIED, applied[c]
            elif r.flags & PAY_NO_COUPONS:
                reason = REASON_NOT_CHOSEN
            elif explicit:
                reason = named.get(c, REASON_NOT_CHOSEN) or REASON_NOT_CHOSEN
            else:
                reason = self.check_coupon(c, m, r.amount, r.goods_tag, &t, False, &d)
                reason = reason or REASON_NOT_CHOSEN
            explain.append((self.C[c].id, self.S[self.C[c].stock].id, d, reason))
        explain.sort()
        if st not in (ST_OK, ST_INSUFFICIENT_FUNDS):
            return st, 0, 0, 0, [], explain
        coupons = [self.C[sel.slot[i]].id for i in range(sel.count)]
        return st, cash, sel.total, fee, coupons, explain
