"""`scanpay settle` and `scanpay statement` against a running server: the
CSV reconciles to the cent with the ledger."""
import csv

import numpy as np
import pytest

from engine import Engine
from engine.cli import main as scanpay
from engine.protocol.records import PAY_RECORD
from engine.cli.statements import major_units
from support.servers import RealServer


@pytest.fixture
def server():
    """A real server on a background event loop, over an in-memory engine."""
    with RealServer(engine=Engine()) as running:
        yield running.server


def test_major_units_are_exact_decimal_text():
    assert [major_units(v) for v in (0, 5, 100, 123456, -1, -250)] == [
        "0.00", "0.05", "1.00", "1234.56", "-0.01", "-2.50"]


def test_settle_writes_a_csv_that_reconciles(server, tmp_path, capsys):
    eng = server.engine
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}, {"id": 2, "fee_bps": 38}]})
    eng.call("WALLETS", {"users": [1]})
    eng.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})
    records = np.zeros(3, PAY_RECORD)
    records["id"], records["payer"] = [1, 2, 3], 1
    records["merchant"], records["amount"] = [1, 1, 2], [12_345, 999, 50_000]
    eng.pay(records)
    eng.call("REFUND", {"refunds": [{"id": 1, "payment": 1, "amount": 2_345}]})
    balances = {m["id"]: m["balance"]
                for m in eng.call("BALANCES", {"merchants": [1, 2]})["merchants"]}
    where = ["--connect", server.config.listen, "--out-dir", str(tmp_path)]
    assert scanpay(["settle", *where]) == 0
    assert "settlement 1: 2 merchants" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "settlement-000001.csv")))
    assert [int(r["merchant"]) for r in rows] == [1, 2]
    for row in rows:
        assert row["net"] == major_units(balances[int(row["merchant"])])
        assert row["payout"] == row["net"] and row["currency"] == "CNY"
    assert eng.audit()["ok"]
    # The same statement again, byte for byte, from the engine's record of it.
    first = (tmp_path / "settlement-000001.csv").read_text()
    (tmp_path / "settlement-000001.csv").unlink()
    assert scanpay(["statement", "--settlement", "1", *where]) == 0
    assert (tmp_path / "settlement-000001.csv").read_text() == first
    assert scanpay(["statement", "--settlement", "7", *where]) == 1


def test_lifecycle_admin_commands_refund_and_capture_from_files(server, tmp_path, capsys):
    eng = server.engine
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 0}]})
    eng.call("WALLETS", {"users": [1]})
    eng.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6}]})
    records = np.zeros(3, PAY_RECORD)
    records["id"], records["payer"], records["merchant"] = [1, 2, 3], 1, 1
    records["amount"], records["flags"] = [1000, 2000, 500], [0, 4, 4]
    eng.pay(records)
    where = ["--connect", server.config.listen]
    (tmp_path / "refunds.csv").write_text("id,payment,amount\n7,1,400\n8,1,700\n")
    assert scanpay(["refunds", *where, "--file", str(tmp_path / "refunds.csv")]) == 1
    assert "refunds: 1 ok, 1 failed (first: item 1, id 8 refund_exceeds_payment" in capsys.readouterr().out
    (tmp_path / "captures.json").write_text('[{"payment": 2, "amount": 1500}]')
    assert scanpay(["captures", *where, "--file", str(tmp_path / "captures.json")]) == 0
    (tmp_path / "voids.csv").write_text("id\n3\n")
    assert scanpay(["voids", *where, "--file", str(tmp_path / "voids.csv")]) == 0
    states = [p["state"] for p in eng.call("GET_PAYMENTS", {"ids": [1, 2, 3]})["results"]]
    assert states == ["partially_refunded", "completed", "voided"]
