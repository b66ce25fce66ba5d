"""Crash-test helper: a process that drives a durable Engine(datadir) with a
deterministic stream of operations and reports each acknowledgement.

    python tests/support/crash_child.py DATADIR --seed 3 --start 0 [options]

Op k of the stream is a pure function of (seed, k) (`op_at`), so a restarted
child resumes anywhere: the parent test tells it where (`--start`, the first
op it has no acknowledgement for). The one exception is a PAY by payment code,
which uses the code the previous PAYMENT_CODE of this process returned (or a
bogus code after a restart); and SETTLE, re-sent after a crash, closes a second
period. `--reproducible` leaves those out, so that the state after op k is a
function of (seed, k) alone and an independent reference can be built.

Protocol on stdout, one line per event, each written with a single os.write
(a line is either whole or absent after SIGKILL):

    ready <journal last_seq> <snapshot seq>
    ack <k> <journal seq of op k> <sha256 of the result>   (op k is durable)
    read <k> <journal seq>                                (a read op answered)
    err <k> <error name>                                  (refused, not journaled)
    snapshot <seq> <pid of the writer>                    (--snapshot-at: fork started)
    done

The engine time of op k is T0 + k * STEP_MS (engine time = max(last, clock)),
so a re-sent op k runs at the same engine time as its first attempt.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/ -> the root
for path in (ROOT, os.path.join(ROOT, "tests")):     # engine, and support.* when run as a script
    if path not in sys.path:
        sys.path.insert(0, path)

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from engine.protocol.limits import BATCH_RECORDS_MAX  # noqa: E402
from engine.protocol.records import (CAPTURE_RECORD, ISSUE_RECORD, PAY_AUTHORIZE,  # noqa: E402
                            PAY_NO_COUPONS, PAY_PAYER_IS_CODE, PAY_RECORD, REFUND_RECORD)
from support.clock import Clock  # noqa: E402

T0 = 1_700_000_000_000
STEP_MS = 1_000
HOLD_MS = 40 * STEP_MS       # authorizations expire within the stream
USERS = 300
MERCHANTS = 20
IDS_PER_OP = 10_000          # record ids of op k: k * IDS_PER_OP + 1 ...
SETUP_OPS = 4                # ops 0..3 build the world


def op_time_ms(k: int) -> int:
    """The engine time of op k of the stream: the clock is set to it before the op."""
    return T0 + k * STEP_MS


# ------------------------------------------------------------------ the stream

def base_stocks() -> list[dict]:
    far = T0 + 10**9
    common = {"valid_from": T0, "valid_until": far}
    return [
        {"id": 1, "funder": "platform", "kind": "fixed", "value": 500,
         "stacking": "stackable", "budget": 10**7, **common},
        {"id": 2, "funder": "platform", "kind": "percent", "value": 1000, "cap": 2000,
         "stacking": "exclusive", **common},
        {"id": 3, "funder": "platform", "kind": "fixed", "value": 300, "min_spend": 5000,
         "tags": [1], "stacking": "stackable", **common},
        {"id": 4, "funder": "merchant", "merchant": 1, "kind": "fixed", "value": 1000,
         "stacking": "exclusive", **common},
        {"id": 5, "funder": "platform", "kind": "fixed", "value": 200,
         "validity_ms": 30 * STEP_MS, "stacking": "stackable", **common},
        {"id": 6, "funder": "platform", "kind": "fixed", "value": 100, "max_issued": 50,
         "stacking": "stackable", **common},
        {"id": 7, "funder": "platform", "kind": "fixed", "value": 150, "per_user_limit": 2,
         "stacking": "stackable", **common},
        {"id": 8, "funder": "platform", "kind": "fixed", "value": 5000, "budget": 20_000,
         "stacking": "exclusive", **common},
        {"id": 9, "funder": "platform", "kind": "percent", "value": 500, "merchants": [2, 3],
         "goods_tags": [7], "stacking": "stackable", **common},
        {"id": 10, "funder": "platform", "kind": "fixed", "value": 400, "stacking": "stackable",
         "valid_from": T0 + 400 * STEP_MS, "valid_until": far},
        {"id": 11, "funder": "platform", "kind": "fixed", "value": 250, "stacking": "stackable",
         "valid_from": T0, "valid_until": T0 + 150 * STEP_MS},
        {"id": 12, "funder": "merchant", "merchant": 2, "kind": "percent", "value": 2000,
         "cap": 500, "stacking": "stackable", **common},
    ]


def _rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, k, 0xC4A5])


def _size(rng, small: int, big: int) -> int:
    """Mostly small batches; now and then a large one (big entries: torn writes)."""
    if rng.random() < 0.06:
        return int(rng.integers(big // 4, big + 1))
    return int(rng.integers(1, small + 1))


# Ops whose result depends on more than (seed, k) and the state, or that change
# state when re-sent after a crash (a second SETTLE closes another period):
# left out of a reproducible stream.
NOT_REPRODUCIBLE = ("PAYMENT_CODE", "PAY_BY_CODE", "SETTLE")
KIND_WEIGHTS = {
    "PAY": 0.36, "ISSUE": 0.16, "TOPUP": 0.06, "WALLETS": 0.02, "MERCHANTS": 0.02,
    "STOCKS": 0.02, "PAYMENT_CODE": 0.05, "PAY_BY_CODE": 0.05, "CAPTURE": 0.04,
    "CAPTURE_RECORDS": 0.03, "VOID": 0.03, "REFUND": 0.04, "REFUND_RECORDS": 0.03,
    "REVERSE": 0.03, "SETTLE": 0.01, "BALANCES": 0.05,
}
KINDS = tuple(KIND_WEIGHTS)
READS = ("BALANCES",)            # not journaled (but may journal an EXPIRE of holds)


def _kind(rng, codes: bool) -> str:
    weights = np.array([0.0 if (not codes and kind in NOT_REPRODUCIBLE) else w
                        for kind, w in KIND_WEIGHTS.items()])
    return KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]


def _earlier_payments(seed: int, k: int, rng, codes: bool, n: int) -> list[int]:
    """Ids of n payments of recent PAY ops (authorizations preferred): they
    may or may not have succeeded, which is the point."""
    out = []
    for _ in range(n):
        for _attempt in range(6):
            j = int(rng.integers(max(SETUP_OPS, k - 50), k)) if k > SETUP_OPS else k
            rng_j = _rng(seed, j)
            if SETUP_OPS <= j < k and _kind(rng_j, codes) == "PAY":
                records = pay_batch(seed, j, rng_j, codes)
                auth = np.flatnonzero(records["flags"] & PAY_AUTHORIZE)
                pick = auth if len(auth) and rng.random() < 0.6 else np.arange(len(records))
                out.append(int(records["id"][pick[int(rng.integers(0, len(pick)))]]))
                break
        else:
            out.append(int(rng.integers(1, k * IDS_PER_OP + 1)))
    return out


def op_at(seed: int, k: int, codes: bool = True) -> tuple[str, object]:
    """Op k of the stream: ("PAY", records) | ("ISSUE", records) |
    (map op name, request) | ("PAY_BY_CODE", records with payer 0)."""
    if k < SETUP_OPS:
        return _setup_op(seed, k)
    rng = _rng(seed, k)
    kind = _kind(rng, codes)
    if kind == "PAY":
        return "PAY", pay_batch(seed, k, rng, codes)
    if kind == "ISSUE":
        return "ISSUE", issue_batch(k, rng)
    if kind == "WALLETS":
        return "WALLETS", {"users": [int(u) for u in rng.integers(1, USERS + 40, 5)]}
    if kind == "PAYMENT_CODE":
        return "PAYMENT_CODE", {"user": int(rng.integers(1, USERS + 5))}
    if kind == "SETTLE":
        return kind, {}
    if kind == "BALANCES":
        return kind, {"users": [int(u) for u in rng.integers(1, USERS + 1, 3)]}
    if kind in KIND_OPS:
        return KIND_OPS[kind](seed, k, rng, codes, kind)
    records = np.zeros(int(rng.integers(1, 3)), PAY_RECORD)
    records["id"] = k * IDS_PER_OP + 1 + np.arange(len(records))
    records["merchant"] = rng.integers(1, MERCHANTS + 1, len(records))
    records["amount"] = rng.integers(100, 20_000, len(records))
    records["flags"] = PAY_PAYER_IS_CODE
    return "PAY_BY_CODE", records


def _setup_op(seed: int, k: int) -> tuple[str, object]:
    """Ops 0..3: the world."""
    if k == 0:
        return "MERCHANTS", {"merchants": [
            {"id": m, "fee_bps": [0, 38, 60, 100][m % 4], "tags": [1 + m % 3, 100 + m % 5]}
            for m in range(1, MERCHANTS + 1)]}
    if k == 1:
        return "WALLETS", {"users": list(range(1, USERS + 1))}
    if k == 2:
        amounts = _rng(seed, k).integers(10**5, 10**7, USERS)
        return "TOPUP", {"topups": [{"id": u, "user": u, "amount": int(amounts[u - 1])}
                                    for u in range(1, USERS + 1)]}
    assert k == 3
    return "STOCKS", {"stocks": base_stocks()}


def _topup_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    items = []
    for i in range(int(rng.integers(1, 20))):
        item = {"id": k * IDS_PER_OP + i + 1, "user": int(rng.integers(1, USERS + 8)),
                "amount": int(rng.integers(1, 10**6))}
        roll = rng.random()
        if roll < 0.05:
            item["amount"] = 0                       # invalid_amount
        elif roll < 0.12:                            # an earlier id, other fields
            item["id"] = int(rng.integers(1, USERS + 1))
        items.append(item)
    return "TOPUP", {"topups": items}


def _merchants_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    m = int(rng.integers(1, MERCHANTS + 3))
    roll = rng.random()
    if roll < 0.3:
        item = {"id": m, "active": bool(rng.random() < 0.6)}
    elif roll < 0.8:
        item = {"id": m, "fee_bps": int(rng.integers(0, 200))}
    else:
        item = {"id": m, "fee_bps": 20_000}          # invalid_argument
    return "MERCHANTS", {"merchants": [item]}


def _stocks_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    roll = rng.random()
    stocks = base_stocks()
    if roll < 0.3:
        item = stocks[int(rng.integers(0, len(stocks)))]            # duplicate
    elif roll < 0.5:
        item = dict(stocks[int(rng.integers(0, len(stocks)))], value=77)  # different
    elif roll < 0.6:
        item = {"id": 1000 + k, "funder": "platform", "kind": "fixed", "value": 5,
                "valid_from": T0 + 10, "valid_until": T0}                 # invalid
    else:
        item = {"id": 1000 + k, "funder": "platform", "kind": "fixed",
                "value": int(rng.integers(1, 900)), "stacking": "stackable",
                "valid_from": T0, "valid_until": T0 + 10**9,
                "budget": int(rng.integers(0, 50_000))}
    return "STOCKS", {"stocks": [item]}


def _capture_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    ids = _earlier_payments(seed, k, rng, codes, int(rng.integers(1, 6)))
    amounts = [int(a) for a in rng.integers(1, 40_000, len(ids))]
    if kind == "CAPTURE":
        return kind, {"captures": [{"payment": i, "amount": a} for i, a in zip(ids, amounts)]}
    records = np.zeros(len(ids), CAPTURE_RECORD)
    records["payment"], records["amount"] = ids, amounts
    return kind, records


def _void_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    ids = _earlier_payments(seed, k, rng, codes, int(rng.integers(1, 4)))
    if kind == "REVERSE" and rng.random() < 0.2:
        ids.append((k + 5) * IDS_PER_OP + 1)       # reversed before it arrives
    return kind, {"payments": ids}


def _refund_op(seed: int, k: int, rng, codes: bool, kind: str) -> tuple[str, object]:
    ids = _earlier_payments(seed, k, rng, codes, int(rng.integers(1, 6)))
    refund_ids = [k * IDS_PER_OP + i + 1 for i in range(len(ids))]
    amounts = [int(a) for a in rng.integers(1, 30_000, len(ids))]
    if rng.random() < 0.2:                         # an earlier refund id again
        refund_ids[0] = int(rng.integers(SETUP_OPS * IDS_PER_OP, k * IDS_PER_OP + 1))
    if kind == "REFUND":
        return kind, {"refunds": [{"id": r, "payment": i, "amount": a}
                                  for r, i, a in zip(refund_ids, ids, amounts)]}
    records = np.zeros(len(ids), REFUND_RECORD)
    records["id"], records["payment"], records["amount"] = refund_ids, ids, amounts
    return kind, records


# The ops of op_at drawn in a function of their own: kind -> (seed, k, rng, codes, kind).
KIND_OPS = {
    "TOPUP": _topup_op, "MERCHANTS": _merchants_op, "STOCKS": _stocks_op,
    "CAPTURE": _capture_op, "CAPTURE_RECORDS": _capture_op,
    "VOID": _void_op, "REVERSE": _void_op,
    "REFUND": _refund_op, "REFUND_RECORDS": _refund_op,
}


def issue_batch(k: int, rng) -> np.ndarray:
    n = _size(rng, 200, BATCH_RECORDS_MAX)
    records = np.zeros(n, ISSUE_RECORD)
    records["coupon"] = k * IDS_PER_OP + 1 + np.arange(n)
    records["stock"] = rng.integers(1, 14, n)                 # 13 is unknown
    records["user"] = rng.integers(1, USERS + 6, n)           # some without wallet
    records["reserved"] = np.where(rng.random(n) < 0.02, 1, 0)
    again = rng.random(n) < 0.05                              # an earlier coupon id
    records["coupon"][again] = rng.integers(SETUP_OPS * IDS_PER_OP,
                                            k * IDS_PER_OP + 1, int(again.sum()))
    return records


def pay_batch(seed: int, k: int, rng, codes: bool = True) -> np.ndarray:
    n = _size(rng, 300, BATCH_RECORDS_MAX)
    records = np.zeros(n, PAY_RECORD)
    records["id"] = k * IDS_PER_OP + 1 + np.arange(n)
    records["payer"] = rng.integers(1, USERS + 4, n)
    records["merchant"] = rng.integers(1, MERCHANTS + 2, n)
    records["amount"] = rng.integers(100, 60_000, n)
    records["goods_tag"] = rng.choice([0, 7, 9], n)
    records["user_data"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    roll = rng.random(n)
    records["amount"][roll < 0.02] = 0                        # invalid_amount
    records["amount"][(roll >= 0.02) & (roll < 0.05)] = 10**9  # insufficient_funds
    flags = rng.random(n)
    records["flags"][flags < 0.10] = PAY_NO_COUPONS
    records["flags"][(flags >= 0.10) & (flags < 0.13)] = PAY_AUTHORIZE
    again = rng.random(n) < 0.04                              # an earlier payment id
    records["id"][again] = rng.integers(SETUP_OPS * IDS_PER_OP, k * IDS_PER_OP + 1,
                                        int(again.sum()))
    # Explicit coupons: a coupon issued by a recent ISSUE op, paid by its owner.
    explicit = np.flatnonzero((rng.random(n) < 0.15) & (flags >= 0.13))
    for i in explicit[:40].tolist():
        j = int(rng.integers(max(SETUP_OPS, k - 60), k)) if k > SETUP_OPS else k
        earlier = None
        if SETUP_OPS <= j < k:
            rng_j = _rng(seed, j)
            if _kind(rng_j, codes) == "ISSUE":      # same draws as op_at(seed, j)
                earlier = issue_batch(j, rng_j)
        if earlier is not None:
            pick = int(rng.integers(0, len(earlier)))
            records["coupons"][i, 0] = earlier["coupon"][pick]
            records["payer"][i] = earlier["user"][pick]
            if rng.random() < 0.3 and len(earlier) > 1:      # two coupons
                records["coupons"][i, 1] = earlier["coupon"][(pick + 1) % len(earlier)]
        else:
            records["coupons"][i, 0] = rng.integers(1, k * IDS_PER_OP + 1)
    return records


# ------------------------------------------------------------------ results

def result_digest(result) -> str:
    """sha256 of a batch's result bytes, or of the MessagePack of a map reply."""
    if isinstance(result, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(result).tobytes()).hexdigest()
    return hashlib.sha256(msgspec.msgpack.encode(result)).hexdigest()


