"""``usfmae export-bundle RUN --out DIR``: a fine-tuned run as a complete, shareable MONAI bundle."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-bundle", help="write a fine-tuned run as a complete MONAI bundle (Model Zoo layout)",
        description="Turn a usfmae finetune run (CLI or Slicer) into a MONAI bundle: configs with its classes, "
                    "network and preprocessing, models/model.pt and models/model.ts, metadata with its test "
                    "metrics, a model card, and large_files.yml with the sha256 of each weight file and a URL to "
                    "fill in when you upload them.")
    p.add_argument("run", help="run folder of usfmae finetune (model.pt, metrics.json, config.json)")
    p.add_argument("--out", required=True, help="bundle folder to write (its name is the bundle's name)")
    p.add_argument("--data-source", required=True,
                   help="the data that trained the model: name, citation, licence (goes into the metadata)")
    p.add_argument("--intended-use", help="intended use (default: research only, not a medical device)")
    p.add_argument("--data-license", help="licence of that data (docs/data_license.txt)")
    p.add_argument("--title", help="the bundle's name in its metadata (default from the classes)")
    p.add_argument("--version", dest="bundle_version", default="1.0.0", help="bundle version (default 1.0.0)")
    p.add_argument("--changelog", help="changelog entry of this version")
    p.add_argument("--authors", help="authors (default: USF-MAE toolkit contributors)")
    p.add_argument("--no-torchscript", dest="torchscript", action="store_false",
                   help="do not write models/model.ts")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.bundle_export import export_bundle

    export_bundle(args.run, args.out, data_source=args.data_source, intended_use=args.intended_use,
                  version=args.bundle_version, title=args.title, authors=args.authors,
                  data_license=args.data_license, changelog=args.changelog, torchscript=args.torchscript,
                  force=args.force)
    return 0
