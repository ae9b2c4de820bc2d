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
    le, argv, root, result = phantom_run
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
