# Ledger part 5: PAY: the batch apply of PayRecords, its prefetch pipeline, and the
# postings of one payment (cash, discount, fee, merchant and platform shares).


cdef class _Pay(_Membership):
    cdef inline int64_t merchant_funded(self, const Selection* sel) noexcept nogil:
        cdef int64_t total = 0
        cdef int32_t i
        for i in range(sel.count):
            if self.S[self.C[sel.slot[i]].stock].funder == FUNDER_MERCHANT:
                total += sel.applied[i]
        return total

    cdef inline int64_t fee_of(self, int64_t amount, int64_t merchant_discount,
                               int32_t m) noexcept nogil:
        """Step 7: fee = (base * fee_bps + 5000) // 10000, rounded half up."""
        return ((amount - merchant_discount) * self.M[m].fee_bps + 5000) / 10000

    cdef void pay_one(self, const PayRecord* r, PayResult* out,
                      const Clock* t, int32_t user_guess, int32_t merchant_guess) noexcept nogil:
        """Steps 1-7 of docs/reference/rules.md Paying for one record; the guesses are the
        prefetch pipeline's (see resolve)."""
        cdef int32_t m, user, code
        cdef int st
        cdef int64_t cash
        cdef Selection sel
        memset(out, 0, sizeof(PayResult))
        out.id = r.id
        out.timestamp = <uint64_t>t.now
        if self.pay_answered(r, out):
            return
        st = self.resolve(r, t.now, &m, &user, &code, user_guess, merchant_guess)
        if st == ST_OK:
            st = self.select(r, user, m, t, &sel, NULL)
        if st != ST_OK:
            out.status = st
            return
        # Step 6: cash from the wallet's available balance, or nothing changes.
        cash = r.amount - sel.total
        if self.U[user].balance - self.U[user].held < cash:
            out.status = ST_INSUFFICIENT_FUNDS
            return
        self.pay_post(r, out, t, m, user, code, &sel, cash)

    cdef inline bint pay_answered(self, const PayRecord* r, PayResult* out) noexcept nogil:
        """Steps 1 and 2: the checks that need no state, then idempotency by
        payment id (a byte-for-byte replay answers the first result). True
        when `out` holds the answer already; nothing has changed."""
        cdef int32_t p
        cdef int st = self.precheck(r, True)
        if st != ST_OK:
            out.status = st
            return True
        p = index_get(&self.payments_ix.ix, r.id)
        if p >= 0:
            if memcmp(&self.PQ[p], r, sizeof(PayRecord)) == 0:
                out[0] = self.PR[p]
                out.flags |= RESULT_DUPLICATE
            else:
                out.status = ST_EXISTS_WITH_DIFFERENT_FIELDS
            return True
        if index_get(&self.tombstones_ix.ix, r.id) >= 0:
            out.status = ST_REVERSED
            return True
        return False

    cdef inline void pay_post(self, const PayRecord* r, PayResult* out, const Clock* t,
                              int32_t m, int32_t user, int32_t code, const Selection* sel,
                              int64_t cash) noexcept nogil:
        """Step 7 (or, authorizing, the hold): all at once, once steps 1-6
        have passed."""
        cdef bint authorize = r.flags & PAY_AUTHORIZE
        cdef int64_t merchant_discount = self.merchant_funded(sel)
        cdef int64_t fee = self.fee_of(r.amount, merchant_discount, m)
        cdef int64_t before = 0
        cdef int32_t p
        cdef Payment* pm
        if KERNEL_DEBUG:
            before = self.posting_sum(user, m, sel.slot, sel.count)
        p = <int32_t>self.n_payments
        self.n_payments += 1
        out.cash = cash
        out.discount = sel.total
        out.fee = fee
        if authorize:
            out.flags = RESULT_AUTHORIZED
        self.PQ[p] = r[0]
        pm = self.pay_row(p, r.amount, t, user, m, sel, cash, fee)
        self.pay_coupons(p, pm, sel, t.day, authorize, out)
        self.PR[p] = out[0]
        index_put(&self.payments_ix.ix, r.id, p)
        if authorize:
            pm.state = PAYMENT_AUTHORIZED
            pm.authorized_amount = r.amount
            pm.hold_expires_at = t.now + self.hold_ms
            self.U[user].held += cash
            self.AQ[self.n_auth] = p
            self.n_auth += 1
        else:
            pm.state = PAYMENT_COMPLETED
            pm.completed_at = t.now
            self.U[user].balance -= cash
            self.post_completion(pm, m, r.amount, merchant_discount, sel.total - merchant_discount, fee)
            self.complete(p, t.now)
        if code >= 0:
            self.K[code].used = 1
        if KERNEL_DEBUG:
            self.check_posting(before, user, m, sel.slot, sel.count)

    cdef inline Payment* pay_row(self, int32_t p, int64_t amount, const Clock* t,
                                 int32_t user, int32_t m, const Selection* sel,
                                 int64_t cash, int64_t fee) noexcept nogil:
        """The new payment's row, before its coupons and state."""
        cdef Payment* pm = &self.PM[p]      # a zeroed row: see _grown
        cdef int32_t i
        pm.user = user
        pm.merchant = m
        pm.coupon_count = <uint8_t>sel.count
        pm.amount = amount
        pm.cash = cash
        pm.discount = sel.total
        pm.fee = fee
        pm.created_at = t.now
        pm.day = t.day
        for i in range(COUPONS_PER_PAYMENT_MAX):
            pm.coupon[i] = -1
        return pm

    cdef inline void pay_coupons(self, int32_t p, Payment* pm, const Selection* sel,
                                 int64_t day, bint authorize, PayResult* out) noexcept nogil:
        """The selected coupons into the payment: locked and reserved when
        authorizing, else used and spent (a platform stock's campaign pays)."""
        cdef int32_t i, c
        cdef int64_t a
        cdef Stock* s
        for i in range(sel.count):
            c = sel.slot[i]
            a = sel.applied[i]
            out.coupons[i] = self.C[c].id
            pm.applied[i] = a
            pm.coupon[i] = c
            self.C[c].payment = p
            s = &self.S[self.C[c].stock]
            self.count_day(s, day, a)
            if authorize:
                self.C[c].state = COUPON_LOCKED
                s.reserved += a
            else:
                self.C[c].state = COUPON_USED
                s.spent += a
                if s.funder == FUNDER_PLATFORM:
                    s.campaign -= a

    cdef inline void post_completion(self, Payment* pm, int32_t m, int64_t amount,
                                     int64_t merchant_discount, int64_t platform_discount,
                                     int64_t fee) noexcept nogil:
        """Step 7 for the merchant and the fee account, and the period totals
        that settlement reports."""
        cdef Merchant* mr = &self.M[m]
        mr.balance += amount - merchant_discount - fee
        self.fees += fee
        mr.gross += amount
        mr.merchant_discount += merchant_discount
        mr.platform_discount += platform_discount
        mr.fees += fee
        mr.period_active = 1

    def pay(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """Apply a batch of PayRecords (raw bytes) at engine time `now`."""
        cdef int64_t n = records.shape[0] // sizeof(PayRecord)
        if not (1 <= n <= BATCH_RECORDS_MAX):
            raise ValueError("a batch must satisfy 1 <= n <= BATCH_RECORDS_MAX")
        if not (records.shape[0] == n * sizeof(PayRecord)):
            raise ValueError("a batch must satisfy records.shape[0] == n * sizeof(PayRecord)")
        if not (out.shape[0] == n * sizeof(PayResult)):
            raise ValueError("a batch must satisfy out.shape[0] == n * sizeof(PayResult)")
        self.reserve("payments", n)
        self.reserve_completions(n)
        self._reserve_cands()
        cdef const PayRecord* rec = <const PayRecord*>&records[0]
        cdef PayResult* res = <PayResult*>&out[0]
        cdef Clock t = self.clock_at(now)
        cdef int64_t i
        with nogil:
            for i in range(-AHEAD_RECORDS, 0):      # fill the pipeline
                self.prefetch(rec, n, i)
            for i in range(n):
                self.prefetch(rec, n, i)
                self.pay_one(&rec[i], &res[i], &t, self.ahead_user[i & (AHEAD_RECORDS - 1)],
                             self.ahead_merchant[i & (AHEAD_RECORDS - 1)])
        if KERNEL_DEBUG:
            self.debug_check("pay")

    cdef inline void prefetch(self, const PayRecord* rec, int64_t n,
                              int64_t i) noexcept nogil:
        """Overlap the cache misses of later records with this one's work.

        A payment's misses form a chain (index bucket -> wallet row -> coupon
        rows); loading each link a few records ahead keeps many misses in
        flight instead of one. Purely a hint: no state is read for effect.
        Each stage reads only lines an earlier stage prefetched a few records
        ago, so no stage waits on a miss of its own.
        """
        cdef int64_t j
        cdef int32_t user, m
        cdef size_t line
        cdef const PayRecord* r
        if i + 2 * AHEAD_RECORDS < n:            # the records themselves
            __builtin_prefetch(&rec[i + 2 * AHEAD_RECORDS])
        # The rows this batch appends (reserved before the loop): a stream
        # of first writes, fetched a few payments ahead.
        if i + AHEAD_RECORDS < n:
            for line in range(0, sizeof(Payment), 64):
                prefetch_for_write(<const char*>&self.PM[self.n_payments + AHEAD_RECORDS] + line)
            if self.n_programs:
                prefetch_for_write(&self.EA[self.n_earnings + AHEAD_RECORDS * self.n_programs])
        j = i + AHEAD_RECORDS - 1
        if 0 <= j < n:
            r = &rec[j]
            index_prefetch(&self.payments_ix.ix, r.id)
            if not (r.flags & PAY_PAYER_IS_CODE):
                index_prefetch(&self.users_ix.ix, r.payer)
        j = i + 10
        if 0 <= j < n:
            r = &rec[j]
            user = -1 if r.flags & PAY_PAYER_IS_CODE else index_guess(&self.users_ix.ix, r.payer)
            self.ahead_user[j & (AHEAD_RECORDS - 1)] = user
            self.ahead_merchant[j & (AHEAD_RECORDS - 1)] = index_guess(
                &self.merchants_ix.ix, r.merchant)
            if user >= 0:
                prefetch_row(&self.U[user], sizeof(User))
            m = self.ahead_merchant[j & (AHEAD_RECORDS - 1)]
            if m >= 0:          # a payment touches most of its merchant's row
                for line in range(0, sizeof(Merchant), 64):
                    __builtin_prefetch(<const char*>&self.M[m] + line)
        j = i + 6
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 0)
                self.prefetch_completion(user, self.ahead_merchant[j & (AHEAD_RECORDS - 1)], False)
        j = i + 3
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 1)
                self.prefetch_completion(user, self.ahead_merchant[j & (AHEAD_RECORDS - 1)], True)
        j = i + 1
        if 0 <= j < n:
            user = self.ahead_user[j & (AHEAD_RECORDS - 1)]
            if user >= 0:
                self.prefetch_coupon(user, 2)

    cdef inline void prefetch_coupon(self, int32_t user, int32_t skip) noexcept nogil:
        """Prefetch the user's coupon `skip` links down the list; the links
        before it were prefetched by earlier stages."""
        cdef int32_t c = self.U[user].live_head
        while c >= 0 and skip > 0:
            c = self.C[c].next_live
            skip -= 1
        if c >= 0:
            prefetch_row(&self.C[c], sizeof(Coupon))

    cdef inline void prefetch_completion(self, int32_t user, int32_t m,
                                         bint rows) noexcept nogil:
        """The visit and membership lines a completion will touch: their
        index buckets first, their rows (by the bucket's guess) later."""
        cdef int32_t g, k
        cdef uint64_t key
        if m < 0:
            return
        key = <uint64_t>user * MERCHANTS_MAX + <uint64_t>m + 1
        if rows:
            k = index_guess(&self.visits_ix.ix, key)
            if k >= 0:
                prefetch_row(&self.VS[k], sizeof(Visit))
        else:
            index_prefetch(&self.visits_ix.ix, key)
        # The user's memberships, one link per stage (most users have one
        # or two): the wallet row, loaded by now, holds the first.
        k = self.U[user].membership_head
        if rows and k >= 0:
            k = self.MS[k].next
        if k >= 0:
            prefetch_row(&self.MS[k], sizeof(Membership))
