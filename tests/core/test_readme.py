"""The README's library example runs as written and prints what it says."""
import contextlib
import io
import re
from pathlib import Path

from support import ROOT


def test_readme_library_example_runs():
    text = Path(ROOT, "README.md").read_text()
    block = re.search(r"## Library use\n\n```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "0 2500 500 18"
    assert lines[2] == "True"


def test_readme_client_example_runs_against_a_server():
    from support.servers import RealServer
    text = Path(ROOT, "README.md").read_text()
    section = text.split("## Library use\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "Client.connect(\"127.0.0.1\", 7411)" in block
    with RealServer() as server:
        setup = ("from engine import Client\n"
                 f"with Client.connect('127.0.0.1', {server.port}) as c:\n"
                 "    c.call('MERCHANTS', {'merchants': [{'id': 1}]})\n"
                 "    c.call('WALLETS', {'users': [42]})\n"
                 "    c.call('TOPUP', {'topups': [{'id': 1, 'user': 42, 'amount': 100_00}]})\n")
        exec(compile(setup, "setup", "exec"), {})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace("7411", str(server.port)), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "True 3000 ok"
    assert "'balance': 7000" in lines[1]


def test_readme_demo_command_matches_the_optional_report_extra():
    """The quick start installs `.` without extras, so the demo must not need
    matplotlib (tests/test_api.py runs it without); README says how to get
    the PNG, with the extra pyproject defines."""
    import tomllib
    root = Path(ROOT)
    text = root.joinpath("README.md").read_text()
    assert ".venv/bin/pip install -q -e . && .venv/bin/scanpay demo" in text
    assert "pip install -e '.[report]'" in text
    extras = tomllib.loads(root.joinpath("pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "report" in extras
