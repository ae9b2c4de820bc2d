"""Labelled data: class folders, CSV manifests, deduplication, group-aware stratified splits, datalists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from usfmae_core.data import phantom
from usfmae_core.data.labelled import (
    deduplicate,
    labelled_source_to_datalist,
    load_datalist,
    make_splits,
    read_csv_manifest,
    save_datalist,
    scan_class_folders,
    subsample_fraction,
)
from usfmae_core.errors import UsfmaeError

SHARED = Path(os.environ.get("USFMAE_SHARED_DATA", Path(__file__).parents[1].parent / "shared" / "data"))


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = phantom.write_labelled_folder(tmp_path / "tree", n_per_class=12, size=48, seed=0)
    # an exact copy across classes (conflicting label) and within a class (same label)
    shutil.copy(root / "cyst" / "cyst_0003.png", root / "mass" / "mass_copy.png")
    shutil.copy(root / "normal" / "normal_0001.png", root / "normal" / "normal_copy.png")
    # a near-copy: +1 grey level on a few pixels
    from PIL import Image

    a = np.array(Image.open(root / "mass" / "mass_0005.png"))
    a[::7, ::7] = np.minimum(a[::7, ::7].astype(int) + 3, 255)
    Image.fromarray(a).save(root / "mass" / "mass_near.png")
    return root


def _images(items):
    return {it["image"] for it in items}


def test_scan_and_dedupe(tree):
    items, classes = scan_class_folders(tree)
    assert classes == ["cyst", "mass", "normal"] and len(items) == 39
    kept, report = deduplicate(items)
    reasons = {Path(r["path"]).name: r["reason"] for r in report["removed"] + report["grouped"]}
    assert "conflicting labels" in reasons["mass_copy.png"] and "conflicting labels" in reasons["cyst_0003.png"]
    assert reasons["normal_copy.png"].startswith("exact duplicate") and "normal_0001.png" not in reasons
    assert "near-duplicate" in reasons["mass_near.png"]
    names = {Path(i["image"]).name: i for i in kept}
    assert "mass_near.png" in names and names["mass_near.png"]["group"] == names["mass_0005.png"]["group"] is not None
    assert len(kept) == 39 - 3


def test_splits_group_aware_stratified_reproducible(tree):
    items, classes = scan_class_folders(tree)
    items, _ = deduplicate(items)
    d1 = make_splits(items, classes, 0.2, 0.2, n_folds=3, seed=1)
    d2 = make_splits(items, classes, 0.2, 0.2, n_folds=3, seed=1)
    d3 = make_splits(items, classes, 0.2, 0.2, n_folds=3, seed=2)
    assert d1 == d2 and d1 != d3
    parts = [d1["training"], d1["validation"], d1["test"]]
    assert sum(map(len, parts)) == len(items)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not _images(parts[a]) & _images(parts[b])
            ga = {i["group"] for i in parts[a] if i["group"]}
            gb = {i["group"] for i in parts[b] if i["group"]}
            assert not ga & gb  # near-duplicates never straddle a split
    for part in parts[1:]:
        assert {i["label"] for i in part} == {0, 1, 2}  # stratified: every class in val and test
    folds = d1["folds"]
    assert len(folds) == 3 and sum(map(len, folds)) == len(d1["training"]) + len(d1["validation"])
    assert not _images(folds[0]) & _images(folds[1])


def test_patient_groups_from_csv(tmp_path, tree):
    rows = ["path,label,patient"]
    files = sorted((tree / "cyst").glob("*.png")) + sorted((tree / "normal").glob("*.png"))
    for i, f in enumerate(files):
        rows.append(f"{f.relative_to(tree)},{'cyst' if 'cyst' in f.name else 'normal'},P{i // 4}")
    (tree / "list.csv").write_text("\n".join(rows) + "\n")
    items, classes = read_csv_manifest(tree / "list.csv")
    assert classes == ["cyst", "normal"] and items[0]["group"] == "P0"
    d = labelled_source_to_datalist(tree / "list.csv", out_json=tmp_path / "dl.json", seed=0)
    splits = {k: {i["group"] for i in d[k]} for k in ("training", "validation", "test")}
    assert not splits["training"] & splits["test"] and not splits["training"] & splits["validation"]
    back = load_datalist(tmp_path / "dl.json")
    assert back["training"] == d["training"] and back["classes"] == classes and back["seed"] == 0
    with pytest.raises(UsfmaeError, match="column"):
        (tmp_path / "bad.csv").write_text("file_name,y\na.png,1\n")
        read_csv_manifest(tmp_path / "bad.csv")


def test_datalist_entry_points(tmp_path, tree):
    d = labelled_source_to_datalist(tree, out_json=tmp_path / "d.json", seed=3)
    assert d["removed"] and d["grouped"] and d["classes"] == ["cyst", "mass", "normal"]
    again = labelled_source_to_datalist(tmp_path / "d.json")
    assert again["test"] == d["test"]
    save_datalist({"training": [{"image": "x.png", "label": 1}]}, tmp_path / "rel" / "r.json")
    shutil.copy(d["training"][0]["image"], tmp_path / "rel" / "x.png")  # listed files must exist
    r = load_datalist(tmp_path / "rel" / "r.json")
    assert r["training"][0]["image"] == str(tmp_path / "rel" / "x.png") and r["classes"] == ["0", "1"]
    with pytest.raises(UsfmaeError):
        labelled_source_to_datalist(tmp_path / "nothing.txt")


def test_datalist_from_relative_folder_works_elsewhere(tmp_path, tree, monkeypatch):
    """`usfmae finetune --data ../data/tree` writes RUN/datalist.json, which must still load from RUN/."""
    monkeypatch.chdir(tmp_path / "tree")
    d = labelled_source_to_datalist(Path("..") / "tree", out_json=tmp_path / "run" / "datalist.json")
    reread = load_datalist(tmp_path / "run" / "datalist.json")
    for split in ("training", "validation", "test"):
        assert [it["image"] for it in reread[split]] == [it["image"] for it in d[split]]
        assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in reread[split])


def test_subsample_fraction_stratified(tree):
    items, _ = scan_class_folders(tree)
    sub = subsample_fraction(items, 0.25, seed=0)
    counts = np.bincount([i["label"] for i in sub])
    full = np.bincount([i["label"] for i in items])
    np.testing.assert_array_equal(counts, np.maximum(1, np.round(full * 0.25)))
    assert subsample_fraction(items, 0.25, seed=0) == sub and subsample_fraction(items, 0.25, seed=1) != sub


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "busi_256").is_dir(), reason=f"BUSI not found under {SHARED}")
def test_busi_known_duplicate_removed(tmp_path):
    d = labelled_source_to_datalist(SHARED / "busi_256", out_json=tmp_path / "busi.json", seed=0)
    removed = {Path(r["path"]).name for r in d["removed"] if "exact" in r["reason"]}
    assert {"malignant (145).png", "benign (433).png"} <= removed
    everything = [i["image"] for k in ("training", "validation", "test") for i in d[k]]
    assert len(everything) == len(set(everything)) == 780 - 2
    near = [r for r in d["grouped"] if r["reason"].startswith("near")]
    assert len(near) >= 10  # the README's ~10 near-duplicate pairs (and more) are grouped
    assert d["masks"] == [] and d["unreadable"] == [] and len(d["colour"]) > 0
    groups = {k: {i["group"] for i in d[k] if i["group"]} for k in ("training", "validation", "test")}
    assert not groups["training"] & groups["test"] and not groups["validation"] & groups["test"]
