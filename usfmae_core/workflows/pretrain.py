"""``usfmae pretrain``: masked-autoencoder pretraining on a prepared corpus (2D frames or native 3D volumes).

The recipe is facebook MAE's / USF-MAE's: AdamW (betas 0.9, 0.95; weight decay 0.05, none on norms, biases, tokens
and position embeddings), ``lr = blr * effective_batch / 256``, per-step cosine schedule after a linear warm-up,
75% masking, MSE on the masked patches. Augmentation (random resized crop + flip) runs batched on the training
device (:class:`usfmae_core.data.datasets.MAEBatchAugment`, ``MAEBatchAugment3D`` for volumes), so workers
only read uint8 frames from the memory-mapped corpus.

Run folder (everything only rank 0 writes)::

    RUN/config.json          the arguments used
    RUN/checkpoint_last.pt   training state (model, optimiser, schedule step, scaler, RNG of every rank, data
                             position), written atomically every --ckpt-every steps and at the end
    RUN/model.pt             final weights-only MAE checkpoint (config + preprocessing): for finetune / reconstruct
    RUN/metrics.jsonl        one line per log step: step, epoch, loss, lr, img_per_s, elapsed_s
    RUN/summary.json         final figures (steps, loss, throughput, device)
    RUN/loss_curve.png       training loss per step
    RUN/pictures/*.png       input | masked input | reconstruction, every --picture-every steps and at the end
    RUN/tb/                  TensorBoard events (when tensorboard is installed)

Corpora: ``--corpus`` takes one corpus folder or several, each optionally with a mixing weight (``PATH:WEIGHT``).
Several without weights are read as one concatenated corpus; with weights, :class:`MixtureSampler` draws each
corpus's share of every epoch (an epoch = as many samples as the corpora hold together), cycling through a small
corpus as often as its weight asks. Continued pretraining (e.g. on a target's own unlabelled images) is ``--init
MAE.pt`` on the new corpus or mix: weights only are taken from ``--init`` (with its normalisation unless --mean /
--std are given); optimiser, warm-up and cosine schedule start afresh over ``--max-steps`` / ``--epochs``.

Resuming (``--resume``) restores everything in ``checkpoint_last.pt``. Shuffling is a function of (seed, epoch)
only (:class:`ResumableSampler`, a ``DistributedSampler`` that can start mid-epoch), so after a crash training
continues on exactly the batches it would have seen; with ``--precision fp32`` and ``--workers 0`` a resumed run
ends with the same weights as an uninterrupted one.

Multi-GPU / multi-node: launch with ``torchrun`` (see :mod:`usfmae_core.workflows.distributed`); ``--batch-size``
is per process, the effective batch is ``batch_size * accum_steps * world_size``.

API reused by the MONAI bundle (no logic duplicated there)::

    model, config = build_pretrain_model("vit_base", img_size=224, in_channels=3)        # or init="mae.pt"
    augment = make_augment(config)                        # uint8 (B, H, W) -> normalised (B, C, S, S), on device
    optimizer = make_optimizer(model, lr=scaled_lr(1.5e-4, 256))
    out = mae_train_step(model, uint8_batch, augment, optimizer, scaler=None, amp_dtype=torch.bfloat16,
                         clip_grad=None, accum_steps=1, step=True)         # {"loss", "images", "grad_norm"}

    # MONAI engine: the MAE step as SupervisedTrainer's iteration_update (network returns (loss, pred, mask),
    # so loss_function is not used; pass e.g. torch.nn.MSELoss() to satisfy the signature)
    trainer = SupervisedTrainer(device, max_epochs, loader, model, optimizer, loss_function=torch.nn.MSELoss(),
                                iteration_update=MAEIterationUpdate(augment, precision="auto", clip_grad=None,
                                                                    base_lr=lr, total_steps=N, warmup_steps=W),
                                decollate=False)

``MAEIterationUpdate`` reads ``batchdata["image"]`` (or the first element of a tuple/list, or the tensor itself),
honours ``engine.accumulation_steps`` and returns ``{"image", "label": None, "pred": None, "loss"}`` so MONAI's
``StatsHandler`` / ``from_engine(["loss"], first=True)`` work unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from usfmae_core.constants import IMAGENET_MEAN, IMAGENET_STD
from usfmae_core.errors import UsfmaeError
from usfmae_core.workflows import distributed as D

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAEIterationUpdate",
    "MixtureSampler",
    "ResumableSampler",
    "build_pretrain_model",
    "capture_rng_state",
    "corpus_specs",
    "mae_train_step",
    "make_augment",
    "make_optimizer",
    "make_scaler",
    "pretrain",
    "restore_rng_state",
    "weights_sha1",
]

CKPT_NAME = "checkpoint_last.pt"
MODEL_NAME = "model.pt"


# ------------------------------------------------------------------------------------------------------ model
def build_pretrain_model(preset: str = "vit_base", img_size: int | None = None, patch_size: int | None = None,
                         in_channels: int | None = None, spatial_dims: int | None = None,
                         mask_ratio: float | None = None, norm_pix_loss: bool | None = None,
                         drop_path_rate: float | None = None, init: str | os.PathLike | None = None,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """The MAE to pretrain and its checkpoint config (model kwargs + ``preset`` + ``preprocessing``).

    From scratch: ``preset`` with the given overrides (None keeps the preset's value; 224 px, patch 16, 3 channels).
    From ``init`` (an MAE checkpoint of ours, e.g. from ``usfmae import-weights``): its config, with the given
    overrides re-fitted by :func:`~usfmae_core.checkpoints.adapt_state_dict` (position embeddings interpolated,
    channels summed / split, 2D patches inflated to 3D). A classifier or CNN checkpoint is refused.
    ``mean`` / ``std`` (normalisation, 1 or C values): None keeps ``init``'s, else ImageNet's.

    Returns:
        the model (on CPU, float32) and its config dict (plain types).
    """
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.presets import build_model, mae_config

    overrides = {"img_size": img_size, "patch_size": patch_size, "in_channels": in_channels,
                 "spatial_dims": spatial_dims, "mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss,
                 "drop_path_rate": drop_path_rate}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if init is None:
        config = mae_config(preset, **overrides)
        config["preset"] = preset
        model = _build_checked(build_model, config)
    else:
        from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint

        ckpt = load_checkpoint(init)
        if ckpt["arch"] != "mae":
            raise UsfmaeError(f"{init} holds a '{ckpt['arch']}' model, but pretraining continues from an MAE "
                              "(encoder + decoder) checkpoint",
                              "pass an MAE checkpoint (usfmae pretrain's model.pt, or usfmae import-weights of "
                              "facebook / USF-MAE MAE weights), or leave out --init to start from scratch")
        config = {k: v for k, v in ckpt["config"].items() if k != "preprocessing"}
        init_prep = ckpt["config"].get("preprocessing") or {}
        mean = init_prep.get("mean", IMAGENET_MEAN) if mean is None else mean
        std = init_prep.get("std", IMAGENET_STD) if std is None else std
        dims = int(overrides.get("spatial_dims", config.get("spatial_dims", 2)))
        for key in ("img_size", "patch_size"):  # a changed dimensionality needs one entry per axis
            value = overrides.get(key, config.get(key))
            if isinstance(value, (list, tuple)):
                value = value[-1] if len(value) != dims or key in overrides else list(value)
            config[key] = [int(value)] * dims if not isinstance(value, list) else value
        config.update({k: v for k, v in overrides.items() if k not in ("img_size", "patch_size")})
        config.setdefault("preset", "imported")
        model = _build_checked(build_model, config)
        src, target = dict(ckpt["model"]), model.state_dict()
        # the pixel-prediction head has no mapping to another patch shape (e.g. 2D -> 3D patches): it restarts
        # from its initialisation; the rest of the decoder and the whole encoder are kept
        fresh = [k for k in src if k.startswith("decoder.decoder_pred.") and k in target
                 and src[k].shape != target[k].shape]
        src.update({k: target[k] for k in fresh})
        model.load_state_dict(adapt_state_dict(src, target, source=str(init)))
        if fresh:
            config["init_note"] = "decoder prediction head re-initialised (patch shape changed)"
    from usfmae_core.networks.presets import check_normalisation

    size = config["img_size"]
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    check_normalisation(mean, std, int(config["in_channels"]))
    config["preprocessing"] = Preprocessing(size, int(config["in_channels"]), tuple(mean), tuple(std)).to_dict()
    return model, config


def _build_checked(build_model: Callable, config: dict[str, Any]) -> nn.Module:
    try:
        return build_model("mae", config)
    except ValueError as err:  # e.g. image size not a multiple of the patch size
        raise UsfmaeError(f"invalid model shape: {err}", "choose --img-size as a multiple of --patch-size") from None


def make_augment(config: Mapping[str, Any]) -> nn.Module:
    """The batched training augmentation for ``config``: uint8 ``(B, H, W)`` -> ``(B, C, S, S)``
    (:class:`~usfmae_core.data.datasets.MAEBatchAugment`) or ``(B, V, V, V)`` -> ``(B, C, S, S, S)``
    (:class:`~usfmae_core.data.datasets.MAEBatchAugment3D`), normalised with the config's preprocessing.
    In ``eval()`` mode it only resizes and normalises (used for the reconstruction pictures)."""
    from usfmae_core.data.datasets import MAEBatchAugment, MAEBatchAugment3D

    prep = config["preprocessing"]
    cls = MAEBatchAugment3D if int(config.get("spatial_dims", 2)) == 3 else MAEBatchAugment
    return cls(image_size=prep["image_size"], in_channels=prep["in_channels"], mean=prep["mean"], std=prep["std"])


# ------------------------------------------------------------------------------------------------- optimiser
def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW (fused kernel where available, :func:`~usfmae_core.workflows.optim.adamw`) over
    :func:`~usfmae_core.workflows.optim.param_groups` (no decay on norms, biases, tokens, pos-embeds)."""
    from usfmae_core.workflows.optim import adamw, param_groups

    return adamw(param_groups(D.unwrap_model(model), weight_decay=weight_decay, base_lr=lr), lr=lr, betas=betas)


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


# ------------------------------------------------------------------------------------------------- one step
def _images_of(batch: Any, key: str = "image") -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch[key]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def mae_train_step(model: nn.Module, batch: Any, augment: Callable[[torch.Tensor], torch.Tensor] | None,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, *,
                   amp_dtype: torch.dtype | None = None, clip_grad: float | None = None, accum_steps: int = 1,
                   step: bool = True, mask_ratio: float | None = None) -> dict[str, torch.Tensor | None]:
    """One MAE micro-step: augment on the model's device, forward under autocast, backward; optimiser step if ``step``.

    Args:
        model: ``USFMAE`` (possibly DDP / compiled); its forward returns ``(loss, pred, mask)``.
        batch: uint8 frames ``(B, H, W)`` / volumes ``(B, D, H, W)`` (with ``augment``), or ready model input
            ``(B, C, *S)`` (``augment=None``); a dict (``"image"``) or tuple (first item) holding them is accepted.
        augment: batched augmentation (e.g. :func:`make_augment`), or None.
        optimizer: the optimiser (its lr is set by the caller).
        scaler: GradScaler for fp16 (None or disabled otherwise).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for fp32.
        clip_grad: max global gradient norm (None: no clipping).
        accum_steps: micro-steps per optimiser step (the loss is divided by it).
        step: whether this micro-step ends an accumulation cycle (optimiser step, then ``zero_grad``). Under DDP the
            gradient all-reduce is skipped on the other micro-steps.
        mask_ratio: overrides the model's masking ratio.

    Returns:
        ``{"loss": detached loss (not divided by accum_steps), "images": the augmented input,
        "grad_norm": pre-clip norm when clipping on a step, else None}``.
    """
    device = next(model.parameters()).device
    images = _images_of(batch).to(device, non_blocking=True)
    if augment is not None:
        images = augment(images)
    sync = nullcontext() if step or not hasattr(model, "no_sync") else model.no_sync()
    with sync:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(images, mask_ratio)[0]
        scaled = loss / accum_steps
        (scaler.scale(scaled) if scaler is not None and scaler.is_enabled() else scaled).backward()
    grad_norm = None
    if step:
        if scaler is not None and scaler.is_enabled():
            if clip_grad:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), "images": images, "grad_norm": grad_norm}


