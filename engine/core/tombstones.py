"""Reversal tombstones of gateway keys with a merchant scope (engine/core/scope.py)."""
import numpy as np


class ScopedTombstones:
    """Payment ids a scoped key reversed before any payment had them: id ->
    the merchants whose PAYs with that id fail `reversed`. (An unscoped
    REVERSE leaves the kernel's own tombstone, which blocks every PAY.)"""

    def __init__(self, scopes: dict | None = None):
        self.scopes = dict(scopes or {})     # payment id -> frozenset of merchant ids
        self._ids = None                     # sorted ids, rebuilt after a change

    def __len__(self) -> int:
        return len(self.scopes)

    def add(self, payment_id: int, merchants: frozenset) -> None:
        if merchants:
            self.scopes[payment_id] = self.scopes.get(payment_id, frozenset()) | merchants
            self._ids = None

    def drop(self, payment_id: int) -> None:
        if self.scopes.pop(payment_id, None) is not None:
            self._ids = None

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.array(sorted(self.scopes), np.uint64)
        return self._ids

    def rows(self) -> list[tuple[int, int]]:
        """(payment id, merchant) pairs, for the canonical tables."""
        return [(pid, m) for pid, scope in self.scopes.items() for m in scope]

    def to_meta(self) -> dict:
        return {str(pid): sorted(m) for pid, m in sorted(self.scopes.items())}

    @classmethod
    def from_meta(cls, meta: dict) -> "ScopedTombstones":
        return cls({int(pid): frozenset(m) for pid, m in meta.items()})
