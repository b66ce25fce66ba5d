"""`scanpay report`: the same figures from a running server as from its data
directory, names instead of ids, unlimited budgets said so, the verdicts."""
import csv

import numpy as np
import pytest

from engine import Engine
from engine.cli import main as scanpay
from engine.cli import report
from engine.protocol.records import PAY_RECORD
from support.clock import Clock
from support.servers import RealServer

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
USERS = 400
CAMPAIGN_AT_MS = 1_718_413_200_000          # a Saturday, 09:00 at UTC+8
UNTIL_MS = CAMPAIGN_AT_MS + 6 * HOUR_MS
COUPON_BASE = 10_000


def pay(eng: Engine, first_id: int, users: list, merchant: int) -> None:
    records = np.zeros(len(users), PAY_RECORD)
    records["id"] = np.arange(first_id, first_id + len(users))
    records["payer"], records["merchant"], records["amount"] = users, merchant, 8_000
    assert (eng.pay(records)["status"] == 0).all()


def marketing_shop(eng: Engine) -> None:
    """400 users who paid at the mall (merchant 1, tag 7) a week before a
    campaign of stock 5 ("Five off", budget 1,000.00) with a 20 % holdout;
    stock 6 has no name and no budget. After it, every second treated user
    pays at the mall and every fifth held-out one, over five hours."""
    clock = eng.clock
    eng.call("MERCHANTS", {"merchants": [{"id": 1, "fee_bps": 60, "tags": [7]}, {"id": 2}]})
    users = list(range(1, USERS + 1))
    eng.call("WALLETS", {"users": users})
    eng.call("TOPUP", {"topups": [{"id": u, "user": u, "amount": 10**7} for u in users]})
    window = {"valid_from": 0, "valid_until": 2**62, "stacking": "stackable"}
    eng.call("STOCKS", {"stocks": [
        {"id": 5, "name": "Five off", "funder": "platform", "kind": "fixed", "value": 500,
         "budget": 100_000, "tags": [7], **window},
        {"id": 6, "funder": "platform", "kind": "fixed", "value": 100, "budget": 0, **window}]})
    pay(eng, 1, users, merchant=1)
    clock.now_ms = CAMPAIGN_AT_MS
    defined = eng.call("SEGMENTS", {"segments": [
        {"id": 1, "name": "Mall payers", "tags": [7], "payments_min": 1}]})
    assert defined["results"][0]["status"] == 0
    made = eng.call("CAMPAIGNS", {"campaigns": [
        {"id": 1, "name": "Come back", "segment": 1, "stock": 5, "holdout_bps": 2_000,
         "coupon_base": COUPON_BASE}]})["results"][0]
    assert made["status"] == 0 and made["holdout"] > 0
    coupons = eng.call("COUPONS", {"ids": list(range(COUPON_BASE, COUPON_BASE + USERS))})
    treated = sorted(c["user"] for c in coupons["results"] if c["status"] == 0)
    held_out = sorted(set(users) - set(treated))
    coming = treated[::2] + held_out[::5]
    for hour, part in enumerate(np.array_split(np.array(coming), 5)):
        clock.now_ms = CAMPAIGN_AT_MS + hour * HOUR_MS + 60_000
        pay(eng, 1_000 + hour * USERS, part.tolist(), merchant=1)
    clock.now_ms = UNTIL_MS + DAY_MS


def rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_from_a_running_server_equals_the_data_directory(tmp_path, capsys):
    data = tmp_path / "data"
    with Engine(str(data), clock=Clock(CAMPAIGN_AT_MS - 7 * DAY_MS)) as eng:
        marketing_shop(eng)
        with RealServer(engine=eng) as running:
            assert scanpay(["report", "--connect", f"127.0.0.1:{running.port}", "--campaigns", "1",
                            "--stocks", "5,6", "--merchants", "1,2", "--until", str(UNTIL_MS),
                            "--payer-value", "30", "--out", str(tmp_path / "live")]) == 0
            live_out = capsys.readouterr().out
    assert scanpay(["report", "--data", str(data), "--until", str(UNTIL_MS),
                    "--payer-value", "30", "--out", str(tmp_path / "stopped")]) == 0
    stopped_out = capsys.readouterr().out
    for name in ("lift.csv", "campaigns.csv", "merchants.csv"):
        live, stopped = (tmp_path / d / name for d in ("live", "stopped"))
        assert live.read_bytes() == stopped.read_bytes() and rows(live), name
    assert live_out.replace("live", "stopped") == stopped_out
    assert "Come back: +" in live_out and "paid off: Come back" in live_out
    assert (tmp_path / "live" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_has_names_not_ids_and_says_unlimited(tmp_path):
    eng = Engine(clock=Clock(CAMPAIGN_AT_MS - 7 * DAY_MS))
    marketing_shop(eng)
    figures = report.gather(report.Source.of_engine(eng), [5, 6], [1], [1, 2],
                            merchant_names={1: "Mall Cafe"}, payer_value=3_000, until=UNTIL_MS)
    paths = report.write(figures, str(tmp_path))
    stocks = {r["campaign"]: r for r in rows(paths[1])}
    assert set(stocks) == {"Five off", "stock 6 (unnamed)"}
    assert stocks["stock 6 (unnamed)"]["budget"] == "unlimited"
    assert stocks["stock 6 (unnamed)"]["budget_left"] == "unlimited"
    assert stocks["Five off"]["budget"] == "1000.00"
    assert "id" not in stocks["Five off"] and "stock" not in stocks["Five off"]
    (lift,) = rows(paths[0])
    assert lift["campaign"] == "Come back" and lift["coupon"] == "Five off"
    assert lift["budget"] == "1000.00" and lift["verdict"] == report.PAID_OFF
    reply = figures.campaigns[0]
    assert int(lift["issued"]) == reply["issued"]
    assert int(lift["held_out"]) == reply["holdout"]["users"]
    assert int(lift["redeemed"]) == reply["redeemed"] == int(stocks["Five off"]["redeemed"])
    assert int(lift["incremental_payers_low"]) > 0
    assert [m["merchant"] for m in rows(paths[2])] == ["Mall Cafe", "merchant 2"]
    # Redemptions over clock time: one LIFT window an hour, summing to the whole.
    windows = figures.series[1]
    assert [a for a, _, _ in windows] == [CAMPAIGN_AT_MS + h * HOUR_MS for h in range(6)]
    assert sum(n for _, _, n in windows) == reply["redeemed"] and windows[0][2] > 0


def lift_reply(diff_ppm=100_000, reason=None, cost=1_000, low=800, high=1_300) -> dict:
    return {"conversion": {"diff_ppm": diff_ppm, "reason": reason,
                           "conclusive": reason is None},
            "cost_per_incremental_payer": {"value": cost, "low": low, "high": high},
            "discount": 50_000}


@pytest.mark.parametrize("reply, payer_value, expected", [
    (lift_reply(), 1_000, report.PAID_OFF),
    (lift_reply(), 999, report.NOT_PAID_OFF),
    (lift_reply(), None, report.NOT_JUDGED),
    (lift_reply(reason="contains_zero", cost=None, high=None), 10**9, report.NOT_PAID_OFF),
    (lift_reply(reason="too_few"), 10**9, report.TOO_EARLY),
    (lift_reply(reason="no_holdout"), 10**9, report.TOO_EARLY),
    (lift_reply(diff_ppm=-100_000, cost=None), 10**9, report.NOT_PAID_OFF),
])
def test_verdict(reply, payer_value, expected):
    assert report.verdict(reply, payer_value, "CNY")[0] == expected


def test_amounts_and_texts():
    assert report.major_amount("25") == 2_500 and report.major_amount("0.5") == 50
    assert report.major_amount("12.34") == 1_234
    for bad in ("1.234", "-1", "x", ""):
        with pytest.raises(Exception):
            report.major_amount(bad)
    assert report.money(-123_456, "CNY") == "-1,234.56 CNY" and report.money(None) == "-"
    assert report.ppm_pct(123_456) == "12.34" and report.budget_text(0) == "unlimited"


def test_report_over_the_wire_needs_ids_and_a_server(tmp_path, capsys):
    assert scanpay(["report", "--connect", "127.0.0.1:1", "--out", str(tmp_path)]) == 2
    assert "--campaigns" in capsys.readouterr().out
    with RealServer() as running:
        port = running.port
    assert scanpay(["report", "--connect", f"127.0.0.1:{port}", "--campaigns", "1",
                    "--out", str(tmp_path)]) == 2
    assert "connection refused" in capsys.readouterr().err
    with RealServer() as running:
        assert scanpay(["report", "--connect", f"127.0.0.1:{running.port}", "--campaigns", "9",
                        "--out", str(tmp_path)]) == 1
        assert "campaign 9: campaign_not_found" in capsys.readouterr().err
        assert scanpay(["report", "--connect", f"127.0.0.1:{running.port}", "--stocks", "9",
                        "--out", str(tmp_path)]) == 1
        assert "id 9: stock_not_found" in capsys.readouterr().err
