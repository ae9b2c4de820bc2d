"""``usfmae embed``: encoder features of images, clip frames and volume slices."""

from __future__ import annotations

import argparse
import json

from usfmae_core.commands._args import add_inference_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="encoder features of images, clip frames and volume slices",
                       description="Write one embedding per frame / slice (a volume model: per volume or clip) "
                       "to embeddings.npy, with embeddings_index.csv naming the file and frame of each row.")
    p.add_argument("model", help="MAE, ViT classifier or attention-MIL volume classifier checkpoint")
    p.add_argument("inputs", nargs="+", help="files, folders or a datalist .json")
    add_inference_arguments(p)
    p.add_argument("--pool", default="avg", choices=("avg", "cls"),
                   help="avg: mean of patch tokens (default), cls: the cls token (both after the final norm)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.embed import embed

    out = embed(args.model, args.inputs, args.out, args.pool, args.axis, args.device, args.batch_size,
                run_config=vars(args), overwrite=args.overwrite)
    report = json.loads((out / "embed.json").read_text())
    for s in report["skipped"]:
        if not s.get("mask"):
            print(f"skipped {s['source']}: {s['reason']}")
    masks = sum(1 for s in report["skipped"] if s.get("mask"))
    if masks:
        print(f"left out {masks} segmentation masks / annotation files (listed in embed.json)")
    n, d = report["shape"]
    print(f"wrote {n} embeddings of width {d} to {out / 'embeddings.npy'} (rows: {out / 'embeddings_index.csv'})")
    return 0
