"""Operator commands over the socket: `scanpay merchants|wallets|topups|stocks|...`
(writes from a JSON or CSV file), `scanpay refund|reverse|issue` (one write
from flags) and `scanpay balances|coupons|payments|stats|audit` (reads).

Wiring into a CLI is one call each:

    admin.add_parsers(subparsers)          # registers the subcommands
    ...
    if admin.handles(args):
        return admin.run(args)             # exit code: 0 ok, 1 failures, 2 usage/connection

Each write sends the file's items in chunks, prints a one-line summary
("merchants: 120 ok, 3 failed (first: id 7 invalid_argument: ...)") and
exits 1 when any item failed. Results go to `--out F` as JSON or CSV.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from engine.client import (Client, ConnectionLost, Forbidden, NotAuthenticated, PORT_DEFAULT,
                     ProtocolError, RetryDeadlineExceeded, is_unix_path, parse_address)
from engine.protocol.errors import EngineError
from engine.protocol.status import STATUS_OK, Status

ITEMS_PER_CALL_MAX = 1000      # keeps a request far below the 1 MiB frame limit
COUPON_PAGES_MAX = 100_000     # `coupons --user`: pages of up to 1,024 followed
TIMEOUT_MS_DEFAULT = 30_000    # a write waits for the journal's fsync
# AUDIT runs at the lowest priority on the server (engine/server/audit_fork.py):
# wait as long as the server lets it run.
AUDIT_TIMEOUT_MS_DEFAULT = 600_000
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# CSV column types per write. Lists are "1;2;3"; slots are "weekday:start:end;...".
# Columns not listed are passed through (int when they look like one), so the
# server, not this table, decides what is valid.
INT, BOOL, STR, U64_LIST, SLOTS, TIME = "int", "bool", "str", "list", "slots", "time"
COLUMNS = {
    "merchants": {"id": INT, "fee_bps": INT, "tags": U64_LIST, "active": BOOL},
    "wallets": {"id": INT},
    "topups": {"id": INT, "user": INT, "amount": INT},
    "stocks": {
        "id": INT, "funder": STR, "merchant": INT, "kind": STR, "value": INT, "cap": INT,
        "min_spend": INT, "valid_from": TIME, "valid_until": TIME, "validity_ms": INT,
        "merchants": U64_LIST, "tags": U64_LIST, "goods_tags": U64_LIST, "budget": INT,
        "max_issued": INT, "per_user_limit": INT, "stacking": STR, "daily_budget": INT,
        "per_user_daily_limit": INT, "slots": SLOTS, "name": STR,
    },
    "captures": {"payment": INT, "amount": INT},
    "refunds": {"id": INT, "payment": INT, "amount": INT},
    "voids": {"id": INT},
    "reversals": {"id": INT},
    "programs": {"id": INT, "kind": STR, "merchants": U64_LIST, "tags": U64_LIST, "rate": INT,
                 "threshold": INT, "stamps": INT, "reward_stock": INT},
}


@dataclass(frozen=True)
class Write:
    command: str      # subcommand
    op: str           # docs/reference/protocol.md op
    key: str          # the list's key in the request map
    help: str


WRITES = {w.command: w for w in (
    Write("merchants", "MERCHANTS", "merchants", "create or update merchants from a file"),
    Write("wallets", "WALLETS", "users", "open wallets from a file (column/field id)"),
    Write("topups", "TOPUP", "topups", "top up wallets from a file"),
    Write("stocks", "STOCKS", "stocks", "create coupon stocks (campaigns) from a file"),
    Write("captures", "CAPTURE", "captures", "capture authorizations from a file (payment, amount)"),
    Write("refunds", "REFUND", "refunds", "refund payments from a file (id, payment, amount)"),
    Write("voids", "VOID", "payments", "void authorizations from a file (column/field id)"),
    Write("reversals", "REVERSE", "payments", "reverse payments from a file (column/field id)"),
    Write("programs", "PROGRAMS", "programs", "create points programs and stamp cards from a file"),
)}


class UsageError(Exception):
    """The operator's input is wrong; the message says how to fix it."""


# -- parsers ------------------------------------------------------------------

