"""Server settings: defaults, then a TOML file, then command-line flags."""
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields

from .auth import ROLE_ADMIN, ROLE_GATEWAY, Key
from .frame import FRAME_BYTES_MAX_DEFAULT

PORT_DEFAULT = 7411


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    data: str = "./data"
    listen: str = f"127.0.0.1:{PORT_DEFAULT}"   # "" = no TCP listener
    unix: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    metrics: str = ""                    # "host:port" of the Prometheus endpoint
    test_clock: bool = False
    log_format: str = "text"             # text | json
    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT
    batch_records_max: int = 8190
    connections_max: int = 1024
    inflight_frames_max: int = 256       # per connection, then pause_reading
    inflight_bytes_max: int = 8 << 20    # per connection, then pause_reading
    queue_records_max: int = 262_144     # all connections; beyond: busy
    idle_timeout_ms: int = 300_000
    snapshot_every_entries: int = 1_000_000
    snapshot_every_mb: int = 1024        # or after this much journal, whichever first
    snapshot_mb_per_s: int = 64          # pacing of snapshot writes; 0 = full speed
    commit_interval_us: int = 1500       # group commit: fsyncs start at least this far apart
    direct_replies: bool = True          # PAY replies sent by the sender thread after the fsync
    journal_prealloc: bool = True        # journal segments zero-filled ahead (cheaper fsyncs)
    io_threads_nice: int = -10           # sync and sender threads ahead of the rest (threads.py)
    keys: list = field(default_factory=list)
    # Table sizes to allocate up front (Engine capacity hints: rows per
    # table, e.g. payments, visits, users, coupons): growing a big table
    # mid-traffic copies it and stalls every reply meanwhile.
    capacity: dict = field(default_factory=dict)
    # Hostile clients (docs/operations.md "Limits"): with keys configured, a
    # connection must authenticate within hello_timeout_ms; at most
    # unauthenticated_max connections wait for their HELLO at once; and
    # admin_reserve slots beyond connections_max are kept for admins.
    hello_timeout_ms: int = 5000
    unauthenticated_max: int = 64
    admin_reserve: int = 4
    # Reply bytes a connection's transport may hold unread before the server
    # stops reading that connection (asyncio's write high-water mark).
    reply_buffer_bytes_max: int = 1 << 20

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
    known = {f.name for f in fields(Config)}
    server = dict(raw.get("server", {}))
    unknown = set(server) - known
    if unknown:
        raise ConfigError(f"config {path}: unknown [server] setting(s) {sorted(unknown)}")
    server.update({k: v for k, v in overrides.items() if v is not None})
    config = Config(**server)
    config.keys = [parse_key(k) for k in raw.get("keys", [])]
    config.capacity = {**raw.get("capacity", {}), **(overrides.get("capacity") or {})}
    check(config)
    return config


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


def check(config: Config) -> None:
    if config.listen:
        host, _port = config.host_port
        if not is_loopback(host) and not config.keys:
            raise ConfigError(
                f"refusing to listen on {config.listen} without authentication: "
                f"configure [[keys]] in the config file, or listen on 127.0.0.1")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key")
    if not 1 <= config.batch_records_max <= 8190:
        raise ConfigError("batch_records_max must be in 1..8190")
    if (not isinstance(config.commit_interval_us, int) or isinstance(config.commit_interval_us, bool)
            or not 0 <= config.commit_interval_us <= 100_000):
        raise ConfigError("commit_interval_us must be 0..100000 microseconds")
    if (not isinstance(config.io_threads_nice, int) or isinstance(config.io_threads_nice, bool)
            or not -20 <= config.io_threads_nice <= 0):
        raise ConfigError("io_threads_nice must be -20..0 (0: the process's priority)")
    for name in ("snapshot_every_entries", "snapshot_every_mb"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number, at least 1")
    if not isinstance(config.snapshot_mb_per_s, int) or config.snapshot_mb_per_s < 0:
        raise ConfigError("snapshot_mb_per_s must be a whole number of MB/s (0: no pacing)")
    for name in ("direct_replies", "journal_prealloc"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false")
    for name in ("hello_timeout_ms", "unauthenticated_max", "reply_buffer_bytes_max"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number, at least 1")
    if not isinstance(config.admin_reserve, int) or config.admin_reserve < 0:
        raise ConfigError("admin_reserve must be a whole number of connections (0: none)")
    if config.log_format not in ("text", "json"):
        raise ConfigError("log_format must be text or json")
    from .engine import CAPACITY_TABLES
    for table, rows in config.capacity.items():
        if table not in CAPACITY_TABLES:
            raise ConfigError(f"capacity: unknown table {table!r} (known: {', '.join(CAPACITY_TABLES)})")
        if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= 2**31 - 1:
            raise ConfigError(f"capacity: {table} must be a row count in 0..2147483647")
