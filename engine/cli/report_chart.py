"""report.png of `scanpay report` (engine/cli/report.py), drawn with matplotlib
(the optional extra `report`): four panels, each bar and line labelled where
it is, never through a legend.

1. the extra payers each targeted campaign brought, with the 95 % interval
   as a bar, its cost per extra payer and its verdict written next to it;
2. the campaigns' redemptions over clock time (local time of the engine);
3. each stock's budget used (an unlimited budget is written "unlimited");
4. the repeat-payer share of the busiest merchants.
"""
from __future__ import annotations

import datetime as dt

from engine.cli.report import (CAMPAIGNS_SHOWN_MAX, HOUR_MS, MERCHANTS_SHOWN_MAX, PAID_OFF,
                               Figures, money, payers)

LABEL_SIZE = 8
PAID_COLOUR, OTHER_COLOUR = "#2a7d2e", "#9a3b3b"


def draw(path: str, figures: Figures) -> None:
    import matplotlib
    matplotlib.use("Agg")                   # files only: no display here
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(12, 17),
                             gridspec_kw={"height_ratios": [1.0, 1.2, 1.3, 1.3]})
    lift_panel(axes[0], figures)
    series_panel(axes[1], figures)
    budget_panel(axes[2], figures)
    merchant_panel(axes[3], figures)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def lift_panel(ax, figures: Figures) -> None:
    shown = figures.campaigns[:CAMPAIGNS_SHOWN_MAX]
    ax.set_title("Extra payers each targeted campaign brought (treated against its holdout, "
                 "95 % interval)")
    ax.axvline(0, color="black", linewidth=0.8)
    if not shown:
        nothing(ax, "no targeted campaign")
        return
    for y, c in enumerate(shown):
        inc = c["incremental_payers"]
        colour = PAID_COLOUR if c["verdict"] == PAID_OFF else OTHER_COLOUR
        if inc["value"] is None:
            ax.text(0, y, "  no figures: a group is empty", va="center", fontsize=LABEL_SIZE)
            continue
        spread = [[inc["value"] - inc["low"]], [inc["high"] - inc["value"]]]
        ax.errorbar(inc["value"], y, xerr=spread, fmt="o", color=colour, capsize=6, linewidth=2)
        cost = c["cost_per_incremental_payer"]["value"]
        each = f", {money(cost, figures.currency)} each" if cost is not None else ""
        ax.annotate(f"{payers(inc['value'])} ({payers(inc['low'])} to {payers(inc['high'])})"
                    f"{each}: {c['verdict']}", (inc["high"], y), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=LABEL_SIZE, color=colour)
    ax.set_yticks(range(len(shown)), [c["label"] for c in shown])
    ax.set_ylim(len(shown) - 0.5, -0.5)
    low = min([0] + [c["incremental_payers"]["low"] or 0 for c in shown])
    high = max([0] + [c["incremental_payers"]["high"] or 0 for c in shown])
    ax.set_xlim(low - 0.05 * (high - low + 1), high + 0.9 * (high - low + 1))   # room for the text
    ax.set_xlabel("extra payers in the campaign's scope")


def series_panel(ax, figures: Figures) -> None:
    shown = [c for c in figures.campaigns[:CAMPAIGNS_SHOWN_MAX] if figures.series[c["campaign"]]]
    ax.set_title("Redemptions over clock time, by targeted campaign")
    if not shown:
        nothing(ax, "no redemptions to show")
        return
    origin = min(figures.series[c["campaign"]][0][0] for c in shown)
    ticks = {}
    for c in shown:
        windows = figures.series[c["campaign"]]
        x = [(a - origin) / HOUR_MS for a, _, _ in windows]
        y = [n for _, _, n in windows]
        line, = ax.plot(x, y, marker="o")
        ax.annotate(f" {c['label']}", (x[-1], y[-1]), va="center", fontsize=LABEL_SIZE,
                    color=line.get_color())
        ticks.update({xi: clock(a, figures.tz_offset_ms) for xi, (a, _, _) in zip(x, windows)})
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=LABEL_SIZE, rotation=30)
    ax.set_xlim(-0.5, max(ticks) * 1.45 + 1)                       # room for the labels
    first = figures.series[shown[0]["campaign"]][0]
    ax.set_ylabel(f"coupons redeemed per {(first[1] - first[0]) / HOUR_MS:g} h")
    top = max(n for c in shown for _, _, n in figures.series[c["campaign"]])
    ax.set_ylim(-0.06 * (top + 1), (top + 1) * 1.08)


def budget_panel(ax, figures: Figures) -> None:
    shown = sorted(figures.stocks, key=lambda s: -s["discount_spent"])[:CAMPAIGNS_SHOWN_MAX]
    ax.set_title("Coupon campaigns: budget used")
    if not shown:
        nothing(ax, "no coupon campaign")
        return
    for y, s in enumerate(shown):
        spent = money(s["discount_spent"], figures.currency)
        if s["budget"] == 0:
            ax.text(0, y, f" unlimited budget: {spent} spent, {s['redeemed']:,} redeemed",
                    va="center", fontsize=LABEL_SIZE)
            continue
        share = 100 * s["discount_spent"] / s["budget"]
        ax.barh(y, share, color="#4a78a8")
        ax.text(share, y, f" {share:.0f} %: {spent} of {money(s['budget'])}, "
                          f"{s['redeemed']:,} redeemed", va="center", fontsize=LABEL_SIZE)
    ax.set_yticks(range(len(shown)), [s["label"] for s in shown], fontsize=LABEL_SIZE)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlim(0, 180)                                            # room for the text
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("% of the budget spent")


def merchant_panel(ax, figures: Figures) -> None:
    busiest = sorted((m for m in figures.merchants if m["payments"]), key=lambda m: -m["payments"])
    busiest = busiest[:MERCHANTS_SHOWN_MAX]
    ax.set_title("Repeat-payer share, busiest merchants")
    if not busiest:
        nothing(ax, "no payments yet")
        return
    shares = [m["repeat_payer_share_bps"] / 100 for m in busiest]
    ax.barh(range(len(busiest)), shares, color="#4a78a8")
    for y, (m, share) in enumerate(zip(busiest, shares)):
        ax.text(share, y, f" {share:.0f} % of {m['unique_payers']:,} payers", va="center",
                fontsize=LABEL_SIZE)
    ax.set_yticks(range(len(busiest)), [m["label"] for m in busiest], fontsize=LABEL_SIZE)
    ax.set_ylim(len(busiest) - 0.5, -0.5)
    ax.set_xlim(0, max(shares) * 1.4 + 1)
    ax.set_xlabel("% of payers who paid twice or more")


def nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def clock(ms: int, tz_offset_ms: int) -> str:
    """Weekday and local time, e.g. "Sat 09:00"."""
    zone = dt.timezone(dt.timedelta(milliseconds=tz_offset_ms))
    return dt.datetime.fromtimestamp(ms / 1000, zone).strftime("%a %H:%M")
