# Helpers of the PAY rules that need no ledger: exact shares, candidate order,
# selection scratch, the engine clock, discounts.

cdef extern from *:
    ctypedef long long int128 "__int128"


cdef inline int64_t share_of(int64_t refunded, int64_t part, int64_t total) noexcept nogil:
    """floor(refunded * part / total) exactly: the product needs 128 bits."""
    return <int64_t>((<int128>refunded * <int128>part) / <int128>total)

cdef struct Cand:
    int64_t d
    int64_t expires_at
    uint64_t id
    int32_t slot
    int32_t stock


cdef struct Selection:
    int32_t count
    int32_t slot[COUPONS_PER_PAYMENT_MAX]
    int64_t d[COUPONS_PER_PAYMENT_MAX]            # discount on the original amount
    int64_t applied[COUPONS_PER_PAYMENT_MAX]
    int64_t total


cdef struct Clock:
    int64_t now
    int64_t day             # engine day, engine time zone
    int32_t weekday         # 0 = Monday, engine time zone
    int32_t minute          # minute of the local day


cdef inline bint ranks_before(const Cand* a, const Cand* b) noexcept nogil:
    # Step 5: d descending, expires_at ascending, coupon id ascending.
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
    """Step 4: d on the original amount."""
    cdef int64_t d
    if s.kind == KIND_FIXED:
        return s.value if s.value < amount else amount
    d = amount * s.value // 10000      # <= 10**18: fits in 64 bits
    if s.cap > 0 and d > s.cap:
        d = s.cap
    return d
