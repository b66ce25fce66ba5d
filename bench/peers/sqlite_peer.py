"""SQLite in WAL mode with synchronous=FULL (an fsync per commit): one
BEGIN IMMEDIATE transaction per payment, the rules in Python (SQLite has no
stored procedures), the same coupon rule as the naive ledger."""
from __future__ import annotations

import os
import sqlite3
import threading

from .common import Run, lanes_in_threads, one_at_a_time
from .workload import (FinalState, Payment, Stock, Workload, best_coupon, fee_of, tally)

SCHEMA = """
CREATE TABLE wallets (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0));
CREATE TABLE merchants (id INTEGER PRIMARY KEY, fee_bps INTEGER NOT NULL,
                        balance INTEGER NOT NULL DEFAULT 0);
CREATE TABLE stocks (id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, value INTEGER NOT NULL,
                     cap INTEGER NOT NULL, min_spend INTEGER NOT NULL, budget INTEGER NOT NULL,
                     spent INTEGER NOT NULL DEFAULT 0 CHECK (spent <= budget));
CREATE TABLE coupons (id INTEGER PRIMARY KEY, stock INTEGER NOT NULL, owner INTEGER NOT NULL,
                      used_by INTEGER);
CREATE INDEX coupons_unused ON coupons (owner) WHERE used_by IS NULL;
CREATE TABLE payments (id INTEGER PRIMARY KEY, payer INTEGER NOT NULL,
                       merchant INTEGER NOT NULL, amount INTEGER NOT NULL, cash INTEGER NOT NULL,
                       discount INTEGER NOT NULL, fee INTEGER NOT NULL, coupon INTEGER);
"""
HELD = """SELECT c.id, s.id, s.kind, s.value, s.cap, s.min_spend, s.budget, s.spent
          FROM coupons c JOIN stocks s ON s.id = c.stock
          WHERE c.owner = ? AND c.used_by IS NULL"""
BUSY_TIMEOUT_S = 60
# SQLite has one writer at a time. Left to its busy handler, waiting writers
# sleep in steps of up to 100 ms (408/s from 16 threads against 250/s from
# one in a trial run); an application would queue its writers on a lock in
# the process instead, as this does.


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def setup(path: str, wl: Workload) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    conn = connect(path)
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO wallets VALUES (?, ?)", wl.users.items())
    conn.executemany("INSERT INTO merchants (id, fee_bps) VALUES (?, ?)", wl.merchants.items())
    conn.executemany("INSERT INTO stocks (id, kind, value, cap, min_spend, budget) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     [(s.id, s.kind, s.value, s.cap, s.min_spend, s.budget)
                      for s in wl.stocks.values()])
    conn.executemany("INSERT INTO coupons (id, stock, owner) VALUES (?, ?, ?)",
                     [(c, s, u) for c, (s, u) in wl.coupons.items()])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _apply(conn: sqlite3.Connection, p: Payment) -> str:
    """Inside the caller's transaction: the rules of docs/reference/rules.md's subset."""
    prev = conn.execute("SELECT payer, merchant, amount FROM payments WHERE id = ?",
                        (p.id,)).fetchone()
    if prev is not None:
        return "duplicate" if prev == (p.payer, p.merchant, p.amount) \
            else "exists_with_different_fields"
    row = conn.execute("SELECT fee_bps FROM merchants WHERE id = ?", (p.merchant,)).fetchone()
    if row is None:
        return "merchant_not_found"
    fee_bps = row[0]
    row = conn.execute("SELECT balance FROM wallets WHERE id = ?", (p.payer,)).fetchone()
    if row is None:
        return "payer_not_found"
    held = [(c, Stock(sid, kind, value, cap, min_spend, budget), spent)
            for c, sid, kind, value, cap, min_spend, budget, spent
            in conn.execute(HELD, (p.payer,))]
    best = best_coupon(p.amount, held)
    coupon, stock, discount = best if best else (None, None, 0)
    cash = p.amount - discount
    if row[0] < cash:
        return "insufficient_funds"
    fee = fee_of(p.amount, fee_bps)
    conn.execute("UPDATE wallets SET balance = balance - ? WHERE id = ?", (cash, p.payer))
    if best:
        conn.execute("UPDATE stocks SET spent = spent + ? WHERE id = ?", (discount, stock))
        conn.execute("UPDATE coupons SET used_by = ? WHERE id = ?", (p.id, coupon))
    conn.execute("UPDATE merchants SET balance = balance + ? WHERE id = ?",
                 (p.amount - fee, p.merchant))
    conn.execute("INSERT INTO payments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (p.id, p.payer, p.merchant, p.amount, cash, discount, fee, coupon))
    return "ok"


def payer(conn: sqlite3.Connection, writers: threading.Lock):
    def pay_one(p: Payment) -> str:
        with writers:
            conn.execute("BEGIN IMMEDIATE")     # the write lock up front: no upgrade deadlock
            try:
                name = _apply(conn, p)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT" if name == "ok" else "ROLLBACK")
            return name
    return pay_one


def final_state(conn, outcomes: dict) -> FinalState:
    rows = lambda sql: dict(conn.execute(sql).fetchall())  # noqa: E731
    return FinalState(rows("SELECT id, balance FROM wallets"),
                      rows("SELECT id, balance FROM merchants"),
                      rows("SELECT id, spent FROM stocks"),
                      rows("SELECT id, used_by FROM coupons WHERE used_by IS NOT NULL"),
                      conn.execute("SELECT coalesce(sum(fee), 0) FROM payments").fetchone()[0],
                      outcomes)


def many(path: str, wl: Workload, payments: list[Payment], callers: int, clock):
    lanes = wl.lanes(callers, payments)
    writers = threading.Lock()      # SQLite writers queue here, not in its busy handler
    return lanes_in_threads([connect(path) for _ in lanes], lanes,
                            lambda conn: payer(conn, writers), clock)


def run(tmp: str, wl: Workload, payments: list[Payment], *, callers: int, clock) -> Run:
    path = os.path.join(tmp, "peers.sqlite")
    setup(path, wl)
    if callers > 1:
        names, seconds, latencies = many(path, wl, payments, callers, clock)
        how = (f"BEGIN IMMEDIATE per payment, {callers} threads with a connection each, "
               "queued on a lock in the process")
    else:
        conn = connect(path)
        started = clock()
        names, latencies = one_at_a_time(payer(conn, threading.Lock()), payments, clock)
        seconds = clock() - started
        conn.close()
        how = "BEGIN IMMEDIATE per payment, 1 connection"
    conn = connect(path)
    state = final_state(conn, tally(names))
    conn.close()
    return Run(f"SQLite {sqlite3.sqlite_version} WAL", "many" if callers > 1 else "one", how,
               len(payments), seconds, latencies, "payment", state)
