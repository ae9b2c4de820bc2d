"""``usfmae <command>``: thin argument parsing over the workflows.

Each command lives in its own module, which provides ``add_parser(subparsers)`` (registering a sub-parser
whose default ``func`` takes the parsed ``argparse.Namespace``). Errors caused by the user's input are
:class:`~usfmae_core.errors.UsfmaeError` and print as one line, ``usfmae: error: <cause>; <fix>``, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from usfmae_core.errors import UsfmaeError

# One module per command, in the order they appear in ``usfmae --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "usfmae_core.commands.info",
    "usfmae_core.data.corpus",  # prepare
    "usfmae_core.checkpoints",  # import-weights, export-weights
    "usfmae_core.workflows.pretrain",
    "usfmae_core.workflows.finetune",
    "usfmae_core.workflows.evaluate",
    "usfmae_core.workflows.predict",
    "usfmae_core.workflows.reconstruct",
    "usfmae_core.workflows.embed",
    "usfmae_core.workflows.demo",
)


def build_parser() -> argparse.ArgumentParser:
    from usfmae_core import __version__

    parser = argparse.ArgumentParser(
        prog="usfmae",
        description="USF-MAE ultrasound foundation model: prepare data, pretrain, fine-tune, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"usfmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UsfmaeError as err:
        print(f"usfmae: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("usfmae: interrupted; finished checkpoints and outputs were kept", file=sys.stderr)
        return 130
    except MemoryError:
        print("usfmae: error: out of memory; use a smaller --batch-size or a smaller model preset", file=sys.stderr)
        return 2
    except RuntimeError as err:  # CUDA OOM surfaces as a RuntimeError subclass
        if "out of memory" in str(err).lower():
            print("usfmae: error: the GPU ran out of memory; use a smaller --batch-size, --precision bf16 "
                  "or gradient accumulation (--accum-steps)", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
