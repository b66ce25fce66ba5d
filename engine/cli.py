"""`scanpay`: the command-line entry point. Each subcommand is a thin shell
over the same engine calls the library and the server use."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="scanpay", description="Scanpay payment and coupon settlement engine")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run scan-to-pay traffic through an O2O world and audit it")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="options of the demo (see scanpay demo -- --help)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as demo_module
        return demo_module.main([a for a in args.args if a != "--"])
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
