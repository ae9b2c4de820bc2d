"""``usfmae finetune``: train an ultrasound classifier from a pretrained USF-MAE, from scratch, or a CNN baseline.

Usage::

    usfmae finetune --data LABELLED --out RUN --init MAE.pt                 # full fine-tuning of a pretrained MAE
    usfmae finetune --data LABELLED --out RUN --init MAE.pt --linear-probe  # frozen encoder, linear head
    usfmae finetune --data LABELLED --out RUN --preset vit_small            # ViT from scratch
    usfmae finetune --data LABELLED --out RUN --arch resnet --depth 50      # MONAI ResNet-50 baseline
    usfmae finetune --data LABELLED --out RUN --init MAE.pt --folds 5       # 5-fold cross-validation

``LABELLED`` is a class-per-folder tree, a CSV manifest or a JSON datalist
(:func:`usfmae_core.data.labelled.labelled_source_to_datalist`). The datalist actually used (splits, and the training
subsample of ``--label-fraction``) is saved as ``RUN/datalist.json``; passing it back as ``--data`` reproduces the
run, and ``usfmae evaluate --data RUN/datalist.json`` evaluates on its test split.

Inputs are 2D frames by default: a labelled cine or volume then contributes its middle frame / slice
(:class:`~usfmae_core.data.transforms.UltrasoundToModelInputd`), and ``usfmae predict`` classifies whole volumes slice
by slice. With ``--volume-model`` each labelled volume or clip is one example with one label
(:mod:`usfmae_core.data.volumes`), in the same loop, splits and reports::

    usfmae finetune --data VOLUMES --out RUN --volume-model 3d --init MAE3D.pt   # native 3D ViT (--native-3d MAE)
    usfmae finetune --data VOLUMES --out RUN --volume-model 3d --init MAE2D.pt   # 3D ViT, 2D MAE inflated
    usfmae finetune --data VOLUMES --out RUN --volume-model mil --init MAE2D.pt  # slice encoder + attention MIL
    usfmae finetune --data VOLUMES --out RUN --volume-model 3d --arch resnet --depth 18   # MONAI 3D ResNet-18

``3d`` resamples each volume onto an isotropic grid in a cube (``--volume-spacing`` fixes the mm per voxel) and
classifies it whole; ``mil`` encodes the informative slices along ``--axis`` (every frame of a clip) with the 2D
encoder and pools them with learned gated attention, which also says which slices drove the decision. ``--batch-size``
then counts volumes (default 4), and MIL training draws ``--max-slices`` evenly spaced slices per volume and step.

Recipe (MAE fine-tuning, He et al. 2022, without mixup/cutmix): AdamW, ``lr = blr * batch / 256`` unless ``--lr``,
linear warm-up then cosine decay per step, no weight decay on norms / biases / tokens / position embeddings,
layer-wise lr decay (default 0.75 when starting from an MAE), drop-path, label smoothing, augmentation by random
resized crop (area 0.5-1), horizontal flip and rotation (+-10 degrees). Linear probing (``--linear-probe``) freezes
the encoder and trains the plain linear head (no BatchNorm, unlike facebook's LARS recipe, so the checkpoint stays an
ordinary ``classifier``) with no weight decay and a 10x larger base lr. The model with the best validation macro-F1
is kept (ties: lower validation loss); ``--patience`` stops early after that many epochs without improvement.

Outputs in ``RUN``: ``model.pt`` (our checkpoint: arch ``classifier``/``resnet``/``densenet``, config with
``classes`` and ``preprocessing``), ``metrics.json`` (validation and test metrics of the best model, and the
per-epoch history), ``history.csv``, ``curves.png`` (loss and validation macro-F1 per epoch), ``datalist.json``,
``config.json`` (the arguments) and ``tensorboard/``. ``model.pt`` is rewritten (atomically) whenever the
validation macro-F1 improves, so an interrupted run keeps its best model so far. With ``--folds K``: ``fold_<i>/``
per fold (the same files but ``config.json``) and ``cv_summary.json`` / ``cv_summary.csv`` (mean and standard
deviation over folds; train a final model without ``--folds``).

Engine: MONAI's ignite engines (``SupervisedTrainer`` ...) are not used because ignite is not a dependency of this
package and the class-balanced sampler, per-step cosine lr with layer-wise groups and early stopping on macro-F1 fit
a plain loop better. The pieces are exposed so that a MONAI bundle config assembles the same training::

    "classes": "$usfmae_core.data.labelled.labelled_source_to_datalist(@dataset_dir)['classes']",
    "built": "$usfmae_core.workflows.finetune.build_classifier(len(@classes), init=@mae_ckpt, image_size=224)",
    "network_def": "$@built[0]",
    "preprocessing": "$usfmae_core.data.transforms.Preprocessing.from_dict(@built[1]['preprocessing'])",
    "datalist": "$usfmae_core.data.labelled.labelled_source_to_datalist(@dataset_dir)",
    "train#dataset": "$usfmae_core.workflows.finetune.make_datasets(@datalist, @preprocessing)['training']",
    "train#preprocessing": "$usfmae_core.workflows.finetune.make_transforms(@preprocessing, train=True)",
    "loss": "$usfmae_core.workflows.finetune.make_loss(len(@classes), label_smoothing=0.1)",
    "optimizer": "$usfmae_core.workflows.finetune.make_optimizer(@network, 1e-4, 0.05, 0.75)",

and the trainer (``SupervisedTrainer``) takes ``network``, ``optimizer``, ``loss_function`` and a DataLoader of that
dataset; batches are dicts with ``image`` ``(B, C, S, S)`` and ``label`` ``(B,)``. The saved ``model.pt`` is built
with :func:`usfmae_core.networks.presets.build_model` from its config.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfmae_core.device import resolve_device
from usfmae_core.errors import UsfmaeError
from usfmae_core.precision import precision_name, resolve_precision
from usfmae_core.workflows import metrics as M
from usfmae_core.workflows.common import Progress, seed_everything, write_csv, write_json
from usfmae_core.workflows.pictures import save_figure

__all__ = [
    "FinetuneOptions",
    "build_classifier",
    "classifier_train_step",
    "finetune",
    "forward_batch",
    "kfold_datalists",
    "load_labelled",
    "mae_preprocessing",
    "make_datasets",
    "make_loader",
    "make_loss",
    "make_optimizer",
    "make_sampler",
    "make_transforms",
    "predict_probs",
    "probe_input_shape",
    "train_classifier",
]

SPLITS = ("training", "validation", "test")
CACHE_BYTES = 4 * 2**30  # cache at most this much preprocessed model input in memory; the rest is re-read per epoch


# ----------------------------------------------------------------------------------------------- small helpers
def jsonable(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None (strict JSON), numpy scalars and arrays as Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ------------------------------------------------------------------------------------------------------- data
def load_labelled(source: str | Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  include_masks: bool = False, mask_patterns: Sequence[str] | None = None) -> dict[str, Any]:
    """The datalist of ``source`` (class folders, CSV or datalist JSON), checked for what training needs. Folders and
    CSVs are cleaned (masks set aside, duplicates removed, near-duplicates and augmented copies grouped; see
    :func:`usfmae_core.data.labelled.labelled_source_to_datalist`) and split with ``seed`` and the fractions; a datalist
    JSON keeps its own splits. :func:`usfmae_core.data.labelled.datalist_summary` describes the result.

    Raises:
        UsfmaeError: the source is missing, has fewer than 2 classes, or a split of it is empty.
    """
    from usfmae_core.data.labelled import labelled_source_to_datalist

    path = Path(source)
    if not path.exists():
        raise UsfmaeError(f"labelled data {path} does not exist",
                          "pass a class-per-folder tree, a CSV manifest or a datalist JSON with --data")
    datalist = labelled_source_to_datalist(path, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                                           include_masks=include_masks, mask_patterns=mask_patterns)
    classes = list(datalist.get("classes") or [])
    if len(classes) < 2:
        raise UsfmaeError(f"labelled data {path} has {len(classes)} class(es) ({', '.join(map(str, classes)) or '-'})",
                          "a classifier needs at least 2 classes: one sub-folder (or CSV label) per class")
    return datalist


def check_splits(datalist: dict[str, Any], source: str | Path, need: Sequence[str] = ("training", "validation")
                 ) -> None:
    """Refuse a datalist whose ``need`` splits miss a class (a class with too few images to split)."""
    classes = [str(c) for c in datalist["classes"]]
    pool = [int(it["label"]) for s in SPLITS for it in (datalist.get(s) or [])]
    for split in need:
        present = {int(it["label"]) for it in (datalist.get(split) or [])}
        missing = [k for k in range(len(classes)) if k not in present]
        if missing:
            what = ", ".join(f"'{classes[k]}' ({pool.count(k)} image(s))" for k in missing)
            raise UsfmaeError(f"the {split} split of {source} has no image of class {what}: too few images to split",
                              "give every class at least 4 images (training / validation / test), use fewer "
                              "--folds, or remove that class")


def kfold_datalists(datalist: dict[str, Any], folds: int, seed: int = 0) -> list[dict[str, Any]]:
    """``folds`` datalists for cross-validation. The datalist's own ``folds`` are used when there are that many,
    else training + validation are pooled and split into stratified, group-aware parts
    (:func:`usfmae_core.data.labelled.make_splits`); fold ``i`` validates on part ``i`` and trains on the rest; the
    test split is kept as it is (held out from every fold)."""
    from usfmae_core.data.labelled import make_splits

    if folds < 2:
        raise UsfmaeError(f"--folds {folds} is too few", "use --folds 2 or more (or leave it out)")
    parts = datalist.get("folds")
    if not parts or len(parts) != folds:
        pool = list(datalist.get("training") or []) + list(datalist.get("validation") or [])
        parts = make_splits(pool, datalist["classes"], 0.0, 0.0, n_folds=folds, seed=seed)["folds"]
    keep = {k: v for k, v in datalist.items() if k not in SPLITS and k != "folds"}
    out = []
    for i in range(folds):
        train = [it for j, p in enumerate(parts) if j != i for it in p]
        out.append({**keep, "training": train, "validation": list(parts[i]),
                    "test": list(datalist.get("test") or []), "fold": i})
    return out


def make_transforms(prep: Any, train: bool = False, augment_scale: tuple[float, float] = (0.5, 1.0),
                    rotation_deg: float = 10.0, volume: Any = None, augment: bool = True) -> Any:
    """MONAI dict transforms: ``LoadUltrasoundd -> UltrasoundToModelInputd`` (+ ``RandUltrasoundAugmentd`` when
    ``train``). Items ``{"image": path, "label": int}`` become ``{"image": (C, S, S) float32, "label": int}``.

    With a :class:`~usfmae_core.data.volumes.VolumeInput` ``volume``: ``VolumeToModelInputd`` gives a cube
    ``(C, S, S, S)`` (``3d``; + ``RandVolumeAugmentd`` when training) or a bag of slices ``(N, C, S, S)`` (``mil``;
    training adds ``RandBagAugmentd``, which keeps ``max_slices`` of them, evenly spaced).

    Args:
        prep: :class:`~usfmae_core.data.transforms.Preprocessing` (image size, channels, mean / std, resize mode,
            sector crop, colour rule).
        train: training-time processing (random resized crop (area ``augment_scale``), flip and rotation).
        volume: None for 2D models.
        augment: with ``train``, apply the random augmentation (a MIL bag is still subsampled without it).
    """
    from monai.transforms import Compose

    from usfmae_core.data.transforms import (
        LoadUltrasoundd,
        RandUltrasoundAugmentd,
        UltrasoundToModelInputd,
        loads_colour,
    )

    chain: list[Any] = [LoadUltrasoundd(keys="image", colour=loads_colour(prep, volume))]
    if volume is not None:
        from usfmae_core.data.volumes import RandBagAugmentd, RandVolumeAugmentd, VolumeToModelInputd

        chain.append(VolumeToModelInputd(keys="image", prep=prep, volume=volume))
        if train and volume.model == "mil":
            chain.append(RandBagAugmentd(keys="image", max_slices=volume.max_slices, augment=augment,
                                         scale=augment_scale, rotation_deg=rotation_deg, mean=prep.mean, std=prep.std))
        elif train and augment:
            chain.append(RandVolumeAugmentd(keys="image", rotation_deg=rotation_deg))
        return Compose(chain)
    chain.append(UltrasoundToModelInputd(keys="image", preprocessing=prep))
    if train and augment:
        chain.append(RandUltrasoundAugmentd(keys="image", scale=augment_scale, rotation_deg=rotation_deg,
                                            mean=prep.mean, std=prep.std))
    return Compose(chain)


def _plain_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # only what the transforms and the default collate handle (a None group would break collation)
    return [{"image": str(it["image"]), "label": int(it["label"])} for it in items]


def item_bytes(prep: Any, volume: Any = None) -> int:
    """Memory of one preprocessed item (float32): an image, a cube, or a bag (counted as 128 slices)."""
    per_image = int(prep.in_channels) * int(prep.image_size) ** 2 * 4
    if volume is None:
        return per_image
    return per_image * int(prep.image_size) if volume.model == "3d" else per_image * 128


def _user_error_in(err: BaseException) -> UsfmaeError | None:
    """The :class:`UsfmaeError` that MONAI wrapped while applying a transform (``RuntimeError`` chains), if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UsfmaeError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def make_datasets(datalist: dict[str, Any], prep: Any, splits: Sequence[str] = SPLITS, cache: bool = True,
                  augment: bool = True, volume: Any = None) -> dict[str, Any]:
    """One MONAI dataset per split of ``datalist`` (``training`` with training-time processing; augmented when
    ``augment``); ``volume`` (a :class:`~usfmae_core.data.volumes.VolumeInput`) makes each item a volume / clip.

    With ``cache`` the deterministic part (read + preprocess) is computed once and kept in memory
    (``monai.data.CacheDataset``, up to :data:`CACHE_BYTES`); the random part still runs every epoch. A file that
    turns out unusable while caching (e.g. a 2D image for a 3D model) stops the run with its one-line error.
    """
    from monai.data import CacheDataset, Dataset

    per_item = item_bytes(prep, volume)
    out: dict[str, Any] = {}
    for split in splits:
        items = _plain_items(datalist.get(split) or [])
        tf = make_transforms(prep, train=split == "training" and (augment or volume is not None), volume=volume,
                             augment=augment)
        if cache and items:
            rate = min(1.0, CACHE_BYTES / max(1, per_item * len(items)))
            try:
                out[split] = CacheDataset(items, tf, cache_rate=rate, num_workers=None, progress=False)
            except Exception as err:
                user = _user_error_in(err)
                if user is None:
                    raise
                raise user from None
        else:
            out[split] = Dataset(items, tf)
    return out


