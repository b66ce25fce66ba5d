# Ledger part 4: membership: points and stamps earned when a payment completes,
# clawed back on refund, and REDEEM_POINTS.


cdef class _Membership(_Issue):
    # -- membership: points, stamps, stats ----------------------------------

    cdef inline bint covers(self, const Program* pg, int32_t m) noexcept nogil:
        cdef const Merchant* mr = &self.M[m]
        cdef int32_t i
        if pg.merchants_count == 0 and pg.tags_count == 0:
            return True
        if pg.merchants_count > 0 and contains_u64(self.LP + pg.list_at,
                                                   pg.merchants_count, mr.id):
            return True
        for i in range(mr.tag_count):
            if contains_u64(self.LP + pg.list_at + pg.merchants_count,
                            pg.tags_count, mr.tags[i]):
                return True
        return False

    cdef int32_t membership(self, int32_t u, int32_t g, bint create) noexcept nogil:
        """The (user, program) row, made on first use when `create`. Found
        on the user's own list (a user is in a few programs), which the PAY
        pipeline prefetches: no hash index, whose insert on a user's first
        payment in a program was a random miss."""
        cdef uint64_t key = <uint64_t>u * PROGRAMS_MAX + <uint64_t>g + 1
        cdef int32_t k = self.U[u].membership_head
        while k >= 0 and self.MS[k].program != g:
            k = self.MS[k].next
        if k >= 0 or not create:
            return k
        k = <int32_t>self.n_memberships
        self.n_memberships += 1
        self.MS[k].key = key
        self.MS[k].points = 0
        self.MS[k].stamps = 0
        self.MS[k].user = u
        self.MS[k].program = g
        self.MS[k].reward = -1
        self.MS[k].next = self.U[u].membership_head
        self.U[u].membership_head = k
        return k

    def find_membership(self, int32_t user, int32_t program):
        """The (user slot, program slot) membership row, or -1."""
        if not (0 <= user < self.n_users and 0 <= program < self.n_programs):
            raise IndexError(f"no wallet {user} or program {program}")
        return self.membership(user, program, False)

    cdef int32_t reward(self, const Program* pg, int32_t u, int64_t now) noexcept nogil:
        """Issue a stamp card's reward coupon, or -1 when the stock can't."""
        cdef uint64_t k
        if self.issue_check(pg.reward_stock, u, now) != ST_OK:
            return -1
        k = <uint64_t>self.n_rewards + 1
        while index_get(&self.coupons_ix.ix, REWARD_ID_BASE + k) >= 0:
            k += 1
        self.n_rewards = <int64_t>k
        index_prefetch(&self.coupons_ix.ix, REWARD_ID_BASE + k + 1)     # the next reward's
        return self.issue_create(REWARD_ID_BASE + k, pg.reward_stock, u, now)

    cdef void complete(self, int32_t p, int64_t now) noexcept nogil:
        """A payment completed (PAY, or CAPTURE): stats, points, stamps."""
        cdef Payment* pm = &self.PM[p]
        self.count_completion(pm, self.visit_count(pm))
        self.earn(p, pm, now)

    cdef inline int64_t visit_count(self, const Payment* pm) noexcept nogil:
        """The payer's payments at this merchant before this one (their
        visit row made on the first), and this one counted."""
        cdef uint64_t key = <uint64_t>pm.user * MERCHANTS_MAX + <uint64_t>pm.merchant + 1
        cdef int32_t v = index_get(&self.visits_ix.ix, key)
        cdef int64_t prior
        if v < 0:
            v = <int32_t>self.n_visits
            self.n_visits += 1
            self.VS[v].key = key
            self.VS[v].payments = 0
            self.VS[v].user = pm.user
            self.VS[v].merchant = pm.merchant
            index_put(&self.visits_ix.ix, key, v)
        prior = self.VS[v].payments
        self.VS[v].payments += 1
        return prior

    cdef inline void count_completion(self, const Payment* pm, int64_t prior) noexcept nogil:
        """STATS of the merchant and of the stocks of the coupons it kept."""
        cdef Merchant* mr = &self.M[pm.merchant]
        cdef bint with_coupon = False
        cdef int32_t i
        cdef Stock* s
        mr.stat_payments += 1
        mr.stat_gmv += pm.amount
        if prior == 0:
            mr.stat_unique_payers += 1
        elif prior == 1:
            mr.stat_repeat_payers += 1
        for i in range(pm.coupon_count):
            if (pm.released >> i) & 1:
                continue
            with_coupon = True
            s = &self.S[self.C[pm.coupon[i]].stock]
            s.stat_redeemed += 1
            s.stat_gmv += pm.amount
            if prior == 0:
                s.stat_payers_new += 1
            else:
                s.stat_payers_returning += 1
        if with_coupon:
            mr.stat_coupon_payments += 1

    cdef inline void earn(self, int32_t p, Payment* pm, int64_t now) noexcept nogil:
        """One earning row per program covering the merchant, in program id
        order: points on the cash, or a stamp (and at a full card, the
        reward coupon)."""
        cdef int32_t j, g, e
        cdef int64_t points
        cdef Program* pg
        pm.earn_at = <int32_t>self.n_earnings
        pm.earn_count = 0
        for j in range(self.n_programs):
            g = self.PO[j]                  # in program id order
            pg = &self.PG[g]
            if not self.covers(pg, pm.merchant):
                continue
            e = <int32_t>self.n_earnings
            self.n_earnings += 1
            pm.earn_count += 1
            self.EA[e].points = 0
            self.EA[e].clawed = 0
            self.EA[e].payment = p
            self.EA[e].program = g
            self.EA[e].stamped = 0
            if pg.kind == 0:
                points = pm.cash * pg.rate // 100      # <= 10**18
                self.EA[e].points = points
                if points > 0:
                    self.MS[self.membership(pm.user, g, True)].points += points
                    self.M[pm.merchant].stat_points_issued += points
            elif pm.amount >= pg.threshold:
                self.EA[e].stamped = 1
                self.stamp(pg, self.membership(pm.user, g, True), pm.user, now)

    cdef inline void stamp(self, const Program* pg, int32_t k, int32_t user,
                           int64_t now) noexcept nogil:
        """One stamp on membership k; a full card issues the reward coupon."""
        cdef int32_t c
        self.MS[k].stamps += 1
        if self.MS[k].stamps >= pg.stamps:
            c = self.reward(pg, user, now)
            if c >= 0:
                self.MS[k].stamps = 0
                self.MS[k].reward = c
            else:                   # the card stays full until it can
                self.MS[k].stamps = pg.stamps

    cdef void claw_back(self, int32_t p, int64_t refunded, int64_t now) noexcept nogil:
        """A refund takes back its share of points; a full one, the stamp."""
        cdef Payment* pm = &self.PM[p]
        cdef Earning* ea
        cdef Program* pg
        cdef int32_t e, k, r
        cdef int64_t target
        for e in range(pm.earn_at, pm.earn_at + pm.earn_count):
            ea = &self.EA[e]
            pg = &self.PG[ea.program]
            if pg.kind == 0:
                if ea.points > 0:
                    target = share_of(refunded, ea.points, pm.amount)
                    k = self.membership(pm.user, ea.program, False)
                    self.MS[k].points -= target - ea.clawed
                    ea.clawed = target
            elif ea.stamped and refunded == pm.amount:
                k = self.membership(pm.user, ea.program, False)
                r = self.MS[k].reward
                if self.MS[k].stamps > 0:
                    self.MS[k].stamps -= 1
                elif self.MS[k].stamps == 0 and r >= 0 and self.C[r].state == COUPON_AVAILABLE:
                    if self.C[r].expires_at > now:
                        self.C[r].expires_at = now
                    self.MS[k].stamps = pg.stamps - 1
                    self.MS[k].reward = -1
                else:
                    self.MS[k].stamps -= 1
                    self.MS[k].reward = -1

    def redeem(self, uint64_t coupon_id, uint64_t user_id, uint64_t program_id,
               uint64_t stock_id, int64_t price, int64_t now):
        """REDEEM_POINTS for one item: (status, duplicate, expires_at, points).
        `price` is the program's offer for the stock, -1 when not offered."""
        cdef int32_t r, c, g, s, u, k
        cdef int st
        if coupon_id == 0:
            return ST_INVALID_ID, False, 0, 0
        r = index_get(&self.redemptions_ix.ix, coupon_id)
        c = index_get(&self.coupons_ix.ix, coupon_id)
        if r >= 0:
            same = (self.U[self.RD[r].user].id == user_id
                    and self.PG[self.RD[r].program].id == program_id
                    and self.S[self.C[c].stock].id == stock_id)
            if not same:
                return ST_EXISTS_WITH_DIFFERENT_FIELDS, False, 0, 0
            k = self.membership(self.RD[r].user, self.RD[r].program, False)
            return ST_OK, True, self.C[c].expires_at, self.MS[k].points
        if c >= 0:
            return ST_EXISTS_WITH_DIFFERENT_FIELDS, False, 0, 0
        g = index_get(&self.programs_ix.ix, program_id) if program_id else -1
        if g < 0 or self.PG[g].kind != 0:
            return ST_PROGRAM_NOT_FOUND, False, 0, 0
        if price < 0:
            return ST_OFFER_NOT_FOUND, False, 0, 0
        s = index_get(&self.stocks_ix.ix, stock_id)
        assert s >= 0, "an offer names a known stock"
        u = index_get(&self.users_ix.ix, user_id) if user_id else -1
        st = self.issue_check(s, u, now)
        if st != ST_OK:
            return st, False, 0, 0
        k = self.membership(u, g, False)
        if k < 0 or self.MS[k].points < price:
            return ST_INSUFFICIENT_POINTS, False, 0, 0
        self.reserve("coupons", 1)
        self.reserve("redemptions", 1)
        self.MS[k].points -= price
        c = self.issue_create(coupon_id, s, u, now)
        r = <int32_t>self.n_redemptions
        self.n_redemptions += 1
        self.RD[r].coupon = coupon_id
        self.RD[r].price = price
        self.RD[r].user = u
        self.RD[r].program = g
        index_put(&self.redemptions_ix.ix, coupon_id, r)
        return ST_OK, False, self.C[c].expires_at, self.MS[k].points
