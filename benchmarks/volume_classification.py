"""Benchmark: one label per 3D volume. Which volume classifier finds a focal lesion?

Two labelled sets, each "lesion" vs "none", one label per volume, with the same lesion model (:func:`insert_lesion`:
a hypoechoic ellipsoid darkened by 25-45 % of the local mean intensity with a soft one-voxel edge, so the speckle and
texture inside stay, centred on a random voxel of the imaged tissue: a random slice and in-plane position):

- ``phantom``: synthetic B-mode volumes of normal layered tissue (:func:`usfmae_core.data.phantom.make_volume`,
  class "normal": speckle and attenuation; its vessel distractor is drawn only with a lesion, so never here),
  32 x 64 x 64 voxels (32 mm cube); half of them get a lesion of 2.5-4.5 mm radius. (The phantom's own "mass"
  volumes were tried first: at 64 x 64 pixels many of their lesions are too faint to see, and no arm learned them in
  30 epochs.)
- ``trus``: the real 3D transrectal prostate volumes of ``../shared/data/volumes/trus_prostate`` (108 volumes,
  44 x 63 x 47 voxels of 1.5 mm). **The labels are synthetic**: every real volume appears twice, once as it is
  ("none") and once with a synthetic lesion of 4.5-7.5 mm radius ("lesion"). The two copies of a volume form one
  group, so they always fall into the same split: a model can only tell them apart by the lesion.

Arms (the same split, budget and test set; a test set never used for any choice):

1. ``3d_vit_mae3d``: native 3D ViT fine-tuned from a 3D MAE (``prepare --native-3d`` + ``pretrain --spatial-dims 3``);
2. ``mil_mae2d``: 2D slice encoder + gated attention pooling (attention MIL), fine-tuned from a 2D MAE;
3. ``2d_mae2d``: the 2D classifier of the same 2D MAE fine-tuned the way ``usfmae finetune`` treats volumes without
   ``--volume-model`` (each contributes its middle slice), then classifying test volumes slice by slice with the
   mean of slices (``predict --aggregate mean``; ``max`` and ``topk`` are reported as extra rows);
4. ``3d_vit_scratch``: the same 3D ViT from random initialisation;
5. ``3d_resnet18_scratch``: MONAI's 3D ResNet-18 from random initialisation.

Both MAEs are pretrained for the same number of steps on the same unlabelled volumes, without labels and without
the synthetic lesions: separate phantom volumes (``phantom``), or the clean training-split TRUS volumes plus the PLUS
phantom volumes (``trus``). Every run goes through the ``usfmae`` CLI in a subprocess, which records its peak
resident memory; train time per epoch comes from each run's ``history.csv``. Test AUC and macro-F1 come with
percentile-bootstrap 95 % intervals (:mod:`usfmae_core.workflows.metrics`), and paired bootstrap differences compare
arms on the same test volumes.

    python benchmarks/volume_classification.py --dataset phantom --work /tmp/volbench
    python benchmarks/volume_classification.py --dataset trus --data ../shared/data --work /tmp/volbench

Results go to ``benchmarks/results/volumes_<dataset>/`` (``results.json``, ``results.md``). Steps whose outputs exist
in ``--work`` are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "3d_vit_mae3d": "3D ViT from the 3D MAE",
    "mil_mae2d": "MIL (2D encoder + attention) from the 2D MAE",
    "2d_mae2d": "2D classifier from the 2D MAE, mean of slices",
    "3d_vit_scratch": "3D ViT from scratch",
    "3d_resnet18_scratch": "MONAI 3D ResNet-18 from scratch",
}
CLASSES = ("lesion", "none")
# Peak memory of the whole process: the CLI is run by this wrapper, which prints it on exit.
_PEAK = ("import resource, sys; from usfmae_core import cli; rc = cli.main(sys.argv[1:]); "
         "print('PEAK_RSS_MB %.1f' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)); sys.exit(rc)")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def usfmae(argv: list[str], log: Path) -> dict[str, Any]:
    """Run ``usfmae ARGV`` in a subprocess (output to ``log``); returns wall time, peak RSS and load before/after."""
    before, t0 = load(), time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _PEAK, *argv], stdout=subprocess.PIPE, stderr=f, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        f.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"usfmae {' '.join(argv)} failed ({proc.returncode}); see {log}")
    peak = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_MB")]
    return {"wall_s": round(time.monotonic() - t0, 1), "peak_rss_mb": peak[-1] if peak else None,
            "load_before": before, "load_after": load()}


# -------------------------------------------------------------------------------------------------------- data
def insert_lesion(vol: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator,
                  radius_mm: tuple[float, float] = (4.5, 7.5)) -> tuple[np.ndarray, dict]:
    """A synthetic focal hypoechoic lesion: an ellipsoid (radius ``radius_mm``, axes x0.75-1.25) darkened by 25-45 %
    of the local mean intensity (an offset, as a drop in dB is after log compression: the speckle inside stays) with
    a one-voxel soft edge, centred on a random voxel inside the imaged tissue (smoothed intensity above its median)
    away from the borders. Returns the new volume and the lesion's parameters (centre voxel, radius, drop, the slices
    along axis 0 it touches)."""
    from scipy import ndimage

    sp = np.asarray(spacing, dtype=np.float64)
    radius = rng.uniform(*radius_mm) * rng.uniform(0.75, 1.25, 3)  # mm per axis
    r_vox = radius / sp
    smooth = ndimage.uniform_filter(vol.astype(np.float32), 5)
    tissue = smooth > np.median(smooth[smooth > 0])
    margin = np.ceil(r_vox).astype(int) + 1
    inner = np.zeros_like(tissue)
    inner[margin[0]:-margin[0], margin[1]:-margin[1], margin[2]:-margin[2]] = True
    candidates = np.argwhere(tissue & inner)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(vol.shape, dtype=np.float64)
    dist = np.sqrt(sum(((grid[i] - centre[i]) / r_vox[i]) ** 2 for i in range(3)))
    edge = np.clip((1.0 - dist) * min(r_vox) + 0.5, 0.0, 1.0)  # 1 inside, 0 outside, ramp over about one voxel
    drop = rng.uniform(0.25, 0.45)
    out = np.clip(vol - edge * drop * float(smooth[tuple(centre)]), 0, None)
    touched = np.nonzero(edge.reshape(len(edge), -1).max(1) > 0.5)[0]
    return out.astype(vol.dtype), {"centre_voxel": centre.tolist(), "radius_mm": radius.round(2).tolist(),
                                   "drop": round(float(drop), 3),
                                   "slices": [int(touched.min()), int(touched.max())] if touched.size else []}


def make_phantom(work: Path, n_per_class: int, n_unlabelled: int, seed: int) -> tuple[Path, Path]:
    """Labelled phantom volumes ``work/labelled/{lesion,none}/*.nii.gz`` (normal tissue; the lesion class with an
    inserted lesion) and unlabelled normal-tissue volumes for pretraining (no lesion)."""
    from usfmae_core.data import phantom

    labelled, unlabelled = work / "labelled", work / "unlabelled"
    if (work / "data.done").exists():
        return labelled, unlabelled
    rng = np.random.default_rng(seed)
    shape, spacing = (32, 64, 64), (1.0, 0.5, 0.5)
    lesions = {}
    for name in ("lesion", "none"):
        for i in range(n_per_class):
            vol = phantom.make_volume(0, shape, rng)
            if name == "lesion":
                vol, lesions[f"{name}_{i:03d}"] = insert_lesion(vol.astype(np.float32), spacing, rng, (2.5, 4.5))
            phantom.write_volume(labelled / name / f"{name}_{i:03d}.nii.gz", np.clip(vol, 0, 255).astype(np.uint8),
                                 spacing)
    for i in range(n_unlabelled):
        phantom.write_volume(unlabelled / f"vol_{i:03d}.nii.gz", phantom.make_volume(0, shape, rng), spacing)
    (work / "lesions.json").write_text(json.dumps(lesions, indent=1))
    (work / "data.done").write_text("ok\n")
    return labelled, unlabelled


def make_trus(work: Path, data: Path, seed: int) -> Path:
    """Every TRUS volume twice (as it is, and with a synthetic lesion) + ``manifest.csv`` (path, label, group)."""
    from usfmae_core.data import phantom
    from usfmae_core.data.readers import read_ultrasound

    labelled = work / "labelled"
    manifest = labelled / "manifest.csv"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(seed)
    rows, lesions = [], {}
    for src in sorted((data / "volumes" / "trus_prostate").glob("*.nii.gz")):
        img = read_ultrasound(src)
        case = src.name.split(".")[0]
        geometry = {"origin": img.meta.get("origin"), "direction": img.meta.get("direction")}
        phantom.write_volume(labelled / "none" / f"{case}.nii.gz", img.array.astype(np.uint8), img.spacing, **geometry)
        vol, params = insert_lesion(img.array, img.spacing, rng)
        phantom.write_volume(labelled / "lesion" / f"{case}.nii.gz", np.clip(vol, 0, 255).round().astype(np.uint8),
                             img.spacing, **geometry)
        lesions[case] = params
        rows += [(f"none/{case}.nii.gz", "none", case), (f"lesion/{case}.nii.gz", "lesion", case)]
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    (work / "lesions.json").write_text(json.dumps(lesions, indent=1))
    return manifest


# ---------------------------------------------------------------------------------------------------- pipeline
def split(source: Path, work: Path, seed: int) -> Path:
    """One datalist for every arm (group-aware, stratified; 15 % validation, 30 % test)."""
    from usfmae_core.data.labelled import labelled_source_to_datalist

    path = work / "datalist.json"
    if not path.exists():
        labelled_source_to_datalist(source, path, seed=seed, val_fraction=0.15, test_fraction=0.3)
    return path


def pretrain_sources(args: argparse.Namespace, work: Path, datalist: Path, unlabelled: Path | None) -> Path:
    """The unlabelled volumes both MAEs see: ``unlabelled`` (phantom), or the clean training-split TRUS volumes plus
    the PLUS phantom volumes (no synthetic lesion, no validation or test volume)."""
    if unlabelled is not None:
        return unlabelled
    out = work / "pretrain_sources"
    if out.exists():
        return out
    out.mkdir(parents=True)
    d = json.loads(datalist.read_text())
    for it in d["training"]:
        p = Path(it["image"])
        if p.parent.name == "none":
            os.symlink(p, out / p.name)
    for p in sorted((args.data / "volumes" / "plus_phantom").glob("*.mha")):
        os.symlink(p.resolve(), out / p.name)
    return out


def pretrain(args: argparse.Namespace, work: Path, sources: Path, timings: dict) -> tuple[Path, Path]:
    """A 2D MAE (slices, ``vit_micro`` at ``--image-size``) and a 3D MAE (``--native-3d`` cubes of ``--cube``), the
    same number of steps each."""
    common = ["--preset", "vit_micro", "--patch-size", "8", "--in-channels", "1", "--max-steps", str(args.mae_steps),
              "--blr", "1.5e-3", "--warmup-steps", str(max(1, args.mae_steps // 10)), "--device", "cpu",
              "--workers", "0", "--seed", str(args.seed), "--picture-every", "0", "--ckpt-every",
              str(args.mae_steps)]
    for dims, size in ((2, args.image_size), (3, args.cube)):
        corpus, run = work / f"corpus{dims}d", work / f"mae{dims}d"
        if not (corpus / "corpus.json").exists():
            extra = ["--native-3d", "--volume-size", str(size)] if dims == 3 else []
            timings[f"prepare_{dims}d"] = usfmae(["prepare", str(sources), "--out", str(corpus), "--image-size",
                                                  str(args.image_size), "--workers", "1", "--no-progress", *extra],
                                                 work / f"prepare{dims}d.log")
        if not (run / "model.pt").exists():
            timings[f"mae_{dims}d"] = usfmae(["pretrain", "--corpus", str(corpus), "--out", str(run), "--img-size",
                                              str(size), "--spatial-dims", str(dims), "--batch-size",
                                              str(64 if dims == 2 else 16), *common], work / f"mae{dims}d.log")
    return work / "mae2d" / "model.pt", work / "mae3d" / "model.pt"


def finetune_args(arm: str, args: argparse.Namespace, mae2d: Path, mae3d: Path) -> list[str]:
    vit = ["--preset", "vit_micro", "--patch-size", "8", "--in-channels", "1"]
    cube = ["--volume-model", "3d", "--image-size", str(args.cube)]
    return {
        "3d_vit_mae3d": [*cube, "--init", str(mae3d)],
        "mil_mae2d": ["--volume-model", "mil", "--init", str(mae2d), "--max-slices", str(args.max_slices)],
        "2d_mae2d": ["--init", str(mae2d), "--batch-size", str(4 * args.batch_size)],
        "3d_vit_scratch": [*cube, *vit],
        "3d_resnet18_scratch": [*cube, "--arch", "resnet", "--depth", "18", "--in-channels", "1"],
    }[arm]


def arm_epochs(arm: str, args: argparse.Namespace) -> int:
    """``--epochs``, or the arm's own budget from ``--arm-epochs ARM=N`` (a costly arm on a CPU)."""
    return int(dict(a.split("=", 1) for a in args.arm_epochs).get(arm, args.epochs))


def run_arm(arm: str, args: argparse.Namespace, work: Path, datalist: Path, mae2d: Path, mae3d: Path,
            timings: dict) -> Path:
    run = work / f"ft_{arm}"
    if not (run / "metrics.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        epochs = arm_epochs(arm, args)
        argv = ["finetune", "--data", str(datalist), "--out", str(run), "--epochs", str(epochs),
                "--warmup-epochs", str(max(1, epochs // 10)), "--patience", "0", "--batch-size",
                str(args.batch_size), "--lr", str(args.lr), "--device", "cpu", "--seed", str(args.seed),
                "--workers", "0", "--no-tensorboard", *finetune_args(arm, args, mae2d, mae3d)]
        timings[f"finetune_{arm}"] = usfmae(argv, work / f"ft_{arm}.log")
    return run


def test_predictions(arm: str, run: Path, work: Path, datalist: Path, timings: dict
                     ) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Test-split probabilities ``{row name: (y, probs, sources)}``: ``usfmae evaluate`` for volume models, ``usfmae
    predict`` with each aggregate for the 2D model."""
    from usfmae_core.workflows.evaluate import load_predictions

    d = json.loads(datalist.read_text())
    classes = [str(c) for c in d["classes"]]
    out: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    if arm != "2d_mae2d":
        ev = work / f"eval_{arm}"
        if not (ev / "metrics.json").exists():
            timings[f"evaluate_{arm}"] = usfmae(["evaluate", "--model", str(run / "model.pt"), "--data",
                                                 str(datalist), "--out", str(ev), "--device", "cpu",
                                                 "--bootstrap", "0"], work / f"eval_{arm}.log")
        images, y, p, names = load_predictions(ev)
        order = [names.index(c) for c in classes]
        out[arm] = (y if names == classes else np.array([classes.index(names[i]) for i in y]), p[:, order], images)
        return out
    test = work / "test_images.json"
    test.write_text(json.dumps({"test": [{"image": it["image"]} for it in d["test"]]}))
    label = {str(Path(it["image"])): classes[int(it["label"])] for it in d["test"]}
    for how in ("mean", "max", "topk"):
        pred = work / f"predict_{arm}_{how}"
        if not (pred / "summary.csv").exists():
            timings[f"predict_{arm}_{how}"] = usfmae(["predict", str(run / "model.pt"), str(test), "--out",
                                                      str(pred), "--device", "cpu", "--aggregate", how,
                                                      "--normal-class", "none"], work / f"predict_{how}.log")
        with open(pred / "summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        y = np.array([classes.index(label[str(Path(r["source"]))]) for r in rows])
        p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        out[f"{arm}_{how}"] = (y, p, [r["source"] for r in rows])
    return out


def epoch_seconds(run: Path) -> float:
    """Mean wall time of one training epoch (training + validation), from ``history.csv``'s cumulative time."""
    with open(run / "history.csv", newline="") as f:
        t = [float(r["time_s"]) for r in csv.DictReader(f)]
    return float(np.mean(np.diff([0.0, *t])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=("phantom", "trus"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="../shared/data (trus)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (data, corpora, runs)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/volumes_<dataset>)")
    ap.add_argument("--n-per-class", type=int, default=50, help="phantom volumes per class (default 50)")
    ap.add_argument("--image-size", type=int, default=64, help="2D slice size of the 2D MAE / MIL / 2D arm")
    ap.add_argument("--cube", type=int, default=48, help="cube side of the 3D arms and the 3D MAE")
    ap.add_argument("--mae-steps", type=int, default=400, help="pretraining steps of each MAE")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8, help="volumes per step (the 2D arm: 4x as many slices)")
    ap.add_argument("--arm-epochs", nargs="+", default=[], metavar="ARM=N",
                    help="a smaller epoch budget for some arms (e.g. 3d_resnet18_scratch=10); stated in the results")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-slices", type=int, default=16, help="MIL: slices per volume per training step")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args(argv)
    for a in args.arm_epochs:
        name, _, n = a.partition("=")
        if name not in ARMS or not n.isdigit() or int(n) < 1:
            ap.error(f"--arm-epochs {a}: expected ARM=N with ARM one of {', '.join(ARMS)} and N >= 1")

    import torch

    from usfmae_core.workflows import metrics as M

    work = args.work / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or REPO / "benchmarks" / "results" / f"volumes_{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings: dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    t0 = time.monotonic()
    if args.dataset == "phantom":
        source, unlabelled = make_phantom(work, args.n_per_class, 40, args.seed)
    else:
        source, unlabelled = make_trus(work, args.data, args.seed), None
    datalist = split(source, work, args.seed)
    sources = pretrain_sources(args, work, datalist, unlabelled)
    try:
        mae2d, mae3d = pretrain(args, work, sources, timings)
        rows: dict[str, dict[str, Any]] = {}
        preds: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        for arm in args.arms:
            run = run_arm(arm, args, work, datalist, mae2d, mae3d, timings)
            timings_path.write_text(json.dumps(timings, indent=1))
            m = json.loads((run / "metrics.json").read_text())
            for name, (y, p, src) in test_predictions(arm, run, work, datalist, timings).items():
                preds[name] = (y, p, src)
                res = M.classification_metrics(y, p, CLASSES)
                ci = M.bootstrap_intervals(y, p, args.bootstrap, args.seed)
                rows[name] = {"arm": arm, "auc": res["auc_macro"], "auc_ci95": ci["auc_macro"],
                              "f1_macro": res["f1_macro"], "f1_ci95": ci["f1_macro"], "n_test": len(y),
                              "epochs": arm_epochs(arm, args), "best_epoch": m["best_epoch"],
                              "epoch_s": round(epoch_seconds(run), 2),
                              "peak_rss_mb": (timings.get(f"finetune_{arm}") or {}).get("peak_rss_mb"),
                              "train_volumes": m["num_images"]["training"]}
            timings_path.write_text(json.dumps(timings, indent=1))
    finally:
        timings_path.write_text(json.dumps(timings, indent=1))

    # paired differences on the same test volumes
    def aligned(name: str) -> tuple[np.ndarray, np.ndarray]:
        y, p, src = preds[name]
        order = np.argsort([str(Path(s)) for s in src])
        return y[order], p[order]

    pairs = [("mil_mae2d", "2d_mae2d_mean"), ("3d_vit_mae3d", "3d_vit_scratch"), ("mil_mae2d", "3d_vit_mae3d"),
             ("3d_resnet18_scratch", "3d_vit_mae3d"), ("2d_mae2d_max", "2d_mae2d_mean")]
    diffs = {}
    for a, b in pairs:
        if a in preds and b in preds:
            d = M.bootstrap_mean_difference([aligned(a)], [aligned(b)], args.bootstrap, args.seed,
                                            keys=("auc_macro", "f1_macro"))
            diffs[f"{a} - {b}"] = d
    report = {"dataset": args.dataset, "labels": "synthetic lesion inserted into real volumes" if
              args.dataset == "trus" else "phantom lesion / none", "rows": rows, "paired_differences": diffs,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "timings": timings, "cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
              "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
              "torch": torch.__version__, "total_s": round(time.monotonic() - t0),
              "finished_load": load(), "command": "python benchmarks/volume_classification.py " +
              " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(r: dict[str, Any]) -> str:
    def ci(v: float, c: list[float]) -> str:
        return f"{v:.3f} [{c[0]:.2f}, {c[1]:.2f}]"

    lines = [(f"Dataset `{r['dataset']}` ({r['labels']}); {next(iter(r['rows'].values()))['n_test']} test volumes; "
             f"CPU {r['cpu_model']}, {r['threads']} threads."), "",
             "| arm | test AUC [95% CI] | test macro-F1 [95% CI] | epochs | best epoch | s / epoch | peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        label = ARMS.get(name) or f"{ARMS['2d_mae2d'].split(',')[0]}, {name.rsplit('_', 1)[1]} of slices"
        epochs = row.get("epochs", r["settings"]["epochs"])
        lines.append(f"| {label} | {ci(row['auc'], row['auc_ci95'])} | {ci(row['f1_macro'], row['f1_ci95'])} | "
                     f"{epochs} | {row['best_epoch']} | {row['epoch_s']} | {row['peak_rss_mb']} |")
    lines += ["", "| paired difference (same test volumes) | AUC [95% CI] | macro-F1 [95% CI] |", "|---|---|---|"]
    for name, d in r["paired_differences"].items():
        a, f = d["auc_macro"], d["f1_macro"]
        lines.append(f"| {name} | {a['mean']:+.3f} [{a['ci95'][0]:+.2f}, {a['ci95'][1]:+.2f}] | "
                     f"{f['mean']:+.3f} [{f['ci95'][0]:+.2f}, {f['ci95'][1]:+.2f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
