# Ledger part 10: the writes of the map operations (engine/core/ops/). Python
# validates a request; these post it. TOPUP is the one map operation that
# moves money; the others set definition fields of a row (never a balance,
# a counter or a statistic, which only the batch apply changes).

# The fields each map operation may set, by table.
CONFIG_FIELDS = {
    "merchants": frozenset({"fee_bps", "tags", "tag_count", "active"}),
    "stocks": frozenset({
        "funder", "merchant_id", "kind", "stacking", "value", "cap", "min_spend",
        "valid_from", "valid_until", "validity_ms", "budget", "max_issued",
        "per_user_limit", "daily_budget", "per_user_daily_limit", "merchant",
        "list_at", "merchants_count", "tags_count", "goods_count", "slot_at",
        "slots_count"}),
    "codes": frozenset({"user", "expires_at"}),
    "programs": frozenset({"kind", "rate", "threshold", "stamps", "reward_stock_id",
                           "reward_stock", "list_at", "merchants_count", "tags_count"}),
}


cdef class _Maps(_Quote):

    def topup(self, int32_t user, int64_t amount):
        """TOPUP's posting: the bank pays `amount` into wallet slot `user`."""
        if not 0 <= user < self.n_users:
            raise IndexError(f"no wallet at slot {user}")
        if not 1 <= amount <= AMOUNT_MAX:
            raise ValueError(f"a top-up amount is 1..{AMOUNT_MAX}, not {amount}")
        cdef int64_t before = 0
        if KERNEL_DEBUG:
            before = self.posting_sum(user, -1, NULL, 0)
        self.U[user].balance += amount
        self.bank -= amount
        if KERNEL_DEBUG:
            self.check_posting(before, user, -1, NULL, 0)
            self.debug_check("topup")

    def configure(self, str table, int64_t slot, dict values):
        """Set definition fields of row `slot` of `table` (CONFIG_FIELDS)."""
        allowed = CONFIG_FIELDS.get(table)
        if allowed is None:
            raise ValueError(f"rows of {table!r} are not configured by map operations")
        if not 0 <= slot < self.rows(table):
            raise IndexError(f"{table}: no row {slot}")
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"{table}: fields {sorted(unknown)} are not definitions")
        rows = self.t[table]
        for field, value in values.items():
            rows[field][slot] = value
