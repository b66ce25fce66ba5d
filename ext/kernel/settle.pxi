# Ledger part 8: SETTLE: close the period and pay merchants out to the bank.


cdef class _Settle(_Refunds):
    def settle(self):
        """Close the period: one row per merchant with activity, by merchant
        id; pays out positive balances to the bank."""
        cdef Merchant* mr
        cdef int64_t refunds, net, payout
        rows = []
        active = [m for m in range(self.n_merchants) if self.M[m].period_active]
        active.sort(key=lambda m: self.M[m].id)
        for m in active:
            mr = &self.M[<int32_t>m]
            refunds = mr.refund_cash + mr.refund_platform_discount - mr.refund_fee
            net = mr.gross - mr.merchant_discount - mr.fees - refunds
            assert net == mr.balance - mr.settled_balance, "settlement does not reconcile"
            payout = mr.balance if mr.balance > 0 else 0
            rows.append({"merchant": mr.id, "gross": mr.gross,
                         "merchant_discount": mr.merchant_discount,
                         "platform_discount": mr.platform_discount, "fees": mr.fees,
                         "refund_cash": mr.refund_cash,
                         "refund_platform_discount": mr.refund_platform_discount,
                         "refund_merchant_discount": mr.refund_merchant_discount,
                         "refund_fee": mr.refund_fee, "refunds": refunds, "net": net,
                         "payout": payout})
            mr.balance -= payout
            self.bank += payout
            mr.settled_balance = mr.balance
            mr.gross = mr.merchant_discount = mr.platform_discount = mr.fees = 0
            mr.refund_cash = mr.refund_platform_discount = 0
            mr.refund_merchant_discount = mr.refund_fee = 0
            mr.period_active = 0
        if KERNEL_DEBUG:
            self.debug_check("settle", True)
        return rows
