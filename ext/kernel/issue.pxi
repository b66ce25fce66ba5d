# Ledger part 3: ISSUE: a coupon from a stock to a user.


cdef class _Issue(_Select):
    cdef int issue_check(self, int32_t s, int32_t u, int64_t now) noexcept nogil:
        """The checks of ISSUE after the stock is known, in docs/reference/rules.md order."""
        cdef Stock* st = &self.S[s]
        cdef int32_t c
        cdef int64_t owned = 0
        if now >= st.valid_until:
            return ST_STOCK_ENDED
        if st.max_issued > 0 and st.issued >= st.max_issued:
            return ST_STOCK_EXHAUSTED
        if u < 0:
            return ST_USER_NOT_FOUND
        if st.per_user_limit > 0:
            # Coupons are never deleted, so the user's list counts every issue.
            c = self.U[u].coupon_head
            while c >= 0:
                owned += self.C[c].stock == s
                c = self.C[c].next
            if owned >= st.per_user_limit:
                return ST_PER_USER_LIMIT
        return ST_OK

    cdef int32_t issue_create(self, uint64_t coupon_id, int32_t s, int32_t u,
                              int64_t now) noexcept nogil:
        """A new available coupon (capacity reserved by the caller)."""
        cdef Stock* st = &self.S[s]
        cdef int32_t c = <int32_t>self.n_coupons
        self.n_coupons += 1
        self.C[c].id = coupon_id
        self.C[c].stock = s
        self.C[c].user = u
        self.C[c].state = COUPON_AVAILABLE
        self.C[c].payment = -1
        self.C[c].expires_at = st.valid_until
        if st.validity_ms > 0 and st.validity_ms < st.valid_until - now:
            self.C[c].expires_at = now + st.validity_ms
        self.C[c].next = self.U[u].coupon_head
        self.U[u].coupon_head = c
        self.C[c].next_live = self.U[u].live_head
        self.U[u].live_head = c
        self.C[c].live = 1
        self.U[u].coupon_count += 1
        if self.U[u].coupon_count > self.coupons_per_user_max:
            self.coupons_per_user_max = self.U[u].coupon_count
        index_put(&self.coupons_ix.ix, coupon_id, c)
        st.issued += 1
        return c

    cdef void issue_one(self, const IssueRecord* r, IssueResult* out,
                        int64_t now) noexcept nogil:
        cdef int32_t c, s, u
        memset(out, 0, sizeof(IssueResult))
        out.coupon = r.coupon
        if r.coupon == 0:
            out.status = ST_INVALID_ID
            return
        if r.reserved != 0:
            out.status = ST_INVALID_FLAGS
            return
        c = index_get(&self.coupons_ix.ix, r.coupon)
        if c >= 0:
            if (self.S[self.C[c].stock].id == r.stock
                    and self.U[self.C[c].user].id == r.user):
                out.flags = RESULT_DUPLICATE
                out.expires_at = <uint64_t>self.C[c].expires_at
            else:
                out.status = ST_EXISTS_WITH_DIFFERENT_FIELDS
            return
        s = index_get(&self.stocks_ix.ix, r.stock)
        if s < 0:
            out.status = ST_STOCK_NOT_FOUND
            return
        u = index_get(&self.users_ix.ix, r.user)
        out.status = self.issue_check(s, u, now)
        if out.status != ST_OK:
            return
        c = self.issue_create(r.coupon, s, u, now)
        out.expires_at = <uint64_t>self.C[c].expires_at

    def issue(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """Apply a batch of IssueRecords (raw bytes) at engine time `now`."""
        cdef int64_t n = records.shape[0] // sizeof(IssueRecord)
        if not (1 <= n <= BATCH_RECORDS_MAX):
            raise ValueError("a batch must satisfy 1 <= n <= BATCH_RECORDS_MAX")
        if not (records.shape[0] == n * sizeof(IssueRecord)):
            raise ValueError("a batch must satisfy records.shape[0] == n * sizeof(IssueRecord)")
        if not (out.shape[0] == n * sizeof(IssueResult)):
            raise ValueError("a batch must satisfy out.shape[0] == n * sizeof(IssueResult)")
        self.reserve("coupons", n)
        cdef const IssueRecord* rec = <const IssueRecord*>&records[0]
        cdef IssueResult* res = <IssueResult*>&out[0]
        cdef int64_t i
        with nogil:
            for i in range(n):
                self.issue_one(&rec[i], &res[i], now)
        if KERNEL_DEBUG:
            self.debug_check("issue")
