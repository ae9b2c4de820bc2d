"""``usfmae import-weights`` / ``usfmae export-weights``: foreign checkpoints in, facebook MAE layout out."""

from __future__ import annotations

import argparse

from usfmae_core.commands._args import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-weights", help="convert facebook MAE / USF-MAE, MONAI or timm ViT weights to a "
                       "usfmae checkpoint (format detected automatically)")
    p.add_argument("src", help="foreign checkpoint (.pth/.pt)")
    p.add_argument("--out", required=True, help="usfmae checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--image-size", "--img-size", dest="img_size", type=positive_int,
                   help="re-fit to this image size (position embeddings interpolated)")
    p.add_argument("--in-channels", type=int, choices=(1, 3), help="re-fit to 1 (grey) or 3 input channels")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), help="3 inflates 2D weights for volumes")
    p.add_argument("--num-heads", type=positive_int, help="encoder heads (default: width / 64)")
    p.add_argument("--decoder-num-heads", type=positive_int, help="decoder heads (default: width / 32)")
    p.set_defaults(func=run_import)
    e = sub.add_parser("export-weights", help="write a usfmae checkpoint's weights in facebook MAE / timm layout")
    e.add_argument("ckpt", help="usfmae checkpoint")
    e.add_argument("--out", required=True, help="file to write ({'model': state_dict})")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    e.set_defaults(func=run_export)


def _refuse_existing(out: str, overwrite: bool) -> None:
    """A weights file already at ``--out`` (perhaps a trained model) is replaced only when asked."""
    from pathlib import Path

    from usfmae_core.errors import UsfmaeError

    if Path(out).expanduser().is_file() and not overwrite:
        raise UsfmaeError(f"--out {out} already exists", "pass --overwrite to replace it, or choose another file name")


def run_import(args: argparse.Namespace) -> int:
    from usfmae_core.checkpoints import import_weights, load_checkpoint

    _refuse_existing(args.out, args.overwrite)
    path = import_weights(args.src, args.out, args.img_size, args.in_channels, args.spatial_dims, args.num_heads,
                          args.decoder_num_heads)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    print(f"imported {ckpt['meta']['source_format']} weights from {args.src} -> {path} "
          f"({ckpt['arch']}, {cfg['spatial_dims']}D, width {cfg['hidden_size']}, {cfg['num_layers']} blocks, "
          f"image {cfg['img_size']}, {cfg['in_channels']} channel(s))")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from usfmae_core.checkpoints import load_checkpoint, save_checkpoint, to_facebook_state_dict

    _refuse_existing(args.out, args.overwrite)
    ckpt = load_checkpoint(args.ckpt)
    state = to_facebook_state_dict(ckpt["model"])
    out = save_checkpoint(args.out, {"model": state})
    print(f"wrote facebook-MAE layout weights ({len(state)} tensors) -> {out}")
    return 0
