"""Bad input, as a careless user and a failing machine give it: every case must end in ONE line
``usfmae: error: <cause>; <fix>`` with exit code 2 (never a traceback, never a hang), and lose nothing.

The cases are generated here (phantom images, tiny ``vit_test`` models at 32 px); nothing from ``../shared`` is
needed. They cover, by the causes of issue 12:

1. OS errors: ``--out`` a file, a folder where a file is expected, a file where a folder is expected, read-only,
   full disk (a small tmpfs in a private mount namespace, skipped with the reason where the machine cannot mount);
2. results never lost: file names that are not UTF-8 are written (escaped) to every CSV / JSON / the console;
3. run folders: finished, foreign and interrupted runs refused without --resume / --overwrite, conflicting --resume
   arguments, a lock per folder (two concurrent runs), a lock left by ``kill -9`` that does not block;
4. ``prepare`` on special files (dangling link, link loop, FIFO, unreadable folder, hidden names), a missing source,
   an empty folder;
5. unchecked inputs: datalist JSON / CSV content, numbers and cross-argument shapes, NaN / random / text / pickled
   checkpoints, corrupt or escaping corpus shards;
6. the MONAI bundle (``python -m monai.bundle run`` in a subprocess): missing / empty / one-class data, a bad
   ``pretrained_mae``, a missing model, an empty inference folder, an unreadable scan among good ones (skipped);
7. ``kill -9`` loops: ``finetune --resume`` ends with exactly the weights and metrics of an uninterrupted run, and
   ``prepare`` with exactly its corpus.

``test_count`` at the end prints how many bad-input cases this file runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from usfmae_core import cli
from usfmae_core.checkpoints import make_checkpoint, save_checkpoint, to_facebook_state_dict
from usfmae_core.data import phantom
from usfmae_core.data.corpus import prepare_corpus

REPO = Path(__file__).resolve().parents[1]
TINY_FT = ["--preset", "vit_test", "--image-size", "32", "--patch-size", "8", "--epochs", "1", "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-tensorboard"]
TINY_PT = ["--preset", "vit_test", "--patch-size", "8", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
           "--device", "cpu", "--max-steps", "4", "--picture-every", "0", "--log-every", "2"]
CLASSES = ["cyst", "mass", "normal"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("USFMAE_PROGRESS_LINES", None)
    return env


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``usfmae ARGV`` in this process: (exit code, stderr). A traceback propagates and fails the test."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argument errors exit from the parser
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *words: str) -> str:
    """Exit code 2, and stderr is exactly one ``usfmae: error:`` line containing every word (progress bars aside)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("usfmae: error:")]
    assert rc == 2, f"exit code {rc}:\n{err[-3000:]}"
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def run_sub(argv: list[str], cwd: Path = REPO, timeout: float = 300, prefix: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    cmd = [*(prefix or []), sys.executable, "-m", "usfmae_core.cli", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Phantom labelled folder, an image, a volume, a corpus, a tiny MAE and a tiny classifier checkpoint."""
    from usfmae_core.workflows.finetune import build_classifier
    from usfmae_core.workflows.pretrain import build_pretrain_model

    root = tmp_path_factory.mktemp("bad_inputs")
    labelled = phantom.write_labelled_folder(root / "labelled", n_per_class=6, size=40, seed=0)
    image = phantom.write_image(root / "scan.png", phantom.make_image(1, 48, rng=0))
    volume = phantom.write_volume(root / "volume.nii.gz", phantom.make_volume(1, (10, 40, 40), rng=0))
    prepare_corpus([labelled], root / "corpus", image_size=32, progress=False)
    torch.manual_seed(0)
    mae, mae_cfg = build_pretrain_model("vit_test", img_size=32, patch_size=8)
    save_checkpoint(root / "mae.pt", make_checkpoint(mae, "mae", mae_cfg))
    torch.save({"model": to_facebook_state_dict(mae.state_dict())}, root / "facebook_mae.pt")  # for import-weights
    clf, clf_cfg = build_classifier(3, preset="vit_test", image_size=32, patch_size=8)
    clf_cfg["classes"] = CLASSES
    save_checkpoint(root / "clf.pt", make_checkpoint(clf, "classifier", clf_cfg))
    truncated = root / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:200])
    random_bytes = root / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = root / "notes.pt"
    text.write_text("these are my notes, not a model\n")
    return SimpleNamespace(root=root, labelled=labelled, image=image, volume=volume, corpus=root / "corpus",
                           mae=root / "mae.pt", clf=root / "clf.pt", fb=root / "facebook_mae.pt", truncated=truncated,
                           random=random_bytes,
                           text=text)


@pytest.fixture(scope="module")
def finished(data: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished fine-tuning run and a finished pretraining run (1 epoch / 4 steps)."""
    root = tmp_path_factory.mktemp("finished")
    assert cli.main(["finetune", "--data", str(data.labelled), "--out", str(root / "ft"), *TINY_FT]) == 0
    assert cli.main(["pretrain", "--corpus", str(data.corpus), "--out", str(root / "pt"), *TINY_PT,
                     "--ckpt-every", "2"]) == 0
    return SimpleNamespace(ft=root / "ft", pt=root / "pt")


def _datalist(tmp: Path, data: SimpleNamespace, **change) -> Path:
    """A valid datalist of the phantom folder (3 classes), with ``change`` applied to its first training item."""
    from usfmae_core.data.labelled import labelled_source_to_datalist

    d = labelled_source_to_datalist(data.labelled, seed=0)
    d = {k: d[k] for k in ("classes", "training", "validation", "test")}
    item = d["training"][0]
    for k, v in change.items():
        if v is _DROP:
            item.pop(k, None)
        else:
            item[k] = v
    path = tmp / "datalist.json"
    path.write_text(json.dumps(d))
    return path


_DROP = object()


# --------------------------------------------------------------------------------- in-process bad-input cases
def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _nan_checkpoint(data: SimpleNamespace, tmp: Path) -> Path:
    ckpt = torch.load(data.clf, weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("nan"))
    return save_checkpoint(tmp / "nan.pt", ckpt)


def _missing_weights(path: Path, tmp: Path) -> Path:
    """A copy of checkpoint ``path`` without the weights of its second block (a truncated or hand-edited file)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if ".blocks.1." not in k}
    return save_checkpoint(tmp / "missing.pt", ckpt)


def _pickled(tmp: Path) -> Path:
    torch.save({"model": {}, "arch": "mae", "config": {}, "payload": _Evil()}, tmp / "evil.pt")
    return tmp / "evil.pt"


class _Evil:
    def __reduce__(self):  # what a malicious checkpoint would run
        return (print, ("pwned",))


def _corpus_copy(data: SimpleNamespace, tmp: Path, damage: Callable[[Path], None]) -> Path:
    dst = tmp / "corpus"
    shutil.copytree(data.corpus, dst)
    damage(dst)
    return dst


def _truncate_shard(c: Path) -> None:
    shard = min((c / "shards").glob("*.npy"))
    shard.write_bytes(shard.read_bytes()[:300])


def _escape_shard(c: Path) -> None:
    s = json.loads((c / "corpus.json").read_text())
    s["shards"][0]["file"] = "../../../etc/passwd"
    (c / "corpus.json").write_text(json.dumps(s))


def _csv(tmp: Path, data: SimpleNamespace, text: str | bytes) -> Path:
    imgs = sorted(data.labelled.rglob("*.png"))
    body = text if isinstance(text, bytes) else text.format(a=imgs[0], b=imgs[7], c=imgs[13])
    return _write(tmp / "labels.csv", body)


# Each case: (id, builder(data, tmp) -> (argv, words that the one line must contain)).
CASES: list[tuple[str, Callable[[SimpleNamespace, Path], tuple[list, tuple[str, ...]]]]] = [
    # 1. output paths that cannot be written
    ("predict-out-is-a-file", lambda d, t: (["predict", d.clf, d.image, "--out", _write(t / "f", "x")],
                                            ("is a file",))),
    ("embed-out-is-a-file", lambda d, t: (["embed", d.mae, d.image, "--out", _write(t / "f", "x")], ("is a file",))),
    ("reconstruct-out-is-a-file", lambda d, t: (["reconstruct", d.mae, d.image, "--out", _write(t / "f", "x")],
                                                ("is a file",))),
    ("evaluate-out-is-a-file", lambda d, t: (["evaluate", "--model", d.clf, "--data", d.labelled, "--split", "all",
                                              "--out", _write(t / "f", "x")], ("is a file",))),
    ("finetune-out-is-a-file", lambda d, t: (["finetune", "--data", d.labelled, "--out", _write(t / "f", "x"),
                                              *TINY_FT], ("is a file",))),
    ("pretrain-out-is-a-file", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", _write(t / "f", "x"),
                                              *TINY_PT], ("is a file",))),
    ("prepare-out-is-a-file", lambda d, t: (["prepare", d.labelled, "--out", _write(t / "f", "x")], ("is a file",))),
    ("predict-out-below-a-file", lambda d, t: (["predict", d.clf, d.image, "--out", _write(t / "f", "x") / "sub"],
                                               ("cannot access", "Not a directory"))),
    ("import-weights-over-an-existing-file", lambda d, t: (["import-weights", d.fb, "--out", _write(t / "m.pt", "x")],
                                                           ("already exists", "--overwrite"))),
    ("export-weights-over-an-existing-file", lambda d, t: (["export-weights", d.mae, "--out", _write(t / "w.pt", "x")],
                                                           ("already exists", "--overwrite"))),
    ("import-weights-out-is-a-folder", lambda d, t: (["import-weights", d.fb, "--out", t], ("a folder",))),
    ("export-weights-out-is-a-folder", lambda d, t: (["export-weights", d.mae, "--out", t], ("a folder",))),
    ("export-weights-out-below-a-file", lambda d, t: (["export-weights", d.mae, "--out", _write(t / "f", "x") / "w.pt"],
                                                      ("cannot access",))),
    # 3. run folders
    ("finetune-resume-and-overwrite", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", *TINY_FT,
                                                     "--resume", "--overwrite"], ("contradict",))),
    ("pretrain-resume-and-overwrite", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", *TINY_PT,
                                                     "--resume", "--overwrite"], ("contradict",))),
    ("evaluate-into-a-finetune-run", None),  # built by the test (needs the finished run)
    ("finetune-into-a-finished-run", None),
    ("pretrain-into-a-finished-run", None),
    ("pretrain-resume-other-preset", None),
    ("pretrain-resume-other-image-size", None),
    ("prepare-into-a-finetune-run", None),
    # 4. prepare: sources
    ("prepare-missing-source", lambda d, t: (["prepare", t / "nope", "--out", t / "c"], ("does not exist",))),
    ("prepare-empty-folder", lambda d, t: (["prepare", (t / "empty").mkdir() or t / "empty", "--out", t / "c"],
                                           ("no ultrasound files",))),
    ("prepare-only-bad-files", lambda d, t: (["prepare", (_write(t / "src" / "a.png", b"not a png") and
                                                          _write(t / "src" / "b.dcm", b"junk")).parent,
                                              "--out", t / "c", "--no-progress", "--workers", "1"],
                                             ("no frame could be prepared", "report.json"))),
    ("prepare-axes-5", lambda d, t: (["prepare", d.labelled, "--out", t / "c", "--axes", "5"], ("--axes",))),
    ("prepare-frame-stride-0", lambda d, t: (["prepare", d.labelled, "--out", t / "c", "--frame-stride", "0"],
                                             ("--frame-stride",))),
    ("prepare-image-size-8", lambda d, t: (["prepare", d.labelled, "--out", t / "c", "--image-size", "8"],
                                           ("too small",))),
    # 5. datalists
    ("datalist-item-without-label", lambda d, t: (["finetune", "--data", _datalist(t, d, label=_DROP), "--out",
                                                   t / "r", *TINY_FT], ("item 0",))),
    ("datalist-item-without-image", lambda d, t: (["finetune", "--data", _datalist(t, d, image=_DROP), "--out",
                                                   t / "r", *TINY_FT], ("item 0",))),
    ("datalist-missing-file", lambda d, t: (["finetune", "--data", _datalist(t, d, image=str(t / "gone.png")),
                                             "--out", t / "r", *TINY_FT], ("do not exist", "gone.png"))),
    ("datalist-label-out-of-range", lambda d, t: (["finetune", "--data", _datalist(t, d, label=7), "--out", t / "r",
                                                   *TINY_FT], ("outside the 3 class",))),
    ("datalist-negative-label", lambda d, t: (["finetune", "--data", _datalist(t, d, label=-1), "--out", t / "r",
                                               *TINY_FT], ("outside",))),
    ("datalist-unknown-class-name", lambda d, t: (["finetune", "--data", _datalist(t, d, label="tumour"), "--out",
                                                   t / "r", *TINY_FT], ("mixed",))),
    ("datalist-float-label", lambda d, t: (["finetune", "--data", _datalist(t, d, label=1.5), "--out", t / "r",
                                            *TINY_FT], ("1.5",))),
    ("datalist-bool-label", lambda d, t: (["finetune", "--data", _datalist(t, d, label=True), "--out", t / "r",
                                           *TINY_FT], ("True",))),
    ("datalist-text-file-as-image", lambda d, t: (["finetune", "--data", _datalist(t, d, image=str(
        _write(t / "passwd.txt", "root:x:0:0"))), "--out", t / "r", *TINY_FT], ("not of a type",))),
    ("datalist-folder-as-image", lambda d, t: (["finetune", "--data", _datalist(t, d, image=str(
        (t / "dir.png").mkdir() or t / "dir.png")), "--out", t / "r", *TINY_FT], ("not files",))),
    ("datalist-is-a-list", lambda d, t: (["finetune", "--data", _write(t / "l.json", "[1, 2]"), "--out", t / "r",
                                          *TINY_FT], ("not a labelled datalist",))),
    ("datalist-bad-json", lambda d, t: (["finetune", "--data", _write(t / "b.json", "{training: [}"), "--out",
                                         t / "r", *TINY_FT], ("cannot read datalist",))),
    ("datalist-training-is-a-dict", lambda d, t: (["finetune", "--data", _write(t / "b.json", '{"training": {}}'),
                                                   "--out", t / "r", *TINY_FT], ("training",))),
    ("datalist-duplicate-classes", lambda d, t: (["finetune", "--data", _write(t / "b.json", json.dumps(
        {"classes": ["a", "a"], "training": [{"image": str(d.image), "label": 0}]})), "--out", t / "r", *TINY_FT],
        ("distinct",))),
    ("evaluate-datalist-label-out-of-range", lambda d, t: (["evaluate", "--model", d.clf, "--data",
                                                            _datalist(t, d, label=9), "--out", t / "e"],
                                                           ("outside",))),
    ("predict-datalist-bad-json", lambda d, t: (["predict", d.clf, _write(t / "b.json", "{"), "--out", t / "p"],
                                                ("cannot read datalist",))),
    ("csv-without-label-column", lambda d, t: (["finetune", "--data", _csv(t, d, "path,klass\n{a},x\n"), "--out",
                                                t / "r", *TINY_FT], ("'label'",))),
    ("csv-empty-label", lambda d, t: (["finetune", "--data", _csv(t, d, "path,label\n{a},cyst\n{b},\n"), "--out",
                                       t / "r", *TINY_FT], ("lack a path or a label",))),
    ("csv-not-utf8", lambda d, t: (["finetune", "--data", _csv(t, d, b"path,label\n\xff\xfe\x00bad,1\n"), "--out",
                                    t / "r", *TINY_FT], ("CSV",))),
    ("csv-missing-file", lambda d, t: (["finetune", "--data", _csv(t, d, "path,label\n{a},cyst\nnope.png,mass\n"),
                                        "--out", t / "r", *TINY_FT], ("do not exist",))),
    # 5. numbers and shapes
    ("finetune-lr-nan", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", "--lr", "nan"],
                                      ("--lr",))),
    ("pretrain-lr-inf", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", "--lr", "inf"],
                                      ("--lr",))),
    ("finetune-lr-negative", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", "--lr", "-1"],
                                           ("--lr",))),
    ("pretrain-patch-size-0", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", "--patch-size", "0"],
                                            ("--patch-size",))),
    ("predict-batch-size-0", lambda d, t: (["predict", d.clf, d.image, "--out", t / "p", "--batch-size", "0"],
                                           ("--batch-size",))),
    ("evaluate-bootstrap-negative", lambda d, t: (["evaluate", "--model", d.clf, "--data", d.labelled, "--out",
                                                   t / "e", "--bootstrap", "-5"], ("--bootstrap",))),
    ("finetune-epochs-0", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", "--epochs", "0"],
                                        ("--epochs",))),
    ("pretrain-mask-ratio-1.5", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", "--mask-ratio",
                                               "1.5"], ("--mask-ratio",))),
    ("pretrain-mean-nan", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", "--mean", "nan"],
                                        ("--mean",))),
    ("pretrain-mean-wrong-length", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", *TINY_PT,
                                                  "--mean", "0.1", "0.2"], ("--mean has 2 values",))),
    ("pretrain-std-zero", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", "--std", "0"],
                                        ("--std",))),
    ("pretrain-image-not-multiple-of-patch", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r",
                                                            *TINY_PT, "--img-size", "36"],
                                                           ("not a multiple of the patch size",))),
    ("finetune-image-not-multiple-of-patch", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r",
                                                            *TINY_FT, "--image-size", "30"],
                                                           ("not a multiple of",))),
    ("import-weights-heads-not-dividing-width", None),
    # 5. checkpoints
    ("predict-random-bytes-model", lambda d, t: (["predict", d.random, d.image, "--out", t / "p"],
                                                 ("not a PyTorch checkpoint",))),
    ("predict-text-file-model", lambda d, t: (["predict", d.text, d.image, "--out", t / "p"],
                                              ("not a PyTorch checkpoint",))),
    ("predict-empty-model", lambda d, t: (["predict", _write(t / "e.pt", b""), d.image, "--out", t / "p"],
                                          ("empty",))),
    ("predict-folder-as-model", lambda d, t: (["predict", t, d.image, "--out", t / "p"], ("is a folder",))),
    ("predict-truncated-model", lambda d, t: (["predict", _write(t / "cut.pt", d.clf.read_bytes()[:2000]), d.image,
                                               "--out", t / "p"], ("cannot be read",))),
    ("predict-nan-weights", lambda d, t: (["predict", _nan_checkpoint(d, t), d.image, "--out", t / "p"],
                                          ("NaN or infinite weights",))),
    ("predict-pickled-code", lambda d, t: (["predict", _pickled(t), d.image, "--out", t / "p"],
                                           ("pickled code",))),
    ("predict-mae-instead-of-classifier", lambda d, t: (["predict", d.mae, d.image, "--out", t / "p"],
                                                        ("'mae' model",))),
    ("evaluate-random-bytes-model", lambda d, t: (["evaluate", "--model", d.random, "--data", d.labelled, "--out",
                                                   t / "e"], ("not a PyTorch checkpoint",))),
    ("embed-text-file-model", lambda d, t: (["embed", d.text, d.image, "--out", t / "e"],
                                            ("not a PyTorch checkpoint",))),
    ("reconstruct-classifier-instead-of-mae", lambda d, t: (["reconstruct", d.clf, d.image, "--out", t / "r"],
                                                            ("'classifier' model",))),
    ("finetune-init-random-bytes", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", *TINY_FT,
                                                  "--init", d.random], ("not a PyTorch checkpoint",))),
    ("finetune-init-missing-weights", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", *TINY_FT,
                                                     "--init", _missing_weights(d.mae, t)],
                                                    ("do not fit", "missing keys"))),
    ("finetune-init-classifier", lambda d, t: (["finetune", "--data", d.labelled, "--out", t / "r", *TINY_FT,
                                                "--init", d.clf], ("not a pretrained MAE",))),
    ("pretrain-init-text-file", lambda d, t: (["pretrain", "--corpus", d.corpus, "--out", t / "r", *TINY_PT,
                                               "--init", d.text], ("not a PyTorch checkpoint",))),
    ("import-weights-of-a-usfmae-checkpoint", lambda d, t: (["import-weights", d.mae, "--out", t / "w.pt"],
                                                            ("already a usfmae checkpoint", "no import needed"))),
    ("import-weights-random-bytes", lambda d, t: (["import-weights", d.random, "--out", t / "w.pt"],
                                                  ("not a PyTorch checkpoint",))),
    ("export-weights-nan", lambda d, t: (["export-weights", _nan_checkpoint(d, t), "--out", t / "w.pt"],
                                         ("NaN",))),
    # 5. corpus
    ("pretrain-truncated-shard", lambda d, t: (["pretrain", "--corpus", _corpus_copy(d, t, _truncate_shard),
                                                "--out", t / "r", *TINY_PT], ("corrupt",))),
    ("pretrain-shard-outside-corpus", lambda d, t: (["pretrain", "--corpus", _corpus_copy(d, t, _escape_shard),
                                                     "--out", t / "r", *TINY_PT], ("outside the corpus",))),
    ("pretrain-corpus-json-garbage", lambda d, t: (["pretrain", "--corpus", _corpus_copy(
        d, t, lambda c: (c / "corpus.json").write_text("{oops")), "--out", t / "r", *TINY_PT], ("cannot be read",))),
    ("pretrain-shard-file-missing", lambda d, t: (["pretrain", "--corpus", _corpus_copy(
        d, t, lambda c: [p.unlink() for p in (c / "shards").glob("*.npy")]), "--out", t / "r", *TINY_PT],
        ("missing",))),
    ("pretrain-corpus-is-a-labelled-folder", lambda d, t: (["pretrain", "--corpus", d.labelled, "--out", t / "r",
                                                            *TINY_PT], ("corpus.json missing",))),
    # inputs
    ("predict-missing-input", lambda d, t: (["predict", d.clf, t / "nope.png", "--out", t / "p"],
                                            ("does not exist",))),
    ("predict-only-unreadable-input", lambda d, t: (["predict", d.clf, d.truncated, "--out", t / "p"],
                                                    ("no input could be classified",))),
    ("embed-folder-without-images", lambda d, t: (["embed", d.mae, (_write(t / "docs" / "a.txt", "x")).parent,
                                                   "--out", t / "e"], ("no supported",))),
    ("reconstruct-truncated-input", lambda d, t: (["reconstruct", d.mae, d.truncated, "--out", t / "r"],
                                                  ("cannot read",))),
]
_RUN_FOLDER_CASES = {c for c, b in CASES if b is None}


@pytest.mark.parametrize("case", [c for c, b in CASES if b is not None])
def test_bad_input_is_one_line(case: str, data: SimpleNamespace, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    build = dict(CASES)[case]
    argv, words = build(data, tmp_path)
    rc, err = run_cli(argv, capsys)
    assert_one_line(rc, err, *words)


@pytest.mark.parametrize("case", sorted(_RUN_FOLDER_CASES))
def test_run_folder_is_protected(case: str, data: SimpleNamespace, finished: SimpleNamespace, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Finished and foreign runs are refused without --overwrite / --resume, and nothing of them is changed."""
    before = {p.name: p.stat().st_mtime_ns for p in finished.ft.iterdir()}
    before_pt = {p.name: p.stat().st_mtime_ns for p in finished.pt.iterdir()}
    if case == "evaluate-into-a-finetune-run":
        argv, words = ["evaluate", "--model", finished.ft / "model.pt", "--data", finished.ft / "datalist.json",
                       "--out", finished.ft], ("holds a usfmae finetune run", "--overwrite")
    elif case == "finetune-into-a-finished-run":
        argv, words = ["finetune", "--data", data.labelled, "--out", finished.ft, *TINY_FT], \
            ("finished finetune run", "--overwrite")
    elif case == "pretrain-into-a-finished-run":
        argv, words = ["pretrain", "--corpus", data.corpus, "--out", finished.pt, *TINY_PT], \
            ("finished pretrain run", "--resume")
    elif case == "pretrain-resume-other-preset":
        argv, words = ["pretrain", "--corpus", data.corpus, "--out", finished.pt, *TINY_PT, "--resume", "--preset",
                       "vit_micro"], ("--preset vit_micro", "vit_test")
    elif case == "pretrain-resume-other-image-size":
        argv, words = ["pretrain", "--corpus", data.corpus, "--out", finished.pt, *TINY_PT, "--resume", "--img-size",
                       "64"], ("--img-size 64",)
    elif case == "prepare-into-a-finetune-run":
        argv, words = ["prepare", data.labelled, "--out", finished.ft], ("holds a usfmae finetune run",)
    else:  # heads not dividing the width: import a facebook-layout export with --num-heads 5 (width 48)
        argv, words = ["import-weights", data.fb, "--out", tmp_path / "w.pt", "--num-heads", "5"], \
            ("not divisible by its 5 attention heads",)
    rc, err = run_cli(argv, capsys)
    assert_one_line(rc, err, *words)
    assert {p.name: p.stat().st_mtime_ns for p in finished.ft.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in finished.pt.iterdir()} == before_pt


def test_overwrite_and_resume_of_finished_runs(data: SimpleNamespace, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite replaces a run's own files only (a user's file in the folder survives); --resume of a finished
    fine-tuning run does nothing; predict twice into one folder is refused, then allowed with --overwrite."""
    out = tmp_path / "p"
    assert cli.main(["predict", str(data.clf), str(data.image), "--out", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    rc, err = run_cli(["predict", data.clf, data.image, "--out", out], capsys)
    assert_one_line(rc, err, "finished predict run", "--overwrite")
    assert cli.main(["predict", str(data.clf), str(data.image), str(data.volume), "--out", str(out),
                     "--overwrite"]) == 0
    assert (out / "my_notes.txt").read_text() == "mine"
    assert len(json.loads((out / "predictions.json").read_text())["results"]) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "predict" and run["status"] == "finished"
    assert not (out / ".usfmae.lock").exists()

    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--data", str(data.labelled), "--out", str(ft), *TINY_FT]) == 0
    metrics = (ft / "metrics.json").read_text()
    assert not (ft / "checkpoint_last.pt").exists()  # a finished run keeps no training state
    capsys.readouterr()
    assert cli.main(["finetune", "--data", str(data.labelled), "--out", str(ft), *TINY_FT, "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert (ft / "metrics.json").read_text() == metrics
    rc, err = run_cli(["finetune", "--data", data.labelled, "--out", ft, *TINY_FT, "--resume", "--preset",
                       "vit_micro"], capsys)
    assert_one_line(rc, err, "--preset vit_micro")


def test_run_folder_inside_the_data_is_not_data(data: SimpleNamespace, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``finetune --out DATA/run1`` (a careless but common choice): the next fine-tuning on DATA does not turn
    ``run1`` into a class (with curves.png as its image) and predict on DATA does not classify the run's pictures;
    both say that they passed the run folder over."""
    lab = tmp_path / "lab"
    shutil.copytree(data.labelled, lab)
    assert cli.main(["finetune", "--data", str(lab), "--out", str(lab / "run1"), *TINY_FT]) == 0
    assert (lab / "run1" / "curves.png").is_file()
    capsys.readouterr()
    assert cli.main(["finetune", "--data", str(lab), "--out", str(tmp_path / "run2"), *TINY_FT]) == 0
    out = capsys.readouterr().out
    assert "1 usfmae run folder(s) inside it ignored (run1)" in out, out
    datalist = json.loads((tmp_path / "run2" / "datalist.json").read_text())
    assert datalist["classes"] == CLASSES
    assert any(i["path"] == str(lab / "run1") for i in datalist["ignored"])
    assert cli.main(["predict", str(data.clf), str(lab), "--out", str(lab / "predictions")]) == 0
    assert cli.main(["predict", str(data.clf), str(lab), "--out", str(tmp_path / "p")]) == 0
    assert "skipped " + str(lab / "run1") in capsys.readouterr().out
    result = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(result["results"]) == 18
    assert {Path(s["source"]).name for s in result["skipped"]} == {"run1", "predictions"}


def test_non_utf8_file_names_are_written(data: SimpleNamespace, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A file name that is not valid UTF-8 neither crashes the writers nor the console: every result is kept and the
    name appears escaped (``\\xff``) in the CSV / JSON files."""
    folder = tmp_path / "scans"
    folder.mkdir()
    odd = folder / os.fsdecode(b"patient_\xff\xfe_scan.png")
    shutil.copy(data.image, odd)
    shutil.copy(data.image, folder / "plain.png")
    for cmd, model, files in (("predict", data.clf, ("predictions.csv", "summary.csv", "predictions.json")),
                              ("embed", data.mae, ("embeddings_index.csv",))):
        out = tmp_path / cmd
        rc, err = run_cli([cmd, model, folder, "--out", out], capsys)
        assert rc == 0, err
        for name in files:
            text = (out / name).read_text(encoding="utf-8")  # valid UTF-8
            if name.endswith(".json"):  # JSON keeps the exact name (\udcNN escapes): it reads back as the file's
                sources = {Path(r["source"]).name for r in json.loads(text)["results"]}
                assert sources == {odd.name, "plain.png"}, sources
                assert (folder / odd.name).exists()
            else:
                assert "patient_\\xff\\xfe_scan.png" in text and "plain.png" in text, name
    assert np.load(tmp_path / "embed" / "embeddings.npy").shape[0] == 2


def test_non_utf8_file_names_round_trip_through_run_files(data: SimpleNamespace, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A run's datalist.json and config.json keep file names that are not UTF-8 exactly: ``evaluate --data
    RUN/datalist.json`` finds every test image and ``finetune --resume`` with the same ``--data`` is no conflict."""
    folder = tmp_path / os.fsdecode(b"data_\xe9t\xe9")  # a Latin-1 folder name, as old Windows shares give
    shutil.copytree(data.labelled, folder)
    for c in CLASSES:
        first = min((folder / c).glob("*.png"))
        first.rename(first.with_name(os.fsdecode(b"p_\xff_" + c.encode() + b".png")))
    run = tmp_path / "run"
    assert cli.main(["finetune", "--data", str(folder), "--out", str(run), *TINY_FT, "--test-fraction", "0.5"]) == 0
    datalist = json.loads((run / "datalist.json").read_text(encoding="utf-8"))
    images = [Path(i["image"]) for split in ("training", "validation", "test") for i in datalist[split]]
    assert len(images) == 18 and all(p.exists() for p in images)
    assert sum("\udcff" in p.name for p in images) == 3
    capsys.readouterr()
    rc, err = run_cli(["finetune", "--data", folder, "--out", run, *TINY_FT, "--test-fraction", "0.5", "--resume"],
                      capsys)
    assert rc == 0 and "conflict" not in err and "error" not in err, err
    rc, err = run_cli(["evaluate", "--model", run / "model.pt", "--data", run / "datalist.json", "--out",
                       tmp_path / "eval", "--bootstrap", "10"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == len(datalist["test"])


# ------------------------------------------------------------------------------------- prepare: special files
def test_prepare_skips_and_reports_special_files(data: SimpleNamespace, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Dangling links, link loops, a FIFO (never opened: it would block), a hidden image, a link to a folder and a
    corrupt file are skipped AND listed with their reason; the good images are prepared."""
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(data.labelled.rglob("*.png"))[:3]:
        shutil.copy(p, src / p.name)
    os.symlink(src / "gone.png", src / "dangling.png")
    os.symlink(src / "loop_b.png", src / "loop_a.png")
    os.symlink(src / "loop_a.png", src / "loop_b.png")
    os.mkfifo(src / "pipe.png")
    shutil.copy(data.image, src / "..png")
    (src / "sub").mkdir()
    os.symlink(src / "sub", src / "linked_folder")
    _write(src / "corrupt.png", b"\x89PNG\r\n\x1a\n garbage")
    import SimpleITK as sitk

    extreme = phantom.make_image(1, 40, rng=1).astype(np.float32)
    extreme[0, 0] = 1e30  # one absurd pixel: min-max scaling leaves a black frame, dropped as empty
    sitk.WriteImage(sitk.GetImageFromArray(extreme), str(src / "extreme.nii.gz"))
    rc, err = run_cli(["prepare", src, "--out", tmp_path / "c", "--image-size", "32", "--workers", "1",
                       "--no-progress"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert "broken symbolic link" in reasons["dangling.png"]
    assert "loop" in reasons["loop_a.png"] and "loop" in reasons["loop_b.png"]
    assert "FIFO" in reasons["pipe.png"]
    assert "hidden" in reasons["..png"]
    assert "not followed" in reasons["linked_folder"]
    assert "corrupt.png" in reasons
    assert "every frame (1) is empty" in reasons["extreme.nii.gz"]  # a file that gave nothing is named
    assert report["n_frames"] == 3


def _unprivileged() -> list[str] | None:
    """A command prefix under which file permissions apply (root ignores them): nothing for a normal user, setpriv
    without the DAC-override capabilities for root; None when neither is possible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv and subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", "true"],
                                  capture_output=True).returncode == 0:
        return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    return None


def test_prepare_reports_unreadable_folder_and_read_only_output(data: SimpleNamespace, tmp_path: Path) -> None:
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced here")
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    shutil.copy(data.image, src / "ok.png")
    shutil.copy(data.image, src / "locked" / "hidden_from_us.png")
    (src / "locked").chmod(0)
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run_sub(["prepare", src, "--out", tmp_path / "c", "--workers", "1", "--no-progress", "--image-size",
                        "32"], prefix=prefix)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / "c" / "report.json").read_text())
        reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
        assert "folder cannot be read" in reasons["locked"], reasons
        assert report["n_frames"] == 1
        for argv in (["prepare", src, "--out", ro / "c", "--no-progress"],
                     ["predict", data.clf, data.image, "--out", ro / "p"],
                     ["import-weights", data.fb, "--out", ro / "w.pt"]):
            proc = run_sub(argv, prefix=prefix)
            assert_one_line(proc.returncode, proc.stderr, "Permission denied", str(ro))
    finally:
        (src / "locked").chmod(0o755)
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------ full disk
def _small_disk_prefix(mount: Path, size: str) -> list[str] | None:
    """A command prefix running the command with a ``size`` tmpfs mounted on ``mount`` in a private mount namespace
    (root: ``unshare -m``; others: ``unshare -rm``, where unprivileged user namespaces are allowed); None when this
    machine allows neither."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    flags = "-m" if os.geteuid() == 0 else "-rm"
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    prefix = [unshare, flags, "sh", "-c", script, "sh", size, str(mount)]
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.parametrize("command", ["import-weights", "prepare", "pretrain", "finetune", "predict"])
def test_full_disk_is_one_line(command: str, data: SimpleNamespace, tmp_path: Path) -> None:
    """Each writing command on a nearly full disk (a tmpfs of a few kB in a private mount namespace) ends in one
    line naming the file and ENOSPC, and leaves no temporary file behind."""
    disk = tmp_path / "disk"
    prefix = _small_disk_prefix(disk, "48k")
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (no root, no unprivileged user namespaces)")
    argv = {"import-weights": ["import-weights", data.fb, "--out", disk / "w.pt"],
            "prepare": ["prepare", data.labelled, "--out", disk / "c", "--image-size", "64", "--workers", "1",
                        "--no-progress"],
            "pretrain": ["pretrain", "--corpus", data.corpus, "--out", disk / "r", *TINY_PT],
            "finetune": ["finetune", "--data", data.labelled, "--out", disk / "r", *TINY_FT],
            "predict": ["predict", data.clf, data.labelled, "--out", disk / "p"]}[command]
    # predict and finetune write small files before their big ones: fill the disk to its last page first
    fill = 'dd if=/dev/zero of="$0/filler" bs=1k count=44 2>/dev/null; exec "$@"' if command in (
        "predict", "finetune") else 'exec "$@"'
    proc = run_sub(argv, prefix=[*prefix, "sh", "-c", fill, str(disk)])
    line = assert_one_line(proc.returncode, proc.stderr, "No space left on device")
    assert str(disk) in line, line


@pytest.mark.parametrize("command", ["import-weights", "pretrain", "prepare"])
def test_file_size_limit_is_one_line(command: str, data: SimpleNamespace, tmp_path: Path) -> None:
    """Under a file-size limit (``ulimit -f``, as batch schedulers set it) a write that reaches it fails with one line
    naming the file and the limit (EFBIG), not an input/output error or a crash; no temporary file is left."""
    resource = pytest.importorskip("resource")
    argv = {"import-weights": ["import-weights", data.fb, "--out", tmp_path / "o" / "w.pt"],
            "pretrain": ["pretrain", "--corpus", data.corpus, "--out", tmp_path / "o", *TINY_PT],
            "prepare": ["prepare", data.labelled, "--out", tmp_path / "o", "--image-size", "64", "--workers", "1",
                        "--no-progress"]}[command]
    limit = 24 << 10  # bytes: run.json and the logs fit, a checkpoint or a shard does not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "usfmae_core.cli", *map(str, argv)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limited)
    line = assert_one_line(proc.returncode, proc.stderr, "File too large", "ulimit -f")
    assert str(tmp_path / "o") in line, line
    assert not [p for p in (tmp_path / "o").rglob("*.tmp")]


# -------------------------------------------------------------------------------------- concurrency, kill -9
def test_two_concurrent_runs_on_one_folder(data: SimpleNamespace, tmp_path: Path) -> None:
    """Two pretraining runs started together on one --out: one trains, the other is refused in one line (the folder
    is in use, or already holds the finished run), and the run that trained is intact."""
    out = tmp_path / "run"
    argv = ["pretrain", "--corpus", data.corpus, "--out", out, *TINY_PT[:-6], "--max-steps", "30", "--log-every", "5",
            "--picture-every", "0"]
    procs = [subprocess.Popen([sys.executable, "-m", "usfmae_core.cli", *map(str, argv)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert_one_line(2, loser)
    assert "in use by usfmae pretrain" in loser or "already holds a finished pretrain run" in loser, loser
    from usfmae_core.checkpoints import load_model

    load_model(out / "model.pt", expect="mae")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def _kill_loop(cmd: list[str], state: Path, max_kills: int, seed: int, timeout: float = 600
               ) -> tuple[int, list[str]]:
    """Run ``cmd`` again and again, each time killing it with SIGKILL a random moment after ``state`` changed (some
    work was saved), until it finishes by itself; returns (number of kills, stderr of the last run)."""
    rng = random.Random(seed)
    kills = 0
    deadline = time.monotonic() + timeout
    while True:
        before = state.stat().st_mtime_ns if state.exists() else None
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if kills < max_kills:
            while proc.poll() is None and time.monotonic() < deadline:
                now = state.stat().st_mtime_ns if state.exists() else None
                if now is not None and now != before:
                    # soon after a save: an idle machine finishes a tiny run within a longer delay (no kill at all)
                    time.sleep(rng.uniform(0.0, 0.02))
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, err[-3000:]
        return kills, err.splitlines()


def _no_times(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k != "time_s"}
    out["history"] = [{k: v for k, v in h.items() if k != "time_s"} for h in metrics["history"]]
    return out


def test_finetune_resume_after_kill_loop_matches_uninterrupted_run(data: SimpleNamespace, tmp_path: Path) -> None:
    """``finetune --resume`` killed with SIGKILL again and again (the lock left behind never blocks) ends with exactly
    the weights, best epoch, history and test metrics of a run that was never interrupted (CPU, fp32, 0 workers).
    Dropout, drop-path, augmentation, class-balanced sampling and early stopping all draw random numbers or keep
    state, so any of them not restored would show."""
    args = ["finetune", "--data", str(data.labelled), "--preset", "vit_test", "--image-size", "32", "--patch-size",
            "8", "--epochs", "8", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--no-tensorboard", "--dropout", "0.2", "--drop-path", "0.2", "--balance", "sampler", "--patience", "3",
            "--warmup-epochs", "1", "--lr", "3e-3", "--seed", "1"]
    reference = tmp_path / "reference"
    proc = run_sub([*args, "--out", reference])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "usfmae_core.cli", *args, "--out", str(run), "--resume"]
    kills, _ = _kill_loop(cmd, run / "checkpoint_last.pt", max_kills=4, seed=0)
    # early stopping can end a resumed run within the kill delay after its next save: one kill is the least
    assert kills >= 1
    assert not (run / "checkpoint_last.pt").exists() and not (run / ".usfmae.lock").exists()
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(reference / "model.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["meta"]["epoch"] == b["meta"]["epoch"]
    ma = json.loads((run / "metrics.json").read_text())
    mb = json.loads((reference / "metrics.json").read_text())
    assert _no_times(ma) == _no_times(mb)
    assert json.loads((run / "run.json").read_text())["runs"] == kills + 1


PREPARE_SCRIPT = """
import sys
from usfmae_core.data.corpus import prepare_corpus
prepare_corpus([sys.argv[1]], sys.argv[2], image_size=32, workers=1, progress=False, shard_frames=10**6,
               flush_seconds=float(sys.argv[3]))
"""


def test_prepare_kill_loop_matches_uninterrupted_run(tmp_path: Path) -> None:
    """``prepare`` killed with SIGKILL again and again resumes to exactly the corpus of an uninterrupted run (same
    frames, no duplicates, consistent manifest); with shards that never fill, only the time-based saving (every
    ``flush_seconds``) keeps work across kills, so every kill loses a bounded amount."""
    from usfmae_core.data.corpus import FrameCorpus

    src = phantom.write_unlabelled_corpus_sources(tmp_path / "src", n_images=40, n_volumes=1, n_cines=3, seed=3,
                                                  size=48)
    reference = tmp_path / "reference"
    proc = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, str(src), str(reference), "1000"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", PREPARE_SCRIPT, str(src), str(out), "0.05"]
    kills, _ = _kill_loop(cmd, out / "done.jsonl", max_kills=4, seed=1)
    assert kills >= 1
    a, b = FrameCorpus(out), FrameCorpus(reference)
    assert len(a) == len(b)
    sha = lambda c: sorted(r["sha1"] for r in c.manifest())  # noqa: E731
    assert sha(a) == sha(b) and len(set(sha(a))) == len(a)
    frames_a = {bytes(a[i].tobytes()) for i in range(len(a))}
    frames_b = {bytes(b[i].tobytes()) for i in range(len(b))}
    assert frames_a == frames_b
    assert len(json.loads((out / "corpus.json").read_text())["shards"]) > 1  # saved in pieces, by time


# ------------------------------------------------------------------------------------------------- the bundle
BUNDLE = REPO / "bundles" / "usf_mae"


# a vit_test-sized network_def at 32 px (the bundle ships ViT-B/16 at 224 px)
BUNDLE_NET = ["--image_size", "32", "--network_def#hidden_size", "48", "--network_def#num_layers", "2",
              "--network_def#num_heads", "3"]
BUNDLE_MAE = [*BUNDLE_NET, "--network_def#decoder_hidden_size", "48", "--network_def#decoder_num_layers", "1",
              "--network_def#decoder_num_heads", "3"]


@pytest.fixture(scope="module")
def bundle(data: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundle with a tiny trained-looking classifier in ``models/model.pt`` (the classes and channels of
    its ``configs/metadata.json``, the network of :data:`BUNDLE_NET`)."""
    from usfmae_core.bundle_support import metadata_classes, save_state_dict
    from usfmae_core.networks import USFMAEClassifier

    dst = tmp_path_factory.mktemp("bundle") / "usf_mae"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts", "__pycache__"))
    (dst / "models").mkdir(exist_ok=True)
    fmt = json.loads((dst / "configs" / "metadata.json").read_text())["network_data_format"]
    channels = int(fmt["inputs"]["image"]["num_channels"])
    model = USFMAEClassifier(len(metadata_classes(fmt)), in_channels=channels, img_size=32, patch_size=16,
                             hidden_size=48, num_layers=2, num_heads=3)
    save_state_dict(model, dst / "models" / "model.pt")
    return dst


def _bundle_run(bundle: Path, configs: list[str], *override: str) -> subprocess.CompletedProcess:
    files = [str(bundle / "configs" / f"{n}.json") for n in configs]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--meta_file",
           str(bundle / "configs" / "metadata.json"), "--logging_file", str(bundle / "configs" / "logging.conf"),
           "--bundle_root", str(bundle), "--num_workers", "0", *override]
    return subprocess.run(cmd, cwd=bundle, env=_env(), capture_output=True, text=True, timeout=300)


BUNDLE_CASES = {
    "train-missing-dataset-dir": (["train"], lambda d, t: ["--dataset_dir", str(t / "nope"), *BUNDLE_NET],
                                  ("does not exist",)),
    "train-empty-dataset-dir": (["train"], lambda d, t: ["--dataset_dir", str((t / "e").mkdir() or t / "e"),
                                                         *BUNDLE_NET], ("no images found",)),
    "train-one-class": (["train"], lambda d, t: ["--dataset_dir", str(shutil.copytree(d.labelled / "cyst",
                                                                                      t / "one" / "cyst").parent),
                                                 *BUNDLE_NET], ("1 class",)),
    "train-bad-pretrained-mae": (["train"], lambda d, t: ["--dataset_dir", str(d.labelled), "--pretrained_mae",
                                                          str(d.text), *BUNDLE_NET], ("not a PyTorch checkpoint",)),
    "evaluate-missing-model": (["train", "evaluate"], lambda d, t: ["--dataset_dir", str(d.labelled), "--ckpt_path",
                                                                    str(t / "none.pt"), *BUNDLE_NET],
                               ("do not exist",)),
    "inference-missing-model": (["inference"], lambda d, t: ["--dataset_dir", str(d.labelled), "--ckpt_path",
                                                             str(t / "none.pt"), *BUNDLE_NET], ("do not exist",)),
    "inference-random-bytes-model": (["inference"], lambda d, t: ["--dataset_dir", str(d.labelled), "--ckpt_path",
                                                                  str(d.random), *BUNDLE_NET],
                                     ("not a PyTorch checkpoint",)),
    "inference-empty-folder": (["inference"], lambda d, t: ["--dataset_dir", str((t / "e").mkdir() or t / "e"),
                                                            *BUNDLE_NET], ("no supported ultrasound files",)),
    "inference-output-dir-is-a-file": (["inference"], lambda d, t: ["--dataset_dir", str(d.labelled), "--output_dir",
                                                                    str(_write(t / "f", "x")), *BUNDLE_NET],
                                       ("is a file",)),
    "train-output-dir-is-a-file": (["train"], lambda d, t: ["--dataset_dir", str(d.labelled), "--output_dir",
                                                            str(_write(t / "f", "x")), *BUNDLE_NET], ("is a file",)),
    "pretrain-missing-corpus": (["pretrain"], lambda d, t: ["--dataset_dir", str(t / "nope"), *BUNDLE_MAE],
                                ("does not exist",)),
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_bundle_bad_input_is_one_line(case: str, data: SimpleNamespace, bundle: Path, tmp_path: Path) -> None:
    configs, build, words = BUNDLE_CASES[case]
    proc = _bundle_run(bundle, configs, *build(data, tmp_path))
    line = assert_one_line(proc.returncode, proc.stderr, *words)
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert line


def test_bundle_inference_skips_unreadable_scans(data: SimpleNamespace, bundle: Path, tmp_path: Path) -> None:
    """One truncated scan among good ones: bundle inference classifies the good ones and lists the bad one as
    skipped with its reason (as ``usfmae predict`` does), instead of ending with no output."""
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted(data.labelled.rglob("*.png"))[:2]
    for p in good:
        shutil.copy(p, scans / p.name)
    shutil.copy(data.truncated, scans / "broken.png")
    proc = _bundle_run(bundle, ["inference"], "--dataset_dir", str(scans), "--output_dir", str(tmp_path / "out"),
                       *BUNDLE_NET)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(Path(r["source"]).name for r in result["results"]) == sorted(p.name for p in good)
    assert [Path(s["source"]).name for s in result["skipped"]] == ["broken.png"]
    assert "cannot read" in result["skipped"][0]["reason"]
    assert "skipped" in proc.stdout + proc.stderr


def test_count(capsys: pytest.CaptureFixture[str]) -> None:
    """How many bad-input cases this file runs (printed with ``-s``; also in the note of issue 12)."""
    n = (len([c for c, b in CASES if b is not None]) + len(_RUN_FOLDER_CASES) + len(BUNDLE_CASES)
         + 5 + 3  # full disk, file-size limit
         + 3 + 1 + 1 + 2 + 1 + 1)  # read-only (3), unreadable folder, special files, non-UTF-8 (2), bundle skip,
    # run folder inside the data
    with capsys.disabled():
        print(f"\n{n} bad-input cases (+ overwrite/resume checks, 2 kill -9 loops, 2 concurrent runs)")
    assert n > 100
