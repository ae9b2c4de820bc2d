"""``usfmae predict``: classify images, cine clips and volumes with a fine-tuned classifier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usfmae_core.commands._args import add_inference_arguments, add_mask_arguments, add_precision, positive_int
from usfmae_core.constants import KIND_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images, cine clips and volumes with a fine-tuned classifier",
                       description="Classify 2D images, cine clips and 3D volumes (any format usfmae reads), "
                       "folders (recursively) or the images of a datalist JSON. A 2D model classifies each "
                       "frame / slice and aggregates them (--aggregate); a volume model (3D ViT / CNN, attention MIL) "
                       "classifies each volume or clip as a whole (MIL also writes each slice's attention).")
    p.add_argument("model", help="classifier checkpoint (from usfmae finetune; resnet/densenet baselines too)")
    p.add_argument("inputs", nargs="+", help="files, folders or a datalist .json")
    add_inference_arguments(p)
    add_precision(p, "autocast precision (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)")
    p.add_argument("--top-k", type=positive_int, default=3,
                   help="frames listed in top_slices per input, and k of --aggregate topk (default 3)")
    p.add_argument("--aggregate", default="mean", choices=("mean", "max", "topk"),
                   help="how a 2D model's slices / frames make the volume / clip result: mean = average over all "
                   "informative slices (overall appearance; a focal lesion is outvoted); max = the most abnormal "
                   "slice (lowest probability of the normal class: 'is there a lesion anywhere?'); topk = the mean "
                   "of the --top-k most abnormal slices (the same question, robust to one noisy slice). Volume "
                   "models (finetune --volume-model) give one volume-level result (default mean)")
    p.add_argument("--normal-class", metavar="NAME",
                   help="for --aggregate max/topk: the class meaning 'nothing found' (default: the class named "
                   "normal, none, negative, healthy, no_lesion, background, regular or control)")
    p.add_argument("--kind", default="auto", choices=KIND_CHOICES,
                   help="how to read each input: auto (as its format says), or image, cine (2D+t: one result per "
                   "frame) or volume (3D), e.g. --kind cine for a clip stored as a 3D NRRD")
    add_mask_arguments(p, "inputs to classify")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.workflows.predict import predict

    out = predict(args.model, args.inputs, args.out, args.device, args.axis, args.batch_size, args.precision,
                  args.top_k, run_config=vars(args), aggregate=args.aggregate, normal_class=args.normal_class,
                  include_masks=args.include_masks, mask_patterns=args.mask_patterns, kind=args.kind,
                  overwrite=args.overwrite)
    report = json.loads((out / "predictions.json").read_text())
    for r in report["results"]:
        probs = ", ".join(f"{c} {r[f'p_{c}']:.3f}" for c in report["classes"])
        excluded = f", {r['n_excluded']} empty/constant left out" if r.get("n_excluded") else ""
        if "n_slices" in r:  # attention MIL: say which slices drove the result
            what = f"{r['n_slices']} slice(s) pooled{excluded}, most attention on {_slices(r['top_slices'])}"
        elif report.get("volume_model"):
            what = "whole volume"
        else:
            how = report.get("aggregate", "mean")
            what = f"{r['n_frames']} frame(s){excluded}" + ("" if how == "mean" else
                                                           f", {how} of {_slices(r['top_slices'])}")
        print(f"{r['source']}: {r['label']} ({r['kind']}, {what}; {probs})")
    masks = [s for s in report["skipped"] if s.get("mask")]
    colour = report.get("colour") or {}
    if colour.get("files"):
        how = ("given to the model as colour (RGB)" if colour["given_as"] == "rgb" else
               "converted to grey (BT.601 luma): the model takes grey input")
        print(f"colour: {colour['files']} of {len(report['results'])} input(s) carry colour pixels, {how}")
    for s in report["skipped"]:
        if not s.get("mask"):
            print(f"skipped {s['source']}: {s['reason']}")
    if masks:
        ex = ", ".join(Path(s["source"]).name for s in masks[:3]) + (", ..." if len(masks) > 3 else "")
        print(f"left out {len(masks)} segmentation masks / annotation files (e.g. {ex}; listed in predictions.json; "
              "--include-masks classifies them)")
    print(f"wrote {out / 'predictions.csv'}, {out / 'summary.csv'}, {out / 'predictions.json'}")
    return 0


def _slices(index: list[int]) -> str:
    return "slice " + " ".join(map(str, index)) if len(index) == 1 else "slices " + " ".join(map(str, index))
