"""The one table of operations: the embedded Engine, the server and the CLI
all dispatch through it. Op numbers come from their owner,
engine/protocol/ops.py."""
from dataclasses import dataclass
from typing import Callable

from engine.core.ops import (marketing as ops_marketing, membership as ops_membership, money as ops_money,
                             query as ops_query, setup as ops_setup)
from engine.core.scope import parse_scope, scoped_items
from engine.protocol.errors import BadBody
from engine.protocol.limits import CAMPAIGNS_PER_REQUEST_MAX
from engine.protocol.ops import MAP_OP_CODES


@dataclass(frozen=True)
class MapOp:
    code: int
    name: str
    apply: Callable            # (state, request, now, draws) -> reply map
    writes: bool               # changes state: stamped, journaled
    draw: Callable | None = None  # (state, request, rng) -> draws, outside the apply
    list_key: str | None = None   # list operations: the key of the item list
    scoped: bool = False          # takes a gateway key's `scope` (engine/core/scope.py)
    items_max: int = 0            # list operations: most items per request (0: no limit)
    draw_source: str = "code_source"  # the Engine's source `draw` is given

    def check_body(self, request) -> None:
        """Refuse a body of the wrong shape before anything is journaled (and,
        for reads over the wire, lists longer than the wire allows)."""
        if self.list_key and self.scoped:
            scoped_items(request, self.list_key)
        elif self.list_key:
            items = ops_setup.list_items(request, self.list_key)
            if self.items_max and len(items) > self.items_max:
                raise BadBody(f"{self.name} takes at most {self.items_max} `{self.list_key}` "
                              f"per request, got {len(items)}: split it into several requests")
        elif not isinstance(request, dict):
            raise BadBody(f"the body of {self.name} must be a map")
        else:
            if self.scoped:
                parse_scope(request)
            if not self.writes:
                ops_query.check_lookup_lists(self.name, request)


def _map_op(name: str, *args, **kwargs) -> MapOp:
    return MapOp(MAP_OP_CODES[name], name, *args, **kwargs)


MAP_OPS = {op.name: op for op in (
    _map_op("MERCHANTS", ops_setup.merchants, True, list_key="merchants"),
    _map_op("WALLETS", ops_setup.wallets, True, list_key="users"),
    _map_op("TOPUP", ops_setup.topups, True, list_key="topups"),
    _map_op("STOCKS", ops_setup.stocks, True, list_key="stocks"),
    _map_op("PAYMENT_CODE", ops_setup.payment_code, True, ops_setup.draw_payment_code),
    _map_op("QUOTE", ops_query.quote, False),
    _map_op("CAPTURE", ops_money.capture, True, list_key="captures", scoped=True),
    _map_op("VOID", ops_money.void, True, list_key="payments", scoped=True),
    _map_op("REFUND", ops_money.refund, True, list_key="refunds", scoped=True),
    _map_op("REVERSE", ops_money.reverse, True, list_key="payments", scoped=True),
    _map_op("GET_PAYMENTS", ops_money.get_payments, False, scoped=True),
    _map_op("SETTLE", ops_money.settle, True),
    _map_op("STATEMENT", ops_money.statement, False),
    _map_op("STATS", ops_membership.stats, False),
    _map_op("PROGRAMS", ops_membership.programs, True, list_key="programs"),
    _map_op("REDEEM_POINTS", ops_membership.redeem_points, True, list_key="redemptions"),
    _map_op("BALANCES", ops_query.balances, False),
    _map_op("AUDIT", ops_query.audit, False),
    _map_op("COUPONS", ops_query.coupons, False),
    _map_op("SEGMENTS", ops_marketing.segments_op, True, list_key="segments"),
    _map_op("SEGMENT", ops_marketing.segment_op, False),
    _map_op("CAMPAIGNS", ops_marketing.campaigns_op, True, ops_marketing.draw_campaign_keys,
            list_key="campaigns", items_max=CAMPAIGNS_PER_REQUEST_MAX, draw_source="key_source"),
    _map_op("LIFT", ops_marketing.lift_op, False),
)}
MAP_OPS_BY_CODE = {op.code: op for op in MAP_OPS.values()}
assert set(MAP_OPS_BY_CODE) == set(MAP_OP_CODES.values()), "ops.py and the table disagree"
