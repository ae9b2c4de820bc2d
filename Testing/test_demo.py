"""``usfmae demo`` (the README's main job) end to end at a small scale, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # a relative --out, as `make demo` runs it (every step's files must resolve from their own run folders)
    proc = subprocess.run([sys.executable, "-m", "usfmae_core.cli", "demo", "--scale", "0.1", "--out", "demo",
                           "--device", "cpu"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    # the three arms are reported with numbers, and the verdict is one of the honest outcomes
    for arm in ("MAE-pretrained ViT", "ViT from scratch", "ResNet-10"):
        assert re.search(rf"\| {re.escape(arm)}[^|]*\| \d+ \| (0\.\d+|1\.0)", report), arm
    verdicts = ("Pretraining helped", "did not help", "No clear difference", "Neither ViT learned")
    assert sum(v in report for v in verdicts) == 1
    assert "Neither ViT learned" in report or "paired bootstrap 95% CI" in report
    # every picture the report shows exists, the learning curves and per-slice probabilities among them
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"learning_curves.png", "predict/slice_probabilities.png"} <= set(pictures)
    assert all((out / p).is_file() for p in pictures)
    # each step left its own outputs: corpus, MAE, classifiers, evaluation, per-slice volume predictions
    assert (out / "corpus" / "corpus.json").is_file() and (out / "pretrain" / "model.pt").is_file()
    rows = (out / "predict" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 24  # header + one row per slice of the 24-slice phantom volume
    # the 3D part: a volume classifier (attention MIL from the same MAE) trained on phantom volumes with one label
    # each, its held-out result beside the 2D classifier's mean of slices on the same volumes, and its attention
    assert "## One label per volume" in report
    held_out = json.loads((out / "finetune_volume" / "datalist.json").read_text())["test"]
    for approach in ("attention MIL volume classifier", "2D classifier, mean of slices"):
        row = re.search(rf"\| {approach}[^|]*\| (\d+) / (\d+) \| (\d+) / (\d+) \| (\d+) / (\d+) \|", report)
        assert row, approach
        right, n, found, masses, normal, normals = map(int, row.groups())
        assert n == len(held_out) == masses + normals and right == found + normal and masses and normals
    volume_model = json.loads((out / "eval_volume" / "metrics.json").read_text())
    assert volume_model["volume_model"] == "mil" and volume_model["n"] == len(held_out)
    assert "predict_volume_mil/attention.png" in pictures
    attention = (out / "predict_volume_mil" / "attention.csv").read_text().strip().splitlines()
    assert len(attention) == 1 + 24  # every informative slice of the demo's mass volume has a weight
