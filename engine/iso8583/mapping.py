"""ISO 8583 <-> Scanpay mapping: the adapter's rules, with no sockets.

What each MTI becomes (PAY, PAY with the authorize flag, CAPTURE, REVERSE,
network management), how the payment id is derived from the message, how
Scanpay statuses become DE39 response codes, and what DE54 carries.
docs/iso8583.md has the same tables for operators; this module is the one
owner of them. Encoding and decoding are pyiso8583's (`iso8583`), with the
field specification from the config file.
"""
from __future__ import annotations

import copy
import hashlib
import ipaddress
import tomllib
from dataclasses import dataclass, field

import iso8583
import iso8583.specs

from engine.server.config import is_loopback
from engine.protocol.records import PAY_AUTHORIZE, PAY_PAYER_IS_CODE
from engine.protocol.limits import AMOUNT_MAX
from engine.protocol.status import Status

# -- MTIs -----------------------------------------------------------------------------

AUTHORIZE, PAY, CAPTURE, REVERSE, NETWORK = "authorize", "pay", "capture", "reverse", "network"
# Request MTI (repeats included) -> what it does. Repeats (xx01/xx21) are the
# same request again: the payment id makes them idempotent.
MTI_ACTIONS = {
    "0100": AUTHORIZE, "0101": AUTHORIZE,
    "0200": PAY, "0201": PAY,
    "0220": CAPTURE, "0221": CAPTURE,
    "0400": REVERSE, "0401": REVERSE, "0420": REVERSE, "0421": REVERSE,
    "0800": NETWORK,
}
# DE70 network management codes.
NM_SIGN_ON, NM_SIGN_OFF, NM_ECHO = "001", "002", "301"

# -- DE39 -----------------------------------------------------------------------------

RC_APPROVED = "00"
RC_INVALID_MERCHANT = "03"
RC_INVALID_TRANSACTION = "12"
RC_INVALID_AMOUNT = "13"
RC_INVALID_CODE = "14"
RC_NO_RECORD = "25"
RC_FORMAT_ERROR = "30"
RC_FUNCTION_NOT_SUPPORTED = "40"
RC_INSUFFICIENT_FUNDS = "51"
RC_NOT_PERMITTED = "58"
RC_ENGINE_UNAVAILABLE = "91"     # retryable: nothing was applied, or the repeat replays it
RC_DUPLICATE = "94"
RC_SYSTEM_ERROR = "96"

STATUS_RESPONSE_CODES = {
    Status.ok: RC_APPROVED,
    Status.insufficient_funds: RC_INSUFFICIENT_FUNDS,
    Status.payment_code_invalid: RC_INVALID_CODE,
    Status.payer_not_found: RC_INVALID_CODE,
    Status.invalid_amount: RC_INVALID_AMOUNT,
    Status.exists_with_different_fields: RC_DUPLICATE,
    Status.merchant_not_found: RC_INVALID_MERCHANT,
    Status.merchant_inactive: RC_INVALID_MERCHANT,
    Status.payment_not_found: RC_NO_RECORD,
    Status.reversed: RC_INVALID_TRANSACTION,
    Status.payment_not_authorized: RC_INVALID_TRANSACTION,
    Status.authorization_expired: RC_INVALID_TRANSACTION,
    Status.forbidden: RC_NOT_PERMITTED,
}


def response_code(status: int) -> str:
    """DE39 of a Scanpay status; anything unmapped is a system error (96)."""
    try:
        return STATUS_RESPONSE_CODES.get(Status(status), RC_SYSTEM_ERROR)
    except ValueError:
        return RC_SYSTEM_ERROR


def response_mti(mti: str) -> str | None:
    """0200 -> 0210, 0201 -> 0210, 0220 -> 0230; None for what is not a request or advice."""
    if len(mti) != 4 or not mti.isdigit() or mti[2] not in "02":
        return None
    return f"{mti[:2]}{int(mti[2]) + 1}0"


# -- DE54 -----------------------------------------------------------------------------