def add_parsers(subparsers) -> None:
    """Register every admin subcommand on an argparse subparsers object."""
    for write in WRITES.values():
        p = subparsers.add_parser(write.command, help=write.help,
                                  description=f"{write.help}. {_FILE_HELP}")
        _connection_options(p)
        p.add_argument("--file", "-f", required=True,
                       help="F.json (a list of maps) or F.csv (header row); '-' reads JSON from stdin")
        _output_options(p)
        p.set_defaults(admin_run=_run_write, admin_command=write.command)
    p = subparsers.add_parser("balances", help="wallet, merchant and stock balances")
    _connection_options(p)
    p.add_argument("--users", type=_id_list, default=[], help="user ids: 1,2,3")
    p.add_argument("--merchants", type=_id_list, default=[], help="merchant ids: 1,2,3")
    p.add_argument("--stocks", type=_id_list, default=[], help="stock ids: 1,2,3")
    _output_options(p)
    p.set_defaults(admin_run=_run_balances)
    p = subparsers.add_parser("coupons", help="coupons by id, or all of one user's")
    _connection_options(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", type=_id_list, help="coupon ids: 1,2,3")
    which.add_argument("--user", type=int, help="a user id")
    _output_options(p)
    p.set_defaults(admin_run=_run_coupons)
    p = subparsers.add_parser("audit", help="check every ledger invariant; exit 1 if one fails")
    _connection_options(p)
    _output_options(p)
    p.set_defaults(admin_run=_run_audit, timeout_ms=AUDIT_TIMEOUT_MS_DEFAULT)
    _add_single_parsers(subparsers)
    _add_read_parsers(subparsers)


def _add_single_parsers(subparsers) -> None:
    """One refund, one reversal, or a few coupons issued, from flags: the same
    requests as the file commands, built from the command line."""
    p = subparsers.add_parser("refund", help="refund one payment (or part of it) from flags")
    _connection_options(p)
    p.add_argument("--payment", type=int, required=True, help="the payment id")
    p.add_argument("--amount", type=int, required=True, help="minor units (fen) to refund")
    p.add_argument("--id", type=int, required=True, dest="refund_id",
                   help="the refund's own id (resending it replays, never refunds twice)")
    _output_options(p)
    p.set_defaults(admin_run=_run_single, admin_command="refunds",
                   admin_item=lambda a: {"id": a.refund_id, "payment": a.payment,
                                         "amount": a.amount})
    p = subparsers.add_parser("reverse", help="reverse one payment from flags (REVERSE)")
    _connection_options(p)
    p.add_argument("--payment", type=int, required=True, help="the payment id")
    _output_options(p)
    p.set_defaults(admin_run=_run_single, admin_command="reversals",
                   admin_item=lambda a: a.payment)
    p = subparsers.add_parser("issue", help="issue coupons of one stock to one user (ISSUE)")
    _connection_options(p)
    p.add_argument("--stock", type=int, required=True, help="the stock (campaign) id")
    p.add_argument("--user", type=int, required=True, help="the user id")
    p.add_argument("--coupon", type=int, required=True, action="append",
                   help="a new coupon id (repeat for several)")
    _output_options(p)
    p.set_defaults(admin_run=_run_issue)


def _add_read_parsers(subparsers) -> None:
    p = subparsers.add_parser("payments", help="payments by id (GET_PAYMENTS)")
    _connection_options(p)
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="payment ids")
    _output_options(p)
    p.set_defaults(admin_run=_run_payments)
    p = subparsers.add_parser("stats", help="campaign and merchant analytics (STATS)")
    _connection_options(p)
    p.add_argument("--stocks", type=_id_list, default=[], help="stock ids: 1,2,3")
    p.add_argument("--merchants", type=_id_list, default=[], help="merchant ids: 1,2,3")
    _output_options(p)
    p.set_defaults(admin_run=_run_stats)


_FILE_HELP = ("CSV lists are written 1;2;3 and slots 0:540:600;1:540:600 "
              "(weekday:start_minute:end_minute); empty cells are left out; "
              "valid_from/valid_until take ms or an ISO date (2025-01-01T00:00+08:00).")


def _connection_options(p) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--connect", default=f"127.0.0.1:{PORT_DEFAULT}", metavar="HOST:PORT",
                   help="server address: HOST:PORT, [IPv6]:PORT, a bare PORT (127.0.0.1:PORT) "
                        "or a Unix socket path with a / in it (default %(default)s); "
                        "several, comma-separated, for a replicated cluster: the request "
                        "goes to the leader (docs/client.md, Several addresses)")
    g.add_argument("--unix", metavar="PATH", help="Unix socket path (instead of --connect)")
    g.add_argument("--key-id", default=os.environ.get("SCANPAY_KEY_ID"),
                   help="key id for HELLO (env SCANPAY_KEY_ID)")
    g.add_argument("--secret", default=os.environ.get("SCANPAY_SECRET"),
                   help="key secret (env SCANPAY_SECRET; prefer it or --secret-file: "
                        "arguments show in ps)")
    g.add_argument("--secret-file", metavar="F", help="read the secret from a file")
    g.add_argument("--timeout-ms", type=int, default=TIMEOUT_MS_DEFAULT,
                   help="per request (default %(default)s)")


