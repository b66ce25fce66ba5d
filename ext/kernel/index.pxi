# IdIndex: a u64 id -> row hash index (index.pxd) bound to a table's id column.

cdef inline void* data_of(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


# An incremental resize moves MOVE_PER_ROW old rows across for every row a
# reserve makes room for, and at least MOVE_ROWS_MIN per reserve (a map
# operation adds its rows one at a time). A batch of 8,190 payments then
# moves 32,760 rows of the payment index (16 ns a row measured, about half
# a millisecond), and the resize is over long before the new table fills
# (resize() sizes it for that): lookups try two tables only meanwhile.
# Redis moves a few buckets per command for the same reason: one big
# rehash stopped every caller for as long as it took.
cdef int64_t MOVE_PER_ROW = 4
cdef enum:
    MOVE_BLOCK_ROWS = 32        # rows whose buckets are prefetched together
cdef int64_t MOVE_ROWS_MIN = 1024
# A resize grows the table 4x, not 2x: every row moves about once in all,
# not twice, for a load between 17 % and 70 % (8 bytes an entry: at most
# 46 bytes per row, next to rows of 24-208 bytes).
cdef int64_t GROWTH_FACTOR = 4
# From this load on, an index that has grown by resizing (not one sized by
# a capacity hint) allocates the table its next resize moves into, and the
# populate thread (rowspace.pxi) faults it in, so that the resize finds it
# ready: the writer would otherwise fault in the pages of a table 4x as
# large, at random, as the first rows move across.
cdef int64_t PREPARE_PCT = 50
# Index tables from this size on are mapped zero pages (a RowSpace), not
# allocated and filled: a new table is ready at once, whatever its size.
cdef int64_t MAPPED_ENTRIES_FROM_BYTES = 1 << 20


cdef inline bint fits(int64_t rows, int64_t capacity) noexcept nogil:
    return rows * 100 <= capacity * LOAD_MAX_PCT


cdef object zeroed_entries(int64_t capacity, bint now):
    """An empty table of `capacity` entries (zero is empty), its pages
    faulted in `now`, or by the populate thread (rowspace.pxi) while the
    first rows move across."""
    if capacity * 8 < MAPPED_ENTRIES_FROM_BYTES:
        return np.zeros(capacity, np.int64)
    cdef RowSpace space = RowSpace(np.int64, capacity * 8, capacity * 8)
    if now:
        space.populate(capacity * 8)
    else:
        space.populate_later(capacity * 8)
    return space.rows(capacity * 8)[:capacity]


cdef class IdIndex:
    """u64 id -> row slot over one table's rows (see index.pxd)."""
    cdef Index ix
    cdef object entries
    cdef object old_entries     # the table a resize moves rows out of (Index.old)
    cdef object next_entries    # the table the next resize moves into, once prepared
    cdef bint grown             # a resize has moved rows: the table grows as it goes

    def __cinit__(self):
        self.entries = zeroed_entries(16, True)
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = 15
        self.ix.count = 0
        self.ix.rows = NULL
        self.ix.row_bytes = 0
        self.ix.old = NULL
        self.ix.old_mask = 0
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
            self.next_entries = zeroed_entries(capacity * GROWTH_FACTOR, False)
        if fits(count_need, capacity):
            return
        if self.ix.old != NULL:
            # A new resize before the last one is over: only after a jump
            # far beyond a batch (a capacity hint); each resize leaves room
            # for its moving to end first (see resize).
            self.move(self.ix.old_rows)
        self.resize(count_need)

    cdef resize(self, int64_t count_need):
        """Start moving to a larger table, with room for `count_need` rows
        and for those that arrive while the present ones move across."""
        assert self.ix.old == NULL
        cdef int64_t count = self.ix.count
        cdef int64_t capacity = (self.ix.mask + 1) * GROWTH_FACTOR
        self.grown |= count > 0
        while not fits(count_need + count // MOVE_PER_ROW, capacity):
            capacity *= 2
        self.old_entries = self.entries
        self.ix.old = self.ix.entries
        self.ix.old_mask = self.ix.mask
        self.ix.old_rows = count
        self.ix.moved = 0
        # A resize with next to nothing to move is a jump (a capacity hint,
        # a first batch): its table is faulted in at once, as a hint asks.
        if self.next_entries is not None and len(self.next_entries) == capacity:
            self.entries = self.next_entries
        else:
            self.entries = zeroed_entries(capacity, count <= MOVE_ROWS_MIN)
        self.next_entries = None
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = capacity - 1
        self.ix.count = 0
        if count <= MOVE_ROWS_MIN:
            self.move(count)

    cdef move(self, int64_t rows):
        """Move up to `rows` rows of the old table across, in slot order:
        every row [0, old_rows) is indexed (rows are never removed), so this
        reads the rows as a stream instead of chasing old entries to random
        rows. By blocks: the block's new buckets are all prefetched before
        the first insert, so their cache misses overlap."""
        cdef int64_t slot, j, stop, end = min(self.ix.moved + rows, self.ix.old_rows)
        cdef uint64_t hashes[MOVE_BLOCK_ROWS]
        with nogil:
            slot = self.ix.moved
            while slot < end:
                stop = min(slot + MOVE_BLOCK_ROWS, end)
                for j in range(slot, stop):
                    hashes[j - slot] = mix64(row_id(&self.ix, <int32_t>j))
                    prefetch_for_write(&self.ix.entries[hashes[j - slot] & self.ix.mask])
                for j in range(slot, stop):
                    index_put_hashed(&self.ix, hashes[j - slot], <int32_t>j)
                slot = stop
        self.ix.moved = end
        if end == self.ix.old_rows:
            self.ix.old = NULL
            self.ix.old_mask = 0
            self.ix.moved = 0
            self.ix.old_rows = 0
            self.old_entries = None

    cdef settle(self):
        """Finish the resize under way: one table holds every row."""
        if self.ix.old != NULL:
            self.move(self.ix.old_rows)

    cdef adopt(self, object entries):
        """Take over a table from a snapshot (settled: no resize under way)."""
        entries = owned(np.ascontiguousarray(entries, np.int64))
        cdef int64_t capacity = len(entries)
        assert capacity >= 16 and capacity & (capacity - 1) == 0
        if (entries < 0).any():
            # Written before issue 16: empty was -1 and the slot stored as
            # is. Every such table has an empty entry; the present encoding
            # never makes a negative one.
            entries = np.where(entries == -1, 0, entries + (1 << 32))
        self.entries = entries
        self.old_entries = None
        self.ix.entries = <Entry*>data_of(entries)
        self.ix.mask = capacity - 1
        self.ix.count = int((entries >> 32 != 0).sum())
        self.ix.old = NULL
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
    def resizing(self):
        """Rows still to move from the old table (0: no resize under way)."""
        return self.ix.old_rows - self.ix.moved if self.ix.old != NULL else 0