# Additional amounts, ISO 8583:1987 layout, 20 characters each: account type
# n2, amount type n2, currency n3, sign C/D, amount n12. The amount types are
# from the private range: ISO defines none for a coupon discount.
DE54_ACCOUNT_TYPE = "00"
DE54_DISCOUNT = "91"     # the coupon discount applied, sign C (the shopper did not pay it)
DE54_CASH = "92"         # the cash drawn (or held) from the shopper's wallet, sign D


def additional_amounts(currency: str, cash: int, discount: int) -> str:
    return (f"{DE54_ACCOUNT_TYPE}{DE54_DISCOUNT}{currency}C{discount:012d}"
            f"{DE54_ACCOUNT_TYPE}{DE54_CASH}{currency}D{cash:012d}")


# -- payment ids ----------------------------------------------------------------------

PAYMENT_ID_DOMAIN = b"scanpay-iso8583-v1\x00"
PAYMENT_ID_TOP_BIT = 1 << 63      # ISO-derived ids never meet ids below 2**63


def payment_id(acquirer: str, merchant: str, terminal: str, rrn: str) -> int:
    """The payment id of (DE32, DE42, DE41, DE37): the same on every
    retransmission, repeat, completion and reversal of one transaction.

    BLAKE2b-64 over the four fields as received, separated by 0x1F (which the
    an/ans fields cannot carry), with the top bit set."""
    text = "\x1f".join((acquirer, merchant, terminal, rrn)).encode("latin-1")
    digest = hashlib.blake2b(PAYMENT_ID_DOMAIN + text, digest_size=8).digest()
    return PAYMENT_ID_TOP_BIT | int.from_bytes(digest, "big")


def approval_code(payment: int) -> str:
    """DE38: six digits of the payment id, so a repeat gets the same code."""
    return f"{payment % 1_000_000:06d}"


def mask_code(code: str) -> str:
    """A payment code as logs may show it: the last 4 digits (card PAN style)."""
    return "*" * max(len(code) - 4, 0) + code[-4:]


# -- config -----------------------------------------------------------------------------

CURRENCY_NUMERIC = {"CNY": "156", "HKD": "344", "MOP": "446", "TWD": "901", "SGD": "702",
                    "MYR": "458", "THB": "764", "JPY": "392", "KRW": "410", "USD": "840",
                    "EUR": "978", "GBP": "826", "AUD": "036", "INR": "356"}
FRAMINGS = ("binary2", "ascii4")
SPECS = ("default_ascii", "default")
ECHO_FIELDS_DEFAULT = ("3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49", "70")


# Every field the adapter reads or writes, at its usual size: a field spec
# that cannot carry this is refused at start, not on the first payment.
SAMPLE_RESPONSE = {
    "t": "0210", "2": "1" * 18, "3": "000000", "4": "0" * 12, "7": "1206153000",
    "11": "000001", "12": "153000", "13": "1206", "32": "12345", "37": "0" * 12,
    "38": "000001", "39": "00", "41": "TERM0001", "42": "MERCHANT0000001", "49": "156",
    "54": "0" * 40, "70": "301"}


class IsoConfigError(ValueError):
    pass


@dataclass
class IsoConfig:
    listen: str = "127.0.0.1:8583"
    engine: str = "127.0.0.1:7411"
    engine_key_id: str = ""
    engine_secret: str = ""
    engine_timeout_ms: int = 10_000
    framing: str = "binary2"           # 2-byte big-endian length; ascii4: 4 ASCII digits
    spec: str = "default_ascii"        # a pyiso8583 bundled spec, then `fields` overrides
    fields: dict = field(default_factory=dict)
    currency: str = ""                 # DE49 (numeric); default: the engine's, from HELLO
    frame_bytes_max: int = 8192
    inflight_max: int = 256            # per link; then the link stops being read
    idle_timeout_ms: int = 300_000
    connections_max: int = 256
    require_sign_on: bool = False
    echo_fields: list = field(default_factory=lambda: list(ECHO_FIELDS_DEFAULT))
    metrics: str = ""                  # host:port of a Prometheus endpoint; "" = none
    merchants: dict = field(default_factory=dict)   # DE42 -> Scanpay merchant id
    # Peers (IP networks) that may open links. ISO 8583 has no login of its
    # own: a non-loopback listener must say who may connect.
    allow_from: list = field(default_factory=list)
    log_format: str = "text"

    def build_spec(self) -> dict:
        spec = copy.deepcopy(getattr(iso8583.specs, self.spec))
        for number, overrides in self.fields.items():
            spec.setdefault(str(number), {}).update(overrides)
        return spec


