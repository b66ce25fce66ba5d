"""What the tests share: the one settable Clock (support/clock.py), the
plain-Python reference (support/reference*.py) and the harnesses that drive
it beside the engine, the wire helpers and servers the server, client and CLI
tests start, fault-injecting file systems, and the crash child.

tests/ is on sys.path (pyproject's pytest `pythonpath`), so tests import
these as `support.<module>` from any folder."""
from pathlib import Path

# The repository's root (this file is tests/support/__init__.py): where tests
# find README.md, docs/, bench/ and loadtest/, and the cwd/PYTHONPATH of the
# processes they start.
ROOT = str(Path(__file__).resolve().parents[2])
