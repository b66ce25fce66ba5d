# Open-addressing hash index from a u64 id to a row slot.
#
# Entries are 8 bytes: a 32-bit fingerprint of the hash and the slot. The id
# itself lives only in the row (at offset 0 of every row type), so the index
# costs 8 bytes per entry; the fingerprint lets a miss (every new payment id)
# finish without touching rows. Linear probing; load kept <= LOAD_MAX_PCT.
from libc.stdint cimport uint32_t, int32_t, int64_t, uint64_t

cdef enum:
    LOAD_MAX_PCT = 70

cdef struct Entry:
    uint32_t fp
    int32_t slot            # -1 = empty

cdef struct Index:
    Entry* entries
    uint64_t mask           # capacity - 1 (capacity is a power of two)
    int64_t count
    const char* rows        # base of the rows whose first field is the id
    int64_t row_bytes


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # murmur3 finalizer: ids are often sequential, the index needs them spread.
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline uint64_t row_id(const Index* ix, int32_t slot) noexcept nogil:
    return (<const uint64_t*>(ix.rows + slot * ix.row_bytes))[0]


cdef inline int32_t index_get(const Index* ix, uint64_t key) noexcept nogil:
    """The slot of `key`, or -1."""
    cdef uint64_t h = mix64(key)
    cdef uint32_t fp = <uint32_t>(h >> 32)
    cdef uint64_t i = h & ix.mask
    cdef Entry e
    while True:
        e = ix.entries[i]
        if e.slot < 0:
            return -1
        if e.fp == fp and row_id(ix, e.slot) == key:
            return e.slot
        i = (i + 1) & ix.mask


cdef extern from *:
    """
    #define scanpay_prefetch_for_write(address) __builtin_prefetch((address), 1)
    """
    void __builtin_prefetch(const void* address) nogil
    # Lines about to be written for the first time: fetched in exclusive state.
    void prefetch_for_write "scanpay_prefetch_for_write"(const void* address) nogil


cdef inline void prefetch_row(const void* row, size_t row_bytes) noexcept nogil:
    """Start loading every line of a row: rows of 24-40 bytes straddle two
    cache lines about half the time, and a miss on the second line costs as
    much as one on the first."""
    __builtin_prefetch(row)
    __builtin_prefetch(<const char*>row + row_bytes - 1)


cdef inline void index_prefetch(const Index* ix, uint64_t key) noexcept nogil:
    """Start loading the bucket of `key` (first step of a batch pipeline)."""
    __builtin_prefetch(&ix.entries[mix64(key) & ix.mask])


cdef inline int32_t index_guess(const Index* ix, uint64_t key) noexcept nogil:
    """The slot of the first entry whose fingerprint matches `key`, or -1,
    without touching rows: a guess good enough to prefetch the row."""
    cdef uint64_t h = mix64(key)
    cdef uint32_t fp = <uint32_t>(h >> 32)
    cdef uint64_t i = h & ix.mask
    cdef Entry e
    while True:
        e = ix.entries[i]
        if e.slot < 0 or e.fp == fp:
            return e.slot
        i = (i + 1) & ix.mask


cdef inline void index_put(Index* ix, uint64_t key, int32_t slot) noexcept nogil:
    """Insert `key` (known absent). The caller keeps the load below the limit."""
    cdef uint64_t h = mix64(key)
    cdef uint64_t i = h & ix.mask
    while ix.entries[i].slot >= 0:
        i = (i + 1) & ix.mask
    ix.entries[i].fp = <uint32_t>(h >> 32)
    ix.entries[i].slot = slot
    ix.count += 1
