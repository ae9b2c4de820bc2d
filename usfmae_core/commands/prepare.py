"""``usfmae prepare``: folders of ultrasound files -> a sharded uint8 frame cache for pretraining."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from usfmae_core.commands._args import add_geometry_arguments, add_mask_arguments, add_overwrite, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn folders of ultrasound files into a pretraining frame cache",
        description="Walk SRC files/folders (PNG/JPG/BMP/TIFF, DICOM, NIfTI, NRRD, MetaImage, mp4/avi/mov/mpeg/gif) "
                    "and write a sharded uint8 frame cache + manifest to --out. Files that cannot be used (unreadable, "
                    "corrupt, special files, broken links) are skipped and listed. Progress is saved at least every "
                    "30 s; re-running resumes. With --labelled, "
                    "the training images of a labelled set are added without their labels, and its validation / "
                    "test images are kept out of the corpus (also copies of them among SRC).",
    )
    p.add_argument("sources", nargs="*", metavar="SRC", help="files or folders (optional with --labelled)")
    p.add_argument("--out", required=True, help="corpus folder (locked while prepare writes it; re-running resumes it)")
    add_overwrite(p, "corpus")
    p.add_argument("--labelled", "--datalist", dest="labelled", metavar="DATA",
                   help="labelled data whose --labelled-splits images (without labels) join the corpus, never its "
                        "other splits: a datalist JSON (e.g. RUN/datalist.json of usfmae finetune), or class folders "
                        "/ a CSV, split here as usfmae finetune --seed --split-seed would and written to "
                        "OUT/datalist.json (fine-tune on that file)")
    p.add_argument("--labelled-splits", "--datalist-splits", dest="labelled_splits", nargs="+", default=["training"],
                   choices=("training", "validation"), metavar="SPLIT",
                   help="splits of --labelled to use: training (default) and/or validation; never test")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the split of --labelled folders / CSV (default 0)")
    p.add_argument("--image-size", "--img-size", dest="image_size", type=positive_int, default=224,
                   help="side of the stored square frames (default 224)")
    p.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2], choices=(0, 1, 2),
                   help="volume axes to slice along (default 0 1 2)")
    p.add_argument("--frame-stride", type=positive_int, default=1, help="keep every n-th cine frame (default 1)")
    p.add_argument("--crop-sector", action="store_true", help="crop to the detected imaged region")
    add_geometry_arguments(p, "frames of the corpus (volume slices are always letterboxed)", crop=False)
    p.add_argument("--remove-text", action="store_true", help="inpaint burned-in text, calipers and overlays")
    p.add_argument("--native-3d", action="store_true", help="also write isotropic volumes for 3D pretraining")
    p.add_argument("--volume-size", type=positive_int, default=96, help="side of native 3D volumes (default 96)")
    p.add_argument("--workers", type=positive_int, default=max(1, os.cpu_count() or 1),
                   help="reader processes (default: all cores)")
    add_mask_arguments(p, "sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.data.corpus import datalist_sources, prepare_corpus, split_labelled_for_corpus
    from usfmae_core.errors import UsfmaeError

    sources, held_out, reason = list(args.sources), [], "held out"
    if args.labelled:
        datalist = split_labelled_for_corpus(args.labelled, args.out, args.split_seed)
        use, held_out, per_split = datalist_sources(datalist, args.labelled_splits)
        sources += use
        held = [s for s in ("training", "validation", "test") if s not in args.labelled_splits and per_split[s]]
        reason = f"in the {'/'.join(held) or 'held-out'} split of {datalist}"
        print(f"datalist {datalist}: {len(use)} images of {'+'.join(args.labelled_splits)} used without labels; "
              f"{len(held_out)} held-out images ({', '.join(f'{s} {per_split[s]}' for s in held) or 'none'}) "
              "kept out of the corpus" + (f"; fine-tune with --data {datalist} to keep them held out"
                                         if Path(datalist) != Path(args.labelled) else ""))
    elif not sources:
        raise UsfmaeError("nothing to prepare", "pass files / folders (SRC...) and/or --labelled DATA")
    rep = prepare_corpus(sources, args.out, args.image_size, tuple(args.axes), args.frame_stride,
                         args.crop_sector, args.remove_text, args.native_3d, args.workers,
                         not args.no_progress, args.volume_size, exclude=held_out, exclude_reason=reason,
                         include_masks=args.include_masks, mask_patterns=args.mask_patterns, log=print,
                         resize=args.resize, overwrite=args.overwrite)
    print(f"prepared {rep['n_frames']} frames in {rep['corpus']} ({rep['frames_added']} new from "
          f"{rep['sources_read']} files; {rep['sources_resumed']} already done; {rep['duplicates_removed']} "
          f"duplicates, {rep['near_duplicates_removed']} near-duplicate cine frames, "
          f"{rep['empty_frames_skipped']} empty frames dropped; {rep['n_volumes']} volumes)")
    masks = [m for m in rep["masks"] if not m.get("kept")]
    if masks:
        by_content = sum(1 for m in masks if str(m["reason"]).startswith("content"))
        ex = ", ".join(Path(m["path"]).name for m in masks[:3]) + (", ..." if len(masks) > 3 else "")
        print(f"left out {len(masks)} segmentation masks / annotation files ({len(masks) - by_content} by name, "
              f"{by_content} by content; e.g. {ex}; list in {Path(args.out) / 'report.json'}; "
              "--include-masks keeps them)")
    if rep["totals"].get("non_square_sources"):
        how = ("letterboxed: aspect ratio kept, black padding" if args.resize == "letterbox"
               else "squashed to a square (--resize squash)")
        print(f"non-square: {rep['totals']['non_square_sources']} image / clip files, {how}")
    if rep["totals"].get("colour_sources"):
        print(f"colour: {rep['totals']['colour_sources']} files carry colour pixels (Doppler, overlays); the corpus "
              "stores them as grey (BT.601 luma)")
    if rep["skipped"]:
        print(f"skipped {len(rep['skipped'])} files (details in {Path(args.out) / 'report.json'}):")
        for s in rep["skipped"][:20]:
            print(f"  {s['path']}: {s['reason']}")
        if len(rep["skipped"]) > 20:
            print(f"  ... and {len(rep['skipped']) - 20} more")
    if rep["excluded"]:
        print(f"left out {len(rep['excluded'])} held-out files found among SRC (listed in "
              f"{Path(args.out) / 'report.json'}), e.g. {rep['excluded'][0]['path']}: {rep['excluded'][0]['reason']}")
    return 0
