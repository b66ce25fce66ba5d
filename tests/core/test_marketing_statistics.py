"""The statistics of precision marketing, checked by simulation (numpy only,
fixed seeds, so every run draws the same numbers and the bounds below are
exact facts about those draws, not chances of a flaky failure):

- the holdout assignment (ext/marketing.pyx `holdout`: SipHash-2-4 of the
  campaign and the user under the campaign's key) holds out the asked share
  within sampling error, whatever the ids look like, and says nothing about
  a user's place in the id order;
- LIFT's intervals (engine/core/lift.py) cover a known true effect in about
  95 % of simulated campaigns, and show no effect in about 95 % of those
  with none.
"""
from __future__ import annotations

import math

import numpy as np

from engine import _marketing
from engine.core import lift

BPS = 10_000
SIGMAS = 5                          # tolerance of the sampling-error checks
SEEDS = 200                         # simulated campaigns per coverage check
# Two-sided 95 % coverage over SEEDS campaigns: 3 binomial sigmas either side.
COVERAGE_LOW = 0.95 - 3 * math.sqrt(0.95 * 0.05 / SEEDS)
COVERAGE_HIGH = min(1.0, 0.95 + 3 * math.sqrt(0.95 * 0.05 / SEEDS))


def held(users: np.ndarray, bps: int, key=(0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321),
         campaign: int = 7) -> np.ndarray:
    out = np.zeros(len(users), np.uint8)
    _marketing.holdout(np.ascontiguousarray(users, np.uint64), key[0], key[1], campaign, bps, out)
    return out.astype(bool)


def within_sampling_error(hits: int, n: int, p: float) -> bool:
    sigma = math.sqrt(p * (1 - p) / n) if 0 < p < 1 else 0.0
    return abs(hits / n - p) <= SIGMAS * sigma + 1e-12


# ---------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------

ID_SETS = {
    "consecutive": np.arange(1, 200_001, dtype=np.uint64),
    "random": np.unique(np.random.default_rng(1).integers(1, 2**63, 200_000, dtype=np.uint64)),
    "multiples of 2**32": np.arange(1, 200_001, dtype=np.uint64) << np.uint64(32),
    "phone numbers": np.arange(13_800_000_000, 13_800_200_000, dtype=np.uint64),
}


def test_the_holdout_share_matches_the_fraction_within_sampling_error():
    for name, users in ID_SETS.items():
        for bps in (1, 500, 1000, 2500, 5000, 9000):
            hits = int(held(users, bps).sum())
            assert within_sampling_error(hits, len(users), bps / BPS), (name, bps, hits)
    users = ID_SETS["consecutive"]
    assert not held(users, 0).any() and held(users, BPS).all()


def test_the_assignment_is_independent_of_user_id_order():
    users = ID_SETS["consecutive"]
    flags = held(users, 5000)
    perm = np.random.default_rng(2).permutation(len(users))
    assert np.array_equal(held(users[perm], 5000), flags[perm])   # a user's fate is its own
    for part in np.array_split(flags, 10):                         # no drift along the ids
        assert within_sampling_error(int(part.sum()), len(part), 0.5)
    assert within_sampling_error(int(flags[::2].sum()), len(flags[::2]), 0.5)   # odd ids
    # Runs (Wald-Wolfowitz): consecutive ids neither cluster nor alternate.
    n1, n0 = int(flags.sum()), int((~flags).sum())
    runs = 1 + int((flags[1:] != flags[:-1]).sum())
    mean = 2 * n1 * n0 / (n1 + n0) + 1
    var = (mean - 1) * (mean - 2) / (n1 + n0 - 1)
    assert abs(runs - mean) <= SIGMAS * math.sqrt(var)
    # Neighbours: whether id u is held out says nothing of id u + 1.
    both = int((flags[1:] & flags[:-1]).sum())
    assert within_sampling_error(both, len(flags) - 1, 0.25)


def test_campaigns_and_keys_draw_independent_groups():
    users = ID_SETS["random"]
    first = held(users, 5000)
    for other in (held(users, 5000, campaign=8),
                  held(users, 5000, key=(1, 2)),
                  held(users, 5000, key=(0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4322))):
        assert not np.array_equal(first, other)
        assert within_sampling_error(int((first & other).sum()), len(users), 0.25)


