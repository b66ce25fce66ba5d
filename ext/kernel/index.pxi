# IdIndex: a u64 id -> row hash index (index.pxd) bound to a table's id column.

cdef inline void* data_of(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


# An incremental resize moves MOVE_PER_ROW old rows across for every row a
# reserve makes room for, and at least MOVE_ROWS_MIN per reserve (a map
# operation adds its rows one at a time). A batch of 8,190 payments then
# moves 16,380 rows of the payment index, about a tenth of the batch's own
# time, and the resize is over long before the new table fills (resize()
# sizes it for that). Redis moves a few buckets per command for the same
# reason: one big rehash stopped every caller for as long as it took.
cdef int64_t MOVE_PER_ROW = 2
cdef int64_t MOVE_ROWS_MIN = 1024
# A resize grows the table 4x, not 2x: every row moves about once in all,
# not twice, for a load between 17 % and 70 % (8 bytes an entry: at most
# 46 bytes per row, next to rows of 24-208 bytes).
cdef int64_t GROWTH_FACTOR = 4
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
        if self.ix.old != NULL:
            self.move(max(MOVE_ROWS_MIN, MOVE_PER_ROW * more))
        if fits(count_need, self.ix.mask + 1):
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
        while not fits(count_need + count // MOVE_PER_ROW, capacity):
            capacity *= 2
        self.old_entries = self.entries
        self.ix.old = self.ix.entries
        self.ix.old_mask = self.ix.mask
        self.ix.old_rows = count
        self.ix.moved = 0
        # A resize with next to nothing to move is a jump (a capacity hint,
        # a first batch): its table is faulted in at once, as a hint asks.
        self.entries = zeroed_entries(capacity, count <= MOVE_ROWS_MIN)
        self.ix.entries = <Entry*>data_of(self.entries)
        self.ix.mask = capacity - 1
        self.ix.count = 0
        if count <= MOVE_ROWS_MIN:
            self.move(count)

    cdef move(self, int64_t rows):
        """Move up to `rows` rows of the old table across, in slot order:
        every row [0, old_rows) is indexed (rows are never removed), so this
        reads the rows as a stream instead of chasing old entries to random
        rows; the new buckets are prefetched a few rows ahead."""
        cdef int64_t slot, end = min(self.ix.moved + rows, self.ix.old_rows)
        with nogil:
            for slot in range(self.ix.moved, end):
                if slot + 8 < end:
                    prefetch_for_write(&self.ix.entries[
                        mix64(row_id(&self.ix, <int32_t>(slot + 8))) & self.ix.mask])
                index_put(&self.ix, row_id(&self.ix, <int32_t>slot), <int32_t>slot)
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
        return self.entries.nbytes + (self.old_entries.nbytes if self.old_entries is not None else 0)

    @property
    def count(self):
        return index_size(&self.ix)

    @property
    def resizing(self):
        """Rows still to move from the old table (0: no resize under way)."""
        return self.ix.old_rows - self.ix.moved if self.ix.old != NULL else 0
