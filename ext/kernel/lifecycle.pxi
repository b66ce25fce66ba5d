# Ledger part 6: the two-phase lifecycle: holds, CAPTURE, VOID and expiry.


cdef class _Lifecycle(_Pay):
    # -- two-phase payments -------------------------------------------------

    cdef inline void make_available(self, int32_t c) noexcept nogil:
        """A coupon back to available (released, or returned by a full
        refund): on its user's live list again if the walk had dropped it."""
        cdef int32_t u = self.C[c].user
        self.C[c].state = COUPON_AVAILABLE
        self.C[c].payment = -1
        if not self.C[c].live:
            self.C[c].next_live = self.U[u].live_head
            self.U[u].live_head = c
            self.C[c].live = 1

    cdef void release(self, int32_t p, uint8_t state, int64_t now) noexcept nogil:
        """Void an authorization: the hold, the coupons and their reservation."""
        cdef Payment* pm = &self.PM[p]
        cdef int32_t i, c
        cdef int64_t before = 0
        if KERNEL_DEBUG:
            before = self.posting_sum(pm.user, pm.merchant, pm.coupon, pm.coupon_count)
        self.U[pm.user].held -= pm.cash
        for i in range(pm.coupon_count):
            c = pm.coupon[i]
            self.S[self.C[c].stock].reserved -= pm.applied[i]
            self.count_day(&self.S[self.C[c].stock], pm.day, -pm.applied[i])
            self.make_available(c)
        pm.state = state
        pm.ended_at = now
        if KERNEL_DEBUG:
            self.check_posting(before, pm.user, pm.merchant, pm.coupon, pm.coupon_count)

    cdef void expire_due(self, int64_t now) noexcept nogil:
        """Void every authorization whose hold has expired. Holds expire in
        the order they were made (hold_ms is one engine setting), so a FIFO
        of authorizations finds them without a scan."""
        cdef int32_t p
        while self.auth_head < self.n_auth:
            p = self.AQ[self.auth_head]
            if self.PM[p].state == PAYMENT_AUTHORIZED:
                if self.PM[p].hold_expires_at > now:
                    return
                self.release(p, PAYMENT_EXPIRED, self.PM[p].hold_expires_at)
            self.auth_head += 1

    def expire(self, int64_t now):
        """Apply expiry of holds at engine time `now` (every command does)."""
        self.expire_due(now)
        if KERNEL_DEBUG:
            self.debug_check("expire")

    def expiry_due(self, int64_t now):
        """Whether some hold has expired at `now` (read-only)."""
        cdef int64_t i = self.auth_head
        cdef int32_t p
        while i < self.n_auth:
            p = self.AQ[i]
            if self.PM[p].state == PAYMENT_AUTHORIZED:
                return self.PM[p].hold_expires_at <= now
            i += 1
        return False

    cdef void result_of(self, int32_t p, PayResult* out, bint released_only,
                        int64_t timestamp) noexcept nogil:
        """A PayResult from a payment's current parts (capture, void replays)."""
        cdef Payment* pm = &self.PM[p]
        cdef int32_t i, k = 0
        memset(out, 0, sizeof(PayResult))
        out.id = self.PQ[p].id
        out.cash = pm.cash
        out.discount = pm.discount
        out.timestamp = <uint64_t>timestamp
        for i in range(pm.coupon_count):
            if released_only or not (pm.released >> i) & 1:
                out.coupons[k] = self.C[pm.coupon[i]].id
                k += 1

    cdef int capture_one(self, uint64_t payment_id, int64_t amount, int64_t now,
                         PayResult* out) noexcept nogil:
        cdef int32_t p = index_get(&self.payments_ix.ix, payment_id)
        cdef Payment* pm
        cdef int64_t merchant_discount = 0, total
        cdef int64_t applied[COUPONS_PER_PAYMENT_MAX]
        cdef int st
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        pm = &self.PM[p]
        if pm.authorized_amount == 0 or pm.state == PAYMENT_VOIDED:
            return ST_PAYMENT_NOT_AUTHORIZED
        if pm.state == PAYMENT_EXPIRED:
            return ST_AUTHORIZATION_EXPIRED
        if pm.state != PAYMENT_AUTHORIZED:      # captured: replay the same capture
            if amount != pm.amount:
                return ST_PAYMENT_NOT_AUTHORIZED
            self.result_of(p, out, False, pm.completed_at)
            out.fee = pm.fee
            out.flags = RESULT_DUPLICATE
            return ST_OK
        if amount < 1 or amount > pm.authorized_amount:
            return ST_INVALID_AMOUNT
        total = self.capture_priced(pm, amount, applied, &merchant_discount)
        st = self.capture_post(p, pm, amount, applied, total, merchant_discount, now)
        if st != ST_OK:
            return st
        self.result_of(p, out, False, now)
        out.fee = pm.fee
        return ST_OK

    cdef inline int64_t capture_priced(self, const Payment* pm, int64_t amount,
                                       int64_t* applied,
                                       int64_t* merchant_discount) noexcept nogil:
        """The coupons again on the final amount, in their applied order
        (into applied[], the merchant-funded part added to
        merchant_discount); the total discount. Time, scope and controls
        are not re-checked, and no coupon spends more than it reserved."""
        cdef int32_t i
        cdef int64_t d, a, left = amount
        cdef const Stock* s
        for i in range(pm.coupon_count):
            s = &self.S[self.C[pm.coupon[i]].stock]
            d = discount_of(s, amount) if amount >= s.min_spend else 0
            if d > pm.applied[i]:       # never spend more than was reserved
                d = pm.applied[i]
            a = d if d < left else left
            applied[i] = a
            left -= a
            if s.funder == FUNDER_MERCHANT:
                merchant_discount[0] += a
        return amount - left

    cdef inline int capture_post(self, int32_t p, Payment* pm, int64_t amount,
                                 const int64_t* applied, int64_t total,
                                 int64_t merchant_discount, int64_t now) noexcept nogil:
        """Capture at the re-priced amounts: the hold gives way to the cash,
        the coupons' reservations to their spend, or nothing changes."""
        cdef int32_t m = pm.merchant
        cdef int64_t cash = amount - total, hold = pm.cash, before = 0
        cdef int64_t fee = self.fee_of(amount, merchant_discount, m)
        if self.U[pm.user].balance - (self.U[pm.user].held - hold) < cash:
            return ST_INSUFFICIENT_FUNDS
        if KERNEL_DEBUG:
            before = self.posting_sum(pm.user, m, pm.coupon, pm.coupon_count)
        self.U[pm.user].held -= hold
        self.U[pm.user].balance -= cash
        self.capture_coupons(pm, applied)
        pm.amount = amount
        pm.cash = cash
        pm.discount = total
        pm.fee = fee
        pm.completed_at = now
        pm.state = PAYMENT_COMPLETED
        self.post_completion(pm, m, amount, merchant_discount, total - merchant_discount, fee)
        self.complete(p, now)
        if KERNEL_DEBUG:
            self.check_posting(before, pm.user, m, pm.coupon, pm.coupon_count)
        return ST_OK

    cdef inline void capture_coupons(self, Payment* pm, const int64_t* applied) noexcept nogil:
        """Each coupon's reservation to its spend at its new amount; one
        that applies nothing now is released (available again)."""
        cdef int32_t i, c
        cdef Stock* s
        for i in range(pm.coupon_count):
            c = pm.coupon[i]
            s = &self.S[self.C[c].stock]
            s.reserved -= pm.applied[i]
            self.count_day(s, pm.day, applied[i] - pm.applied[i])
            pm.applied[i] = applied[i]
            if applied[i] == 0:
                pm.released |= 1 << i
                self.make_available(c)
                continue
            self.C[c].state = COUPON_USED
            s.spent += applied[i]
            if s.funder == FUNDER_PLATFORM:
                s.campaign -= applied[i]

    cdef int void_one(self, uint64_t payment_id, int64_t now, PayResult* out) noexcept nogil:
        cdef int32_t p = index_get(&self.payments_ix.ix, payment_id)
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        if self.PM[p].state == PAYMENT_VOIDED:
            self.result_of(p, out, True, self.PM[p].ended_at)
            out.flags = RESULT_DUPLICATE
            return ST_OK
        if self.PM[p].state == PAYMENT_EXPIRED:
            return ST_AUTHORIZATION_EXPIRED
        if self.PM[p].state != PAYMENT_AUTHORIZED:
            return ST_PAYMENT_NOT_AUTHORIZED
        self.release(p, PAYMENT_VOIDED, now)
        self.result_of(p, out, True, now)
        return ST_OK

    # -- batch entry points of the money lifecycle -------------------------

    def capture(self, const uint64_t[::1] payments, const int64_t[::1] amounts,
                int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        if not (amounts.shape[0] == n and out.shape[0] == n * sizeof(PayResult)):
            raise ValueError("a batch must satisfy amounts.shape[0] == n and out.shape[0] == n * sizeof(PayResult)")
        self.reserve_completions(n)
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                res[i].status = self.capture_one(payments[i], amounts[i], now, &res[i])
        if KERNEL_DEBUG:
            self.debug_check("capture")

    def void(self, const uint64_t[::1] payments, int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        if not (out.shape[0] == n * sizeof(PayResult)):
            raise ValueError("a batch must satisfy out.shape[0] == n * sizeof(PayResult)")
        with nogil:
            for i in range(n):
                res[i].status = self.void_one(payments[i], now, &res[i])
        if KERNEL_DEBUG:
            self.debug_check("void")

    def capture_records(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """CAPTURE_RECORDS: a batch of CaptureRecords -> PayResults."""
        cdef int64_t n = records.shape[0] // sizeof(CaptureRecord), i
        if not (1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(PayResult)):
            raise ValueError("a batch must satisfy 1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(PayResult)")
        self.reserve_completions(n)
        cdef const CaptureRecord* rec = <const CaptureRecord*>&records[0]
        cdef PayResult* res = <PayResult*>&out[0]
        with nogil:
            for i in range(n):
                res[i].status = self.capture_one(rec[i].payment, rec[i].amount, now, &res[i])
        if KERNEL_DEBUG:
            self.debug_check("capture_records")
