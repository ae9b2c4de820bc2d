"""``usfmae evaluate`` and the metric functions: NumPy metrics equal scikit-learn's on fixed predictions;
evaluation of a tiny fine-tuned classifier on phantom data end to end (files, consistency, class-order mapping,
volumes and cines); error cases."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from usfmae_core import cli
from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
from usfmae_core.data import phantom
from usfmae_core.networks.mae import USFMAE
from usfmae_core.networks.presets import mae_config
from usfmae_core.workflows import metrics as M
from usfmae_core.workflows.evaluate import load_predictions
from usfmae_core.workflows.finetune import FinetuneOptions, finetune


# ------------------------------------------------------------------------------------- metrics against sklearn
def _fixed_predictions(k: int, n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present (roc_auc_score needs it)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.uniform(0, 1, (n, 1))
    if ties:
        logits = np.round(logits, 0)  # many tied scores
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("k,n,seed,ties", [(2, 40, 0, False), (2, 57, 1, True), (3, 90, 2, False), (3, 31, 3, True),
                                           (5, 150, 4, False)])
def test_metrics_equal_sklearn(k: int, n: int, seed: int, ties: bool) -> None:
    y, p = _fixed_predictions(k, n, seed, ties)
    pred = p.argmax(1)
    m = M.classification_metrics(y, p, [f"c{i}" for i in range(k)])
    labels = list(range(k))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i in range(k):
        pc = m["per_class"][f"c{i}"]
        got = (pc["precision"], pc["recall"], pc["f1"], pc["support"])
        assert got == pytest.approx((prec[i], rec[i], f1[i], sup[i]))
    macro = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    assert (m["precision_macro"], m["recall_macro"], m["f1_macro"]) == pytest.approx(macro[:3])
    auc = skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr")
    assert m["auc_macro"] == pytest.approx(auc, abs=1e-12)
    if k > 2:
        per = [skm.roc_auc_score(y == i, p[:, i]) for i in range(k)]
        assert [m["per_class"][f"c{i}"]["auc"] for i in range(k)] == pytest.approx(per)
    np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=labels))
    fpr, tpr = M.roc_curve(y == 0, p[:, 0])
    fpr_sk, tpr_sk, _ = skm.roc_curve(y == 0, p[:, 0], drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_sk)
    np.testing.assert_allclose(tpr, tpr_sk)


def test_metrics_class_never_predicted_or_absent() -> None:
    # class 2 is never predicted (precision 0 by sklearn's zero_division=0); class 3 is absent from y_true
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    p = np.array([[.8, .1, .05, .05], [.3, .6, .05, .05], [.2, .7, .05, .05], [.6, .3, .05, .05],
                  [.5, .4, .05, .05], [.1, .8, .05, .05], [.7, .2, .05, .05], [.2, .2, .1, .5]])
    pred = p.argmax(1)
    m = M.classification_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    f1 = skm.f1_score(y, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)
    assert m["f1_macro"] == pytest.approx(f1)
    assert np.isnan(m["per_class"]["3"]["auc"])  # undefined: no positive case
    assert m["auc_macro"] == pytest.approx(np.mean([skm.roc_auc_score(y == i, p[:, i]) for i in range(3)]))


def test_bootstrap_intervals_seeded_and_sane() -> None:
    y, p = _fixed_predictions(3, 120, 7)
    a = M.bootstrap_intervals(y, p, 300, seed=5)
    b = M.bootstrap_intervals(y, p, 300, seed=5)
    c = M.bootstrap_intervals(y, p, 300, seed=6)
    assert a == b and a != c
    point = M.summary_metrics(y, p)
    for key in M.SUMMARY_KEYS:
        lo, hi = a[key]
        assert 0.0 <= lo <= point[key] <= hi <= 1.0, key
    # four times the cases -> roughly half the width
    y4, p4 = np.tile(y, 4), np.tile(p, (4, 1))
    wide = np.diff(a["accuracy"])[0]
    narrow = np.diff(M.bootstrap_intervals(y4, p4, 300, seed=5)["accuracy"])[0]
    assert 0.3 * wide < narrow < 0.8 * wide


def test_bootstrap_mean_difference_paired() -> None:
    y, p = _fixed_predictions(3, 150, 3)
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    one = M.bootstrap_mean_difference([(y, p)], None, 300, seed=1)
    assert one["f1_macro"]["mean"] == pytest.approx(M.summary_metrics(y, p)["f1_macro"])
    lo, hi = one["accuracy"]["ci95"]
    assert [lo, hi] == pytest.approx(M.bootstrap_intervals(y, p, 300, seed=1)["accuracy"], abs=0.03)
    # a run minus itself is exactly 0 in every resample: pairing is kept
    same = M.bootstrap_mean_difference([(y, p)], [(y, p)], 200)
    assert same["f1_macro"] == {"n": 1, "mean": 0.0, "ci95": [0.0, 0.0]}
    # perfect predictions beat the fixed ones, and the interval excludes 0
    d = M.bootstrap_mean_difference([(y, perfect)], [(y, p)], 300)["f1_macro"]
    assert d["mean"] == pytest.approx(1.0 - M.summary_metrics(y, p)["f1_macro"])
    assert 0.0 < d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # two runs: the mean of their metrics
    two = M.bootstrap_mean_difference([(y, p), (y, perfect)], None, 50)["accuracy"]["mean"]
    assert two == pytest.approx((M.summary_metrics(y, p)["accuracy"] + 1.0) / 2)
    with pytest.raises(ValueError, match="same test cases"):
        M.bootstrap_mean_difference([(y, p)], [(y[:10], p[:10])])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(labelled phantom folder, run folder of a tiny ViT trained for 2 epochs)."""
    root = tmp_path_factory.mktemp("eval")
    data = phantom.write_labelled_folder(root / "labelled", n_per_class=8, size=32, seed=4)
    run = root / "run"
    finetune(data, run, FinetuneOptions(preset="vit_test", image_size=32, patch_size=8, epochs=2, warmup_epochs=1,
                                        batch_size=8, lr=1e-3, precision="fp32", device="cpu", quiet=True,
                                        tensorboard=False))
    return data, run


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_cli_end_to_end(trained: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _data, run = trained
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", "--model", str(run / "model.pt"), "--data", str(run / "datalist.json"),
                   "--out", str(out), "--bootstrap", "200", "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    assert "macro-F1" in capsys.readouterr().out
    for name in ("metrics.json", "metrics.csv", "predictions.csv", "confusion_matrix.png", "roc.png", "config.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    res = json.loads((out / "metrics.json").read_text())
    datalist = json.loads((run / "datalist.json").read_text())
    classes = datalist["classes"]
    assert res["classes"] == classes == sorted(phantom.CLASSES)
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == res["n"] == len(datalist["test"]) > 0
    assert {r["image"] for r in rows} == {it["image"] for it in datalist["test"]}
    # the JSON metrics are those of the per-image probabilities written to the CSV
    y = np.array([classes.index(r["true"]) for r in rows])
    truth = {it["image"]: classes[it["label"]] for it in datalist["test"]}
    assert all(truth[r["image"]] == r["true"] for r in rows)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)), abs=1e-9)
    assert res["f1_macro"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro", zero_division=0,
                                                         labels=[0, 1, 2]), abs=1e-5)
    assert np.array(res["confusion_matrix"]).sum() == res["n"]
    assert res["bootstrap"]["resamples"] == 200
    lo, hi = res["intervals"]["accuracy"]
    assert lo <= res["accuracy"] <= hi
    images, y_back, p_back, classes_back = load_predictions(out)  # the reader matches the writer
    assert images == [r["image"] for r in rows] and classes_back == classes
    np.testing.assert_array_equal(y_back, y)
    np.testing.assert_allclose(p_back, p)
    table = _read_csv(out / "metrics.csv")
    assert {r["metric"] for r in table} >= set(M.SUMMARY_KEYS) | {"support"}
    assert {r["class"] for r in table if r["class"]} == set(classes)
    for png in ("confusion_matrix.png", "roc.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_evaluate_maps_classes_by_name(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A datalist listing the same classes in another order gives the same metrics (labels mapped by name)."""
    from usfmae_core.workflows.evaluate import evaluate

    _, run = trained
    d = json.loads((run / "datalist.json").read_text())
    order = list(reversed(d["classes"]))
    remap = {i: order.index(c) for i, c in enumerate(d["classes"])}
    shuffled = {"classes": order, **{s: [{**it, "label": remap[it["label"]]} for it in d[s]]
                                     for s in ("training", "validation", "test")}}
    (tmp_path / "reordered.json").write_text(json.dumps(shuffled))
    kw = {"split": "all", "bootstrap": 0, "device": "cpu", "precision": "fp32", "quiet": True}
    a = evaluate(run / "model.pt", run / "datalist.json", tmp_path / "a", **kw)
    b = evaluate(run / "model.pt", tmp_path / "reordered.json", tmp_path / "b", **kw)
    assert a["n"] == b["n"] == sum(len(d[s]) for s in ("training", "validation", "test"))
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["f1_macro"] == b["f1_macro"]
    # a CSV manifest (path, label name) of the same images reads the same way
    rows = [(it["image"], d["classes"][it["label"]]) for s in ("training", "validation", "test") for it in d[s]]
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    c = evaluate(run / "model.pt", tmp_path / "m.csv", tmp_path / "c", **kw)
    assert c["n"] == a["n"] and c["confusion_matrix"] == a["confusion_matrix"]


def test_evaluate_volume_and_cine_use_middle_frame(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A labelled volume / cine is classified on its middle slice / frame, preprocessed as in training."""
    from usfmae_core.checkpoints import load_model
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.transforms import Preprocessing, frames_to_tensor
    from usfmae_core.workflows.evaluate import evaluate

    _, run = trained
    classes = json.loads((run / "datalist.json").read_text())["classes"]
    vol = phantom.write_volume(tmp_path / "vol.nii.gz", phantom.make_volume(1, (9, 40, 40), rng=0), (1.0, 0.5, 0.5))
    cine = phantom.write_cine(tmp_path / "clip.seq.nrrd", phantom.make_cine(2, frames=5, size=40, rng=1))
    items = [{"image": str(vol), "label": classes.index(phantom.CLASSES[1])},
             {"image": str(cine), "label": classes.index(phantom.CLASSES[2])}]
    (tmp_path / "d.json").write_text(json.dumps({"classes": classes, "training": items, "validation": [], "test": []}))
    evaluate(run / "model.pt", tmp_path / "d.json", tmp_path / "ev", split="all", bootstrap=0, device="cpu",
             precision="fp32", quiet=True)
    rows = _read_csv(tmp_path / "ev" / "predictions.csv")
    assert [r["image"] for r in rows] == [it["image"] for it in items]
    model, ckpt = load_model(run / "model.pt")
    prep = Preprocessing.from_dict(ckpt["config"]["preprocessing"])
    for row in rows:
        a = read_ultrasound(row["image"]).array
        assert a.ndim == 3
        with torch.no_grad():
            want = torch.softmax(model.eval()(frames_to_tensor(a[a.shape[0] // 2], prep)), 1)[0].numpy()
        got = np.array([float(row[f"prob_{c}"]) for c in classes])
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_evaluate_errors(trained: tuple[Path, Path], tmp_path: Path, cli_error: Callable[..., str]) -> None:
    data, run = trained
    out = tmp_path / "eval"
    # an MAE checkpoint is not a classifier
    mae = USFMAE(**mae_config("vit_test", img_size=32, patch_size=8))
    save_checkpoint(tmp_path / "mae.pt", make_checkpoint(mae, "mae", mae_config("vit_test", img_size=32, patch_size=8)))
    cli_error(["evaluate", "--model", str(tmp_path / "mae.pt"), "--data", str(data), "--out", str(out),
              "--device", "cpu"], "mae", "classifier")
    # data whose classes differ from the model's: one class folder renamed
    other = tmp_path / "other"
    for i, name in enumerate(("cyst", "mass", "tumour")):
        phantom.write_image(other / name / f"{name}_{i}.png", phantom.make_image(i, 32, rng=i))
        phantom.write_image(other / name / f"{name}_{i}b.png", phantom.make_image(i, 32, rng=10 + i))
    cli_error(["evaluate", "--model", str(run / "model.pt"), "--data", str(other), "--split", "all", "--out",
              str(out), "--device", "cpu"], "tumour", "normal", "do not match")
    # missing data folder and missing model
    cli_error(["evaluate", "--model", str(run / "model.pt"), "--data", str(tmp_path / "nope"), "--out", str(out),
              "--device", "cpu"], "nope", "does not exist")
    cli_error(["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(data), "--out", str(out),
              "--device", "cpu"], "none.pt")
    assert not out.exists()  # nothing half-written
