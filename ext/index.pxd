# Open-addressing hash index from a u64 id to a row slot.
#
# Entries are 8 bytes: a 32-bit fingerprint of the hash and the slot + 1 (0:
# empty, so freshly mapped zero pages are an empty table with nothing to
# fill). The id itself lives only in the row (at offset 0 of every row
# type), so the index costs 8 bytes per entry; the fingerprint lets a miss
# (every new payment id) finish without touching rows. Linear probing; load
# kept <= LOAD_MAX_PCT.
#
# An id's home bucket is the top bits of its hash (h >> shift), and the
# fingerprint is the top 32 bits: the home bucket of an entry in a table of
# any size up to 2^32 buckets follows from the entry alone. A resize then
# moves entries without reading their rows, in bucket order: the old table
# read as a stream, and the new one written as one (old bucket b's entries
# go to new buckets from GROWTH_FACTOR * b on). Moving rows in slot order
# (rehashing each row's id) wrote the new table at random: measured, 130 k
# random 8-byte writes a batch into a 128 MiB table cost 3.2 ms and slowed
# the next PAY batch by 25 %, a 6 MiB stretch written in order 0.27 ms and
# 4 % (issue 16, docs/performance.md). The price: of the fingerprint's 32
# bits, the log2(capacity) that name the home bucket no longer tell apart
# two ids of the same home (one in 256 of them share a fingerprint at 16 M
# buckets, and such a match costs a row read).
#
# Growing is incremental, as Redis rehashes: a resize allocates the larger
# table (zero pages, no fill) and from then on new ids go into it, while
# each reserve moves a bounded number of the old table's entries across
# (IdIndex.reserve, index.pxi); lookups try the new table, then the old one,
# until every entry has moved. Outside a resize a miss is one bucket read.
from libc.stdint cimport uint32_t, int32_t, int64_t, uint64_t

cdef enum:
    LOAD_MAX_PCT = 70
    # Where ids' home buckets come from, in a snapshot's index tables
    # (Ledger.dump's "index_layout"): 1 the hash's low bits (before the
    # resize moved in bucket order), 2 its top bits (above).
    INDEX_LAYOUT = 2

cdef struct Entry:
    uint32_t fp
    int32_t slot1           # slot + 1; 0 = empty

cdef struct Index:
    Entry* entries
    uint64_t mask           # capacity - 1 (capacity is a power of two, at most 2^32)
    int shift               # 64 - log2(capacity): a hash's home bucket is h >> shift
    int64_t count           # entries in `entries`
    const char* rows        # base of the rows whose first field is the id
    int64_t row_bytes
    # A resize under way (else old is NULL): `old` is the table before it,
    # no longer written, holding `old_rows` entries; those of its buckets
    # [0, old_next) are in `entries` too (`moved` of them), the others only
    # in `old`; rows added since are in `entries`.
    const Entry* old
    uint64_t old_mask
    int old_shift
    uint64_t old_next
    int64_t moved
    int64_t old_rows


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


cdef inline int64_t index_size(const Index* ix) noexcept nogil:
    """Rows indexed (in either table while a resize is under way)."""
    return ix.count + (ix.old_rows - ix.moved if ix.old != NULL else 0)


cdef inline uint64_t home(uint64_t h, int shift) noexcept nogil:
    """The home bucket of hash `h` in a table of 2^(64 - shift) buckets."""
    return h >> shift


cdef inline int32_t probe(const Index* ix, const Entry* entries, uint64_t mask, int shift,
                          uint64_t h, uint64_t key) noexcept nogil:
    """The slot of `key` (hash `h`) in one table, or -1."""
    cdef uint32_t fp = <uint32_t>(h >> 32)
    cdef uint64_t i = home(h, shift)
    cdef Entry e
    while True:
        e = entries[i]
        if e.slot1 == 0:
            return -1
        if e.fp == fp and row_id(ix, e.slot1 - 1) == key:
            return e.slot1 - 1
        i = (i + 1) & mask


