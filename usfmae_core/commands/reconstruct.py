"""``usfmae reconstruct``: mask and reconstruct an image, clip or volume with a pretrained MAE."""

from __future__ import annotations

import argparse

from usfmae_core.commands._args import add_inference_arguments, open_fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="mask and reconstruct an image, clip or volume with a pretrained MAE",
                       description="Hide a fraction of patches and let the MAE fill them in: PNG grids "
                       "(input | masked | reconstruction) for images and clips; volumes also get the masked input, "
                       "reconstruction and mask as volumes with the input's geometry (to overlay in Slicer).")
    p.add_argument("model", help="MAE checkpoint (from usfmae pretrain or import-weights)")
    p.add_argument("input", help="an image, cine clip or volume")
    add_inference_arguments(p, batch_size=16)
    p.add_argument("--mask-ratio", type=open_fraction, default=0.75, help="fraction of patches hidden (default 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.reconstruct import reconstruct_file

    written = reconstruct_file(args.model, args.input, args.out, args.mask_ratio, args.seed, args.axis, args.device,
                               args.batch_size, run_config=vars(args), overwrite=args.overwrite)
    print(f"masked-patch loss {written['loss']:.4f}; {len(written['pictures'])} picture(s) in {args.out}")
    for name, p in written.get("volumes", {}).items():
        print(f"{name}: {p}")
    return 0
