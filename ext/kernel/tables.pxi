# Ledger part 1: the tables. Every table's rows, their growth, snapshots
# (dump/load) and the capacity that a batch reserves before it runs.

def read_only(arr):
    """A view of `arr` that numpy refuses to write through: what Python sees
    of the kernel's tables."""
    view = arr.view()
    view.flags.writeable = False
    return view


def owned(arr):
    """`arr` contiguous and writable, copied if it is a read-only view (for
    example another ledger's dump()), so that no two ledgers share rows."""
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()

class LayoutError(ValueError):
    """Tables given to Ledger.load that this kernel cannot take: another
    version's row layout, or counts and indexes that do not fit their rows.
    Raised in every build: the kernel would read past its rows."""


# The count (a dump() scalar) of each row table, and the array entries per row.
ROW_COUNTS = {
    "users": ("n_users", 1), "merchants": ("n_merchants", 1), "stocks": ("n_stocks", 1),
    "coupons": ("n_coupons", 1), "codes": ("n_codes", 1), "pay_req": ("n_payments", 1),
    "pay_res": ("n_payments", 1), "pay_meta": ("n_payments", 1), "lists": ("n_lists", 1),
    "slots": ("n_slots", 3), "refunds": ("n_refunds", 1), "tombstones": ("n_tombstones", 1),
    "auth_queue": ("n_auth", 1), "programs": ("n_programs", 1),
    "memberships": ("n_memberships", 1), "earnings": ("n_earnings", 1),
    "visits": ("n_visits", 1), "redemptions": ("n_redemptions", 1),
}


def check_loadable(dict current, dict arrays, dict scalars):
    """Raise LayoutError unless dump() output `arrays`, `scalars` fits the
    tables `current` of this kernel: each row table of the same row layout
    and holding the rows its count names, each index a power of two >= 16."""
    for name, (count, per_row) in ROW_COUNTS.items():
        loaded, own = arrays[name], current[name]
        if loaded.dtype != own.dtype:
            raise LayoutError(
                f"{name}: rows of another layout ({len(loaded.dtype.names or ())} fields,"
                f" {loaded.dtype.itemsize} bytes; this version's: "
                f"{len(own.dtype.names or ())} fields, {own.dtype.itemsize} bytes)")
        if not 0 <= scalars[count] * per_row <= len(loaded):
            raise LayoutError(f"{name}: {count} is {scalars[count]}, for {len(loaded)} rows")
    if not 0 <= scalars["auth_head"] <= scalars["n_auth"]:
        raise LayoutError(f"auth_head is {scalars['auth_head']}, past n_auth {scalars['n_auth']}")
    if scalars["n_programs"] > PROGRAMS_MAX:
        raise LayoutError(f"n_programs is {scalars['n_programs']}, over {PROGRAMS_MAX}")
    for name in _Tables.INDEXES:
        capacity = len(arrays[name + "_ix"])
        if capacity < 16 or capacity & (capacity - 1):
            raise LayoutError(f"{name} index: {capacity} entries, not a power of two >= 16")


# Row arrays Python may read (through read_only views).
READABLE = frozenset(("users", "merchants", "stocks", "coupons", "codes", "pay_req",
                      "pay_res", "pay_meta", "lists", "slots", "refunds", "tombstones",
                      "auth_queue", "programs", "memberships", "earnings", "visits",
                      "redemptions", "program_order"))