INT_SETTINGS = {"engine_timeout_ms": (1, 600_000), "frame_bytes_max": (64, 65_535),
                "inflight_max": (1, 65_536), "idle_timeout_ms": (1, 86_400_000),
                "connections_max": (1, 100_000)}


def load_config(path: str | None, overrides: dict) -> IsoConfig:
    """The `[iso8583]` section of a TOML file (a `scanpay serve` config may hold
    it too), then non-None command-line overrides."""
    section = {}
    if path:
        try:
            with open(path, "rb") as f:
                section = dict(tomllib.load(f).get("iso8583", {}))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise IsoConfigError(f"cannot read config {path}: {e}") from None
    return config_from(section, overrides, path or "the command line")


def config_from(section: dict, overrides: dict, where: str = "[iso8583]") -> IsoConfig:
    known = set(IsoConfig.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise IsoConfigError(f"{where}: unknown [iso8583] setting(s) {sorted(unknown)}")
    section.update({k: v for k, v in overrides.items() if v is not None})
    config = IsoConfig(**section)
    check_config(config)
    return config


def check_config(config: IsoConfig) -> None:
    for name, (low, high) in INT_SETTINGS.items():
        value = getattr(config, name)
        if type(value) is not int or not low <= value <= high:
            raise IsoConfigError(f"{name} must be a whole number in {low}..{high}")
    if config.framing not in FRAMINGS:
        raise IsoConfigError(f"framing must be one of {', '.join(FRAMINGS)}")
    if config.framing == "ascii4" and config.frame_bytes_max > 9999:
        raise IsoConfigError("frame_bytes_max must be at most 9999 with ascii4 framing")
    if config.spec not in SPECS:
        raise IsoConfigError(f"spec must be one of {', '.join(SPECS)} (pyiso8583's bundled specs)")
    if config.currency and not (len(config.currency) == 3 and config.currency.isdigit()):
        raise IsoConfigError("currency must be the 3-digit ISO 4217 code DE49 carries, e.g. 156")
    if not isinstance(config.require_sign_on, bool):
        raise IsoConfigError("require_sign_on must be true or false")
    for de42, merchant in config.merchants.items():
        if type(merchant) is not int or not 1 <= merchant < 2**64:
            raise IsoConfigError(f"merchants: {de42!r} must map to a Scanpay merchant id (1..2**64-1)")
    for number, overrides in config.fields.items():
        if not str(number).isdigit() and str(number) not in ("h", "t", "p"):
            raise IsoConfigError(f"fields: {number!r} is not a data element number")
        if not isinstance(overrides, dict):
            raise IsoConfigError(f"fields.{number} must be a table of pyiso8583 spec keys")
    check_peers(config)
    for address in (config.listen, config.engine) + ((config.metrics,) if config.metrics else ()):
        split_address(address)
    try:
        iso8583.encode(SAMPLE_RESPONSE, config.build_spec())
    except Exception as e:  # noqa: BLE001 - any spec mistake is the operator's to fix
        raise IsoConfigError(f"the field spec does not encode a network message: {e}") from None


def check_peers(config: IsoConfig) -> None:
    try:
        networks = [ipaddress.ip_network(str(n), strict=False) for n in config.allow_from]
    except ValueError as e:
        raise IsoConfigError(f"allow_from: {e}") from None
    host, _port = split_address(config.listen)
    if not networks and not is_loopback(host):
        raise IsoConfigError(f"refusing to listen on {config.listen} with no allow_from: list "
                             f"the acquirers' networks, or listen on 127.0.0.1")


def peer_allowed(config: IsoConfig, host: str) -> bool:
    """With no allow_from (a loopback listener), any peer; else only peers
    inside one of its networks (list 127.0.0.1 to keep local tools)."""
    if not config.allow_from:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(str(n), strict=False) for n in config.allow_from)


