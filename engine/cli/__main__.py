"""`python -m engine.cli` runs the `scanpay` command."""
import sys

from engine.cli import main

sys.exit(main())
