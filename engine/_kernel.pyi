# Stub of the compiled kernel (ext/kernel.pyx): the surface Python uses.
# Buffers are any C-contiguous buffer of the named element type (numpy arrays
# viewed as uint8 for record batches).
from typing import Any

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer, disjoint_base

REASON_APPLIED: int
REASON_NOT_CHOSEN: int

USER: np.dtype[Any]
MERCHANT: np.dtype[Any]
STOCK: np.dtype[Any]
COUPON: np.dtype[Any]
PAYMENT: np.dtype[Any]
REFUND: np.dtype[Any]
TOMBSTONE: np.dtype[Any]
PROGRAM: np.dtype[Any]
MEMBERSHIP: np.dtype[Any]
EARNING: np.dtype[Any]
VISIT: np.dtype[Any]
REDEMPTION: np.dtype[Any]
CODE: np.dtype[Any]
PAY_RECORD: np.dtype[Any]
PAY_RESULT: np.dtype[Any]

LIMITS: dict[str, int]

# The debug build (SCANPAY_KERNEL_DEBUG=1) checks invariants where money moves.
DEBUG: bool

class InvariantError(RuntimeError): ...
class LayoutError(ValueError): ...

ROW_COUNTS: dict[str, tuple[str, int]]

def check_loadable(current: dict[str, NDArray[Any]], arrays: dict[str, NDArray[Any]],
                   scalars: dict[str, int]) -> None: ...

BROKEN_TEXT: dict[int, str]
CONFIG_FIELDS: dict[str, frozenset[str]]
READABLE: frozenset[str]
KERNEL_STATUS: dict[str, int]
KERNEL_RECORD_CONSTANTS: dict[str, int]
KERNEL_LIMITS: dict[str, int]
STATUS_PENDING_OWNER: frozenset[str]

def check_constants() -> None: ...
def check_layouts() -> None: ...
def dtype_layout(dtype: np.dtype[Any]) -> dict[str, tuple[int, int]]: ...
def read_only(arr: NDArray[Any]) -> NDArray[Any]: ...
def owned(arr: NDArray[Any]) -> NDArray[Any]: ...
def grown_copy(arr: NDArray[Any], need: int) -> NDArray[Any]: ...
def space_bytes_for(itemsize: int) -> int: ...
def tune_growth(**settings: int) -> dict[str, int]: ...
def populate_stats() -> dict[str, float]: ...
SPACE_ROWS_MAX: int

# The thread that faults in row space pages ahead of the writer.
@disjoint_base
class Populator:
    def run(self) -> None: ...

# Address space a large table grows in without moving (ext/kernel/rowspace.pxi);
# it exports its committed bytes through the buffer protocol (np.frombuffer).
@disjoint_base
class RowSpace:
    def __init__(self, dtype: Any, reserve_bytes: int, need_bytes: int = ...) -> None: ...
    @property
    def reserved(self) -> int: ...
    @property
    def committed(self) -> int: ...
    @property
    def populated(self) -> int: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
TABLE_ROWS: dict[str, tuple[str, ...]]
UNINDEXED_TABLES: frozenset[str]

@disjoint_base
class IdIndex:
    def get(self, key: int) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def resizing(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def next_table_ready(self) -> bool: ...

class Ledger:
    # What dump() and load() carry: scalars, indexes and row arrays by name.
    SCALARS: tuple[str, ...]
    INDEXES: tuple[str, ...]
    ROWS: tuple[str, ...]
    # Tables (numpy structured arrays, grown as needed) and their counts.
    users: NDArray[Any]
    merchants: NDArray[Any]
    stocks: NDArray[Any]
    coupons: NDArray[Any]
    codes: NDArray[Any]
    pay_req: NDArray[Any]
    pay_res: NDArray[Any]
    pay_meta: NDArray[Any]
    refunds: NDArray[Any]
    tombstones: NDArray[Any]
    auth_queue: NDArray[Any]
    programs: NDArray[Any]
    memberships: NDArray[Any]
    earnings: NDArray[Any]
    visits: NDArray[Any]
    redemptions: NDArray[Any]
    program_order: NDArray[Any]
    lists: NDArray[Any]
    slots: NDArray[Any]
    stock_mark: NDArray[Any]
    stock_cand: NDArray[Any]
    cands: NDArray[Any]
    users_ix: IdIndex
    merchants_ix: IdIndex
    stocks_ix: IdIndex
    coupons_ix: IdIndex
    payments_ix: IdIndex
    codes_ix: IdIndex
    refunds_ix: IdIndex
    tombstones_ix: IdIndex
    programs_ix: IdIndex
    visits_ix: IdIndex
    redemptions_ix: IdIndex
    n_users: int
    n_merchants: int
    n_stocks: int
    n_coupons: int
    n_payments: int
    n_codes: int
    n_lists: int
    n_slots: int
    n_refunds: int
    n_tombstones: int
    auth_head: int
    n_auth: int
    n_programs: int
    n_memberships: int
    n_earnings: int
    n_visits: int
    n_redemptions: int
    n_rewards: int
    fees: int
    bank: int
    tz_offset_ms: int
    hold_ms: int
    coupons_per_user_max: int

    def __init__(self, tz_offset_ms: int = ..., hold_ms: int = ...) -> None: ...
    def reserve(self, table: str, more: int) -> None: ...
    def step_resizes(self, entries: int) -> int: ...
    def rows(self, table: str) -> int: ...
    def append(self, table: str, key: int) -> int: ...
    def find(self, table: str, key: int) -> int: ...
    def append_list(self, values: Any) -> int: ...
    def append_slots(self, triples: Any) -> int: ...
    def dump(self) -> tuple[dict[str, NDArray[Any]], dict[str, int]]: ...
    @classmethod
    def load(cls, arrays: dict[str, NDArray[Any]], scalars: dict[str, int]) -> Ledger: ...
    @staticmethod
    def allocate(name: str, dtype: Any, rows: int) -> NDArray[Any] | None: ...
    def release_free_pages(self) -> None: ...
    def user_coupon_slots(self, user: int) -> list[int]: ...
    def sort_programs(self) -> None: ...
    def expire(self, now: int) -> None: ...
    def expiry_due(self, now: int) -> bool: ...
    # Record batches: raw bytes in, results written into `out`.
    def pay(self, records: Buffer, now: int, out: Buffer) -> None: ...
    def issue(self, records: Buffer, now: int, out: Buffer) -> None: ...
    def capture_records(self, records: Buffer, now: int, out: Buffer) -> None: ...
    def refund_records(self, records: Buffer, now: int, out: Buffer) -> None: ...
    def capture(self, payments: Buffer, amounts: Buffer, now: int, out: Buffer) -> None: ...
    def void(self, payments: Buffer, now: int, out: Buffer) -> None: ...
    def reverse(self, payments: Buffer, now: int, out: Buffer) -> None: ...
    def refund(self, ids: Buffer, payments: Buffer, amounts: Buffer, now: int, out: Buffer,
               status: Buffer) -> None: ...
    def settle(self) -> list[dict[str, int]]: ...
    def find_membership(self, user: int, program: int) -> int: ...
    def redeem(self, coupon_id: int, user_id: int, program_id: int, stock_id: int, price: int,
               now: int) -> tuple[int, bool, int, int]: ...
    def reserve_payments(self, n: int) -> None: ...
    # (status, cash, discount, fee, coupons, explain)
    def quote(self, record: Buffer, now: int) -> tuple[int, int, int, int, list[int],
                                                       list[tuple[int, int, int, int]]]: ...
