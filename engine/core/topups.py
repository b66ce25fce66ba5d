"""Kept top-ups (id -> user id, amount): what makes TOPUP retries idempotent.

A restart must not build a Python dict entry per top-up it ever saw (a
million top-ups cost most of a second), so the top-ups loaded from a
snapshot stay one numpy array sorted by id, searched in place; only the
top-ups made since then live in a dict.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

TOPUPS = np.dtype([("id", "<u8"), ("user", "<u8"), ("amount", "<i8")])


class Topups:
    def __init__(self, loaded: np.ndarray | None = None):
        base = np.zeros(0, TOPUPS) if loaded is None else np.asarray(loaded, TOPUPS)
        order = np.argsort(base["id"], kind="stable")
        self._base = base[order]
        self._base_ids = ids = np.ascontiguousarray(self._base["id"])
        if (ids[1:] == ids[:-1]).any():         # loaded input (a snapshot): a real check
            raise ValueError("the kept top-ups hold an id twice")
        self._recent: dict[int, tuple[int, int]] = {}

    def _base_slot(self, topup_id: int) -> int:
        if not len(self._base):             # a fresh engine: skip numpy's call cost
            return -1
        ids = self._base_ids
        i = int(ids.searchsorted(np.uint64(topup_id)))   # a Python int would compare as float
        return i if i < len(ids) and int(ids[i]) == topup_id else -1

    def __contains__(self, topup_id: int) -> bool:
        return topup_id in self._recent or self._base_slot(topup_id) >= 0

    def __getitem__(self, topup_id: int) -> tuple[int, int]:
        if topup_id in self._recent:
            return self._recent[topup_id]
        i = self._base_slot(topup_id)
        if i < 0:
            raise KeyError(topup_id)
        return int(self._base["user"][i]), int(self._base["amount"][i])

    def __setitem__(self, topup_id: int, value: tuple[int, int]) -> None:
        # Callers look the id up first (TOPUP answers duplicates from it), so
        # only the cheap half of "kept once" is asserted here.
        assert topup_id not in self._recent, "a top-up id is kept once"
        self._recent[topup_id] = value

    def __len__(self) -> int:
        return len(self._base) + len(self._recent)

    def __bool__(self) -> bool:
        return len(self) > 0

    def items(self) -> Iterator[tuple[int, tuple[int, int]]]:
        for i, u, a in self._base.tolist():
            yield i, (u, a)
        yield from self._recent.items()

    def to_array(self) -> np.ndarray:
        """All kept top-ups as one array (loaded ones first, then newer ones)."""
        recent = np.array([(i, u, a) for i, (u, a) in self._recent.items()], TOPUPS) \
            if self._recent else np.zeros(0, TOPUPS)
        return np.concatenate([self._base, recent])
