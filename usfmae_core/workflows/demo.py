"""``usfmae demo``: the whole toolkit on built-in data, in a few minutes on a laptop CPU.

1. writes synthetic B-mode ultrasound (:mod:`usfmae_core.data.phantom`: images, volumes and cine clips in mixed
   formats) plus the real SonoSite cine that pydicom ships, and prepares a pretraining corpus from them;
2. pretrains a small MAE on that corpus;
3. fine-tunes two classifiers on a labelled phantom set (normal / cyst / mass) with the same budget: one from the
   pretrained MAE, one from scratch, and evaluates both on a held-out test split;
4. classifies a 3D phantom volume slice by slice and reconstructs masked images;
5. fine-tunes a volume classifier (attention MIL over slices, from the same MAE) on phantom volumes with one label
   each (mass / normal) and compares it on held-out volumes with the 2D classifier's mean of slices;
6. writes ``report.md`` (metrics, pictures) and says plainly whether pretraining helped at this scale.

Every step goes through the same commands a user runs (``usfmae prepare/pretrain/finetune/evaluate/predict/
reconstruct``), so the demo also shows their output folders.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# Sizes that keep the demo at about 3 minutes on 2 CPU cores; --scale multiplies the data and the budgets.
IMAGE_SIZE = 64
PATCH = 8
PRETRAIN_STEPS = 300  # MAE steps of batch 64
VIT_EPOCHS = 50  # fine-tuning epochs of each ViT arm (same budget with and without pretraining)
CNN_EPOCHS = 15  # the ResNet-10 reference arm
BATCH = 32  # fine-tuning batch
# Fine-tuning arms: run folder suffix -> label in the report.
ARMS = {"pretrained": "MAE-pretrained ViT", "scratch": "ViT from scratch",
        "resnet": "ResNet-10 from scratch (reference)"}


def _run(argv: list[str]) -> None:
    """Run one ``usfmae`` command in-process (errors propagate as :class:`UsfmaeError`)."""
    from usfmae_core.cli import build_parser

    print(f"\n$ usfmae {' '.join(argv)}", flush=True)
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    if rc:
        raise RuntimeError(f"usfmae {argv[0]} exited with {rc}")


class Stages:
    """Wall time of each part of the demo, said on the console as each ends and listed in the report (a part added
    later, e.g. another arm, is timed by wrapping it in ``with stages("name"):``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.load_start = _load_average()
        self.cpu_start = time.process_time()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0
            print(f"demo: {name} took {self.seconds[name]:.0f} s", flush=True)

    def summary(self) -> str:
        """``"data 9 s, pretraining 41 s, ...; 4.1 CPU-minutes; load average 1.1 -> 1.9"``: on a machine shared with
        other work (the load average says so) the wall times stretch, the CPU time much less."""
        cpu = f"; {(time.process_time() - self.cpu_start) / 60:.1f} CPU-minutes"
        load = f"; load average {self.load_start:.1f} -> {_load_average():.1f}" if self.load_start is not None else ""
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + cpu + load


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def _shipped_ultrasound() -> list[Path]:
    """Real ultrasound that an installed dependency ships: pydicom's SonoSite cine (30 frames, YBR colour)."""
    try:
        import pydicom.data
    except ImportError:
        return []
    path = Path(pydicom.data.__file__).parent / "test_files" / "examples_ybr_color.dcm"
    return [path] if path.is_file() else []


def _metrics(eval_dir: Path) -> dict[str, Any]:
    return json.loads((eval_dir / "metrics.json").read_text())


def _fmt(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    ci = (m.get("intervals") or {}).get(key)
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def run_demo(out: Path, device: str = "auto", scale: float = 1.0, seed: int = 0) -> Path:
    """Run the demo into ``out`` and return the report's path. A previous demo in ``out`` is replaced (its own
    files only); a folder holding another command's run is refused (:mod:`usfmae_core.runs`)."""
    from usfmae_core.runs import RunFolder

    with RunFolder(out, "demo", replace_own=True, config={"device": device, "scale": scale, "seed": seed}) as run:
        report = _run_demo(run.path, device, scale, seed)
        run.finish()
    return report


def _run_demo(out: Path, device: str, scale: float, seed: int) -> Path:
    from usfmae_core.data import phantom

    t0 = time.monotonic()
    stages = Stages()
    data = out / "data"
    n = lambda k: max(1, round(k * scale))  # noqa: E731

    # 1. data: unlabelled mixed-format sources (+ shipped real cine) -> corpus; labelled phantom set
    with stages("data"):
        sources = phantom.write_unlabelled_corpus_sources(data / "unlabelled", n_images=n(150), n_volumes=n(6),
                                                          n_cines=n(6), seed=seed, size=96)
        extra = _shipped_ultrasound()
        _run(["prepare", str(sources), *map(str, extra), "--out", str(out / "corpus"), "--image-size",
              str(IMAGE_SIZE), "--workers", "2"])
        labelled = phantom.write_labelled_folder(data / "labelled", n_per_class=n(100), size=96, seed=seed + 1)
        volume_path = phantom.write_volume(data / "volume_mass.nii.gz",
                                           phantom.make_volume(2, (24, 96, 96), np.random.default_rng(seed + 2)),
                                           spacing=(1.0, 0.4, 0.4))

    # 2. pretraining
    with stages("pretraining"):
        _run(["pretrain", "--corpus", str(out / "corpus"), "--out", str(out / "pretrain"), "--preset", "vit_micro",
              "--img-size", str(IMAGE_SIZE), "--patch-size", str(PATCH), "--in-channels", "1",
              "--max-steps", str(n(PRETRAIN_STEPS)), "--batch-size", "64", "--blr", "1.5e-3", "--warmup-steps",
              str(n(PRETRAIN_STEPS // 10)), "--ckpt-every", "100", "--picture-every", str(n(PRETRAIN_STEPS // 2)),
              "--device", device, "--seed", str(seed),
              "--workers", "0"])
    mae = out / "pretrain" / "model.pt"

    # 3. fine-tuning with and without pretraining, same budget and split, plus a small CNN as a sanity reference
    # that the task is learnable at this size; evaluation of all three on the same test split. The two ViTs run the
    # full budget without early stopping and keep their best-validation epoch; the CNN, which learns this task in
    # a few epochs and costs ~3x a ViT step here, gets fewer epochs (it is a reference, not a contender).
    common = ["--data", str(labelled), "--patience", "0", "--batch-size", str(BATCH), "--lr", "1e-3",
              "--device", device, "--seed", str(seed), "--workers", "0"]
    vit_epochs, cnn_epochs = ["--epochs", str(n(VIT_EPOCHS))], ["--epochs", str(n(CNN_EPOCHS))]
    with stages("fine-tuning"):
        _run(["finetune", *common, *vit_epochs, "--init", str(mae), "--out", str(out / "finetune_pretrained")])
        datalist = out / "finetune_pretrained" / "datalist.json"  # the same split for every arm
        common[1] = str(datalist)
        _run(["finetune", *common, *vit_epochs, "--preset", "vit_micro", "--img-size", str(IMAGE_SIZE),
              "--patch-size", str(PATCH), "--in-channels", "1", "--out", str(out / "finetune_scratch")])
        _run(["finetune", *common, *cnn_epochs, "--arch", "resnet", "--depth", "10", "--img-size", str(IMAGE_SIZE),
              "--in-channels", "1", "--out", str(out / "finetune_resnet")])
    results = {}
    with stages("evaluation"):
        for arm in ARMS:
            _run(["evaluate", "--model", str(out / f"finetune_{arm}" / "model.pt"), "--data", str(datalist),
                  "--split", "test", "--out", str(out / f"eval_{arm}"), "--device", device])
            results[arm] = _metrics(out / f"eval_{arm}")
        save_learning_curves(out, out / "learning_curves.png")

    # 4. inference on a 3D volume and reconstruction pictures
    with stages("3D volume"):
        _run(["predict", str(out / "finetune_pretrained" / "model.pt"), str(volume_path), "--out",
              str(out / "predict"), "--device", device])
    with stages("reconstructions"):
        example = min((labelled / "mass").iterdir())
        _run(["reconstruct", str(mae), str(example), "--out", str(out / "reconstruct"), "--device", device])

    # 5. one label per volume: a volume classifier against the mean of slices
    with stages("volume classifier"):
        run_volume_part(out, mae, volume_path, device, scale, seed)

    return write_report(out, results, volume_path, time.monotonic() - t0, stages)


VOLUME_SHAPE = (16, 64, 64)  # (D, H, W): slices at the MAE's 64 px, so the part costs seconds, not minutes
# The phantom's masses (radius 4-10 px at 64 px, 2-4 of 16 slices) are too faint for a MIL trained on ~20 volumes
# with one label each: it stayed at chance (AUC 0.40-0.55). Masses LESION_SCALE times larger (7-17 px, 3-8 slices)
# and 24 volumes per class are learnable within the demo's budget (benchmarks/README.md, "Demo").
LESION_SCALE = 1.8
VOLUMES_PER_CLASS = 24


def run_volume_part(out: Path, mae: Path, volume_path: Path, device: str, scale: float, seed: int) -> None:
    """The 3D part: phantom volumes with one label each (``mass``: a 3D lesion in some slices; ``normal``), an
    attention-MIL volume classifier fine-tuned from the demo's 2D MAE (``finetune --volume-model mil``) and evaluated
    on held-out volumes, the same volumes classified by the 2D classifier with the mean of slices (``predict
    --aggregate mean``), and the MIL model's attention along the slices of the demo's mass volume."""
    from usfmae_core.data import phantom

    rng = np.random.default_rng(seed + 3)
    folder = out / "data" / "volumes"
    for label, name in ((2, "mass"), (0, "normal")):
        for i in range(max(6, round(VOLUMES_PER_CLASS * scale))):
            phantom.write_volume(folder / name / f"{name}_{i:03d}.nii.gz",
                                 phantom.make_volume(label, VOLUME_SHAPE, rng, lesion_scale=LESION_SCALE),
                                 spacing=(1.0, 0.4, 0.4))
    run = out / "finetune_volume"
    _run(["finetune", "--data", str(folder), "--volume-model", "mil", "--init", str(mae), "--max-slices", "8",
          "--epochs", str(max(2, round(30 * scale))), "--warmup-epochs", "2", "--patience", "0",
          "--batch-size", "2", "--lr", "1e-3", "--test-fraction", "0.3", "--device", device, "--seed", str(seed),
          "--workers", "0", "--out", str(run)])
    _run(["evaluate", "--model", str(run / "model.pt"), "--data", str(run / "datalist.json"), "--split", "test",
          "--out", str(out / "eval_volume"), "--device", device])
    test = json.loads((run / "datalist.json").read_text())["test"]
    test_list = out / "data" / "test_volumes.json"  # the held-out volumes, as a datalist predict reads
    test_list.write_text(json.dumps({"test": [{"image": it["image"]} for it in test]}, indent=1))
    _run(["predict", str(out / "finetune_pretrained" / "model.pt"), str(test_list), "--aggregate", "mean",
          "--out", str(out / "predict_volumes_mean"), "--device", device])
    _run(["predict", str(run / "model.pt"), str(volume_path), "--out", str(out / "predict_volume_mil"),
          "--device", device])


def volume_comparison(out: Path) -> tuple[list[str], Path]:
    """Report lines comparing, on the held-out phantom volumes, the volume classifier's result with the 2D
    classifier's mean of slices ("lesion found" = any class but normal), and a plot of the MIL attention along the
    slices of the demo's mass volume."""
    from usfmae_core.workflows.pictures import save_curves
    from usfmae_core.workflows.predict import NORMAL_CLASS_NAMES

    def is_lesion(label: str) -> bool:
        return label.strip().lower() not in NORMAL_CLASS_NAMES

    evaluated = _csv(out / "eval_volume" / "predictions.csv")
    truth = {Path(r["image"]).name: r["true"] for r in evaluated}
    mil = {Path(r["image"]).name: r["predicted"] for r in evaluated}
    mean = {Path(r["source"]).name: r["label"] for r in _csv(out / "predict_volumes_mean" / "summary.csv")}
    lines = [("| approach | held-out volumes right (lesion / no lesion) | mass volumes found | normal volumes called "
             "normal |"), "|---|---|---|---|"]
    for label, pred in (("attention MIL volume classifier (one result per volume)", mil),
                        ("2D classifier, mean of slices (`predict --aggregate mean`)", mean)):
        right = sum(is_lesion(pred[k]) == is_lesion(t) for k, t in truth.items())
        mass = [k for k, t in truth.items() if is_lesion(t)]
        normal = [k for k, t in truth.items() if not is_lesion(t)]
        lines.append(f"| {label} | {right} / {len(truth)} | {sum(is_lesion(pred[k]) for k in mass)} / {len(mass)} | "
                     f"{sum(not is_lesion(pred[k]) for k in normal)} / {len(normal)} |")
    rows = _csv(out / "predict_volume_mil" / "attention.csv")
    plot = save_curves({"": ([int(r["index"]) for r in rows], [float(r["attention"]) for r in rows])},
                       out / "predict_volume_mil" / "attention.png", title="Attention MIL: weight of each slice",
                       ylabel="attention", xlabel="slice")
    return lines, plot


def volume_section(out: Path, volume_path: Path, rel: Any) -> list[str]:
    """The report's section on the volume classifier (step 5)."""
    table, attention_plot = volume_comparison(out)
    m = _metrics(out / "eval_volume")
    mil = json.loads((out / "predict_volume_mil" / "predictions.json").read_text())["results"][0]
    probs = ", ".join(f"{k[2:]} {v:.2f}" for k, v in mil.items() if k.startswith("p_"))
    return ["## One label per volume: a volume classifier", "",
            ("A focal lesion fills a few slices of a volume, so the mean over all slices can outvote it. "
            "`usfmae finetune --volume-model mil` trains one result per volume instead: the same 2D encoder, "
            "initialised from the MAE, reads every slice and a learned attention pools them (attention-based "
            f"multiple-instance learning). Trained here on the training part of {_count(out)} phantom volumes "
            f"({VOLUME_SHAPE[0]} slices of {VOLUME_SHAPE[1]}x{VOLUME_SHAPE[2]}, one label each: mass / normal; "
            f"the masses {LESION_SCALE:g}x the radius of the 2D phantom's, so that they show at 64 px) "
            f"and tested on its {m['n']} held-out volumes, beside the 2D classifier above on the same volumes:"), "",
            *table, "",
            (f"Volume classifier on its {m['n']} test volumes: accuracy {_fmt(m, 'accuracy')}, macro-F1 "
            f"{_fmt(m, 'f1_macro')}, AUC {_fmt(m, 'auc_macro')} (95% bootstrap intervals; tiny test set). "
            f"On `{volume_path.name}` it says **{mil.get('label')}** ({probs}); the attention along its slices shows "
            "which slices drove that result (`predict_volume_mil/attention.csv`):"), "",
            f"![attention along the slices]({rel(attention_plot)})", ""]


def _count(out: Path) -> int:
    return sum(1 for _ in (out / "data" / "volumes").rglob("*.nii.gz"))


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_learning_curves(out: Path, path: Path) -> Path:
    """Validation macro-F1 per epoch of the fine-tuning arms (from each run's ``history.csv``) in one PNG."""
    import csv

    from usfmae_core.workflows.pictures import save_curves

    series = {}
    for arm, label in ARMS.items():
        with open(out / f"finetune_{arm}" / "history.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_f1_macro")]
        series[label] = ([int(r["epoch"]) for r in rows], [float(r["val_f1_macro"]) for r in rows])
    return save_curves(series, path, title="Fine-tuning: validation macro-F1", ylabel="validation macro-F1",
                       xlabel="epoch")


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    runs: list[list[int]] = []
    for i in sorted(idx):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def volume_findings(out: Path) -> tuple[str, Path]:
    """A sentence on the predicted volume's slices and a plot of its per-slice class probabilities."""
    import csv

    from usfmae_core.workflows.pictures import save_curves

    with open(out / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    index = [int(r["index"]) for r in rows]
    plot = save_curves({c: (index, [float(r[f"p_{c}"]) for r in rows]) for c in classes},
                       out / "predict" / "slice_probabilities.png", title="Per-slice class probabilities",
                       ylabel="probability", xlabel="slice")
    counts = {c: [i for i, r in zip(index, rows, strict=True) if r["pred"] == c] for c in classes}
    parts = [f"{c} on {len(v)} ({_ranges(v)})" for c, v in counts.items() if v]
    return f"slices predicted {', '.join(parts)} of {len(rows)}", plot


def pretraining_verdict(out: Path, results: dict[str, dict], n_boot: int = 2000) -> str:
    """One honest sentence on whether the MAE-initialised ViT beat the same ViT from scratch on the test split,
    judged by the paired bootstrap 95 % interval of the macro-F1 difference (same test images resampled)."""
    from usfmae_core.workflows.evaluate import load_predictions
    from usfmae_core.workflows.metrics import bootstrap_mean_difference

    pre, scr, cnn = results["pretrained"], results["scratch"], results["resnet"]
    chance = 1.0 / len(pre.get("classes") or [0, 0, 0])
    if max(pre["balanced_accuracy"], scr["balanced_accuracy"]) < chance + 0.1:
        return (f"Neither ViT learned this task at this scale (balanced accuracy {pre['balanced_accuracy']:.2f} "
                f"pretrained, {scr['balanced_accuracy']:.2f} from scratch; chance {chance:.2f}), so this run cannot "
                f"show whether pretraining helps. The small CNN reached {cnn['balanced_accuracy']:.2f} on the same "
                "split: the task is learnable, but ViTs need more images and epochs than this run had. Rerun with a "
                "larger `--scale` (e.g. 4 on a GPU); benchmarks/README.md has the real-data study.")
    images_pre, y_pre, p_pre, _ = load_predictions(out / "eval_pretrained")
    images_scr, y_scr, p_scr, _ = load_predictions(out / "eval_scratch")
    idx = [images_pre.index(im) for im in images_scr]  # both arms on the same test images, in the same order
    d = bootstrap_mean_difference([(y_pre[idx], p_pre[idx])], [(y_scr, p_scr)], n_boot, keys=("f1_macro",))["f1_macro"]
    gap, (lo, hi) = d["mean"], d["ci95"]
    scores = (f"macro-F1 {pre['f1_macro']:.3f} pretrained vs {scr['f1_macro']:.3f} from scratch "
              f"(difference {gap:+.3f}, paired bootstrap 95% CI [{lo:+.3f}, {hi:+.3f}], {pre['n']} test images)")
    if lo > 0:
        return f"Pretraining helped here: {scores}, with the same fine-tuning budget."
    if hi < 0:
        return (f"Pretraining did not help at this scale: {scores}. A few minutes of CPU pretraining on a few hundred "
                "synthetic frames is far from the paper's 370k images; see benchmarks/README.md.")
    return (f"No clear difference at this scale: {scores}; the interval includes 0, so the test set is too small to "
            "tell. benchmarks/README.md has the real-data study.")


def write_report(out: Path, results: dict[str, dict], volume_path: Path, seconds: float,
                 stages: Stages | None = None) -> Path:
    """``report.md``: what ran, the arms' test metrics, the verdict, learning curves, the volume's classification
    and reconstruction pictures."""
    verdict = pretraining_verdict(out, results)
    pre = results["pretrained"]
    vol = json.loads((out / "predict" / "predictions.json").read_text())["results"][0]
    slices, slice_plot = volume_findings(out)
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    pictures = sorted((out / "pretrain" / "pictures").glob("*.png"))
    recon = sorted((out / "reconstruct").glob("*.png"))
    runs = {arm: json.loads((out / f"finetune_{arm}" / "metrics.json").read_text()) for arm in ARMS}
    epochs = {arm: r.get("best_epoch") for arm, r in runs.items()}
    lines = [
        "# usfmae demo report", "",
        (f"Ran in {seconds / 60:.1f} min{f' ({stages.summary()})' if stages else ''}. Data: synthetic B-mode "
        "phantoms (normal / cyst / mass) and pydicom's SonoSite cine; model: vit_micro MAE, 64x64 px, patch 8, "
        "1 channel."), "",
        "## Does pretraining help?", "", verdict, "",
        "| arm | best epoch | accuracy | balanced acc. | macro-F1 [95% CI] | AUC (ovr) |", "|---|---|---|---|---|---|",
    ]
    for arm, label in ARMS.items():
        m = results[arm]
        lines.append(f"| {label} | {epochs[arm]} | {_fmt(m, 'accuracy')} | {_fmt(m, 'balanced_accuracy')} | "
                     f"{_fmt(m, 'f1_macro')} | {_fmt(m, 'auc_macro')} |")
    lines += ["", (f"Test split: {pre['n']} images; 95% bootstrap intervals in brackets. Each arm keeps the epoch with "
              f"the best validation macro-F1; the two ViTs ran {runs['pretrained'].get('epochs_run')} epochs each "
              f"(the same budget), the ResNet-10 reference {runs['resnet'].get('epochs_run')}."), "",
              "![learning curves](learning_curves.png)", "",
              "Confusion matrix (pretrained arm):", "", "![confusion](eval_pretrained/confusion_matrix.png)", "",
              "## A 3D volume, classified slice by slice", "",
              (f"`{volume_path.name}` is a phantom volume with a mass in its middle slices, classified by the "
              f"MAE-pretrained ViT: {slices}. The volume-level label is the mean probability over all "
              f"{vol.get('n_frames')} slices, **{vol.get('label')}**; for a focal lesion read the per-slice "
              "probabilities (`predict/predictions.csv`)."), "",
              f"![slice probabilities]({rel(slice_plot)})", ""]
    lines += volume_section(out, volume_path, rel)
    lines += ["## Reconstructions", ""]
    lines += [f"![reconstruction]({rel(p)})" for p in (recon[:1] + pictures[-1:])]
    lines += ["", "Every step's own output folder (config, logs, metrics, pictures) is beside this report."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"\n{verdict}\ndemo: {seconds / 60:.1f} min{f' ({stages.summary()})' if stages else ''}\nreport: {report}")
    return report
