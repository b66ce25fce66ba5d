"""Server settings: defaults, then a TOML file, then command-line flags."""
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from typing import Annotated, Literal, get_args, get_origin

import msgspec

from engine.protocol.auth import ROLE_ADMIN, ROLE_GATEWAY, Key
from engine.protocol.limits import BATCH_RECORDS_MAX, FRAME_BYTES_MAX_DEFAULT
from engine.core.group_commit import COMMIT_SIBLINGS_DEFAULT

PORT_DEFAULT = 7411


class ConfigError(ValueError):
    pass


# Types with the range each setting accepts: load() checks every [server]
# setting (and flag) against the field's annotation with msgspec.convert, so
# a setting added below is checked by type at least, and by range when its
# annotation says one.
def Range(low: int, high: int | None = None):    # noqa: N802 - used as a type
    """A whole number in low..high (no upper bound when high is None)."""
    return Annotated[int, msgspec.Meta(ge=low, le=high)]


Count = Range(1)                         # a whole number, at least 1
LogFormat = Literal["text", "json"]


@dataclass
class Config:
    data: str = "./data"
    listen: str = f"127.0.0.1:{PORT_DEFAULT}"   # "" = no TCP listener
    unix: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    metrics: str = ""                    # "host:port" of the Prometheus endpoint
    test_clock: bool = False
    log_format: LogFormat = "text"
    frame_bytes_max: Range(1024, 2**32 - 1) = FRAME_BYTES_MAX_DEFAULT
    batch_records_max: Range(1, BATCH_RECORDS_MAX) = BATCH_RECORDS_MAX
    connections_max: Range(1, 1_000_000) = 1024
    inflight_frames_max: Count = 256     # per connection, then pause_reading
    inflight_bytes_max: Count = 8 << 20  # per connection, then pause_reading
    queue_records_max: Count = 262_144   # all connections; beyond: busy
    idle_timeout_ms: Count = 300_000
    snapshot_every_entries: Count = 1_000_000
    snapshot_every_mb: Count = 1024      # or after this much journal, whichever first
    snapshot_mb_per_s: Range(0) = 64     # pacing of snapshot writes; 0 = full speed
    commit_interval_us: Range(0, 100_000) = 1500   # group commit: the longest wait before an fsync
    # The window is taken only when the fsync covers at least this many
    # requesters (engine/core/group_commit.py); 0 = always (the fixed window).
    commit_siblings: Range(0, 1_000_000) = COMMIT_SIBLINGS_DEFAULT
    direct_replies: bool = True          # PAY replies sent by the sender thread after the fsync
    lone_sync: bool = True               # a lone request's fsync and reply with no GIL (lone_sync.py)
    journal_prealloc: bool = True        # journal segments zero-filled ahead (cheaper fsyncs)
    io_threads_nice: Range(-20, 0) = -10  # sync and sender threads ahead of the rest (threads.py)
    # Replication (docs/replication.md): the NATS servers whose JetStream
    # stream is the journal ("" = the local journal, as without it), the
    # replicas the stream must have (fewer: refused at start unless
    # allow_unreplicated), and the leader's lease.
    replicate: str = ""
    replicas: Range(1, 5) = 3
    allow_unreplicated: bool = False
    lease_ms: Range(500, 600_000) = 3000
    # Every this many commands, the leader appends its state digest and
    # each follower compares its own (engine/replication/checkpoint.py); 0: never.
    checkpoint_every_entries: Range(0) = 100_000
    # The leader's snapshots kept in the object store (new nodes start from
    # them); the stream is trimmed below the oldest of them, never further.
    store_snapshots: Range(1, 100) = 2
    # The format of the command messages the leader appends
    # (engine/replication/packing.py): 2 packs record batches (2.6x fewer
    # bytes for NATS); 1 is what nodes before format 2 read: keep 1 until
    # every node reads 2.
    stream_format: Range(1, 2) = 2
    keys: list = field(default_factory=list)
    # Table sizes to allocate up front (Engine capacity hints: rows per
    # table, e.g. payments, visits, users, coupons): growing a big table
    # mid-traffic copies it and stalls every reply meanwhile.
    capacity: dict = field(default_factory=dict)
    # The [iso8583] section: an ISO 8583 adapter started beside the server,
    # connected to it over loopback (engine/iso8583/__init__.py, docs/iso8583.md).
    iso8583: dict = field(default_factory=dict)
    # Hostile clients (docs/operations.md "Limits"): with keys configured, a
    # connection must authenticate within hello_timeout_ms; at most
    # unauthenticated_max connections wait for their HELLO at once; and
    # admin_reserve slots beyond connections_max are kept for admins.
    hello_timeout_ms: Count = 5000
    unauthenticated_max: Count = 64
    admin_reserve: Range(0) = 4
    # Reply bytes a connection's transport may hold unread before the server
    # stops reading that connection (asyncio's write high-water mark).
    reply_buffer_bytes_max: Count = 1 << 20

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def load(path: str | None, overrides: dict) -> Config:
    """Config from an optional TOML file, then non-None `overrides`."""
    raw = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    tables = set(raw) - {"server", "keys", "capacity", "iso8583"}
    if tables:
        raise ConfigError(f"config {path}: unknown table(s) {sorted(tables)}; "
                          f"expected [server], [[keys]], [capacity] and [iso8583]")
    known = {f.name for f in fields(Config)} - {"keys", "capacity"}
    server = dict(raw.get("server", {}))
    unknown = set(server) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown [server] setting(s) {sorted(unknown)}: "
                          f"expected one of {', '.join(sorted(known))} (docs/operations.md)")
    server.update({k: v for k, v in overrides.items() if v is not None and k in known})
    server.pop("keys", None)
    server.pop("capacity", None)
    config = Config(**server)
    config.keys = [parse_key(k) for k in raw.get("keys", [])]
    config.capacity = {**raw.get("capacity", {}), **(overrides.get("capacity") or {})}
    config.iso8583 = dict(raw.get("iso8583", {}))
    check(config, path)
    return config