def make_sampler(labels: Sequence[int], num_classes: int, seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Class-balanced sampling with replacement: each class is drawn equally often on average."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = 1.0 / counts[y]
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(y), replacement=True,
                                                  generator=g)


def make_loader(dataset: Any, batch_size: int, train: bool, workers: int = 0, sampler: Any = None,
                seed: int = 0, volume: Any = None) -> Any:
    """A MONAI ``DataLoader`` (it seeds the random transforms reproducibly); training shuffles (or uses
    ``sampler``) and drops a last batch of one sample (BatchNorm cannot train on it). MIL bags (``volume.model ==
    "mil"``) are padded to one length with a ``mask`` (:func:`~usfmae_core.data.volumes.collate_bags`)."""
    from monai.data import DataLoader

    n = len(dataset)
    bs = max(1, min(batch_size, n))
    g = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if volume is not None and volume.model == "mil":
        from usfmae_core.data.volumes import collate_bags

        extra["collate_fn"] = collate_bags
    return DataLoader(dataset, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=train and n % bs == 1 and n > 1, generator=g,
                      persistent_workers=workers > 0, **extra)


def make_loss(num_classes: int, class_counts: Sequence[int] | None = None, balance: str = "none",
              label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy on logits; ``balance="loss"`` weights class ``k`` by ``N / (K * count_k)``."""
    weight = None
    if balance == "loss":
        if class_counts is None:
            raise ValueError("balance='loss' needs class_counts")
        c = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        weight = torch.as_tensor(c.sum() / (num_classes * c), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------------------------------- models
def mae_preprocessing(ckpt: dict[str, Any]) -> Any:
    """The preprocessing an MAE checkpoint was trained with (its config's ``preprocessing``, else its input size
    and channels with the default normalisation)."""
    from usfmae_core.data.transforms import Preprocessing

    cfg = ckpt["config"]
    if cfg.get("preprocessing"):
        return Preprocessing.from_dict(cfg["preprocessing"])
    size = cfg.get("img_size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    return Preprocessing.from_dict({"image_size": size, "in_channels": int(cfg.get("in_channels", 3))})


def _load_mae(init: str | Path, volume_model: str | None = None) -> dict[str, Any]:
    from usfmae_core.checkpoints import load_checkpoint

    ckpt = load_checkpoint(init)
    if ckpt["arch"] != "mae":
        raise UsfmaeError(f"--init {init} holds a '{ckpt['arch']}' model, not a pretrained MAE",
                          "pass a checkpoint from usfmae pretrain or usfmae import-weights (arch 'mae'); "
                          "to evaluate a trained classifier use usfmae evaluate")
    if int(ckpt["config"].get("spatial_dims", 2)) != 2 and volume_model != "3d":
        what = "the MIL slice encoder is 2D" if volume_model == "mil" else "fine-tuning trains a 2D classifier"
        raise UsfmaeError(f"--init {init} is a 3D MAE, but {what}",
                          "add --volume-model 3d to fine-tune a native 3D ViT on volumes, or start from a 2D MAE")
    return ckpt


def build_classifier(num_classes: int, arch: str = "vit", init: str | Path | dict | None = None,
                     preset: str = "vit_base", image_size: int | None = None, in_channels: int | None = None,
                     patch_size: int = 16, depth: int | None = None, pool: str = "avg", dropout: float = 0.0,
                     drop_path: float = 0.0, volume: Any = None, resize: str = "letterbox",
                     crop_sector: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier and its checkpoint config (model kwargs, ``preset``, ``preprocessing``, and ``volume`` for volume
    models; the caller adds ``classes``).

    Args:
        num_classes: outputs K; the model returns logits ``(B, K)`` for input ``(B, C, S, S)`` (2D), ``(B, C, S, S, S)``
            (``volume.model == "3d"``) or bags ``(B, N, C, S, S)`` with a mask ``(B, N)`` (``"mil"``).
        arch: ``vit`` (:class:`~usfmae_core.networks.classifier.USFMAEClassifier`), ``resnet`` or ``densenet``
            (MONAI, from scratch).
        init: an MAE checkpoint (path or loaded dict) whose encoder starts the ViT; its preprocessing is kept
            (``image_size`` may still differ: position embeddings are re-gridded).
        preset: ViT size when training from scratch (``usfmae_core.networks.presets.PRESETS``).
        image_size / in_channels: model input (default: the MAE's, else 224 and 3).
        patch_size: ViT patch size from scratch.
        depth: ResNet 10/18/34/50 (default 50) or DenseNet 121/169 (default 121).
        pool / dropout / drop_path: ViT head pooling (``avg`` | ``cls``), dropout before the head, drop-path rate.
        volume: a :class:`~usfmae_core.data.volumes.VolumeInput` for a volume model: ``3d`` builds a native 3D ViT
            (from a 3D MAE, a 2D MAE inflated over depth, or a preset) or a MONAI 3D CNN; ``mil`` an
            :class:`~usfmae_core.networks.volume.AttentionMILClassifier` (from a 2D MAE or a preset).
        resize / crop_sector: the geometry rule of this classifier's input (``letterbox`` | ``squash``, crop to the
            imaged sector), stored in its ``preprocessing`` with the colour rule (colour as RGB for 3 channels): they
            are this fine-tuning's choice, whatever the MAE's corpus used.
    """
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.classifier import USFMAEClassifier, cnn_baseline
    from usfmae_core.networks.presets import PRESETS, encoder_config, mae_config
    from usfmae_core.networks.volume import AttentionMILClassifier

    if arch not in ("vit", "resnet", "densenet"):
        raise UsfmaeError(f"unknown --arch '{arch}'", "choose vit, resnet or densenet")
    if init is not None and arch != "vit":
        raise UsfmaeError(f"--init (an MAE) cannot start a {arch} model", "leave out --arch, or leave out --init")
    mode = None if volume is None else volume.model
    if mode == "mil" and arch != "vit":
        raise UsfmaeError(f"--volume-model mil encodes slices with the USF-MAE ViT, not a {arch}",
                          "leave out --arch (or use --volume-model 3d for a 3D CNN)")
    dims = 3 if mode == "3d" else 2
    mil_kw = {"attention_hidden": 128, "attention_dropout": 0.0}
    if init is not None:
        ckpt = init if isinstance(init, dict) else _load_mae(init, mode)
        prep = mae_preprocessing(ckpt)
        if in_channels is not None and in_channels != prep.in_channels:
            raise UsfmaeError(f"--in-channels {in_channels} differs from the MAE's {prep.in_channels}",
                              "leave out --in-channels when starting from an MAE")
        if image_size:
            prep.image_size = int(image_size)
        if mode == "mil":
            model = AttentionMILClassifier.from_mae(ckpt, num_classes, pool=pool, dropout=dropout,
                                                    drop_path_rate=drop_path, img_size=prep.image_size, **mil_kw)
        else:
            model = USFMAEClassifier.from_mae(ckpt, num_classes, pool=pool, dropout=dropout, drop_path_rate=drop_path,
                                              img_size=prep.image_size, spatial_dims=dims)
        config = encoder_config(ckpt["config"])
        config.update(img_size=prep.image_size, drop_path_rate=drop_path, num_classes=num_classes, pool=pool,
                      dropout=dropout, preset=ckpt["config"].get("preset", "custom"), spatial_dims=dims,
                      patch_size=list(model.encoder.patch_size))
    else:
        prep = Preprocessing(image_size=int(image_size or (96 if mode == "3d" else 224)),
                             in_channels=int(in_channels or 3))
        if arch == "vit":
            if preset not in PRESETS:
                raise UsfmaeError(f"unknown --preset '{preset}'", f"choose one of {', '.join(PRESETS)}")
            if prep.image_size % patch_size:
                raise UsfmaeError(f"--image-size {prep.image_size} is not a multiple of --patch-size {patch_size}",
                                  "choose an image size divisible by the patch size")
            config = encoder_config(mae_config(preset, img_size=prep.image_size, in_channels=prep.in_channels,
                                               patch_size=patch_size, drop_path_rate=drop_path, spatial_dims=dims))
            config.update(num_classes=num_classes, pool=pool, dropout=dropout)
            if mode == "mil":
                model = AttentionMILClassifier(num_classes=num_classes, pool=pool, dropout=dropout, **mil_kw,
                                               **encoder_config(config))
            else:
                model = USFMAEClassifier(num_classes=num_classes, pool=pool, dropout=dropout,
                                         **encoder_config(config))
            config["preset"] = preset
        else:
            depth = depth or (50 if arch == "resnet" else 121)
            valid = (10, 18, 34, 50) if arch == "resnet" else (121, 169)
            if depth not in valid:
                raise UsfmaeError(f"--depth {depth} is not available for {arch}", f"choose one of {valid}")
            model = cnn_baseline(arch, num_classes, prep.in_channels, dims, depth)
            config = {"num_classes": num_classes, "in_channels": prep.in_channels, "spatial_dims": dims, "depth": depth,
                      "preset": f"{arch}{depth}"}
    if mode == "mil":
        config.update(mil_kw)
    if volume is not None:
        config["volume"] = volume.to_dict()
    prep.resize, prep.crop_sector, prep.colour = str(resize), bool(crop_sector), "rgb"
    config["preprocessing"] = Preprocessing(**{k: v for k, v in prep.to_dict().items()}).to_dict()  # validated
    return model, config


def checkpoint_arch(arch: str, volume: Any = None) -> str:
    """The checkpoint's ``arch`` of a fine-tuned model: ``classifier`` (a 2D or native 3D ViT), ``mil``, or the CNN's
    name."""
    if volume is not None and volume.model == "mil":
        return "mil"
    return "classifier" if arch == "vit" else arch


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999 as in MAE fine-tuning; fused kernel where available,
    :func:`~usfmae_core.workflows.optim.adamw`) over :func:`~usfmae_core.workflows.optim.param_groups`
    (layer-wise decay applies to ViTs; CNNs get one decay / no-decay pair)."""
    from usfmae_core.workflows.optim import adamw, param_groups

    groups = param_groups(model, weight_decay, layer_decay, base_lr=lr)
    if not groups:
        raise UsfmaeError("the model has no trainable parameter", "do not freeze everything")
    return adamw(groups, lr=lr, betas=(0.9, 0.999))


# ------------------------------------------------------------------------------------------------ train / eval
def _as_plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def forward_batch(model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The model's logits for a batch: ``model(image)``, or ``model(image, mask)`` for MIL bags (batches with a
    ``mask``, :func:`~usfmae_core.data.volumes.collate_bags`)."""
    x = _as_plain(batch["image"]).to(device, non_blocking=True)
    mask = batch.get("mask")
    if mask is None:
        return model(x)
    return model(x, torch.as_tensor(mask).to(device, non_blocking=True))


