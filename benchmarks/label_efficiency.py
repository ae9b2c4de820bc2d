"""Label-efficiency benchmark: does MAE pretraining on unlabelled ultrasound beat training from scratch?

Protocol (every step drives the engine's own workflows in-process through ``usfmae_core.cli``; nothing here trains
or scores a model by itself):

1. **Labelled data** (``--labelled``: class folders, CSV or datalist JSON) is deduplicated by decoded pixels and
   near-duplicate thumbnails (:func:`usfmae_core.data.labelled.deduplicate`: exact copies with conflicting labels are
   dropped, near-copies share a group), then split once, group-aware and stratified, into a held-out **test** part
   (15 %) and ``--folds`` folds over the rest (:func:`~usfmae_core.data.labelled.make_splits`, seed
   ``--split-seed``), saved as ``WORK/datalist.json`` with the removal report. Fold ``i`` validates on part ``i`` and
   trains on the others (:func:`usfmae_core.workflows.finetune.kfold_datalists`); the test part is never used for
   any choice.
2. **Unlabelled corpus** (``--unlabelled PATH...``; with ``--unlabelled-from-labelled`` also the labelled images
   *outside the test part*, without labels) is prepared with ``usfmae prepare`` into ``WORK/corpus``.
3. **Pretraining**: ``usfmae pretrain`` of ``--preset`` on the corpus for ``--pretrain-steps`` steps
   (``WORK/pretrain/model.pt``), unless ``--init`` gives an MAE checkpoint (e.g. imported USF-MAE weights).
4. **Arms**, each ``usfmae finetune`` with the same optimiser-step budget ``--steps`` (epochs =
   min(``--max-epochs``, ceil(steps / steps per epoch)), so every arm gets the same number of updates at a given label
   fraction, and every fraction the same unless capped; the model with the best *validation* macro-F1 is kept):
   ``vit_scratch`` (ViT ``--preset`` from random init), ``vit_mae`` (the same ViT from the MAE), ``cnn_scratch``
   (MONAI ``--cnn`` / ``--cnn-depth`` from random init), ``linear_probe`` (frozen MAE encoder + linear head), at
   each ``--fractions`` of the fold's training part (:func:`~usfmae_core.data.labelled.subsample_fraction`, seeded
   by the run seed), for every fold and every ``--seeds`` entry.
   **Continued pretraining** arms (the same ViT, fine-tuned the same way, from the MAE of step 3 pretrained
   ``--continue-steps`` more steps with a restarted schedule, ``usfmae pretrain --init``): ``vit_cont_target`` on the
   fold's own *training* images without labels (``usfmae prepare --labelled WORK/folds/fold_i.json``: that fold's
   validation images and the test part never enter it; one corpus and one MAE per fold), ``vit_cont_general`` on the
   general corpus of step 2 (the same budget spent on more of the same pretraining; one MAE for all folds), and
   ``vit_cont_mix`` on both mixed (``--corpus general:1-w target:w``, ``w = --continue-mix-weight``).
5. **Evaluation**: ``usfmae evaluate`` of each run's ``model.pt`` on the held-out test part (its own bootstrap 95 %
   intervals); the table reports test macro-F1, accuracy and macro AUC as the mean over the (seed x fold) runs with a
   percentile bootstrap over the test images that resamples them jointly for every run and arm (metrics by
   :mod:`usfmae_core.workflows.metrics` on ``evaluate``'s predictions), the SD / t-interval across runs, and the
   paired difference of each arm to the reference arms ``vit_scratch``, ``cnn_scratch``, ``vit_mae`` and
   ``vit_cont_general`` that ran (same folds, seeds and resampled images).

Optional hyper-parameter selection (``--select-lr``): for each arm, fine-tune fold 0 at fraction 1 with each
candidate learning rate and keep the one with the best validation macro-F1 (test never looked at).

Outputs in ``--out`` (small files only): ``results.json`` (protocol, commands, data reports, every run, summaries),
``results.md`` (tables), ``label_efficiency.png`` (macro-F1 vs label fraction, one line per arm, 95 % CI bars),
``commands.txt``. Large files (corpus, checkpoints, run folders) go to ``--work``. Re-running with the same
``--work`` skips finished steps, so an interrupted run continues; ``--time-budget-min`` stops launching new runs
after that many minutes and records the results as partial.

CPU example (2 cores, about an hour; the recorded run, see benchmarks/README.md)::

    D=../shared/data
    python benchmarks/label_efficiency.py --labelled $D/busi_256 \\
        --unlabelled $D/pocus_lung $D/volumes $D/sequences $D/dicom_us \\
        --work /tmp/le/run --out benchmarks/results/label_efficiency \\
        --select-lr 5e-4 2e-3 --probe-select-lr 5e-3 5e-2

GPU, paper scale::

    python benchmarks/label_efficiency.py --labelled ... --unlabelled ... --preset vit_base --img-size 224 \\
        --patch-size 16 --cnn resnet --cnn-depth 50 --device cuda --precision bf16 --workers 8 --folds 5 \\
        --seeds 0 1 2 --steps 3000 --max-epochs 100 --batch-size 64 --pretrain-steps 50000 --pretrain-batch 256 \\
        --pretrain-lr 1.5e-4 --select-lr 2.5e-4 1e-3 --probe-select-lr 1e-2 1e-1 [--init usf_mae_imported.pt]

Continued in-domain pretraining (issue 17; the recorded run in benchmarks/README.md)::

    python benchmarks/label_efficiency.py --labelled $D/busi_256 --unlabelled ... --work /tmp/le/cont \
        --out benchmarks/results/label_efficiency_continued --arms vit_scratch vit_mae cnn_scratch vit_cont_target \
        vit_cont_general --pretrain-steps 8000 --continue-steps 2000 --steps 1000 --max-epochs 100 \
        --select-lr 5e-4 2e-3   # the recorded run: --only-folds 0 1 and the lrs fixed by --arm-select-lr

Several processes may share one ``--work`` when they split the work by ``--arms`` or ``--only-folds`` (each with
its own ``--out``); ``--report-only --merge-from OUT...`` then writes the joint report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ARMS = ("vit_scratch", "vit_mae", "cnn_scratch", "linear_probe")
CONTINUED_ARMS = ("vit_cont_target", "vit_cont_general", "vit_cont_mix")
ALL_ARMS = ARMS + CONTINUED_ARMS
MAE_ARMS = ("vit_mae", "linear_probe") + CONTINUED_ARMS  # the arms that need the MAE of step 3
REFERENCE_ARMS = ("vit_scratch", "cnn_scratch", "vit_mae", "vit_cont_general")
ARM_LABELS = {"vit_scratch": "ViT from scratch", "vit_mae": "ViT from our MAE", "cnn_scratch": "CNN from scratch",
              "linear_probe": "linear probe on MAE", "vit_cont_target": "ViT, MAE continued on target train images",
              "vit_cont_general": "ViT, MAE continued on general corpus",
              "vit_cont_mix": "ViT, MAE continued on general + target mix"}
METRICS = ("f1_macro", "accuracy", "auc_macro", "balanced_accuracy")
TEST_FRACTION = 0.15


# ------------------------------------------------------------------------------------------------------ helpers
class Recorder:
    """Runs ``usfmae`` commands in-process and keeps their command lines (``commands.txt``) and timings."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.commands: list[dict[str, Any]] = []

    def usfmae(self, argv: Sequence[str], what: str) -> float:
        from usfmae_core.cli import build_parser

        argv = [str(a) for a in argv]
        line = "usfmae " + " ".join(shlex.quote(a) for a in argv)
        print(f"[label_efficiency] {what}: {line}", flush=True)
        t0 = time.monotonic()
        args = build_parser().parse_args(argv)
        rc = args.func(args)
        seconds = round(time.monotonic() - t0, 2)
        self.commands.append({"what": what, "command": line, "seconds": seconds})
        if rc:
            raise RuntimeError(f"{line} returned {rc}")
        (self.out / "commands.txt").write_text("\n".join(f"# {c['what']} ({c['seconds']} s)\n{c['command']}"
                                                         for c in self.commands) + "\n")
        return seconds


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj: Any) -> Path:
    from usfmae_core.workflows.common import write_json as _write
    from usfmae_core.workflows.finetune import jsonable

    return _write(path, jsonable(obj))


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample SD and the Student-t interval of the mean of ``values`` (NaNs dropped)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "ci95": [math.nan, math.nan]}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": math.nan, "ci95": [math.nan, math.nan]}
    from scipy.stats import t

    sd = float(x.std(ddof=1))
    h = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - h, mean + h]}


