"""The one table of operations: the embedded Engine, the server and the CLI
all dispatch through it. Op numbers are docs/reference/protocol.md's."""
from dataclasses import dataclass
from typing import Callable

from engine.core.ops import membership as ops_membership, money as ops_money, query as ops_query, setup as ops_setup
from engine.core.scope import parse_scope, scoped_items
from engine.protocol.errors import BadBody

OP_HELLO = 1
OP_PING = 2
OP_PAY = 16
OP_ISSUE = 17
OP_CAPTURE_RECORDS = 18    # extension: CaptureRecord batch -> PayResult batch
OP_REFUND_RECORDS = 19     # extension: RefundRecord batch -> RefundResult batch


@dataclass(frozen=True)
class MapOp:
    code: int
    name: str
    apply: Callable            # (state, request, now, draws) -> reply map
    writes: bool               # changes state: stamped, journaled
    draw: Callable | None = None  # (state, request, rng) -> draws, outside the apply
    list_key: str | None = None   # list operations: the key of the item list
    scoped: bool = False          # takes a gateway key's `scope` (engine/core/scope.py)

    def check_body(self, request) -> None:
        """Refuse a body of the wrong shape before anything is journaled (and,
        for reads over the wire, lists longer than the wire allows)."""
        if self.list_key and self.scoped:
            scoped_items(request, self.list_key)
        elif self.list_key:
            ops_setup.list_items(request, self.list_key)
        elif not isinstance(request, dict):
            raise BadBody(f"the body of {self.name} must be a map")
        else:
            if self.scoped:
                parse_scope(request)
            if not self.writes:
                ops_query.check_lookup_lists(self.name, request)


MAP_OPS = {op.name: op for op in (
    MapOp(32, "MERCHANTS", ops_setup.merchants, True, list_key="merchants"),
    MapOp(33, "WALLETS", ops_setup.wallets, True, list_key="users"),
    MapOp(34, "TOPUP", ops_setup.topups, True, list_key="topups"),
    MapOp(35, "STOCKS", ops_setup.stocks, True, list_key="stocks"),
    MapOp(36, "PAYMENT_CODE", ops_setup.payment_code, True, ops_setup.draw_payment_code),
    MapOp(37, "QUOTE", ops_query.quote, False),
    MapOp(38, "CAPTURE", ops_money.capture, True, list_key="captures",
          scoped=True),
    MapOp(39, "VOID", ops_money.void, True, list_key="payments",
          scoped=True),
    MapOp(40, "REFUND", ops_money.refund, True, list_key="refunds",
          scoped=True),
    MapOp(41, "REVERSE", ops_money.reverse, True, list_key="payments",
          scoped=True),
    MapOp(42, "GET_PAYMENTS", ops_money.get_payments, False, scoped=True),
    MapOp(44, "SETTLE", ops_money.settle, True),
    MapOp(64, "STATEMENT", ops_money.statement, False),
    MapOp(46, "STATS", ops_membership.stats, False),
    MapOp(47, "PROGRAMS", ops_membership.programs, True, list_key="programs"),
    MapOp(48, "REDEEM_POINTS", ops_membership.redeem_points, True, list_key="redemptions"),
    MapOp(43, "BALANCES", ops_query.balances, False),
    MapOp(45, "AUDIT", ops_query.audit, False),
    MapOp(49, "COUPONS", ops_query.coupons, False),
)}
MAP_OPS_BY_CODE = {op.code: op for op in MAP_OPS.values()}

OP_CLOCK = 50
OP_EXPIRE = 65             # internal: expiry of holds found by a read, journaled
OP_NAMES = {OP_HELLO: "HELLO", OP_PING: "PING", OP_PAY: "PAY", OP_ISSUE: "ISSUE",
            OP_CAPTURE_RECORDS: "CAPTURE_RECORDS", OP_REFUND_RECORDS: "REFUND_RECORDS",
            OP_CLOCK: "CLOCK", OP_EXPIRE: "EXPIRE",
            **{op.code: op.name for op in MAP_OPS.values()}}

# Ops of docs/reference/protocol.md not implemented yet answer unknown_op; none left.
PLANNED_OPS = {}