def probe_input_shape(batch_size: int, prep: Any, volume: Any = None) -> tuple[int, ...]:
    """One batch's model input shape, for the precision probe (:func:`usfmae_core.precision.resolve_precision`):
    frames ``(B, C, S, S)``, cubes ``(B, C, S, S, S)`` (``volume.model == "3d"``) or bags ``(B, N, C, S, S)``
    (``"mil"``, ``N = volume.max_slices``)."""
    c, s = int(prep.in_channels), int(prep.image_size)
    if volume is None:
        return (int(batch_size), c, s, s)
    if volume.model == "mil":
        return (int(batch_size), int(volume.max_slices), c, s, s)
    return (int(batch_size), c, s, s, s)


def classifier_train_step(model: nn.Module, batch: dict[str, Any], criterion: nn.Module,
                          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, *,
                          device: torch.device, amp_dtype: torch.dtype | None = None, clip_grad: float | None = None,
                          where: str = "") -> float:
    """One fine-tuning step on ``batch`` (``image``, ``label``, ``mask`` for MIL bags; see :func:`forward_batch`):
    forward under autocast, loss on float32 logits, backward, optional gradient clipping, optimiser step. Returns the
    loss.

    Raises:
        UsfmaeError: the loss is not finite (the weights are left as they were).
    """
    y = torch.as_tensor(batch["label"]).long().to(device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = forward_batch(model, batch, device)
    loss = criterion(logits.float(), y)
    value = loss.detach().item()
    if not math.isfinite(value):
        raise UsfmaeError(f"the training loss became {value}{' ' + where if where else ''}",
                          "lower --lr / --blr, or use --precision fp32")
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaling else loss).backward()
    if clip_grad:
        if scaling:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return value


