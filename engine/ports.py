"""Free loopback ports for servers started by the tests, the benchmarks and
`scanpay cluster up` (the one owner of that rule).

A port the kernel hands out for `bind(port 0)` comes from the ephemeral
range (net.ipv4.ip_local_port_range, 32768-60999 by default), the same range
every outgoing connection takes its source port from. Between choosing such
a port and the server binding it, any connection (a NATS route dialling its
peers, a client) can take it, and the server exits with "address already in
use": CI saw a NATS node die that way. So ports are drawn at random from
below the ephemeral range, where no outgoing connection lands, and each is
checked free before it is handed out.
"""
from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"
LOW_PORT = 10000                  # above the well-known and registered ports most services use
RANGE_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
TRIES_MAX = 1000                  # random draws before falling back to the kernel's choice


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing source ports (Linux; elsewhere the IANA one)."""
    try:
        with open(RANGE_PATH) as f:
            low, high = (int(word) for word in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def bindable(port: int, host: str = HOST) -> bool:
    """Whether a listener could bind `port` now: SO_REUSEADDR as nats-server
    and asyncio set it, so connections of an earlier run in TIME_WAIT do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def kernel_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct ports nothing listens on now, below the ephemeral range."""
    low, _ = ephemeral_range()
    chosen: list[int] = []
    for _ in range(TRIES_MAX):
        if len(chosen) == count:
            return chosen
        port = random.randrange(LOW_PORT, low) if low > LOW_PORT + 1000 else kernel_port(host)
        if port not in chosen and bindable(port, host):
            chosen.append(port)
    if len(chosen) < count:
        raise OSError(f"no {count} free ports on {host} in {TRIES_MAX} tries")
    return chosen


def free_port(host: str = HOST) -> int:
    """One port nothing listens on now, below the ephemeral range."""
    return free_ports(1, host)[0]