def _output_options(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", metavar="F", help="write the results to F (default: "
                   "stdout for reads, nowhere for writes)")
    g.add_argument("--format", choices=("json", "csv"),
                   help="output format (default: from --out's extension, else json)")


def _id_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ids like 1,2,3, got {text!r}") from None


def handles(args) -> bool:
    """Whether `args` are of an admin subcommand."""
    return getattr(args, "admin_run", None) is not None


def run(args, stdout=None, stderr=None) -> int:
    """Run the admin subcommand of `args`; returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    where = args.unix or args.connect
    unix = args.unix or (args.connect if is_unix_path(args.connect) else None)
    try:
        return args.admin_run(args, stdout, stderr)
    except UsageError as e:
        print(f"error: {e}", file=stderr)
        return EXIT_USAGE
    except ConnectionRefusedError:
        print(f"error: connection refused by {where}: is `scanpay serve` running there? "
              f"(start it with `scanpay serve --data DIR --listen {_listen_hint(args.connect)}`, "
              f"or pass --connect HOST:PORT / --unix PATH)", file=stderr)
    except FileNotFoundError as e:
        if unix and e.filename in (None, unix):
            print(f"error: no Unix socket at {unix}: is `scanpay serve --unix "
                  f"{unix}` running?", file=stderr)
        else:
            print(f"error: {e}", file=stderr)
    except RetryDeadlineExceeded as e:
        print(f"error: no server of {where} took the request: {e}; is the cluster up "
              f"(`scanpay cluster status`)?", file=stderr)
    except NotAuthenticated as e:
        print(f"error: {where} requires a key ({e.message}): pass --key-id and "
              f"--secret-file (or set SCANPAY_KEY_ID and SCANPAY_SECRET)", file=stderr)
    except Forbidden as e:
        print(f"error: this key may not do that ({e.message}): admin commands need a "
              f"key with role admin", file=stderr)
    except TimeoutError as e:
        print(f"error: {e} from {where}: the server is overloaded or this is not a scanpay "
              f"server; retry, or raise --timeout-ms", file=stderr)
    except EngineError as e:
        retry = " (retryable: try again)" if e.retryable else ""
        print(f"error: the server refused the request: {e.name}: {e.message}{retry}",
              file=stderr)
    except (ConnectionLost, ProtocolError, OSError) as e:
        print(f"error: {where}: {e}: is it a scanpay server, and is it still running?",
              file=stderr)
    return EXIT_USAGE


def _listen_hint(connect: str) -> str:
    """`--connect 7411` means 127.0.0.1:7411; `serve --listen` needs the host."""
    return f"127.0.0.1:{connect}" if connect.isdigit() else connect


def _connect(args) -> Client:
    secret = args.secret
    if args.secret_file:
        try:
            with open(args.secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise UsageError(f"cannot read --secret-file: {e}") from None
    if (args.key_id is None) != (secret is None):
        raise UsageError("give both --key-id and a secret (--secret-file, --secret or "
                         "SCANPAY_SECRET), or neither")
    unix = args.unix or (args.connect if is_unix_path(args.connect) else None)
    if unix:
        return Client.connect(unix=unix, key_id=args.key_id, secret=secret,
                              timeout_ms=args.timeout_ms, client_name="scanpay-admin")
    try:
        if "," in args.connect:             # a cluster: the failover client follows its leader
            from engine.client.failover import parse_addresses
            host, port = [a.label for a in parse_addresses(args.connect)], PORT_DEFAULT
        else:
            host, port = parse_address(args.connect)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Client.connect(host, port, key_id=args.key_id, secret=secret,
                          timeout_ms=args.timeout_ms, client_name="scanpay-admin")


# -- reading input files --------------------------------------------------------

def read_items(path: str, command: str, stdin=None) -> list:
    """The items of a JSON list (or {key: list}) or a CSV file with a header row."""
    write = WRITES[command]
    if path == "-":
        text, is_csv = (stdin or sys.stdin).read(), False
    else:
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"cannot read --file: {e}") from None
        is_csv = path.lower().endswith(".csv")
    if is_csv:
        items = _csv_items(text, path, COLUMNS[command])
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not JSON ({e}); a .csv file needs the .csv extension")
        if isinstance(data, dict) and write.key in data:
            data = data[write.key]
        if not isinstance(data, list):
            raise UsageError(f"{path}: expected a JSON list of items (or {{\"{write.key}\": [...]}})")
        items = data
    if command in ("wallets", "voids", "reversals"):   # bare ids; accept {id} maps and CSV rows
        items = [item.get("id") if isinstance(item, dict) else item for item in items]
    if not items:
        raise UsageError(f"{path}: no items")
    return items


def _csv_items(text: str, path: str, columns: dict) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise UsageError(f"{path}: empty CSV; the first row must name the columns")
    items = []
    for line, row in enumerate(reader, start=2):
        if None in row:
            raise UsageError(f"{path} line {line}: more cells than header columns")
        item = {}
        for name, cell in row.items():
            cell = (cell or "").strip()
            if cell == "":
                continue        # an empty cell leaves the key out (default / keep)
            try:
                item[name.strip()] = _cell(cell, columns.get(name.strip()))
            except ValueError as e:
                raise UsageError(f"{path} line {line}, column {name}: {e}") from None
        items.append(item)
    return items


def _cell(cell: str, kind: str | None):
    if kind == INT:
        return int(cell)
    if kind == BOOL:
        lowered = cell.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {cell!r}")
        return lowered in ("true", "1", "yes")
    if kind == STR:
        return cell
    if kind == U64_LIST:
        return [int(x) for x in cell.split(";") if x.strip()]
    if kind == SLOTS:
        slots = []
        for slot in cell.split(";"):
            parts = slot.split(":")
            if len(parts) != 3:
                raise ValueError(f"a slot is weekday:start_minute:end_minute, got {slot!r}")
            slots.append([int(p) for p in parts])
        return slots
    if kind == TIME:
        return _time_ms(cell)
    try:
        return int(cell)    # a column this table does not know: the server judges it
    except ValueError:
        return cell


def _time_ms(cell: str) -> int:
    if cell.lstrip("-").isdigit():
        return int(cell)
    try:
        moment = dt.datetime.fromisoformat(cell)
    except ValueError:
        raise ValueError(f"expected ms since the epoch or an ISO date, got {cell!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"give the time zone of {cell!r}, e.g. {cell}+08:00")
    return int(moment.timestamp() * 1000)


# -- commands -------------------------------------------------------------------

def _run_write(args, stdout, stderr) -> int:
    write = WRITES[args.admin_command]
    items = read_items(args.file, write.command)
    _check_output(args)
    rows = _send_items(args, write, items)
    return _summarize_write(args, write, rows, stdout)


def _send_items(args, write: Write, items: list, full: bool = False) -> list[dict]:
    """Send `items` in chunks; one result row per item (the whole result map
    when `full`)."""
    rows = []
    with _connect(args) as client:
        for start in range(0, len(items), ITEMS_PER_CALL_MAX):
            chunk = items[start:start + ITEMS_PER_CALL_MAX]
            reply = client.call(write.op, {write.key: chunk})
            results = reply.get("results", [])
            if len(results) != len(chunk):
                raise ProtocolError(f"{write.op}: {len(chunk)} items sent, "
                                    f"{len(results)} results")
            for index, (item, result) in enumerate(zip(chunk, results), start=start):
                rows.append(result if full else _result_row(index, item, result))
    return rows


def _summarize_write(args, write: Write, rows: list[dict], stdout) -> int:
    ok = [r for r in rows if r["status"] == Status.ok]
    failed = [r for r in rows if r["status"] != Status.ok]
    duplicates = sum(1 for r in ok if r["duplicate"])
    summary = f"{write.command}: {len(ok)} ok"
    if duplicates:
        summary += f" ({duplicates} already there)"
    if failed:
        first = failed[0]
        summary += (f", {len(failed)} failed (first: item {first['index']}, id {first['id']} "
                    f"{first['error']}{': ' + first['message'] if first['message'] else ''})")
    _write_output(args, rows, stdout, default_to_stdout=False)
    print(summary, file=stdout)
    if failed and not args.out:
        print("  every result: rerun with --out results.csv", file=stdout)
    return EXIT_FAILED if failed else EXIT_OK


def _run_single(args, stdout, stderr) -> int:
    """One item from flags: its whole result (cash, discount, fee...) as
    JSON on stdout, a one-line summary on stderr."""
    write = WRITES[args.admin_command]
    item = args.admin_item(args)
    _check_output(args)
    result = _send_items(args, write, [item], full=True)[0]
    _write_output(args, [result] if _format(args) == "csv" else result, stdout)
    return _summarize_one(args.command, result, stderr)


def _summarize_one(command: str, result: dict, stderr) -> int:
    if result.get("status", 0) != 0:
        message = result.get("message", "")
        print(f"{command}: failed: {result.get('error')}{': ' + message if message else ''}",
              file=stderr)
        return EXIT_FAILED
    print(f"{command}: ok" + (" (already done: replayed)" if result.get("duplicate") else ""),
          file=stderr)
    return EXIT_OK


def _run_issue(args, stdout, stderr) -> int:
    from engine.client import issue_record, issue_results
    from engine.protocol.records import ISSUE_RECORD
    _check_output(args)
    records = np.array([issue_record(c, args.stock, args.user) for c in args.coupon],
                       ISSUE_RECORD)
    with _connect(args) as client:
        results = issue_results(client.issue(records))
    rows = [{"coupon": r.coupon, "status": r.status, "error": r.status_name if not r.ok else "",
             "duplicate": r.duplicate, "expires_at": r.expires_at} for r in results]
    _write_output(args, rows, stdout)
    failed = [r for r in rows if r["status"] != Status.ok]
    summary = f"issue: {len(rows) - len(failed)} ok"
    if failed:
        summary += f", {len(failed)} failed (first: coupon {failed[0]['coupon']} {failed[0]['error']})"
    print(summary, file=stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _run_payments(args, stdout, stderr) -> int:
    _check_output(args)
    with _connect(args) as client:
        reply = client.call("GET_PAYMENTS", {"ids": args.ids})
    results = reply.get("results", [])
    _write_output(args, results if _format(args) == "csv" else reply, stdout)
    missing = [r for r in results if r.get("status", 0) != 0]
    print(f"payments: {len(results) - len(missing)} found"
          + (f", {len(missing)} not found (first: {missing[0].get('id')})" if missing else ""),
          file=stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _run_stats(args, stdout, stderr) -> int:
    if not (args.stocks or args.merchants):
        raise UsageError("name something to report: --stocks and/or --merchants")
    _check_output(args)
    request = {"stocks": args.stocks, "merchants": args.merchants}
    with _connect(args) as client:
        reply = client.call("STATS", request)
    if _format(args) == "csv":
        rows = [{"kind": kind[:-1], **entry} for kind in ("stocks", "merchants")
                for entry in reply.get(kind, []) if isinstance(entry, dict)]
        _write_output(args, rows, stdout)
    else:
        _write_output(args, reply, stdout)
    if reply.get("status", 0) != 0:
        print(f"stats: {reply.get('error')}: {reply.get('message', '')}", file=stderr)
        return EXIT_FAILED
    return EXIT_OK


def _result_row(index: int, item, result: dict) -> dict:
    item_id = item.get("id", item.get("payment")) if isinstance(item, dict) else item
    return {"index": index, "id": item_id, "status": result.get("status"),
            "error": result.get("error", ""), "duplicate": bool(result.get("duplicate", False)),
            "message": result.get("message", "")}


def _run_balances(args, stdout, stderr) -> int:
    if not (args.users or args.merchants or args.stocks):
        raise UsageError("name something to report: --users, --merchants and/or --stocks")
    _check_output(args)
    with _connect(args) as client:
        reply = _balances_in_parts(client, {"users": args.users or [],
                                            "merchants": args.merchants or [],
                                            "stocks": args.stocks or []})
    rows = []
    for kind in ("users", "merchants", "stocks"):
        for entry in reply.get(kind, []):
            rows.append({"kind": kind[:-1], **entry})
    if _format(args) == "json":
        _write_output(args, reply, stdout)
    else:
        _write_output(args, rows, stdout)
    missing = [r for r in rows if r.get("status", 0) != 0]
    summary = (f"balances: {len(rows) - len(missing)} found, fees {reply.get('fees')}, "
               f"bank {reply.get('bank')}")
    if missing:
        first = missing[0]
        summary += f"; {len(missing)} not found (first: {first['kind']} {first['id']})"
    print(summary, file=stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _balances_in_parts(client, lists: dict) -> dict:
    """BALANCES of any number of ids, ITEMS_PER_CALL_MAX per list and call
    (the server refuses longer read lists: docs/reference/protocol.md)."""
    calls = max(1, *(-(-len(ids) // ITEMS_PER_CALL_MAX) for ids in lists.values()))
    reply = None
    for k in range(calls):
        part = client.call("BALANCES", {kind: ids[k * ITEMS_PER_CALL_MAX:(k + 1) * ITEMS_PER_CALL_MAX]
                                        for kind, ids in lists.items()})
        if part.get("status", 0) != 0:
            return part
        if reply is None:
            reply = part
        else:
            for kind in lists:
                reply[kind] = reply.get(kind, []) + part.get(kind, [])
    return reply


def _coupons_in_pages(client, request: dict) -> dict:
    """COUPONS by ids in parts of ITEMS_PER_CALL_MAX, or every page of a
    user's coupons (the server answers at most 1,024 a reply, then `next`)."""
    if "ids" in request:
        ids = request["ids"]
        parts = [client.call("COUPONS", {"ids": ids[at:at + ITEMS_PER_CALL_MAX]})
                 for at in range(0, max(len(ids), 1), ITEMS_PER_CALL_MAX)]
        return {"status": STATUS_OK, "results": [r for p in parts for r in p.get("results", [])]}
    reply = client.call("COUPONS", request)
    for _ in range(COUPON_PAGES_MAX):
        if reply.get("status", 0) != 0 or "next" not in reply:
            return reply
        page = client.call("COUPONS", {**request, "after": reply.pop("next")})
        reply = {**page, "results": reply["results"] + page.get("results", [])}
    raise UsageError(f"more than {COUPON_PAGES_MAX} pages of coupons")


def _run_coupons(args, stdout, stderr) -> int:
    _check_output(args)
    request = {"ids": args.ids} if args.ids is not None else {"user": args.user}
    with _connect(args) as client:
        reply = _coupons_in_pages(client, request)
    results = reply.get("results", [])
    _write_output(args, results if _format(args) == "csv" else reply, stdout)
    if reply.get("status", 0) != 0:
        print(f"coupons: {reply.get('error')}: {reply.get('message', '')}".rstrip(": "),
              file=stderr)
        return EXIT_FAILED
    missing = sum(1 for r in results if r.get("status", 0) != 0)
    print(f"coupons: {len(results) - missing} found" + (f", {missing} not found" if missing else ""),
          file=stderr)
    return EXIT_FAILED if missing else EXIT_OK


def _run_audit(args, stdout, stderr) -> int:
    _check_output(args)
    with _connect(args) as client:
        reply = client.call("AUDIT", {})
    checks = reply.get("checks", {})
    rows = [{"check": name, "ok": bool(c.get("ok")), "detail": c.get("detail", "")}
            for name, c in checks.items()]
    _write_output(args, reply if _format(args) == "json" else rows, stdout)
    failed = [r for r in rows if not r["ok"]]
    if reply.get("ok") and not failed:
        at = f", as of journal entry {reply['seq']}" if reply.get("seq") else ""
        print(f"audit: ok ({len(rows)} checks{at})", file=stderr)
        return EXIT_OK
    names = ", ".join(f"{r['check']} ({r['detail']})" for r in failed) or "see the report"
    print(f"audit: FAILED {len(failed)} of {len(rows)} checks: {names}", file=stderr)
    return EXIT_FAILED


# -- output ---------------------------------------------------------------------

def _format(args) -> str:
    if args.format:
        return args.format
    if args.out and args.out.lower().endswith(".csv"):
        return "csv"
    return "json"


def _check_output(args) -> None:
    """Fail before touching the server if the output cannot be written."""
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(directory):
            raise UsageError(f"--out {args.out}: no directory {directory}")


def _write_output(args, data, stdout, default_to_stdout: bool = True) -> None:
    if not args.out and not default_to_stdout:
        return
    if _format(args) == "csv":
        text = _to_csv(data if isinstance(data, list) else [data])
    else:
        text = json.dumps(data, indent=2, default=_json_default) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        stdout.write(text)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _to_csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return out.getvalue()


def _csv_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(":".join(map(str, v)) if isinstance(v, list) else str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def main(argv=None) -> int:
    """Standalone entry (`python -m engine.admin audit`) until the CLI wires it."""
    parser = argparse.ArgumentParser(prog="scanpay", description="Scanpay admin commands")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
