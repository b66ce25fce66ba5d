"""The naive in-memory Python ledger: dicts, one caller, no durability.
The floor any "some code" solution starts from, and a second, independent
reading of the rule subset (it must end identical to Scanpay)."""
from __future__ import annotations

from .common import Run, one_at_a_time
from .workload import FinalState, Payment, Workload, best_coupon, fee_of, tally


class Ledger:
    def __init__(self, wl: Workload):
        self.stocks = wl.stocks
        self.fee_bps = dict(wl.merchants)
        self.balance = dict(wl.users)
        self.merchant = dict.fromkeys(wl.merchants, 0)
        self.spent = dict.fromkeys(wl.stocks, 0)
        self.held: dict[int, set[int]] = {}            # user -> unused coupon ids
        self.coupon_stock = {}
        for cid, (sid, uid) in wl.coupons.items():
            self.held.setdefault(uid, set()).add(cid)
            self.coupon_stock[cid] = sid
        self.used: dict[int, int] = {}
        self.payments: dict[int, Payment] = {}
        self.fees = 0

    def pay(self, p: Payment) -> str:
        seen = self.payments.get(p.id)
        if seen is not None:
            return "duplicate" if seen == p else "exists_with_different_fields"
        if p.merchant not in self.fee_bps:
            return "merchant_not_found"
        balance = self.balance.get(p.payer)
        if balance is None:
            return "payer_not_found"
        held = [(c, self.stocks[self.coupon_stock[c]], self.spent[self.coupon_stock[c]])
                for c in self.held.get(p.payer, ())]
        best = best_coupon(p.amount, held)
        discount = best[2] if best else 0
        cash = p.amount - discount
        if balance < cash:
            return "insufficient_funds"
        fee = fee_of(p.amount, self.fee_bps[p.merchant])
        self.balance[p.payer] = balance - cash
        self.merchant[p.merchant] += p.amount - fee
        self.fees += fee
        if best:
            coupon, stock, d = best
            self.spent[stock] += d
            self.held[p.payer].discard(coupon)
            self.used[coupon] = p.id
        self.payments[p.id] = p
        return "ok"

    def final_state(self, outcomes: dict) -> FinalState:
        return FinalState(dict(self.balance), dict(self.merchant), dict(self.spent),
                          dict(self.used), self.fees, outcomes)


def run(wl: Workload, payments: list[Payment], clock) -> Run:
    """One payment at a time, in the global order."""
    book = Ledger(wl)
    started = clock()
    names, latencies = one_at_a_time(book.pay, payments, clock)
    seconds = clock() - started
    return Run("Python dict ledger", "one", "in memory, one call per payment, no disk",
               len(payments), seconds, latencies, "payment", book.final_state(tally(names)))
