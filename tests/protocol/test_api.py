"""The public API (issue 15): what `import engine` gives, the version's one
source, the client without the compiled extensions, the owners of op
numbers, limits and status codes, and the typed program under mypy --strict."""
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest

import engine
from engine.protocol import limits, ops
from engine.protocol.status import STATUS_NAMES, Status

from support.servers import RealServer

from support import ROOT  # noqa: E402
EXTENSIONS = ("engine._kernel", "engine._framing", "engine._outlet", "engine._loadgen",
              "engine._marketing")

# Makes the compiled extensions (and the packages that need them) unimportable,
# as on a machine where only the protocol is installed.
BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = ("engine._kernel", "engine._framing", "engine._outlet", "engine._loadgen",
               "engine._marketing", "engine.core", "engine.server", "engine.storage", "engine._client")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
                raise ImportError(f"{name} is blocked: the client must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def run_python(code: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout_s, cwd=ROOT)


# -- import engine -------------------------------------------------------------------

def test_public_names_are_exported():
    names = set(engine.__all__)
    for name in ("Engine", "AsyncClient", "Client", "EngineError", "BadBody", "Status",
                 "ErrorCode", "PAY_RECORD", "PAY_RESULT", "ISSUE_RECORD", "ISSUE_RESULT",
                 "CAPTURE_RECORD", "REFUND_RECORD", "REFUND_RESULT", "__version__"):
        assert name in names, name
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
    from engine.client import Client
    from engine.core.engine import Engine
    assert engine.Engine is Engine and engine.Client is Client
    with pytest.raises(AttributeError):
        engine.no_such_name    # noqa: B018 - the lazy lookup refuses unknown names


def test_import_engine_is_cheap():
    """`import engine` loads neither the kernel nor the server nor the clients."""
    out = run_python("import sys, engine; print(sorted(m for m in sys.modules "
                     "if m.startswith('engine')))")
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)      # noqa: S307 - our own repr of a list of names
    assert "engine" in loaded
    heavy = [m for m in loaded if m.startswith(EXTENSIONS + ("engine.core", "engine.server",
                                                              "engine.storage", "engine.client"))]
    assert heavy == []


def test_import_client_does_not_load_the_kernel():
    out = run_python("import sys, engine.client; print(sorted(m for m in sys.modules "
                     "if m.startswith('engine')))")
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)      # noqa: S307
    assert "engine.client" in loaded
    # The client's own hot path (engine._client, compiled, or its twin
    # engine._client_py) is the client's; nothing of the engine's core.
    assert [m for m in loaded if not m.startswith(("engine.protocol", "engine.client"))] == \
        ["engine", "engine._client", "engine._client_py", "engine._version"]


# -- the version's one source --------------------------------------------------------

def test_version_has_one_source():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "engine._version.__version__"
    from engine import _version
    from engine.cli import package_version
    from engine.client import CLIENT_NAME
    assert engine.__version__ == _version.__version__ == package_version()
    assert CLIENT_NAME == f"scanpay-python/{engine.__version__}"
    assert engine.__version__[0].isdigit()


def test_py_typed_and_stubs_ship_with_the_package():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["engine"]
    assert "py.typed" in package_data and "*.pyi" in package_data
    for name in ("py.typed", "_kernel.pyi", "_framing.pyi", "_outlet.pyi", "_marketing.pyi"):
        assert os.path.exists(os.path.join(ROOT, "engine", name)), name


# -- the client without the compiled extensions ---------------------------------------

def test_client_works_without_the_compiled_extensions():
    """A subprocess where engine._kernel/_framing/_outlet (and engine.core,
    engine.server, engine.storage) cannot be imported uses Client and
    AsyncClient against a real server started here."""
    with RealServer() as server:
        code = BLOCKER + textwrap.dedent(f"""
            import asyncio
            import numpy as np
            import engine
            from engine import AsyncClient, Client, PAY_RECORD, Status, UnknownOp
            try:
                engine.Engine
            except ImportError:
                pass
            else:
                raise SystemExit("the blocker let the kernel through")
            port = {server.port}
            with Client.connect("127.0.0.1", port) as c:
                assert c.server_info.protocol == 1
                c.call("MERCHANTS", {{"merchants": [{{"id": 1}}]}})
                c.call("WALLETS", {{"users": [1]}})
                c.call("TOPUP", {{"topups": [{{"id": 1, "user": 1, "amount": 10_000}}]}})
                one = c.pay_one(id=1, payer=1, merchant=1, amount=300)
                assert one.ok and one.cash == 300, one
                batch = np.zeros(2, PAY_RECORD)
                batch["id"], batch["payer"], batch["merchant"], batch["amount"] = [2, 3], 1, 1, 100
                assert list(c.pay(batch)["status"]) == [0, 0]
                try:
                    c.call(99, {{}})
                except UnknownOp:
                    pass
                else:
                    raise SystemExit("op 99 was accepted")

            async def main():
                async with await AsyncClient.connect("127.0.0.1", port) as c:
                    paid = await asyncio.gather(*(c.pay_one(id=10 + i, payer=1, merchant=1,
                                                            amount=100) for i in range(5)))
                    assert all(p.ok for p in paid), paid
                    broke = await c.pay_one(id=20, payer=1, merchant=1, amount=10**6)
                    assert broke.status == Status.insufficient_funds, broke
                    return (await c.call("BALANCES", {{"users": [1]}}))

            balances = asyncio.run(main())
            import sys
            loaded = [m for m in sys.modules if m.startswith(
                ("engine._", "engine.core", "engine.server", "engine.storage"))]
            assert sorted(loaded) == ["engine._client_py", "engine._version"], loaded
            print(balances["users"][0]["balance"])
        """)
        out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 10_000 - 300 - 200 - 500


