"""A deterministic source of campaign keys (CAMPAIGNS' holdout draw) for
tests: an engine and the plain-Python reference given equal seeds draw equal
keys, and a test's treated and holdout groups are the same on every run. (An
engine's own default is the OS CSPRNG: engine/core/engine.py `random_key`.)"""
from __future__ import annotations

import random


class Keys:
    """u64 keys from a seeded generator."""

    def __init__(self, seed: int = 1):
        self.rng = random.Random(seed)

    def __call__(self) -> int:
        return self.rng.getrandbits(64)