@torch.no_grad()
def predict_probs(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device,
                  dtype: torch.dtype | None = None, progress: Progress | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities ``(N, K)`` (softmax in float32), labels ``(N,)`` and the mean cross-entropy."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for batch in loader:
        y = torch.as_tensor(batch["label"]).long().to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward_batch(model, batch, device)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.cpu().numpy())
        if progress is not None:
            progress.update(1)
    n = sum(len(lab) for lab in labels)
    if not n:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), float("nan")
    return np.concatenate(probs).astype(np.float64), np.concatenate(labels), loss_sum / n


@dataclass
class FinetuneOptions:
    """Everything ``usfmae finetune`` can be told (CLI flags map one to one; see ``usfmae finetune --help``)."""

    init: str | None = None
    arch: str = "vit"
    preset: str = "vit_base"
    depth: int | None = None
    image_size: int | None = None
    in_channels: int | None = None
    patch_size: int = 16
    pool: str = "avg"
    dropout: float = 0.0
    drop_path: float = 0.1
    linear_probe: bool = False
    augment: bool = True
    volume_model: str | None = None
    max_slices: int = 32
    volume_spacing: float | None = None
    axis: int = 0
    epochs: int = 50
    warmup_epochs: int = 5
    batch_size: int | None = None
    lr: float | None = None
    blr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    balance: str = "none"
    patience: int = 10
    label_fraction: float = 1.0
    resize: str = "letterbox"
    crop_sector: bool = False
    include_masks: bool = False
    mask_patterns: list[str] = field(default_factory=list)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    folds: int = 0
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    mlflow: str | None = None
    tensorboard: bool = True
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def volume(self) -> Any:
        """The :class:`~usfmae_core.data.volumes.VolumeInput` of ``--volume-model`` (None for a 2D model)."""
        if not self.volume_model:
            return None
        from usfmae_core.data.volumes import VolumeInput

        return VolumeInput(model=self.volume_model, axis=self.axis, max_slices=self.max_slices,
                           spacing=self.volume_spacing)

    def batch(self) -> int:
        """Items per training batch: ``batch_size``, by default 32 images or 4 volumes."""
        return int(self.batch_size or (4 if self.volume_model else 32))

    def resolved(self, batch_size: int) -> dict[str, float]:
        """lr, weight decay and layer decay after defaults (which depend on the arm)."""
        probe = self.linear_probe
        blr = self.blr if self.blr is not None else (1e-2 if probe else 1e-3)
        lr = self.lr if self.lr is not None else blr * batch_size / 256
        wd = self.weight_decay if self.weight_decay is not None else (0.0 if probe else 0.05)
        ld = self.layer_decay
        if ld is None and self.init and not probe and self.arch == "vit":
            ld = 0.75
        if ld is not None and ld >= 1.0:
            ld = None
        return {"lr": lr, "weight_decay": wd, "layer_decay": ld}


