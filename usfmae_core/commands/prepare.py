"""``usfmae prepare``: folders of ultrasound files -> a sharded uint8 frame cache for pretraining."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from usfmae_core.commands._args import add_overwrite, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn folders of ultrasound files into a pretraining frame cache",
        description="Walk SRC files/folders (PNG/JPG/BMP/TIFF, DICOM, NIfTI, NRRD, MetaImage, mp4/avi/mov/mpeg/gif) "
                    "and write a sharded uint8 frame cache + manifest to --out. Files that cannot be used (unreadable, "
                    "corrupt, special files, broken links) are skipped and listed. Progress is saved at least every "
                    "30 s; re-running resumes.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders")
    p.add_argument("--out", required=True, help="corpus folder (locked while prepare writes it; re-running resumes it)")
    add_overwrite(p, "corpus")
    p.add_argument("--image-size", "--img-size", dest="image_size", type=positive_int, default=224,
                   help="side of the stored square frames (default 224)")
    p.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2], choices=(0, 1, 2),
                   help="volume axes to slice along (default 0 1 2)")
    p.add_argument("--frame-stride", type=positive_int, default=1, help="keep every n-th cine frame (default 1)")
    p.add_argument("--crop-sector", action="store_true", help="crop to the detected imaged region")
    p.add_argument("--remove-text", action="store_true", help="inpaint burned-in text, calipers and overlays")
    p.add_argument("--native-3d", action="store_true", help="also write isotropic volumes for 3D pretraining")
    p.add_argument("--volume-size", type=positive_int, default=96, help="side of native 3D volumes (default 96)")
    p.add_argument("--workers", type=positive_int, default=max(1, os.cpu_count() or 1),
                   help="reader processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core.data.corpus import prepare_corpus

    rep = prepare_corpus(args.sources, args.out, args.image_size, tuple(args.axes), args.frame_stride,
                         args.crop_sector, args.remove_text, args.native_3d, args.workers,
                         not args.no_progress, args.volume_size, overwrite=args.overwrite)
    print(f"prepared {rep['n_frames']} frames in {rep['corpus']} ({rep['frames_added']} new from "
          f"{rep['sources_read']} files; {rep['sources_resumed']} already done; {rep['duplicates_removed']} "
          f"duplicates, {rep['near_duplicates_removed']} near-duplicate cine frames, "
          f"{rep['empty_frames_skipped']} empty frames dropped; {rep['n_volumes']} volumes)")
    if rep["skipped"]:
        print(f"skipped {len(rep['skipped'])} files (details in {Path(args.out) / 'report.json'}):")
        for s in rep["skipped"][:20]:
            print(f"  {s['path']}: {s['reason']}")
        if len(rep["skipped"]) > 20:
            print(f"  ... and {len(rep['skipped']) - 20} more")
    return 0
