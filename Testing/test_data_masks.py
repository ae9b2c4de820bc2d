"""Dataset folders as public datasets ship them (scan + ``_mask`` / ``_mask_1`` + ``_vflip`` / rotated copies,
``masks/`` sibling folders, ``images/`` + ``masks/`` top level, non-square colour screen exports), generated with
:mod:`usfmae_core.data.phantom` in real formats: what is excluded, reported, grouped and stored by the labelled
loaders, ``prepare``, ``predict``'s folder walk and ``finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usfmae_core import cli
from usfmae_core.data import phantom
from usfmae_core.data.labelled import (
    augmented_base,
    datalist_summary,
    labelled_source_to_datalist,
    load_datalist,
    save_datalist,
)
from usfmae_core.data.masks import MaskRules, ScanIndex, companion_scan, label_like, match_name

SPLITS = ("training", "validation", "test")


def _items(d: dict) -> list[dict]:
    return [it for s in SPLITS for it in d[s]]


def _split_of(d: dict) -> dict[str, str]:
    return {it["image"]: s for s in SPLITS for it in d[s]}


# ------------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("path, base", [
    ("busi/benign/benign (1)_mask.png", "benign (1)"),
    ("busi/benign/benign (1)_mask_1.png", "benign (1)"),
    ("x/case12-seg.nii.gz", "case12"),
    ("x/img_004_gt.jpg", "img_004"),
    ("x/thyroid 3 label(2).bmp", "thyroid 3"),
    ("data/masks/0001.png", "0001"),
    ("data/Ground_Truth/0001.png", "0001"),
    ("data/labels/p3/0001.png", "0001"),
])
def test_mask_names(path: str, base: str) -> None:
    hit = match_name(path, root="x" if path.startswith("x/") else None)
    assert hit is not None and hit[1] == base, hit


@pytest.mark.parametrize("path", ["busi/benign/benign (1).png", "x/segment_01.png", "x/convex__Reg_Image_3_crop.mp4",
                                  "x/masked_region.png", "x/vol_gtx.nii.gz", "x/obs001.nii.gz"])
def test_scan_names_are_not_masks(path: str) -> None:
    assert match_name(path) is None


def test_mask_folder_rule_only_below_the_data_root() -> None:
    # a 'labels' folder ABOVE the data says nothing about the files
    assert match_name("/data/labels/study/img1.png", root="/data/labels/study") is None
    assert match_name("/data/labels/study/masks/img1.png", root="/data/labels/study") is not None
    assert match_name("/d/x/a_roi.png", MaskRules.with_patterns(["*_roi.png"]), "/d")[0].startswith("matches")


def test_augmented_copy_names() -> None:
    assert augmented_base("a/benign (3)_vflip.png") == ("benign (3)", "vflip")
    assert augmented_base("a/x_rot15.png") == ("x", "rot15")
    assert augmented_base("a/x-rotated_-10.png")[0] == "x"
    assert augmented_base("a/x_aug2.jpg")[0] == "x" and augmented_base("a/x_hflip.png")[0] == "x"
    assert augmented_base("a/rotation_study.png") is None and augmented_base("a/benign (3).png") is None


def test_label_like_content() -> None:
    img = phantom.make_image(2, 64, rng=0)
    _, mask = phantom.make_image_with_mask(2, 64, rng=0)
    assert label_like(img) is None and label_like(img.astype(np.float32) * 3.7) is None
    assert "2 grey levels" in label_like(mask)
    labels = np.zeros((8, 32, 32), np.float32)
    labels[2:5, 8:20, 8:20] = 1
    labels[3, 10:12, 10:12] = 2
    assert "3 grey levels" in label_like(labels)  # a label volume
    import io

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="JPEG", quality=75)  # a binary mask saved as JPEG rings at its edges
    jpeg = np.array(Image.open(buf)).astype(np.float32)
    assert label_like(jpeg) is not None
    smooth = np.array(Image.fromarray(mask).resize((150, 150), Image.BICUBIC)).astype(np.float32)  # soft edges
    assert np.unique(smooth).size > 32 and "binary" in label_like(smooth)


def test_companion_scan_lookup(tmp_path: Path) -> None:
    files = [tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png", tmp_path / "b.png", tmp_path / "b_mask.png",
             tmp_path / "c.jpg", tmp_path / "c_contour.png"]
    index = ScanIndex(files)
    assert companion_scan(files[1], index) == str(files[0])  # same name in a sibling folder
    assert companion_scan(files[3], index, base="b") == str(files[2])  # stem minus the mask word, same folder
    assert companion_scan(files[5], index) is None and companion_scan(files[5], index, prefix=True) == str(files[4])


# --------------------------------------------------------------------------------------- labelled: the layouts
@pytest.fixture(scope="module")
def suffix_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("busi_like") / "data"
    made = phantom.write_distributed_dataset(root, n_per_class=10, size=48, flips=4, rotations=1, second_masks=1,
                                             screens=2)
    return root, made


def test_suffix_layout_masks_excluded_kept_as_targets_copies_grouped(suffix_tree, tmp_path) -> None:
    root, made = suffix_tree
    d = labelled_source_to_datalist(root, out_json=tmp_path / "dl.json", seed=0)
    items = _items(d)
    images = {it["image"] for it in items}
    assert d["classes"] == sorted(phantom.CLASSES)
    # every mask is out of the training data, reported with its scan, and is its scan's segmentation target
    assert not images & set(made["masks"])
    assert sorted(m["path"] for m in d["masks"]) == sorted(made["masks"])
    assert all(m["scan"] in images and "name ends in '_mask" in m["reason"] for m in d["masks"])
    targets = {it["image"]: it["mask"] for it in items if "mask" in it}
    scan1 = str(root / "cyst" / "cyst (1).jpg")  # a screen export with a _mask and a _mask_1
    assert targets[scan1] == [str(root / "cyst" / "cyst (1)_mask.png"), str(root / "cyst" / "cyst (1)_mask_1.png")]
    assert targets[str(root / "mass" / "mass (5).png")] == str(root / "mass" / "mass (5)_mask.png")
    assert not any(Path(p).parent.name == "normal" for p in targets)  # normal scans have no masks (as shipped)
    assert len(images) == len(made["scans"]) + len(made["copies"])
    # every flipped / rotated copy sits in its scan's group, in its scan's split
    split = _split_of(d)
    by_image = {it["image"]: it for it in items}
    for copy in made["copies"]:
        base = copy.rsplit("_", 1)[0] + ".png"
        assert by_image[copy]["group"] is not None and by_image[copy]["group"] == by_image[base]["group"]
        assert split[copy] == split[base]
    assert len(d["grouped"]) == len(made["copies"]) and d["removed"] == [] and d["unreadable"] == []
    # colour screen exports are counted; the datalist on disk holds the lists under the new keys
    assert sorted(d["colour"]) == sorted(made["screens"])
    on_disk = json.loads((tmp_path / "dl.json").read_text())
    assert {"removed", "grouped", "unreadable", "masks", "ignored"} <= set(on_disk)
    assert "removed_duplicates" not in on_disk
    lines = datalist_summary(on_disk)
    text = "\n".join(lines)
    assert f"masks excluded: {len(made['masks'])}" in text and "cyst (1)_mask.png" in text
    assert f"{len(made['copies'])} flipped / rotated / augmented copies" in text
    assert "colour: 6 file(s)" in text and "unreadable: 0" in text
    n_total = len(made["scans"]) + len(made["copies"])
    assert lines[0].endswith(f"{n_total + len(made['masks'])} files found; {n_total} used")


def test_include_masks_keeps_them_and_says_so(suffix_tree) -> None:
    root, made = suffix_tree
    d = labelled_source_to_datalist(root, seed=0, include_masks=True)
    images = {it["image"] for it in _items(d)}
    assert set(made["masks"]) <= images and all(m.get("kept") for m in d["masks"])
    assert not any("mask" in it for it in _items(d))
    assert "masks kept as images (--include-masks)" in "\n".join(datalist_summary(d))


def test_splits_identical_apart_from_the_masks(suffix_tree, tmp_path) -> None:
    """The same scans with and without masks beside them give the same splits (the issue's BUSI check, in small)."""
    root, made = suffix_tree
    clean = tmp_path / "clean"
    for p in made["scans"] + made["copies"]:
        dst = clean / Path(p).relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(Path(p).read_bytes())
    with_masks, without = labelled_source_to_datalist(root, seed=4), labelled_source_to_datalist(clean, seed=4)
    for s in SPLITS:
        assert [Path(it["image"]).relative_to(root) for it in with_masks[s]] == \
               [Path(it["image"]).relative_to(clean) for it in without[s]]
        assert [it["group"] for it in with_masks[s]] == [it["group"] for it in without[s]]
    assert without["masks"] == [] and len(with_masks["masks"]) == len(made["masks"])


def test_masks_sibling_folder_layout(tmp_path) -> None:
    made = phantom.write_distributed_dataset(tmp_path / "d", n_per_class=6, size=40, masks="folders", flips=1,
                                             rotations=0)
    d = labelled_source_to_datalist(tmp_path / "d", seed=0)
    images = {it["image"] for it in _items(d)}
    assert not images & set(made["masks"]) and images == set(made["scans"] + made["copies"])
    assert all("inside a 'masks/' folder" in m["reason"] and m["scan"] in images for m in d["masks"])
    targets = {it["image"]: it.get("mask") for it in _items(d)}
    assert targets[str(tmp_path / "d" / "mass" / "images" / "mass (2).png")] == \
           str(tmp_path / "d" / "mass" / "masks" / "mass (2).png")


def test_top_level_images_and_masks_folders(tmp_path) -> None:
    """root/images/<class>/x.png + root/masks/<class>/x.png: the classes are those under images/."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("benign", "malignant")):
        for i in range(5):
            img, mask = phantom.make_image_with_mask(label + 1, 40, rng=rng)
            phantom.write_image(tmp_path / "ds" / "images" / name / f"{i:03d}.png", img)
            phantom.write_image(tmp_path / "ds" / "masks" / name / f"{i:03d}.png", mask)
    d = labelled_source_to_datalist(tmp_path / "ds", seed=0)
    assert d["classes"] == ["benign", "malignant"] and len(_items(d)) == 10 and len(d["masks"]) == 10
    assert all("/images/" in it["image"] and "/masks/" in it["mask"] for it in _items(d))


def test_content_masks_need_a_companion_scan(tmp_path) -> None:
    """A binary image with an unusual name is a mask when its scan is beside it (PNG or JPEG), a scan otherwise."""
    root = phantom.write_labelled_folder(tmp_path / "t", n_per_class=4, size=40, seed=1)
    img, mask = phantom.make_image_with_mask(1, 40, rng=3)
    phantom.write_image(root / "cyst" / "case7.png", img)
    phantom.write_image(root / "cyst" / "case7 contour.png", mask)  # no mask word: found by content
    phantom.write_image(root / "mass" / "case8.png", phantom.make_image(2, 40, rng=4))
    Image.fromarray(np.flipud(mask)).save(root / "mass" / "case8-outline.jpg", quality=80)  # JPEG ringing
    lonely = root / "normal" / "phantom target.png"  # few-valued but no scan of that name: stays
    phantom.write_image(lonely, (np.indices((40, 40)).sum(0) % 9 * 20).astype(np.uint8))
    d = labelled_source_to_datalist(root, seed=0)
    got = {Path(m["path"]).name: m for m in d["masks"]}
    assert set(got) == {"case7 contour.png", "case8-outline.jpg"}
    assert got["case7 contour.png"]["scan"].endswith("case7.png") and "content" in got["case7 contour.png"]["reason"]
    assert "binary" in got["case8-outline.jpg"]["reason"]
    assert str(lonely) in {it["image"] for it in _items(d)}


def test_flipped_and_turned_copies_grouped_by_content(tmp_path) -> None:
    """Near-duplicate grouping is invariant to flips and quarter turns (copies without a telling name)."""
    root = phantom.write_labelled_folder(tmp_path / "t", n_per_class=12, size=48, seed=2)
    src = np.array(Image.open(root / "mass" / "mass_0003.png"))
    variants = {"a.png": np.fliplr(src), "b.png": np.flipud(src), "c.png": np.rot90(src), "d.png": src.T}
    for name, arr in variants.items():
        Image.fromarray(np.ascontiguousarray(arr)).save(root / "mass" / name)
    d = labelled_source_to_datalist(root, seed=0)
    by_image = {it["image"]: it for it in _items(d)}
    group = by_image[str(root / "mass" / "mass_0003.png")]["group"]
    assert group is not None and all(by_image[str(root / "mass" / n)]["group"] == group for n in variants)
    assert len({_split_of(d)[str(root / "mass" / n)] for n in [*variants, "mass_0003.png"]}) == 1
    reasons = " ".join(r["reason"] for r in d["grouped"])
    assert "mirrored left-right" in reasons and "mirrored top-bottom" in reasons and "turned 90" in reasons
    # other images stay apart: only the copies joined that group
    assert sum(1 for it in _items(d) if it["group"] == group) == 5


def test_old_datalists_still_read(tmp_path) -> None:
    old = {"classes": ["a", "b"], "training": [{"image": "x.png", "label": 0, "group": None}], "validation": [],
           "test": [], "removed_duplicates": [
               {"path": "/d/u.png", "duplicate_of": None, "reason": "unreadable: cannot read /d/u.png (bad)"},
               {"path": "/d/c.png", "duplicate_of": "/d/x.png", "reason": "exact duplicate (same decoded pixels)"},
               {"path": "/d/n.png", "duplicate_of": "/d/x.png", "reason": "near-duplicate (grouped, kept)"}]}
    save_datalist(old, tmp_path / "old.json")
    phantom.write_image(tmp_path / "x.png", phantom.make_image(0, 32, rng=0))  # listed images must exist
    d = load_datalist(tmp_path / "old.json")
    assert "removed_duplicates" not in d
    assert [r["path"] for r in d["removed"]] == ["/d/c.png"] and [r["path"] for r in d["grouped"]] == ["/d/n.png"]
    assert d["unreadable"] == [{"path": "/d/u.png", "reason": "cannot read /d/u.png (bad)"}]
    text = "\n".join(datalist_summary(d))
    assert "exact duplicates removed: 1" in text and "unreadable: 1" in text


# --------------------------------------------------------------------------------- prepare / predict / finetune
def test_prepare_leaves_masks_out_and_reports_them(suffix_tree, tmp_path, capsys) -> None:
    root, made = suffix_tree
    extra = tmp_path / "extra"
    img, mask = phantom.make_image_with_mask(2, 48, rng=9)
    phantom.write_image(extra / "scan9.png", img)
    phantom.write_image(extra / "scan9 outline.png", mask)  # only its content says it is a mask
    assert cli.main(["prepare", str(root), str(extra), "--out", str(tmp_path / "c"), "--image-size", "32",
                     "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    masks = {m["path"]: m for m in rep["masks"]}
    assert set(masks) == set(made["masks"]) | {str(extra / "scan9 outline.png")}
    assert masks[str(extra / "scan9 outline.png")]["scan"] == str(extra / "scan9.png")
    sources = {json.loads(line)["source"] for line in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()}
    assert not sources & set(masks) and len(sources) == len(made["scans"]) + len(made["copies"]) + 1
    assert f"masks / annotation files by name: {len(made['masks'])} left out" in out
    assert f"left out {len(made['masks']) + 1} segmentation masks" in out and "1 by content" in out
    assert "colour: 6 files carry colour pixels" in out
    # a resumed run does not read them again and still reports them; --include-masks keeps them
    assert cli.main(["prepare", str(root), str(extra), "--out", str(tmp_path / "c"), "--image-size", "32",
                     "--workers", "1", "--no-progress"]) == 0
    assert f"left out {len(made['masks']) + 1} segmentation masks" in capsys.readouterr().out
    assert cli.main(["prepare", str(root), "--out", str(tmp_path / "k"), "--image-size", "32", "--workers", "1",
                     "--no-progress", "--include-masks"]) == 0
    kept = json.loads((tmp_path / "k" / "report.json").read_text())
    assert kept["masks_excluded"] == 0 and kept["sources_read"] == len(made["scans"] + made["copies"] + made["masks"])


def test_predict_folder_walk_leaves_masks_out(suffix_tree) -> None:
    from usfmae_core.workflows.predict import collect_inputs

    root, made = suffix_tree
    files, skipped = collect_inputs([root / "mass"])
    assert not {str(f) for f in files} & set(made["masks"])
    assert sorted(s["source"] for s in skipped if s.get("mask")) == sorted(m for m in made["masks"] if "/mass/" in m)
    files, _ = collect_inputs([root / "mass"], include_masks=True)
    assert {m for m in made["masks"] if "/mass/" in m} <= {str(f) for f in files}
    mask = next(m for m in made["masks"] if "/mass/" in m)
    assert [str(f) for f in collect_inputs([mask])[0]] == [mask]  # a file named explicitly is classified


def test_finetune_prints_the_summary_and_stores_the_masks(suffix_tree, tmp_path, capsys) -> None:
    root, made = suffix_tree
    run = tmp_path / "run"
    assert cli.main(["finetune", "--data", str(root), "--out", str(run), "--epochs", "1", "--preset", "vit_test",
                     "--image-size", "32", "--patch-size", "8", "--batch-size", "8", "--warmup-epochs", "0",
                     "--device", "cpu", "--precision", "fp32", "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert f"masks excluded: {len(made['masks'])}" in out and "near-duplicates grouped" in out
    assert "class" in out and "train" in out and "test" in out
    d = json.loads((run / "datalist.json").read_text())
    assert len(d["masks"]) == len(made["masks"]) and any("mask" in it for it in d["training"])


# ------------------------------------------------------------------------------------------- real data (BUSI)
def _busi_with_masks(src: Path, root: Path) -> list[str]:
    """``src`` (BUSI as in ../shared/data) copied to ``root`` with masks beside the scans as BUSI ships them:
    ``<scan>_mask.png`` (0 / 255, the scan's size; all black for ``normal``) and ``_mask_1`` for some lesions."""
    import shutil

    rng = np.random.default_rng(0)
    masks = []
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        for i, scan in enumerate(sorted(cls.glob("*.png"))):
            (root / cls.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(scan, root / cls.name / scan.name)
            w, h = Image.open(scan).size
            yy, xx = np.mgrid[:h, :w]
            names = [f"{scan.stem}_mask.png"] + ([f"{scan.stem}_mask_1.png"] if cls.name != "normal" and i % 25 == 0
                                                  else [])
            for name in names:
                cy, cx, ry, rx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, h / 8, w / 6
                lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1 if cls.name != "normal" else 0 * yy
                Image.fromarray((lesion * 255).astype(np.uint8)).save(root / cls.name / name)
                masks.append(str(root / cls.name / name))
    return masks


@pytest.mark.shared_data
def test_busi_with_its_masks_splits_as_without(shared_data: Path, tmp_path: Path) -> None:
    """The issue's check on real scans: BUSI with masks beside every scan (as distributed) gives the splits, groups
    and removals of BUSI without them; every mask is a ``"mask"`` target of its scan, none is an item."""
    src = shared_data / "busi_256"
    if not src.is_dir():
        pytest.skip(f"BUSI not found under {shared_data}")
    root = tmp_path / "busi"
    masks = _busi_with_masks(src, root)
    with_masks = labelled_source_to_datalist(root, seed=0)
    without = labelled_source_to_datalist(src, seed=0)
    for s in SPLITS:
        assert [Path(it["image"]).relative_to(root) for it in with_masks[s]] == \
               [Path(it["image"]).relative_to(src) for it in without[s]]
        assert [it["group"] is None for it in with_masks[s]] == [it["group"] is None for it in without[s]]
    for key in ("removed", "grouped"):
        assert [Path(r["path"]).name for r in with_masks[key]] == [Path(r["path"]).name for r in without[key]]
    items = _items(with_masks)
    assert len(items) == 778 and not {it["image"] for it in items} & set(masks)
    assert sorted(m["path"] for m in with_masks["masks"]) == sorted(masks)
    targets = [m for it in items for m in ([it["mask"]] if isinstance(it.get("mask"), str) else it.get("mask", []))]
    images = {it["image"] for it in items}
    of_items = [m for m in masks if m.rsplit("_mask", 1)[0] + ".png" in images]  # not those of removed duplicates
    assert sorted(targets) == sorted(of_items) and len(of_items) >= len(masks) - 4
    text = "\n".join(datalist_summary(with_masks))
    assert f"masks excluded: {len(masks)} ({len(masks)} kept as the segmentation target" in text
    assert "780 files found" not in text and f"{780 + len(masks)} files found; 778 used" in text
