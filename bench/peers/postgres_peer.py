"""PostgreSQL: one plpgsql call per payment, row locks taken in one order
(the wallet, then the payer's stocks by id, then the merchant), fsync and
synchronous_commit on. The server is initdb'd into a temp dir and started
by this module; as root it runs as the `postgres` user (postgres refuses
root)."""
from __future__ import annotations

import glob
import os
import pwd
import signal
import subprocess
import threading

from .common import Run, free_port, lanes_in_threads, one_at_a_time, stop_process, wait_port
from .workload import FinalState, Payment, Workload, tally

SCHEMA = """
CREATE TABLE wallets (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
CREATE TABLE merchants (id bigint PRIMARY KEY, fee_bps int NOT NULL,
                        balance bigint NOT NULL DEFAULT 0);
CREATE TABLE stocks (id bigint PRIMARY KEY, kind smallint NOT NULL, value bigint NOT NULL,
                     cap bigint NOT NULL, min_spend bigint NOT NULL, budget bigint NOT NULL,
                     spent bigint NOT NULL DEFAULT 0 CHECK (spent <= budget));
CREATE TABLE coupons (id bigint PRIMARY KEY, stock bigint NOT NULL REFERENCES stocks,
                      owner bigint NOT NULL REFERENCES wallets, used_by bigint);
CREATE INDEX coupons_unused ON coupons (owner) WHERE used_by IS NULL;
CREATE TABLE payments (id bigint PRIMARY KEY, payer bigint NOT NULL, merchant bigint NOT NULL,
                       amount bigint NOT NULL, cash bigint NOT NULL, discount bigint NOT NULL,
                       fee bigint NOT NULL, coupon bigint);
"""

# Returns 0 ok, -1 duplicate, else engine.status.Status of the failure.
PAY_FUNCTION = """
CREATE FUNCTION pay(p_id bigint, p_payer bigint, p_merchant bigint, p_amount bigint)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_prev payments%ROWTYPE;
  v_fee_bps int;
  v_balance bigint;
  v_best_coupon bigint;
  v_best_stock bigint;
  v_best_d bigint := 0;
  v_d bigint;
  v_cash bigint;
  v_fee bigint;
  r record;
BEGIN
  SELECT * INTO v_prev FROM payments WHERE id = p_id;
  IF FOUND THEN
    IF (v_prev.payer, v_prev.merchant, v_prev.amount) = (p_payer, p_merchant, p_amount) THEN
      RETURN -1;
    END IF;
    RETURN 9;                                   -- exists_with_different_fields
  END IF;
  SELECT fee_bps INTO v_fee_bps FROM merchants WHERE id = p_merchant;
  IF NOT FOUND THEN RETURN 4; END IF;           -- merchant_not_found
  SELECT balance INTO v_balance FROM wallets WHERE id = p_payer FOR UPDATE;
  IF NOT FOUND THEN RETURN 6; END IF;           -- payer_not_found
  FOR r IN
    SELECT c.id AS coupon, s.id AS stock, s.kind, s.value, s.cap, s.min_spend, s.budget, s.spent
    FROM coupons c JOIN stocks s ON s.id = c.stock
    WHERE c.owner = p_payer AND c.used_by IS NULL
    ORDER BY s.id, c.id
    FOR UPDATE OF s
  LOOP
    CONTINUE WHEN p_amount < r.min_spend;
    IF r.kind = 0 THEN
      v_d := LEAST(r.value, p_amount);
    ELSE
      v_d := p_amount * r.value / 10000;
      IF r.cap > 0 THEN v_d := LEAST(v_d, r.cap); END IF;
    END IF;
    CONTINUE WHEN v_d < 1 OR r.budget - r.spent < v_d;
    IF v_d > v_best_d OR (v_d = v_best_d AND r.coupon < v_best_coupon) THEN
      v_best_d := v_d; v_best_coupon := r.coupon; v_best_stock := r.stock;
    END IF;
  END LOOP;
  v_cash := p_amount - v_best_d;
  IF v_balance < v_cash THEN RETURN 8; END IF;  -- insufficient_funds
  v_fee := (p_amount * v_fee_bps + 5000) / 10000;
  UPDATE wallets SET balance = balance - v_cash WHERE id = p_payer;
  IF v_best_coupon IS NOT NULL THEN
    UPDATE stocks SET spent = spent + v_best_d WHERE id = v_best_stock;
    UPDATE coupons SET used_by = p_id WHERE id = v_best_coupon;
  END IF;
  UPDATE merchants SET balance = balance + (p_amount - v_fee) WHERE id = p_merchant;
  INSERT INTO payments VALUES (p_id, p_payer, p_merchant, p_amount, v_cash, v_best_d, v_fee,
                               v_best_coupon);
  RETURN 0;
END $$;
"""
NAMES = {0: "ok", -1: "duplicate", 6: "payer_not_found", 8: "insufficient_funds"}


def bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql "
                           "(bench/peers/README.md)")
    return os.path.dirname(found[-1])


class Postgres:
    """A throwaway cluster on 127.0.0.1:<free port>, stopped by pid."""

    def __init__(self, tmp: str):
        self.bin = bin_dir()
        self.dir = os.path.join(tmp, "pg")
        self.log_path = self.dir + ".log"
        self.port = free_port()
        os.makedirs(self.dir)
        user = {}
        if os.geteuid() == 0:               # postgres will not run as root
            pw = pwd.getpwnam("postgres")
            os.chmod(tmp, 0o711)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data = os.path.join(self.dir, "data")
        subprocess.run([f"{self.bin}/initdb", "-D", data, "-U", "postgres", "-A", "trust",
                        "--locale=C", "-E", "UTF8"], check=True, capture_output=True, **user)
        cmd = [f"{self.bin}/postgres", "-D", data, "-p", str(self.port), "-k", self.dir,
               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
               "-c", "synchronous_commit=on", "-c", "full_page_writes=on",
               "-c", "max_connections=64", "-c", "shared_buffers=256MB"]
        with open(self.log_path, "w") as log:
            if user:
                os.chown(self.log_path, user["user"], user["group"])
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **user)
        try:
            wait_port(self.port, self.proc, self.log_path)
            self._ready()
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> None:
        import psycopg
        for _ in range(200):                # accepting TCP before it accepts logins
            try:
                self.connect().close()
                return
            except psycopg.OperationalError:
                threading.Event().wait(0.05)
        raise RuntimeError(f"postgres does not accept connections; log {self.log_path}")

    def connect(self):
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                               dbname="postgres", autocommit=True)

    def version(self) -> str:
        with self.connect() as conn:
            return conn.execute("SHOW server_version").fetchone()[0].split()[0]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)      # SIGINT: fast shutdown


def setup(conn, wl: Workload) -> None:
    conn.execute("DROP TABLE IF EXISTS payments, coupons, stocks, merchants, wallets CASCADE")
    conn.execute("DROP FUNCTION IF EXISTS pay")
    conn.execute(SCHEMA)
    conn.execute(PAY_FUNCTION)
    with conn.cursor() as cur:
        with cur.copy("COPY wallets (id, balance) FROM STDIN") as copy:
            for row in wl.users.items():
                copy.write_row(row)
        with cur.copy("COPY merchants (id, fee_bps) FROM STDIN") as copy:
            for row in wl.merchants.items():
                copy.write_row(row)
        with cur.copy("COPY stocks (id, kind, value, cap, min_spend, budget) FROM STDIN") as copy:
            for s in wl.stocks.values():
                copy.write_row((s.id, s.kind, s.value, s.cap, s.min_spend, s.budget))
        with cur.copy("COPY coupons (id, stock, owner) FROM STDIN") as copy:
            for cid, (sid, uid) in wl.coupons.items():
                copy.write_row((cid, sid, uid))
    conn.execute("ANALYZE")
    conn.execute("CHECKPOINT")              # the load's dirty pages are not the run's work


def final_state(conn, outcomes: dict) -> FinalState:
    rows = lambda sql: dict(conn.execute(sql).fetchall())  # noqa: E731
    return FinalState(rows("SELECT id, balance FROM wallets"),
                      rows("SELECT id, balance FROM merchants"),
                      rows("SELECT id, spent FROM stocks"),
                      rows("SELECT id, used_by FROM coupons WHERE used_by IS NOT NULL"),
                      conn.execute("SELECT coalesce(sum(fee), 0) FROM payments").fetchone()[0],
                      outcomes)


def payer(conn):
    sql = "SELECT pay(%s, %s, %s, %s)"

    def pay_one(p: Payment) -> str:
        code = conn.execute(sql, (p.id, p.payer, p.merchant, p.amount), prepare=True).fetchone()[0]
        return NAMES[code]
    return pay_one


def many(pg: Postgres, wl: Workload, payments: list[Payment], callers: int, clock):
    """`callers` connections, each its own thread running its lane."""
    lanes = wl.lanes(callers, payments)
    return lanes_in_threads([pg.connect() for _ in lanes], lanes, payer, clock)


def run(pg: Postgres, wl: Workload, payments: list[Payment], *, callers: int, clock) -> Run:
    with pg.connect() as conn:
        setup(conn, wl)
        if callers > 1:
            names, seconds, latencies = many(pg, wl, payments, callers, clock)
        else:
            started = clock()
            names, latencies = one_at_a_time(payer(conn), payments, clock)
            seconds = clock() - started
        state = final_state(conn, tally(names))
    how = f"SELECT pay(...) per payment, {callers} connection{'s' if callers > 1 else ''}"
    return Run(f"PostgreSQL {pg.version()}", "many" if callers > 1 else "one", how,
               len(payments), seconds, latencies, "payment", state)
