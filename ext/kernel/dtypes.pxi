# The numpy dtype of every table row, checked against its C struct (tables.pxd),
# and which row arrays make up each table.

USER = np.dtype([("id", "<u8"), ("balance", "<i8"), ("held", "<i8"),
                 ("coupon_head", "<i4"), ("coupon_count", "<i4"), ("live_head", "<i4"),
                 ("membership_head", "<i4")],
                align=True)
MERCHANT = np.dtype([("id", "<u8"), ("balance", "<i8"), ("fee_bps", "<i4"),
                     ("active", "u1"), ("tag_count", "u1"), ("period_active", "u1"),
                     ("_pad", "u1"), ("tags", "<u4", (16,))]
                    + [(f, "<i8") for f in (
                        "gross", "merchant_discount", "platform_discount", "fees",
                        "refund_cash", "refund_platform_discount",
                        "refund_merchant_discount", "refund_fee", "settled_balance",
                        "stat_payments", "stat_gmv", "stat_unique_payers",
                        "stat_repeat_payers", "stat_coupon_payments", "stat_points_issued")],
                    align=True)
STOCK = np.dtype([("id", "<u8"), ("merchant_id", "<u8")]
                 + [(f, "<i8") for f in (
                     "value", "cap", "min_spend", "valid_from", "valid_until",
                     "validity_ms", "budget", "max_issued", "per_user_limit",
                     "daily_budget", "per_user_daily_limit", "spent",
                     "reserved", "issued", "campaign", "day", "day_spent",
                     "stat_redeemed", "stat_gmv", "stat_payers_new",
                     "stat_payers_returning")]
                 + [(f, "<i4") for f in (
                     "merchant", "list_at", "merchants_count", "tags_count",
                     "goods_count", "slot_at", "slots_count")]
                 + [("funder", "u1"), ("kind", "u1"), ("stacking", "u1")],
                 align=True)
COUPON = np.dtype([("id", "<u8"), ("expires_at", "<i8"), ("stock", "<i4"),
                   ("user", "<i4"), ("next", "<i4"), ("payment", "<i4"),
                   ("next_live", "<i4"), ("state", "u1"), ("live", "u1")], align=True)
PAYMENT = np.dtype([("applied", "<i8", (COUPONS_PER_PAYMENT_MAX,)), ("refunded_part", "<i8", (COUPONS_PER_PAYMENT_MAX,))]
                   + [(f, "<i8") for f in (
                       "amount", "authorized_amount", "cash", "discount", "fee",
                       "refunded_amount", "refunded_cash", "refunded_fee",
                       "created_at", "completed_at", "ended_at", "hold_expires_at", "day")]
                   + [("coupon", "<i4", (COUPONS_PER_PAYMENT_MAX,)), ("earn_at", "<i4"), ("earn_count", "<i4"),
                      ("user", "<i4"), ("merchant", "<i4"),
                      ("state", "u1"), ("coupon_count", "u1"), ("released", "u1"),
                      ("reversed", "u1")], align=True)
REFUND = np.dtype([("id", "<u8"), ("payment", "<u8"), ("amount", "<i8"),
                   ("cash", "<i8"), ("discount", "<i8"), ("fee", "<i8")], align=True)
TOMBSTONE = np.dtype([("id", "<u8")])
PROGRAM = np.dtype([("id", "<u8"), ("reward_stock_id", "<u8"), ("rate", "<i8"),
                    ("threshold", "<i8"), ("stamps", "<i8"), ("reward_stock", "<i4"),
                    ("list_at", "<i4"), ("merchants_count", "<i4"), ("tags_count", "<i4"),
                    ("kind", "u1")], align=True)
MEMBERSHIP = np.dtype([("key", "<u8"), ("points", "<i8"), ("stamps", "<i8"), ("user", "<i4"),
                       ("program", "<i4"), ("reward", "<i4"), ("next", "<i4")], align=True)
