"""``usfmae pretrain``: masked-autoencoder pretraining on a prepared corpus (2D frames or 3D volumes)."""

from __future__ import annotations

import argparse
import os

from usfmae_core.commands._args import (
    add_device,
    add_overwrite,
    add_precision,
    corpus_spec,
    finite_float,
    nonneg_float,
    nonneg_int,
    open_fraction,
    positive_float,
    positive_int,
    remember_defaults,
    unit_fraction,
)


class _EpochsAction(argparse.Action):
    """Remembers that --epochs was given explicitly (then it caps --max-steps too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.epochs_given = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    from usfmae_core.networks.presets import PRESETS

    p = sub.add_parser(
        "pretrain", help="masked-autoencoder pretraining on a prepared corpus (2D frames or 3D volumes)",
        description="MAE pretraining (facebook MAE / USF-MAE recipe) on a corpus from `usfmae prepare`, or on "
                    "several mixed by weight. Continued pretraining (e.g. on your own unlabelled scans): --init "
                    "MAE.pt --corpus NEW (or a mix such as --corpus general:0.5 mine:0.5); the optimiser and lr "
                    "schedule start afresh. Multi-GPU / multi-node: launch with torchrun (e.g. torchrun "
                    "--nproc_per_node=4 -m usfmae_core.cli pretrain ...). A killed run continues with --resume.")
    p.add_argument("--corpus", required=True, nargs="+", action="extend", type=corpus_spec, metavar="PATH[:WEIGHT]",
                   help="corpus folder(s) written by usfmae prepare; several are mixed: with a weight each "
                        "(e.g. general:0.7 target:0.3) that share of every epoch's samples comes from each (a small "
                        "corpus is cycled), without weights they are concatenated; may be repeated")
    p.add_argument("--out", required=True, help="run folder (checkpoints, model.pt, logs, pictures)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="vit_base", choices=sorted(PRESETS), help="model size (default vit_base)")
    g.add_argument("--init", help="continue from this MAE checkpoint (ours, e.g. model.pt of an earlier pretrain or "
                                  "from usfmae import-weights): its weights and normalisation, fresh optimiser and "
                                  "schedule")
    g.add_argument("--image-size", "--img-size", dest="img_size", type=positive_int,
                   help="input size (default: the corpus's frame / volume size, or --init's)")
    g.add_argument("--patch-size", type=positive_int, help="patch size (default 16)")
    g.add_argument("--in-channels", type=int, choices=(1, 3), help="1 (grey) or 3 (default, ImageNet/USF-MAE)")
    g.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                   help="3: pretrain natively on volumes (corpus prepared with --native-3d)")
    g.add_argument("--mask-ratio", type=open_fraction, help="fraction of patches masked (default 0.75)")
    g.add_argument("--norm-pix-loss", action="store_true", help="regress per-patch normalised pixels")
    g.add_argument("--drop-path", type=unit_fraction, help="stochastic depth rate of the encoder (default 0)")
    g.add_argument("--mean", type=finite_float, nargs="+",
                   help="normalisation mean, 1 or 3 values (default: --init's, else ImageNet)")
    g.add_argument("--std", type=positive_float, nargs="+",
                   help="normalisation std, 1 or 3 values (default: --init's, else ImageNet)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=positive_int, default=100, action=_EpochsAction,
                   help="epochs over the corpus (default 100; --max-steps takes precedence)")
    t.add_argument("--max-steps", type=positive_int,
                   help="optimiser steps (overrides --epochs unless both are given: min)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="images per process per micro-step (default 64)")
    t.add_argument("--accum-steps", type=positive_int, default=1, help="gradient accumulation micro-steps (default 1)")
    t.add_argument("--blr", type=positive_float, default=1.5e-4, help="base lr; lr = blr * effective batch / 256")
    t.add_argument("--lr", type=positive_float, help="absolute lr (overrides --blr)")
    t.add_argument("--min-lr", type=nonneg_float, default=0.0, help="lr at the end of the cosine schedule")
    t.add_argument("--weight-decay", type=nonneg_float, default=0.05, help="AdamW weight decay (default 0.05)")
    t.add_argument("--warmup-steps", type=nonneg_int, help="linear warm-up steps (default 5%% of all steps)")
    t.add_argument("--warmup-epochs", type=nonneg_float, help="warm-up in epochs (alternative to --warmup-steps)")
    t.add_argument("--clip-grad", type=positive_float, help="max gradient norm (default: no clipping)")
    add_precision(t)
    t.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs, slow start)")
    t.add_argument("--seed", type=int, default=0, help="default 0")
    r = p.add_argument_group("run")
    add_device(r)
    r.add_argument("--threads", type=positive_int,
                   help="CPU threads for torch (default: torch's choice; 1 helps on a busy, shared CPU)")
    r.add_argument("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoint_last.pt (starts fresh when there is none); "
                   "options that change the model are refused, changed optimisation options are warned about")
    add_overwrite(r, "pretraining run")
    r.add_argument("--ckpt-every", type=positive_int, default=500, help="write checkpoint_last.pt every N steps")
    r.add_argument("--picture-every", type=nonneg_int, default=1000,
                   help="reconstruction picture every N steps (0: at the end only)")
    r.add_argument("--log-every", type=positive_int, default=20, help="log loss / lr / img/s every N steps")
    p.set_defaults(func=run, epochs_given=False)
    remember_defaults(p)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.pretrain import pretrain

    pretrain(args)
    return 0
