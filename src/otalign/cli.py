"""Command-line entry point: ``otalign <command> [options]``.

Each command is a thin wrapper: parse arguments, build the objects, call the library.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from otalign.demos import token_geometry

    token_geometry.run(eps=args.eps, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from otalign import __version__

    parser = argparse.ArgumentParser(prog="otalign", description="Align language models with optimal transport.")
    parser.add_argument("--version", action="version", version=f"otalign {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the main demonstration")
    demo.add_argument("--eps", type=float, default=0.01, help="entropic regularization (cost units)")
    demo.add_argument("--out", default="reports/demo", help="output directory")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