EARNING = np.dtype([("points", "<i8"), ("clawed", "<i8"), ("payment", "<i4"),
                    ("program", "<i4"), ("stamped", "u1")], align=True)
VISIT = np.dtype([("key", "<u8"), ("payments", "<i8"), ("user", "<i4"), ("merchant", "<i4")],
                 align=True)
REDEMPTION = np.dtype([("coupon", "<u8"), ("price", "<i8"), ("user", "<i4"),
                       ("program", "<i4")], align=True)

CODE = np.dtype([("code", "<u8"), ("expires_at", "<i8"), ("user", "<i4"),
                 ("used", "u1")], align=True)

assert USER.itemsize == sizeof(User)
assert MERCHANT.itemsize == sizeof(Merchant)
assert STOCK.itemsize == sizeof(Stock)
assert COUPON.itemsize == sizeof(Coupon)
assert PAYMENT.itemsize == sizeof(Payment)
assert CODE.itemsize == sizeof(Code)
assert REFUND.itemsize == sizeof(Refund)
assert TOMBSTONE.itemsize == sizeof(Tombstone)
assert PROGRAM.itemsize == sizeof(Program) and MEMBERSHIP.itemsize == sizeof(Membership)
assert EARNING.itemsize == sizeof(Earning) and VISIT.itemsize == sizeof(Visit)
assert REDEMPTION.itemsize == sizeof(Redemption)
assert sizeof(PayRecord) == 80 and sizeof(PayResult) == 80
assert sizeof(IssueRecord) == 32 and sizeof(IssueResult) == 24


def dtype_layout(dtype) -> dict:
    """{field: (offset, size)} of a numpy dtype, as c_layouts() gives a struct's."""
    return {name: (spec[1], spec[0].itemsize) for name, spec in dtype.fields.items()}


def check_layouts():
    """Every table's and record's dtype matches its C struct field by field
    (name, offset, size), or the kernel refuses to load: a kernel reading a
    row at the wrong offset would post to the wrong field silently."""
    layouts = c_layouts()
    pairs = {"User": USER, "Merchant": MERCHANT, "Stock": STOCK, "Coupon": COUPON,
             "Payment": PAYMENT, "Code": CODE, "Refund": REFUND, "Tombstone": TOMBSTONE,
             "Program": PROGRAM, "Membership": MEMBERSHIP, "Earning": EARNING,
             "Visit": VISIT, "Redemption": REDEMPTION, "PayRecord": _records.PAY_RECORD,
             "PayResult": _records.PAY_RESULT, "IssueRecord": _records.ISSUE_RECORD,
             "IssueResult": _records.ISSUE_RESULT, "CaptureRecord": _records.CAPTURE_RECORD,
             "RefundRecord": _records.REFUND_RECORD, "RefundResult": _records.REFUND_RESULT}
    if set(pairs) != set(layouts):
        raise ImportError(f"structs without a dtype: {sorted(set(layouts) - set(pairs))}")
    for struct, dtype in pairs.items():
        if dtype_layout(dtype) != layouts[struct]:
            raise ImportError(f"{struct}: the numpy dtype {dtype_layout(dtype)} does not match "
                              f"the C struct {layouts[struct]} (ext/tables.pxd)")


check_layouts()


# The row arrays of each table (grown together) and the tables with no index.
TABLE_ROWS = {
    "users": ("users",), "merchants": ("merchants",), "coupons": ("coupons",),
    "stocks": ("stocks", "stock_mark", "stock_cand"),
    "payments": ("pay_req", "pay_res", "pay_meta"), "codes": ("codes",),
    "refunds": ("refunds",), "tombstones": ("tombstones",), "programs": ("programs",),
    "memberships": ("memberships",), "earnings": ("earnings",), "visits": ("visits",),
    "redemptions": ("redemptions",),
}
UNINDEXED_TABLES = frozenset({"earnings", "memberships"})   # memberships: see membership()
