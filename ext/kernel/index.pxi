# IdIndex: a u64 id -> row hash index (index.pxd) bound to a table's id column.

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
