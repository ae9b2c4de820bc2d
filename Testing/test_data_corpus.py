"""prepare / FrameCorpus: mixed formats, bad files, duplicates, resume after interruption, workers, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_readers import make_corrupt_files

from usfmae_core.data import corpus as corpus_mod
from usfmae_core.data import phantom
from usfmae_core.data.corpus import FrameCorpus, VolumeCorpus, prepare_corpus
from usfmae_core.errors import UsfmaeError

S = 48


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return phantom.write_unlabelled_corpus_sources(tmp_path_factory.mktemp("src"), n_images=8, n_volumes=2,
                                                   n_cines=3, seed=0, size=64)


def _sha_set(path: Path) -> set[str]:
    return {r["sha1"] for r in FrameCorpus(path).manifest()}


def test_prepare_mixed_formats(sources, tmp_path):
    out = tmp_path / "c"
    rep = prepare_corpus([sources], out, image_size=S, progress=False, native_3d=True, volume_size=24)
    assert rep["sources_skipped"] == 0 and rep["sources_read"] == 13
    c = FrameCorpus(out)
    man = c.manifest()
    shards = json.loads((out / "corpus.json").read_text())["shards"]
    assert len(c) == rep["n_frames"] == len(man) == sum(s["n"] for s in shards)
    assert c[0].dtype == np.uint8 and c[0].shape == (S, S) and c[len(c) - 1].shape == (S, S)
    kinds = {r["kind"] for r in man}
    assert kinds == {"image", "cine", "volume"}
    # volumes are sliced along all three axes, with isotropic in-plane spacing recorded
    vol_axes = {r["axis"] for r in man if r["kind"] == "volume"}
    assert vol_axes == {0, 1, 2}
    assert all(r["spacing"][0] == r["spacing"][1] for r in man if r["kind"] == "volume")
    for r in man[:5]:
        assert {"shard", "index", "source", "frame", "axis", "spacing", "crop", "sha1"} <= set(r)
        np.testing.assert_array_equal(c.frames_for_shard(r["shard"])[r["index"]], c[man.index(r)])
    assert len({r["sha1"] for r in man}) == len(man)  # no exact duplicate survives
    batch = c.get_batch([3, 0, len(c) - 1])
    np.testing.assert_array_equal(batch[1], c[0])
    v = VolumeCorpus(out)
    assert len(v) == 2 and v[0].shape == (24, 24, 24) and v[0].dtype == np.uint8
    assert json.loads((out / "report.json").read_text())["n_frames"] == len(c)


def test_anisotropic_volume_slices_are_letterboxed(tmp_path):
    vol = phantom.make_volume(0, (10, 40, 40), np.random.default_rng(0))
    phantom.write_volume(tmp_path / "v.nii.gz", vol, spacing=(4.0, 0.5, 0.5))  # 40 mm x 20 mm x 20 mm
    prepare_corpus([tmp_path / "v.nii.gz"], tmp_path / "c", image_size=S, axes=(1,), progress=False)
    c = FrameCorpus(tmp_path / "c")
    frame = c[len(c) // 2]
    cols = (frame > 0).any(0).sum()  # along axis 1 a slice is (D=40 mm) x (W=20 mm): half the width is padding
    rows = (frame > 0).any(1).sum()
    assert rows == S and abs(cols - S / 2) <= 2


def test_bad_files_are_reported_not_fatal(tmp_path):
    bad = make_corrupt_files(tmp_path / "bad")
    rep = prepare_corpus([tmp_path / "bad"], tmp_path / "c", image_size=S, progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in rep["skipped"]}
    for p in bad.values():
        assert p.name in reasons, p.name
    assert "unsupported" in reasons["scan.xyz"]
    assert "NaN" in reasons["nan.nii.gz"] and "empty" in reasons["empty.dcm"]
    assert "constant" in reasons["constant.png"] and "absurd shape" in reasons["tiny.png"]
    assert rep["sources_read"] == 1 and rep["n_frames"] == 1  # the good.png next to them
    assert rep["sources_skipped"] == len(bad)


def test_exact_duplicates_removed(tmp_path):
    img = phantom.make_image(1, 64, "sector", np.random.default_rng(1))
    phantom.write_image(tmp_path / "s" / "a.png", img)
    phantom.write_image(tmp_path / "s" / "b.bmp", img)  # same pixels, other format
    phantom.write_image(tmp_path / "s" / "c.png", phantom.make_image(2, 64, "sector", np.random.default_rng(2)))
    rep = prepare_corpus([tmp_path / "s"], tmp_path / "c", image_size=S, progress=False)
    assert rep["n_frames"] == 2 and rep["duplicates_removed"] == 1


def test_cine_stride_and_near_duplicates(tmp_path):
    clip = phantom.make_cine(0, frames=8, size=64, rng=np.random.default_rng(3))
    clip = np.concatenate([clip[:4], np.repeat(clip[4:5], 4, 0)])  # a frozen tail: 3 repeats of frame 4
    phantom.write_cine(tmp_path / "clip.seq.nrrd", clip, (0.05, 0.3, 0.3))
    rep = prepare_corpus([tmp_path / "clip.seq.nrrd"], tmp_path / "c", image_size=S, progress=False)
    assert rep["n_frames"] == 5 and rep["near_duplicates_removed"] == 3
    rep = prepare_corpus([tmp_path / "clip.seq.nrrd"], tmp_path / "c2", image_size=S, frame_stride=2, progress=False)
    assert [r["frame"] for r in FrameCorpus(tmp_path / "c2").manifest()] == [0, 2, 4]


def test_resume_after_interruption(sources, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    full = prepare_corpus([sources], ref, image_size=S, axes=(0,), progress=False)
    real = corpus_mod._process_source
    calls = {"n": 0}

    def dies_after_seven(path, opts):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(path, opts)

    monkeypatch.setattr(corpus_mod, "_process_source", dies_after_seven)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([sources], out, image_size=S, axes=(0,), progress=False, shard_frames=10)
    partial = FrameCorpus(out)
    done = [json.loads(x) for x in (out / "done.jsonl").read_text().splitlines()]
    assert len(done) == 7 and 0 < len(partial) < full["n_frames"]  # what finished was kept
    kept = _sha_set(out)
    monkeypatch.setattr(corpus_mod, "_process_source", real)
    rep = prepare_corpus([sources], out, image_size=S, axes=(0,), progress=False, shard_frames=10)
    assert rep["sources_resumed"] == 7 and rep["sources_processed"] == 13 - 7
    # this run's counts cover the rest; the totals over both runs equal an uninterrupted run's
    assert rep["frames_written"] < full["frames_written"]
    assert rep["totals"] == {k: full[k] for k in rep["totals"]}
    assert rep["n_frames"] == full["n_frames"] and _sha_set(out) == _sha_set(ref)
    assert kept <= _sha_set(out)
    assert len(FrameCorpus(out)) == full["n_frames"]


def test_resume_recognises_copied_sources_by_content(tmp_path):
    src = tmp_path / "s"
    for i in range(3):
        phantom.write_image(src / f"{i}.bmp", phantom.make_image(i % 3, 64, "sector", np.random.default_rng(i)))
    first = prepare_corpus([src], tmp_path / "c", image_size=S, progress=False)
    later = time.time() + 3600  # a copy or re-sync without timestamps: same bytes, new mtime
    for f in src.iterdir():
        os.utime(f, (later, later))
    rep = prepare_corpus([src], tmp_path / "c", image_size=S, progress=False)
    assert rep["sources_resumed"] == 3 and rep["sources_processed"] == 0 and rep["n_frames"] == first["n_frames"]
    # same size (BMP: fixed by the dimensions) and new mtime but other content: processed again
    bmp = src / "1.bmp"
    size = bmp.stat().st_size
    phantom.write_image(bmp, phantom.make_image(2, 64, "sector", np.random.default_rng(99)))
    assert bmp.stat().st_size == size
    rep = prepare_corpus([src], tmp_path / "c", image_size=S, progress=False)
    assert rep["sources_resumed"] == 2 and rep["sources_processed"] == 1


def test_resume_discards_orphan_shard(sources, tmp_path):
    out = tmp_path / "c"
    prepare_corpus([sources / "images"], out, image_size=S, progress=False)
    n = len(FrameCorpus(out))
    np.save(out / "shards" / "shard_00099.npy", np.zeros((3, S, S), np.uint8))  # crash after shard, before manifest
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"shard": 99, "ind')  # torn line
    rep = prepare_corpus([sources / "images"], out, image_size=S, progress=False)
    assert rep["n_frames"] == n and not (out / "shards" / "shard_00099.npy").exists()
    assert len(FrameCorpus(out).manifest()) == n


def test_image_size_mismatch_on_resume(sources, tmp_path):
    prepare_corpus([sources / "images"], tmp_path / "c", image_size=S, progress=False)
    with pytest.raises(UsfmaeError, match="image size"):
        prepare_corpus([sources / "images"], tmp_path / "c", image_size=S * 2, progress=False)


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(UsfmaeError, match="no frames in corpus"):
        FrameCorpus(tmp_path / "missing")
    with pytest.raises(UsfmaeError, match="does not exist"):  # a missing source is an error, and writes nothing
        prepare_corpus([tmp_path / "nothing_here"], tmp_path / "c", image_size=S, progress=False)
    assert not (tmp_path / "c").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(UsfmaeError, match="usfmae prepare"):
        FrameCorpus(tmp_path / "c")
    with pytest.raises(UsfmaeError, match="no volumes"):
        VolumeCorpus(tmp_path / "c")


def test_two_workers_match_one(sources, tmp_path):
    a = prepare_corpus([sources / "images", sources / "cines"], tmp_path / "a", image_size=S, progress=False)
    b = prepare_corpus([sources / "images", sources / "cines"], tmp_path / "b", image_size=S, workers=2,
                       progress=False)
    assert a["n_frames"] == b["n_frames"] and _sha_set(tmp_path / "a") == _sha_set(tmp_path / "b")


def test_crop_and_text_removal(tmp_path):
    from usfmae_core.data.sector import annotation_mask, detect_imaged_region, inpaint

    rng = np.random.default_rng(5)
    img = phantom.make_image(0, 96, "sector", rng)
    screen = np.zeros((140, 200), np.uint8)
    screen[30:126, 60:156] = img
    screen[5:15, 5:50] = 255  # a title text block in the border
    screen[40:120, 170:190] = 120  # a grey side panel separated by black
    box = detect_imaged_region(screen)
    assert box is not None
    y0, y1, x0, x1 = box
    assert abs(y0 - 30) <= 3 and abs(y1 - 126) <= 3 and abs(x0 - 60) <= 6 and abs(x1 - 156) <= 6
    # a caliper cross and text strokes on the image are found and inpainted
    marked = img.astype(np.float32).copy()
    marked[40, 30:50] = 255
    marked[30:50, 40] = 255
    mask = annotation_mask(marked)
    assert mask[40, 30:50].mean() > 0.8 and mask[30:50, 40].mean() > 0.8
    assert annotation_mask(img).mean() < 0.05  # speckle alone is (mostly) not mistaken for text
    fixed = inpaint(marked, mask)
    line = fixed[40, 32:48]
    local = img[36:45, 30:50].astype(np.float32).mean()  # the speckle around, before marking
    assert (line < 250).all() and abs(line.mean() - local) < 0.15 * 255
    phantom.write_image(tmp_path / "s" / "screen.png", screen)
    rep = prepare_corpus([tmp_path / "s"], tmp_path / "c", image_size=S, crop_sector=True, remove_text=True,
                         progress=False)
    rec = FrameCorpus(tmp_path / "c").manifest()[0]
    assert rec["crop"] == list(box) and rep["n_frames"] == 1


def test_cli_prepare(sources, tmp_path, capsys):
    from usfmae_core.cli import main

    rc = main(["prepare", str(sources / "images"), "--out", str(tmp_path / "c"), "--image-size", str(S),
               "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "prepared 8 frames" in capsys.readouterr().out
