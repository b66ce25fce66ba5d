"""The operator's first hour (issue 14): the `scanpay` CLI's commands and
help, config validation, one-line start-up failures, the demo's options and
Ctrl-C, request metrics, coalesced disk-stall warnings and the load test's
id namespace. Servers run on loopback with temp dirs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine import cli, client as client_module
from engine.client import Client
from test_client import RealServer, setup_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def env_here() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scanpay(capsys, *argv) -> tuple[int, str, str]:
    """`scanpay ARGV` in process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def real():
    with RealServer() as server:
        yield server


# -- the CLI's commands -----------------------------------------------------------------

def test_version(capsys):
    code, out, _ = scanpay(capsys, "--version")
    assert code == 0 and out.startswith("scanpay ") and out.split()[1][0].isdigit(), out


def test_every_subcommand_help_says_what_it_does():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) >= 20
    for name, p in sub.choices.items():
        described = p.description or ""
        assert len(described) > 10, name
        assert " ".join(described.split()) in " ".join(p.format_help().split()), name
        assert f"scanpay {name} --help" not in p.format_help(), name    # not circular


def test_demo_options_are_real_options(capsys):
    code, out, _ = scanpay(capsys, "demo", "--help")
    assert code == 0 and "--payments" in out and "Riverside Mall" in out
    code, _, err = scanpay(capsys, "demo", "--payments", "0")
    assert code == 2 and "--payments must be >= 1" in err


def test_payments_refund_reverse_issue_stats_coupons(real, capsys):
    import asyncio
    from engine.client import AsyncClient

    async def world():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:
            await setup_world(c)
            for i in (1, 2):
                assert (await c.pay_one(id=i, payer=1, merchant=1, amount=30_00)).ok
    asyncio.run(world())
    where = ["--connect", str(real.port)]        # a bare port: 127.0.0.1:PORT
    code, out, err = scanpay(capsys, "payments", *where, "1", "2", "99")
    results = json.loads(out)["results"]
    assert code == 1 and "2 found, 1 not found (first: 99)" in err
    assert [r["state"] for r in results[:2]] == ["completed", "completed"]
    assert results[2]["error"] == "payment_not_found"

    code, out, err = scanpay(capsys, "refund", *where, "--payment", "1", "--amount", "1000",
                             "--id", "500")
    assert code == 0 and json.loads(out)["cash"] == 1000 and "refund: ok" in err, (out, err)
    code, out, err = scanpay(capsys, "refund", *where, "--payment", "1", "--amount", "1000",
                             "--id", "500")
    assert code == 0 and "replayed" in err
    code, out, err = scanpay(capsys, "reverse", *where, "--payment", "2")
    assert code == 0 and json.loads(out)["status"] == 0 and "reverse: ok" in err
    code, out, err = scanpay(capsys, "payments", *where, "1", "2")
    results = json.loads(out)["results"]
    assert results[0]["refunded"]["amount"] == 1000
    assert results[1]["status"] == 0 and results[1]["state"] == "refunded", results[1]
    code, out, err = scanpay(capsys, "refund", *where, "--payment", "1", "--amount",
                             str(10**9), "--id", "501")
    assert code == 1 and "refund: failed: " in err and json.loads(out)["status"] != 0

    code, out, err = scanpay(capsys, "issue", *where, "--stock", "5", "--user", "2",
                             "--coupon", "900", "--coupon", "901")
    assert code == 0 and "issue: 2 ok" in err, err
    assert [r["coupon"] for r in json.loads(out)] == [900, 901]
    code, out, err = scanpay(capsys, "issue", *where, "--stock", "6", "--user", "2",
                             "--coupon", "902")
    assert code == 1 and "stock_not_found" in err
    code, out, err = scanpay(capsys, "coupons", *where, "--user", "2")
    assert code == 0 and [c["id"] for c in json.loads(out)["results"]] == [900, 901]
    code, out, err = scanpay(capsys, "stats", *where, "--stocks", "5", "--merchants", "1")
    stats = json.loads(out)
    assert code == 0 and stats["stocks"][0]["issued"] == 2 and stats["merchants"][0]["id"] == 1
    code, _, err = scanpay(capsys, "stats", *where)
    assert code == 2 and "--stocks" in err


# -- addresses ----------------------------------------------------------------------------

def test_connect_forms():
    parse = client_module.parse_address
    assert parse("7411") == ("127.0.0.1", 7411)           # was host "7411" = 0.0.28.243
    assert parse("[::1]:9000") == ("::1", 9000)
    assert parse("db.example.com:80") == ("db.example.com", 80)
    for bad in ("7411:", "host:70000", "a b:1", "[::1]x", "1.2.3:80", "-x-:1", "1:2:3"):
        with pytest.raises(ValueError):
            parse(bad)
    assert client_module.is_unix_path("/run/scanpay.sock")
    assert not client_module.is_unix_path("tcp://127.0.0.1:7411/")


def test_connect_takes_a_unix_path_and_refuses_nonsense(tmp_path, capsys):
    path = str(tmp_path / "s.sock")
    with RealServer(unix=path):
        code, _, err = scanpay(capsys, "audit", "--connect", path)
        assert code == 0 and "audit: ok" in err
    code, _, err = scanpay(capsys, "audit", "--connect", "no such host:1")
    assert code == 2 and err.count("\n") == 1 and "bad host" in err