cdef class _Tables:
    """The tables of a ledger: rows, indexes, growth and snapshots."""
    # The row arrays by name (TABLE_ROWS, ROWS, and the selection scratch):
    # private, so that every write goes through a kernel function; Python
    # reads them as read-only views (__getattr__ below).
    cdef dict t
    cdef readonly IdIndex users_ix, merchants_ix, stocks_ix, coupons_ix
    cdef readonly IdIndex payments_ix, codes_ix, refunds_ix, tombstones_ix
    cdef readonly IdIndex programs_ix, visits_ix, redemptions_ix
    cdef readonly int64_t n_users, n_merchants, n_stocks, n_coupons
    cdef readonly int64_t n_payments, n_codes, n_lists, n_slots
    cdef readonly int64_t n_refunds, n_tombstones, auth_head, n_auth
    cdef readonly int64_t n_programs, n_memberships, n_earnings, n_visits, n_redemptions
    cdef readonly int64_t n_rewards
    cdef readonly int64_t fees, bank, tz_offset_ms, hold_ms
    cdef readonly int32_t coupons_per_user_max
    # Auto selection scratch (in t): per-stock "best candidate" marks
    # (stock_mark, stock_cand) and candidates (cands).
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
        self.t = {}
        self.tz_offset_ms = tz_offset_ms
        self.hold_ms = hold_ms
        self.t["refunds"] = np.zeros(64, REFUND)
        self.t["tombstones"] = np.zeros(64, TOMBSTONE)
        self.t["auth_queue"] = np.zeros(64, np.int32)
        self.refunds_ix = IdIndex()
        self.tombstones_ix = IdIndex()
        self.t["programs"] = np.zeros(16, PROGRAM)
        self.t["program_order"] = np.zeros(PROGRAMS_MAX, np.int32)
        self.t["memberships"] = np.zeros(1024, MEMBERSHIP)
        self.t["earnings"] = np.zeros(1024, EARNING)
        self.t["visits"] = np.zeros(1024, VISIT)
        self.t["redemptions"] = np.zeros(64, REDEMPTION)
        self.programs_ix = IdIndex()
        self.visits_ix = IdIndex()
        self.redemptions_ix = IdIndex()
        self.t["users"] = np.zeros(1024, USER)
        self.t["merchants"] = np.zeros(64, MERCHANT)
        self.t["stocks"] = np.zeros(64, STOCK)
        self.t["coupons"] = np.zeros(1024, COUPON)
        self.t["codes"] = np.zeros(64, CODE)
        self.t["pay_req"] = np.zeros(1024, PAY_RECORD)
        self.t["pay_res"] = np.zeros(1024, PAY_RESULT)
        self.t["pay_meta"] = np.zeros(1024, PAYMENT)
        self.t["lists"] = np.zeros(256, np.uint64)
        self.t["slots"] = np.zeros(3 * 64, np.int32)
        self.users_ix = IdIndex()
        self.merchants_ix = IdIndex()
        self.stocks_ix = IdIndex()
        self.coupons_ix = IdIndex()
        self.payments_ix = IdIndex()
        self.codes_ix = IdIndex()
        self.t["stock_mark"] = np.zeros(64, np.int64)
        self.t["stock_cand"] = np.zeros(64, np.int32)
        self.t["cands"] = np.zeros(16 * 48, np.uint8)
        self.cands_capacity = 16
        self.generation = 0
        self._bind()

    # -- table management -------------------------------------------------

    cdef _bind(self):
        """Refresh raw pointers after any array was (re)allocated."""
        self.U = <User*>data_of(self.t["users"])
        self.M = <Merchant*>data_of(self.t["merchants"])
        self.S = <Stock*>data_of(self.t["stocks"])
        self.C = <Coupon*>data_of(self.t["coupons"])
        self.K = <Code*>data_of(self.t["codes"])
        self.RF = <Refund*>data_of(self.t["refunds"])
        self.TS = <Tombstone*>data_of(self.t["tombstones"])
        self.PG = <Program*>data_of(self.t["programs"])
        self.PO = <int32_t*>data_of(self.t["program_order"])
        self.MS = <Membership*>data_of(self.t["memberships"])
        self.EA = <Earning*>data_of(self.t["earnings"])
        self.VS = <Visit*>data_of(self.t["visits"])
        self.RD = <Redemption*>data_of(self.t["redemptions"])
        self.AQ = <int32_t*>data_of(self.t["auth_queue"])
        self.PQ = <PayRecord*>data_of(self.t["pay_req"])
        self.PR = <PayResult*>data_of(self.t["pay_res"])
        self.PM = <Payment*>data_of(self.t["pay_meta"])
        self.LP = <uint64_t*>data_of(self.t["lists"])
        self.SP = <int32_t*>data_of(self.t["slots"])
        self.stock_mark_p = <int64_t*>data_of(self.t["stock_mark"])
        self.stock_cand_p = <int32_t*>data_of(self.t["stock_cand"])
        self.cands_p = <Cand*>data_of(self.t["cands"])
        self.users_ix.bind(self.t["users"])
        self.merchants_ix.bind(self.t["merchants"])
        self.stocks_ix.bind(self.t["stocks"])
        self.coupons_ix.bind(self.t["coupons"])
        self.payments_ix.bind(self.t["pay_req"])
        self.codes_ix.bind(self.t["codes"])
        self.refunds_ix.bind(self.t["refunds"])
        self.tombstones_ix.bind(self.t["tombstones"])
        self.programs_ix.bind(self.t["programs"])
        self.visits_ix.bind(self.t["visits"])
        self.redemptions_ix.bind(self.t["redemptions"])

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
            self.t[name] = self._grown(self.t[name], need)
        if table == "payments":     # each payment may become an authorization to expire
            self.t["auth_queue"] = self._grown(self.t["auth_queue"], self.n_auth + more)
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
        if key == 0:
            raise ValueError("a row id is nonzero")
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
            if self.n_programs >= <int64_t>PROGRAMS_MAX:
                raise ValueError(f"at most {PROGRAMS_MAX} programs")
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
        self.t["lists"] = self._grown(self.t["lists"], at + n)
        self.t["lists"][at:at + n] = values
        self.n_lists = at + n
        self._bind()
        return at

    def append_slots(self, triples):
        """Append (weekday, start, end) slots; return the index of the first."""
        cdef int64_t n = len(triples)
        cdef int64_t at = self.n_slots
        self.t["slots"] = self._grown(self.t["slots"], 3 * (at + n))
        for i, (w, s, e) in enumerate(triples):
            self.t["slots"][3 * (at + i)] = w
            self.t["slots"][3 * (at + i) + 1] = s
            self.t["slots"][3 * (at + i) + 2] = e
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
            "users": self.t["users"][:self.n_users],
            "merchants": self.t["merchants"][:self.n_merchants],
            "stocks": self.t["stocks"][:self.n_stocks],
            "coupons": self.t["coupons"][:self.n_coupons],
            "codes": self.t["codes"][:self.n_codes],
            "pay_req": self.t["pay_req"][:self.n_payments],
            "pay_res": self.t["pay_res"][:self.n_payments],
            "pay_meta": self.t["pay_meta"][:self.n_payments],
            "lists": self.t["lists"][:self.n_lists],
            "slots": self.t["slots"][:3 * self.n_slots],
            "refunds": self.t["refunds"][:self.n_refunds],
            "tombstones": self.t["tombstones"][:self.n_tombstones],
            "auth_queue": self.t["auth_queue"][:self.n_auth],
            "programs": self.t["programs"][:self.n_programs],
            "memberships": self.t["memberships"][:self.n_memberships],
            "earnings": self.t["earnings"][:self.n_earnings],
            "visits": self.t["visits"][:self.n_visits],
            "redemptions": self.t["redemptions"][:self.n_redemptions],
        }
        for name in self.INDEXES:
            arrays[name + "_ix"] = (<IdIndex>getattr(self, name + "_ix")).entries
        scalars = {name: int(getattr(self, name)) for name in self.SCALARS}
        return {name: read_only(arr) for name, arr in arrays.items()}, scalars

    def __getattr__(self, str name):
        """ledger.users etc.: a read-only view of the whole row array."""
        if name in READABLE:
            return read_only(self.t[name])
        raise AttributeError(name)

    cdef _set_scalars(self, dict scalars):
        self.n_users = scalars["n_users"]
        self.n_merchants = scalars["n_merchants"]
        self.n_stocks = scalars["n_stocks"]
        self.n_coupons = scalars["n_coupons"]
        self.n_payments = scalars["n_payments"]
        self.n_codes = scalars["n_codes"]
        self.n_lists = scalars["n_lists"]
        self.n_slots = scalars["n_slots"]
        self.n_refunds = scalars["n_refunds"]
        self.n_tombstones = scalars["n_tombstones"]
        self.n_programs = scalars["n_programs"]
        self.n_memberships = scalars["n_memberships"]
        self.n_earnings = scalars["n_earnings"]
        self.n_visits = scalars["n_visits"]
        self.n_redemptions = scalars["n_redemptions"]
        self.n_rewards = scalars["n_rewards"]
        self.auth_head = scalars["auth_head"]
        self.n_auth = scalars["n_auth"]
        self.fees = scalars["fees"]
        self.bank = scalars["bank"]
        self.tz_offset_ms = scalars["tz_offset_ms"]
        self.hold_ms = scalars["hold_ms"]
        self.coupons_per_user_max = scalars["coupons_per_user_max"]

    @classmethod
    def load(cls, arrays, scalars):
        """A ledger from dump() output (arrays are taken over, not copied).
        Raises LayoutError for tables this kernel cannot take."""
        cdef _Tables ledger = cls(scalars["tz_offset_ms"], scalars["hold_ms"])
        cdef IdIndex ix
        check_loadable(ledger.t, arrays, scalars)
        for name in cls.ROWS:
            current = ledger.t[name]
            loaded = owned(arrays[name])
            ledger.t[name] = loaded if len(loaded) else current
        ledger._set_scalars(scalars)
        n_stocks = max(ledger.n_stocks, 64)
        ledger.t["stock_mark"] = np.zeros(n_stocks, np.int64)
        ledger.t["stock_cand"] = np.zeros(n_stocks, np.int32)
        for name in cls.INDEXES:
            ix = getattr(ledger, name + "_ix")
            entries = owned(np.ascontiguousarray(arrays[name + "_ix"], np.int64))
            capacity = len(entries)
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
        ids = self.t["programs"]["id"][:self.n_programs]
        self.t["program_order"][:self.n_programs] = np.argsort(ids, kind="stable").astype(np.int32)

    cdef _reserve_cands(self):
        cdef int64_t need = self.coupons_per_user_max
        if need > self.cands_capacity:
            self.t["cands"] = np.zeros(need * sizeof(Cand), np.uint8)
            self.cands_capacity = need
            self._bind()

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


# Every row table has its count for check_loadable (an invariant of this file).
assert set(ROW_COUNTS) == set(_Tables.ROWS), "ROW_COUNTS and _Tables.ROWS differ"
