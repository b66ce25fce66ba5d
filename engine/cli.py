"""`scanpay`: the command-line entry point. Each subcommand is a thin shell
over the same engine calls the library and the server use."""
import argparse
import sys


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
    p.add_argument("--capacity", action="append", metavar="TABLE=ROWS", type=capacity_item,
                   help="allocate TABLE for ROWS rows at start (repeatable), e.g. "
                        "payments=20000000; see docs/operations.md")


def capacity_item(text: str) -> tuple[str, int]:
    table, sep, rows = text.partition("=")
    if not sep or not rows.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected TABLE=ROWS, got {text!r}")
    return table.strip(), int(rows)


def run_serve(args) -> int:
    from . import config as config_module
    from .server import serve
    overrides = {k: getattr(args, k) for k in ("data", "listen", "unix", "tls_cert", "tls_key",
                                               "metrics", "test_clock", "log_format")}
    overrides["capacity"] = dict(args.capacity) if args.capacity else None
    try:
        config = config_module.load(args.config, overrides)
    except config_module.ConfigError as e:
        print(f"scanpay serve: {e}", file=sys.stderr)
        return 2
    from .journal import JournalError
    try:
        return serve(config)
    except JournalError as e:       # a damaged data directory: one line says what to do
        print(f"scanpay serve: {e}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="scanpay", description="Scanpay payment and coupon settlement engine")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run scan-to-pay traffic through an O2O world and audit it")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="options of the demo (scanpay demo --help)")
    add_serve(sub)
    from . import admin, journal_cli, report, statements
    admin.add_parsers(sub)
    statements.add_parsers(sub)
    journal_cli.add_parsers(sub)
    report.add_parsers(sub)
    from . import iso8583
    iso8583.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "report":
        return report.run(args)
    if args.command == "journal":
        return journal_cli.run(args)
    if admin.handles(args):
        return admin.run(args)
    if args.command == "demo":
        from . import demo as demo_module
        return demo_module.main([a for a in args.args if a != "--"])
    if args.command == "serve":
        return run_serve(args)
    if args.command == "iso8583":
        return iso8583.run_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
