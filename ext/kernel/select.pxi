# Ledger part 2: which coupons a payment may use and which it uses (PAY steps
# 2-5): scope, time slots, limits, automatic and explicit selection.


cdef inline void auto_choose(const Cand* cands, int32_t best_ex, const int32_t* top,
                             int32_t top_count, int64_t amount, Selection* sel) noexcept nogil:
    """Step 5, automatic mode: the best exclusive coupon alone, or the
    smallest stack of the top stackable ones whose discounts reach the
    amount, whichever discounts more (a tie: fewer coupons, then rank).
    At least one candidate (best_ex >= 0 or top_count > 0)."""
    cdef int32_t i, k = 0
    cdef int64_t stack_sum = 0, stack_total, ex_total
    cdef bint take_ex
    for i in range(top_count):
        stack_sum += cands[top[i]].d
        k = i + 1
        if stack_sum >= amount:
            break
    stack_total = stack_sum if stack_sum < amount else amount
    ex_total = cands[best_ex].d if best_ex >= 0 else 0
    if best_ex < 0:
        take_ex = False
    elif top_count == 0:
        take_ex = True
    elif ex_total != stack_total:
        take_ex = ex_total > stack_total
    elif k != 1:
        take_ex = True                  # fewer coupons
    else:
        take_ex = ranks_before(&cands[best_ex], &cands[top[0]])
    if take_ex:
        sel.count = 1
        sel.slot[0] = cands[best_ex].slot
        sel.d[0] = cands[best_ex].d
    else:
        sel.count = k
        for i in range(k):
            sel.slot[i] = cands[top[i]].slot
            sel.d[i] = cands[top[i]].d


cdef inline void apportion(Selection* sel, int64_t amount) noexcept nogil:
    """Step 5: each selected coupon applies min(d, what is left of the
    amount), in selection order; the total is what they took."""
    cdef int32_t i
    cdef int64_t a, left = amount
    for i in range(sel.count):
        a = sel.d[i] if sel.d[i] < left else left
        sel.applied[i] = a
        left -= a
    sel.total = amount - left