cdef inline int32_t index_get(const Index* ix, uint64_t key) noexcept nogil:
    """The slot of `key`, or -1."""
    cdef uint64_t h = mix64(key)
    cdef int32_t slot = probe(ix, ix.entries, ix.mask, ix.shift, h, key)
    if slot >= 0 or ix.old == NULL:
        return slot
    return probe(ix, ix.old, ix.old_mask, ix.old_shift, h, key)


cdef extern from *:
    """
    #define scanpay_prefetch_for_write(address) __builtin_prefetch((address), 1)
    #if defined(__x86_64__) || defined(__i386__)
    #define scanpay_prefetch_kept(address) \
        __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const char*)(address)))
    #else
    #define scanpay_prefetch_kept(address) __builtin_prefetch((address))
    #endif
    """
    void __builtin_prefetch(const void* address) nogil
    # Lines about to be written for the first time: fetched in exclusive state.
    void prefetch_for_write "scanpay_prefetch_for_write"(const void* address) nogil
    # A prefetch the compiler may not drop. GCC 12 at -O3 dropped the
    # __builtin_prefetch of the payment and wallet index buckets from the
    # PAY pipeline once index_prefetch had a branch (the second table of a
    # resize): objdump showed the prefetcht0 gone, and the kernel rate with
    # capacity hints fell by a third.
    void prefetch_kept "scanpay_prefetch_kept"(const void* address) nogil


cdef inline void prefetch_row(const void* row, size_t row_bytes) noexcept nogil:
    """Start loading every line of a row: rows of 24-40 bytes straddle two
    cache lines about half the time, and a miss on the second line costs as
    much as one on the first."""
    __builtin_prefetch(row)
    __builtin_prefetch(<const char*>row + row_bytes - 1)


cdef inline void index_prefetch(const Index* ix, uint64_t key) noexcept nogil:
    """Start loading the bucket of `key` (first step of a batch pipeline)."""
    cdef uint64_t h = mix64(key)
    prefetch_kept(&ix.entries[home(h, ix.shift)])
    if ix.old != NULL:
        prefetch_kept(&ix.old[home(h, ix.old_shift)])


cdef inline int32_t guess(const Entry* entries, uint64_t mask, int shift,
                          uint64_t h) noexcept nogil:
    cdef uint32_t fp = <uint32_t>(h >> 32)
    cdef uint64_t i = home(h, shift)
    cdef Entry e
    while True:
        e = entries[i]
        if e.slot1 == 0 or e.fp == fp:
            return e.slot1 - 1
        i = (i + 1) & mask


cdef inline int32_t index_guess(const Index* ix, uint64_t key) noexcept nogil:
    """The slot of the first entry whose fingerprint matches `key`, or -1,
    without touching rows: a guess good enough to prefetch the row."""
    cdef uint64_t h = mix64(key)
    cdef int32_t slot = guess(ix.entries, ix.mask, ix.shift, h)
    if slot >= 0 or ix.old == NULL:
        return slot
    return guess(ix.old, ix.old_mask, ix.old_shift, h)


cdef inline void index_put(Index* ix, uint64_t key, int32_t slot) noexcept nogil:
    """Insert `key` (known absent). The caller keeps the load below the limit."""
    index_put_hashed(ix, mix64(key), slot)


cdef inline void index_put_hashed(Index* ix, uint64_t h, int32_t slot) noexcept nogil:
    """index_put of a key whose hash `h` is known (or, when an entry moves
    to a larger table, its fingerprint's bits: those of the home bucket)."""
    cdef uint64_t i = home(h, ix.shift)
    while ix.entries[i].slot1 != 0:
        i = (i + 1) & ix.mask
    ix.entries[i].fp = <uint32_t>(h >> 32)
    ix.entries[i].slot1 = slot + 1
    ix.count += 1