# ---------------------------------------------------------------------------
# Simulated campaigns with a known true effect
# ---------------------------------------------------------------------------

USERS = 2000
HOLDOUT_BPS = 3000
SPEND_LOW, SPEND_HIGH = 1000, 5000          # a converter's GMV: uniform integers
SPEND_MEAN = (SPEND_LOW + SPEND_HIGH) / 2


def simulate(seed: int, p_treated: float, p_holdout: float) -> dict:
    """One campaign: the real assignment under a fresh key, each user
    converting with its group's probability and spending a uniform amount;
    LIFT's figures from the group sums."""
    rng = np.random.default_rng(seed)
    users = np.unique(rng.integers(1, 10**9, USERS + 100, dtype=np.uint64))[:USERS]
    key = tuple(int(k) for k in rng.integers(0, 2**63, 2, dtype=np.uint64))
    out = held(users, HOLDOUT_BPS, key=key, campaign=seed + 1)
    p = np.where(out, p_holdout, p_treated)
    converted = rng.random(USERS) < p
    gmv = np.where(converted, rng.integers(SPEND_LOW, SPEND_HIGH + 1, USERS), 0)
    groups = []
    for mask in (~out, out):
        g = gmv[mask].astype(np.int64)
        groups.append(lift.Group(int(mask.sum()), int(converted[mask].sum()), int(g.sum()),
                                 int((g * g).sum())))
    return lift.figures(groups[0], groups[1], discount=100_000)


def coverage(p_treated: float, p_holdout: float) -> tuple[float, float, float]:
    """Over SEEDS campaigns: the share whose conversion interval holds the
    true difference, whose GMV interval holds the true difference of GMV
    per user, and whose conversion interval is conclusive."""
    true_conv = (p_treated - p_holdout) * 1e6
    true_gmv = (p_treated - p_holdout) * SPEND_MEAN
    conv = gmv = conclusive = 0
    for seed in range(SEEDS):
        f = simulate(seed, p_treated, p_holdout)
        c, g = f["conversion"], f["gmv_per_user"]
        conv += c["low_ppm"] <= true_conv <= c["high_ppm"]
        gmv += g["low"] <= true_gmv <= g["high"]
        conclusive += c["conclusive"]
    return conv / SEEDS, gmv / SEEDS, conclusive / SEEDS


def test_the_intervals_cover_a_known_effect_in_about_95_percent_of_campaigns():
    conv, gmv, conclusive = coverage(0.30, 0.20)
    assert COVERAGE_LOW <= conv <= COVERAGE_HIGH, conv
    assert COVERAGE_LOW <= gmv <= COVERAGE_HIGH, gmv
    assert conclusive >= 0.9            # a 10-point lift over 600 held out is plain to see


def test_the_intervals_show_no_effect_when_there_is_none():
    conv, gmv, conclusive = coverage(0.20, 0.20)
    assert COVERAGE_LOW <= conv <= COVERAGE_HIGH, conv
    assert COVERAGE_LOW <= gmv <= COVERAGE_HIGH, gmv
    assert conclusive <= 1 - COVERAGE_LOW, conclusive       # "an effect" only by chance


def test_an_inconclusive_campaign_says_why():
    f = simulate(0, 0.20, 0.20)
    if f["conversion"]["conclusive"]:
        f = simulate(1, 0.20, 0.20)
    assert f["conversion"]["reason"] == "contains_zero"
    assert f["cost_per_incremental_payer"]["high"] is None      # may have brought nobody
    tiny = lift.figures(lift.Group(10, 3, 3000, 3 * 10**6), lift.Group(3, 1, 1000, 10**6), 500)
    assert tiny["conversion"]["reason"] == "too_few" and not tiny["conversion"]["conclusive"]
    empty = lift.figures(lift.Group(10, 3, 3000, 3 * 10**6), lift.Group(0, 0, 0, 0), 500)
    assert empty["conversion"] == {"diff_ppm": None, "low_ppm": None, "high_ppm": None,
                                   "conclusive": False, "reason": "no_holdout"}
