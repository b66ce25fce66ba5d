"""The load test's world and its id namespace, apart from locust (importing
locust monkey-patches the process, so tests import this module instead).

Every id the load test creates or touches (merchants, wallets, stocks,
coupons, payments, top-ups) lies in its own namespace: ID_BASE + offset,
offset below 2**48, ID_BASE = SCANPAY_LOAD_ID_PREFIX << 48 (default 0x5C00,
so ids from 0x5C00_0000_0000_0000). It never writes an id outside it, and
before it writes anything it refuses a server that holds data outside it
(`foreign_data`), unless SCANPAY_LOAD_ALLOW_SHARED=1.
"""
import os
import secrets
from itertools import count

import numpy as np

from engine.client import Client
from engine.core.ops.query import WIRE_LOOKUP_ITEMS_MAX
from engine.protocol.records import ISSUE_RECORD
from engine.protocol.status import STATUS_NAMES, Status

ID_OFFSET_BITS = 48
ID_PREFIX_DEFAULT = 0x5C00
SETUP_ITEMS_PER_CALL = 1000
PROBE_IDS_PER_CALL = 1000              # ids per BALANCES list (the wire allows WIRE_LOOKUP_ITEMS_MAX)
PROBE_LOW_IDS = 1000                   # ids 1..1000 of each kind: where real data starts
PROBE_CALLS_MAX = 1000                 # our wallets/merchants: at most 1,000,000 of each
assert PROBE_IDS_PER_CALL <= WIRE_LOOKUP_ITEMS_MAX and PROBE_LOW_IDS <= WIRE_LOOKUP_ITEMS_MAX
TOPUP_AMOUNT = 10**10                  # minor units per wallet per run: never runs dry
VALID_UNTIL_MS = 4_102_444_800_000     # 2100-01-01: stocks never end during a test


class WorldError(Exception):
    pass


def _env_int(name: str, default: int, low: int, high: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text, 0)
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected a whole number") from None
    if not low <= value <= high:
        raise SystemExit(f"{name}={value}: must be in {low}..{high}")
    return value


# The prefix is the top 16 bits of every id; 1..0x7FFF keeps ids below 2**63.
ID_PREFIX = _env_int("SCANPAY_LOAD_ID_PREFIX", ID_PREFIX_DEFAULT, 1, 0x7FFF)
ID_BASE = ID_PREFIX << ID_OFFSET_BITS
ALLOW_SHARED = os.environ.get("SCANPAY_LOAD_ALLOW_SHARED", "") == "1"

# Fresh ids per process and run, so that runs against the same data directory
# neither replay nor collide: a random 22-bit run prefix above a 24-bit
# counter, above 2**47 so they never meet the world's small offsets.
_ids = count(ID_BASE + (1 << 47) + (secrets.randbits(22) << 24))


def fresh_id() -> int:
    return next(_ids)


def in_namespace(ident: int) -> bool:
    return ID_BASE < ident < ID_BASE + (1 << ID_OFFSET_BITS)


def users(n: int) -> list[int]:
    return list(range(ID_BASE + 1, ID_BASE + 1 + n))


def merchants(n: int) -> list[int]:
    return list(range(ID_BASE + 1, ID_BASE + 1 + n))


def stocks() -> list[dict]:
    first_merchant = ID_BASE + 1
    return [
        {"id": ID_BASE + 9001, "funder": "platform", "kind": "fixed", "value": 5_00,
         "min_spend": 20_00, "valid_from": 0, "valid_until": VALID_UNTIL_MS,
         "stacking": "stackable"},
        {"id": ID_BASE + 9002, "funder": "platform", "kind": "percent", "value": 1000,
         "cap": 20_00, "valid_from": 0, "valid_until": VALID_UNTIL_MS, "stacking": "exclusive"},
        {"id": ID_BASE + 9003, "funder": "merchant", "merchant": first_merchant, "kind": "fixed",
         "value": 3_00, "valid_from": 0, "valid_until": VALID_UNTIL_MS,
         "stacking": "stackable"},
    ]


# -- is the server ours to load? --------------------------------------------------

