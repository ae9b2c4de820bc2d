"""``usfmae predict``: classify images, cine clips and volumes with a fine-tuned classifier."""

from __future__ import annotations

import argparse
import json

from usfmae_core.commands._args import add_inference_arguments, add_precision, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images, cine clips and volumes with a fine-tuned classifier",
                       description="Classify 2D images, cine clips and 3D volumes (any format usfmae reads), "
                       "folders (recursively) or the images of a datalist JSON. A 2D model classifies each "
                       "frame / slice and averages; a 3D model classifies each volume as a whole.")
    p.add_argument("model", help="classifier checkpoint (from usfmae finetune; resnet/densenet baselines too)")
    p.add_argument("inputs", nargs="+", help="files, folders or a datalist .json")
    add_inference_arguments(p)
    add_precision(p, "autocast precision (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)")
    p.add_argument("--top-k", type=positive_int, default=3, help="frames listed in top_slices per input (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.predict import predict

    out = predict(args.model, args.inputs, args.out, args.device, args.axis, args.batch_size, args.precision,
                  args.top_k, run_config=vars(args), overwrite=args.overwrite)
    report = json.loads((out / "predictions.json").read_text())
    for r in report["results"]:
        probs = ", ".join(f"{c} {r[f'p_{c}']:.3f}" for c in report["classes"])
        print(f"{r['source']}: {r['label']} ({r['kind']}, {r['n_frames']} frame(s); {probs})")
    for s in report["skipped"]:
        print(f"skipped {s['source']}: {s['reason']}")
    print(f"wrote {out / 'predictions.csv'}, {out / 'summary.csv'}, {out / 'predictions.json'}")
    return 0
