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
