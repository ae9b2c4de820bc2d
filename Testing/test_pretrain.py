"""``usfmae pretrain`` end to end on a phantom corpus: outputs, learning, SIGKILL + resume, errors, 3D, --init,
the MONAI-engine step and the picture helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from usfmae_core import cli
from usfmae_core.checkpoints import load_model, make_checkpoint, save_checkpoint
from usfmae_core.data import phantom
from usfmae_core.data.corpus import prepare_corpus
from usfmae_core.workflows import pretrain as P

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "vit_test", "--patch-size", "8", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy CPU, OpenMP threads spin against each other (measured 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px corpus (frames + native 3D volumes) prepared from phantom images, volumes and cines in real formats."""
    root = tmp_path_factory.mktemp("pretrain")
    src = phantom.write_unlabelled_corpus_sources(root / "src", n_images=12, n_volumes=2, n_cines=2, seed=0, size=64)
    prepare_corpus([src], root / "corpus", image_size=32, native_3d=True, volume_size=32, progress=False)
    return root / "corpus"


def _pretrain(corpus: Path, out: Path, *extra: str) -> int:
    return cli.main(["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY, *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------ end to end
def test_pretrain_writes_a_complete_run_and_learns(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    steps = 120
    assert _pretrain(corpus, run, "--max-steps", str(steps), "--blr", "5e-3", "--warmup-steps", "10",
                     "--log-every", "10", "--ckpt-every", "50", "--picture-every", "60") == 0

    # final weights-only MAE checkpoint, usable by finetune / reconstruct
    model, ckpt = load_model(run / "model.pt", expect="mae")
    assert set(ckpt) >= {"model", "arch", "config", "usfmae_version", "meta"} and "optimizer" not in ckpt
    cfg = ckpt["config"]
    assert cfg["preset"] == "vit_test" and cfg["preprocessing"]["image_size"] == 32
    assert cfg["preprocessing"]["in_channels"] == cfg["in_channels"] == 3
    assert model.encoder.img_size == (32, 32)

    # the training state loads with weights_only and carries everything resume needs
    state = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == steps and state["scheduler"]["total_steps"] == steps
    assert {"optimizer", "scaler", "rng", "epoch", "batches_in_epoch"} <= set(state)
    rng = state["rng"]["per_rank"][0]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)
    for k, v in _state(run / "model.pt").items():
        assert torch.equal(v, state["model"][k]), k

    # logs: one metrics line per log step, summary, curve, pictures, TensorBoard
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(10, steps + 1, 10))
    assert all(r["img_per_s"] > 0 and r["lr"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["img_per_s"] > 0 and summary["precision"] == "fp32"
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["effective_batch"] == 8 and config["resolved"]["lr"] == pytest.approx(5e-3 * 8 / 256)
    from PIL import Image

    for name in ("pictures/recon_step0000060.png", "pictures/recon_final.png", "loss_curve.png"):
        with Image.open(run / name) as im:
            assert im.format == "PNG" and im.width > 100
    with Image.open(run / "pictures" / "recon_final.png") as im:
        assert im.width < im.height  # 3 columns, one row per picture sample (6)
    assert any((run / "tb").glob("events.out.tfevents.*"))

    # the loss goes down on this small corpus (first vs last 30 steps, both averaged)
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.85 * first, (first, last)


def test_resume_after_sigkill_matches_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL after its first checkpoint resumes with exactly that state, and ends with the same
    weights as a run that was never interrupted (fp32, 0 workers: deterministic)."""
    steps, every = 160, 10
    args = ["pretrain", "--corpus", str(corpus), *TINY, "--max-steps", str(steps), "--ckpt-every", str(every),
            "--log-every", "5", "--picture-every", "50", "--blr", "2e-3", "--accum-steps", "2",
            "--batch-size", "4", "--clip-grad", "1.0"]
    # one thread everywhere (the autouse fixture in this process): the same arithmetic in every run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "usfmae_core.cli", *args, "--out", str(run)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoint_last.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-training (rc {proc.returncode}): {err}"
    assert not (run / "model.pt").exists()

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # the last complete checkpoint on disk
    k = saved["step"]
    assert k % every == 0 and 0 < k < steps

    # 1) resuming restores exactly the checkpointed model (a budget of k steps: nothing left to train)
    probe = tmp_path / "probe"
    shutil.copytree(run, probe)
    assert cli.main([*args, "--out", str(probe), "--resume", "--max-steps", str(k)]) == 0
    for name, v in _state(probe / "model.pt").items():
        assert torch.equal(v, saved["model"][name]), name

    # 2) resuming to the end gives the weights of an uninterrupted run
    assert cli.main([*args, "--out", str(run), "--resume"]) == 0
    reference = tmp_path / "reference"
    assert cli.main([*args, "--out", str(reference)]) == 0
    a, b = _state(run / "model.pt"), _state(reference / "model.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the model really moved away from the checkpoint after resuming
    assert any(not torch.equal(a[n], saved["model"][n]) for n in a if a[n].is_floating_point())

    # the metrics log was trimmed to the checkpoint on resume: every step once, in order
    resumed_steps = [r["step"] for r in _metrics(run)]
    assert resumed_steps == [r["step"] for r in _metrics(reference)] == list(range(5, steps + 1, 5))
    losses = {r["step"]: r["loss"] for r in _metrics(reference)}
    for r in _metrics(run):
        assert r["loss"] == pytest.approx(losses[r["step"]], rel=1e-4, abs=1e-6)
    assert not list(run.glob(".checkpoint_last.pt.*"))  # no temporary file left behind


# ------------------------------------------------------------------------------------------------- variants
def test_pretrain_3d_volumes(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run3d"
    assert _pretrain(corpus, run, "--spatial-dims", "3", "--batch-size", "2", "--max-steps", "2", "--log-every", "1",
                     "--img-size", "16") == 0
    model, ckpt = load_model(run / "model.pt", expect="mae")
    assert ckpt["config"]["spatial_dims"] == 3 and model.encoder.img_size == (16, 16, 16)
    assert (run / "pictures" / "recon_final.png").exists()
    assert len(_metrics(run)) == 2
    # a 2D MAE as --init for volumes: patch projection inflated, prediction head restarted, blocks kept
    src, cfg = P.build_pretrain_model("vit_test", img_size=16, patch_size=8)
    save_checkpoint(tmp_path / "init2d.pt", make_checkpoint(src, "mae", cfg))
    assert _pretrain(corpus, tmp_path / "inflated", "--spatial-dims", "3", "--init", str(tmp_path / "init2d.pt"),
                     "--batch-size", "2", "--max-steps", "1", "--lr", "1e-9") == 0
    model, ckpt = load_model(tmp_path / "inflated" / "model.pt", expect="mae")
    assert model.encoder.patch_size == (8, 8, 8) and "re-initialised" in ckpt["config"]["init_note"]
    name = "encoder.blocks.1.mlp.linear1.weight"
    torch.testing.assert_close(ckpt["model"][name], src.state_dict()[name], atol=1e-6, rtol=0)


def test_init_from_mae_checkpoint_refits_and_is_used(corpus: Path, tmp_path: Path) -> None:
    """--init loads our MAE checkpoint (re-fitted to another image size); training starts from its weights."""
    src, cfg = P.build_pretrain_model("vit_test", img_size=16, patch_size=8)
    save_checkpoint(tmp_path / "init.pt", make_checkpoint(src, "mae", cfg))
    run = tmp_path / "run"
    assert _pretrain(corpus, run, "--init", str(tmp_path / "init.pt"), "--img-size", "32", "--max-steps", "1",
                     "--lr", "1e-9", "--log-every", "1") == 0
    _, ckpt = load_model(run / "model.pt", expect="mae")
    assert ckpt["config"]["img_size"] == [32, 32] and ckpt["meta"]["init"].endswith("init.pt")
    got, init = ckpt["model"], src.state_dict()
    name = "encoder.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(got[name], init[name], atol=1e-6, rtol=0)
    fresh, _ = P.build_pretrain_model("vit_test", img_size=32, patch_size=8)
    assert not torch.allclose(fresh.state_dict()[name], got[name])
    assert got["encoder.patch_embed.position_embeddings"].shape[1] == 16  # (32 / 8)^2 patches


# --------------------------------------------------------------------------------------------------- errors
def _classifier_ckpt(path: Path) -> Path:
    from usfmae_core.networks.presets import build_model, mae_config

    cfg = {**mae_config("vit_test", img_size=32, patch_size=8), "num_classes": 3}
    return save_checkpoint(path, make_checkpoint(build_model("classifier", cfg), "classifier", cfg))


@pytest.mark.parametrize("case", ["missing", "empty", "classifier_init", "cuda", "existing_run", "oom"])
def test_user_errors_are_one_line_and_write_nothing(case: str, corpus: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, monkeypatch) -> None:
    out = tmp_path / "run"
    extra: list[str] = ["--max-steps", "2"]
    source = corpus
    expect = ""
    if case == "missing":
        source, expect = tmp_path / "nowhere", "does not exist"
    elif case == "empty":
        source = tmp_path / "empty_corpus"  # (prepare refuses to write one: a corpus.json without shards)
        source.mkdir()
        (source / "corpus.json").write_text(json.dumps({"version": 1, "image_size": 32, "n_frames": 0,
                                                        "shards": []}))
        expect = "no frames"
    elif case == "classifier_init":
        extra += ["--init", str(_classifier_ckpt(tmp_path / "clf.pt"))]
        expect = "'classifier' model"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
        expect = "CUDA"
    elif case == "existing_run":
        out.mkdir()
        save_checkpoint(out / "checkpoint_last.pt", {"model": {}, "arch": "mae", "config": {}})
        expect = "--resume"
    elif case == "oom":
        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(P, "mae_train_step", oom)
        expect = "out of memory"
    argv = ["pretrain", "--corpus", str(source), "--out", str(out), *TINY, *extra]
    if case == "cuda":
        argv[argv.index("--device") + 1] = "cuda"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("usfmae: error: ") and expect in err[-1], err
    assert not (out / "model.pt").exists()
    if case == "oom":  # failed mid-training: only complete files (no checkpoint had been reached)
        assert not list(out.glob("*.tmp")) and not (out / "checkpoint_last.pt").exists()
    else:
        assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


# ----------------------------------------------------------------------------------------- reusable pieces
def test_mae_iteration_update_runs_a_monai_supervised_trainer(corpus: Path) -> None:
    from monai.engines import SupervisedTrainer

    from usfmae_core.data.datasets import make_pretrain_loader
    from usfmae_core.workflows.optim import cosine_lr

    torch.manual_seed(0)
    model, config = P.build_pretrain_model("vit_test", img_size=32, patch_size=8)
    augment = P.make_augment(config)
    opt = P.make_optimizer(model, lr=1e-3)
    loader = make_pretrain_loader(corpus, 8, 32, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = P.MAEIterationUpdate(augment, precision="fp32", clip_grad=1.0, base_lr=1e-3, total_steps=4,
                                  warmup_steps=1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=4, train_data_loader=loader,
                                network=model, optimizer=opt, loss_function=torch.nn.MSELoss(),
                                iteration_update=update, decollate=False, accumulation_steps=2)
    trainer.run()
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and out["image"].shape == (8, 3, 32, 32)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # lr followed the per-optimiser-step cosine schedule: iteration 4 is step 1 of 2 accumulation cycles
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(1, 4, 1, 1e-3))


def test_mae_train_step_accumulates_like_one_big_batch() -> None:
    """Two micro-steps of 4 with accum_steps=2 give the gradients of one step of 8 (same masks)."""
    torch.manual_seed(0)
    m1, _ = P.build_pretrain_model("vit_test", img_size=16, patch_size=8)
    m2, _ = P.build_pretrain_model("vit_test", img_size=16, patch_size=8)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(8, 3, 16, 16)
    noise = torch.rand(8, 4)
    grads = {}

    def capture(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    class Keep(torch.optim.SGD):  # records the gradients at the optimiser step instead of moving
        def step(self, closure=None):
            grads[id(self)] = capture(self.model)

    for model, chunks in ((m1, [slice(0, 8)]), (m2, [slice(0, 4), slice(4, 8)])):
        opt = Keep(model.parameters(), lr=0.0)
        opt.model = model
        for i, sl in enumerate(chunks):
            orig = model.forward
            model.forward = lambda imgs, ratio=None, _n=noise[sl], _f=orig: _f(imgs, ratio, _n)
            P.mae_train_step(model, x[sl], None, opt, accum_steps=len(chunks), step=i == len(chunks) - 1)
            model.forward = orig
        assert all(p.grad is None for p in model.parameters())  # zero_grad after the step
    g1, g2 = grads.values()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)


def test_rng_state_round_trip_is_weights_only() -> None:
    import random

    state = P.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    save = Path(os.environ.get("TMPDIR", "/tmp")) / f"rng_{os.getpid()}.pt"
    torch.save(state, save)
    loaded = torch.load(save, weights_only=True)
    save.unlink()
    P.restore_rng_state(loaded)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_resumable_sampler_is_a_function_of_seed_and_epoch() -> None:
    data = list(range(50))
    s = P.ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    s.set_epoch(4)
    full = list(s)
    s2 = P.ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    s2.set_epoch(4, start=7)
    assert list(s2) == full[7:] and len(s2) == len(full) - 7
    s2.set_epoch(5)
    assert list(s2) != full
    other = P.ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    other.set_epoch(4)
    assert not set(other) & set(full)  # ranks see disjoint shares


def test_reconstruction_grid_and_curve(tmp_path: Path) -> None:
    from PIL import Image

    from usfmae_core.workflows.pictures import save_curve, save_reconstruction_grid

    x = torch.rand(3, 1, 40, 40) * 2 - 1
    masked = x.clone()
    masked[:, :, :20] = 0  # top half hidden
    path = save_reconstruction_grid(masked, x * 0.5, x, tmp_path / "pics" / "grid.png", mean=[0.5], std=[0.5])
    with Image.open(path) as im:
        grid = np.asarray(im)
    k = 128 // 40  # small pictures are enlarged by an integer factor
    h = w = 40 * k
    assert grid.shape == (3 * (h + 2) + 2, 3 * (w + 2) + 2)
    masked_cell = grid[2:2 + h, 2 + (w + 2):2 + (w + 2) + w]
    assert (masked_cell[: h // 2] == 0).all() and masked_cell[h // 2:].mean() > 20  # hidden patches black
    with pytest.raises(ValueError):
        save_reconstruction_grid(masked[:2], x, x, tmp_path / "bad.png")
    curve = save_curve([1, 2, 3], [3.0, 2.0, 1.5], tmp_path / "curve.png", title="loss", ylabel="loss")
    with Image.open(curve) as im:
        assert im.format == "PNG" and im.size == (600, 400)
