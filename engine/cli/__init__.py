"""`scanpay`: the command-line entry point. Each subcommand is a thin shell
over the same engine calls the library and the server use."""
import argparse
import errno
import os
import sys

from engine._version import __version__


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the socket server")
    p.add_argument("--config", help="TOML config file ([server] settings, [[keys]])")
    p.add_argument("--data", help="data directory (journal and snapshots); default ./data")
    p.add_argument("--listen", help="TCP host:port; default 127.0.0.1:7411; '' for none")
    p.add_argument("--unix", help="also listen on this Unix socket path")
    p.add_argument("--tls-cert", dest="tls_cert", help="TLS certificate (PEM)")
    p.add_argument("--tls-key", dest="tls_key", help="TLS private key (PEM)")
    p.add_argument("--metrics", help="host:port for the Prometheus endpoint")
    p.add_argument("--test-clock", dest="test_clock", action="store_const", const=True,
                   help="enable the CLOCK op (tests only: lets clients set the engine time)")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    p.add_argument("--replicate", metavar="NATS_URLS",
                   help="replicate the journal to this NATS JetStream cluster, e.g. "
                        "nats://h1:4222,nats://h2:4222,nats://h3:4222 (docs/replication.md)")
    p.add_argument("--allow-unreplicated", dest="allow_unreplicated", action="store_const",
                   const=True, help="with --replicate: accept a stream with fewer replicas "
                                    "than configured (3)")
    p.add_argument("--capacity", action="append", metavar="TABLE=ROWS", type=capacity_item,
                   help="allocate TABLE for ROWS rows at start (repeatable), e.g. "
                        "payments=20000000; see docs/operations.md")


def capacity_item(text: str) -> tuple[str, int]:
    table, sep, rows = text.partition("=")
    if not sep or not rows.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected TABLE=ROWS, got {text!r}")
    return table.strip(), int(rows)


def run_serve(args) -> int:
    from engine.server import config as config_module
    from engine.server.server import serve
    overrides = {k: getattr(args, k) for k in ("data", "listen", "unix", "tls_cert", "tls_key",
                                               "metrics", "test_clock", "log_format",
                                               "replicate", "allow_unreplicated")}
    overrides["capacity"] = dict(args.capacity) if args.capacity else None
    try:
        config = config_module.load(args.config, overrides)
    except config_module.ConfigError as e:
        print(f"scanpay serve: {e}", file=sys.stderr)
        return 2
    if config.data and os.path.exists(config.data) and not os.path.isdir(config.data):
        print(f"scanpay serve: the data path is a file, not a directory ({config.data}): "
              f"pass --data with a directory (it is created if missing)", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except Exception as e:          # noqa: BLE001 - known start-up failures get one line
        line = startup_failure(e, config)
        if line is None:
            raise
        print(f"scanpay serve: {line}", file=sys.stderr, flush=True)
        return 2


def startup_failure(error: BaseException, config) -> str | None:
    """One line `<what> (<where>): <what to do>` for a start-up failure the
    operator can fix, or None for anything else (which keeps its traceback)."""
    from engine.storage.journal import JournalCorrupt, JournalError
    replicated = replication_failure(error, config)
    if replicated is not None:
        return replicated
    if isinstance(error, JournalCorrupt):
        return f"the journal is damaged ({config.data}): {error}"
    if isinstance(error, JournalError):
        if "another process" in str(error):
            return (f"the data directory is locked by another process ({config.data}): "
                    f"stop the other `scanpay serve` (or journal tool) using it, or pass "
                    f"another --data")
        return f"the journal cannot be opened ({config.data}): {error}"
    import ssl
    if isinstance(error, ssl.SSLError):     # an OSError too: before the errno cases
        return (f"the TLS certificate or key cannot be used ({config.tls_cert}, "
                f"{config.tls_key}): {error.reason or error}; give a PEM certificate and "
                f"its private key")
    if not isinstance(error, OSError):
        return None
    where = error.filename or _listeners(config)
    if error.errno == errno.ENOENT:
        if not error.filename and config.tls_cert:     # ssl gives no file name
            where = f"{config.tls_cert}, {config.tls_key}"
        return (f"no such file or directory ({where}): check the paths given "
                f"(--tls-cert, --tls-key, --unix, --data)")
    if error.errno == errno.EADDRINUSE:
        return (f"the address is already in use ({_listeners(config)}): another process "
                f"listens there; stop it, or pick another --listen / --metrics port")
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied ({where}): run as a user allowed to use it, or pick "
                f"another --data / a port above 1023")
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{error.strerror} ({where}): --data must name a directory"
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"no such local address ({_listeners(config)}): listen on an address of "
                f"this machine, e.g. 127.0.0.1 or 0.0.0.0")
    return None


def replication_failure(error: BaseException, config) -> str | None:
    """One line for a replicated start that cannot go on, or None."""
    if not config.replicate:
        return None
    from engine.replication.log import StreamCorrupt
    from engine.replication.stream import StreamSettingsError
    if isinstance(error, StreamSettingsError):
        return f"the replicated stream cannot be used ({config.replicate}): {error}"
    if isinstance(error, StreamCorrupt):
        return f"the replicated stream is damaged ({config.replicate}): {error}"
    if isinstance(error, (TimeoutError, ConnectionRefusedError)) or type(
            error).__module__.startswith("nats"):
        why = str(error) or "no connection within the time allowed"
        return (f"the NATS servers do not answer ({config.replicate}): {why}; start them "
                f"(scanpay cluster up, or your NATS deployment) or fix --replicate")
    return None


def _listeners(config) -> str:
    return ", ".join(x for x in (config.listen, config.unix and f"unix {config.unix}",
                                 config.metrics and f"metrics {config.metrics}") if x)


def package_version() -> str:
    """The package's version: engine/_version.py, the one source (pyproject
    reads it too, so an installed copy and the source tree agree)."""
    return __version__


def describe_subcommands(sub) -> None:
    """`scanpay X --help` opens with what X does: the one-line help given to
    add_parser, unless X has a longer description of its own."""
    for action in sub._choices_actions:
        parser = sub.choices[action.dest]
        if not parser.description:
            parser.description = action.help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanpay", description="Scanpay payment and coupon settlement engine")
    parser.add_argument("--version", action="version", version=f"scanpay {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from engine.cli import admin, journal as journal_cli, report, statements
    from engine import demo
    p = sub.add_parser("demo", help="run scan-to-pay traffic through an O2O world and audit it",
                       description=demo.DESCRIPTION)
    demo.add_options(p)
    add_serve(sub)
    admin.add_parsers(sub)
    statements.add_parsers(sub)
    journal_cli.add_parsers(sub)
    report.add_parsers(sub)
    from engine.cli import cluster
    cluster.add_parsers(sub)
    from engine import iso8583
    iso8583.add_parser(sub)
    describe_subcommands(sub)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:           # Ctrl-C while the commands load (seconds on a busy box)
        import signal

        from engine.demo.stop import EXIT_CODES
        print("scanpay: interrupted", file=sys.stderr, flush=True)
        return EXIT_CODES[signal.SIGINT]
    from engine.cli import admin, journal as journal_cli, report
    from engine import iso8583
    if args.command == "report":
        return report.run(args)
    if args.command == "journal":
        return journal_cli.run(args)
    if admin.handles(args):
        return admin.run(args)
    if args.command == "demo":
        from engine import demo as demo_module
        demo_module.check_options(parser, args)
        return demo_module.run(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "cluster":
        from engine.cli import cluster
        return cluster.run(args)
    if args.command == "iso8583":
        return iso8583.run_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