class MAEIterationUpdate:
    """The MAE step as a MONAI engine ``iteration_update(engine, batchdata) -> output dict``.

    Args:
        augment: batched augmentation applied on the engine's device (None: the batch is model input already).
        precision: ``auto|bf16|fp16|fp32`` (:func:`usfmae_core.precision.resolve_precision`, decided at the first
            iteration for the engine's network and batch); fp16 uses its own GradScaler.
        clip_grad: max gradient norm, or None.
        base_lr, total_steps, warmup_steps, min_lr: when ``base_lr`` and ``total_steps`` are given, the lr follows
            :func:`~usfmae_core.workflows.optim.cosine_lr` per optimiser step (otherwise leave lr to handlers).
        accum_steps: used when the engine has no ``accumulation_steps`` attribute.
        image_key: the key of the images in dict batches.
    """

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: str = "fp32",
                 clip_grad: float | None = None, base_lr: float | None = None, total_steps: int | None = None,
                 warmup_steps: int = 0, min_lr: float = 0.0, accum_steps: int = 1, image_key: str = "image") -> None:
        self.augment, self.precision, self.clip_grad = augment, precision, clip_grad
        self.base_lr, self.total_steps, self.warmup_steps, self.min_lr = base_lr, total_steps, warmup_steps, min_lr
        self.accum_steps, self.image_key = accum_steps, image_key
        self.scaler: torch.amp.GradScaler | None = None
        self.amp_dtype: torch.dtype | None = None

    def __call__(self, engine: Any, batchdata: Any) -> dict[str, Any]:
        from usfmae_core.workflows.optim import cosine_lr, set_lr

        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = next(engine.network.parameters()).device
        if self.scaler is None:
            enc = D.unwrap_model(engine.network).encoder
            shape = (len(_images_of(batchdata, self.image_key)), enc.in_channels, *enc.img_size)
            self.amp_dtype = _run_precision(self.precision, D.unwrap_model(engine.network), shape[0], device,
                                            D.is_main(), None)
            self.augment = self.augment.to(device) if isinstance(self.augment, nn.Module) else self.augment
            self.scaler = make_scaler(device, self.amp_dtype)
        acc = int(getattr(engine, "accumulation_steps", self.accum_steps) or 1)
        it = int(engine.state.iteration) - 1  # ignite counts from 1
        if self.base_lr is not None and self.total_steps:
            set_lr(engine.optimizer, cosine_lr(it // acc, self.total_steps, self.warmup_steps, self.base_lr,
                                               self.min_lr))
        engine.network.train()
        images = _images_of(batchdata, self.image_key)
        out = mae_train_step(engine.network, images, self.augment, engine.optimizer, self.scaler,
                             amp_dtype=self.amp_dtype, clip_grad=self.clip_grad, accum_steps=acc,
                             step=(it + 1) % acc == 0)
        return {"image": out["images"], "label": None, "pred": None, "loss": out["loss"]}


