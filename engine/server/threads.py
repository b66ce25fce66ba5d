"""Scheduling priority of the threads every durable reply waits on.

The sync thread (write + fdatasync) and the sender thread (replies after
the fsync) run for tens of microseconds per fsync, but every durable reply
waits for them. On a busy machine a thread woken by a finished fdatasync
otherwise waits its turn behind whatever holds the core (the event loop,
other processes): measured on the 2-core project VM with both cores busy,
8 KiB write+fdatasync p99 2.7 ms at the process's priority, 0.24 ms at
nice -10 (docs/performance-server.md). Raising a thread's priority needs
CAP_SYS_NICE or RLIMIT_NICE; without it the server says so once and runs
at the process's priority.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("scanpay.threads")

NICE_MIN = -20
_warned = False


def raise_thread_priority(nice_delta: int, role: str) -> bool:
    """Run the calling thread at the process's nice value plus `nice_delta`
    (negative: ahead of the process's other threads). True if applied."""
    global _warned
    assert NICE_MIN <= nice_delta <= 0
    if nice_delta == 0:
        return True
    thread_id = threading.get_native_id()
    nice = max(NICE_MIN, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice_delta)
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, nice)
    except PermissionError:
        if not _warned:
            _warned = True
            log.warning("io_threads_nice %d is not permitted for the %s thread: grant "
                        "CAP_SYS_NICE or a nice limit (systemd: LimitNICE=%d), or set "
                        "io_threads_nice = 0; running at the process's priority "
                        "(durable replies may wait longer on a busy machine)",
                        nice_delta, role, nice)
        return False
    return True