# --------------------------------------------------------------------------------------------------------- data
def dedup_report(datalist: dict[str, Any]) -> dict[str, Any]:
    """Counts of what deduplication removed and grouped (from the datalist's ``removed`` / ``grouped`` /
    ``unreadable``; older datalists' ``removed_duplicates`` are split into those by ``upgrade_report_keys``)."""
    from usfmae_core.data.labelled import upgrade_report_keys

    upgrade_report_keys(datalist)
    classes = list(datalist["classes"])
    items = [it for s in ("training", "validation", "test") for it in datalist.get(s) or []]
    exact = list(datalist.get("removed") or [])
    unreadable = list(datalist.get("unreadable") or [])
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        if it.get("group") is not None and str(it["group"]).startswith("near-dup"):
            groups[it["group"]].append(it)
    mixed = {g: sorted({(Path(it["image"]).name, classes[int(it["label"])]) for it in members})
             for g, members in groups.items() if len({it["label"] for it in members}) > 1}
    return {
        "images_scanned": len(items) + len(exact) + len(unreadable),
        "images_kept": len(items),
        "exact_duplicates_removed": [{"path": r["path"], "duplicate_of": r["duplicate_of"], "reason": r["reason"]}
                                     for r in exact],
        "unreadable": unreadable,
        "near_duplicate_pairs": len(datalist.get("grouped") or []),
        "near_duplicate_groups": len(groups),
        "images_in_near_duplicate_groups": sum(len(m) for m in groups.values()),
        "largest_group": max((len(m) for m in groups.values()), default=0),
        "groups_with_conflicting_labels": mixed,
        "per_class_kept": {classes[k]: v for k, v in sorted(Counter(int(it["label"]) for it in items).items())},
    }


def make_protocol_datalist(labelled: str, work: Path, folds: int, split_seed: int) -> dict[str, Any]:
    """Deduplicate + split ``labelled`` once (cached in ``WORK/datalist.json``)."""
    from usfmae_core.data.labelled import labelled_source_to_datalist, load_datalist

    path = work / "datalist.json"
    if path.exists():
        d = load_datalist(path)
        if d.get("protocol") == {"source": str(labelled), "folds": folds, "split_seed": split_seed}:
            return d
    t0 = time.monotonic()
    if Path(labelled).suffix.lower() == ".json":
        d = load_datalist(labelled)
        if len(d.get("folds") or []) != folds:
            from usfmae_core.data.labelled import make_splits

            pool = list(d.get("training") or []) + list(d.get("validation") or [])
            d["folds"] = make_splits(pool, d["classes"], 0.0, 0.0, n_folds=folds, seed=split_seed)["folds"]
    else:
        d = labelled_source_to_datalist(labelled, seed=split_seed, val_fraction=TEST_FRACTION,
                                        test_fraction=TEST_FRACTION, n_folds=folds)
    d["protocol"] = {"source": str(labelled), "folds": folds, "split_seed": split_seed}
    d["dedup_split_seconds"] = round(time.monotonic() - t0, 2)
    write_json(path, d)
    return d