# ------------------------------------------------------------------------------------------------- data
class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch order is a function of (seed, epoch) and that can start mid-epoch.

    ``set_epoch(epoch, start)`` skips the first ``start`` indices of this rank's share (the samples already
    consumed before a checkpoint), without reading them.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class MixtureSampler(DistributedSampler):
    """Draws samples from several corpora in given shares; resumable and distributed like :class:`ResumableSampler`.

    Indices are into the concatenation of the corpora (:class:`~usfmae_core.data.corpus.MixedCorpus`). An epoch
    holds as many samples as the corpora together (``sum(sizes)``, split over the ranks); corpus ``k`` supplies
    exactly ``counts[k]`` of them (its weight's share, largest-remainder rounding), at positions given by a seeded
    shuffle, so each batch holds the shares on average and each epoch exactly. Inside corpus ``k`` the samples run
    through successive seeded permutations of its items, continuing where the last epoch stopped: a corpus whose
    share exceeds its size is cycled (each item seen about ``counts[k] / sizes[k]`` times per epoch), a larger one is
    walked through over several epochs. Everything is a function of (seed, epoch), never of a global RNG, so a
    resumed run draws exactly the samples of the uninterrupted one; ``set_epoch(epoch, start)`` skips this rank's
    first ``start`` samples without reading them.

    Args:
        sizes: items per corpus.
        weights: mixing weights (> 0; normalised here).
        num_replicas, rank: distributed processes and this one's rank (ranks take interleaved shares).
        seed: seed of the order.
        drop_last: drop the remainder of ``sum(sizes) / num_replicas`` (else round up).

    A ``DistributedSampler`` (over ``range(sum(sizes))``) so that engines that call ``set_epoch`` on distributed
    samplers, such as MONAI's workflows, advance it.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, drop_last: bool = True) -> None:
        if len(sizes) != len(weights) or not sizes or min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"need one weight > 0 per non-empty corpus, got sizes {sizes}, weights {weights}")
        super().__init__(range(int(sum(sizes))), num_replicas=int(num_replicas), rank=int(rank), shuffle=True,
                         seed=int(seed), drop_last=drop_last)
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.offsets = np.cumsum([0] + self.sizes)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        n = sum(self.sizes)
        self.num_samples = max(1, n // self.num_replicas if drop_last else math.ceil(n / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        exact = [w * self.total_size for w in self.weights]
        counts = [math.floor(x) for x in exact]
        for k in sorted(range(len(exact)), key=lambda k: (counts[k] - exact[k], k))[:self.total_size - sum(counts)]:
            counts[k] += 1  # largest remainders first
        self.counts = counts
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        self.epoch, self.start = int(epoch), int(start)

    def _stream(self, k: int, begin: int, length: int) -> np.ndarray:
        """Items ``begin .. begin + length`` of corpus ``k``'s endless sequence of seeded permutations."""
        n = self.sizes[k]
        first, last = begin // n, (begin + length - 1) // n
        cycles = [np.random.default_rng([self.seed, k, c]).permutation(n) for c in range(first, last + 1)]
        return np.concatenate(cycles)[begin - first * n:begin - first * n + length]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch`` (``total_size``), before the split over ranks."""
        owner = np.repeat(np.arange(len(self.counts)), self.counts)
        owner = owner[np.random.default_rng([self.seed, len(self.sizes), 2**31 + int(epoch)]).permutation(owner.size)]
        out = np.empty(owner.size, dtype=np.int64)
        for k, c in enumerate(self.counts):
            if c:
                out[owner == k] = self.offsets[k] + self._stream(k, int(epoch) * c, c)
        return out

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_indices(self.epoch)[self.rank::self.num_replicas]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def corpus_specs(value: Any) -> list[tuple[str, float | None]]:
    """``--corpus`` as a list of ``(path, weight or None)``: accepts one path, a ``(path, weight)`` pair, or a list
    of either (the CLI's ``PATH[:WEIGHT]`` values arrive parsed as pairs)."""
    if isinstance(value, (str, os.PathLike)):
        return [(str(value), None)]
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1], (str, os.PathLike, tuple, list)):
        return [(str(value[0]), None if value[1] is None else float(value[1]))]
    out: list[tuple[str, float | None]] = []
    for v in value:
        out += corpus_specs(tuple(v) if isinstance(v, list) else v)
    return out


