"""Entry point of the ``squall`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from squall_sd import __version__
from squall_sd._logging import logger


def _demo(args: argparse.Namespace) -> int:
    from squall_sd.cli._demo import run_demo

    run_demo(out=Path(args.out), png=Path(args.png), overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``squall`` command."""
    parser = argparse.ArgumentParser(prog="squall", description="squall-sd: H&E + spatial transcriptomics.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the bundled example")
    demo.add_argument("--out", default="squall_demo.zarr", help="zarr store to write (default: %(default)s)")
    demo.add_argument("--png", default="squall_demo.png", help="overview figure (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing store")
    demo.set_defaults(func=_demo)

    from squall_sd.cli._train import add_train_parsers

    add_train_parsers(sub)

    from squall_sd.cli._predict import add_predict_parser

    add_predict_parser(sub)

    from squall_sd.cli._niches import add_niches_parser

    add_niches_parser(sub)

    from squall_sd.cli._view import add_view_parser

    add_view_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``squall`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logger.setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, KeyError, ConnectionError) as e:
        # str(KeyError) quotes its message: print the message itself
        msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
        sys.stderr.write(f"squall {args.command}: error: {msg}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
