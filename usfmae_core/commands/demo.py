"""``usfmae demo``: the whole toolkit on built-in data (prepare -> pretrain -> fine-tune -> evaluate -> predict)."""

from __future__ import annotations

import argparse
from pathlib import Path

from usfmae_core.commands._args import add_device, positive_float


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run prepare -> pretrain -> fine-tune -> evaluate -> predict on built-in data",
                       description="Run every step of the toolkit on built-in synthetic ultrasound (no downloads): "
                       "prepare a corpus, pretrain a small MAE, fine-tune classifiers from it, from scratch and a "
                       "CNN reference, evaluate them, classify a 3D volume and reconstruct masked images. Writes "
                       "OUT/report.md; every step's own output folder sits beside it.")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    add_device(p)
    p.add_argument("--scale", type=positive_float, default=1.0,
                   help="multiply data and budgets (e.g. 0.2 for a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.demo import run_demo

    run_demo(Path(args.out), args.device, args.scale, args.seed)
    return 0
