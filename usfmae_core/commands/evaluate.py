"""``usfmae evaluate``: metrics of a trained classifier on labelled data, with bootstrap intervals."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from usfmae_core.commands._args import (
    add_device,
    add_mask_arguments,
    add_overwrite,
    add_precision,
    nonneg_int,
    positive_int,
    unit_fraction,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained classifier on labelled data (with 95%% intervals)",
                       description="Evaluate a classifier from usfmae finetune: accuracy, balanced accuracy, "
                       "precision/recall/F1, one-vs-rest AUC, confusion matrix, bootstrap 95%% intervals; writes "
                       "metrics.json, metrics.csv, predictions.csv, confusion_matrix.png and roc.png.")
    p.add_argument("--model", required=True, help="classifier checkpoint (RUN/model.pt)")
    p.add_argument("--data", required=True, help="labelled data: class folders, CSV manifest or datalist JSON "
                   "(RUN/datalist.json for the run's own test split)")
    p.add_argument("--out", required=True, help="folder to write (locked while evaluate writes it)")
    add_overwrite(p, "evaluation")
    p.add_argument("--split", default="test", choices=("test", "validation", "training", "all"),
                   help="which split of --data (default test; 'all' for an external test set)")
    p.add_argument("--bootstrap", type=nonneg_int, default=1000,
                   help="bootstrap resamples for 95%% intervals (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of splitting --data (default 0)")
    p.add_argument("--val-fraction", type=unit_fraction, default=0.15, help="as given to finetune (folders / CSV)")
    p.add_argument("--test-fraction", type=unit_fraction, default=0.15, help="as given to finetune (folders / CSV)")
    add_mask_arguments(p)
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default 64), or volumes for a volume "
                   "model (default 2)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader processes (default 0)")
    add_precision(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.evaluate import evaluate

    r = evaluate(args.model, args.data, args.out, args.split, args.bootstrap, args.seed, args.device,
                 args.batch_size, args.workers, args.precision, args.val_fraction, args.test_fraction,
                 run_config=vars(args), include_masks=args.include_masks, mask_patterns=args.mask_patterns,
                 overwrite=args.overwrite)
    ci = r["intervals"].get("f1_macro")
    finite = ci and all(isinstance(c, float) and math.isfinite(c) for c in ci)
    tail = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if finite else ""
    what = "volumes / clips" if r.get("volume_model") else "images"
    print(f"{r['n']} {what}: accuracy {r['accuracy']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}, "
          f"macro-F1 {r['f1_macro']:.3f}{tail}, macro AUC {r['auc_macro']:.3f} -> {Path(args.out) / 'metrics.json'}")
    return 0
