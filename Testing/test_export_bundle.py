"""``usfmae export-bundle``: a fine-tuned run -> a complete MONAI bundle that MONAI's checks, ``monai.bundle run``,
``usfmae predict`` and the engine's model loading accept.

One tiny real run (``usfmae finetune`` on phantom class folders, ``vit_test`` shape at 32 px, 2 epochs) is exported
once per module; each test checks one surface on a copy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("USFMAE_PROGRESS_LINES", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from usfmae_core import cli
    from usfmae_core.data import phantom

    root = tmp_path_factory.mktemp("export")
    phantom.write_labelled_folder(root / "labelled", n_per_class=8, size=40, seed=1)
    scans = root / "scans"
    scans.mkdir()
    shutil.copy(root / "labelled" / "mass" / "mass_0000.png", scans / "m.png")
    phantom.write_volume(scans / "vol.nii.gz", phantom.make_volume(1, (5, 40, 40), 2))
    from PIL import Image  # a 1.8:1 colour screen export: letterbox and colour must match in bundle and predict

    Image.fromarray(phantom.screen_capture(phantom.make_image(2, 40, rng=3), rng=3)).save(scans / "screen.jpg")
    assert cli.main(["finetune", "--data", str(root / "labelled"), "--out", str(root / "run"), "--preset",
                     "vit_test", "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                     "--precision", "fp32", "--workers", "0", "--no-tensorboard"]) == 0
    assert cli.main(["export-bundle", str(root / "run"), "--out", str(root / "phantom_cls"), "--data-source",
                     "synthetic phantom images (usfmae_core.data.phantom)", "--data-license", "none (generated)",
                     "--version", "0.3.0"]) == 0
    return {"root": root, "run": root / "run", "bundle": root / "phantom_cls", "scans": scans,
            "labelled": root / "labelled"}


def test_bundle_holds_the_run(exported: dict[str, Path]) -> None:
    """Classes, size and network from the run; its real test metrics; sha256 of the weights; a model card."""
    import yaml

    from usfmae_core.checkpoints import load_checkpoint

    bundle, run = exported["bundle"], exported["run"]
    ckpt = load_checkpoint(run / "model.pt")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    result = json.loads((run / "metrics.json").read_text())
    assert meta["version"] == "0.3.0" and "0.3.0" in meta["changelog"]
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == ckpt["config"]["classes"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert meta["eval_metrics"]["test_f1_macro"] == round(result["test"]["f1_macro"], 4)
    assert meta["eval_metrics"]["test_images"] == result["test"]["n"]
    assert meta["data_source"].startswith("synthetic phantom") and "Not a medical device" in meta["intended_use"]
    net = json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]
    assert (net["hidden_size"], net["num_layers"], net["num_heads"]) == (48, 2, 3)
    large = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert {f["path"] for f in large} == {"models/model.pt", "models/model.ts"}
    for f in large:
        assert f["hash_val"] == hashlib.sha256((bundle / f["path"]).read_bytes()).hexdigest()
        assert f["url"].startswith("https://") and "REPLACE" in f["url"]
    card = (bundle / "docs" / "README.md").read_text()
    for part in ("## Model Overview", "## Data", "## Training", "## Input and output", "## Performance",
                 "pip install usfmae", "TensorRT", "## References", "## License"):
        assert part in card, part
    assert f"{result['test']['f1_macro']:.4g}" in card
    assert not (bundle / "configs" / "pretrain.json").exists()
    for name in ("metadata.json", "inference.json", "train.json"):  # the Model Zoo's pretty-format-json
        text = (bundle / "configs" / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", name


def test_monai_checks_pass(exported: dict[str, Path], tmp_path: Path) -> None:
    """verify_metadata (schema), verify_net_in_out, ckpt_export and ``monai.bundle.load`` from the files alone."""
    from monai.bundle import load

    bundle = Path(shutil.copytree(exported["bundle"], tmp_path / "phantom_cls"))
    c = bundle / "configs"
    if SCHEMA.exists():
        (bundle / "eval").mkdir()
        shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
        proc = _run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(c / "metadata.json"),
                     "--filepath", str(bundle / "eval" / "schema.json")], bundle)
        assert "metadata is verified with no error" in proc.stdout + proc.stderr
    proc = _run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def", "--meta_file",
                 str(c / "metadata.json"), "--config_file", str(c / "inference.json"), "--bundle_root", str(bundle),
                 "--device", "cpu"], bundle)
    assert "verified with no error" in proc.stdout + proc.stderr
    _run([sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath",
          str(tmp_path / "again.ts"), "--ckpt_file", str(bundle / "models" / "model.pt"), "--meta_file",
          str(c / "metadata.json"), "--config_file", str(c / "inference.json"), "--bundle_root", str(bundle)], bundle)
    net = load(name=bundle.name, bundle_dir=str(tmp_path), device="cpu")
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net.eval()(x), atol=1e-5, rtol=1e-4)


def test_bundle_inference_equals_usfmae_predict_on_the_bundle(exported: dict[str, Path], tmp_path: Path) -> None:
    """``python -m monai.bundle run`` (inference.json) and ``usfmae predict BUNDLE`` give the same probabilities."""
    bundle = Path(shutil.copytree(exported["bundle"], tmp_path / "phantom_cls"))
    c = bundle / "configs"
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(c / "inference.json"), "--meta_file",
          str(c / "metadata.json"), "--logging_file", str(c / "logging.conf"), "--bundle_root", str(bundle),
          "--dataset_dir", str(exported["scans"]), "--num_workers", "0"], bundle)
    monai_csv = (bundle / "eval" / "predictions.csv").read_text().splitlines()
    monai_rows = {Path(r["source"]).name: r for r in csv.DictReader(monai_csv)}
    _run([sys.executable, "-m", "usfmae_core.cli", "predict", str(bundle), str(exported["scans"]), "--out",
          str(tmp_path / "pred"), "--device", "cpu", "--precision", "fp32"], tmp_path)
    ours_csv = (tmp_path / "pred" / "summary.csv").read_text().splitlines()
    rows = {Path(r["source"]).name: r for r in csv.DictReader(ours_csv)}
    assert set(rows) == set(monai_rows) == {"m.png", "vol.nii.gz", "screen.jpg"}
    inference = json.loads((c / "inference.json").read_text())
    assert (inference["resize"], inference["crop_sector"], inference["colour"]) == ("letterbox", False, "rgb")
    classes = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    for name, row in rows.items():
        for c_name in classes["channel_def"].values():
            assert float(row[f"p_{c_name}"]) == pytest.approx(float(monai_rows[name][f"p_{c_name}"]), abs=2e-5)


def test_bundle_evaluates_and_imports_as_a_model(exported: dict[str, Path], tmp_path: Path) -> None:
    """evaluate.json on labelled data; ``usfmae import-weights`` of the bundle folder (what the Slicer module's model
    import does) gives a checkpoint with the same outputs as the run's own model."""
    from usfmae_core.checkpoints import load_model

    bundle = Path(shutil.copytree(exported["bundle"], tmp_path / "phantom_cls"))
    c = bundle / "configs"
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
          f"['{c / 'train.json'}','{c / 'evaluate.json'}']", "--meta_file", str(c / "metadata.json"),
          "--logging_file", str(c / "logging.conf"), "--bundle_root", str(bundle), "--dataset_dir",
          str(exported["labelled"]), "--num_workers", "0", "--bootstrap", "20", "--eval_split", "all"], bundle)
    metrics = json.loads((bundle / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["classes"] == ["cyst", "mass", "normal"]
    _run([sys.executable, "-m", "usfmae_core.cli", "import-weights", str(bundle), "--out", str(tmp_path / "m.pt")],
         tmp_path)
    # the Slicer module picks the bundle's models/model.pt: alone it is foreign weights, converted with the bundle
    from usfmae_core.checkpoints import import_weights
    from usfmae_core.errors import UsfmaeError

    with pytest.raises(UsfmaeError, match="import-weights"):
        load_model(bundle / "models" / "model.pt")
    import_weights(bundle / "models" / "model.pt", tmp_path / "m2.pt")
    b, cb = load_model(exported["run"] / "model.pt", expect="classifier")
    imported = load_model(tmp_path / "m.pt", expect="classifier")[1]["config"]
    assert imported["preprocessing"] == cb["config"]["preprocessing"]  # resize / crop / colour rules too
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for path in (tmp_path / "m.pt", tmp_path / "m2.pt"):
            a, ckpt = load_model(path, expect="classifier")
            assert ckpt["config"]["classes"] == ["cyst", "mass", "normal"]
            np.testing.assert_allclose(a.eval()(x).numpy(), b.eval()(x).numpy(), atol=1e-6)


def test_export_refuses_what_it_cannot_share(exported: dict[str, Path], tmp_path: Path, cli_error) -> None:
    """No data source, an existing bundle folder, and a folder that is not a run: one line each."""
    run = str(exported["run"])
    cli_error(["export-bundle", run, "--out", str(tmp_path / "b"), "--data-source", " "], "no data source")
    cli_error(["export-bundle", run, "--out", str(exported["bundle"]), "--data-source", "x"], "not empty", "--force")
    cli_error(["export-bundle", str(tmp_path), "--out", str(tmp_path / "c"), "--data-source", "x"], "no model.pt")


def test_bundle_names_no_path_of_the_authors_machine(exported: dict[str, Path], tmp_path: Path) -> None:
    """A shared bundle says which MAE the run started from by its file name, never by a path on the author's machine
    (the run's config.json keeps the full --init path)."""
    run = Path(shutil.copytree(exported["run"], tmp_path / "run"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["init"] = "/home/alice/private_study/mae_usf_100.pt"
    (run / "config.json").write_text(json.dumps(cfg))
    _run([sys.executable, "-m", "usfmae_core.cli", "export-bundle", str(run), "--out", str(tmp_path / "b"),
          "--data-source", "synthetic phantom images", "--no-torchscript"], tmp_path)
    texts = {p: p.read_text() for p in (tmp_path / "b").rglob("*") if p.suffix in (".json", ".md", ".yml", ".txt")}
    assert any("mae_usf_100.pt" in t for t in texts.values())
    assert not [p for p, t in texts.items() if "/home/alice" in t or "private_study" in t]


def test_export_force_replaces_only_a_bundle_and_keeps_it_on_failure(exported: dict[str, Path], tmp_path: Path,
                                                                     cli_error, monkeypatch) -> None:
    """``--force`` never deletes a folder of other files; a re-export that fails half-way (here: the weights cannot
    be written) leaves the previous bundle untouched and no partial folder behind; one that succeeds replaces it."""
    from usfmae_core import cli

    run = str(exported["run"])
    mine = tmp_path / "my_documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    cli_error(["export-bundle", run, "--out", str(mine), "--data-source", "x", "--force"], "holds no MONAI bundle",
              "--force would delete")
    assert (mine / "thesis.txt").read_text() == "years of work"

    bundle = tmp_path / "b"
    shutil.copytree(exported["bundle"], bundle)
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(bundle / "models" / "model.pt"))

    monkeypatch.setattr("usfmae_core.bundle_support.save_state_dict", disk_full)
    cli_error(["export-bundle", run, "--out", str(bundle), "--data-source", "x", "--force", "--no-torchscript"],
              "No space left on device")
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "my_documents"]  # no partial folder left
    monkeypatch.undo()
    assert cli.main(["export-bundle", run, "--out", str(bundle), "--data-source", "new source", "--force",
                     "--no-torchscript"]) == 0
    assert "new source" in (bundle / "configs" / "metadata.json").read_text()
    assert not (bundle / "models" / "model.ts").exists()  # the old bundle's files are gone, not mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "my_documents"]
