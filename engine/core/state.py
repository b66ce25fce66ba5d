"""Everything an engine knows: the kernel's tables plus the few small
Python-side records that map operations keep (top-ups)."""
from dataclasses import dataclass, field

from engine._kernel import Ledger
from engine.core.tombstones import ScopedTombstones
from engine.core.topups import Topups

TZ_OFFSET_MS_DEFAULT = 8 * 3600 * 1000      # UTC+8 (docs/reference/rules.md)
HOLD_MS_DEFAULT = 7 * 24 * 3600 * 1000


@dataclass
class State:
    tz_offset_ms: int = TZ_OFFSET_MS_DEFAULT
    hold_ms: int = HOLD_MS_DEFAULT
    ledger: Ledger = None
    now: int = 0                            # the last kept engine stamp
    topups: Topups = field(default_factory=Topups)  # id -> (user id, amount)
    settlements: list = field(default_factory=list)  # SETTLE replies, in order
    programs: dict = field(default_factory=dict)     # id -> definition (PROGRAMS)
    # Reversals of unknown ids by scoped gateway keys (engine/core/scope.py).
    scoped_tombstones: ScopedTombstones = field(default_factory=ScopedTombstones)
    # Precision marketing (engine/core/ops/marketing.py): segment definitions
    # by id, campaigns by id (engine/core/campaigns.py), and stock names.
    segments: dict = field(default_factory=dict)
    campaigns: dict = field(default_factory=dict)
    stock_names: dict = field(default_factory=dict)
    # Derived, kept only to spare work (engine/core/segments.py UserOrder):
    # wallet slots in user id order. Not journaled, snapshotted or compared.
    user_order: object = None

    def __post_init__(self):
        if self.ledger is None:
            self.ledger = Ledger(self.tz_offset_ms, self.hold_ms)
