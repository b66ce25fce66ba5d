"""The statistics of LIFT (docs/reference/rules.md, "Precision marketing";
docs/reference/protocol.md, LIFT), in exact integer and rational arithmetic.

No float is used: means and variances are Fractions of the exact integer
sums, square roots are bracketed with `math.isqrt` and compared exactly, so
the same figures come out on every machine, on replay, and from the
plain-Python reference. Interval ends are rounded outwards (floor the low
end, ceil the high end), point figures to the nearest integer (ties to even).

- Conversion: the two-proportion normal (Wald) interval,
  d +- z * sqrt(p_t (1 - p_t) / n_t + p_h (1 - p_h) / n_h).
- GMV per user: Welch's interval, d +- t * se, with se^2 = s_t^2 / n_t +
  s_h^2 / n_h (sample variances, n - 1), and t Student's 97.5 % quantile at
  the Welch-Satterthwaite degrees of freedom, rounded down to the table below
  (fewer degrees of freedom: a wider, safer interval).
"""
import math
from dataclasses import dataclass
from fractions import Fraction

# z of a two-sided 95 % interval (1.959963985...), rounded up to 6 decimals.
Z_95 = Fraction(1_959_964, 1_000_000)
# Student's t 97.5 % quantiles by degrees of freedom, rounded up to 6
# decimals (tests/core/test_lift.py recomputes them from the t distribution).
T_95 = {1: 12_706_205, 2: 4_302_653, 3: 3_182_447, 4: 2_776_446, 5: 2_570_582,
        6: 2_446_912, 7: 2_364_625, 8: 2_306_005, 9: 2_262_158, 10: 2_228_139,
        11: 2_200_986, 12: 2_178_813, 13: 2_160_369, 14: 2_144_787, 15: 2_131_450,
        16: 2_119_906, 17: 2_109_816, 18: 2_100_923, 19: 2_093_025, 20: 2_085_964,
        21: 2_079_614, 22: 2_073_874, 23: 2_068_658, 24: 2_063_899, 25: 2_059_539,
        26: 2_055_530, 27: 2_051_831, 28: 2_048_408, 29: 2_045_230, 30: 2_042_273,
        40: 2_021_076, 50: 2_008_560, 60: 2_000_298, 80: 1_990_064, 100: 1_983_972,
        120: 1_979_931, 200: 1_971_897, 500: 1_964_720, 1000: 1_962_340}
T_DF = sorted(T_95)
# The normal approximation is trusted only when each group has at least this
# many converters and this many non-converters (the textbook rule of thumb).
EACH_OUTCOME_MIN = 5
PPM = 1_000_000
SQRT_STEPS_MAX = 8                  # corrections after the isqrt estimate (3 at most happen)


def t_quantile(df: Fraction) -> Fraction:
    """t_{0.975} at the largest tabulated df <= df (df >= 1), z beyond the table."""
    if df > T_DF[-1] * 10:
        return Z_95
    below = [d for d in T_DF if d <= df]
    return Fraction(T_95[below[-1] if below else 1], PPM)


def ceil_sqrt(q: Fraction) -> int:
    """An integer c >= sqrt(q), at most sqrt(q) + 2 (q >= 0)."""
    n = math.ceil(q)
    c = math.isqrt(n)
    return c if c * c >= n else c + 1


def floor_minus_sqrt(d: Fraction, q: Fraction) -> int:
    """floor(d - sqrt(q)) exactly (q >= 0): the largest k with
    d - k >= sqrt(q), that is d - k >= 0 and (d - k)^2 >= q."""
    assert q >= 0
    k = math.floor(d) - ceil_sqrt(q)            # d - k >= sqrt(q): a valid k
    for _ in range(SQRT_STEPS_MAX):
        gap = d - (k + 1)
        if gap < 0 or gap * gap < q:
            return k
        k += 1
    raise AssertionError("floor_minus_sqrt did not converge")


def ceil_plus_sqrt(d: Fraction, q: Fraction) -> int:
    """ceil(d + sqrt(q)) exactly."""
    return -floor_minus_sqrt(-d, q)


@dataclass(frozen=True)
class Group:
    """One group's sums over the measurement window."""
    users: int
    converted: int          # users with at least one counted payment
    gmv: int                # net GMV of their counted payments
    gmv_squares: int        # sum over users of (their net GMV)^2


