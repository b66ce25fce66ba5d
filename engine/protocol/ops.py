"""Op numbers of the wire protocol: the one owner (docs/reference/protocol.md).

The server's dispatch table (engine/core/dispatch.py), the journal (whose
entries carry the op of their command), the clients and the CLI all take
their numbers from here. Pure Python: importable without the compiled kernel.
"""

# Session.
OP_HELLO = 1
OP_PING = 2

# Record batches (fixed-size records, engine/protocol/records.py).
OP_PAY = 16
OP_ISSUE = 17
OP_CAPTURE_RECORDS = 18    # extension: CaptureRecord batch -> PayResult batch
OP_REFUND_RECORDS = 19     # extension: RefundRecord batch -> RefundResult batch

# Map operations (a msgpack map in, a map out).
OP_MERCHANTS = 32
OP_WALLETS = 33
OP_TOPUP = 34
OP_STOCKS = 35
OP_PAYMENT_CODE = 36
OP_QUOTE = 37
OP_CAPTURE = 38
OP_VOID = 39
OP_REFUND = 40
OP_REVERSE = 41
OP_GET_PAYMENTS = 42
OP_BALANCES = 43
OP_SETTLE = 44
OP_AUDIT = 45
OP_STATS = 46
OP_PROGRAMS = 47
OP_REDEEM_POINTS = 48
OP_COUPONS = 49
OP_CLOCK = 50              # the test clock of a server started with test_clock
# Precision marketing (extension; docs/reference/rules.md, "Precision marketing").
OP_SEGMENTS = 51           # define or replace saved segments (write)
OP_SEGMENT = 52            # evaluate a segment: count and a page of user ids (read)
OP_CAMPAIGNS = 53          # targeted campaigns with a holdout (write)
OP_LIFT = 54               # a campaign's measured lift over a window (read)
OP_STATEMENT = 64          # extension

# Internal: never sent by a client, only journaled.
OP_EXPIRE = 65             # expiry of holds found by a read

MAP_OP_CODES: dict[str, int] = {
    "MERCHANTS": OP_MERCHANTS, "WALLETS": OP_WALLETS, "TOPUP": OP_TOPUP,
    "STOCKS": OP_STOCKS, "PAYMENT_CODE": OP_PAYMENT_CODE, "QUOTE": OP_QUOTE,
    "CAPTURE": OP_CAPTURE, "VOID": OP_VOID, "REFUND": OP_REFUND,
    "REVERSE": OP_REVERSE, "GET_PAYMENTS": OP_GET_PAYMENTS, "BALANCES": OP_BALANCES,
    "SETTLE": OP_SETTLE, "AUDIT": OP_AUDIT, "STATS": OP_STATS,
    "PROGRAMS": OP_PROGRAMS, "REDEEM_POINTS": OP_REDEEM_POINTS,
    "COUPONS": OP_COUPONS, "STATEMENT": OP_STATEMENT,
    "SEGMENTS": OP_SEGMENTS, "SEGMENT": OP_SEGMENT, "CAMPAIGNS": OP_CAMPAIGNS, "LIFT": OP_LIFT,
}
"""Map operations served by the dispatch table (CLOCK is the server's own)."""

OP_CODES: dict[str, int] = {
    "HELLO": OP_HELLO, "PING": OP_PING, "PAY": OP_PAY, "ISSUE": OP_ISSUE,
    "CAPTURE_RECORDS": OP_CAPTURE_RECORDS, "REFUND_RECORDS": OP_REFUND_RECORDS,
    **MAP_OP_CODES, "CLOCK": OP_CLOCK, "EXPIRE": OP_EXPIRE,
}
"""Every op by name."""

OP_NAMES: dict[int, str] = {code: name for name, code in OP_CODES.items()}
"""Every op by number."""

RECORD_OPS = frozenset({OP_PAY, OP_ISSUE, OP_CAPTURE_RECORDS, OP_REFUND_RECORDS})
"""Ops whose bodies are batches of fixed-size records."""

# Ops of the protocol that later work implements; until then: unknown_op,
# with "(not implemented yet)" in the message. None today.
PLANNED_OPS: dict[str, int] = {}

assert len(OP_NAMES) == len(OP_CODES), "two ops share a number"
assert all(0 < code < 2**16 for code in OP_NAMES), "op numbers are u16 in the frame header"
assert not set(PLANNED_OPS.values()) & set(OP_NAMES)