def _describe_specs(specs: Sequence[tuple[str, float | None]]) -> str:
    return " ".join(p if w is None else f"{p}:{w:g}" for p, w in specs)


def _open_corpus(path: Any, spatial_dims: int) -> Any:
    from usfmae_core.data.corpus import open_corpora

    return open_corpora(corpus_specs(path), spatial_dims)


def _corpora_record(corpus: Any) -> list[dict[str, Any]]:
    """``[{path, items, weight}]`` of the corpus or mix (weight = share of the drawn samples)."""
    from usfmae_core.data.corpus import MixedCorpus

    if isinstance(corpus, MixedCorpus):
        return corpus.describe()
    return [{"path": str(corpus.path), "items": len(corpus), "weight": 1.0}]


def _make_loader(corpus_path: Any, spatial_dims: int, batch_size: int, image_size: int, workers: int,
                 sampler: Sampler, device: torch.device, seed: int) -> DataLoader:
    """Batches of uint8 frames ``(B, S, S)`` / volumes ``(B, V, V, V)`` in ``sampler``'s order.

    The loaders carry their own seeded generator, so creating an iterator never draws from the global RNG (a
    resumed run then draws exactly the numbers the uninterrupted run drew).
    """
    from usfmae_core.data.datasets import make_pretrain_loader, make_pretrain_loader_3d

    if spatial_dims == 3:
        return make_pretrain_loader_3d(corpus_path, batch_size, workers, sampler=sampler, shuffle=False, seed=seed)
    return make_pretrain_loader(corpus_path, batch_size, image_size, workers, sampler=sampler, shuffle=False,
                                seed=seed, pin_memory=device.type == "cuda")


# ------------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states as tensors and plain lists (``weights_only``-loadable)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [int(version), torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, py, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py.tolist()), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.manual_seed_all(int(state["torch"][:8].sum()))


