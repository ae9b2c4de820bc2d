"""Smoke test of the label-efficiency benchmark protocol (benchmarks/label_efficiency.py) on phantom data.

Tiny budgets (vit_test at 32 px, a few steps): this checks the protocol's wiring (dedup + splits, prepare, pretrain,
the four arms at two label fractions over two folds, test evaluation, tables, plot, resume), not the numbers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    from usfmae_core.data import phantom

    root = tmp_path_factory.mktemp("le")
    labelled = phantom.write_labelled_folder(root / "labelled", n_per_class=8, size=48, seed=1)
    unlabelled = phantom.write_unlabelled_corpus_sources(root / "unlabelled", n_images=4, n_volumes=1, n_cines=1,
                                                         seed=2, size=48)
    le = _load_benchmark()
    argv = ["--labelled", str(labelled), "--unlabelled", str(unlabelled), "--unlabelled-from-labelled",
            "--work", str(root / "work"),
            "--out", str(root / "out"), "--folds", "2", "--run-folds", "1", "--fractions", "0.5", "1.0", "--seeds", "0",
            "--preset", "vit_test", "--img-size", "32", "--patch-size", "8", "--cnn-depth", "10",
            "--corpus-size", "32", "--no-crop-sector", "--prepare-workers", "1", "--pretrain-steps", "2",
            "--pretrain-batch", "8", "--steps", "2", "--batch-size", "8", "--bootstrap", "10"]
    result = le.main(argv)
    return le, argv, root, result


def test_protocol_outputs(phantom_run):
    le, _argv, root, result = phantom_run
    out = root / "out"
    for name in ("results.json", "results.md", "label_efficiency.png", "runs.json", "commands.txt"):
        assert (out / name).stat().st_size > 0, name
    assert result["status"] == "complete" and not result["missing_runs"]
    # 4 arms x 2 fractions x fold 0 (of 2) x 1 seed, each with test metrics
    runs = result["runs"]
    assert len(runs) == 8
    assert {(r["arm"], r["fraction"], r["fold"]) for r in runs} == {(a, f, 0) for a in le.ARMS for f in (0.5, 1.0)}
    test_n = result["data"]["split_sizes"]["test"]
    for r in runs:
        assert r["n_test"] == test_n > 0
        assert 0.0 <= r["test"]["f1_macro"] <= 1.0
        assert r["steps"] >= 2  # the step budget is honoured whatever the fraction
    # fewer training labels at fraction 0.5 than at 1.0
    n = {r["fraction"]: r["n_train"] for r in runs if r["arm"] == "vit_scratch"}
    assert n[0.5] < n[1.0]
    # the summary's value is the evaluate workflow's test metric (recomputed from its predictions), the paired
    # difference is arm minus reference, and the bootstrap interval is an ordered pair within [0, 1]
    row = next(r for r in result["summary"]["table"] if r["arm"] == "vit_mae" and r["fraction"] == 1.0)
    (mae_run,) = [r for r in runs if r["arm"] == "vit_mae" and r["fraction"] == 1.0]
    (ref_run,) = [r for r in runs if r["arm"] == "vit_scratch" and r["fraction"] == 1.0]
    assert row["f1_macro"]["mean"] == pytest.approx(mae_run["test"]["f1_macro"])
    lo, hi = row["f1_macro"]["ci95"]
    assert 0.0 <= lo <= hi <= 1.0
    diff = row["diff_vs_vit_scratch"]["f1_macro"]
    assert diff["mean"] == pytest.approx(mae_run["test"]["f1_macro"] - ref_run["test"]["f1_macro"])
    # the engine's workflows were driven (command lines recorded) and the corpus / MAE came from them
    cmds = [c["command"].split()[1] for c in result["commands"]]
    assert cmds.count("prepare") == 1 and cmds.count("pretrain") == 1
    assert cmds.count("finetune") == 8 and cmds.count("evaluate") == 8
    assert result["corpus"]["report"]["n_frames"] > 0
    # --unlabelled-from-labelled adds the labelled images outside the test part (never a test image) to the corpus
    frames = {(f["source"], f["kind"]): f["frames"] for f in result["corpus"]["frames_by_source"]}
    pool = str(root / "work" / "labelled_pool_files")
    n_pool = result["data"]["split_sizes"]["training"] + result["data"]["split_sizes"]["validation"]
    assert 0 < frames[(pool, "image")] <= n_pool
    test_images = {it["image"] for it in json.loads((root / "work" / "datalist.json").read_text())["test"]}
    linked = {str(p.resolve()) for p in (root / "work" / "labelled_pool_files").iterdir()}
    assert linked and not linked & {str(Path(t).resolve()) for t in test_images}
    assert (root / "work" / "pretrain" / "model.pt").exists()
    md = (out / "results.md").read_text()
    assert "macro-F1" in md and "linear probe" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["seeds"] == [0]


def test_test_part_is_disjoint_and_rerun_resumes(phantom_run):
    le, argv, root, result = phantom_run
    dl = json.loads((root / "work" / "datalist.json").read_text())
    test = {it["image"] for it in dl["test"]}
    for k in (0, 1):  # both folds are written, whatever --run-folds
        fold = json.loads((root / "work" / "folds" / f"fold_{k}.json").read_text())
        assert not test & {it["image"] for s in ("training", "validation") for it in fold[s]}
        assert {it["image"] for it in fold["test"]} == test
    # a second call with the same --work re-uses every finished step: no workflow runs again
    again = le.main(argv)
    assert again["commands"] == [c for c in again["commands"] if c["command"].split()[1] == "prepare"]
    assert [r["test"]["f1_macro"] for r in again["runs"]] == [r["test"]["f1_macro"] for r in result["runs"]]


def test_continued_pretraining_arms_use_only_each_folds_training_images(tmp_path):
    """vit_cont_target / vit_cont_general / vit_cont_mix: one target corpus per fold holding exactly that fold's
    training images (never its validation images or the test part), continued MAEs from the base MAE with the same
    budget (the general one shared by the folds), paired differences against vit_cont_general, and resume."""
    from usfmae_core.checkpoints import load_checkpoint
    from usfmae_core.data import phantom
    from usfmae_core.data.corpus import FrameCorpus

    labelled = phantom.write_labelled_folder(tmp_path / "labelled", n_per_class=8, size=48, seed=1)
    unlabelled = phantom.write_unlabelled_corpus_sources(tmp_path / "unlabelled", n_images=4, n_volumes=1,
                                                         n_cines=0, seed=2, size=48)
    le = _load_benchmark()
    work = tmp_path / "work"
    argv = ["--labelled", str(labelled), "--unlabelled", str(unlabelled), "--work", str(work),
            "--out", str(tmp_path / "out"), "--folds", "2", "--fractions", "1.0", "--seeds", "0",
            "--arms", "vit_cont_target", "vit_cont_general", "vit_cont_mix",
            "--preset", "vit_test", "--img-size", "32", "--patch-size", "8", "--corpus-size", "32",
            "--no-crop-sector", "--prepare-workers", "1", "--pretrain-steps", "2", "--pretrain-batch", "8",
            "--continue-steps", "3", "--continue-mix-weight", "0.25", "--steps", "2", "--batch-size", "8",
            "--bootstrap", "10"]
    result = le.main(argv)
    assert result["status"] == "complete" and len(result["runs"]) == 6

    for fold in (0, 1):
        split = json.loads((work / "folds" / f"fold_{fold}.json").read_text())
        images = {s: {str(Path(it["image"]).resolve()) for it in split[s]} for s in ("training", "validation", "test")}
        corpus = work / "target_corpus" / f"fold{fold}"
        assert {r["source"] for r in FrameCorpus(corpus).manifest()} == images["training"]
        check = result["continued_pretraining"]["target_corpora"][f"fold{fold}"]
        assert check["validation_or_test_images_in_corpus"] == 0
        assert check["images_in_corpus"] == check["training_images"] == len(images["training"])
        for name in (f"target_fold{fold}", f"mix_fold{fold}"):
            ckpt = load_checkpoint(work / "continue" / name / "model.pt")
            assert ckpt["meta"]["init"] == str(work / "pretrain" / "model.pt") and ckpt["meta"]["steps"] == 3
        mix = load_checkpoint(work / "continue" / f"mix_fold{fold}" / "model.pt")["meta"]["corpora"]
        assert [c["weight"] for c in mix] == [0.75, 0.25] and mix[1]["path"] == str(corpus)
    # each fine-tuning run started from its fold's continued MAE
    for r in result["runs"]:
        cfg = json.loads((Path(r["run"]) / "config.json").read_text())
        name = {"vit_cont_target": f"target_fold{r['fold']}", "vit_cont_general": "general",
                "vit_cont_mix": f"mix_fold{r['fold']}"}[r["arm"]]
        assert cfg["init"] == str(work / "continue" / name / "model.pt")
    cmds = [c["command"].split()[1] for c in result["commands"]]
    assert cmds.count("pretrain") == 1 + 1 + 2 + 2 and cmds.count("prepare") == 1 + 2
    row = next(r for r in result["summary"]["table"] if r["arm"] == "vit_cont_target")
    assert row["diff_vs_vit_cont_general"]["f1_macro"]["pairs"] == 2
    assert "MAE continued on target" in (tmp_path / "out" / "results.md").read_text()
    again = le.main(argv)
    assert [c["command"].split()[1] for c in again["commands"]] == ["prepare"]


def test_leak_guard_stops_the_benchmark_when_a_held_out_image_is_in_a_target_corpus(tmp_path):
    """The guard behind the continued-pretraining arms: a target corpus that holds one of the fold's validation or
    test images (e.g. a stale WORK/target_corpus from another split) voids the protocol, so the benchmark stops
    instead of reporting numbers; a corpus of training images only passes and is recorded."""
    import argparse

    le = _load_benchmark()
    images = {}
    for split in ("training", "validation", "test"):
        images[split] = [tmp_path / f"{split}_{i}.png" for i in range(3)]
        for p in images[split]:
            p.write_bytes(b"")  # only the paths matter to the guard
    fold = tmp_path / "fold_0.json"
    fold.write_text(json.dumps({"classes": ["a", "b"], **{s: [{"image": str(p), "label": i % 2}
                                                              for i, p in enumerate(v)] for s, v in images.items()}}))
    cont = le.Continued(le.Recorder(tmp_path), argparse.Namespace(report_only=True), tmp_path, None, [fold])

    def corpus(name, sources):
        c = tmp_path / name
        c.mkdir()
        (c / "manifest.jsonl").write_text("".join(json.dumps({"source": str(s.resolve())}) + "\n" for s in sources))
        (c / "report.json").write_text(json.dumps({"duplicates_removed": 0, "empty_frames_skipped": 0}))
        return c

    ok = cont.leak_check(0, corpus("clean", images["training"]))
    assert ok["validation_or_test_images_in_corpus"] == 0 and ok["images_in_corpus"] == ok["training_images"] == 3
    for split in ("validation", "test"):
        with pytest.raises(SystemExit, match="held-out images") as e:
            cont.leak_check(0, corpus(f"leaky_{split}", images["training"] + images[split][:1]))
        assert images[split][0].name in str(e.value)