def fold_datalists(datalist: dict[str, Any], work: Path, folds: int, split_seed: int) -> list[Path]:
    from usfmae_core.workflows.finetune import kfold_datalists

    paths = []
    for i, d in enumerate(kfold_datalists(datalist, folds, split_seed)):
        for key in ("removed_duplicates", "removed", "grouped", "unreadable", "masks", "ignored", "colour"):
            d.pop(key, None)
        paths.append(write_json(work / "folds" / f"fold_{i}.json", d))
    return paths


def corpus_breakdown(corpus: Path, roots: Sequence[str], pool: Path | None = None) -> dict[str, Any]:
    """Frames per unlabelled source root and kind, from the corpus manifest and report; files linked from ``pool``
    (``--unlabelled-from-labelled``; the manifest names their targets) count under ``pool``."""
    linked = {str(p.resolve()) for p in pool.iterdir()} if pool is not None and pool.is_dir() else set()
    per: Counter = Counter()
    files: dict[str, set] = defaultdict(set)
    with open(corpus / "manifest.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            src = rec["source"]
            root = str(pool) if str(Path(src).resolve()) in linked else \
                next((r for r in roots if src.startswith((str(Path(r).resolve()), str(r)))), "?")
            per[(root, rec["kind"])] += 1
            files[root].add(src)
    report = read_json(corpus / "report.json")
    return {"frames_by_source": [{"source": r, "kind": k, "frames": n} for (r, k), n in sorted(per.items())],
            "files_with_frames": {r: len(v) for r, v in files.items()},
            "report": {k: v for k, v in report.items() if k != "skipped"},
            "skipped": report.get("skipped", [])}


# ------------------------------------------------------------------------------------------------------ workflow
def prepare(rec: Recorder, args: argparse.Namespace, datalist: dict[str, Any], work: Path) -> dict[str, Any] | None:
    sources = [str(s) for s in args.unlabelled]
    if args.unlabelled_from_labelled:
        # the labelled images outside the held-out test part, as plain files (no labels)
        pool = [it["image"] for s in ("training", "validation") for it in datalist.get(s) or []]
        lst = work / "labelled_pool_files"
        lst.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(pool):
            link = lst / f"{i:06d}{Path(p).suffix}"
            if not link.exists():
                os.symlink(Path(p).resolve(), link)
        sources.append(str(lst))
    if not sources:
        return None
    corpus = work / "corpus"
    argv = ["prepare", *sources, "--out", corpus, "--image-size", args.corpus_size, "--workers", args.prepare_workers,
            "--no-progress"]
    if args.crop_sector:
        argv.append("--crop-sector")
    seconds = rec.usfmae(argv, "prepare unlabelled corpus")
    first = corpus / "report_first_call.json"  # a resumed call reports only what it added: keep the first report
    if not first.exists():
        first.write_text((corpus / "report.json").read_text())
    out = corpus_breakdown(corpus, sources, work / "labelled_pool_files")
    out["first_call_report"] = {k: v for k, v in read_json(first).items() if k != "skipped"}
    out["seconds_this_call"] = seconds
    return out


def pretrain(rec: Recorder, args: argparse.Namespace, work: Path) -> tuple[str, dict[str, Any]]:
    if args.init:
        return str(args.init), {"init": str(args.init), "pretrained_here": False}
    out = work / "pretrain"
    model = out / "model.pt"
    argv = ["pretrain", "--corpus", work / "corpus", "--out", out, "--preset", args.preset, "--img-size",
            args.img_size, "--patch-size", args.patch_size, "--in-channels", args.in_channels, "--max-steps",
            args.pretrain_steps, "--batch-size", args.pretrain_batch, "--lr", args.pretrain_lr, "--warmup-steps",
            max(1, args.pretrain_steps // 10), "--precision", args.precision, "--seed", args.seeds[0], "--device",
            args.device, "--workers", args.workers, "--ckpt-every", 200, "--picture-every", 0, "--log-every", 20,
            "--resume"]
    if not model.exists():
        rec.usfmae(argv, "MAE pretraining")
    summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    return str(model), {"pretrained_here": True, "summary": summary,
                        "command": "usfmae " + " ".join(shlex.quote(str(a)) for a in argv)}


class Continued:
    """Continued pretraining of the MAE for the ``vit_cont_*`` arms, done on first use and reused from ``--work``.

    ``target(fold)``: ``usfmae prepare --labelled WORK/folds/fold_<fold>.json`` (that fold's training images only,
    without labels; its validation images and the test part are held out and also kept out if a copy appears) into
    ``WORK/target_corpus/fold<fold>``, then ``usfmae pretrain --init MAE`` on it. ``general()``: the same budget on
    the general corpus (``WORK/corpus``). ``mix(fold)``: on both, mixed by ``--continue-mix-weight``. With
    ``launch=False`` (``--report-only`` / over the time budget) nothing is run and a missing model gives None.
    """

    def __init__(self, rec: Recorder, args: argparse.Namespace, work: Path, mae: str | None,
                 folds: Sequence[Path]) -> None:
        self.rec, self.args, self.work, self.mae, self.folds = rec, args, work, mae, folds
        self.launch = not args.report_only
        self.info: dict[str, Any] = {"runs": {}, "target_corpora": {}}

    def target_corpus(self, fold: int) -> Path | None:
        out = self.work / "target_corpus" / f"fold{fold}"
        if not (out / "manifest.jsonl").exists():
            if not self.launch:
                return None
            argv = ["prepare", "--labelled", self.folds[fold], "--out", out, "--image-size", self.args.corpus_size,
                    "--workers", self.args.prepare_workers, "--no-progress"]
            self.rec.usfmae(argv, f"prepare target corpus fold {fold} (training images only)")
        self.info["target_corpora"][f"fold{fold}"] = self.leak_check(fold, out)
        return out

    def leak_check(self, fold: int, corpus: Path) -> dict[str, Any]:
        """What entered the fold's target corpus, checked against the fold's splits (recorded in results.json)."""
        from usfmae_core.data.labelled import load_datalist

        d = load_datalist(self.folds[fold])
        split = {s: {str(Path(it["image"]).resolve()) for it in d.get(s) or []} for s in ("training", "validation",
                                                                                        "test")}
        with open(corpus / "manifest.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        sources = {r["source"] for r in records}
        report = read_json(corpus / "report.json")
        leaked = sorted(sources & (split["validation"] | split["test"]))
        if leaked:  # the protocol would be void: stop rather than report numbers
            raise SystemExit(f"label_efficiency: held-out images in {corpus}: {leaked[:3]}")
        return {"corpus": str(corpus), "frames": len(records),
                "training_images": len(split["training"]), "images_in_corpus": len(sources),
                "training_images_not_in_corpus": len(split["training"] - sources),
                "validation_or_test_images_in_corpus": len(leaked), "held_out": {s: len(split[s]) for s in
                                                                                 ("validation", "test")},
                "dropped": {k: report.get(k) for k in ("duplicates_removed", "empty_frames_skipped")},
                "skipped": report.get("skipped", [])}

    def _pretrain(self, name: str, corpus: list[str]) -> str | None:
        a = self.args
        out = self.work / "continue" / name
        model = out / "model.pt"
        if not model.exists():
            if not self.launch:
                return None
            argv = ["pretrain", "--corpus", *corpus, "--init", self.mae, "--out", out, "--max-steps",
                    a.continue_steps, "--batch-size", a.continue_batch or a.pretrain_batch, "--lr",
                    a.continue_lr or a.pretrain_lr, "--warmup-steps", max(1, a.continue_steps // 10), "--precision",
                    a.precision, "--seed", a.seeds[0], "--device", a.device, "--workers", a.workers, "--ckpt-every",
                    200, "--picture-every", 0, "--log-every", 20, "--resume"]
            self.rec.usfmae(argv, f"continued MAE pretraining {name}")
        summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
        self.info["runs"][name] = {"corpus": corpus, "model": str(model), "summary": summary}
        return str(model)

    def general(self) -> str | None:
        return self._pretrain("general", [str(self.work / "corpus")])

    def target(self, fold: int) -> str | None:
        corpus = self.target_corpus(fold)
        return None if corpus is None else self._pretrain(f"target_fold{fold}", [str(corpus)])

    def mix(self, fold: int) -> str | None:
        corpus = self.target_corpus(fold)
        w = self.args.continue_mix_weight
        return None if corpus is None else self._pretrain(
            f"mix_fold{fold}", [f"{self.work / 'corpus'}:{1 - w:g}", f"{corpus}:{w:g}"])


def arm_argv(arm: str, args: argparse.Namespace, mae: str | None) -> list[str]:
    if arm == "vit_scratch":
        return ["--preset", args.preset, "--image-size", args.img_size, "--patch-size", args.patch_size,
                "--in-channels", args.in_channels]
    if arm == "vit_mae" or arm in CONTINUED_ARMS:
        return ["--init", mae, "--image-size", args.img_size]
    if arm == "cnn_scratch":
        return ["--arch", args.cnn, "--depth", args.cnn_depth, "--image-size", args.img_size,
                "--in-channels", args.in_channels]
    if arm == "linear_probe":
        return ["--init", mae, "--linear-probe", "--image-size", args.img_size]
    raise ValueError(arm)


def n_train(fold_json: Path, fraction: float, seed: int) -> int:
    from usfmae_core.data.labelled import load_datalist, subsample_fraction

    train = load_datalist(fold_json)["training"]
    return len(train) if fraction >= 1 else len(subsample_fraction(train, fraction, seed))


def epochs_for(n: int, args: argparse.Namespace) -> int:
    """Epochs giving about ``--steps`` optimiser steps (a last batch of one sample is dropped by the loader), at
    most ``--max-epochs`` (validation runs every epoch, so tiny fractions would otherwise cost mostly validation)."""
    bs = min(args.batch_size, n)
    per_epoch = max(1, n // bs + (1 if n % bs > 1 else 0))
    return max(1, min(args.max_epochs, math.ceil(args.steps / per_epoch)))


def finetune_and_evaluate(rec: Recorder, args: argparse.Namespace, arm: str, mae: str | None, fold_json: Path,
                          fold: int, fraction: float, seed: int, lr: float | None, run_dir: Path,
                          evaluate: bool = True) -> dict[str, Any]:
    """One fine-tuning run (skipped when its outputs exist) and its test evaluation."""
    n = n_train(fold_json, fraction, seed)
    epochs = epochs_for(n, args)
    argv = ["finetune", "--data", fold_json, "--out", run_dir, *arm_argv(arm, args, mae),
            "--epochs", epochs, "--warmup-epochs", max(0, round(epochs * args.warmup)), "--patience", 0,
            "--batch-size", args.batch_size, "--label-fraction", fraction, "--seed", seed, "--device", args.device,
            "--precision", args.precision, "--workers", args.workers, "--no-tensorboard",
            "--resume"]  # an interrupted run continues where it was killed
    if lr is not None:
        argv += ["--lr", lr]
    if not (run_dir / "metrics.json").exists():
        rec.usfmae(argv, f"finetune {arm} fraction {fraction} fold {fold} seed {seed}")
    m = read_json(run_dir / "metrics.json")
    out: dict[str, Any] = {"arm": arm, "fraction": fraction, "fold": fold, "seed": seed, "lr": lr,
                           "n_train": m["num_images"]["training"], "n_val": m["num_images"]["validation"],
                           "n_test": m["num_images"]["test"], "epochs": epochs, "best_epoch": m["best_epoch"],
                           "steps": m["history"][-1]["step"], "finetune_s": m["time_s"],
                           "validation": {k: m["validation"][k] for k in METRICS}, "run": str(run_dir)}
    if evaluate:
        ev = run_dir / "eval_test"
        if not (ev / "metrics.json").exists():
            rec.usfmae(["evaluate", "--model", run_dir / "model.pt", "--data", run_dir / "datalist.json", "--split",
                        "test", "--bootstrap", args.bootstrap, "--seed", seed, "--device", args.device,
                        "--precision", args.precision, "--out", ev], f"evaluate {arm} fraction {fraction} fold {fold}")
        e = read_json(ev / "metrics.json")
        out["test"] = {k: e[k] for k in METRICS}
        out["test_bootstrap_ci95"] = {k: e["intervals"].get(k) for k in METRICS}
        out["test_confusion_matrix"] = e["confusion_matrix"]
    return out


def arm_candidates(args: argparse.Namespace) -> dict[str, list[float]]:
    """``--arm-select-lr ARM=LR[,LR...]`` as ``{arm: [lr, ...]}``."""
    out: dict[str, list[float]] = {}
    for item in args.arm_select_lr:
        arm, sep, lrs = item.partition("=")
        if not sep or arm not in ALL_ARMS:
            raise SystemExit(f"label_efficiency: --arm-select-lr {item!r}: expected ARM=LR[,LR...] with ARM one of "
                             f"{', '.join(ALL_ARMS)}")
        out[arm] = [float(v) for v in lrs.split(",")]
    return out


def select_lrs(rec: Recorder, args: argparse.Namespace, arms: Sequence[str], mae_of: Any, fold0: Path,
               work: Path) -> dict[str, Any]:
    """Per arm, the ``--select-lr`` candidate with the best validation macro-F1 on fold 0 at fraction 1
    (``mae_of(arm, fold)``: the MAE checkpoint the arm starts from, or None)."""
    chosen: dict[str, Any] = {}
    for arm in arms:
        cands = args.probe_select_lr if arm == "linear_probe" and args.probe_select_lr else args.select_lr
        cands = arm_candidates(args).get(arm, cands)
        if not cands:
            chosen[arm] = {"lr": args.probe_lr if arm == "linear_probe" else args.lr, "selected": False}
            continue
        scores = {}
        for lr in cands:
            if args.report_only and not (work / "select" / arm / f"lr_{lr:g}" / "metrics.json").exists():
                continue
            mae = mae_of(arm, 0)
            if mae is None and arm in MAE_ARMS:
                continue
            r = finetune_and_evaluate(rec, args, arm, mae, fold0, 0, 1.0, args.seeds[0], lr,
                                      work / "select" / arm / f"lr_{lr:g}", evaluate=False)
            scores[lr] = r["validation"]["f1_macro"]
        if not scores:
            chosen[arm] = {"lr": None, "selected": False, "note": "selection runs missing"}
            continue
        best = max(scores, key=lambda k: (scores[k], -k))
        chosen[arm] = {"lr": best, "selected": True, "run": str(work / "select" / arm / f"lr_{best:g}"),
                       "validation_f1_macro": {f"{k:g}": v for k, v in scores.items()}}
    return chosen


# ------------------------------------------------------------------------------------------------------ reporting
def summarise(runs: list[dict[str, Any]], arms: Sequence[str], fractions: Sequence[float], n_boot: int = 1000
              ) -> dict[str, Any]:
    """Per (arm, fraction): the mean over runs (folds x seeds) of each test metric with a paired test-image
    bootstrap 95 % interval, the spread over runs (SD, t-interval), and the paired difference to the reference arm
    (``vit_scratch``, else the first arm) over the (seed, fold) pairs both completed."""
    from usfmae_core.workflows.evaluate import load_predictions
    from usfmae_core.workflows.metrics import bootstrap_mean_difference

    table: list[dict[str, Any]] = []
    by: dict[tuple[str, float], dict[tuple[int, int], dict]] = defaultdict(dict)
    for r in runs:
        if "test" in r:
            by[(r["arm"], r["fraction"])][(r["seed"], r["fold"])] = r
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    order: list[str] | None = None

    def preds(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        nonlocal order
        if r["run"] not in cache:
            images, y, p, _ = load_predictions(Path(r["run"]) / "eval_test")
            if order is None:
                order = images
            pos = {im: i for i, im in enumerate(images)}
            idx = np.array([pos[im] for im in order])  # align every run on the same test-image order
            cache[r["run"]] = (y[idx], p[idx])
        return cache[r["run"]]

    refs = [a for a in REFERENCE_ARMS if a in arms] or [arms[0]]
    for arm in arms:
        for f in fractions:
            rs = by.get((arm, f), {})
            keys = sorted(rs)
            row: dict[str, Any] = {"arm": arm, "fraction": f, "runs": len(rs),
                                   "n_train_mean": float(np.mean([r["n_train"] for r in rs.values()])) if rs else None}
            boot = bootstrap_mean_difference([preds(rs[k]) for k in keys], None, n_boot, keys=METRICS) if rs else {}
            for k in METRICS:
                row[k] = boot.get(k, {"n": 0, "mean": math.nan, "ci95": [math.nan, math.nan]})
                row[k + "_over_runs"] = t_interval([rs[q]["test"][k] for q in keys])
            for ref in refs:
                base = by.get((ref, f), {})
                pairs = sorted(set(rs) & set(base))
                if arm != ref and pairs:
                    d = bootstrap_mean_difference([preds(rs[q]) for q in pairs], [preds(base[q]) for q in pairs],
                                                  n_boot, keys=METRICS)
                    row["diff_vs_" + ref] = {k: {**d[k], "pairs": len(pairs), "over_runs": t_interval(
                        [rs[q]["test"][k] - base[q]["test"][k] for q in pairs])} for k in ("f1_macro", "auc_macro")}
            table.append(row)
    return {"reference_arms": refs, "table": table,
            "interval": "percentile bootstrap over the test images (resampled jointly for all runs and arms, "
                        f"{n_boot} resamples) of the mean over runs; *_over_runs: mean, SD and Student-t 95 % "
                        "interval over the runs (folds x seeds)"}


def fmt(stat: dict[str, Any], pct: bool = True) -> str:
    if not stat or stat.get("n", 0) == 0 or not np.isfinite(stat["mean"]):
        return "-"
    s = 100 if pct else 1
    lo, hi = stat["ci95"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{s * stat['mean']:.1f}"
    return f"{s * stat['mean']:.1f} [{s * lo:.1f}, {s * hi:.1f}]"


def fmt_sd(stat: dict[str, Any]) -> str:
    return "-" if not stat or stat.get("n", 0) < 2 else f"{100 * stat['sd']:.1f}"


def folds_run(protocol: dict[str, Any]) -> str:
    """Which folds ran, in words: "3 of 3 folds", or "fold 0 of 3" with ``--only-folds``."""
    if protocol.get("only_folds") is not None:
        ids = protocol["only_folds"]
        return f"fold{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} of {protocol['folds']}"
    return f"{protocol['run_folds'] or protocol['folds']} of {protocol['folds']} folds"


def lr_note(choice: dict[str, Any]) -> str:
    """How an arm's lr came about, for the tables."""
    n = len(choice.get("validation_f1_macro") or {})
    if not choice.get("selected"):
        return ""
    if n > 1:
        return f" (selected on fold-0 validation from {n} candidates)"
    return " (the only candidate given, not selected here)"


def write_markdown(path: Path, result: dict[str, Any]) -> Path:
    summ = result["summary"]
    refs = summ["reference_arms"]
    lines = [f"# Label efficiency on `{result['protocol']['labelled']}`", "",
             (f"Status: **{result['status']}**. Test part: {result['data']['split_sizes']['test']} images (held out, "
             f"never used for a choice); {folds_run(result['protocol'])} x seeds {result['protocol']['seeds']}. "
             "Values: mean over runs (folds x seeds) of the test metric in %, with the 95 % percentile-bootstrap "
             "interval over the test images (resampled jointly for every run and arm, so differences are paired); "
             "SD over runs = spread across folds; diff = paired difference of macro-F1 (AUC in results.json) to "
             "the reference arm over the same folds and seeds."), "",
             "| arm | label fraction | train images | runs | macro-F1 | SD over runs | accuracy | macro AUC | "
             + " | ".join(f"F1 diff vs {ARM_LABELS.get(r, r)}" for r in refs) + " |",
             "|---|---:|---:|---:|---|---:|---|---|" + "---|" * len(refs)]
    for row in summ["table"]:
        n = row["n_train_mean"]
        lines.append(f"| {ARM_LABELS.get(row['arm'], row['arm'])} | {row['fraction']:g} | "
                     f"{'-' if n is None else f'{n:.0f}'} | {row['runs']} | {fmt(row['f1_macro'])} | "
                     f"{fmt_sd(row['f1_macro_over_runs'])} | {fmt(row['accuracy'])} | {fmt(row['auc_macro'])} | "
                     + " | ".join(fmt(row.get("diff_vs_" + r, {}).get("f1_macro")) for r in refs) + " |")
    lines += ["", "Chosen learning rates: " + ", ".join(f"{a}: {v['lr']}{lr_note(v)}"
                                                          for a, v in result["learning_rates"].items()), ""]
    if result.get("missing_runs"):
        lines += [f"Missing runs ({len(result['missing_runs'])}): " +
                  ", ".join(f"{m['arm']}@{m['fraction']:g}/fold{m['fold']}/seed{m['seed']}"
                            for m in result["missing_runs"][:40]), ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(path: Path, result: dict[str, Any]) -> Path:
    from matplotlib.figure import Figure

    from usfmae_core.workflows.pictures import save_figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.subplots()
    table = result["summary"]["table"]
    arms = list(dict.fromkeys(r["arm"] for r in table))
    for j, arm in enumerate(arms):
        rows = [r for r in table if r["arm"] == arm and r["f1_macro"]["n"] > 0]
        if not rows:
            continue
        x = np.array([r["fraction"] for r in rows]) * (1 + 0.025 * (j - (len(arms) - 1) / 2))  # de-overlap bars
        y = np.array([r["f1_macro"]["mean"] for r in rows])
        lo = np.array([r["f1_macro"]["ci95"][0] for r in rows])
        hi = np.array([r["f1_macro"]["ci95"][1] for r in rows])
        # a percentile interval need not contain the mean over runs: clip so matplotlib gets non-negative bars
        err = np.clip(np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0), 0.0, None)
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.5, label=ARM_LABELS.get(arm, arm))
    ax.set_xscale("log")
    fr = sorted({r["fraction"] for r in table})
    ax.set_xticks(fr, labels=[f"{100 * f:g}%" for f in fr])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel("test macro-F1 (mean over runs, 95% bootstrap CI)")
    ax.set_title(f"{Path(result['protocol']['labelled']).name}: label efficiency ({result['status']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def read_commands_txt(path: Path) -> list[dict[str, Any]]:
    """Parse ``commands.txt`` (``# what (N s)`` then the command line) back into command records."""
    import re

    lines = path.read_text().splitlines()
    out = []
    for head, cmd in zip(lines[::2], lines[1::2], strict=False):
        m = re.match(r"# (.*) \(([\d.]+) s\)$", head)
        if m:
            out.append({"what": m.group(1), "command": cmd, "seconds": float(m.group(2))})
    return out


def merge_records(result: dict[str, Any], dirs: Sequence[Path], out: Path) -> None:
    """Fill a ``--report-only`` result with what the processes that did the work recorded: their commands (from
    ``results.json`` or ``commands.txt``), timings, machine load and corpus report; rewrite ``out/commands.txt``."""
    commands, timings, env = [], {}, None
    for d in dirs:
        if (d / "results.json").exists():
            prev = read_json(d / "results.json")
            cmds = prev.get("commands", [])
            timings[str(d)] = prev.get("timings")
            env = env or prev.get("environment")
            result["corpus"] = result.get("corpus") or prev.get("corpus")
        elif (d / "commands.txt").exists():
            cmds = read_commands_txt(d / "commands.txt")
            timings[str(d)] = {"commands_s": round(sum(c["seconds"] for c in cmds), 2)}
        else:
            continue
        commands += [{**c, "process": str(d)} for c in cmds]
    if commands:
        result["commands"] = commands
        (out / "commands.txt").write_text("\n".join(f"# {c['what']} ({c['seconds']} s) [{c['process']}]\n"
                                                    f"{c['command']}" for c in commands) + "\n")
    result["timings"] = {"summary_call": result["timings"], "processes": timings}
    if env:
        result["environment"] = env
    result["protocol"]["report_only"] = False
    result["summarised_by"] = "--report-only" + (f" --merge-from {' '.join(map(str, dirs))}" if dirs else "")


# ----------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--labelled", required=True, help="class folders, CSV manifest or datalist JSON")
    d.add_argument("--unlabelled", nargs="*", default=[], help="files / folders for the pretraining corpus")
    d.add_argument("--unlabelled-from-labelled", action="store_true",
                   help="add the labelled images outside the test part, without labels, to the corpus")
    d.add_argument("--work", required=True, help="folder for corpus, checkpoints and run folders (large)")
    d.add_argument("--out", required=True, help="folder for results.json / results.md / label_efficiency.png")
    d.add_argument("--folds", type=int, default=3, help="cross-validation folds over the non-test part")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the test part and the folds")
    d.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (init, subsample, order)")
    d.add_argument("--run-folds", type=int, help="run only the first N folds (default: all; for quick checks)")
    d.add_argument("--only-folds", type=int, nargs="+",
                   help="run only these folds (to share one --work between processes, e.g. by arm or fold)")
    d.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    d.add_argument("--arms", nargs="+", default=list(ARMS), choices=ALL_ARMS)
    d.add_argument("--corpus-size", type=int, default=128, help="frame size of the prepared corpus")
    d.add_argument("--no-crop-sector", dest="crop_sector", action="store_false",
                   help="keep black borders (default: prepare --crop-sector)")
    d.add_argument("--prepare-workers", type=int, default=2)
    m = p.add_argument_group("models")
    m.add_argument("--preset", default="vit_micro", help="ViT preset of the MAE and of the ViT arms")
    m.add_argument("--img-size", type=int, default=64)
    m.add_argument("--patch-size", type=int, default=8)
    m.add_argument("--in-channels", type=int, default=3, choices=(1, 3))
    m.add_argument("--cnn", default="resnet", choices=("resnet", "densenet"))
    m.add_argument("--cnn-depth", type=int, default=10)
    m.add_argument("--init", help="MAE checkpoint to use instead of pretraining here (e.g. imported USF-MAE)")
    t = p.add_argument_group("budgets")
    t.add_argument("--pretrain-steps", type=int, default=400)
    t.add_argument("--pretrain-batch", type=int, default=64)
    t.add_argument("--pretrain-lr", type=float, default=1e-3)
    t.add_argument("--continue-steps", type=int, default=200,
                   help="continued pretraining steps from the MAE (vit_cont_* arms; the same for each)")
    t.add_argument("--continue-lr", type=float, help="lr of continued pretraining (default --pretrain-lr)")
    t.add_argument("--continue-batch", type=int, help="batch of continued pretraining (default --pretrain-batch)")
    t.add_argument("--continue-mix-weight", type=float, default=0.5,
                   help="share of target images in vit_cont_mix's samples (the rest: general corpus)")
    t.add_argument("--steps", type=int, default=150, help="optimiser steps per fine-tuning run (every arm)")
    t.add_argument("--max-epochs", type=int, default=25, help="cap on the epochs of one run")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of the epochs (rounded)")
    t.add_argument("--lr", type=float, default=5e-4, help="lr of the fully fine-tuned arms")
    t.add_argument("--probe-lr", type=float, default=5e-3, help="lr of the linear probe")
    t.add_argument("--select-lr", type=float, nargs="*", default=[],
                   help="candidate lrs, chosen per arm on fold-0 validation macro-F1 at fraction 1")
    t.add_argument("--probe-select-lr", type=float, nargs="*", default=[], help="candidates for the linear probe")
    t.add_argument("--arm-select-lr", nargs="*", default=[], metavar="ARM=LR[,LR...]",
                   help="candidates for one arm instead of --select-lr (e.g. an lr already chosen on the same "
                        "fold-0 validation by an earlier run)")
    t.add_argument("--bootstrap", type=int, default=1000)
    t.add_argument("--time-budget-min", type=float, default=0, help="stop launching runs after this (0: none)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", choices=("auto", "cuda", "mps", "cpu"))
    r.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"))
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--report-only", action="store_true",
                   help="launch no fine-tuning: summarise the runs already finished in --work")
    r.add_argument("--merge-from", nargs="*", default=[],
                   help="with --report-only: --out folders of the processes that shared this --work; their "
                        "commands and timings are merged into this report")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not args.unlabelled and not args.unlabelled_from_labelled and not args.init and \
            set(MAE_ARMS) & set(args.arms):
        raise SystemExit("label_efficiency: the vit_mae / linear_probe / vit_cont_* arms need --unlabelled, "
                         "--unlabelled-from-labelled or --init")
    if {"vit_cont_general", "vit_cont_mix"} & set(args.arms) and args.init and not args.unlabelled:
        raise SystemExit("label_efficiency: vit_cont_general / vit_cont_mix continue on the general corpus: pass "
                         "--unlabelled too")
    if not 0 < args.continue_mix_weight < 1:
        raise SystemExit("label_efficiency: --continue-mix-weight must be between 0 and 1")
    rec = Recorder(out)
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    datalist = make_protocol_datalist(args.labelled, work, args.folds, args.split_seed)
    folds = fold_datalists(datalist, work, args.folds, args.split_seed)
    timings["dedup_and_split_s"] = round(time.monotonic() - t0, 2)
    data = {"dedup": dedup_report(datalist), "classes": datalist["classes"],
            "split_sizes": {s: len(datalist.get(s) or []) for s in ("training", "validation", "test")},
            "fold_sizes": [len(f) for f in datalist["folds"]],
            "test_class_counts": {datalist["classes"][k]: v for k, v in
                                  sorted(Counter(int(i["label"]) for i in datalist["test"]).items())}}

    mae, pre_info, corpus = None, {}, None
    if set(MAE_ARMS) & set(args.arms):
        needs_corpus = not args.init or {"vit_cont_general", "vit_cont_mix"} & set(args.arms)
        if args.report_only and (work / "corpus" / "manifest.jsonl").exists():
            corpus = corpus_breakdown(work / "corpus", [str(s) for s in args.unlabelled], work / "labelled_pool_files")
        elif needs_corpus:
            t0 = time.monotonic()
            corpus = prepare(rec, args, datalist, work)
            timings["prepare_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        mae, pre_info = pretrain(rec, args, work)
        timings["pretrain_s"] = round(time.monotonic() - t0, 2)

    cont = Continued(rec, args, work, mae, folds)

    def mae_of(arm: str, fold: int) -> str | None:
        over = args.time_budget_min and (time.monotonic() - t_start) / 60 > args.time_budget_min
        cont.launch = not (args.report_only or over)
        if arm in ("vit_mae", "linear_probe"):
            return mae
        if arm == "vit_cont_general":
            return cont.general()
        if arm == "vit_cont_target":
            return cont.target(fold)
        if arm == "vit_cont_mix":
            return cont.mix(fold)
        return None

    lrs = select_lrs(rec, args, args.arms, mae_of, folds[0], work)
    fold_ids = args.only_folds if args.only_folds is not None else range(args.run_folds or args.folds)
    plan = [(seed, fold, f, arm) for seed in args.seeds for fold in fold_ids
            for f in args.fractions for arm in args.arms]
    runs, missing = [], []
    t_runs = time.monotonic()
    for seed, fold, f, arm in plan:
        run_dir = work / "runs" / f"seed{seed}" / f"fold{fold}" / f"frac{f:g}" / arm
        if lrs[arm].get("selected") and (seed, fold, f) == (args.seeds[0], 0, 1.0):
            run_dir = Path(lrs[arm]["run"])  # the selection run is this very run (same data, seed and lr): reuse it
        over = args.report_only or (args.time_budget_min and (time.monotonic() - t_start) / 60 > args.time_budget_min)
        if over and not (run_dir / "eval_test" / "metrics.json").exists():
            missing.append({"arm": arm, "fraction": f, "fold": fold, "seed": seed})
            continue
        init = mae_of(arm, fold)
        if (init is None and arm in MAE_ARMS) or lrs[arm]["lr"] is None and lrs[arm].get("note"):
            missing.append({"arm": arm, "fraction": f, "fold": fold, "seed": seed})
            continue
        runs.append(finetune_and_evaluate(rec, args, arm, init, folds[fold], fold, f, seed, lrs[arm]["lr"], run_dir))
        write_json(out / "runs.json", runs)  # partial results survive an interruption
    timings["finetune_evaluate_s"] = round(time.monotonic() - t_runs, 2)
    timings["total_s"] = round(time.monotonic() - t_start, 2)

    import torch

    import usfmae_core

    result = {
        "status": "complete" if not missing else f"partial ({len(runs)} of {len(plan)} runs)",
        "protocol": {**{k: v for k, v in vars(args).items()}, "test_fraction": TEST_FRACTION,
                     "selection": "best validation macro-F1 epoch per run; lrs from --select-lr on fold-0 "
                                  "validation if given; the test part is only evaluated",
                     "budget": f"about {args.steps} optimiser steps of batch {args.batch_size} per run (at most "
                               f"{args.max_epochs} epochs), the same for every arm at a given label fraction"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "usfmae": usfmae_core.__version__, "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()},
        "data": data, "corpus": corpus, "pretraining": pre_info, "continued_pretraining": cont.info,
        "learning_rates": lrs, "timings": timings,
        "summary": summarise(runs, args.arms, args.fractions, args.bootstrap), "runs": runs, "missing_runs": missing,
        "commands": rec.commands,
    }
    if args.report_only:
        merge_records(result, [Path(d) for d in args.merge_from] or [out], out)
    write_json(out / "results.json", result)
    write_markdown(out / "results.md", result)
    plot(out / "label_efficiency.png", result)
    print((out / "results.md").read_text())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