# ------------------------------------------------------------------------------------------------- the run
class _Logger:
    """Rank-0 sinks: metrics.jsonl, TensorBoard (optional) and the progress bar."""

    def __init__(self, out: Path, total: int, initial: int, main: bool) -> None:
        from usfmae_core.workflows.common import Progress

        self.main = main
        self.progress = Progress(total, "pretrain", disable=not main, initial=initial)
        self.tb = None
        self.metrics_path = out / "metrics.jsonl"
        if not main:
            return
        self._trim_metrics(initial)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=initial if initial else None)
        except Exception:  # noqa: BLE001 - TensorBoard is optional (import or protobuf problems)
            self.tb = None

    def _trim_metrics(self, upto: int) -> None:
        """On resume, drop lines logged after the checkpoint (they are logged again)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= upto:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a kill
        from usfmae_core.fileio import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def log(self, record: dict[str, Any], advance: int) -> None:
        shown = {k: record[k] for k in ("loss", "lr", "img_per_s") if k in record}
        self.progress.update(advance, **shown)
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in ("loss", "lr", "img_per_s"):
                self.tb.add_scalar(f"pretrain/{key}", record[key], record["step"])

    def write(self, message: str) -> None:
        if self.main:
            self.progress.write(message)

    def close(self) -> None:
        self.progress.close()
        if self.tb is not None:
            self.tb.close()

    def read_curve(self) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                r = json.loads(line)
                xs.append(r["step"])
                ys.append(r["loss"])
        return xs, ys


def _picture_batch(corpus: Any, config: Mapping[str, Any], n: int = 6) -> torch.Tensor:
    """Fixed, evenly spread corpus items as model input without augmentation (the same at every picture step)."""
    idx = np.unique(np.linspace(0, len(corpus) - 1, min(n, len(corpus))).round().astype(int))
    raw = torch.stack([torch.from_numpy(np.array(corpus[int(i)])) for i in idx])
    return make_augment(config).eval()(raw)


@torch.no_grad()
def _save_pictures(model: nn.Module, images: torch.Tensor, config: Mapping[str, Any], path: Path,
                   amp_dtype: torch.dtype | None) -> None:
    from usfmae_core.workflows.pictures import save_reconstruction_grid

    net = D.unwrap_model(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    # a private generator fixes the masks across picture steps and leaves the training RNG untouched
    noise = torch.rand(images.shape[0], net.encoder.num_patches, generator=torch.Generator().manual_seed(0))
    x = images.to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        masked, recon, _ = net.reconstruct(x, noise=noise.to(device))
    net.train(was_training)
    prep = config["preprocessing"]
    save_reconstruction_grid(masked.float(), recon.float(), x.float(), path, mean=prep["mean"], std=prep["std"])


def weights_sha1(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer (name, dtype, bytes) of the unwrapped model: equal iff bitwise equal."""
    import hashlib

    h = hashlib.sha1()
    for name, t in D.unwrap_model(model).state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run_precision(precision: str, model: nn.Module, batch_size: int, device: torch.device, main: bool,
                   resume_ckpt: dict[str, Any] | None) -> torch.dtype | None:
    """The run's autocast dtype (:func:`usfmae_core.precision.resolve_precision`, training steps of this model and
    batch). A resumed ``auto`` run keeps the precision it started with; under torchrun rank 0 decides for all."""
    from usfmae_core.precision import precision_name, resolve_precision

    earlier = (resume_ckpt or {}).get("precision")
    if str(precision).lower() == "auto" and earlier in ("bf16", "fp16", "fp32"):
        if main:
            print(f"precision auto -> {earlier} (as the run being resumed)", flush=True)
        return resolve_precision(earlier, device)
    name = None
    if main:
        enc = model.encoder
        shape = (batch_size, enc.in_channels, *enc.img_size)
        name = precision_name(resolve_precision(precision, device, model, shape, train=True,
                                                log=lambda m: print(m, flush=True)))
    return resolve_precision(D.broadcast_object(name), device)


def _training_checkpoint(model: nn.Module, config: dict, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, state: dict[str, Any], rng: list[dict],
                         args: argparse.Namespace, corpora: list[dict[str, Any]], amp_dtype: torch.dtype | None
                         ) -> dict[str, Any]:
    from usfmae_core.checkpoints import make_checkpoint
    from usfmae_core.precision import precision_name

    return make_checkpoint(
        D.unwrap_model(model), "mae", config,
        meta={"kind": "pretrain_training_state", "corpus": _describe_specs(corpus_specs(args.corpus)),
              "corpora": corpora},
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        scheduler={"step": state["step"], "total_steps": state["total_steps"],
                   "warmup_steps": state["warmup_steps"], "base_lr": state["lr"]},
        step=state["step"], epoch=state["epoch"], batches_in_epoch=state["batches"],
        precision=precision_name(amp_dtype),
        world_size=D.get_world_size(), rng={"per_rank": rng},
        train_args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("func", "corpus")
                    and (v is None or isinstance(v, (int, float, str, bool, Path, list)))},
    )


