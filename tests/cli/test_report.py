"""The campaign report: CSVs that match STATS, and a PNG chart."""
import csv

import numpy as np

from engine import Engine
from engine.cli import main as scanpay
from engine.protocol.records import ISSUE_RECORD, PAY_RECORD
from engine.cli.report import redemptions_over_time, write
from support.clock import Clock

HOUR_MS = 3_600_000


def shop(eng: Engine) -> None:
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60}]})
    eng.call("WALLETS", {"users": [1, 2]})
    eng.call("TOPUP", {"topups": [{"id": 1, "user": 1, "amount": 10**6},
                                  {"id": 2, "user": 2, "amount": 10**6}]})
    eng.call("STOCKS", {"stocks": [{"id": 5, "funder": "platform", "kind": "fixed",
                                    "value": 100, "valid_from": 0, "valid_until": 2**62,
                                    "stacking": "stackable", "budget": 1000}]})
    coupons = np.zeros(4, ISSUE_RECORD)
    coupons["coupon"], coupons["stock"], coupons["user"] = [1, 2, 3, 4], 5, [1, 1, 2, 2]
    eng.issue(coupons)
    for hour, (pid, user) in enumerate([(1, 1), (2, 1), (3, 2)]):
        eng.clock.now_ms += hour * HOUR_MS
        record = np.zeros(1, PAY_RECORD)
        record[0]["id"], record[0]["payer"], record[0]["merchant"], record[0]["amount"] = pid, user, 1, 1000
        eng.pay(record)


def test_report_files_match_the_statistics(tmp_path):
    eng = Engine(clock=Clock())
    shop(eng)
    paths = write(eng, str(tmp_path), stock_names={5: "Five off"})
    campaigns = list(csv.DictReader(open(paths[0])))
    assert campaigns[0]["name"] == "Five off" and campaigns[0]["redeemed"] == "3"
    assert campaigns[0]["budget_left"] == "700"
    merchants = list(csv.DictReader(open(paths[1])))
    assert merchants[0]["repeat_payers"] == "1" and merchants[0]["unique_payers"] == "2"
    assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    hours, series = redemptions_over_time(eng.canonical())
    assert list(series[5][0]) == [1, 1, 0, 1] and list(series[5][1]) == [100, 100, 0, 100]


def test_scanpay_report_reads_a_data_directory(tmp_path, capsys):
    with Engine(str(tmp_path / "data"), clock=Clock()) as eng:
        shop(eng)
    assert scanpay(["report", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]) == 0
    assert "report.png" in capsys.readouterr().out
    assert (tmp_path / "r" / "campaigns.csv").exists()
