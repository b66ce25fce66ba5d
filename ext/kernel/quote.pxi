# Ledger part 9: QUOTE: PAY's computation for one record, with no effect.


cdef class _Quote(_Settle):
    def quote(self, const uint8_t[::1] record, int64_t now):
        """PAY's computation for one PayRecord, with no effect.

        Returns (status, cash, discount, fee, coupon ids, explain) where
        explain is [(coupon id, stock id, discount, reason)] by coupon id and
        reason is a status code, REASON_APPLIED or REASON_NOT_CHOSEN.
        """
        if not (record.shape[0] == sizeof(PayRecord)):
            raise ValueError("a batch must satisfy record.shape[0] == sizeof(PayRecord)")
        self._reserve_cands()
        cdef const PayRecord* r = <const PayRecord*>&record[0]
        cdef Clock t = self.clock_at(now)
        cdef Selection sel
        cdef int32_t reasons[COUPONS_PER_PAYMENT_MAX]
        cdef int32_t m, user, code, c, i
        cdef int64_t d, cash = 0, fee = 0
        cdef int st = self.precheck(r, False)
        if st == ST_OK:
            st = self.resolve(r, now, &m, &user, &code)
        if st != ST_OK:
            return st, 0, 0, 0, [], []
        for i in range(COUPONS_PER_PAYMENT_MAX):
            reasons[i] = ST_OK
        st = self.select(r, user, m, &t, &sel, reasons)
        if st == ST_OK:
            cash = r.amount - sel.total
            fee = self.fee_of(r.amount, self.merchant_funded(&sel), m)
            if self.U[user].balance - self.U[user].held < cash:
                st = ST_INSUFFICIENT_FUNDS
        applied = {}
        if st in (ST_OK, ST_INSUFFICIENT_FUNDS):
            for i in range(sel.count):
                applied[sel.slot[i]] = sel.applied[i]
        explicit = not (r.flags & PAY_NO_COUPONS) and bool(
            r.coupons[0] | r.coupons[1] | r.coupons[2] | r.coupons[3])
        named = {}
        if explicit:
            for i in range(COUPONS_PER_PAYMENT_MAX):
                c = index_get(&self.coupons_ix.ix, r.coupons[i]) if r.coupons[i] else -1
                if c >= 0 and self.C[c].user == user:
                    if named.get(c, ST_OK) == ST_OK:
                        named[c] = reasons[i]
        explain = []
        for c in self.user_coupon_slots(user):
            d = discount_of(&self.S[self.C[c].stock], r.amount)
            if c in applied:
                reason, d = REASON_APPLIED, applied[c]
            elif r.flags & PAY_NO_COUPONS:
                reason = REASON_NOT_CHOSEN
            elif explicit:
                reason = named.get(c, REASON_NOT_CHOSEN) or REASON_NOT_CHOSEN
            else:
                reason = self.check_coupon(c, m, r.amount, r.goods_tag, &t, False, &d)
                reason = reason or REASON_NOT_CHOSEN
            explain.append((self.C[c].id, self.S[self.C[c].stock].id, d, reason))
        explain.sort()
        if st not in (ST_OK, ST_INSUFFICIENT_FUNDS):
            return st, 0, 0, 0, [], explain
        coupons = [self.C[sel.slot[i]].id for i in range(sel.count)]
        return st, cash, sel.total, fee, coupons, explain
