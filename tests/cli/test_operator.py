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
from engine.ports import free_port
from support.servers import RealServer, setup_world

from support import ROOT  # noqa: E402
PY = sys.executable


def env_here() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)



def scanpay(capsys, *argv) -> tuple[int, str, str]:
    """`scanpay ARGV` in process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, value, expected", [
    ("connections_max", '"many"', "connections_max = 'many': expected `int`, got `str`"),
    ("connections_max", "0", "connections_max = 0: expected `int` >= 1"),
    ("idle_timeout_ms", "1.5", "idle_timeout_ms = 1.5: expected `int`, got `float`"),
    ("batch_records_max", "9000", "batch_records_max = 9000: expected `int` <= 8190"),
    ("log_format", '"xml"', "log_format = 'xml': expected one of 'text', 'json'"),
    ("test_clock", '"yes"', "test_clock = 'yes': expected `bool`"),
    ("listen", '"127.0.0.1:70000"', "port in 0..65535"),
    ("metrics", '"127.0.0.1:65536"', "port in 0..65535"),
    ("listen", "7411", "listen = 7411: expected `str`, got `int`"),
    ("colour", '"blue"', "unknown [server] setting(s) ['colour']"),
])
def test_config_is_checked_by_type_and_range(tmp_path, setting, value, expected):
    from engine.server.config import ConfigError, load
    toml = tmp_path / "scanpay.toml"
    toml.write_text(f"[server]\n{setting} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load(str(toml), {})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_bad_config_is_refused_at_start_in_one_line(tmp_path):
    toml = tmp_path / "scanpay.toml"
    toml.write_text('[server]\nconnections_max = "many"\n[extra]\n')
    proc = subprocess.run([PY, "-m", "engine.cli", "serve", "--config", str(toml),
                           "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, env=env_here())
    assert proc.returncode == 2
    assert proc.stderr.startswith("scanpay serve: config ") and "unknown table" in proc.stderr
    assert proc.stderr.count("\n") == 1


# -- serve: start-up failures in one line ------------------------------------------------

def serve_fails(*argv) -> str:
    """Run `scanpay serve ARGV`, which must fail at start: its one stderr line."""
    proc = subprocess.run([PY, "-m", "engine.cli", "serve", *argv], capture_output=True,
                          text=True, timeout=60, env=env_here())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len([line for line in lines if line.startswith("scanpay serve: ")]) == 1, lines
    assert lines[-1].startswith("scanpay serve: "), lines
    return lines[-1]


def test_serve_port_in_use_and_data_path_a_file(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve_fails("--data", str(tmp_path / "d"), "--listen", f"127.0.0.1:{port}")
    assert f"address is already in use (127.0.0.1:{port})" in line
    (tmp_path / "file").write_text("")
    line = serve_fails("--data", str(tmp_path / "file"), "--listen", "127.0.0.1:0")
    assert "data path is a file" in line and str(tmp_path / "file") in line


def test_serve_data_directory_locked(tmp_path):
    from engine import Engine
    with Engine(str(tmp_path / "data")):
        line = serve_fails("--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0")
    assert "locked by another process" in line and str(tmp_path / "data") in line


def test_startup_failure_lines_for_permission_and_corruption():
    from engine.server.config import Config
    from engine.storage.journal import JournalCorrupt
    config = Config(data="/srv/scanpay")
    line = cli.startup_failure(PermissionError(13, "Permission denied", "/srv/scanpay"), config)
    assert line.startswith("permission denied (/srv/scanpay): ")
    line = cli.startup_failure(PermissionError(13, "Permission denied"), config)
    assert line.startswith("permission denied (127.0.0.1:7411): ")
    line = cli.startup_failure(JournalCorrupt("/srv/scanpay/j.log", 80, "bad crc"), config)
    assert line.startswith("the journal is damaged (/srv/scanpay): ") and "bad crc" in line
    assert cli.startup_failure(ZeroDivisionError(), config) is None    # a bug keeps its traceback


# -- metrics ------------------------------------------------------------------------------

def scrape(server) -> dict:
    from prometheus_client import generate_latest
    text = generate_latest(server.metrics.registry).decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def test_requests_total_counts_every_request_and_seconds_per_op(real):
    import asyncio

    from engine.client import AsyncClient, UnknownOp
    from engine.protocol.errors import BadBody
    from support.servers import pay_batch

    async def traffic():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:    # HELLO
            await setup_world(c)            # MERCHANTS, WALLETS, TOPUP, STOCKS
            await c.ping()
            await c.ping()
            for i in range(5):
                batch = pay_batch(1, start_id=100 + i)
                batch["payer"], batch["merchant"] = 1, 1
                assert (await c.pay(batch))["status"][0] == 0
            await asyncio.gather(*(c.pay_one(id=200 + i, payer=1, merchant=1, amount=100)
                                   for i in range(3)))                 # one frame of 3
            await c.call("BALANCES", {"users": [1]})
            with pytest.raises(UnknownOp):
                await c.call(99, {})
            with pytest.raises(BadBody):
                await c.call("MERCHANTS", {"not_merchants": []})
    asyncio.run(traffic())
    lines = scrape(real.server)
    total = {k[len("scanpay_requests_total"):]: v for k, v in lines.items()
             if k.startswith("scanpay_requests_total{")}
    assert total == {
        '{op="99",outcome="unknown_op"}': 1, '{op="BALANCES",outcome="ok"}': 1,
        '{op="HELLO",outcome="ok"}': 1, '{op="MERCHANTS",outcome="bad_body"}': 1,
        '{op="MERCHANTS",outcome="ok"}': 1, '{op="PAY",outcome="ok"}': 6,
        '{op="PING",outcome="ok"}': 2, '{op="STOCKS",outcome="ok"}': 1,
        '{op="TOPUP",outcome="ok"}': 1, '{op="WALLETS",outcome="ok"}': 1}, total
    assert lines['scanpay_request_seconds_count{op="PAY"}'] == 6
    assert lines['scanpay_request_seconds_bucket{le="+Inf",op="PAY"}'] == 6
    assert 0 < lines['scanpay_request_seconds_sum{op="PAY"}'] < 60
    assert lines['scanpay_request_seconds_count{op="MERCHANTS"}'] == 2


# -- logs ---------------------------------------------------------------------------------

def test_one_disk_stall_logs_one_warning_with_a_count(tmp_path, caplog):
    """Frames keep coming while one fdatasync stalls for 0.4 s: every batch
    behind it waits over SLOW_MS, and they make one `slow fsync` line."""
    import asyncio
    import logging
    import threading

    from support.faulty_fs import FaultyFs
    from support.wire import Raw, pay_body, started_with_world

    from engine import Engine

    class StallingFs(FaultyFs):
        stall = threading.Event()

        def fdatasync(self, fd):
            if self.stall.is_set():
                self.stall.clear()
                time.sleep(0.4)
            super().fdatasync(fd)

    async def main():
        fs = StallingFs()
        server, c = await started_with_world(engine=Engine(str(tmp_path / "data"), fs=fs))
        server.writer.slow_log.quiet_s = 0.3
        others = [await Raw.open(server) for _ in range(3)]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scanpay.writer"):
            fs.stall.set()
            for i in range(8):              # batches queued behind the stalled fsync
                for k, conn in enumerate([c, *others]):
                    conn.send(16, i, pay_body([1000 + 10 * i + k]))
                await asyncio.sleep(0.03)
            for conn in [c, *others]:
                for _ in range(8):
                    await conn.recv()
            await asyncio.sleep(0.8)        # quiet for longer than quiet_s: logged
            lines = [r.getMessage() for r in caplog.records if "slow" in r.getMessage()]
            await server.stop()
        assert len(lines) == 1, lines
        count = int(lines[0].split()[2])
        assert lines[0].startswith("slow fsync: ") and count >= 2, lines
    asyncio.run(main())


# -- the demo -----------------------------------------------------------------------------

# The demo as a terminal starts a foreground job: SIGINT with Python's own
# handler. A shell without job control starts a background job with SIGINT
# ignored, and the demo (as Python does) leaves an ignored SIGINT ignored
# (docs/operations.md), so a test run as one (`pytest ... &`) would press
# Ctrl-C into nothing. That was so every time here (5 SIGINTs, exit 0, the
# demo ran to its end): the likely cause of the four full-suite runs on
# 2026-12-06 where a SIGINT was lost and never when the test ran alone.
AS_FOREGROUND = ("import runpy, signal, sys; "
                 "signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "runpy.run_module('engine.cli', run_name='__main__', alter_sys=True)")
DEMO_STOP_S_MAX = 120               # a loaded box: stop the server, close, remove


def start_demo(tmp_path, payments: int) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", AS_FOREGROUND, "demo", "--payments", str(payments), "--users", "1000",
         "--report", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(env_here(), TMPDIR=str(tmp_path)), cwd=tmp_path)


def signal_after_line(proc, text: str, signum: int, delay_s: float = 0.0) -> tuple[str, str, str]:
    """Send `signum` once, `delay_s` after the first stdout line that holds
    `text`; (that line, stdout, stderr) once the demo has stopped."""
    try:
        for _ in range(200):                # lines before the stream starts
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if text in line:
                break
        else:
            raise AssertionError(f"no line with {text!r}")
        time.sleep(delay_s)
        proc.send_signal(signum)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=DEMO_STOP_S_MAX)
        print(f"signal {signum} after {text!r}: stopped in {time.monotonic() - sent:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return line, out, err


def test_demo_ctrl_c_removes_its_data_directory(tmp_path):
    """One SIGINT while it streams payments over the wire: the temp data
    directory is gone and one line says so."""
    proc = start_demo(tmp_path, 3_000_000)
    # Ctrl-C once the stream is under way (it starts right after that line
    # and lasts seconds).
    line, out, err = signal_after_line(proc, "server: durable, ", signal.SIGINT, delay_s=0.3)
    data_dir = line.split(", ")[1]
    # Where the demo was if it ran on: the end of its output says.
    assert proc.returncode == 130, f"stdout tail: {out[-1500:]!r}\nstderr: {err}"
    assert data_dir.startswith(str(tmp_path)) and not os.path.exists(data_dir)
    assert f"scanpay demo: interrupted; removed its data directory {data_dir}" in err
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("after, signum, delay_s", [
    ("Scanpay demo: a weekend", signal.SIGINT, 0.0),    # the setup: the world not built yet
    ("server: durable, ", signal.SIGINT, 0.0),          # the stream starts
    ("report read from the running server", signal.SIGINT, 0.0),   # its server stops, AUDIT
    ("server: durable, ", signal.SIGTERM, 0.1),         # `kill PID`: a background demo
], ids=["setup", "stream", "end", "sigterm"])
def test_demo_stops_at_one_signal_whenever_it_comes(tmp_path, after, signum, delay_s):
    """One SIGINT (or SIGTERM) at several moments: the demo stops before its
    end with one line and the shell's code for the signal, its server
    stopped, its data directory removed."""
    proc = start_demo(tmp_path, 300_000)
    _, out, err = signal_after_line(proc, after, signum, delay_s)
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    assert proc.returncode == 128 + signum, f"stdout tail: {out[-1500:]!r}\nstderr: {err}"
    assert "paid off:" not in out and "AUDIT: ok" not in out      # it did not run on
    lines = [x for x in err.splitlines() if x.startswith("scanpay demo:")]
    assert len(lines) == 1 and lines[0].startswith(f"scanpay demo: {what}; removed its data "
                                                   f"directory {tmp_path}"), err
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


# -- the load test's id namespace ---------------------------------------------------------

@pytest.fixture
def load_world():
    sys.path.insert(0, os.path.join(ROOT, "loadtest"))
    try:
        import load_world
        yield load_world
    finally:
        sys.path.remove(os.path.join(ROOT, "loadtest"))


def test_load_test_writes_only_its_own_ids(real, load_world):
    with Client.connect("127.0.0.1", real.port) as c:
        load_world.check_server(c, allow_shared=False)          # an empty server
        load_world.build_world(c, wallets=30, merchant_count=4, coupons_per_user=1)
        load_world.check_server(c, allow_shared=False)          # a rerun on its own data
        load_world.build_world(c, wallets=40, merchant_count=4, coupons_per_user=1)
        c.pay_one(id=load_world.fresh_id(), payer=load_world.ID_BASE + 1,
                  merchant=load_world.ID_BASE + 2, amount=30_00)
        load_world.check_server(c, allow_shared=False)          # money moved among its own
        base = load_world.ID_BASE
        assert base == 0x5C00 << 48
        users = c.call("BALANCES", {"users": [base + 1, base + 40, base + 41]})["users"]
        assert [u["status"] for u in users[:2]] == [0, 0] and users[2]["status"] != 0
        with pytest.raises(load_world.WorldError, match="outside the load test's namespace"):
            load_world._items(c, "MERCHANTS", "merchants", [{"id": 1, "fee_bps": 60}])


def test_load_test_refuses_a_server_holding_other_data(real, load_world):
    import asyncio

    from engine.client import AsyncClient

    async def world():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:
            await setup_world(c)            # merchant 1 at 60 bps, users 1 and 2 topped up
    asyncio.run(world())
    with Client.connect("127.0.0.1", real.port) as c:
        before = c.call("BALANCES", {"users": [1, 2], "merchants": [1, 2]})
        with pytest.raises(load_world.WorldError, match="SCANPAY_LOAD_ALLOW_SHARED=1"):
            load_world.check_server(c, allow_shared=False)
        load_world.check_server(c, allow_shared=True)
        load_world.build_world(c, wallets=10, merchant_count=2, coupons_per_user=1)
        assert c.call("BALANCES", {"users": [1, 2], "merchants": [1, 2]}) == {
            **before, "bank": before["bank"] - 10 * load_world.TOPUP_AMOUNT}
    # Money in accounts above the low ids is found by the sum over every account.
    with RealServer() as other, Client.connect("127.0.0.1", other.port) as c:
        c.call("WALLETS", {"users": [10**12]})
        c.call("TOPUP", {"topups": [{"id": 1, "user": 10**12, "amount": 500}]})
        with pytest.raises(load_world.WorldError, match="holding 500 minor units"):
            load_world.check_server(c, allow_shared=False)


def test_locust_refuses_a_server_holding_other_data(real):
    import asyncio
    import shutil

    from engine.client import AsyncClient

    async def world():
        async with await AsyncClient.connect("127.0.0.1", real.port) as c:
            await setup_world(c)
    asyncio.run(world())
    locust = shutil.which("locust", path=os.path.dirname(PY)) or shutil.which("locust")
    assert locust is not None, "locust is not installed: pip install -e '.[test]'"
    proc = subprocess.run(
        [locust, "-f", os.path.join(ROOT, "loadtest", "locustfile.py"), "--headless",
         "-u", "2", "-r", "2", "-t", "5s", "--only-summary",
         "--host", f"tcp://127.0.0.1:{real.port}"],
        env=dict(env_here(), SCANPAY_USERS="20", SCANPAY_MERCHANTS="2"),
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the server holds data outside the load test's ids" in proc.stderr
    with Client.connect("127.0.0.1", real.port) as c:
        assert c.call("BALANCES", {"users": [1]})["users"][0]["balance"] == 10**9


def test_serve_damaged_journal(tmp_path):
    from engine import Engine
    from engine.storage.journal import verify
    with Engine(str(tmp_path / "data")) as eng:
        for k in range(30):
            eng.call("WALLETS", {"users": [k + 1]})
    segment = verify(str(tmp_path / "data")).segments[-1].file
    offset = os.path.getsize(segment) // 2
    with open(segment, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    line = serve_fails("--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0")
    assert line.startswith(f"scanpay serve: the journal is damaged ({tmp_path / 'data'}): ")
    assert "journal corrupt" in line


def test_serve_tls_files_missing_or_bad(tmp_path):
    line = serve_fails("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                       "--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key"))
    assert line.startswith(f"scanpay serve: no such file or directory ({tmp_path / 'no.pem'}, ")
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    line = serve_fails("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                       "--tls-cert", str(tmp_path / "bad.pem"), "--tls-key", str(tmp_path / "bad.pem"))
    assert line.startswith("scanpay serve: the TLS certificate or key cannot be used (")