cdef class _Select(_Invariants):
    # -- rules ------------------------------------------------------------

    cdef inline Clock clock_at(self, int64_t now) noexcept nogil:
        cdef Clock t
        cdef int64_t local = now + self.tz_offset_ms
        cdef int64_t day = local / DAY_MS
        cdef int64_t ms_of_day = local - day * DAY_MS
        if ms_of_day < 0:                   # floor division for local < 0
            ms_of_day += DAY_MS
            day -= 1
        t.now = now
        t.day = day
        t.weekday = <int32_t>(((day + 3) % 7 + 7) % 7)  # 1970-01-01 was a Thursday
        t.minute = <int32_t>(ms_of_day / MINUTE_MS)
        return t

    cdef inline bint in_scope(self, const Stock* s, int32_t m) noexcept nogil:
        cdef const Merchant* mr = &self.M[m]
        cdef int32_t i
        if s.funder == FUNDER_MERCHANT:
            return s.merchant == m
        if s.merchants_count == 0 and s.tags_count == 0:
            return True
        if s.merchants_count > 0 and contains_u64(self.LP + s.list_at,
                                                  s.merchants_count, mr.id):
            return True
        for i in range(mr.tag_count):
            if contains_u64(self.LP + s.list_at + s.merchants_count,
                            s.tags_count, mr.tags[i]):
                return True
        return False

    cdef inline bint in_slots(self, const Stock* s, const Clock* t) noexcept nogil:
        cdef int32_t i
        cdef const int32_t* slot
        if s.slots_count == 0:
            return True
        for i in range(s.slots_count):
            slot = self.SP + 3 * (s.slot_at + i)
            if slot[0] == t.weekday and slot[1] <= t.minute < slot[2]:
                return True
        return False

    cdef int check_coupon(self, int32_t c, int32_t m, int64_t amount,
                          uint32_t goods_tag, const Clock* t, bint explicit,
                          int64_t* d_out) noexcept nogil:
        """Steps 4 and 5: whether coupon slot `c` may apply; its d."""
        cdef const Coupon* cp = &self.C[c]
        cdef const Stock* s = &self.S[cp.stock]
        cdef int64_t d = discount_of(s, amount)
        d_out[0] = d
        if cp.state != COUPON_AVAILABLE:
            return ST_COUPON_NOT_AVAILABLE
        if t.now >= cp.expires_at:
            return ST_COUPON_EXPIRED
        # Cheap tests first: all of these give the same status.
        if t.now < s.valid_from or amount < s.min_spend or not self.in_scope(s, m):
            return ST_COUPON_NOT_APPLICABLE
        if s.goods_count > 0 and not contains_u64(
                self.LP + s.list_at + s.merchants_count + s.tags_count,
                s.goods_count, goods_tag):
            return ST_COUPON_NOT_APPLICABLE
        if not self.in_slots(s, t):
            return ST_COUPON_NOT_APPLICABLE
        # A user holding fewer coupons than the limit cannot have reached it:
        # the walk over their coupons is needed only near the limit.
        if (s.per_user_daily_limit > 0
                and self.U[cp.user].coupon_count >= s.per_user_daily_limit
                and self.redeemed_today(cp.user, cp.stock, t.day) >= s.per_user_daily_limit):
            return ST_COUPON_NOT_APPLICABLE
        if not explicit and d < 1:
            return ST_COUPON_NOT_APPLICABLE
        if s.budget > 0 and s.budget - s.spent - s.reserved < d:
            return ST_COUPON_BUDGET_EXHAUSTED
        if s.daily_budget > 0 and (s.day_spent if s.day == t.day else 0) + d > s.daily_budget:
            return ST_COUPON_BUDGET_EXHAUSTED
        return ST_OK

    cdef int64_t redeemed_today(self, int32_t user, int32_t stock,
                                int64_t day) noexcept nogil:
        """Coupons of `stock` the user redeemed in payments of `day` (used or
        locked: a released or refunded coupon no longer counts)."""
        cdef int64_t count = 0
        cdef int32_t c = self.U[user].coupon_head
        while c >= 0:
            if (self.C[c].stock == stock and self.C[c].state != COUPON_AVAILABLE
                    and self.PM[self.C[c].payment].day == day):
                count += 1
            c = self.C[c].next
        return count

    cdef inline void count_day(self, Stock* s, int64_t day, int64_t delta) noexcept nogil:
        """Attribute a change of a stock's net discount to the payment's day;
        changes to payments of days already past move only those days."""
        if day == s.day:
            s.day_spent += delta
        elif day > s.day:
            s.day = day
            s.day_spent = delta

    cdef void select_auto(self, int32_t user, int32_t m, int64_t amount,
                          uint32_t goods_tag, const Clock* t,
                          Selection* sel) noexcept nogil:
        """Step 5, automatic mode: the exact best option."""
        cdef Cand* cands = self.cands_p
        cdef int32_t count, best_ex, top_count = 0
        cdef int32_t top[COUPONS_PER_PAYMENT_MAX]
        self.generation += 1
        count = self.auto_candidates(user, m, amount, goods_tag, t)
        best_ex = self.auto_ranked(cands, count, top, &top_count)
        sel.count = 0
        sel.total = 0
        if best_ex < 0 and top_count == 0:
            return
        auto_choose(cands, best_ex, top, top_count, amount, sel)
        apportion(sel, amount)

    cdef inline int32_t auto_candidates(self, int32_t user, int32_t m, int64_t amount,
                                        uint32_t goods_tag, const Clock* t) noexcept nogil:
        """The candidates (into cands_p; their count), keeping only the
        best-ranked coupon of each stock. The walk is over the live list;
        used coupons met on the way leave it, so a heavy payer's history is
        not walked again on every payment."""
        cdef Cand* cands = self.cands_p
        cdef int32_t count = 0, c, j, prev = -1, nxt
        cdef int64_t d
        cdef Cand cand
        c = self.U[user].live_head
        while c >= 0:
            nxt = self.C[c].next_live
            if self.C[c].state == COUPON_USED:
                if prev < 0:
                    self.U[user].live_head = nxt
                else:
                    self.C[prev].next_live = nxt
                self.C[c].live = 0
                c = nxt
                continue
            prev = c
            if self.check_coupon(c, m, amount, goods_tag, t, False, &d) == ST_OK:
                cand.d = d
                cand.expires_at = self.C[c].expires_at
                cand.id = self.C[c].id
                cand.slot = c
                cand.stock = self.C[c].stock
                if self.stock_mark_p[cand.stock] == self.generation:
                    j = self.stock_cand_p[cand.stock]
                    if ranks_before(&cand, &cands[j]):
                        cands[j] = cand
                else:
                    self.stock_mark_p[cand.stock] = self.generation
                    self.stock_cand_p[cand.stock] = count
                    cands[count] = cand
                    count += 1
            c = nxt
        return count

    cdef inline int32_t auto_ranked(self, const Cand* cands, int32_t count, int32_t* top,
                                    int32_t* top_count) noexcept nogil:
        """The best exclusive candidate (returned, or -1), and the top four
        stackable ones in rank order (into top[:top_count])."""
        cdef int32_t j, i, best_ex = -1
        for j in range(count):
            if self.S[cands[j].stock].stacking == STACKING_EXCLUSIVE:
                if best_ex < 0 or ranks_before(&cands[j], &cands[best_ex]):
                    best_ex = j
                continue
            i = top_count[0] if top_count[0] < COUPONS_PER_PAYMENT_MAX else COUPONS_PER_PAYMENT_MAX
            while i > 0 and ranks_before(&cands[j], &cands[top[i - 1]]):
                if i < COUPONS_PER_PAYMENT_MAX:
                    top[i] = top[i - 1]
                i -= 1
            if i < COUPONS_PER_PAYMENT_MAX:
                top[i] = j
                if top_count[0] < COUPONS_PER_PAYMENT_MAX:
                    top_count[0] += 1
        return best_ex

    cdef int select_explicit(self, const PayRecord* r, int32_t user, int32_t m,
                             const Clock* t, Selection* sel,
                             int32_t* reasons) noexcept nogil:
        """Step 5, explicit mode. Returns the first failing status.

        With `reasons` (QUOTE) every named coupon is checked and its status
        written to reasons[i]; without, the first failure ends the check.
        """
        cdef int32_t held[COUPONS_PER_PAYMENT_MAX]
        cdef int32_t held_count = 0, i, j, c, status = ST_OK, st
        cdef int64_t d
        sel.count = 0
        for i in range(COUPONS_PER_PAYMENT_MAX):
            if r.coupons[i] == 0:
                continue
            c = index_get(&self.coupons_ix.ix, r.coupons[i])
            if c < 0:
                st = ST_COUPON_NOT_FOUND
            elif self.C[c].user != user:
                st = ST_COUPON_NOT_OWNED
            else:
                st = self.check_coupon(c, m, r.amount, r.goods_tag, t, True, &d)
                for j in range(held_count):
                    if st != ST_OK:
                        break
                    if (self.C[held[j]].stock == self.C[c].stock
                            or self.S[self.C[c].stock].stacking == STACKING_EXCLUSIVE
                            or self.S[self.C[held[j]].stock].stacking == STACKING_EXCLUSIVE):
                        st = ST_COUPONS_NOT_STACKABLE
                held[held_count] = c
                held_count += 1
                if st == ST_OK:
                    sel.slot[sel.count] = c
                    sel.d[sel.count] = d
                    sel.count += 1
            if reasons != NULL:
                reasons[i] = st
            if st != ST_OK and status == ST_OK:
                status = st
                if reasons == NULL:
                    return status
        apportion(sel, r.amount)
        return status

    cdef int precheck(self, const PayRecord* r, bint has_id) noexcept nogil:
        """Step 1: checks that need no state."""
        if has_id and r.id == 0:
            return ST_INVALID_ID
        if r.amount < 1 or r.amount > AMOUNT_MAX:
            return ST_INVALID_AMOUNT
        if r.flags & ~(<uint32_t>PAY_FLAGS_KNOWN):
            return ST_INVALID_FLAGS
        if r.flags & PAY_NO_COUPONS and (r.coupons[0] | r.coupons[1]
                                         | r.coupons[2] | r.coupons[3]):
            return ST_INVALID_FLAGS
        return ST_OK

    cdef int resolve(self, const PayRecord* r, int64_t now, int32_t* m,
                     int32_t* user, int32_t* code, int32_t user_guess=-1,
                     int32_t merchant_guess=-1) noexcept nogil:
        """Step 3: merchant, then payer (by user id or payment code). A
        guessed slot whose row holds the id sought is that id's slot (ids are
        unique), which spares a second hash probe."""
        if merchant_guess >= 0 and self.M[merchant_guess].id == r.merchant:
            m[0] = merchant_guess
        else:
            m[0] = index_get(&self.merchants_ix.ix, r.merchant)
        if m[0] < 0:
            return ST_MERCHANT_NOT_FOUND
        if not self.M[m[0]].active:
            return ST_MERCHANT_INACTIVE
        code[0] = -1
        if r.flags & PAY_PAYER_IS_CODE:
            code[0] = index_get(&self.codes_ix.ix, r.payer)
            if (code[0] < 0 or self.K[code[0]].used
                    or now >= self.K[code[0]].expires_at):
                return ST_PAYMENT_CODE_INVALID
            user[0] = self.K[code[0]].user
        elif user_guess >= 0 and self.U[user_guess].id == r.payer:
            user[0] = user_guess
        else:
            user[0] = index_get(&self.users_ix.ix, r.payer)
            if user[0] < 0:
                return ST_PAYER_NOT_FOUND
        return ST_OK

    cdef int select(self, const PayRecord* r, int32_t user, int32_t m,
                    const Clock* t, Selection* sel, int32_t* reasons) noexcept nogil:
        sel.count = 0
        sel.total = 0
        if r.flags & PAY_NO_COUPONS:
            return ST_OK
        if r.coupons[0] | r.coupons[1] | r.coupons[2] | r.coupons[3]:
            return self.select_explicit(r, user, m, t, sel, reasons)
        self.select_auto(user, m, r.amount, r.goods_tag, t, sel)
        return ST_OK