def send(eng, name: str, payload, last_code: list):
    """Apply one op of the stream to an Engine; returns its result."""
    if name == "PAY":
        return eng.pay(payload)
    if name == "ISSUE":
        return eng.issue(payload)
    if name == "CAPTURE_RECORDS":
        return eng.capture(payload)
    if name == "REFUND_RECORDS":
        return eng.refund(payload)
    if name == "PAY_BY_CODE":
        records = payload.copy()
        records["payer"] = last_code[0] if last_code[0] else 123_456_789_012_345_678
        return eng.pay(records)
    reply = eng.call(name, payload)
    if name == "PAYMENT_CODE" and reply.get("status") == 0:
        last_code[0] = reply["code"]
    return reply


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    from engine import Engine
    from engine.protocol.errors import EngineError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datadir")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first op to send")
    p.add_argument("--count", type=int, default=10**9, help="ops to send, then exit")
    p.add_argument("--reproducible", action="store_true",
                   help="leave out the ops of NOT_REPRODUCIBLE (payment codes, SETTLE)")
    p.add_argument("--snapshot-every", type=int, default=10**6)
    p.add_argument("--retain", type=int, default=2)
    p.add_argument("--segment-bytes", type=int, default=0)
    p.add_argument("--snapshot-at", type=int, default=-1,
                   help="after op k, start a snapshot (no wait) and say so")
    p.add_argument("--slow-snapshot", type=float, default=0.0,
                   help="the snapshot writer waits this long first (a slow disk, a big state)")
    p.add_argument("--hold", action="store_true", help="after the last op, wait to be killed")
    args = p.parse_args(argv)

    if args.slow_snapshot:
        import engine.storage.snapshot as snapshot_module
        write_snapshot = snapshot_module.write_snapshot

        def slow_write_snapshot(*a, **kw):
            time.sleep(args.slow_snapshot)
            return write_snapshot(*a, **kw)
        snapshot_module.write_snapshot = slow_write_snapshot

    clock = Clock(op_time_ms(args.start))
    eng = Engine(args.datadir, clock=clock, hold_ms=HOLD_MS,
                 snapshot_every_entries=args.snapshot_every, retain_snapshots=args.retain,
                 segment_bytes_max=args.segment_bytes or None)
    journal = eng.storage.journal
    say = lambda line: os.write(1, (line + "\n").encode())  # noqa: E731
    say(f"ready {journal.last_seq} {eng.storage.snapshot_seq}")
    last_code = [0]
    for k in range(args.start, args.start + args.count):
        clock.now_ms = op_time_ms(k)
        name, payload = op_at(args.seed, k, codes=not args.reproducible)
        try:
            result = send(eng, name, payload, last_code)
        except EngineError as e:
            say(f"err {k} {e.name}")
            continue
        if name in READS:
            say(f"read {k} {journal.last_seq}")
        else:
            say(f"ack {k} {journal.last_seq} {result_digest(result)}")
        if k == args.snapshot_at:
            info = eng.snapshot(wait=False)
            say(f"snapshot {info['seq']} {eng.storage.snapshot_child[0]}")
    say("done")
    if args.hold:
        time.sleep(3600)
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
