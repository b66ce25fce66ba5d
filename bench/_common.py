"""What the benchmarks and their conftest share (one module object, so one SUMMARY)."""
from __future__ import annotations

import os

from engine.ports import free_port  # noqa: F401 (the benchmarks' one way to a port)

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


class ServerProcess:
    """`python <argv>` from the repository root (a server or the adapter),
    logging to `log_path`, ready once `port` accepts connections (30 s at
    most); its CPU time from /proc; stopped by pid."""

    def __init__(self, argv: list[str], port: int, log_path: str, start_s_max: float = 30):
        import contextlib
        import pathlib
        import socket
        import subprocess
        import sys
        import time
        root = pathlib.Path(__file__).resolve().parent.parent
        self.port = port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=str(root),
                                     env=dict(os.environ, PYTHONPATH=str(root)),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_s_max
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(open(log_path).read()[-2000:])
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not start")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        import subprocess
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
