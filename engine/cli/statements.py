"""`scanpay settle` and `scanpay statement`: close a settlement period over
the socket and write one CSV per settlement, in the merchant's currency
units, that an accountant can open in a spreadsheet."""
import csv
import datetime as dt
import os

from engine.cli import admin

COLUMNS = ("gross", "merchant_discount", "platform_discount", "fees", "refund_cash",
           "refund_platform_discount", "refund_merchant_discount", "refund_fee",
           "refunds", "net", "payout")
MINOR_UNITS_PER_MAJOR = 100     # CNY fen; one currency per engine (docs/reference/rules.md)


def major_units(minor: int) -> str:
    """Exact decimal text of an integer amount of minor units: no floats."""
    sign = "-" if minor < 0 else ""
    whole, cents = divmod(abs(minor), MINOR_UNITS_PER_MAJOR)
    return f"{sign}{whole}.{cents:02d}"


def local_time(ms: int, tz_offset_ms: int) -> str:
    zone = dt.timezone(dt.timedelta(milliseconds=tz_offset_ms))
    return dt.datetime.fromtimestamp(ms / 1000, zone).isoformat(timespec="seconds")


def write_csv(path: str, settlement: dict, currency: str, tz_offset_ms: int) -> None:
    """One row per merchant; amounts in major units with two decimals."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(("settlement", "settled_at", "merchant", "currency") + COLUMNS)
        at = local_time(settlement["at"], tz_offset_ms)
        for row in settlement["rows"]:
            out.writerow([settlement["settlement"], at, row["merchant"], currency]
                         + [major_units(row[c]) for c in COLUMNS])
    os.replace(tmp, path)       # a reader never sees half a statement


def csv_path(out_dir: str, number: int) -> str:
    return os.path.join(out_dir, f"settlement-{number:06d}.csv")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("settle", help="close the settlement period, pay merchants out, "
                                             "write its CSV statement")
    admin._connection_options(p)
    p.add_argument("--out-dir", default=".", help="where to write settlement-NNNNNN.csv")
    p.set_defaults(admin_run=run_settle)
    p = subparsers.add_parser("statement", help="write the CSV of a past settlement again")
    admin._connection_options(p)
    p.add_argument("--settlement", type=int, required=True, help="its number (from 1)")
    p.add_argument("--out-dir", default=".", help="where to write settlement-NNNNNN.csv")
    p.set_defaults(admin_run=run_statement)


def run_settle(args, stdout, stderr) -> int:
    with admin._connect(args) as client:
        settlement = client.call("SETTLE", {})
        info = client.server_info
    return finish(args, settlement, info, stdout, stderr)


def run_statement(args, stdout, stderr) -> int:
    with admin._connect(args) as client:
        settlement = client.call("STATEMENT", {"settlement": args.settlement})
        info = client.server_info
    return finish(args, settlement, info, stdout, stderr)


def finish(args, settlement: dict, info, stdout, stderr) -> int:
    if settlement.get("status", 0) != 0:
        print(f"error: {settlement.get('error')}: {settlement.get('message', '')}", file=stderr)
        return admin.EXIT_FAILED
    os.makedirs(args.out_dir, exist_ok=True)
    path = csv_path(args.out_dir, settlement["settlement"])
    write_csv(path, settlement, info.currency, info.tz_offset_ms)
    payout = sum(r["payout"] for r in settlement["rows"])
    print(f"settlement {settlement['settlement']}: {len(settlement['rows'])} merchants, "
          f"payouts {major_units(payout)} {info.currency} -> {path}", file=stdout)
    return admin.EXIT_OK