# -- one owner for ops, limits and status codes ---------------------------------------

def test_op_numbers_have_one_owner():
    from engine import client
    from engine.core import dispatch
    assert client.OPS is ops.OP_CODES
    assert {op.name: op.code for op in dispatch.MAP_OPS.values()} == ops.MAP_OP_CODES
    assert ops.OP_NAMES[ops.OP_PAY] == "PAY" and ops.OP_CODES["EXPIRE"] == ops.OP_EXPIRE
    assert len(set(ops.OP_CODES.values())) == len(ops.OP_CODES)


def test_status_codes_are_complete_and_dense():
    assert sorted(STATUS_NAMES) == list(range(len(Status)))
    assert (Status.program_not_found, Status.insufficient_points, Status.offer_not_found) == \
        (30, 31, 32)


def test_limits_agree_with_the_records_and_the_server():
    from engine.protocol.frame import FRAME_BYTES_MAX_DEFAULT, HEADER_BYTES
    from engine.protocol.records import PAY_RECORD
    from engine.server.config import Config
    assert PAY_RECORD["coupons"].shape == (limits.COUPONS_PER_PAYMENT_MAX,)
    assert HEADER_BYTES + limits.BATCH_RECORDS_MAX * PAY_RECORD.itemsize <= FRAME_BYTES_MAX_DEFAULT
    assert Config().batch_records_max == limits.BATCH_RECORDS_MAX


# -- matplotlib is optional ---------------------------------------------------------

NO_MATPLOTLIB = textwrap.dedent("""
    import sys

    class NoMatplotlib:
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ImportError("No module named 'matplotlib' (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoMatplotlib())
""")


def test_report_and_demo_without_matplotlib_write_the_csv_and_say_how(tmp_path):
    from engine.cli.report import PNG_NEEDS_EXTRA
    data = tmp_path / "data"
    with engine.Engine(str(data)) as eng:
        eng.call("MERCHANTS", {"merchants": [{"id": 1}]})
        eng.call("STOCKS", {"stocks": [{"id": 5, "funder": "platform", "kind": "fixed",
                                        "value": 100, "valid_from": 0, "valid_until": 2**62}]})
    code = NO_MATPLOTLIB + textwrap.dedent(f"""
        from engine.cli import main
        rc = main(["report", "--data", {str(data)!r}, "--out", {str(tmp_path / "r")!r}])
        print("rc", rc)
        rc = main(["demo", "--embedded", "--payments", "2000", "--users", "500",
                   "--report", {str(tmp_path / "d")!r}])
        print("rc", rc)
        assert "matplotlib" not in sys.modules
    """)
    out = run_python(code, timeout_s=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "rc 0" in lines and lines.count("rc 0") == 2, out.stdout
    assert lines.count(PNG_NEEDS_EXTRA) == 2, out.stdout      # one line each, as written
    assert "pip install 'scanpay[report]'" in PNG_NEEDS_EXTRA
    for out_dir in ("r", "d"):
        assert (tmp_path / out_dir / "campaigns.csv").exists()
        assert (tmp_path / out_dir / "merchants.csv").exists()
        assert not (tmp_path / out_dir / "report.png").exists()


def test_matplotlib_is_an_extra_not_a_dependency():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not [d for d in project["dependencies"] if d.startswith("matplotlib")]
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["report"])
    assert any(d.startswith("matplotlib") for d in extras["test"])
    assert any(d.startswith("mypy") for d in extras["test"])


# -- typed ------------------------------------------------------------------------------

def test_typed_program_passes_mypy_strict():
    """tests/typing/usage.py uses Engine, the clients and the records; mypy
    --strict checks it against the package's annotations and stubs."""
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "tests/typing/mypy.ini",
         "--cache-dir", os.path.join(ROOT, ".mypy_cache"), "tests/typing/usage.py"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 1 source file" in out.stdout


def test_extension_stubs_match_the_compiled_modules():
    """engine/*.pyi describe what ext/*.pyx really export (mypy.stubtest
    imports the extensions and compares), so a changed kernel surface shows
    here, not as a wrong type in a caller."""
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "engine._kernel", "engine._framing",
         "engine._outlet", "engine._marketing", "engine._packing",
         "--mypy-config-file", "tests/typing/mypy.ini",
         "--allowlist", "tests/typing/stubtest-allowlist.txt"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout + out.stderr
