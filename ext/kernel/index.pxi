# IdIndex: a u64 id -> row hash index (index.pxd) bound to a table's id column.

cdef inline void* data_of(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


# An incremental resize moves MOVE_PER_ROW old entries across for every row
# a reserve makes room for, and at least MOVE_ROWS_MIN per reserve (a map
# operation adds its rows one at a time). Entries move in bucket order
# (index.pxd): the old table read and the new one written as streams, no
# row read, about 6 ns an entry measured (24 ns in row order, which wrote
# the new table at random). A batch of 8,190 payments then moves 131,040
# entries, under a millisecond, and an operation adding at least a
# sixteenth of a table's rows finishes the resize it started (the world's
# last ISSUE batches move most of the coupon index's). The resize is over
# long before the new table fills (resize() sizes it for that), and the
# fewer batches it spans, the fewer look every new id up in two tables (a
# new payment id misses both). 4 an entry, in row order: the payment
# index's resize at 734 k payments spanned 22 batches, and the coupon
# index's, left by the world build, the first 40 PAY batches (issue 16).
# Redis moves a few buckets per command for the same reason: one big
# rehash stopped every caller for as long as it took.
cdef int64_t MOVE_PER_ROW = 16
cdef int64_t MOVE_ROWS_MIN = 1024
# A resize grows the table 4x, not 2x: every row moves about once in all,
# not twice, for a load between 12 % and 50 % (GROW_PCT; up to 70 % while
# the next table is not in yet: 8 bytes an entry, at most 64 bytes per row,
# next to rows of 24-208 bytes).
cdef int64_t GROWTH_FACTOR = 4
# From this load on, an index that has grown by resizing (not one sized by
# a capacity hint) allocates the table its next resize moves into, and the
# populate thread (rowspace.pxi) faults it in, so that the resize finds it
# ready: the writer would otherwise fault in the pages of a table 4x as
# large, at random, as the first rows move across.
cdef int64_t PREPARE_PCT = 35
# The load at which an index that has grown by resizing starts its next
# resize, once that table's pages are in (`next_ready`); one sized by a
# hint resizes only past LOAD_MAX_PCT. Resizing at 50 % rather than 70 %
# keeps probes short while the table fills (the unhinted growth bench with
# memory warm: 90.6-100.9 % of the hinted rate in 5 runs, 87.3-89.6 % at
# 70 %, issue 16) for index tables of 8 bytes an entry.
cdef int64_t GROW_PCT = 50
# Index tables from this size on are mapped zero pages (a RowSpace), not
# allocated and filled: a new table is ready at once, whatever its size.
cdef int64_t MAPPED_ENTRIES_FROM_BYTES = 1 << 20


# Buckets an index table has at most: a home bucket is the top bits of the
# fingerprint (index.pxd). 2^31 rows (the most a table holds) fit at 50 %.
cdef int64_t INDEX_CAPACITY_MAX = 1LL << 32


cdef inline bint fits(int64_t rows, int64_t capacity) noexcept nogil:
    return rows * 100 <= capacity * LOAD_MAX_PCT


cdef int shift_for(int64_t capacity) noexcept:
    """64 - log2(capacity), for a power of two 16 <= capacity <= INDEX_CAPACITY_MAX."""
    assert 16 <= capacity <= INDEX_CAPACITY_MAX and capacity & (capacity - 1) == 0
    cdef int shift = 64
    while capacity > 1:
        capacity >>= 1
        shift -= 1
    return shift


cdef object zeroed_entries(int64_t capacity, bint now):
    """An empty table of `capacity` entries (zero is empty), its pages
    faulted in `now`, or by the populate thread (rowspace.pxi) while the
    first rows move across."""
    return zeroed_table(capacity, now)[0]


cdef tuple zeroed_table(int64_t capacity, bint now):
    """(zeroed_entries, the RowSpace its pages are in; None: allocated and
    filled, every page in)."""
    if capacity * 8 < MAPPED_ENTRIES_FROM_BYTES:
        return np.zeros(capacity, np.int64), None
    cdef RowSpace space = RowSpace(np.int64, capacity * 8, capacity * 8)
    if now:
        space.populate(capacity * 8)
    else:
        space.populate_later(capacity * 8)
    return space.rows(capacity * 8)[:capacity], space


cdef object rehomed(object entries):
    """A table of index layout 1 (home bucket: the hash's low bits) placed
    anew in the present one (its top bits, index.pxd), the same size. The
    fingerprint is the hash's top 32 bits in both: no row is read."""
    cdef int64_t capacity = len(entries)
    placed = np.zeros(capacity, np.int64)
    cdef Index ix
    ix.entries = <Entry*>data_of(placed)
    ix.mask = capacity - 1
    ix.shift = shift_for(capacity)
    ix.count = 0
    cdef const Entry* source = <const Entry*>data_of(entries)
    cdef int64_t b
    with nogil:
        for b in range(capacity):
            if source[b].slot1 != 0:
                index_put_hashed(&ix, (<uint64_t>source[b].fp) << 32, source[b].slot1 - 1)
    return placed


cdef class IdIndex:
    """u64 id -> row slot over one table's rows (see index.pxd)."""
    cdef Index ix
    cdef object entries
    cdef object old_entries     # the table a resize moves rows out of (Index.old)
    cdef object next_entries    # the table the next resize moves into, once prepared
    cdef RowSpace next_space    # its pages (None: all in)
    cdef bint grown             # a resize has moved rows: the table grows as it goes

    def __cinit__(self):
        self.entries = zeroed_entries(16, True)
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = 15
        self.ix.shift = shift_for(16)
        self.ix.count = 0
        self.ix.rows = NULL
        self.ix.row_bytes = 0
        self.ix.old = NULL
        self.ix.old_mask = 0
        self.ix.old_shift = 0
        self.ix.old_next = 0
        self.ix.moved = 0
        self.ix.old_rows = 0

    cdef void bind(self, object rows):
        """Point at the (possibly reallocated) rows array."""
        self.ix.rows = <const char*>data_of(rows)
        self.ix.row_bytes = rows.dtype.itemsize

    cdef reserve(self, int64_t count_need):
        """Room for `count_need` rows in all: a step of the resize under way,
        if any, then a new resize if the table would pass its load limit.
        The rows themselves are in place (bind) before it is called."""
        cdef int64_t more = count_need - index_size(&self.ix)
        cdef int64_t capacity = self.ix.mask + 1
        if self.ix.old != NULL:
            self.move(max(MOVE_ROWS_MIN, MOVE_PER_ROW * more))
        elif (self.grown and self.next_entries is None and count_need > MOVE_ROWS_MIN
                and count_need * 100 > capacity * PREPARE_PCT):
            self.next_entries, self.next_space = zeroed_table(capacity * GROWTH_FACTOR, False)
        if fits(count_need, capacity) and not (
                self.grown and count_need * 100 > capacity * GROW_PCT and self.next_ready()):
            return
        if self.ix.old != NULL:
            # A new resize before the last one is over: only after a jump
            # far beyond a batch (a capacity hint); each resize leaves room
            # for its moving to end first (see resize).
            self.move(self.ix.old_rows)
        self.resize(count_need)

    cdef bint next_ready(self):
        """Whether a resize now would find its table's pages in: the table
        prepared (or none prepared: a small one, filled at once) and the
        populate thread done with it. Past GROW_PCT a grown index waits for
        it, up to LOAD_MAX_PCT: a resize into pages not yet in has the
        writer fault them in at random as the first rows move (45-100 ms
        when fresh memory is dear)."""
        if self.next_space is None:
            return True
        return self.next_space.populated >= <size_t>len(self.next_entries) * 8

    cdef resize(self, int64_t count_need):
        """Start moving to a larger table, with room for `count_need` rows
        and for those that arrive while the present ones move across."""
        assert self.ix.old == NULL
        cdef int64_t count = self.ix.count
        cdef int64_t capacity = (self.ix.mask + 1) * GROWTH_FACTOR
        self.grown |= count > 0
        while not fits(count_need + count // MOVE_PER_ROW, capacity) \
                and capacity < INDEX_CAPACITY_MAX:
            capacity *= 2
        capacity = min(capacity, INDEX_CAPACITY_MAX)
        assert fits(count_need, capacity), "an index past the most rows a table holds"
        self.old_entries = self.entries
        self.ix.old = self.ix.entries
        self.ix.old_mask = self.ix.mask
        self.ix.old_shift = self.ix.shift
        self.ix.old_next = 0
        self.ix.old_rows = count
        self.ix.moved = 0
        # A resize with next to nothing to move is a jump (a capacity hint,
        # a first batch): its table is faulted in at once, as a hint asks.
        if self.next_entries is not None and len(self.next_entries) == capacity:
            self.entries = self.next_entries
        else:
            self.entries = zeroed_entries(capacity, count <= MOVE_ROWS_MIN)
        self.next_entries = None
        self.next_space = None
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = capacity - 1
        self.ix.shift = shift_for(capacity)
        self.ix.count = 0
        if count <= MOVE_ROWS_MIN:
            self.move(count)

    cdef move(self, int64_t entries):
        """Move up to `entries` entries of the old table across, in bucket
        order: an entry's home bucket in the new table follows from its
        fingerprint (index.pxd), so this reads the old table as a stream
        and writes the new one as a stream, old bucket b's entries from new
        bucket GROWTH_FACTOR * b on; no row is read, no id hashed."""
        cdef int64_t moved = self.ix.moved
        cdef int64_t end = min(moved + entries, self.ix.old_rows)
        cdef uint64_t b = self.ix.old_next
        cdef Entry e
        with nogil:
            # The old table holds old_rows entries: the loop meets them all
            # before its last bucket.
            while moved < end and b <= self.ix.old_mask:
                e = self.ix.old[b]
                b += 1
                if e.slot1 != 0:
                    index_put_hashed(&self.ix, (<uint64_t>e.fp) << 32, e.slot1 - 1)
                    moved += 1
        assert moved == end, "an index's old table held fewer entries than counted"
        self.ix.old_next = b
        self.ix.moved = moved
        if moved == self.ix.old_rows:
            self.ix.old = NULL
            self.ix.old_mask = 0
            self.ix.old_shift = 0
            self.ix.old_next = 0
            self.ix.moved = 0
            self.ix.old_rows = 0
            self.old_entries = None

    cdef settle(self):
        """Finish the resize under way: one table holds every row."""
        if self.ix.old != NULL:
            self.move(self.ix.old_rows)

    cdef adopt(self, object entries, int layout):
        """Take over a table from a snapshot (settled: no resize under way)
        whose ids' home buckets are of `layout` (INDEX_LAYOUT, or an older
        one: then its entries are placed anew, from their fingerprints)."""
        entries = owned(np.ascontiguousarray(entries, np.int64))
        cdef int64_t capacity = len(entries)
        assert capacity >= 16 and capacity & (capacity - 1) == 0
        if (entries < 0).any():
            # Written before issue 16: empty was -1 and the slot stored as
            # is. Every such table has an empty entry; the present encoding
            # never makes a negative one.
            entries = np.where(entries == -1, 0, entries + (1 << 32))
        if layout != INDEX_LAYOUT:
            entries = rehomed(entries)
        self.entries = entries
        self.old_entries = None
        self.ix.entries = <Entry*>data_of(entries)
        self.ix.mask = capacity - 1
        self.ix.shift = shift_for(capacity)
        self.ix.count = int((entries >> 32 != 0).sum())
        self.ix.old = NULL
        self.ix.old_next = 0
        self.ix.moved = 0
        self.ix.old_rows = 0

    def get(self, uint64_t key):
        return index_get(&self.ix, key)

    @property
    def nbytes(self):
        return sum(t.nbytes for t in (self.entries, self.old_entries, self.next_entries)
                   if t is not None)

    @property
    def count(self):
        return index_size(&self.ix)

    @property
    def capacity(self):
        """Buckets of the table new ids go into."""
        return self.ix.mask + 1

    @property
    def next_table_ready(self):
        """The table the next resize moves into is prepared, its pages in."""
        return self.next_entries is not None and self.next_ready()

    @property
    def resizing(self):
        """Rows still to move from the old table (0: no resize under way)."""
        return self.ix.old_rows - self.ix.moved if self.ix.old != NULL else 0