def split_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" (port 0: any free port, for tests) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise IsoConfigError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# -- requests ---------------------------------------------------------------------------

# ISO 8583 data element types of the fields the adapter reads: n fields must be
# digits, the others printable ASCII. pyiso8583 checks lengths, not content.
NUMERIC_FIELDS = frozenset({"2", "3", "4", "7", "11", "12", "13", "32", "49", "70"})
REQUIRED = {
    AUTHORIZE: ("2", "4", "11", "37", "41", "42"),
    PAY: ("2", "4", "11", "37", "41", "42"),
    CAPTURE: ("4", "11", "37", "41", "42"),
    REVERSE: ("11", "37", "41", "42"),
    NETWORK: ("11", "70"),
}


class FormatError(ValueError):
    """The message decodes but breaks a field rule: DE39 30, nothing applied."""


@dataclass
class Request:
    mti: str
    action: str
    fields: dict          # the decoded fields (pyiso8583's doc_dec)
    payment: int = 0      # derived payment id (0 for network management)
    merchant: int = 0     # Scanpay merchant id from DE42
    amount: int = 0       # DE4, minor units
    code: int = 0         # DE2 payment code


def check_fields(doc: dict) -> None:
    """Content rules pyiso8583 does not check: n fields hold digits only."""
    for number, value in doc.items():
        if number in NUMERIC_FIELDS and value and not value.isdigit():
            raise FormatError(f"DE{number} must be numeric")
        if number not in ("h", "t", "p", "1") and not value.isprintable():
            raise FormatError(f"DE{number} holds unprintable characters")


def check_transmission_time(value: str) -> None:
    """DE7 is MMDDhhmmss (UTC): a month, a day, an hour... that exist."""
    if len(value) != 10:
        raise FormatError("DE7 is not MMDDhhmmss")
    month, day, hour, minute, second = (int(value[i:i + 2]) for i in range(0, 10, 2))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        raise FormatError("DE7 is not MMDDhhmmss")


def parse_request(doc: dict, config: IsoConfig) -> Request:
    """A decoded message as a Request; FormatError if a field breaks a rule."""
    mti = doc["t"]
    action = MTI_ACTIONS[mti]
    check_fields(doc)
    if doc.get("7"):
        check_transmission_time(doc["7"])
    missing = [n for n in REQUIRED[action] if not doc.get(n)]
    if missing:
        raise FormatError(f"missing DE{', DE'.join(missing)}")
    request = Request(mti, action, doc)
    if action == NETWORK:
        return request
    request.payment = payment_id(doc.get("32", ""), doc["42"], doc["41"], doc["37"])
    request.merchant = config.merchants.get(doc["42"].strip(), 0)
    if "4" in doc:
        request.amount = int(doc["4"])
    if action in (AUTHORIZE, PAY):
        request.code = int(doc["2"])
        if request.code >= 2**64:
            raise FormatError("DE2 is out of range for a payment code")
    return request


def pay_flags(action: str) -> int:
    return PAY_PAYER_IS_CODE | (PAY_AUTHORIZE if action == AUTHORIZE else 0)


def amount_in_range(amount: int) -> bool:
    return 1 <= amount <= AMOUNT_MAX


def response_fields(request_doc: dict, echo: list) -> dict:
    """The request fields a response repeats (STAN and terminal: what the
    acquirer matches replies on), as received."""
    return {n: request_doc[n] for n in echo if request_doc.get(n)}


def decode(message: bytes, spec: dict) -> dict:
    """pyiso8583's decode; raises iso8583.DecodeError."""
    doc, _ = iso8583.decode(message, spec)
    return doc


def encode(doc: dict, spec: dict) -> bytes:
    message, _ = iso8583.encode(doc, spec)
    return bytes(message)
