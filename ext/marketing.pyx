# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Precision marketing's passes over the kernel's tables, read only
(docs/reference/rules.md, "Precision marketing"; engine/core/segments.py).

A segment is evaluated over every payment (10 M in the standard world): one
pass in C, reading each payment row once and adding into per-user arrays,
instead of numpy's one pass per field (each of which touches every 208-byte
row again) and its `ufunc.at` (seconds for 10 M rows). Nothing here writes a
table of the ledger: the functions fill arrays their caller owns.

The holdout draw is SipHash-2-4 (Aumasson and Bernstein), a keyed PRF: with
a key nobody knows, nobody can tell who will be held out.
"""
cimport cython
from libc.stdint cimport uint8_t, int32_t, int64_t, uint64_t

from tables cimport Payment, COUPONS_PER_PAYMENT_MAX
from index cimport prefetch_for_write

from engine.core.canonical import PAYMENT_COMPLETED as _COMPLETED
from engine.core.canonical import PAYMENT_PARTIALLY_REFUNDED as _PARTIALLY_REFUNDED

cdef uint8_t COMPLETED = _COMPLETED
cdef uint8_t PARTIALLY_REFUNDED = _PARTIALLY_REFUNDED
cdef int64_t I64_MAX = 0x7FFFFFFFFFFFFFFF
HOLDOUT_SCALE = 10000                   # the holdout fraction is in basis points
cdef uint64_t SCALE = HOLDOUT_SCALE

PAYMENT_ROW_BYTES = sizeof(Payment)


cdef inline bint counted(const Payment* p) noexcept nogil:
    """A payment that counts for segments and lift: completed, refunded at
    most in part (a fully refunded, voided, expired or open one does not)."""
    return p.state == COMPLETED or p.state == PARTIALLY_REFUNDED


# The per-user accumulators of scan_payments, one row per wallet slot: a
# payment updates one row (one cache line), where three separate arrays
# would cost three cache misses per payment.
cdef enum:
    C_COUNT = 0
    C_GMV = 1
    C_LAST = 2
    C_FLAGS = 3
    C_FIELDS = 4
    F_EVER = 1
    F_BEFORE = 2
    PREFETCH_AHEAD = 16             # payments ahead whose user row is fetched early
ACC_COUNT, ACC_GMV, ACC_LAST, ACC_FLAGS, ACC_FIELDS = C_COUNT, C_GMV, C_LAST, C_FLAGS, C_FIELDS
FLAG_EVER, FLAG_BEFORE = F_EVER, F_BEFORE


def scan_payments(const uint8_t[::1] rows, const uint8_t[::1] in_scope,
                  int64_t from_ms, int64_t until_ms, int64_t[:, ::1] acc):
    """For each wallet slot u, over its counted payments at a merchant slot m
    with in_scope[m], into acc[u] (zeroed by the caller): ACC_COUNT, ACC_GMV
    (net: amount - refunded_amount) and ACC_LAST (the latest completed_at)
    of those completed in [from_ms, until_ms); ACC_FLAGS bit FLAG_EVER if any
    at all, FLAG_BEFORE if one completed before from_ms. GMV saturates at
    2**63 - 1 (no user's net payments come near it)."""
    cdef int64_t n = rows.shape[0] // sizeof(Payment)
    if rows.shape[0] != n * sizeof(Payment):
        raise ValueError("rows must be whole payment rows")
    if acc.shape[1] != C_FIELDS:
        raise ValueError(f"acc has {C_FIELDS} columns")
    cdef int64_t users = acc.shape[0], merchants = in_scope.shape[0]
    cdef const Payment* pay = <const Payment*>&rows[0] if n else NULL
    cdef const Payment* p
    cdef int64_t i, at, net, ahead
    cdef int64_t* row
    cdef int32_t u
    with nogil:
        for i in range(n):
            ahead = i + PREFETCH_AHEAD
            if ahead < n and 0 <= pay[ahead].user < users:
                prefetch_for_write(&acc[pay[ahead].user, 0])
            p = &pay[i]
            if not counted(p):
                continue
            u = p.user
            if u < 0 or u >= users or p.merchant < 0 or p.merchant >= merchants:
                with gil:
                    raise ValueError(f"payment row {i} names wallet slot {u}, merchant "
                                     f"slot {p.merchant}: not in the tables given")
            if not in_scope[p.merchant]:
                continue
            row = &acc[u, 0]
            row[C_FLAGS] |= F_EVER
            at = p.completed_at
            if at < from_ms:
                row[C_FLAGS] |= F_BEFORE
            elif at < until_ms:
                row[C_COUNT] += 1
                net = p.amount - p.refunded_amount
                row[C_GMV] = I64_MAX if row[C_GMV] > I64_MAX - net else row[C_GMV] + net
                if at > row[C_LAST]:
                    row[C_LAST] = at


def coupon_discount(const uint8_t[::1] rows, const uint8_t[::1] coupon_mask,
                    int64_t from_ms, int64_t until_ms):
    """(redeemed, discount) of the coupon slots c with coupon_mask[c] in the
    counted payments completed in [from_ms, until_ms): how many of them those
    payments applied (a coupon released at capture is not applied), and
    their applied parts net of refunded parts."""
    cdef int64_t n = rows.shape[0] // sizeof(Payment)
    if rows.shape[0] != n * sizeof(Payment):
        raise ValueError("rows must be whole payment rows")
    cdef int64_t coupons = coupon_mask.shape[0]
    cdef const Payment* pay = <const Payment*>&rows[0] if n else NULL
    cdef const Payment* p
    cdef int64_t i, redeemed = 0, discount = 0
    cdef int32_t c
    cdef int k
    with nogil:
        for i in range(n):
            p = &pay[i]
            if not counted(p) or p.completed_at < from_ms or p.completed_at >= until_ms:
                continue
            for k in range(p.coupon_count):
                c = p.coupon[k]
                if p.released >> k & 1 or c < 0 or c >= coupons or not coupon_mask[c]:
                    continue
                redeemed += 1
                discount += p.applied[k] - p.refunded_part[k]
    return redeemed, discount


cdef inline uint64_t rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline void sipround(uint64_t* v) noexcept nogil:
    v[0] += v[1]; v[1] = rotl(v[1], 13); v[1] ^= v[0]; v[0] = rotl(v[0], 32)
    v[2] += v[3]; v[3] = rotl(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = rotl(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = rotl(v[1], 17); v[1] ^= v[2]; v[2] = rotl(v[2], 32)


cdef inline void absorb(uint64_t* v, uint64_t m) noexcept nogil:
    """One 8-byte message block, with SipHash-2-4's two compression rounds."""
    v[3] ^= m
    sipround(v)
    sipround(v)
    v[0] ^= m


cdef inline uint64_t siphash16(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1) noexcept nogil:
    """SipHash-2-4 of the 16 bytes le64(m0) || le64(m1) under the key
    le64(k0) || le64(k1)."""
    cdef uint64_t v[4]
    cdef uint64_t last = (<uint64_t>16) << 56       # the length byte, no tail bytes
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    absorb(v, m0)
    absorb(v, m1)
    absorb(v, last)
    v[2] ^= 0xff
    sipround(v)
    sipround(v)
    sipround(v)
    sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def siphash(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1) -> int:
    """SipHash-2-4 of le64(m0) || le64(m1) under the key le64(k0) || le64(k1)."""
    return siphash16(k0, k1, m0, m1)


def holdout(const uint64_t[::1] users, uint64_t k0, uint64_t k1, uint64_t campaign,
            int64_t holdout_bps, uint8_t[::1] out):
    """out[i] = 1 when users[i] is in the campaign's holdout:
    SipHash-2-4(key, le64(campaign) || le64(user)) mod 10000 < holdout_bps."""
    cdef int64_t i, n = users.shape[0]
    if out.shape[0] != n:
        raise ValueError("one output per user")
    if not 0 <= holdout_bps <= HOLDOUT_SCALE:
        raise ValueError("holdout_bps is in 0..10000")
    with nogil:
        for i in range(n):
            out[i] = siphash16(k0, k1, campaign, users[i]) % SCALE < <uint64_t>holdout_bps
