"""``usfmae <command>``: thin argument parsing over the workflows.

Each command lives in its own light module under :mod:`usfmae_core.commands`, which provides
``add_parser(subparsers)`` (registering a sub-parser whose default ``func`` takes the parsed ``argparse.Namespace``).
Parsing imports neither torch nor MONAI (``usfmae --help`` stays fast); each ``func`` imports its workflow.

Errors caused by the user's input or the machine print as one line, ``usfmae: error: <cause>; <fix>``, exit code 2:
:class:`~usfmae_core.errors.UsfmaeError` from the engine, argument errors from the parser, and operating-system errors
(unwritable or full output folder, a file where a folder is expected, ...) from :func:`os_error_message`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from usfmae_core.commands._args import OneLineParser
from usfmae_core.errors import find_user_error, os_error_message, user_error_message

__all__ = ["build_parser", "main", "os_error_message"]

# One module per command, in the order they appear in ``usfmae --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "usfmae_core.commands.info",
    "usfmae_core.commands.prepare",
    "usfmae_core.commands.weights",  # import-weights, export-weights
    "usfmae_core.commands.pull",
    "usfmae_core.commands.pretrain",
    "usfmae_core.commands.finetune",
    "usfmae_core.commands.evaluate",
    "usfmae_core.commands.predict",
    "usfmae_core.commands.reconstruct",
    "usfmae_core.commands.embed",
    "usfmae_core.commands.export_bundle",
    "usfmae_core.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    from usfmae_core import __version__

    parser = OneLineParser(
        prog="usfmae",
        description="USF-MAE ultrasound foundation model: prepare data, pretrain, fine-tune, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"usfmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=OneLineParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # file names that are not UTF-8 (surrogate-escaped by Python) must not crash a print after the work is done
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("usfmae: interrupted; finished checkpoints and outputs were kept", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(f"usfmae: error: {message}", file=sys.stderr)
        user = find_user_error(err)
        return user.exit_code if user is not None else 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
