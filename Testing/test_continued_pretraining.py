"""Continued in-domain pretraining: several corpora mixed by weight (``usfmae pretrain --corpus A:w B:w``), exact
resume of a mixed run, ``--init`` with a restarted schedule, and a corpus built from a labelled set's training split
only (``usfmae prepare --datalist``), so that no validation or test image leaks into pretraining."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from usfmae_core import cli
from usfmae_core.checkpoints import load_model, make_checkpoint, save_checkpoint
from usfmae_core.data import phantom
from usfmae_core.data.corpus import FrameCorpus, MixedCorpus, open_corpora, prepare_corpus
from usfmae_core.data.datasets import make_pretrain_loader
from usfmae_core.data.labelled import labelled_source_to_datalist
from usfmae_core.workflows import pretrain as P

TINY = ["--preset", "vit_test", "--patch-size", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 'general' corpus (mixed-format phantom images, volume slices, cine frames) and a labelled phantom set with
    its deduplicated, split datalist (as usfmae finetune writes it)."""
    root = tmp_path_factory.mktemp("cont")
    src = phantom.write_unlabelled_corpus_sources(root / "general_src", n_images=10, n_volumes=1, n_cines=1, seed=0,
                                                  size=48)
    prepare_corpus([src], root / "general", image_size=32, progress=False)
    labelled = phantom.write_labelled_folder(root / "labelled", n_per_class=8, size=48, seed=3)
    labelled_source_to_datalist(labelled, root / "datalist.json", seed=0, val_fraction=0.2, test_fraction=0.2)
    return {"root": root, "general": root / "general", "labelled": labelled, "datalist": root / "datalist.json"}


@pytest.fixture(scope="module")
def target(data: dict[str, Path]) -> Path:
    """The labelled set's training images, without labels, as a corpus (the recipe's first step)."""
    out = data["root"] / "target"
    assert cli.main(["prepare", "--datalist", str(data["datalist"]), "--out", str(out), "--image-size", "32",
                     "--workers", "1", "--no-progress"]) == 0
    return out