@dataclass(frozen=True)
class Interval:
    """A difference treated - holdout and its interval, all exact; `half`
    is the squared half width (the interval is diff +- sqrt(half))."""
    diff: Fraction
    half: Fraction

    def bounds(self, scale: int = 1) -> tuple[int, int]:
        """(floor, ceil) of the ends of the interval times `scale`."""
        d, q = self.diff * scale, self.half * scale * scale
        return floor_minus_sqrt(d, q), ceil_plus_sqrt(d, q)


def reason(treated: Group, holdout: Group, low: int | None, high: int | None) -> str | None:
    """Why the interval does not support a conclusion (None: it does)."""
    if treated.users == 0:
        return "no_treated"
    if holdout.users == 0:
        return "no_holdout"
    for g in (treated, holdout):
        if min(g.converted, g.users - g.converted) < EACH_OUTCOME_MIN:
            return "too_few"
    if low <= 0 <= high:
        return "contains_zero"
    return None


def conversion(treated: Group, holdout: Group) -> Interval | None:
    """The two-proportion normal interval of the conversion difference."""
    if treated.users == 0 or holdout.users == 0:
        return None
    variance = sum((Fraction(g.converted * (g.users - g.converted), g.users ** 3)
                    for g in (treated, holdout)), Fraction(0))
    diff = Fraction(treated.converted, treated.users) - Fraction(holdout.converted, holdout.users)
    return Interval(diff, Z_95 * Z_95 * variance)


def welch(treated: Group, holdout: Group) -> Interval | None:
    """Welch's interval of the difference of GMV per user (None when a
    group has fewer than two users: no sample variance)."""
    if treated.users < 2 or holdout.users < 2:
        return None
    parts = [Fraction(g.users * g.gmv_squares - g.gmv * g.gmv, g.users * (g.users - 1))
             / g.users for g in (treated, holdout)]           # s^2 / n per group
    se2 = parts[0] + parts[1]
    diff = Fraction(treated.gmv, treated.users) - Fraction(holdout.gmv, holdout.users)
    if se2 == 0:
        return Interval(diff, Fraction(0))
    df = se2 * se2 / sum(p * p / (g.users - 1) for p, g in zip(parts, (treated, holdout)))
    t = t_quantile(df)
    return Interval(diff, t * t * se2)


def ratio(numerator: int, denominator: int) -> int | None:
    """numerator / denominator to the nearest integer (ties to even); None
    when the denominator is not positive."""
    return round(Fraction(numerator, denominator)) if denominator > 0 else None


def figures(treated: Group, holdout: Group, discount: int) -> dict:
    """LIFT's differences, intervals, incremental payers and GMV, and costs."""
    n_t = treated.users
    conv, gmv = conversion(treated, holdout), welch(treated, holdout)
    out = {"conversion": interval_map(conv, treated, holdout, PPM, "_ppm"),
           "gmv_per_user": interval_map(gmv, treated, holdout, 1, "")}
    out["incremental_payers"] = scaled(conv, n_t)
    out["incremental_gmv"] = scaled(gmv, n_t)
    out["cost_per_incremental_payer"] = cost(conv, n_t, discount)
    return out


def interval_map(interval: Interval | None, treated: Group, holdout: Group, scale: int,
                 unit: str) -> dict:
    low = high = diff = None
    if interval is not None:
        low, high = interval.bounds(scale)
        diff = round(interval.diff * scale)
    # (No interval only with an empty group, or, for Welch, one of fewer
    # than two users: the reason is found before the bounds are looked at.)
    why = reason(treated, holdout, low, high)
    return {f"diff{unit}": diff, f"low{unit}": low, f"high{unit}": high,
            "conclusive": why is None, "reason": why}


def scaled(interval: Interval | None, n: int) -> dict:
    """The difference per user times the treated group's size: what the
    campaign added in total (with its interval)."""
    if interval is None:
        return {"value": None, "low": None, "high": None}
    low, high = interval.bounds(n)
    return {"value": round(interval.diff * n), "low": low, "high": high}


def cost(conv: Interval | None, n: int, discount: int) -> dict:
    """Discount per incremental payer: the point figure from the exact
    incremental payers, and a range from the ends of their interval (the
    high end has no bound when the interval reaches 0 or below)."""
    if conv is None or conv.diff * n <= 0:
        value = None
    else:
        value = round(discount / (conv.diff * n))
    if conv is None:
        return {"value": value, "low": None, "high": None}
    low_payers, high_payers = conv.bounds(n)
    return {"value": value, "low": discount // high_payers if high_payers > 0 else None,
            "high": -(-discount // low_payers) if low_payers > 0 else None}
