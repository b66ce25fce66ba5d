"""Scanpay: a scan-to-pay payment and coupon settlement engine.

The public API (README.md, "API"):

- `Engine`: the embedded engine (the compiled kernel, journal, snapshots);
- `Client` (blocking) and `AsyncClient` (asyncio): clients of a server, which
  need only the protocol (no compiled extension);
- the record dtypes (`PAY_RECORD`, `PAY_RESULT`, ...), the status codes
  (`Status`), the error-frame codes (`ErrorCode`) and the errors that refuse a
  request (`EngineError` and its subclasses).

Importing `engine` is cheap: `Engine` and the clients load on first use, so a
program that only talks to a server never loads the kernel or the server.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine._version import __version__
from engine.protocol.errors import (BadBody, BadFrame, Busy, EngineError, Forbidden, FrameTooLarge,
                                    NotAuthenticated, Unavailable, UnknownOp, UnsupportedProtocol)
from engine.protocol.records import (CAPTURE_RECORD, ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD,
                                     PAY_RESULT, REFUND_RECORD, REFUND_RESULT)
from engine.protocol.status import ErrorCode, Status

if TYPE_CHECKING:
    from engine.client import AsyncClient, Client, ConnectionLost, ProtocolError
    from engine.core.engine import Engine

__all__ = [
    "__version__",
    "Engine", "AsyncClient", "Client",
    "EngineError", "BadBody", "BadFrame", "Busy", "Forbidden", "FrameTooLarge",
    "NotAuthenticated", "Unavailable", "UnknownOp", "UnsupportedProtocol",
    "ConnectionLost", "ProtocolError",
    "Status", "ErrorCode",
    "PAY_RECORD", "PAY_RESULT", "ISSUE_RECORD", "ISSUE_RESULT",
    "CAPTURE_RECORD", "REFUND_RECORD", "REFUND_RESULT",
]

# Names loaded on first use: name -> module. Engine pulls the compiled kernel
# and the storage; the clients pull only engine.protocol.
_LAZY = {
    "Engine": "engine.core.engine",
    "AsyncClient": "engine.client",
    "Client": "engine.client",
    "ConnectionLost": "engine.client",
    "ProtocolError": "engine.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value           # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
