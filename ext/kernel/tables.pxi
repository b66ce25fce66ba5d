# Ledger part 1: the tables. Every table's rows, their growth, snapshots
# (dump/load) and the capacity that a batch reserves before it runs. Rows
# live in row spaces (rowspace.pxi) and grow in place; indexes resize a
# step per reserve (index.pxi): growing never stops the writer.

def read_only(arr):
    """A view of `arr` that numpy refuses to write through: what Python sees
    of the kernel's tables."""
    view = arr.view()
    view.flags.writeable = False
    return view


def grown_copy(arr, int64_t need):
    """`arr` copied into a longer array of at least `need` rows (small
    tables only: see SPACE_FROM_BYTES). Zeroed by writing, not calloc: the
    pages fault in here rather than one by one inside the batch apply. Rows
    past the used count are always zero (nothing writes a row it does not
    keep), so the kernel fills a new row's fields without clearing it first."""
    cdef int64_t capacity = len(arr)
    grown = np.empty(max(need, capacity + capacity // 2), arr.dtype)
    grown[:capacity] = arr
    grown[capacity:].view(np.uint8).fill(0)
    return grown


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
        if capacity < 16 or capacity & (capacity - 1) or capacity > INDEX_CAPACITY_MAX:
            raise LayoutError(f"{name} index: {capacity} entries, not a power of two"
                              f" from 16 to {INDEX_CAPACITY_MAX}")
    if scalars.get("index_layout", 1) not in (1, INDEX_LAYOUT):
        raise LayoutError(f"index_layout is {scalars['index_layout']}; this version reads"
                          f" 1 and {INDEX_LAYOUT}")


# Rows a new ledger's tables start with, at most (tune_growth).
cdef int64_t INITIAL_ROWS_MAX = 1 << 20


def tune_growth(**settings):
    """Set growth thresholds and return the previous ones, for tests: tiny
    ones make a ledger grow, move into row spaces and resize its indexes at
    nearly every step. Results and digests never depend on them. Names:
    initial_rows_max, space_from_bytes, space_bytes_max, move_rows_min,
    move_per_row, mapped_entries_from_bytes, growth_factor, populate_mode,
    ahead_steps, ahead_bytes_max, populate_nice (before the thread starts),
    prepare_pct, grow_pct."""
    global INITIAL_ROWS_MAX, SPACE_FROM_BYTES, SPACE_BYTES_MAX, MOVE_ROWS_MIN
    global MOVE_PER_ROW, MAPPED_ENTRIES_FROM_BYTES, GROWTH_FACTOR, POPULATE_MODE
    global AHEAD_STEPS, AHEAD_BYTES_MAX, POPULATE_NICE, PREPARE_PCT, GROW_PCT
    previous = {"initial_rows_max": INITIAL_ROWS_MAX, "space_from_bytes": SPACE_FROM_BYTES,
                "space_bytes_max": SPACE_BYTES_MAX, "move_rows_min": MOVE_ROWS_MIN,
                "move_per_row": MOVE_PER_ROW,
                "mapped_entries_from_bytes": MAPPED_ENTRIES_FROM_BYTES,
                "growth_factor": GROWTH_FACTOR, "populate_mode": POPULATE_MODE,
                "ahead_steps": AHEAD_STEPS, "ahead_bytes_max": AHEAD_BYTES_MAX,
                "populate_nice": POPULATE_NICE, "prepare_pct": PREPARE_PCT, "grow_pct": GROW_PCT}
    unknown = set(settings) - set(previous)
    if unknown:
        raise ValueError(f"unknown growth settings {sorted(unknown)}")
    if any(int(v) < (1 if k in ("initial_rows_max", "move_per_row", "space_bytes_max") else 0)
           for k, v in settings.items()) or settings.get("growth_factor", 2) not in (2, 4, 8) \
            or settings.get("populate_mode", 0) not in (0, 1, 2) \
            or not 10 <= settings.get("grow_pct", GROW_PCT) <= LOAD_MAX_PCT \
            or not 0 <= settings.get("prepare_pct", PREPARE_PCT) <= LOAD_MAX_PCT:
        raise ValueError(f"growth settings out of range: {settings}")
    INITIAL_ROWS_MAX = settings.get("initial_rows_max", INITIAL_ROWS_MAX)
    SPACE_FROM_BYTES = settings.get("space_from_bytes", SPACE_FROM_BYTES)
    SPACE_BYTES_MAX = settings.get("space_bytes_max", SPACE_BYTES_MAX)
    MOVE_ROWS_MIN = settings.get("move_rows_min", MOVE_ROWS_MIN)
    MOVE_PER_ROW = settings.get("move_per_row", MOVE_PER_ROW)
    MAPPED_ENTRIES_FROM_BYTES = settings.get("mapped_entries_from_bytes",
                                             MAPPED_ENTRIES_FROM_BYTES)
    GROWTH_FACTOR = settings.get("growth_factor", GROWTH_FACTOR)
    POPULATE_MODE = settings.get("populate_mode", POPULATE_MODE)
    AHEAD_STEPS = settings.get("ahead_steps", AHEAD_STEPS)
    AHEAD_BYTES_MAX = settings.get("ahead_bytes_max", AHEAD_BYTES_MAX)
    POPULATE_NICE = settings.get("populate_nice", POPULATE_NICE)
    PREPARE_PCT = settings.get("prepare_pct", PREPARE_PCT)
    GROW_PCT = settings.get("grow_pct", GROW_PCT)
    return previous


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
    cdef dict spaces            # name -> the RowSpace of t[name] (the arrays that grow)
    cdef list resizing          # the IdIndexes with a resize under way
    cdef dict prepared          # name -> the RowSpace a small table will move into
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
        self.spaces = {}
        self.resizing = []
        self.prepared = {}
        self.tz_offset_ms = tz_offset_ms
        self.hold_ms = hold_ms
        for name, dtype, rows in (
                ("refunds", REFUND, 64), ("tombstones", TOMBSTONE, 64),
                ("auth_queue", np.int32, 64), ("programs", PROGRAM, 16),
                ("memberships", MEMBERSHIP, 1024), ("earnings", EARNING, 1024),
                ("visits", VISIT, 1024), ("redemptions", REDEMPTION, 64),
                ("users", USER, 1024), ("merchants", MERCHANT, 64), ("stocks", STOCK, 64),
                ("coupons", COUPON, 1024), ("codes", CODE, 64), ("pay_req", PAY_RECORD, 1024),
                ("pay_res", PAY_RESULT, 1024), ("pay_meta", PAYMENT, 1024),
                ("lists", np.uint64, 256), ("slots", np.int32, 3 * 64),
                ("stock_mark", np.int64, 64), ("stock_cand", np.int32, 64)):
            self.t[name] = np.zeros(min(rows, INITIAL_ROWS_MAX), dtype)
        self.t["program_order"] = np.zeros(PROGRAMS_MAX, np.int32)
        self.refunds_ix = IdIndex()
        self.tombstones_ix = IdIndex()
        self.programs_ix = IdIndex()
        self.visits_ix = IdIndex()
        self.redemptions_ix = IdIndex()
        self.users_ix = IdIndex()
        self.merchants_ix = IdIndex()
        self.stocks_ix = IdIndex()
        self.coupons_ix = IdIndex()
        self.payments_ix = IdIndex()
        self.codes_ix = IdIndex()
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

    cdef _place(self, str name, RowSpace space, int64_t rows):
        """Array `name` is the rows [0, rows) of `space`."""
        self.spaces[name] = space
        self.t[name] = space.rows(<size_t>rows * space.dtype.itemsize)

    cdef bint _grow(self, str name, int64_t rows, int64_t more) except -1:
        """Room for `rows` rows in array `name`, their pages faulted in, of
        which `more` are new. A large table gets more of its row space,
        never a copy; a small one is copied into a larger array, or into a
        row space once it outgrows SPACE_FROM_BYTES. True if the rows moved:
        then _bind()."""
        arr = self.t[name]
        cdef RowSpace space = self.spaces.get(name)
        cdef size_t itemsize = arr.dtype.itemsize
        cdef size_t need = <size_t>rows * itemsize
        cdef size_t ahead = min(AHEAD_BYTES_MAX, AHEAD_STEPS * <size_t>max(more, 0) * itemsize)
        if space is not None and need <= space.reserved:
            space.grow(need, ahead)
            if need > len(arr) * itemsize:
                self._place(name, space, rows)
            return False
        if rows <= len(arr):
            return False
        if space is None and need <= SPACE_FROM_BYTES:
            if need * 2 > SPACE_FROM_BYTES and name not in self.prepared:
                # Half way: the space it will move into, made ready meanwhile.
                self.prepared[name] = prepared_space(arr.dtype, 2 * SPACE_FROM_BYTES)
            self.t[name] = grown_copy(arr, rows)
        else:
            # Once, when the table outgrows SPACE_FROM_BYTES; or past its
            # space's reservation, only if the process could not reserve
            # the whole of it (space_bytes_for).
            prepared = self.prepared.pop(name, None) if space is None else None
            self._place(name, space_with(arr.dtype, rows, arr, prepared), rows)
        return True

    def reserve(self, str table, int64_t more):
        """Room for `more` new rows of `table` (rows and index)."""
        if table not in TABLE_ROWS:
            raise ValueError(f"unknown table {table!r}")
        cdef int64_t need = getattr(self, "n_" + table) + more
        cdef bint moved = False
        for name in TABLE_ROWS[table]:
            moved |= self._grow(name, need, more)
        if table == "payments":     # each payment may become an authorization to expire
            moved |= self._grow("auth_queue", self.n_auth + more, more)
        if moved:
            self._bind()
        cdef IdIndex ix
        if table not in UNINDEXED_TABLES:
            ix = getattr(self, table + "_ix")
            # The resize relies on it: rows 0..n-1 are exactly the indexed ones.
            assert index_size(&ix.ix) == need - more, f"{table}: index out of step with rows"
            ix.reserve(need)
            if ix.ix.old != NULL and ix not in self.resizing:
                self.resizing.append(ix)
        else:
            ix = None
        if self.resizing:
            self._step_resizes(ix, more)

    cdef _step_resizes(self, IdIndex skip, int64_t more):
        """A step of every other index's resize under way, as large as a
        reserve of `more` rows makes: a table that stopped growing (the
        wallets, once the world is built) would otherwise leave its lookups
        trying two tables for good."""
        cdef IdIndex ix
        for ix in self.resizing:
            if ix is not skip:
                ix.move(max(MOVE_ROWS_MIN, MOVE_PER_ROW * more))
        self.resizing = [ix for ix in self.resizing if ix.ix.old != NULL]

    def step_resizes(self, int64_t entries):
        """Move up to `entries` entries of every index resize under way and
        return how many moved (0: none is under way). For a writer with
        nothing else to do (the server's, its queue empty), as Redis
        rehashes when idle: a table that stopped growing mid-resize (the
        coupons once the world is built) is then settled before the next
        batches, which would otherwise step it."""
        if entries < 1:
            raise ValueError("entries must be >= 1")
        cdef IdIndex ix
        cdef int64_t before = 0, after = 0
        for ix in self.resizing:
            before += ix.resizing
            ix.move(entries)
            after += ix.resizing
        self.resizing = [ix for ix in self.resizing if ix.ix.old != NULL]
        return before - after

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
        if self._grow("lists", at + n, n):
            self._bind()
        self.t["lists"][at:at + n] = values
        self.n_lists = at + n
        return at

    def append_slots(self, triples):
        """Append (weekday, start, end) slots; return the index of the first."""
        cdef int64_t n = len(triples)
        cdef int64_t at = self.n_slots
        if self._grow("slots", 3 * (at + n), 3 * n):
            self._bind()
        for i, (w, s, e) in enumerate(triples):
            self.t["slots"][3 * (at + i)] = w
            self.t["slots"][3 * (at + i) + 1] = s
            self.t["slots"][3 * (at + i) + 2] = e
        self.n_slots = at + n
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
        """(arrays, scalars): the whole ledger as views of its used rows.
        Finishes any index resize under way first (a snapshot stores one
        table per index): the writer never calls it, the snapshot and audit
        children do, after the fork."""
        for name in self.INDEXES:
            (<IdIndex>getattr(self, name + "_ix")).settle()
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
        # How the index tables place ids (index.pxd); a snapshot without it
        # was written before layout 2, and load() places its entries anew.
        scalars["index_layout"] = INDEX_LAYOUT
        return {name: read_only(arr) for name, arr in arrays.items()}, scalars

    def release_free_pages(self):
        """In a forked child that only reads (the audit's): drop this
        process's share of the pages of every row space past the used rows,
        the reserved rows and those the populate thread faulted in ahead, so
        that the writer's first write to one does not copy it. They read as
        zero afterwards, as they were."""
        arrays, _scalars = self.dump()
        cdef RowSpace space
        cdef size_t start
        for name, space in self.spaces.items():
            start = round_up(arrays[name].nbytes, PAGE_BYTES) if name in arrays else 0
            if name in arrays and start < space.committed:
                madvise(space.base + start, space.committed - start, MADV_DONTNEED)
        for space in self.prepared.values():
            madvise(space.base, space.committed, MADV_DONTNEED)

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
        check_loadable(ledger.t, arrays, scalars)
        for name in cls.ROWS:
            current = ledger.t[name]
            loaded = owned(arrays[name])
            ledger.t[name] = loaded if len(loaded) else current


        for name in cls.ROWS:
            ledger._adopt(name, arrays[name])
        ledger._set_scalars(scalars)
        ledger._grow("stock_mark", max(ledger.n_stocks, 64), 0)
        ledger._grow("stock_cand", max(ledger.n_stocks, 64), 0)
        for name in cls.INDEXES:
            (<IdIndex>getattr(ledger, name + "_ix")).adopt(
                arrays[name + "_ix"], scalars.get("index_layout", 1))
        ledger._bind()
        ledger.sort_programs()
        ledger._reserve_cands()
        return ledger

    cdef _adopt(self, str name, object loaded):
        """Array `name` from a snapshot: taken over with its row space if
        the snapshot was read into one (allocate below); else a large one is
        copied into a new row space, and a small one taken over as it is
        (copied if read-only, such as another ledger's dump: two ledgers
        share no rows)."""
        current = self.t[name]
        assert loaded.dtype == current.dtype, f"{name}: dtype {loaded.dtype}"
        if not len(loaded):
            return
        cdef RowSpace space = space_of(loaded)
        if space is not None and space.claim():
            self._place(name, space, len(loaded))
        elif loaded.nbytes > SPACE_FROM_BYTES:
            self._place(name, space_with(loaded.dtype, len(loaded), loaded), len(loaded))
        else:
            self.t[name] = owned(loaded)

    @staticmethod
    def allocate(str name, dtype, int64_t rows):
        """A zeroed array of `rows` rows for the snapshot loader to read table
        `name` into, in a row space that load() then takes over without a
        copy; None if `name` is not a table or the table is small (a plain
        numpy array then, see SPACE_FROM_BYTES)."""
        dtype = np.dtype(dtype)
        if name not in _Tables.ROWS or <size_t>rows * dtype.itemsize <= SPACE_FROM_BYTES:
            return None
        cdef RowSpace space = RowSpace(dtype, space_bytes_for(dtype.itemsize),
                                       <size_t>max(rows, 1) * dtype.itemsize)
        space.adoptable = True
        return space.rows(<size_t>rows * dtype.itemsize)[:rows]

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