def _check_args(args: argparse.Namespace) -> None:
    def positive(name: str, value: float | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise UsfmaeError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}",
                              "pass a valid value")

    for name in ("batch_size", "accum_steps", "epochs", "max_steps", "blr", "lr", "log_every", "threads"):
        positive(name, getattr(args, name, None))
    for name in ("workers", "warmup_steps", "warmup_epochs", "weight_decay", "clip_grad", "ckpt_every",
                 "picture_every", "min_lr"):
        positive(name, getattr(args, name, None), allow_zero=True)
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise UsfmaeError(f"--mask-ratio must be between 0 and 1, got {args.mask_ratio}", "0.75 is the MAE default")


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Run MAE pretraining as configured by the CLI arguments (see :func:`add_parser`); returns the summary."""
    from usfmae_core.checkpoints import load_checkpoint
    from usfmae_core.runs import check_run

    _check_args(args)
    out = Path(args.out)
    ckpt_path = out / CKPT_NAME
    overwrite = bool(getattr(args, "overwrite", False))
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 owns the folder (the others would see its lock)
        mode = check_run(out, "pretrain", resume=args.resume, overwrite=overwrite)
    else:
        mode = "resume" if args.resume and not overwrite and ckpt_path.exists() else "new"
    resume_ckpt = None
    if mode == "resume":
        resume_ckpt = load_checkpoint(ckpt_path)
        if resume_ckpt.get("meta", {}).get("kind") != "pretrain_training_state":
            raise UsfmaeError(f"{ckpt_path} is not a pretraining state", "choose another --out")
        warnings = _check_resume_args(args, resume_ckpt)
        if int(os.environ.get("RANK", "0")) == 0:
            for w in warnings:
                print(f"usfmae: warning: --resume with {w}: the new value is used, so the result will differ from "
                      "an uninterrupted run", file=sys.stderr, flush=True)
    ctx = D.init_distributed(args.device)
    try:
        with ExitStack() as stack:
            result = _pretrain(args, ctx, out, resume_ckpt, stack)
    except BaseException:
        D.cleanup(sync=False)
        raise
    D.cleanup()
    return result


# What a resumed run cannot change (the model and its input), and what does not affect the result.
_RESUME_FIXED = ("preset", "img_size", "patch_size", "in_channels", "spatial_dims", "mask_ratio", "norm_pix_loss",
                 "drop_path", "mean", "std", "init")
_RESUME_FREE = ("device", "threads", "workers", "resume", "overwrite", "ckpt_every", "picture_every", "log_every",
                "out", "compile", "max_steps", "epochs", "epochs_given", "command", "corpus")


def _check_resume_args(args: argparse.Namespace, resume_ckpt: dict[str, Any]) -> list[str]:
    """Refuse ``--resume`` arguments that change the model (``--preset``, ``--img-size``...); return warnings for
    those that change the optimisation (``--batch-size``, ``--blr``...; used as given)."""
    from usfmae_core.runs import check_resume_arguments

    stored = dict(resume_ckpt.get("train_args") or {})
    given = {k: v for k, v in vars(args).items() if k != "func"}
    return check_resume_arguments(given, stored, dict(getattr(args, "_defaults", {}) or {}), _RESUME_FIXED,
                                  _RESUME_FREE, where=f"the pretraining run in {args.out}")


def _pretrain(args: argparse.Namespace, ctx: D.DistContext, out: Path, resume_ckpt: dict[str, Any] | None,
              stack: ExitStack) -> dict[str, Any]:
    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.device import describe_device
    from usfmae_core.runs import RunFolder
    from usfmae_core.workflows.common import seed_everything, write_json
    from usfmae_core.workflows.optim import cosine_lr, scaled_lr, set_lr

    ckpt_path = out / CKPT_NAME
    device = ctx.device
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + ctx.rank)
    dims = args.spatial_dims
    if resume_ckpt is not None:
        dims = int(resume_ckpt["config"].get("spatial_dims", 2))
    specs = corpus_specs(args.corpus)
    corpus_desc = _describe_specs(specs)
    corpus = _open_corpus(specs, dims)
    corpus_size = corpus.volume_size if dims == 3 else corpus.image_size
    corpora = _corpora_record(corpus)

    if resume_ckpt is not None:
        from usfmae_core.networks.presets import build_model

        config = dict(resume_ckpt["config"])
        model = build_model("mae", config)
        model.load_state_dict(resume_ckpt["model"])
    else:
        img_size = args.img_size
        if img_size is None and args.init is None:
            img_size = corpus_size  # train at the resolution the corpus was prepared at
        model, config = build_pretrain_model(args.preset, img_size, args.patch_size, args.in_channels,
                                             dims if (args.init is None or args.spatial_dims == 3) else None,
                                             args.mask_ratio, args.norm_pix_loss or None, args.drop_path,
                                             args.init, getattr(args, "mean", None), getattr(args, "std", None))
        if int(config.get("spatial_dims", 2)) != dims:
            raise UsfmaeError(f"--init {args.init} is a {config.get('spatial_dims')}D model but --spatial-dims is "
                              f"{dims}", "pass --spatial-dims to match, or another checkpoint")
        if dims == 2:  # the MAE saw the corpus' geometry (letterbox / squash) and grey frames: say so in its config
            from usfmae_core.data.corpus import corpus_preprocessing

            config["preprocessing"].update(corpus_preprocessing(corpus))
    model = model.to(device)
    amp_dtype = _run_precision(args.precision, model, args.batch_size, device, ctx.main, resume_ckpt)

    # ---- sizes of the run
    world = ctx.world_size
    if getattr(corpus, "weighted", False):
        sampler: ResumableSampler | MixtureSampler = MixtureSampler(
            corpus.sizes, corpus.weights, num_replicas=world, rank=ctx.rank, seed=args.seed,
            drop_last=len(corpus) >= world)
    else:
        sampler = ResumableSampler(corpus, num_replicas=world, rank=ctx.rank, shuffle=True, seed=args.seed,
                                   drop_last=len(corpus) >= world)
    batches_per_epoch = sampler.num_samples // args.batch_size
    steps_per_epoch = batches_per_epoch // args.accum_steps
    need = args.batch_size * args.accum_steps * world
    if steps_per_epoch == 0:
        raise UsfmaeError(f"corpus {corpus_desc} has {len(corpus)} {'volumes' if dims == 3 else 'frames'}, fewer "
                          f"than one optimiser step needs ({need} = batch size x accumulation x processes)",
                          "use a smaller --batch-size / --accum-steps or prepare more data")
    total_steps = args.max_steps if args.max_steps else args.epochs * steps_per_epoch
    if args.max_steps and args.epochs and getattr(args, "epochs_given", False):
        total_steps = min(total_steps, args.epochs * steps_per_epoch)
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.warmup_epochs is not None:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    else:
        warmup = max(1, int(0.05 * total_steps))  # MAE: 40 of 800 epochs
    warmup = min(warmup, max(total_steps - 1, 0))
    eff_batch = need
    lr = args.lr if args.lr else scaled_lr(args.blr, eff_batch)

    # ---- optimiser, scaler, data
    optimizer = make_optimizer(model, lr, args.weight_decay)
    scaler = make_scaler(device, amp_dtype)
    state = {"step": 0, "epoch": 0, "batches": 0, "total_steps": total_steps, "warmup_steps": warmup, "lr": lr}
    rng_to_restore = None
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if "scaler" in resume_ckpt and scaler.is_enabled() and resume_ckpt["scaler"]:
            scaler.load_state_dict(resume_ckpt["scaler"])
        state.update(step=int(resume_ckpt["step"]), epoch=int(resume_ckpt["epoch"]),
                     batches=int(resume_ckpt["batches_in_epoch"]))
        per_rank = resume_ckpt.get("rng", {}).get("per_rank", [])
        if len(per_rank) == world:
            rng_to_restore = per_rank[ctx.rank]
        else:  # another number of processes: fresh, but still deterministic, streams
            seed_everything(args.seed + 1000 * state["step"] + ctx.rank)
        if state["batches"] >= steps_per_epoch * args.accum_steps:  # corpus or batch changed: next epoch
            state.update(epoch=state["epoch"] + 1, batches=0)
    augment = make_augment(config)
    augment = augment.to(device) if isinstance(augment, nn.Module) else augment
    loader = _make_loader(corpus, dims, args.batch_size, corpus_size, args.workers, sampler, device,
                          args.seed)
    pictures = _picture_batch(corpus, config) if ctx.main else None

    ddp_model = D.wrap_ddp(model, ctx)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    # ---- output folder (only now: bad input has been refused above), locked for the rest of the run
    run = stack.enter_context(RunFolder(
        out, "pretrain", resume=resume_ckpt is not None, overwrite=bool(getattr(args, "overwrite", False)),
        active=ctx.main, config={**vars(args), "resolved": {
            "device": str(device), "world_size": world, "amp_dtype": str(amp_dtype).replace("torch.", "")
            if amp_dtype else "fp32", "effective_batch": eff_batch, "lr": lr, "total_steps": total_steps,
            "warmup_steps": warmup, "steps_per_epoch": steps_per_epoch, "corpus_items": len(corpus),
            "corpora": corpora, "init": str(args.init) if args.init and resume_ckpt is None else None}}))
    if ctx.main:
        for stale in out.glob(f".{CKPT_NAME}.*.tmp"):  # a save killed half-way (the real file is intact)
            stale.unlink(missing_ok=True)
        (out / "pictures").mkdir(exist_ok=True)
    D.barrier()
    log = _Logger(out, total_steps, state["step"], ctx.main)
    if ctx.main:
        how = f"resuming at step {state['step']} (epoch {state['epoch']})" if resume_ckpt else (
            f"starting (no {CKPT_NAME} in {out} to resume)" if args.resume else "starting")
        log.write(f"pretrain {how}: {config.get('preset')} {dims}D {config['preprocessing']['image_size']} px, "
                  f"{len(corpus)} items, "
                  f"{world} process(es) on {describe_device(device)['name']}, effective batch {eff_batch}, "
                  f"lr {lr:.3g}, {total_steps} steps ({steps_per_epoch}/epoch), "
                  f"precision {str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}")
        if isinstance(sampler, MixtureSampler):
            unit = "volumes" if dims == 3 else "frames"
            log.write("corpus mix per epoch: " + "; ".join(
                f"{c['path']} ({c['items']} {unit}) {100 * c['weight']:.1f} % = {n} samples "
                f"({n / c['items']:.2g} per item)" for c, n in zip(corpora, sampler.counts, strict=True)))
        if args.init and resume_ckpt is None:
            log.write(f"continuing from --init {args.init}: its weights (and normalisation unless --mean/--std are "
                      f"given); optimiser and lr schedule start afresh ({warmup} warm-up steps, cosine to "
                      f"{args.min_lr:g} at step {total_steps})")
        if resume_ckpt is not None:
            before = resume_ckpt.get("meta", {}).get("corpora")
            if before is not None and [(c["path"], c["items"], c["weight"]) for c in before] != \
                    [(c["path"], c["items"], c["weight"]) for c in corpora]:
                print(f"usfmae: warning: resuming on other corpora than the checkpoint's ({before} -> {corpora}): "
                      "training continues, but not on the samples the interrupted run would have seen", flush=True)

    def save_state() -> None:
        rng = D.all_gather_objects(capture_rng_state())
        if ctx.main:
            save_checkpoint(ckpt_path, _training_checkpoint(model, config, optimizer, scaler, state, rng, args,
                                                            corpora, amp_dtype))
        D.barrier()

    # ---- training
    train_model.train()
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    t_log, imgs_log, last_logged = time.perf_counter(), 0, state["step"]
    t_start, steps_run = time.perf_counter(), 0
    last_loss: float | None = None
    micro_per_epoch = steps_per_epoch * args.accum_steps
    try:
        while state["step"] < total_steps:
            sampler.set_epoch(state["epoch"], start=state["batches"] * args.batch_size)
            batches = iter(loader)
            if rng_to_restore is not None:  # after the iterator exists: its creation must not shift the streams
                restore_rng_state(rng_to_restore)
                rng_to_restore = None
            epoch_done = False
            for batch in batches:
                state["batches"] += 1
                do_step = state["batches"] % args.accum_steps == 0
                if (state["batches"] - 1) % args.accum_steps == 0:
                    set_lr(optimizer, cosine_lr(state["step"], total_steps, warmup, lr, args.min_lr))
                res = mae_train_step(train_model, batch, augment, optimizer, scaler, amp_dtype=amp_dtype,
                                     clip_grad=args.clip_grad, accum_steps=args.accum_steps, step=do_step)
                loss_sum += res["loss"].float()
                loss_n += 1
                imgs_log += res["images"].shape[0] * world
                if not do_step:
                    continue
                state["step"] += 1
                steps_run += 1
                if state["batches"] >= micro_per_epoch:
                    state["epoch"] += 1
                    state["batches"] = 0
                    epoch_done = True
                step = state["step"]
                final = step >= total_steps
                if step % args.log_every == 0 or final:
                    mean_loss = float(D.all_reduce_mean(loss_sum / max(loss_n, 1)))
                    if not math.isfinite(mean_loss):
                        raise UsfmaeError(f"the loss became {mean_loss} at step {step}",
                                          "lower --blr, use --precision fp32 or --clip-grad 1.0, and --resume "
                                          "from the last checkpoint")
                    dt = time.perf_counter() - t_log
                    ips = imgs_log / dt if dt > 0 else 0.0
                    record = {"step": step, "epoch": state["epoch"] + state["batches"] / micro_per_epoch,
                              "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"] /
                              optimizer.param_groups[0].get("lr_scale", 1.0), "img_per_s": round(ips, 2),
                              "elapsed_s": round(time.perf_counter() - t_start, 3)}
                    log.log(record, step - last_logged)
                    last_logged, last_loss = step, mean_loss
                    loss_sum.zero_()
                    loss_n, imgs_log, t_log = 0, 0, time.perf_counter()
                if ctx.main and args.picture_every and step % args.picture_every == 0 and not final:
                    _save_pictures(model, pictures, config, out / "pictures" / f"recon_step{step:07d}.png",
                                   amp_dtype)
                if args.ckpt_every and step % args.ckpt_every == 0 and not final:
                    save_state()
                if final or epoch_done:
                    break
            else:  # the loader ran out before the expected count (never with drop_last): next epoch all the same
                state["epoch"] += 1
                state["batches"] = 0
                optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation cycle is dropped
    except torch.OutOfMemoryError:
        raise UsfmaeError(f"the {device.type.upper()} ran out of memory at step {state['step']}",
                          "use a smaller --batch-size (with --accum-steps to keep the effective batch), "
                          "--precision bf16 or a smaller --preset; --resume continues from the last checkpoint"
                          ) from None
    finally:
        log.close()

    # ---- the end: training state, final weights, pictures, curve, summary
    save_state()
    replicas_identical = None
    if ctx.distributed:  # DDP keeps replicas equal by construction; a mismatch means a desync bug, say so
        sums = D.all_gather_objects(weights_sha1(model))
        replicas_identical = len(set(sums)) == 1
        if ctx.main and not replicas_identical:
            print(f"usfmae: warning: the {world} model replicas differ after training (weights SHA-1 {sums}); "
                  "model.pt holds rank 0's", flush=True)
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": state["step"], "epochs": round(state["epoch"] + state["batches"] / micro_per_epoch, 4),
        "steps_this_run": steps_run, "final_loss": last_loss, "effective_batch": eff_batch, "lr": lr,
        "img_per_s": round(steps_run * eff_batch / elapsed, 2) if steps_run and elapsed > 0 else None,
        "seconds": round(elapsed, 2), "world_size": world,
        "replicas_identical": replicas_identical, "device": describe_device(device),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "model": str(out / MODEL_NAME),
    }
    if ctx.main:
        meta = {"kind": "pretrained_mae", "corpus": corpus_desc, "corpora": corpora, "steps": state["step"],
                "final_loss": last_loss, "init": str(args.init) if args.init else None}
        save_checkpoint(out / MODEL_NAME, make_checkpoint(D.unwrap_model(model), "mae", config, meta=meta))
        _save_pictures(model, pictures, config, out / "pictures" / "recon_final.png", amp_dtype)
        xs, ys = log.read_curve()
        if xs:
            from usfmae_core.workflows.pictures import save_curve

            save_curve(xs, ys, out / "loss_curve.png", title="MAE pretraining loss", ylabel="loss (masked MSE)")
        write_json(out / "summary.json", summary)
        run.finish(steps=state["step"])
        if steps_run:
            print(f"pretrained {state['step']} steps: loss {last_loss:.4f}, {summary['img_per_s']} img/s -> "
                  f"{out / MODEL_NAME}", flush=True)
        else:
            print(f"nothing left to train (step {state['step']} of {total_steps}); wrote {out / MODEL_NAME}",
                  flush=True)
    D.barrier()
    return summary
