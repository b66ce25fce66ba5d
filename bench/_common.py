"""What the benchmarks and their conftest share (one module object, so one SUMMARY)."""
from __future__ import annotations

import os

SUMMARY: dict[str, str] = {}      # figure -> text, printed at the end of the session


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), shared/noisy VM"


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def load() -> str:
    """The machine is shared: say how busy it was when a figure was taken."""
    one, five, _ = os.getloadavg()
    return f"load avg {one:.1f}/{five:.1f} on {os.cpu_count()} cores"
