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
import errno
import importlib
import sys
from collections.abc import Sequence

from usfmae_core.commands._args import OneLineParser
from usfmae_core.errors import UsfmaeError

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


# What the user can do about an operating-system error, by errno.
_OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "free disk space or choose an output folder on another disk",
    errno.EDQUOT: "free disk space (quota exceeded) or choose an output folder on another disk",
    errno.EACCES: "check the permissions, or choose a folder you can write to",
    errno.EPERM: "check the permissions, or choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose an output folder on a writable disk",
    errno.EEXIST: "a file of that name is in the way: remove or rename it, or choose another path",
    errno.ENOTDIR: "a file stands where a folder is expected: remove or rename it, or choose another path",
    errno.EISDIR: "a folder stands where a file is expected: choose a file path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop: fix or remove the link",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --workers",
}


def os_error_message(err: OSError) -> str:
    """``<cause>; <fix>`` for an operating-system error, naming the file involved."""
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    reason = err.strerror or str(err)
    fix = _OS_FIXES.get(err.errno or -1, "check the path, the permissions and the free disk space")
    return f"cannot access {where} ({reason}); {fix}" if where else f"{reason}; {fix}"


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
    except OSError as err:
        print(f"usfmae: error: {os_error_message(err)}", file=sys.stderr)
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