def check_fields(config: Config, path: str | None = None) -> None:
    """Every setting checked against its field's type and range; the error
    names the key, the value and what it must be, in one line."""
    server = {f.name: getattr(config, f.name) for f in fields(Config)
              if f.name not in ("keys", "capacity")}
    try:
        msgspec.convert(server, Config)
    except msgspec.ValidationError as e:
        text = str(e)
        expected, _, where = text.partition(" - at `$.")
        key = where.rstrip("`").split(".")[0].split("[")[0]
        if key in server:
            choices = get_args(Config.__annotations__[key])
            if get_origin(Config.__annotations__[key]) is Literal:
                expected = "expected one of " + ", ".join(map(repr, choices))
            origin = f"config {path}: [server] " if path else ""
            raise ConfigError(f"{origin}{key} = {server[key]!r}: {expected[0].lower()}"
                              f"{expected[1:]}") from None
        raise ConfigError(f"config {path}: {text}") from None


def parse_key(item: dict) -> Key:
    try:
        key = Key(str(item["id"]), str(item["secret"]), str(item["role"]),
                  frozenset(int(m) for m in item.get("merchants", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"a [[keys]] entry needs id, secret, role (and merchants for "
                          f"gateways): {e}") from None
    if key.role not in (ROLE_GATEWAY, ROLE_ADMIN):
        raise ConfigError(f"key {key.key_id}: role must be gateway or admin")
    if len(key.secret) < 16:
        raise ConfigError(f"key {key.key_id}: the secret must be at least 16 characters")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(name: str, address: str) -> None:
    """HOST:PORT (or [IPv6]:PORT) with a port in 0..65535 (0: any free port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} = {address!r}: expected HOST:PORT with a port in 0..65535")
    if not host.strip("[]"):
        raise ConfigError(f"{name} = {address!r}: expected HOST:PORT (e.g. 127.0.0.1:{port})")


def check(config: Config, path: str | None = None) -> None:
    check_fields(config, path)
    for name in ("listen", "metrics"):
        address = getattr(config, name)
        if address:
            check_address(name, address)
    if config.listen:
        host, _port = config.host_port
        if not is_loopback(host) and not config.keys:
            raise ConfigError(
                f"refusing to listen on {config.listen} without authentication: "
                f"configure [[keys]] in the config file, or listen on 127.0.0.1")
    if config.iso8583:
        check_iso8583(config)
    if config.replicate:
        check_replicate(config)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key")
    from engine.core.engine import CAPACITY_TABLES
    for table, rows in config.capacity.items():
        if table not in CAPACITY_TABLES:
            raise ConfigError(f"capacity: unknown table {table!r} (known: {', '.join(CAPACITY_TABLES)})")
        if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= 2**31 - 1:
            raise ConfigError(f"capacity: {table} must be a row count in 0..2147483647")


def check_iso8583(config: Config) -> None:
    from engine.iso8583.mapping import IsoConfigError, config_from
    if not config.listen:
        raise ConfigError("[iso8583] needs the TCP listener (listen): the adapter connects to it")
    if "engine" in config.iso8583:
        raise ConfigError("[iso8583] engine: inside scanpay serve the adapter uses this server")
    try:
        config_from(dict(config.iso8583), {"engine": "127.0.0.1:0"})
    except IsoConfigError as e:
        raise ConfigError(f"[iso8583] {e}") from None


def check_replicate(config: Config) -> None:
    """The NATS servers as URLs, and the client library installed."""
    try:
        from engine.replication.stream import parse_servers
    except ImportError:
        raise ConfigError("replicate needs the NATS client: pip install 'scanpay[replicate]'"
                          ) from None
    try:
        parse_servers(config.replicate)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not config.data:
        raise ConfigError("replicate needs a data directory (data) for its snapshots")
