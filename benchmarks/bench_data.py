"""Data-layer throughput: ``prepare`` (source files/s and frames/s per worker) and cache loading + augmentation.

    python benchmarks/bench_data.py --data ../shared/data --json bench_data.json

(1) prepare on phantom 2D images (always) and, with ``--data``, on each real sub-collection (BUSI PNGs, NIfTI /
MetaImage volumes, PLUS sequences + DICOM, POCUS videos); single process unless ``--workers`` says otherwise, so
"per worker" = measured / workers. (2) the pretraining loader (``make_pretrain_loader``, uint8 batches from the
memory-mapped cache) + ``MAEBatchAugment`` at 224x224 on one CPU thread = images/s per core.
Targets: prepare >= 200 source 2D images/s per worker; loader >= 2,000 img/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return "n/a"


def bench_prepare(name: str, sources: list[Path], work: Path, workers: int, image_size: int, **kw) -> dict:
    from usfmae_core.data.corpus import prepare_corpus

    out = work / f"corpus_{name}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    rep = prepare_corpus(sources, out, image_size=image_size, workers=workers, progress=False, **kw)
    wall = time.perf_counter() - t
    n_src, n_fr = rep["sources_read"], rep["frames_added"]
    row = {"name": name, "workers": workers, "sources": n_src, "skipped": rep["sources_skipped"], "frames": n_fr,
           "wall_s": round(wall, 2), "sources_per_s": round(n_src / wall, 1), "frames_per_s": round(n_fr / wall, 1),
           "sources_per_s_per_worker": round(n_src / wall / workers, 1),
           "frames_per_s_per_worker": round(n_fr / wall / workers, 1), "options": kw}
    print(f"prepare {name:>14}: {n_src} files -> {n_fr} frames in {wall:.1f}s = {row['sources_per_s_per_worker']} "
          f"files/s, {row['frames_per_s_per_worker']} frames/s per worker ({workers} worker(s))", flush=True)
    return row


def bench_loader(corpus: Path, batch: int, image_size: int, seconds: float) -> dict:
    from usfmae_core.data.datasets import MAEBatchAugment, make_pretrain_loader

    torch.set_num_threads(1)  # "per core"
    aug = MAEBatchAugment(image_size, 3)
    res = {}
    for label, use_aug in (("loader_only", False), ("loader_plus_augment", True)):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for x in make_pretrain_loader(corpus, batch, image_size, workers=0, seed=n):
                if use_aug:
                    y = aug(x)
                    assert y.shape == (x.shape[0], 3, image_size, image_size)
                n += x.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
        dt = time.perf_counter() - t0
        res[label] = round(n / dt, 1)
        print(f"loader {label:>20}: {n / dt:,.0f} img/s on 1 core (batch {batch}, {image_size}x{image_size})",
              flush=True)
    return {"batch": batch, "image_size": image_size, "img_per_s_per_core": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="real data root (../shared/data)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--phantom-images", type=int, default=400)
    ap.add_argument("--max-videos", type=int, default=20, help="videos from pocus_lung (decode-bound, slow)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--loader-seconds", type=float, default=10.0)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from usfmae_core.data import phantom

    work = args.work or Path(tempfile.mkdtemp(prefix="usfmae_bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"uptime_before": _uptime(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "torch": torch.__version__, "prepare": [], "command": " ".join(os.sys.argv)}
    # phantom 2D images at 256x256 (BUSI-like) so both collections are comparable
    src = work / "phantom_src"
    if not src.exists():
        rng = np.random.default_rng(0)
        for i in range(args.phantom_images):
            phantom.write_image(src / "images" / f"p{i:05d}.png",
                                phantom.make_image(i % 3, 256, ("sector", "linear")[i % 2], rng))
        phantom.write_unlabelled_corpus_sources(src / "mixed", n_images=16, n_volumes=4, n_cines=8, seed=1)
    # warm-up: imports (torch, MONAI, ITK, PyAV) cost seconds once per process; throughput is the steady state
    bench_prepare("warmup", [src / "images" / "p00000.png"], work, 1, args.image_size)
    results["prepare"].append(bench_prepare("phantom_png", [src / "images"], work, args.workers, args.image_size))
    results["prepare"].append(bench_prepare("phantom_png+crop+text", [src / "images"], work, args.workers,
                                            args.image_size, crop_sector=True, remove_text=True))
    results["prepare"].append(bench_prepare("phantom_mixed", [src / "mixed"], work, args.workers, args.image_size))
    if args.data is not None:
        d = args.data
        collections = {
            "busi_png": [d / "busi_256"],
            "volumes": [d / "volumes"],
            "sequences+dicom": [d / "sequences", d / "dicom_us"],
            "pocus_images": [d / "pocus_lung" / "images"],
        }
        videos = sorted(p for p in (d / "pocus_lung" / "videos").rglob("*") if p.is_file())[: args.max_videos]
        for name, srcs in collections.items():
            srcs = [s for s in srcs if s.exists()]
            if srcs:
                results["prepare"].append(bench_prepare(name, srcs, work, args.workers, args.image_size))
        if videos:
            results["prepare"].append(bench_prepare(f"pocus_videos[{len(videos)}]", videos, work, args.workers,
                                                    args.image_size, frame_stride=1))
    # loader: the phantom corpus (plus mixed frames) at 224
    corpus = work / "corpus_loader"
    if not (corpus / "corpus.json").exists():
        from usfmae_core.data.corpus import prepare_corpus

        prepare_corpus([src], corpus, image_size=args.image_size, workers=args.workers, progress=False)
    results["loader"] = bench_loader(corpus, args.batch, args.image_size, args.loader_seconds)
    results["uptime_after"] = _uptime()
    print("uptime:", results["uptime_after"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
