"""Preprocessing transforms, MONAI dict transforms, batched augmentation and the pretraining loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usfmae_core.data import phantom
from usfmae_core.data.corpus import prepare_corpus
from usfmae_core.data.datasets import (
    CorpusFrameDataset,
    MAEBatchAugment,
    MAEBatchAugment3D,
    make_pretrain_loader,
    make_pretrain_loader_3d,
)
from usfmae_core.data.readers import read_ultrasound
from usfmae_core.data.transforms import (
    LoadUltrasoundd,
    Preprocessing,
    RandUltrasoundAugmentd,
    UltrasoundToModelInputd,
    frames_to_tensor,
    image_to_frames,
    scale_intensity,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_scale_intensity_rule():
    x = np.array([[10, 20], [30, 110]], np.float32)
    np.testing.assert_allclose(scale_intensity(x), (x - 10) / 100)  # plain min-max for ordinary data
    y = np.random.default_rng(0).uniform(0, 100, (100, 100)).astype(np.float32)
    y[0, 0] = 1e6  # a hot pixel must not crush the picture
    s = scale_intensity(y)
    assert s.max() == 1.0 and np.median(s) > 0.4
    assert (scale_intensity(np.full((4, 4), 3.0)) == 0).all()


def test_preprocessing_round_trip_and_frames_to_tensor():
    p = Preprocessing(image_size=32, in_channels=3)
    q = Preprocessing.from_dict(p.to_dict())
    assert q == p and isinstance(p.to_dict()["mean"], list)
    frames = np.stack([phantom.make_image(i % 3, 40, rng=i) for i in range(3)]).astype(np.float32) * 4.0
    t = frames_to_tensor(frames, p)
    assert t.shape == (3, 3, 32, 32) and t.dtype == torch.float32
    # channel c is (x - mean[c]) / std[c] of the same grey image in [0, 1]
    grey = t[:, 0] * STD[0] + MEAN[0]
    np.testing.assert_allclose((t[:, 2] * STD[2] + MEAN[2]).numpy(), grey.numpy(), atol=1e-5)
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5 and grey.max() > 0.9
    one = frames_to_tensor(frames[0], Preprocessing(32, 1))
    assert one.shape == (1, 1, 32, 32)


def test_image_to_frames(tmp_path):
    vol = phantom.make_volume(1, (10, 12, 14), rng=0)
    phantom.write_volume(tmp_path / "v.mha", vol)
    img = read_ultrasound(tmp_path / "v.mha")
    assert image_to_frames(img, 0).shape == (10, 12, 14)
    assert image_to_frames(img, 2).shape == (14, 10, 12)
    phantom.write_image(tmp_path / "i.png", vol[0])
    assert image_to_frames(read_ultrasound(tmp_path / "i.png")).shape == (1, 12, 14)


def test_monai_dict_chain(tmp_path):
    from monai.transforms import Compose

    phantom.write_image(tmp_path / "a.png", phantom.make_image(2, 60, rng=1), spacing=(1, 1))
    phantom.write_cine(tmp_path / "b.dcm", phantom.make_cine(1, 4, 48, rng=2), (0.04, 0.2, 0.2))
    load = LoadUltrasoundd(keys="image")
    d = load({"image": str(tmp_path / "a.png"), "label": 2})
    assert tuple(d["image"].shape) == (1, 60, 60) and d["image"].meta["kind"] == "image"
    chain = Compose([load, UltrasoundToModelInputd("image", image_size=32, in_channels=3),
                     RandUltrasoundAugmentd("image", prob=1.0)])
    chain.set_random_state(0)
    out = chain({"image": str(tmp_path / "a.png"), "label": 2})
    assert tuple(out["image"].shape) == (3, 32, 32) and out["label"] == 2
    cine = chain({"image": str(tmp_path / "b.dcm")})
    assert tuple(cine["image"].shape) == (3, 32, 32)
    chain.set_random_state(0)
    again = chain({"image": str(tmp_path / "a.png"), "label": 2})
    torch.testing.assert_close(torch.as_tensor(again["image"]), torch.as_tensor(out["image"]))  # seeded


def test_mae_batch_augment_shapes_and_geometry():
    aug = MAEBatchAugment(image_size=32, in_channels=3, mean=MEAN, std=STD)
    x = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    y = aug(x)
    assert y.shape == (5, 3, 32, 32) and y.dtype == torch.float32
    assert aug(x[:, None].float() / 255).shape == (5, 3, 32, 32)
    # with full-size crops and no rotation, the only change is an optional horizontal flip
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None].repeat(64, 1, 1)
    pure = MAEBatchAugment(32, 1, (0.0,), (1.0,), scale=(1.0, 1.0), rotation_deg=0.0, ratio=(1.0, 1.0),
                           generator=torch.Generator().manual_seed(0))
    out = pure(ramp)[:, 0]
    same = (out - ramp).abs().amax((1, 2)) < 1e-4
    flipped = (out - ramp.flip(-1)).abs().amax((1, 2)) < 1e-4
    assert (same | flipped).all() and 10 < flipped.sum() < 54
    # eval mode: no augmentation, black stays black after normalisation
    aug.eval()
    z = aug(torch.zeros(2, 32, 32, dtype=torch.uint8))
    torch.testing.assert_close(z[0, :, 0, 0], -torch.tensor(MEAN) / torch.tensor(STD))


def test_mae_batch_augment_crops_vary():
    aug = MAEBatchAugment(32, 1, (0.0,), (1.0,), generator=torch.Generator().manual_seed(1))
    img = torch.from_numpy(phantom.make_image(1, 64, rng=3))[None].repeat(16, 1, 1)
    out = aug(img)
    flat = out.reshape(16, -1)
    assert torch.cdist(flat, flat).fill_diagonal_(1e9).min() > 1.0  # 16 different views of one image


def test_pretrain_loader(tmp_path):
    src = tmp_path / "s"
    for i in range(12):
        phantom.write_image(src / f"{i}.png", phantom.make_image(i % 3, 64, rng=i))
    vol = phantom.make_volume(1, (16, 24, 24), rng=0)
    phantom.write_volume(src / "v.nii.gz", vol, (1.0, 0.5, 0.5))
    prepare_corpus([src], tmp_path / "c", image_size=32, native_3d=True, volume_size=16, progress=False)
    ds = CorpusFrameDataset(tmp_path / "c")
    assert ds[0].dtype == torch.uint8 and ds[0].shape == (32, 32)
    loader = make_pretrain_loader(tmp_path / "c", batch_size=8, image_size=32, workers=0, seed=0)
    batches = list(loader)
    assert all(b.shape == (8, 32, 32) and b.dtype == torch.uint8 for b in batches)
    again = list(make_pretrain_loader(tmp_path / "c", batch_size=8, image_size=32, workers=0, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded shuffling
    out = MAEBatchAugment(32, 3)(batches[0])
    assert out.shape == (8, 3, 32, 32)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    part = list(make_pretrain_loader(tmp_path / "c", 4, 32, sampler=sampler, drop_last=False))
    assert sum(len(b) for b in part) == len(ds) // 2
    v = next(iter(make_pretrain_loader_3d(tmp_path / "c", batch_size=1)))
    assert v.shape == (1, 16, 16, 16)
    assert MAEBatchAugment3D(12)(v).shape == (1, 1, 12, 12, 12)


def test_phantom_volume_lesion_scale():
    """``lesion_scale`` enlarges the mass in every axis from the same random draws (the demo's volume set); the
    background outside the lesion's slices is unchanged and 1.0 is the default volume."""
    shape = (16, 64, 64)
    plain, default = phantom.make_volume(0, shape, rng=5), phantom.make_volume(0, shape, rng=5, lesion_scale=1.0)
    small, large = phantom.make_volume(2, shape, rng=5), phantom.make_volume(2, shape, rng=5, lesion_scale=2.0)
    np.testing.assert_array_equal(plain, default)

    def changed(vol):  # slices that differ from the lesion-free volume of the same draws
        return int((np.abs(vol.astype(int) - plain).reshape(len(vol), -1).max(1) > 0).sum())

    assert 0 < changed(small) < changed(large)
    assert (large.astype(float) < plain - 20).sum() > 2 * (small.astype(float) < plain - 20).sum()


@pytest.mark.slow
def test_phantom_classes_are_learnable():
    """A tiny CNN trained for well under a minute on CPU beats chance (1/3) clearly on held-out phantoms."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def data(n):
        ys = np.arange(n) % 3
        xs = np.stack([phantom.make_image(int(y), 64, ("sector", "linear")[i % 2], rng) for i, y in enumerate(ys)])
        return torch.from_numpy(xs).float()[:, None] / 255, torch.from_numpy(ys)

    xtr, ytr = data(900)
    xte, yte = data(300)

    def block(i, o):
        return [torch.nn.Conv2d(i, o, 3, 1, 1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    net = torch.nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), *block(64, 64),
                              torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for _ in range(10):
        net.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(net((xtr[idx] - 0.45) / 0.3), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net((xte - 0.45) / 0.3).argmax(1) == yte).float().mean().item()
    assert acc > 0.6, acc
