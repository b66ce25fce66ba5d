"""`scanpay report`: the campaign and merchant report, as CSV files and one
PNG chart (with the optional extra `pip install 'scanpay[report]'`): redemptions over time per campaign, budget burn, and the
repeat-payer share per merchant. Everything comes from the engine's state
(its payments and the STATS counters), so it reconciles with the ledger."""
import csv
import os

import numpy as np

from engine.protocol.limits import COUPONS_PER_PAYMENT_MAX
from engine.core import canonical as cn
from engine.core.ops.membership import merchant_stats, stock_stats

HOUR_MS = 3_600_000
CAMPAIGNS_SHOWN_MAX = 8
MERCHANTS_SHOWN_MAX = 15


def redemptions_over_time(tables: dict) -> tuple[np.ndarray, dict]:
    """(hour starts, {stock id: (redemptions per hour, net discount per hour)})
    of the paid payments, by completion time."""
    p = tables["payments"]
    paid = np.isin(p["state"], (cn.PAYMENT_COMPLETED, cn.PAYMENT_PARTIALLY_REFUNDED,
                                cn.PAYMENT_REFUNDED))
    ids = p["result"]["coupons"][paid]
    net = (p["applied"] - p["refunded_part"])[paid]
    hours = p["completed_at"][paid] // HOUR_MS
    used = ids != 0
    if not used.any():
        return np.zeros(0, np.int64), {}
    coupons = tables["coupons"]
    stocks = coupons["stock"][np.searchsorted(coupons["id"], ids[used])]
    hour_of = np.repeat(hours, COUPONS_PER_PAYMENT_MAX).reshape(ids.shape)[used]
    first, last = hour_of.min(), hour_of.max()
    series = {}
    for stock in np.unique(stocks):
        mine = stocks == stock
        count = np.bincount(hour_of[mine] - first, minlength=last - first + 1)
        spent = np.zeros(last - first + 1, np.int64)
        np.add.at(spent, hour_of[mine] - first, net[used][mine])
        series[int(stock)] = (count, spent)
    return np.arange(first, last + 1) * HOUR_MS, series


def write(engine, out_dir: str, stock_names: dict | None = None,
          merchant_names: dict | None = None, tables: dict | None = None) -> list[str]:
    """Write campaigns.csv, merchants.csv and (with matplotlib) report.png;
    return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    tables = tables or engine.canonical()
    ledger = engine.state.ledger
    stock_names = stock_names or {}
    merchant_names = merchant_names or {}
    campaigns = [dict(stock_stats(ledger, int(s)), name=stock_names.get(int(s), f"stock {int(s)}"),
                      budget=int(b)) for s, b in zip(tables["stocks"]["id"], tables["stocks"]["budget"])]
    merchants = [dict(merchant_stats(ledger, int(m)), name=merchant_names.get(int(m), f"merchant {int(m)}"))
                 for m in tables["merchants"]["id"]]
    paths = [os.path.join(out_dir, "campaigns.csv"), os.path.join(out_dir, "merchants.csv")]
    write_rows(paths[0], campaigns)
    write_rows(paths[1], merchants)
    if plotting_available():
        paths.append(os.path.join(out_dir, "report.png"))
        chart(paths[2], tables, campaigns, merchants)
    return paths


# matplotlib is an optional extra: without it the report is the CSVs, and
# this one line says how to get the chart.
PNG_NEEDS_EXTRA = "report.png needs matplotlib: pip install 'scanpay[report]'"


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def missing_png_note(paths: list[str]) -> str:
    """The one line to print after `paths` when the PNG could not be drawn."""
    return "" if any(p.endswith(".png") for p in paths) else PNG_NEEDS_EXTRA


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)


def chart(path: str, tables: dict, campaigns: list, merchants: list) -> None:
    import matplotlib
    matplotlib.use("Agg")                   # files only: no display here
    import matplotlib.pyplot as plt

    hours, series = redemptions_over_time(tables)
    names = {c["id"]: c["name"] for c in campaigns}
    budgets = {c["id"]: c["budget"] for c in campaigns}
    top = sorted(series, key=lambda s: -int(series[s][0].sum()))[:CAMPAIGNS_SHOWN_MAX]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 13))
    x = (hours - hours[0]) / HOUR_MS if len(hours) else hours
    for stock in top:
        ax1.plot(x, series[stock][0], label=names[stock])
        burn = np.cumsum(series[stock][1])
        share = burn / budgets[stock] * 100 if budgets[stock] else burn / max(burn[-1], 1) * 100
        ax2.plot(x, share, label=names[stock] + ("" if budgets[stock] else " (no budget)"))
    ax1.set(title="Redemptions per hour, by campaign", xlabel="hours since the first redemption",
            ylabel="coupons redeemed")
    ax2.set(title="Budget burn", xlabel="hours since the first redemption",
            ylabel="net discount spent, % of budget")
    for ax in (ax1, ax2):
        if top:
            ax.legend(fontsize=7, loc="upper left")
    busiest = sorted((m for m in merchants if m.get("payments")), key=lambda m: -m["payments"])
    busiest = busiest[:MERCHANTS_SHOWN_MAX]
    ax3.barh([m["name"] for m in busiest], [m["repeat_payer_share_bps"] / 100 for m in busiest])
    ax3.set(title="Repeat-payer share, busiest merchants", xlabel="% of payers who paid twice or more")
    ax3.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("report", help="campaign and merchant report (CSV + PNG) "
                                             "from a data directory")
    p.add_argument("--data", required=True, help="the data directory of a stopped server")
    p.add_argument("--out", default="report", help="output directory (default ./report)")


def run(args) -> int:
    from engine.core.engine import Engine
    from engine.storage.journal import JournalError
    try:
        engine = Engine(args.data)
    except JournalError as e:
        print(f"scanpay report: cannot open {args.data}: {e} (stop the server first: "
              f"the report reads the data directory it owns)")
        return 2
    with engine:
        paths = write(engine, args.out)
    print("report: " + ", ".join(paths))
    if missing_png_note(paths):
        print(missing_png_note(paths))
    return 0
