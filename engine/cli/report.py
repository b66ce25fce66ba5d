"""`scanpay report`: the campaign report a marketing manager reads, as CSV
files and one PNG chart (the PNG with the optional extra `pip install
'scanpay[report]'`).

- lift.csv: each targeted campaign (CAMPAIGNS, op 53) with its holdout: issued,
  redeemed, cost per redemption, the extra payers it brought with their 95 %
  interval, the cost per extra payer, new and returning customers, and the
  verdict (did it pay off?);
- campaigns.csv: each coupon stock by name: issued, redeemed, discount spent,
  cost per redemption, budget ("unlimited" when it has none), new and
  returning payers;
- merchants.csv: payments and repeat payers per merchant;
- report.png: the lift with its interval bars, redemptions over clock time,
  budget use and the repeat-payer share, every line and bar labelled where it
  is (no legend to decode).

Every figure comes from the read ops (STATS, BALANCES, LIFT), through one
code path (`gather`), whether the source is a running server (a Client) or
the data directory of a stopped one (an Engine in process): both give the
same report. Names come from the engine (STOCKS and CAMPAIGNS `name`); a
stock or campaign without one is "stock 12 (unnamed)", never a bare id.
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from fractions import Fraction

from engine.cli.statements import local_time, major_units
from engine.protocol.limits import WIRE_LOOKUP_ITEMS_MAX
from engine.protocol.status import Status

HOUR_MS = 3_600_000
SERIES_WINDOWS_MAX = 12             # LIFT calls per campaign for the redemptions over time
CAMPAIGNS_SHOWN_MAX = 12
MERCHANTS_SHOWN_MAX = 15
UNLIMITED = "unlimited"
PAID_OFF, NOT_PAID_OFF, TOO_EARLY = "paid off", "did not pay off", "too early to tell"
NOT_JUDGED = "not judged"
EARLY_REASONS = {"no_treated": "nobody in the treated group", "no_holdout": "nobody held out",
                 "too_few": "fewer than 5 payers or 5 non-payers in a group: too few to tell"}


@dataclass
class Figures:
    """What the report shows, built from the op replies only."""
    currency: str
    tz_offset_ms: int
    payer_value: int | None                 # what an extra payer is worth (minor units)
    stocks: list = field(default_factory=list)      # STATS rows + budget, label
    campaigns: list = field(default_factory=list)   # LIFT replies + label, stock label, verdict
    series: dict = field(default_factory=dict)      # campaign id -> [(from, until, redeemed)]
    merchants: list = field(default_factory=list)   # STATS rows + label


class Source:
    """Where the read ops go: `call(op, request)`, and the engine's currency
    and time zone (an Engine in process, or a Client and its HELLO)."""

    def __init__(self, call, currency: str, tz_offset_ms: int):
        self.call, self.currency, self.tz_offset_ms = call, currency, tz_offset_ms

    @classmethod
    def of_engine(cls, engine) -> "Source":
        return cls(engine.call, engine.currency, engine.state.tz_offset_ms)

    @classmethod
    def of_client(cls, client) -> "Source":
        return cls(client.call, client.server_info.currency, client.server_info.tz_offset_ms)


# -- gathering: op replies only ---------------------------------------------

def gather(source: Source, stocks=(), campaigns=(), merchants=(), merchant_names=None,
           payer_value: int | None = None, until: int | None = None) -> Figures:
    """The report's figures: LIFT of each campaign (over [its time, until),
    default: up to now), STATS and BALANCES of the stocks (those given and
    the campaigns' own) and STATS of the merchants."""
    figures = Figures(source.currency, source.tz_offset_ms, payer_value)
    lifts = [lift(source, c, until) for c in campaigns]
    stock_ids = list(dict.fromkeys(list(stocks) + [r["stock"] for r in lifts]))
    figures.stocks = stock_rows(source, stock_ids)
    label = {s["id"]: s["label"] for s in figures.stocks}
    for reply in lifts:
        reply["label"] = reply["name"] or f"campaign {reply['campaign']} (unnamed)"
        reply["stock_label"] = label[reply["stock"]]
        reply["verdict"], reply["why"] = verdict(reply, payer_value, source.currency)
        figures.campaigns.append(reply)
        figures.series[reply["campaign"]] = series(source, reply)
    names = merchant_names or {}
    figures.merchants = [dict(m, label=names.get(m["id"], f"merchant {m['id']}"))
                         for m in found(in_parts(source, "STATS", "merchants", list(merchants)))]
    return figures


def found(rows: list) -> list:
    """The rows, all found: an id the engine does not know is the caller's
    mistake, said in one line rather than left out of the report."""
    for row in rows:
        if row["status"] != Status.ok:
            raise ReportError(f"id {row['id']}: {row.get('error')}")
    return rows


class ReportError(Exception):
    """A read the report needs was refused: one line for the operator."""


def lift(source: Source, campaign: int, until: int | None, start: int | None = None) -> dict:
    request = {"campaign": campaign}
    if start is not None:
        request["from"] = start
    if until is not None:
        request["until"] = until
    reply = source.call("LIFT", request)
    if reply.get("status") != 0:
        raise ReportError(f"LIFT of campaign {campaign}: {reply.get('error')} "
                          f"{reply.get('message', '')}".rstrip())
    return reply


def in_parts(source: Source, op: str, key: str, ids: list) -> list:
    """The `key` rows of `op` for any number of ids (the wire takes at most
    WIRE_LOOKUP_ITEMS_MAX a request)."""
    rows = []
    for at in range(0, len(ids), WIRE_LOOKUP_ITEMS_MAX):    # bounded by len(ids)
        reply = source.call(op, {key: ids[at:at + WIRE_LOOKUP_ITEMS_MAX]})
        if reply.get("status") != 0:
            raise ReportError(f"{op}: {reply.get('error')} {reply.get('message', '')}".rstrip())
        rows += reply[key]
    return rows


def stock_rows(source: Source, ids: list) -> list:
    """STATS of each known stock, with its budget (BALANCES) and label."""
    budgets = {b["id"]: b["budget"] for b in found(in_parts(source, "BALANCES", "stocks", ids))}
    return [dict(s, label=s["name"] or f"stock {s['id']} (unnamed)", budget=budgets[s["id"]])
            for s in found(in_parts(source, "STATS", "stocks", ids))]


def series(source: Source, reply: dict) -> list:
    """[(from, until, redeemed)]: the campaign's redemptions in at most
    SERIES_WINDOWS_MAX windows of whole hours from its time to the end of
    the measurement (one LIFT each)."""
    start, end = reply["at"], reply["until"] if reply["until"] is not None else reply["now"]
    if end <= start:
        return []
    hours = max(1, -(-(end - start) // (SERIES_WINDOWS_MAX * HOUR_MS)))
    width = hours * HOUR_MS
    out = []
    for a in range(start, end, width):                  # at most SERIES_WINDOWS_MAX
        b = min(a + width, end)
        out.append((a, b, lift(source, reply["campaign"], b, a)["redeemed"]))
    return out


def verdict(reply: dict, payer_value: int | None, currency: str) -> tuple[str, str]:
    """(verdict, why) of a LIFT reply. A campaign paid off when it brought
    extra payers (the conversion interval above 0) and each cost at most
    what an extra payer is worth (`payer_value`, the manager's figure)."""
    conv = reply["conversion"]
    if conv["reason"] in EARLY_REASONS:
        return TOO_EARLY, EARLY_REASONS[conv["reason"]]
    if conv["reason"] == "contains_zero":
        return NOT_PAID_OFF, (f"no effect that can be told from chance: its "
                              f"{money(reply['discount'], currency)} of discounts bought no "
                              f"measurable extra payer")
    if conv["diff_ppm"] < 0:
        return NOT_PAID_OFF, "fewer payers than without it"
    cost = reply["cost_per_incremental_payer"]
    high = money(cost["high"]) if cost["high"] is not None else "no upper bound"
    each = (f"{money(cost['value'], currency)} per extra payer "
            f"(95 %: {money(cost['low'])} to {high})")
    if payer_value is None:
        return NOT_JUDGED, f"{each}; give a payer value to judge it"
    if cost["value"] <= payer_value:
        return PAID_OFF, f"{each}, within the {money(payer_value, currency)} one is worth"
    return NOT_PAID_OFF, f"{each}, more than the {money(payer_value, currency)} one is worth"


# -- text -------------------------------------------------------------------

def money(minor: int | None, currency: str = "") -> str:
    if minor is None:
        return "-"
    text = major_units(minor)
    whole, _, cents = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}.{cents}" + (f" {currency}" if currency else "")


def payers(n: int | None) -> str:
    return "-" if n is None else f"{n:+,}"


def headline(c: dict) -> str:
    """One line: the extra payers a campaign brought, with their interval."""
    inc = c["incremental_payers"]
    return (f"{c['label']}: {payers(inc['value'])} payers (95 %: {payers(inc['low'])} to "
            f"{payers(inc['high'])}), {c['treated']['users']:,} treated against "
            f"{c['holdout']['users']:,} held out")


def verdict_lines(figures: Figures) -> list[str]:
    """Two lines per campaign (its extra payers; its verdict and their cost)
    and one that names the campaigns that paid off."""
    lines = []
    for c in figures.campaigns:
        lines.append(headline(c))
        lines.append(f"    {c['verdict']}: {c['why']}")
    paid = [c["label"] for c in figures.campaigns if c["verdict"] == PAID_OFF]
    if figures.campaigns and figures.payer_value is not None:
        lines.append("paid off: " + ("; ".join(paid) if paid else "none"))
    return lines


# -- files ------------------------------------------------------------------

def write(figures: Figures, out_dir: str) -> list[str]:
    """Write lift.csv, campaigns.csv, merchants.csv and (with matplotlib)
    report.png; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("lift.csv", "campaigns.csv", "merchants.csv")]
    write_rows(paths[0], [lift_row(c, figures) for c in figures.campaigns])
    write_rows(paths[1], [stock_row(s, figures) for s in figures.stocks])
    write_rows(paths[2], [merchant_row(m, figures) for m in figures.merchants])
    if plotting_available():
        from engine.cli import report_chart
        paths.append(os.path.join(out_dir, "report.png"))
        report_chart.draw(paths[-1], figures)
    return paths


def budget_text(budget: int) -> str:
    return UNLIMITED if budget == 0 else major_units(budget)


def lift_row(c: dict, figures: Figures) -> dict:
    t, h, inc = c["treated"], c["holdout"], c["incremental_payers"]
    cost, conv, gmv = c["cost_per_incremental_payer"], c["conversion"], c["incremental_gmv"]
    stock = next(s for s in figures.stocks if s["id"] == c["stock"])
    return {
        "campaign": c["label"], "coupon": c["stock_label"],
        "sent_at": local_time(c["at"], figures.tz_offset_ms),
        "measured_until": local_time(c["until"] or c["now"], figures.tz_offset_ms),
        "currency": figures.currency, "segment_users": c["size"],
        "treated": t["users"], "held_out": h["users"], "issued": c["issued"],
        "not_issued": ";".join(f"{k}={v}" for k, v in sorted(c["not_issued"].items())),
        "redeemed": c["redeemed"], "discount_spent": major_units(c["discount"]),
        "cost_per_redemption": opt_money(c["cost_per_redemption"]),
        "conversion_treated_pct": ppm_pct(t["conversion_ppm"]),
        "conversion_held_out_pct": ppm_pct(h["conversion_ppm"]),
        "incremental_payers": inc["value"], "incremental_payers_low": inc["low"],
        "incremental_payers_high": inc["high"],
        "cost_per_incremental_payer": opt_money(cost["value"]),
        "cost_per_incremental_payer_low": opt_money(cost["low"]),
        "cost_per_incremental_payer_high": opt_money(cost["high"]),
        "new_customers": t["new_converted"],
        "returning_customers": t["converted"] - t["new_converted"],
        "incremental_gmv": opt_money(gmv["value"]), "incremental_gmv_low": opt_money(gmv["low"]),
        "incremental_gmv_high": opt_money(gmv["high"]),
        "lift_conclusive": conv["conclusive"], "lift_reason": conv["reason"] or "",
        "budget": budget_text(stock["budget"]),
        "budget_left": UNLIMITED if stock["budget"] == 0 else major_units(stock["budget_left"]),
        "verdict": c["verdict"], "why": c["why"],
    }


def stock_row(s: dict, figures: Figures) -> dict:
    return {
        "campaign": s["label"], "currency": figures.currency, "issued": s["issued"],
        "redeemed": s["redeemed"], "redemption_rate_pct": f"{s['redemption_rate_bps'] / 100:.2f}",
        "discount_spent": major_units(s["discount_spent"]),
        "cost_per_redemption": opt_money(nearest(s["discount_spent"], s["redeemed"])),
        "budget": budget_text(s["budget"]),
        "budget_left": UNLIMITED if s["budget"] == 0 else major_units(s["budget_left"]),
        "gmv": major_units(s["gmv"]), "new_customers": s["payers_new"],
        "returning_customers": s["payers_returning"],
    }


def merchant_row(m: dict, figures: Figures) -> dict:
    return {"merchant": m["label"], "currency": figures.currency, "payments": m["payments"],
            "gmv": major_units(m["gmv"]), "unique_payers": m["unique_payers"],
            "repeat_payers": m["repeat_payers"],
            "repeat_payer_share_pct": f"{m['repeat_payer_share_bps'] / 100:.2f}",
            "coupon_payments": m["coupon_payments"]}


def nearest(numerator: int, denominator: int) -> int | None:
    """numerator / denominator to the nearest integer, ties to even, as LIFT
    rounds (None when the denominator is 0)."""
    return round(Fraction(numerator, denominator)) if denominator else None


def opt_money(minor: int | None) -> str:
    return "" if minor is None else major_units(minor)


def ppm_pct(ppm: int | None) -> str:
    """Parts per million as a percentage with 2 decimals, exactly (rounded down)."""
    if ppm is None:
        return ""
    return f"{ppm // 10_000}.{ppm % 10_000 // 100:02d}"


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)


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


# -- the command ------------------------------------------------------------

def add_parsers(subparsers) -> None:
    from engine.cli import admin
    p = subparsers.add_parser(
        "report", help="campaign report (CSV + PNG): lift, redemptions, budgets, merchants; "
                       "from a running server (--connect) or a stopped one's --data")
    p.add_argument("--data", help="the data directory of a stopped server (instead of "
                                  "--connect): every stock, campaign and merchant")
    p.add_argument("--campaigns", type=admin._id_list, default=None,
                   help="targeted campaign ids: 1,2 (default with --data: all)")
    p.add_argument("--stocks", type=admin._id_list, default=None,
                   help="more stock ids: 1,2,3 (the campaigns' own come anyway; "
                        "default with --data: all)")
    p.add_argument("--merchants", type=admin._id_list, default=None,
                   help="merchant ids: 1,2,3 (default with --data: all)")
    p.add_argument("--payer-value", type=major_amount, default=None, metavar="AMOUNT",
                   help="what one extra payer is worth to you, e.g. 25.00: a campaign "
                        "paid off when each extra payer cost at most that")
    p.add_argument("--until", type=int, default=None, metavar="MS",
                   help="measure up to this engine time (ms; default: now)")
    p.add_argument("--out", default="report", help="output directory (default ./report)")
    admin._connection_options(p)


def major_amount(text: str) -> int:
    """"25" or "25.5" or "25.50" in major units -> minor units, exactly."""
    whole, _, cents = text.strip().partition(".")
    if not whole.isdigit() or len(cents) > 2 or (cents and not cents.isdigit()):
        raise argparse.ArgumentTypeError(f"expected an amount like 25.00, got {text!r}")
    return int(whole) * 100 + int(cents.ljust(2, "0") or 0)


def run(args) -> int:
    from engine.cli import admin
    if args.data:
        return run_data_dir(args)
    if args.campaigns is None and args.stocks is None:
        print("scanpay report: name what to report over the wire: --campaigns 1,2 and/or "
              "--stocks 1,2,3 (or --data DIR for every one in a stopped server's data)")
        return admin.EXIT_USAGE
    args.admin_run = run_connected
    return admin.run(args)


def run_connected(args, stdout, stderr) -> int:
    from engine.cli import admin
    with admin._connect(args) as client:
        try:
            figures = gather(Source.of_client(client), args.stocks or [], args.campaigns or [],
                             args.merchants or [], payer_value=args.payer_value, until=args.until)
        except ReportError as e:
            print(f"scanpay report: {e}", file=stderr)
            return admin.EXIT_FAILED
    return finish(figures, args.out, stdout)


def run_data_dir(args) -> int:
    from engine.core.engine import Engine
    from engine.storage.journal import JournalError
    try:
        engine = Engine(args.data)
    except JournalError as e:
        print(f"scanpay report: cannot open {args.data}: {e} (stop the server first, or "
              f"report from it while it runs: --connect HOST:PORT)")
        return 2
    with engine:
        ledger = engine.state.ledger
        every = {"stocks": sorted(ledger.stocks["id"][:ledger.n_stocks].tolist()),
                 "campaigns": sorted(engine.state.campaigns),
                 "merchants": sorted(ledger.merchants["id"][:ledger.n_merchants].tolist())}
        chosen = {k: every[k] if getattr(args, k) is None else getattr(args, k) for k in every}
        try:
            figures = gather(Source.of_engine(engine), chosen["stocks"], chosen["campaigns"],
                             chosen["merchants"], payer_value=args.payer_value, until=args.until)
        except ReportError as e:
            print(f"scanpay report: {e}")
            return 1
    return finish(figures, args.out, None)


def finish(figures: Figures, out_dir: str, stdout) -> int:
    paths = write(figures, out_dir)
    for line in verdict_lines(figures):
        print(line, file=stdout)
    print("report: " + ", ".join(paths), file=stdout)
    if missing_png_note(paths):
        print(missing_png_note(paths), file=stdout)
    return 0
