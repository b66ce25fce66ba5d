"""HELLO authentication (docs/reference/protocol.md) and what each role may do.

A key has an id, a secret, a role (`gateway` or `admin`) and, for gateways,
the merchants it may charge. The MAC is HMAC-SHA256 keyed with the secret over
f"{ts}.{nonce}.{key_id}"; `ts` must be within 5 minutes of the server clock and
a nonce is accepted once. Seen nonces live in memory only, so a HELLO must
also be no older than the server's start: one captured before a restart
cannot be replayed after it (docs/reference/protocol.md, "HELLO").
"""
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

TS_SKEW_MS_MAX = 5 * 60 * 1000
NONCES_MAX = 100_000                 # remembered nonces (older ones have expired ts anyway)
NONCE = re.compile(r"^[0-9a-fA-F]{32}$")

ROLE_GATEWAY = "gateway"
ROLE_ADMIN = "admin"
# Ops a gateway may send (docs/reference/protocol.md names). Everything else is admin only.
GATEWAY_OPS = frozenset({
    "HELLO", "PING", "PAY", "ISSUE", "QUOTE", "PAYMENT_CODE", "COUPONS",
    "CAPTURE", "VOID", "REFUND", "REVERSE", "GET_PAYMENTS",
    "CAPTURE_RECORDS", "REFUND_RECORDS",
})


@dataclass(frozen=True)
class Key:
    key_id: str
    secret: str
    role: str
    merchants: frozenset = field(default_factory=frozenset)


@dataclass(frozen=True)
class Identity:
    role: str
    merchants: frozenset | None = None   # None: every merchant
    key_id: str | None = None

    def may(self, op_name: str) -> bool:
        return self.role == ROLE_ADMIN or op_name in GATEWAY_OPS


ANONYMOUS_ADMIN = Identity(ROLE_ADMIN)   # a server with no keys (loopback only)


def hello_mac(secret: str, key_id: str, ts_ms: int, nonce: str) -> bytes:
    """The HELLO MAC (PROTOCOL.md): HMAC-SHA256 over "ts.nonce.key_id", keyed
    with the secret. The one definition: the client signs with it, the
    server checks with it."""
    message = f"{ts_ms}.{nonce}.{key_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


# HELLO fields and the types they must have, when present (docs/reference/protocol.md).
# `type(v) is int`: a bool or a float equal to 1 is not a protocol number.
HELLO_FIELD_TYPES = {"protocol": (int,), "client": (str,), "key_id": (str,), "ts": (int,),
                     "nonce": (str,), "mac": (bytes, bytearray)}


def hello_shape_error(hello: dict) -> str | None:
    """What is malformed in a HELLO map (a field of the wrong type, or no
    protocol number), or None."""
    if "protocol" not in hello:
        return "HELLO needs `protocol`, an integer"
    for name, types in HELLO_FIELD_TYPES.items():
        if name in hello and type(hello[name]) not in types:
            return (f"HELLO `{name}` must be {' or '.join(t.__name__ for t in types)}, "
                    f"got {type(hello[name]).__name__}")
    return None


class Authenticator:
    def __init__(self, keys: list[Key], started_ms: int | None = None):
        self.keys = {k.key_id: k for k in keys}
        self.nonces = OrderedDict()
        # Nonces are remembered from this moment only (in memory): a HELLO
        # signed before it may have been used before a restart. Refuse it.
        self.started_ms = time.time_ns() // 1_000_000 if started_ms is None else started_ms

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, hello: dict, now_ms: int | None = None) -> Identity:
        """The identity a HELLO proves; raises ValueError saying why not."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        key_id = hello.get("key_id")
        key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise ValueError("unknown key_id")
        ts, nonce, mac = hello.get("ts"), hello.get("nonce"), hello.get("mac")
        if type(ts) is not int or abs(now_ms - ts) > TS_SKEW_MS_MAX:
            raise ValueError("ts missing or more than 5 minutes off the server clock")
        if ts < self.started_ms:
            raise ValueError("ts is older than the server's start: sign a new HELLO")
        if not isinstance(nonce, str) or not NONCE.match(nonce):
            raise ValueError("nonce must be 32 hex digits")
        if not isinstance(mac, (bytes, bytearray)) or not hmac.compare_digest(
                bytes(mac), hello_mac(key.secret, key.key_id, ts, nonce)):
            raise ValueError("mac does not match")
        if nonce in self.nonces:
            raise ValueError("nonce already used")
        self.nonces[nonce] = ts
        while len(self.nonces) > NONCES_MAX:
            self.nonces.popitem(last=False)
        merchants = key.merchants if key.role == ROLE_GATEWAY else None
        return Identity(key.role, merchants, key.key_id)