def _validate_options(opts: FinetuneOptions) -> None:
    from usfmae_core.data.transforms import RESIZE_MODES

    if opts.resize not in RESIZE_MODES:
        raise UsfmaeError(f"unknown --resize '{opts.resize}'", f"choose one of {', '.join(RESIZE_MODES)}")
    if opts.linear_probe and not opts.init:
        raise UsfmaeError("--linear-probe needs a pretrained encoder", "add --init MAE_CKPT")
    if opts.arch not in ("vit", "resnet", "densenet"):
        raise UsfmaeError(f"unknown --arch '{opts.arch}'", "choose vit, resnet or densenet")
    if opts.init and opts.arch != "vit":
        raise UsfmaeError(f"--init (an MAE) cannot start a {opts.arch} model", "leave out --arch, or leave out --init")
    if opts.arch == "vit" and not opts.init:
        from usfmae_core.networks.presets import PRESETS

        if opts.preset not in PRESETS:
            raise UsfmaeError(f"unknown --preset '{opts.preset}'", f"choose one of {', '.join(PRESETS)}")
        if (opts.image_size or 224) % opts.patch_size:
            raise UsfmaeError(f"--image-size {opts.image_size or 224} is not a multiple of --patch-size "
                              f"{opts.patch_size}", "choose an image size divisible by the patch size")
    if opts.arch != "vit" and opts.depth is not None:
        valid = (10, 18, 34, 50) if opts.arch == "resnet" else (121, 169)
        if opts.depth not in valid:
            raise UsfmaeError(f"--depth {opts.depth} is not available for {opts.arch}", f"choose one of {valid}")
    if opts.balance not in ("none", "loss", "sampler"):
        raise UsfmaeError(f"unknown --balance '{opts.balance}'", "choose none, loss or sampler")
    if not 0.0 < opts.label_fraction <= 1.0:
        raise UsfmaeError(f"--label-fraction {opts.label_fraction} is outside (0, 1]", "use e.g. 0.1, 0.25 or 1")
    opts.volume()  # checks the volume options
    if opts.volume_model == "mil" and opts.arch != "vit":
        raise UsfmaeError(f"--volume-model mil encodes slices with the USF-MAE ViT, not a {opts.arch}",
                          "leave out --arch (or use --volume-model 3d for a 3D CNN)")
    if opts.epochs < 1 or opts.batch() < 1:
        raise UsfmaeError("--epochs and --batch-size must be at least 1", "pass positive values")
    if opts.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UsfmaeError("--mlflow was given but mlflow is not installed",
                              "pip install 'usfmae[mlflow]' (or leave out --mlflow)") from None


class _Trackers:
    """TensorBoard (and MLflow when asked) scalars per epoch; both optional, both closed at the end."""

    def __init__(self, out: Path, opts: FinetuneOptions, params: dict[str, Any], first_epoch: int = 1) -> None:
        self.tb = None
        self.mlflow = None
        if opts.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, events logged after the checkpoint (by the killed run) are dropped and logged again
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=first_epoch if first_epoch > 1 else None)
        if opts.mlflow:
            import mlflow

            mlflow.set_tracking_uri(opts.mlflow)
            mlflow.set_experiment("usfmae-finetune")
            mlflow.start_run(run_name=out.name)
            mlflow.log_params({k: str(v) for k, v in params.items()})
            self.mlflow = mlflow

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in values.items()
                                     if math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _save_curves(history: list[dict[str, float]], path: Path, best_epoch: int | None = None) -> Path:
    from matplotlib.figure import Figure

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], label="training", lw=1.4)
    ax1.plot(ep, [h["val_loss"] for h in history], label="validation", lw=1.4)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(ep, [h["val_f1_macro"] for h in history], color="tab:green", lw=1.4, marker="o", ms=3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation macro-F1")
    if best_epoch:
        ax2.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best (epoch {best_epoch})")
        ax2.legend(loc="lower right")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


CKPT_NAME = "checkpoint_last.pt"


def _randomizables(transform: Any) -> list[Any]:
    """The random transforms inside ``transform`` (MONAI ``Compose`` trees), in a fixed order."""
    from monai.transforms import Compose, Randomizable

    found: list[Any] = []
    if isinstance(transform, Compose):
        for t in transform.transforms:
            found += _randomizables(t)
    elif isinstance(transform, Randomizable) and isinstance(getattr(transform, "R", None), np.random.RandomState):
        found.append(transform)
    return found


def _rng_states(loader: Any, dataset: Any, sampler: Any) -> dict[str, Any]:
    """Every random stream of fine-tuning, as tensors / plain values (``weights_only``-loadable): Python, NumPy and
    torch (:func:`~usfmae_core.workflows.pretrain.capture_rng_state`: dropout, drop-path), the loader's generator
    (shuffling), the class-balanced sampler's generator and the augmentation transforms' states (``--workers 0``;
    worker processes seed theirs from the loader's generator)."""
    from usfmae_core.workflows.pretrain import capture_rng_state

    def np_state(r: np.random.RandomState) -> dict[str, Any]:
        st = r.get_state()
        return {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]), "has_gauss": int(st[3]),
                "cached_gaussian": float(st[4])}

    out: dict[str, Any] = {"global": capture_rng_state(),
                           "transforms": [np_state(t.R) for t in _randomizables(getattr(dataset, "transform", None))]}
    if getattr(loader, "generator", None) is not None:
        out["loader"] = loader.generator.get_state()
    if sampler is not None and getattr(sampler, "generator", None) is not None:
        out["sampler"] = sampler.generator.get_state()
    return out


