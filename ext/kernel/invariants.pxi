# Ledger part 2: the invariants of the postings, checked in the debug build.
# setup.py writes kernel/mode.h: SCANPAY_KERNEL_DEBUG is 1 when built with
# SCANPAY_KERNEL_DEBUG=1 (the test suite's build), else 0, and the C compiler
# drops every `if KERNEL_DEBUG:` block, so the release build pays nothing.
# A check that fails in a nogil posting marks the ledger broken; the batch
# entry point then raises InvariantError (a real exception, not an abort).

cdef extern from "kernel/mode.h":
    bint KERNEL_DEBUG "SCANPAY_KERNEL_DEBUG"

DEBUG = bool(KERNEL_DEBUG)


class InvariantError(RuntimeError):
    """A kernel invariant broke (debug build only): a bug, not a bad request."""


cdef enum:
    BROKEN_NONE = 0
    BROKEN_WALLET = 1       # held < 0, or held > balance
    BROKEN_STOCK = 2        # spent + reserved < 0, or > budget
    BROKEN_POSTING = 3      # a posting's amounts do not sum to zero
    BROKEN_LEDGER = 4       # the ledger's accounts do not sum to zero

BROKEN_TEXT = {
    BROKEN_WALLET: "wallet: held < 0 or held > balance",
    BROKEN_STOCK: "stock: spent + reserved < 0 or > budget",
    BROKEN_POSTING: "posting: amounts do not sum to zero",
    BROKEN_LEDGER: "ledger: wallets + merchants + campaigns + fees + bank != 0",
}


cdef class _Invariants(_Tables):
    cdef int broken
    cdef int64_t broken_row

    cdef inline void broke(self, int what, int64_t row) noexcept nogil:
        if self.broken == BROKEN_NONE:
            self.broken = what
            self.broken_row = row

    cdef int64_t posting_sum(self, int32_t u, int32_t m, const int32_t* coupons,
                             int32_t n) noexcept nogil:
        """The accounts one payment's posting touches: wallet u, merchant m,
        the fee account, the bank and the campaigns of its coupons' stocks
        (each stock once)."""
        cdef int64_t total = self.fees + self.bank
        cdef int32_t i, j, s
        cdef bint seen
        if u >= 0:
            total += self.U[u].balance
        if m >= 0:
            total += self.M[m].balance
        for i in range(n):
            s = self.C[coupons[i]].stock
            seen = False
            for j in range(i):
                seen = seen or self.C[coupons[j]].stock == s
            if not seen:
                total += self.S[s].campaign
        return total

    cdef inline void check_wallet(self, int32_t u) noexcept nogil:
        if self.U[u].held < 0 or self.U[u].held > self.U[u].balance:
            self.broke(BROKEN_WALLET, u)

    cdef inline void check_stock(self, int32_t s) noexcept nogil:
        cdef int64_t used = self.S[s].spent + self.S[s].reserved
        if used < 0 or (self.S[s].budget > 0 and used > self.S[s].budget):
            self.broke(BROKEN_STOCK, s)

    cdef void check_posting(self, int64_t before, int32_t u, int32_t m,
                            const int32_t* coupons, int32_t n) noexcept nogil:
        """After a posting: it summed to zero, and the wallet and stocks it
        touched keep their rules."""
        cdef int32_t i
        if self.posting_sum(u, m, coupons, n) != before:
            self.broke(BROKEN_POSTING, m)
        if u >= 0:
            self.check_wallet(u)
        for i in range(n):
            self.check_stock(self.C[coupons[i]].stock)

    cdef debug_check(self, str op, bint whole=False):
        """After a batch that moved money: no posting broke a rule and, if
        `whole`, the whole ledger sums to zero (O(rows): settlement only, as
        each posting is checked to sum to zero), or InvariantError."""
        cdef int128 total = <int128>self.fees + self.bank
        cdef int64_t i
        if whole:
            self.check_sum_zero(total)
        if self.broken != BROKEN_NONE:
            what, row = self.broken, self.broken_row
            self.broken = BROKEN_NONE
            raise InvariantError(f"{op}: {BROKEN_TEXT[what]} (row {row})")

    cdef void check_sum_zero(self, int128 total) noexcept nogil:
        cdef int64_t i
        for i in range(self.n_users):
            total += self.U[i].balance
        for i in range(self.n_merchants):
            total += self.M[i].balance
        for i in range(self.n_stocks):
            total += self.S[i].campaign
        if total != 0:
            self.broke(BROKEN_LEDGER, -1)

    def check_invariants(self):
        """The debug build's checks, now (the debug build runs them after every
        batch that moves money); raises InvariantError."""
        if not KERNEL_DEBUG:
            raise RuntimeError("the invariant checks exist in the debug build only")
        self.debug_check("check_invariants", True)

    def _debug_set_held(self, int32_t user, int64_t held):
        """Test hook (debug build only): corrupt a wallet's hold, to show that
        the next posting's check raises."""
        if not KERNEL_DEBUG:
            raise RuntimeError("test hooks exist in the debug build only")
        if not 0 <= user < self.n_users:
            raise IndexError(f"no wallet at slot {user}")
        self.U[user].held = held
