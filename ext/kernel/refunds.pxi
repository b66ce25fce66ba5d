# Ledger part 7: REFUND and REVERSE.


cdef class _Refunds(_Lifecycle):
    # -- refunds and reversals --------------------------------------------

    cdef void refund_parts(self, int32_t p, int64_t amount, int64_t now, int64_t* cash_out,
                           int64_t* discount_out, int64_t* fee_out) noexcept nogil:
        """Refund `amount` more of payment p: each part grows to its
        cumulative floor share, so partial refunds add up to a full one."""
        cdef Payment* pm = &self.PM[p]
        cdef Merchant* mr = &self.M[pm.merchant]
        cdef int64_t r = pm.refunded_amount + amount, t = pm.amount
        cdef int64_t cash, fee, part, discount = 0
        cdef int32_t i, c
        cdef Stock* s
        cdef int64_t before = 0
        if KERNEL_DEBUG:
            before = self.posting_sum(pm.user, pm.merchant, pm.coupon, pm.coupon_count)
        cash = share_of(r, pm.cash, t) - pm.refunded_cash
        fee = share_of(r, pm.fee, t) - pm.refunded_fee
        mr.balance -= cash
        self.U[pm.user].balance += cash
        for i in range(pm.coupon_count):
            if (pm.released >> i) & 1:
                continue
            part = share_of(r, pm.applied[i], t) - pm.refunded_part[i]
            pm.refunded_part[i] += part
            discount += part
            s = &self.S[self.C[pm.coupon[i]].stock]
            s.spent -= part
            self.count_day(s, pm.day, -part)
            if s.funder == FUNDER_PLATFORM:
                s.campaign += part
                mr.balance -= part
                mr.refund_platform_discount += part
            else:
                mr.refund_merchant_discount += part
        self.fees -= fee
        mr.balance += fee
        mr.refund_cash += cash
        mr.refund_fee += fee
        mr.period_active = 1
        pm.refunded_amount = r
        pm.refunded_cash += cash
        pm.refunded_fee += fee
        self.claw_back(p, r, now)
        if r == t:
            pm.state = PAYMENT_REFUNDED
            for i in range(pm.coupon_count):
                if not (pm.released >> i) & 1:
                    c = pm.coupon[i]
                    self.make_available(c)
                    self.S[self.C[c].stock].stat_redeemed -= 1
        else:
            pm.state = PAYMENT_PARTIALLY_REFUNDED
        if KERNEL_DEBUG:
            self.check_posting(before, pm.user, pm.merchant, pm.coupon, pm.coupon_count)
        cash_out[0] = cash
        discount_out[0] = discount
        fee_out[0] = fee

    cdef int refund_one(self, uint64_t refund_id, uint64_t payment_id, int64_t amount,
                        int64_t now, Refund* out) noexcept nogil:
        cdef int32_t f, p
        memset(out, 0, sizeof(Refund))
        out.id = refund_id
        out.payment = payment_id
        out.amount = amount
        if refund_id == 0:
            return ST_INVALID_ID
        if amount < 1 or amount > AMOUNT_MAX:
            return ST_INVALID_AMOUNT
        f = index_get(&self.refunds_ix.ix, refund_id)
        if f >= 0:
            if self.RF[f].payment != payment_id or self.RF[f].amount != amount:
                return ST_EXISTS_WITH_DIFFERENT_FIELDS
            out[0] = self.RF[f]
            return -1                           # a replay
        p = index_get(&self.payments_ix.ix, payment_id)
        if p < 0:
            return ST_PAYMENT_NOT_FOUND
        if self.PM[p].state != PAYMENT_COMPLETED and self.PM[p].state != PAYMENT_PARTIALLY_REFUNDED:
            return ST_PAYMENT_NOT_REFUNDABLE
        if amount > self.PM[p].amount - self.PM[p].refunded_amount:
            return ST_REFUND_EXCEEDS_PAYMENT
        self.refund_parts(p, amount, now, &out.cash, &out.discount, &out.fee)
        f = <int32_t>self.n_refunds
        self.n_refunds += 1
        self.RF[f] = out[0]
        index_put(&self.refunds_ix.ix, refund_id, f)
        return ST_OK

    cdef int reverse_one(self, uint64_t payment_id, int64_t now, PayResult* out) noexcept nogil:
        cdef int32_t p, t
        cdef Payment* pm
        memset(out, 0, sizeof(PayResult))
        out.id = payment_id
        out.timestamp = <uint64_t>now
        if payment_id == 0:
            return ST_INVALID_ID
        p = index_get(&self.payments_ix.ix, payment_id)
        if p < 0:
            if index_get(&self.tombstones_ix.ix, payment_id) < 0:
                t = <int32_t>self.n_tombstones
                self.n_tombstones += 1
                self.TS[t].id = payment_id
                index_put(&self.tombstones_ix.ix, payment_id, t)
            return ST_OK
        pm = &self.PM[p]
        if pm.state == PAYMENT_AUTHORIZED:
            self.release(p, PAYMENT_VOIDED, now)
            pm.reversed = 1
            self.result_of(p, out, True, now)
        elif pm.state == PAYMENT_COMPLETED or pm.state == PAYMENT_PARTIALLY_REFUNDED:
            self.result_of(p, out, False, now)
            self.refund_parts(p, pm.amount - pm.refunded_amount, now, &out.cash,
                              &out.discount, &out.fee)
            pm.reversed = 1
        return ST_OK

    def reverse(self, const uint64_t[::1] payments, int64_t now, uint8_t[::1] out):
        cdef int64_t n = payments.shape[0], i
        if not (out.shape[0] == n * sizeof(PayResult)):
            raise ValueError("a batch must satisfy out.shape[0] == n * sizeof(PayResult)")
        self.reserve("tombstones", n)
        cdef PayResult* res = <PayResult*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                res[i].status = self.reverse_one(payments[i], now, &res[i])
        if KERNEL_DEBUG:
            self.debug_check("reverse")

    def refund(self, const uint64_t[::1] ids, const uint64_t[::1] payments,
               const int64_t[::1] amounts, int64_t now, uint8_t[::1] out,
               int32_t[::1] status):
        """Refunds; status[i] is a status code, or -1 for a replay."""
        cdef int64_t n = ids.shape[0], i
        if not (payments.shape[0] == n and amounts.shape[0] == n and status.shape[0] == n):
            raise ValueError("a batch must satisfy payments.shape[0] == n and amounts.shape[0] == n and status.shape[0] == n")
        if not (out.shape[0] == n * sizeof(Refund)):
            raise ValueError("a batch must satisfy out.shape[0] == n * sizeof(Refund)")
        self.reserve("refunds", n)
        cdef Refund* res = <Refund*>&out[0] if n else NULL
        with nogil:
            for i in range(n):
                status[i] = self.refund_one(ids[i], payments[i], amounts[i], now, &res[i])
        if KERNEL_DEBUG:
            self.debug_check("refund")

    def refund_records(self, const uint8_t[::1] records, int64_t now, uint8_t[::1] out):
        """REFUND_RECORDS: a batch of RefundRecords -> RefundResults."""
        cdef int64_t n = records.shape[0] // sizeof(RefundRecord), i
        if not (1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(RefundResult)):
            raise ValueError("a batch must satisfy 1 <= n <= BATCH_RECORDS_MAX and out.shape[0] == n * sizeof(RefundResult)")
        self.reserve("refunds", n)
        cdef const RefundRecord* rec = <const RefundRecord*>&records[0]
        cdef RefundResult* res = <RefundResult*>&out[0]
        cdef Refund row
        cdef int st
        with nogil:
            for i in range(n):
                memset(&res[i], 0, sizeof(RefundResult))
                res[i].id = rec[i].id
                if rec[i].id != 0 and 1 <= rec[i].amount <= AMOUNT_MAX and rec[i].reserved != 0:
                    res[i].status = ST_INVALID_FLAGS
                    continue
                st = self.refund_one(rec[i].id, rec[i].payment, rec[i].amount, now, &row)
                if st > 0:
                    res[i].status = st
                    continue
                res[i].flags = RESULT_DUPLICATE if st < 0 else 0
                res[i].cash = row.cash
                res[i].discount = row.discount
                res[i].fee = row.fee
        if KERNEL_DEBUG:
            self.debug_check("refund_records")
