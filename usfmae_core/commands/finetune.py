"""``usfmae finetune``: train a classifier from a pretrained MAE, from scratch, or a CNN baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from usfmae_core.commands._args import (
    add_device,
    add_geometry_arguments,
    add_mask_arguments,
    add_overwrite,
    add_precision,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_fraction,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from usfmae_core.networks.presets import PRESETS

    p = sub.add_parser("finetune", help="train a classifier from a pretrained MAE, from scratch, or a CNN baseline",
                       description="Fine-tune a USF-MAE classifier on labelled ultrasound (class folders, CSV or "
                       "datalist JSON). Writes RUN/model.pt (best validation macro-F1), metrics.json, curves.png, "
                       "datalist.json and TensorBoard logs. A killed run continues with --resume.")
    p.add_argument("--data", required=True, help="labelled data: class-per-folder tree, CSV manifest or datalist JSON")
    p.add_argument("--out", required=True, help="run folder to write")
    m = p.add_argument_group("model")
    m.add_argument("--init", help="pretrained MAE checkpoint to start the ViT encoder from")
    m.add_argument("--arch", default="vit", choices=("vit", "resnet", "densenet"),
                   help="vit (default), or a MONAI CNN baseline trained from scratch")
    m.add_argument("--preset", default="vit_base", choices=sorted(PRESETS),
                   help="ViT size from scratch (default vit_base)")
    m.add_argument("--depth", type=int, choices=(10, 18, 34, 50, 121, 169),
                   help="resnet 10/18/34/50 (default 50), densenet 121/169 (default 121)")
    m.add_argument("--image-size", "--img-size", dest="image_size", type=positive_int,
                   help="input size, the cube side for --volume-model 3d (default: the MAE's, else 224; 96 for 3d)")
    m.add_argument("--in-channels", type=int, choices=(1, 3), help="input channels from scratch (default 3)")
    m.add_argument("--patch-size", type=positive_int, default=16, help="ViT patch size from scratch (default 16)")
    m.add_argument("--pool", default="avg", choices=("avg", "cls"), help="ViT feature pooling (default avg)")
    m.add_argument("--dropout", type=unit_fraction, default=0.0, help="dropout before the head (default 0)")
    m.add_argument("--drop-path", type=unit_fraction, default=0.1, help="stochastic depth rate (default 0.1)")
    m.add_argument("--linear-probe", action="store_true", help="freeze the encoder, train the linear head only")
    add_geometry_arguments(m, "model input (stored in the checkpoint, so predict, evaluate, the bundle and Slicer do "
                           "the same)")
    m.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no training-time augmentation (random resized crop, flip, rotation)")
    v = p.add_argument_group("volumes and clips (one label per scan)")
    v.add_argument("--volume-model", choices=("3d", "mil"),
                   help="classify whole volumes / cine clips: 3d = native 3D ViT (from a --native-3d MAE or an "
                   "inflated 2D MAE) or 3D CNN with --arch; mil = 2D slice encoder + attention pooling over slices "
                   "(from a 2D MAE). Default: a 2D classifier (volumes give their middle slice)")
    v.add_argument("--axis", type=int, default=0, choices=(0, 1, 2),
                   help="mil: slicing axis of volumes (array order D, H, W; default 0); clips use their frames")
    v.add_argument("--max-slices", type=positive_int, default=32,
                   help="mil: slices per volume per training step, evenly spaced (default 32); evaluation uses all")
    v.add_argument("--volume-spacing", type=positive_float, metavar="MM",
                   help="3d: resample every volume to this isotropic voxel size in mm, then pad / crop to the cube "
                   "(default: fit each volume's longest extent into the cube, as --native-3d pretraining)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=50, help="maximum epochs (default 50)")
    t.add_argument("--warmup-epochs", type=nonneg_int, default=5, help="linear lr warm-up (default 5)")
    t.add_argument("--batch-size", type=positive_int, help="images per batch (default 32), or volumes with "
                   "--volume-model (default 4)")
    t.add_argument("--lr", type=positive_float, help="learning rate (default: blr * batch / 256)")
    t.add_argument("--blr", type=positive_float, help="base lr (default 1e-3; 1e-2 for --linear-probe)")
    t.add_argument("--min-lr", type=nonneg_float, default=1e-6, help="cosine schedule floor (default 1e-6)")
    t.add_argument("--weight-decay", type=nonneg_float,
                   help="AdamW weight decay (default 0.05; 0 for --linear-probe)")
    t.add_argument("--layer-decay", type=fraction, help="layer-wise lr decay (default 0.75 from an MAE, else none)")
    t.add_argument("--clip-grad", type=positive_float, help="clip the gradient norm to this value")
    t.add_argument("--label-smoothing", type=unit_fraction, default=0.1, help="default 0.1")
    t.add_argument("--balance", default="none", choices=("none", "loss", "sampler"),
                   help="class balancing: weighted loss or sampler (default none)")
    t.add_argument("--patience", type=nonneg_int, default=10,
                   help="stop after this many epochs without a better validation macro-F1 (0: never; default 10)")
    t.add_argument("--label-fraction", type=fraction, default=1.0,
                   help="train on this stratified fraction of the training split (default 1)")
    t.add_argument("--val-fraction", type=unit_fraction, default=0.15,
                   help="validation fraction when --data is split here (folders / CSV; default 0.15)")
    t.add_argument("--test-fraction", type=unit_fraction, default=0.15,
                   help="test fraction when --data is split here (folders / CSV; default 0.15)")
    add_mask_arguments(t)
    t.add_argument("--folds", type=nonneg_int, default=0,
                   help="k-fold cross-validation with K >= 2 folds (default: off)")
    add_precision(t)
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (pays on GPUs and long runs; minutes of compilation first)")
    add_device(t)
    t.add_argument("--seed", type=int, default=0, help="seed of splits, sampling and initialisation (default 0)")
    t.add_argument("--workers", type=nonneg_int, help="data loader processes (default 0 on CPU, 8 on CUDA)")
    t.add_argument("--mlflow", metavar="URI", help="also log to this MLflow tracking URI")
    t.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard logs")
    r = p.add_argument_group("run folder")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its checkpoint_last.pt (written after every "
                   "epoch), with its datalist; the end result is that of an uninterrupted run (exactly so with "
                   "--workers 0). Starts fresh when there is nothing to resume")
    add_overwrite(r, "fine-tuning run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.finetune import FinetuneOptions, finetune

    names = {f for f in FinetuneOptions.__dataclass_fields__ if f not in ("extra", "quiet")}
    opts = FinetuneOptions(**{k: v for k, v in vars(args).items() if k in names})
    result = finetune(args.data, args.out, opts, run_config=vars(args))
    out = Path(args.out)
    if opts.folds:
        mean, std = result["mean"], result["std"]
        print(f"{opts.folds}-fold cross-validation: validation macro-F1 {mean['validation/f1_macro']:.3f} "
              f"+- {std['validation/f1_macro']:.3f} -> {out / 'cv_summary.json'}")
    else:
        line = f"best epoch {result['best_epoch']}: validation macro-F1 {result['validation']['f1_macro']:.3f}"
        if "test" in result:
            line += f", test macro-F1 {result['test']['f1_macro']:.3f}, accuracy {result['test']['accuracy']:.3f}"
        print(f"{line} -> {out / 'model.pt'}")
    return 0
