"""Argument types and shared options of every ``usfmae`` command, in one place.

Light by design (argparse only): ``usfmae --help`` must not import torch or MONAI. A value that does not parse or is
out of range is refused by argparse itself, and :class:`OneLineParser` prints it as the usual one-line error::

    usfmae: error: argument --lr: must be a finite number > 0, got 'nan'; see 'usfmae finetune --help'
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from usfmae_core.constants import DEVICE_CHOICES, PRECISION_CHOICES

__all__ = [
    "OneLineParser",
    "add_device",
    "add_geometry_arguments",
    "add_inference_arguments",
    "add_mask_arguments",
    "add_overwrite",
    "add_precision",
    "corpus_spec",
    "finite_float",
    "fraction",
    "nonneg_float",
    "nonneg_int",
    "open_fraction",
    "positive_float",
    "positive_int",
    "remember_defaults",
    "unit_fraction",
]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``usfmae: error: <cause>; <fix>``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"usfmae: error: {message}; see '{self.prog} --help'\n")
        sys.exit(2)


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type`` parsing ``kind`` (int / float) within ``low .. high`` (open or closed ends), refusing
    NaN and infinity."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = f"{'an integer' if kind is int else 'a finite number'}{' ' + lo if lo else ''}" \
           f"{' and ' + hi if lo and hi else (' ' + hi if hi else '')}"

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {want}, got '{text}'")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


finite_float = _number(float)
positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
positive_float = _number(float, 0, low_open=True)
nonneg_float = _number(float, 0)
fraction = _number(float, 0, 1, low_open=True)  # (0, 1]: label fractions
open_fraction = _number(float, 0, 1, low_open=True, high_open=True)  # (0, 1): mask ratio
unit_fraction = _number(float, 0, 1, high_open=True)  # [0, 1): dropout, drop-path, validation / test fractions


def remember_defaults(p: argparse.ArgumentParser) -> None:
    """Store the parser's defaults in the parsed arguments (``args._defaults``), so a ``--resume`` can tell the
    options the user gave from those left at their defaults (:func:`usfmae_core.runs.check_resume_arguments`)."""
    p.set_defaults(_defaults={a.dest: a.default for a in p._actions
                              if a.dest not in ("help", "func") and a.default is not argparse.SUPPRESS})


def corpus_spec(text: str) -> tuple[str, float | None]:
    """``PATH`` or ``PATH:WEIGHT`` (a mixing weight > 0) -> ``(path, weight or None)``.

    The weight is what follows the last ``:`` when that parses as a number, so ``C:\\corpus`` stays a path; a folder
    whose name really ends in ``:<number>`` is taken whole when it exists.
    """
    head, sep, tail = text.rpartition(":")
    if not sep or not head or os.path.isdir(text):
        return text, None
    try:
        weight = float(tail)
    except ValueError:
        return text, None
    if not math.isfinite(weight) or weight <= 0:
        raise argparse.ArgumentTypeError(f"the mixing weight of '{text}' must be a finite number > 0, got '{tail}'")
    return head, weight


def add_device(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="auto",
                   help=f"compute device: {'|'.join(DEVICE_CHOICES)} or cuda:N (default auto)")


def add_precision(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help=help or "autocast precision (default auto: bf16 on GPUs; on CPUs bf16 only where a short "
                   "timing of this model on this machine found it faster, cached in ~/.usfmae/cache; fp32 on "
                   "CPUs without native bf16; the choice is printed)")



def add_overwrite(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "results") -> None:
    """``--overwrite``: replace what the output folder holds (see :mod:`usfmae_core.runs`)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} already in --out (their files are deleted first; other files in the "
                   "folder are kept). Without it, a folder holding a finished or another command's run is refused")


def add_inference_arguments(p: argparse.ArgumentParser, batch_size: int = 32) -> None:
    """``--out``, ``--overwrite``, ``--axis``, ``--device``, ``--batch-size`` (shared by predict / embed /
    reconstruct)."""
    p.add_argument("--out", required=True, help="output folder (locked while the command writes it)")
    add_overwrite(p)
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2),
                   help="slicing axis of volumes for 2D models (array order D, H, W; default 0)")
    add_device(p)
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"frames per batch (default {batch_size})")


def add_mask_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "images") -> None:
    """``--include-masks`` and ``--mask-pattern`` (segmentation masks / annotation files among the data)."""
    p.add_argument("--include-masks", action="store_true",
                   help=f"keep segmentation masks / annotation files as {what} (default: they are found by name - "
                   "_mask, _mask_1, _seg, _gt, masks/, labels/, gt/ ... - or by content - few grey levels beside a "
                   "scan - and left out, with a count on the console and the list in the run folder)")
    p.add_argument("--mask-pattern", dest="mask_patterns", action="append", default=[], metavar="GLOB",
                   help="also treat files matching this glob as masks (path below the data folder or file name, "
                   "case-insensitive, e.g. '*_roi.png'; repeatable)")


def add_geometry_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "model input",
                           crop: bool = True) -> None:
    """``--resize letterbox|squash`` (and ``--crop-sector``): how non-square frames become the square ``what``."""
    p.add_argument("--resize", default="letterbox", choices=("letterbox", "squash"),
                   help=f"how frames become the square {what}: letterbox keeps the aspect ratio (longer side to the "
                   "size, black padding; default), squash stretches them to a square (the USF-MAE paper's, and "
                   "older versions', behaviour)")
    if crop:
        p.add_argument("--crop-sector", action="store_true",
                       help="first crop each frame / clip to the detected imaged region (fan or linear field, without "
                       "black borders, side panels and text)")