def _parser_error(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    """``usfmae ARGV`` is refused by the argument parser: exit code 2 and one line naming every word."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("usfmae: error:") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


def _frame_owner(corpora: dict[str, Path]) -> dict[bytes, str]:
    owner = {}
    for name, path in corpora.items():
        c = FrameCorpus(path)
        for i in range(len(c)):
            owner[hashlib.sha1(np.ascontiguousarray(c[i]).tobytes()).digest()] = name
    return owner


# ------------------------------------------------------------------------------------------------ the sampler
def test_mixture_sampler_draws_each_corpus_its_share_every_epoch() -> None:
    sizes, weights = [300, 20, 80], [0.5, 0.3, 0.2]
    s = P.MixtureSampler(sizes, weights, seed=1)
    assert s.num_samples == 400 and s.counts == [200, 120, 80]
    offsets = np.cumsum([0] + sizes)
    seen: dict[int, Counter] = {k: Counter() for k in range(3)}
    for epoch in range(3):
        s.set_epoch(epoch)
        idx = np.array(list(s))
        assert len(idx) == len(s) == 400
        owner = np.searchsorted(offsets, idx, side="right") - 1
        assert np.bincount(owner, minlength=3).tolist() == [200, 120, 80]  # exact shares per epoch
        for k in range(3):
            seen[k].update((idx[owner == k] - offsets[k]).tolist())
        # shares hold batch by batch too, up to sampling noise (batches of 40: sd of a 0.3 share ~ 0.07)
        per_batch = [np.bincount(owner[i:i + 40], minlength=3) / 40 for i in range(0, 400, 40)]
        assert np.abs(np.mean(per_batch, axis=0) - weights).max() < 1e-9
        assert max(abs(b[1] - 0.3) for b in per_batch) < 0.3
    # a small corpus is cycled evenly (20 items, 120 draws per epoch: each exactly 6 times per epoch, 18 in 3);
    # a large one is walked through without repeats before it is exhausted (200 + 200 + 200 draws over 300 items)
    assert set(seen[1].values()) == {18}
    assert sorted(seen[0].values()) == [2] * 300
    assert set(seen[2].values()) == {3}


def test_mixture_sampler_is_a_function_of_seed_and_epoch_and_splits_over_ranks() -> None:
    sizes, weights = [50, 7], [0.6, 0.4]
    a, b = P.MixtureSampler(sizes, weights, seed=3), P.MixtureSampler(sizes, weights, seed=3)
    a.set_epoch(2)
    b.set_epoch(2, start=11)
    full = list(a)
    assert list(b) == full[11:] and len(b) == len(full) - 11
    b.set_epoch(3)
    assert list(b) != full
    assert list(P.MixtureSampler(sizes, weights, seed=4)) != list(P.MixtureSampler(sizes, weights))
    ranks = [P.MixtureSampler(sizes, weights, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert len(r0) == len(r1) == 28  # 57 samples, the odd one dropped
    # ranks take alternate samples of one epoch order
    interleaved = [x for pair in zip(r0, r1, strict=True) for x in pair]
    assert interleaved == ranks[0].epoch_indices(2).tolist() == ranks[1].epoch_indices(2).tolist()
    assert ranks[0].counts == [34, 22]
    with pytest.raises(ValueError):
        P.MixtureSampler([5, 0], [0.5, 0.5])


def test_loader_batches_come_from_the_corpora_in_the_given_proportions(data, target) -> None:
    """Real prepared corpora through the pretraining loader: the frames of an epoch come from each corpus in the
    requested shares, and from nowhere else."""
    mixed = open_corpora([(data["general"], 3.0), (target, 1.0)])
    assert isinstance(mixed, MixedCorpus) and mixed.weights == [0.75, 0.25]
    sampler = P.MixtureSampler(mixed.sizes, mixed.weights, seed=0)
    loader = make_pretrain_loader(mixed, 8, 32, 0, sampler=sampler, shuffle=False)
    owner = _frame_owner({"general": data["general"], "target": target})
    got: Counter = Counter()
    for batch in loader:
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (32, 32)
        got.update(owner[hashlib.sha1(f.numpy().tobytes()).digest()] for f in batch)
    n = sum(mixed.sizes) // 8 * 8  # the loader drops the last partial batch
    assert sum(got.values()) == n
    assert abs(got["target"] / n - 0.25) <= 8 / n  # exact per epoch up to the dropped remainder


# ------------------------------------------------------------------------------------------- pretrain command
def test_mixed_run_records_the_mix_and_resumes_exactly(data, target, tmp_path: Path, monkeypatch) -> None:
    """A mixed run interrupted after a checkpoint and resumed ends with the weights of an uninterrupted one (fp32,
    0 workers), across epoch boundaries (11 steps per epoch here) where the small corpus is cycled."""
    steps = 30
    args = ["pretrain", "--corpus", f"{data['general']}:0.5", "--corpus", f"{target}:0.5", *TINY,
            "--batch-size", "8", "--max-steps", str(steps), "--ckpt-every", "10", "--log-every", "5",
            "--picture-every", "0", "--blr", "2e-3"]
    reference = tmp_path / "reference"
    assert cli.main([*args, "--out", str(reference)]) == 0
    cfg = json.loads((reference / "config.json").read_text())
    corpora = cfg["resolved"]["corpora"]
    assert [c["weight"] for c in corpora] == [0.5, 0.5]
    assert [c["items"] for c in corpora] == [len(FrameCorpus(data["general"])), len(FrameCorpus(target))]
    _, ckpt = load_model(reference / "model.pt", expect="mae")
    assert ckpt["meta"]["corpora"] == corpora and ckpt["meta"]["corpus"].endswith(f"{target}:0.5")

    # interrupt in the middle of the third checkpoint interval, i.e. after the checkpoint of step 20
    calls = {"n": 0}
    real_step = P.mae_train_step

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    run = tmp_path / "run"
    monkeypatch.setattr(P, "mae_train_step", interrupted)
    assert cli.main([*args, "--out", str(run)]) == 130  # Ctrl-C
    monkeypatch.setattr(P, "mae_train_step", real_step)
    saved = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    per_epoch = sum(c["items"] for c in corpora) // 8
    assert saved["step"] == 20 and (saved["epoch"], saved["batches_in_epoch"]) == divmod(20, per_epoch)
    assert cli.main([*args, "--out", str(run), "--resume"]) == 0
    a = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(reference / "model.pt", map_location="cpu", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a[n], saved["model"][n]) for n in a if a[n].is_floating_point())


def test_continued_pretraining_from_init_restarts_the_schedule_and_keeps_normalisation(
        data, target, tmp_path: Path, capsys) -> None:
    src, cfg = P.build_pretrain_model("vit_test", img_size=32, patch_size=8, mean=[0.3], std=[0.2])
    save_checkpoint(tmp_path / "general.pt", make_checkpoint(src, "mae", cfg))
    run = tmp_path / "continued"
    assert cli.main(["pretrain", "--corpus", str(target), "--init", str(tmp_path / "general.pt"), "--out", str(run),
                     *TINY, "--batch-size", "4", "--max-steps", "8", "--warmup-steps", "4", "--lr", "1e-3",
                     "--log-every", "1", "--picture-every", "0"]) == 0
    out = capsys.readouterr()
    assert "continuing from --init" in out.out + out.err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    # a fresh warm-up to the new lr, then cosine decay over the new budget
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert lrs[0] < lrs[2] < lrs[3] == pytest.approx(1e-3) and lrs[4] > lrs[5] > lrs[7]
    _, ckpt = load_model(run / "model.pt", expect="mae")
    assert ckpt["config"]["preprocessing"]["mean"] == [0.3] and ckpt["config"]["preprocessing"]["std"] == [0.2]
    assert ckpt["meta"]["init"] == str(tmp_path / "general.pt")
    assert ckpt["meta"]["corpora"] == [{"path": str(target), "items": len(FrameCorpus(target)), "weight": 1.0}]
    name = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(ckpt["model"][name], src.state_dict()[name])
    assert torch.allclose(ckpt["model"][name], src.state_dict()[name], atol=0.05)  # continued, not restarted


@pytest.mark.parametrize("case", ["partial_weights", "bad_weight", "twice", "sizes"])
def test_mix_errors_are_one_line(case: str, data, target, tmp_path: Path, cli_error, capsys) -> None:
    g, t = str(data["general"]), str(target)
    if case == "partial_weights":
        cli_error(["pretrain", "--corpus", f"{g}:0.5", t, "--out", str(tmp_path / "r"), *TINY], "weight", t)
    elif case == "bad_weight":
        _parser_error(["pretrain", "--corpus", f"{g}:0", "--out", str(tmp_path / "r"), *TINY], capsys, "weight",
                      "> 0")
    elif case == "twice":
        cli_error(["pretrain", "--corpus", f"{g}:1", f"{g}:2", "--out", str(tmp_path / "r"), *TINY], "twice")
    else:
        prepare_corpus([data["general"].parent / "general_src" / "images"], tmp_path / "c48", image_size=48,
                       progress=False)
        cli_error(["pretrain", "--corpus", f"{g}:1", f"{tmp_path / 'c48'}:1", "--out", str(tmp_path / "r"), *TINY],
                  "different sizes", "--image-size")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------- no-leak corpus
def test_datalist_corpus_holds_the_training_images_only(data, target, tmp_path: Path, capsys) -> None:
    """prepare --datalist: exactly the training images (without labels); validation and test images stay out even
    when the labelled folder itself or a renamed copy of a test image is passed as a source too."""
    dl = json.loads(data["datalist"].read_text())
    split = {s: {str(Path(it["image"]).resolve()) for it in dl[s]} for s in ("training", "validation", "test")}
    assert all(split.values())
    assert {r["source"] for r in FrameCorpus(target).manifest()} == split["training"]

    copies = tmp_path / "copies"
    copies.mkdir()
    leaked = min(split["test"])
    shutil.copy(leaked, copies / "renamed.png")
    out = tmp_path / "with_sources"
    assert cli.main(["prepare", str(data["labelled"]), str(copies), "--datalist", str(data["datalist"]),
                     "--out", str(out), "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    sources = {r["source"] for r in FrameCorpus(out).manifest()}
    assert sources == split["training"]
    report = json.loads((out / "report.json").read_text())
    excluded = {e["path"] for e in report["excluded"]}
    assert {str(Path(p).resolve()) for p in excluded} == split["validation"] | split["test"] | {
        str((copies / "renamed.png").resolve())}
    assert report["sources_excluded"] == len(excluded) and f"left out {len(excluded)}" in printed
    assert any("copy" in e["reason"] for e in report["excluded"])

    # validation may be added on purpose; the test split can never be asked for
    both = tmp_path / "train_val"
    assert cli.main(["prepare", "--datalist", str(data["datalist"]), "--datalist-splits", "training", "validation",
                     "--out", str(both), "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    assert {r["source"] for r in FrameCorpus(both).manifest()} == split["training"] | split["validation"]


def test_labelled_folder_is_split_like_finetune_and_the_split_is_kept(data, tmp_path: Path) -> None:
    """prepare --labelled FOLDER: the folder is split as usfmae finetune --seed 0 splits it, the split is written to
    OUT/datalist.json for fine-tuning, and only its training images enter the corpus."""
    out = tmp_path / "from_folder"
    assert cli.main(["prepare", "--labelled", str(data["labelled"]), "--out", str(out), "--image-size", "32",
                     "--workers", "1", "--no-progress"]) == 0
    written = json.loads((out / "datalist.json").read_text())
    expected = labelled_source_to_datalist(data["labelled"], seed=0, val_fraction=0.15, test_fraction=0.15)
    for s in ("training", "validation", "test"):
        assert [it["image"] for it in written[s]] == [it["image"] for it in expected[s]], s
    assert {r["source"] for r in FrameCorpus(out).manifest()} == {
        str(Path(it["image"]).resolve()) for it in written["training"]}
    # the datalist loads for fine-tuning as it is
    from usfmae_core.workflows.finetune import load_labelled

    assert len(load_labelled(out / "datalist.json")["test"]) == len(written["test"]) > 0


def test_datalist_corpus_errors(data, tmp_path: Path, cli_error, capsys) -> None:
    _parser_error(["prepare", "--datalist", str(data["datalist"]), "--datalist-splits", "test", "--out",
                   str(tmp_path / "c")], capsys, "invalid choice")
    cli_error(["prepare", "--out", str(tmp_path / "c")], "nothing to prepare")
    # a corpus that already holds a held-out image (prepared earlier from the whole folder) is refused
    whole = tmp_path / "whole"
    prepare_corpus([data["labelled"]], whole, image_size=32, progress=False)
    cli_error(["prepare", "--datalist", str(data["datalist"]), "--out", str(whole), "--image-size", "32",
               "--no-progress"], "already holds", "new --out")
