"""Fixed-size binary records of docs/reference/protocol.md as numpy dtypes.

A frame body of n records is `np.frombuffer(body, PAY_RECORD)`: no copy, no
per-record parsing. Layouts are little-endian and packed, byte for byte the
tables of docs/reference/protocol.md.
"""
import numpy as np

from engine.protocol.limits import COUPONS_PER_PAYMENT_MAX, RECORD_BYTES_MAX
from engine.protocol.ops import OP_CAPTURE_RECORDS, OP_ISSUE, OP_PAY, OP_REFUND_RECORDS, RECORD_OPS

PAY_RECORD = np.dtype([
    ("id", "<u8"),
    ("payer", "<u8"),
    ("merchant", "<u8"),
    ("amount", "<i8"),
    ("flags", "<u4"),
    ("goods_tag", "<u4"),
    ("coupons", "<u8", (COUPONS_PER_PAYMENT_MAX,)),
    ("user_data", "<u8"),
])

PAY_RESULT = np.dtype([
    ("id", "<u8"),
    ("status", "<u4"),
    ("flags", "<u4"),
    ("cash", "<i8"),
    ("discount", "<i8"),
    ("fee", "<i8"),
    ("timestamp", "<u8"),
    ("coupons", "<u8", (COUPONS_PER_PAYMENT_MAX,)),
])

ISSUE_RECORD = np.dtype([
    ("coupon", "<u8"),
    ("stock", "<u8"),
    ("user", "<u8"),
    ("reserved", "<u8"),
])

ISSUE_RESULT = np.dtype([
    ("coupon", "<u8"),
    ("status", "<u4"),
    ("flags", "<u4"),
    ("expires_at", "<u8"),
])

# Extensions (docs/reference/protocol.md): the hot lifecycle operations as
# fixed records too, for batches that must not pay for a map per item.
CAPTURE_RECORD = np.dtype([("payment", "<u8"), ("amount", "<i8")])
REFUND_RECORD = np.dtype([
    ("id", "<u8"),
    ("payment", "<u8"),
    ("amount", "<i8"),
    ("reserved", "<u8"),
])
REFUND_RESULT = np.dtype([
    ("id", "<u8"),
    ("status", "<u4"),
    ("flags", "<u4"),     # 1 duplicate
    ("cash", "<i8"),
    ("discount", "<i8"),
    ("fee", "<i8"),
])

# The record of each fixed-record op (engine/protocol/ops.py, RECORD_OPS).
RECORD_DTYPES_BY_OP = {OP_PAY: PAY_RECORD, OP_ISSUE: ISSUE_RECORD,
                       OP_CAPTURE_RECORDS: CAPTURE_RECORD, OP_REFUND_RECORDS: REFUND_RECORD}
assert set(RECORD_DTYPES_BY_OP) == RECORD_OPS

assert PAY_RECORD.itemsize == 80 and PAY_RESULT.itemsize == 80
assert CAPTURE_RECORD.itemsize == 16 and REFUND_RECORD.itemsize == 32
assert REFUND_RESULT.itemsize == 40
assert max(d.itemsize for d in (PAY_RECORD, PAY_RESULT, CAPTURE_RECORD, REFUND_RECORD,
                                REFUND_RESULT, ISSUE_RECORD, ISSUE_RESULT)) == RECORD_BYTES_MAX
assert ISSUE_RECORD.itemsize == 32 and ISSUE_RESULT.itemsize == 24

# PayRecord.flags
PAY_NO_COUPONS = 1
PAY_PAYER_IS_CODE = 2
PAY_AUTHORIZE = 4
PAY_FLAGS_KNOWN = PAY_NO_COUPONS | PAY_PAYER_IS_CODE | PAY_AUTHORIZE

# PayResult.flags / IssueResult.flags
RESULT_DUPLICATE = 1
RESULT_AUTHORIZED = 2

# The limits of the rules (AMOUNT_MAX, PAYMENT_CODE_MIN, ...) live in
# engine/protocol/limits.py.


def pay_records(n: int) -> np.ndarray:
    """A zeroed batch of n PayRecords, for callers that build batches."""
    return np.zeros(n, PAY_RECORD)


def issue_records(n: int) -> np.ndarray:
    """A zeroed batch of n IssueRecords."""
    return np.zeros(n, ISSUE_RECORD)