def _restore_rng_states(states: dict[str, Any], loader: Any, dataset: Any, sampler: Any) -> None:
    """Inverse of :func:`_rng_states`."""
    from usfmae_core.workflows.pretrain import restore_rng_state

    restore_rng_state(states["global"])
    for t, st in zip(_randomizables(getattr(dataset, "transform", None)), states.get("transforms", []), strict=False):
        t.R.set_state(("MT19937", st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"],
                       st["cached_gaussian"]))
    if "loader" in states and getattr(loader, "generator", None) is not None:
        loader.generator.set_state(states["loader"])
    if "sampler" in states and sampler is not None and getattr(sampler, "generator", None) is not None:
        sampler.generator.set_state(states["sampler"])


def _load_training_state(path: Path) -> dict[str, Any]:
    from usfmae_core.checkpoints import load_checkpoint

    state = load_checkpoint(path)
    if state.get("meta", {}).get("kind") != "finetune_training_state":
        raise UsfmaeError(f"{path} is not a fine-tuning training state", "choose another --out, or --overwrite")
    return state


def train_classifier(datalist: dict[str, Any], out: str | Path, opts: FinetuneOptions,
                     stage: str = "finetune", resume: bool = False) -> dict[str, Any]:
    """Train one classifier on ``datalist`` (already subsampled), keep the best by validation macro-F1 and write
    ``model.pt``, ``metrics.json``, ``history.csv``, ``curves.png``, ``datalist.json`` and TensorBoard logs in
    ``out``. Returns the contents of ``metrics.json``.

    After every epoch the whole training state is written atomically to ``out/checkpoint_last.pt`` (model,
    optimiser, GradScaler, step, early-stopping counter, best model and score, history, and every random stream:
    see :func:`_rng_states`); with ``resume`` a run continues from it and, with ``--workers 0`` and a deterministic
    device (CPU, fp32), ends with exactly the weights and metrics of an uninterrupted run. The state file is deleted
    once ``metrics.json`` is written.
    """
    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.workflows.optim import cosine_lr, set_lr

    out = Path(out)
    ckpt_path = out / CKPT_NAME
    saved = _load_training_state(ckpt_path) if resume and ckpt_path.exists() else None
    classes = [str(c) for c in datalist["classes"]]
    k = len(classes)
    device = resolve_device(opts.device)
    seed_everything(opts.seed)

    volume = opts.volume()
    model, config = build_classifier(k, opts.arch, opts.init, opts.preset, opts.image_size, opts.in_channels,
                                     opts.patch_size, opts.depth, opts.pool, opts.dropout,
                                     0.0 if opts.linear_probe else opts.drop_path, volume=volume,
                                     resize=opts.resize, crop_sector=opts.crop_sector)
    config["classes"] = classes
    arch = checkpoint_arch(opts.arch, volume)
    if opts.linear_probe:
        model.freeze_encoder()
    model.to(device)
    prep = Preprocessing.from_dict(config["preprocessing"])
    if not opts.quiet and stage in ("finetune", f"finetune fold 1/{opts.folds}"):
        from usfmae_core.data.labelled import preprocessing_notes

        print("\n".join(preprocessing_notes(datalist, prep, volume)), flush=True)

    workers = opts.workers if opts.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda"
                                                             else 0)
    data = make_datasets(datalist, prep, SPLITS, augment=opts.augment, volume=volume)
    volume_data = _volume_summary(data, volume, None if opts.quiet else print)
    train_labels = [int(it["label"]) for it in datalist["training"]]
    counts = np.bincount(train_labels, minlength=k)
    sampler = make_sampler(train_labels, k, opts.seed) if opts.balance == "sampler" else None
    bs = opts.batch()
    train_loader = make_loader(data["training"], bs, True, workers, sampler, opts.seed, volume)
    val_loader = make_loader(data["validation"], bs * 2, False, workers, volume=volume)
    test_loader = make_loader(data["test"], bs * 2, False, workers, volume=volume) if len(data["test"]) else None

    hp = opts.resolved(train_loader.batch_size)
    dtype = resolve_precision(opts.precision, device, model, probe_input_shape(train_loader.batch_size, prep, volume),
                              train=True, log=None if opts.quiet else print)
    hp["precision"] = precision_name(dtype)
    criterion = make_loss(k, counts, opts.balance, opts.label_smoothing).to(device)
    optimizer = make_optimizer(model, hp["lr"], hp["weight_decay"], hp["layer_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    # training steps through the compiled model (same parameters); evaluation runs the plain one (no recompiles for
    # eval mode and other batch sizes)
    train_model = torch.compile(model) if opts.compile else model
    steps_per_epoch = len(train_loader)
    total = opts.epochs * steps_per_epoch
    warmup = min(opts.warmup_epochs * steps_per_epoch, max(0, total - 1))

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"f1": -1.0, "loss": math.inf, "epoch": 0, "state": None}
    step, stale, first_epoch, stopped, elapsed = 0, 0, 1, False, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        t = saved["training"]
        step, stale, first_epoch = int(t["step"]), int(t["stale"]), int(t["epoch"]) + 1
        stopped, elapsed = bool(t["stopped"]), float(t["elapsed_s"])
        history = [dict(h) for h in t["history"]]
        best.update(f1=float(t["best_f1"]), loss=float(t["best_loss"]), epoch=int(t["best_epoch"]))
        best["state"] = saved["best_model"] if saved.get("best_model") else {
            n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
        # after every object that draws random numbers when it is built: the streams continue where they were
        _restore_rng_states(saved["rng"], train_loader, data["training"], sampler)

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "datalist.json", datalist)
    params = {**{k_: v for k_, v in asdict(opts).items() if k_ != "extra"}, **hp, "arch": arch,
              "num_train": len(data["training"]), "num_val": len(data["validation"]), "num_test": len(data["test"])}
    for stale_tmp in out.glob(f".{CKPT_NAME}.*.tmp"):  # a save killed half-way (the real file is intact)
        stale_tmp.unlink(missing_ok=True)
    trackers = _Trackers(out, opts, params, first_epoch)
    t0 = time.monotonic() - elapsed
    progress = Progress(total, stage, disable=opts.quiet, initial=min(step, total))
    log = (lambda _msg: None) if opts.quiet else progress.write
    if saved is not None:
        log(f"resuming after epoch {first_epoch - 1} of {opts.epochs} (best so far: epoch {best['epoch']}, "
            f"validation macro-F1 {best['f1']:.3f})")

    def save_state(epoch: int) -> None:
        best_model = None if best["epoch"] == epoch else best["state"]  # the current model is the best one
        save_checkpoint(ckpt_path, make_checkpoint(
            model, arch, config, meta={"kind": "finetune_training_state"},
            optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else {},
            best_model=best_model, rng=_rng_states(train_loader, data["training"], sampler),
            training={"epoch": epoch, "step": step, "stale": stale, "stopped": stopped,
                      "elapsed_s": time.monotonic() - t0, "best_f1": best["f1"], "best_loss": best["loss"],
                      "best_epoch": best["epoch"], "history": history}))

    try:
        for epoch in range(first_epoch, opts.epochs + 1):
            if stopped:
                break
            model.train()
            if opts.linear_probe:
                model.encoder.eval()  # frozen features: no dropout / drop-path noise
            loss_sum, seen = 0.0, 0
            for batch in train_loader:
                y = torch.as_tensor(batch["label"]).long().to(device)
                lr = cosine_lr(step, total, warmup, hp["lr"], min(opts.min_lr, hp["lr"]))
                set_lr(optimizer, lr)
                loss_value = classifier_train_step(train_model, batch, criterion, optimizer, scaler, device=device,
                                                   amp_dtype=dtype, clip_grad=opts.clip_grad,
                                                   where=f"at epoch {epoch}")
                step += 1
                loss_sum += loss_value * len(y)
                seen += len(y)
                progress.update(1, loss=loss_value, lr=lr, epoch=epoch)
            probs, labels, val_loss = predict_probs(model, val_loader, device, dtype)
            vm = M.summary_metrics(labels, probs)
            rec = {"epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                   "val_loss": val_loss, "val_accuracy": vm["accuracy"], "val_f1_macro": vm["f1_macro"],
                   "val_auc_macro": vm["auc_macro"], "time_s": round(time.monotonic() - t0, 2)}
            history.append(rec)
            trackers.log({"train/loss": rec["train_loss"], "train/lr": lr, "val/loss": val_loss,
                          "val/accuracy": vm["accuracy"], "val/f1_macro": vm["f1_macro"],
                          "val/auc_macro": vm["auc_macro"]}, epoch)
            improved = vm["f1_macro"] > best["f1"] + 1e-9 or (abs(vm["f1_macro"] - best["f1"]) <= 1e-9
                                                              and val_loss < best["loss"])
            if improved:
                best.update(f1=vm["f1_macro"], loss=val_loss, epoch=epoch,
                            state={n: t.detach().cpu().clone() for n, t in model.state_dict().items()})
                stale = 0
                meta = {"epoch": epoch, "val_f1_macro": vm["f1_macro"], "init": str(opts.init or ""),
                        "linear_probe": opts.linear_probe, "data": str(opts.extra.get("data", ""))}
                save_checkpoint(out / "model.pt", make_checkpoint(model, arch, config, meta=meta))
            else:
                stale += 1
            log(f"epoch {epoch}/{opts.epochs}: train loss {rec['train_loss']:.4f}, val loss {val_loss:.4f}, "
                f"val macro-F1 {vm['f1_macro']:.3f}{' *' if improved else ''}")
            if opts.patience and stale >= opts.patience and step >= warmup:
                log(f"early stop: no better validation macro-F1 for {opts.patience} epochs")
                stopped = True
            save_state(epoch)  # after model.pt: a kill in between re-runs this epoch, which rewrites the same model
    finally:
        progress.close()
        trackers.close()

    if best["state"] is None:
        raise UsfmaeError(f"no epoch was trained in {out}", "use --epochs 1 or more")
    model.load_state_dict(best["state"])
    result: dict[str, Any] = {"classes": classes, "arch": arch, "best_epoch": best["epoch"], "epochs_run": len(history),
                              "hyperparameters": jsonable(hp),
                              "num_images": {s: len(data[s]) for s in SPLITS}}
    if volume_data is not None:
        result["volume_data"] = volume_data
    probs, labels, _ = predict_probs(model, val_loader, device, dtype)
    result["validation"] = M.classification_metrics(labels, probs, classes)
    if test_loader is not None:
        probs, labels, _ = predict_probs(model, test_loader, device, dtype)
        result["test"] = M.classification_metrics(labels, probs, classes)
    result["history"] = history
    result["time_s"] = round(time.monotonic() - t0, 2)
    write_csv(out / "history.csv", list(history[0]), [list(h.values()) for h in history])
    _save_curves(history, out / "curves.png", best["epoch"])
    write_json(out / "metrics.json", jsonable(result))
    ckpt_path.unlink(missing_ok=True)  # finished: the training state is no longer needed (it can be large)
    return result


def _volume_summary(data: dict[str, Any], volume: Any, say: Any = None) -> dict[str, Any] | None:
    """What volume preprocessing did per split (from the cached datasets' ``VolumeToModelInputd`` records), said on
    the console: nothing about the scans is changed silently."""
    if volume is None:
        return None
    from usfmae_core.data.volumes import VolumeToModelInputd, summarise_records

    out: dict[str, Any] = {"volume": volume.to_dict()}
    for split in SPLITS:
        tf = getattr(data[split], "transform", None)
        step = next((t for t in getattr(tf, "transforms", []) if isinstance(t, VolumeToModelInputd)), None)
        if step is None or not step.records:
            continue
        out[split] = summarise_records(step.records, volume)
        if say is not None:
            more = f"; training draws {volume.max_slices} per scan and step" if split == "training" and \
                volume.model == "mil" else ""
            say(f"{split}: {out[split]['text']}{more}")
    return out


def _subsample(datalist: dict[str, Any], fraction: float, seed: int) -> dict[str, Any]:
    if fraction >= 1.0:
        return datalist
    from usfmae_core.data.labelled import subsample_fraction

    full = datalist["training"]
    return {**datalist, "training": subsample_fraction(full, fraction, seed), "label_fraction": fraction,
            "training_full_size": len(full)}


def _summarise(fold_results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"folds": len(fold_results), "mean": {}, "std": {}, "per_fold": []}
    for split in ("validation", "test"):
        if not all(split in r for r in fold_results):
            continue
        for key in M.SUMMARY_KEYS:
            vals = np.array([r[split][key] for r in fold_results], dtype=np.float64)
            summary["mean"][f"{split}/{key}"] = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else math.nan
            summary["std"][f"{split}/{key}"] = float(np.nanstd(vals, ddof=1)) if np.sum(~np.isnan(vals)) > 1 \
                else math.nan
    for i, r in enumerate(fold_results):
        summary["per_fold"].append({"fold": i, "best_epoch": r["best_epoch"],
                                    **{f"{s}/{k}": r[s][k] for s in ("validation", "test") if s in r
                                       for k in M.SUMMARY_KEYS}})
    return summary


# What a resumed run cannot change (the model, the data and its split), and what does not affect the result.
_RESUME_FIXED = ("data", "init", "arch", "preset", "depth", "image_size", "in_channels", "patch_size", "pool",
                 "dropout", "drop_path", "linear_probe", "augment", "volume_model", "max_slices", "volume_spacing",
                 "axis", "balance", "label_fraction", "include_masks", "mask_patterns", "val_fraction", "test_fraction",
                 "folds", "seed")
_RESUME_FREE = ("device", "workers", "mlflow", "tensorboard", "quiet", "resume", "overwrite", "out", "extra")


def _check_resume(out: Path, opts: FinetuneOptions, data: Any) -> None:
    """Refuse ``--resume`` options that change the run's model or data; warn about changed optimisation options."""
    import json
    import sys

    try:
        stored = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no record of the run's options (written by an older version): nothing to compare with
    from usfmae_core.runs import check_resume_arguments

    given = {**asdict(opts), "data": str(data) if not isinstance(data, dict) else stored.get("data")}
    defaults = {**asdict(FinetuneOptions()), "data": None}
    for w in check_resume_arguments(given, stored, defaults, _RESUME_FIXED, _RESUME_FREE,
                                    where=f"the fine-tuning run in {out}"):
        print(f"usfmae: warning: --resume with {w}: the new value is used, so the result will differ from an "
              "uninterrupted run", file=sys.stderr, flush=True)


def _finished_result(out: Path, folds: int) -> dict[str, Any]:
    import json

    name = "cv_summary.json" if folds else "metrics.json"
    try:
        return json.loads((out / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsfmaeError(f"{out} is marked finished but its {name} cannot be read",
                          "pass --overwrite to train it again") from None


def finetune(data: str | Path | dict[str, Any], out: str | Path, opts: FinetuneOptions | None = None,
             run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune (or k-fold cross-validate) a classifier on labelled ``data``; see the module docstring.

    The run folder is locked while it is written and a finished run is not replaced unless ``opts.overwrite``
    (:mod:`usfmae_core.runs`). ``opts.resume`` continues an interrupted run from its ``checkpoint_last.pt`` (per
    fold with ``folds``; finished folds are kept) with the datalist it saved, exactly (see :func:`train_classifier`);
    a finished run is then returned as it is.

    Args:
        data: class folders, CSV manifest or datalist JSON path, or a loaded datalist dict.
        out: run folder (created).
        opts: options (defaults: :class:`FinetuneOptions`).
        run_config: what to record as ``out/config.json`` (the CLI passes its arguments).

    Returns:
        ``metrics.json``'s contents, or with ``folds`` the cross-validation summary.
    """
    from usfmae_core.runs import RunFolder, check_run

    opts = opts or FinetuneOptions()
    out = Path(out)
    _validate_options(opts)
    mode = check_run(out, "finetune", resume=opts.resume, overwrite=opts.overwrite)
    if mode in ("resume", "finished"):
        _check_resume(out, opts, data)
    if mode == "finished":
        if not opts.quiet:
            print(f"{out} holds a finished fine-tuning run: nothing to resume", flush=True)
        return _finished_result(out, opts.folds)
    if opts.init:
        _load_mae(opts.init, opts.volume_model)  # refuse a wrong checkpoint before anything is written
    resolve_device(opts.device)
    if isinstance(data, dict):
        datalist, source = data, "the datalist"
    else:
        datalist = load_labelled(data, opts.seed, opts.val_fraction, opts.test_fraction, opts.include_masks,
                                 opts.mask_patterns)
        source = str(data)
        opts.extra.setdefault("data", str(data))
    if not opts.quiet:
        from usfmae_core.data.labelled import datalist_summary

        print("\n".join(datalist_summary(datalist, source, colour=False)), flush=True)  # preprocessing_notes: colour
    if len(datalist.get("classes") or []) < 2:
        raise UsfmaeError(f"{source} has fewer than 2 classes", "a classifier needs at least 2 classes")
    if opts.folds:
        check_splits(datalist, source, ("training",))
        runs = kfold_datalists(datalist, opts.folds, opts.seed)
    else:
        runs = [datalist]
    runs = [_subsample(d, opts.label_fraction, opts.seed) for d in runs]
    for d in runs:
        check_splits(d, source)

    config_used = run_config if run_config is not None else {
        **asdict(opts), "data": str(data) if not isinstance(data, dict) else "<datalist>"}
    with RunFolder(out, "finetune", resume=opts.resume, overwrite=opts.overwrite, config=config_used) as run:
        resume = run.mode == "resume"
        if not opts.folds:
            result = train_classifier(_saved_datalist(out, runs[0], resume), out, opts, resume=resume)
            run.finish()
            return result
        results = []
        for i, d in enumerate(runs):
            fold = out / f"fold_{i}"
            if resume and (fold / "metrics.json").exists() and not (fold / CKPT_NAME).exists():
                results.append(_finished_result(fold, 0))  # finished before the interruption
                continue
            results.append(train_classifier(_saved_datalist(fold, d, resume), fold, opts, resume=resume,
                                            stage=f"finetune fold {i + 1}/{opts.folds}"))
        summary = _summarise(results)
        write_json(out / "cv_summary.json", jsonable(summary))
        write_csv(out / "cv_summary.csv", ["metric", "mean", "std", *[f"fold_{i}" for i in range(len(results))]],
                  [[key, summary["mean"][key], summary["std"][key], *[f[key] for f in summary["per_fold"]]]
                   for key in summary["mean"]])
        run.finish()
        return summary


def _saved_datalist(folder: Path, derived: dict[str, Any], resume: bool) -> dict[str, Any]:
    """On resume, the datalist the interrupted run trained on (``folder/datalist.json``), so the data it was split
    from may have changed since; else ``derived``."""
    if resume and (folder / CKPT_NAME).exists() and (folder / "datalist.json").exists():
        import json

        try:
            return json.loads((folder / "datalist.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return derived