def foreign_data(client: Client) -> str | None:
    """What the server holds outside the namespace, or None if nothing.

    Two looks: ids 1..PROBE_LOW_IDS of wallets, merchants and stocks (where
    real data starts); and the money, which sums to zero over every account
    (AUDIT sum_zero): if our wallets, merchants and stocks plus fees and
    bank do not, some other account holds money."""
    low = list(range(1, PROBE_LOW_IDS + 1))
    reply = client.call("BALANCES", {"users": low, "merchants": low, "stocks": low})
    for kind in ("users", "merchants", "stocks"):
        found = [e["id"] for e in reply[kind] if e["status"] == Status.ok]
        if found:
            return f"{kind[:-1]} {found[0]} (and {len(found) - 1} more low ids)"
    ours = {kind: _our_entries(client, kind) for kind in ("users", "merchants")}
    ours["stocks"] = client.call("BALANCES", {"stocks": [s["id"] for s in stocks()]})["stocks"]
    money = (sum(e["balance"] for e in ours["users"] + ours["merchants"])
             + sum(e["campaign"] for e in ours["stocks"] if e["status"] == Status.ok)
             + reply["fees"] + reply["bank"])
    if money != 0:
        return (f"accounts outside the load test's ids holding {-money} minor units "
                f"(bank {reply['bank']}, fees {reply['fees']})")
    return None


def _our_entries(client: Client, kind: str) -> list[dict]:
    """Our wallets or merchants: ids ID_BASE+1 upward, contiguous, so the
    first chunk with none found ends them."""
    entries = []
    for call in range(PROBE_CALLS_MAX):
        start = ID_BASE + 1 + call * PROBE_IDS_PER_CALL
        chunk = list(range(start, start + PROBE_IDS_PER_CALL))
        found = [e for e in client.call("BALANCES", {kind: chunk})[kind] if e["status"] == Status.ok]
        if not found:
            break
        entries.extend(found)
    return entries


def check_server(client: Client, allow_shared: bool = ALLOW_SHARED) -> None:
    """Refuse a server that holds data outside the namespace (unless told)."""
    if allow_shared:
        return
    found = foreign_data(client)
    if found is not None:
        raise WorldError(
            f"the server holds data outside the load test's ids ({found}): load-test a "
            f"server of its own (a fresh --data directory), or set "
            f"SCANPAY_LOAD_ALLOW_SHARED=1 to run beside it (the load test only writes ids "
            f"from {ID_BASE:#x}, SCANPAY_LOAD_ID_PREFIX={ID_PREFIX:#x})")


# -- the world --------------------------------------------------------------------

def build_world(client: Client, wallets: int, merchant_count: int,
                coupons_per_user: int) -> None:
    """Merchants, wallets, top-ups, stocks, and coupons for every wallet, all
    in the namespace; idempotent apart from fresh top-ups and coupons."""
    user_ids = users(wallets)
    _items(client, "MERCHANTS", "merchants",
           [{"id": m, "fee_bps": 60} for m in merchants(merchant_count)])
    _items(client, "WALLETS", "users", user_ids)
    _items(client, "TOPUP", "topups",
           [{"id": fresh_id(), "user": u, "amount": TOPUP_AMOUNT} for u in user_ids])
    _items(client, "STOCKS", "stocks", stocks())
    coupons = np.zeros(wallets * coupons_per_user, ISSUE_RECORD)
    if len(coupons):
        coupons["coupon"] = [fresh_id() for _ in range(len(coupons))]
        coupons["stock"] = np.resize([s["id"] for s in stocks()], len(coupons))
        coupons["user"] = np.repeat(user_ids, coupons_per_user)
        for start in range(0, len(coupons), client.max_batch):
            results = client.issue(coupons[start:start + client.max_batch])
            bad = results[results["status"] != Status.ok]
            if len(bad):
                raise WorldError(f"ISSUE: {len(bad)} failed, first "
                                 f"{STATUS_NAMES.get(int(bad[0]['status']))}")


def _items(client: Client, op: str, key: str, items: list) -> None:
    for item in items:              # the one rule: nothing outside the namespace
        ident = item["id"] if isinstance(item, dict) else item
        if not in_namespace(ident):
            raise WorldError(f"{op}: id {ident} is outside the load test's namespace")
    for start in range(0, len(items), SETUP_ITEMS_PER_CALL):
        chunk = items[start:start + SETUP_ITEMS_PER_CALL]
        results = client.call(op, {key: chunk})["results"]
        failed = [(item, r) for item, r in zip(chunk, results) if r["status"] != Status.ok]
        if failed:
            item, result = failed[0]
            raise WorldError(f"{op}: {len(failed)} of {len(chunk)} failed, first {item}: "
                             f"{result.get('error')} {result.get('message', '')}")
