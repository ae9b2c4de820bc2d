"""``usfmae embed``: encoder features of images, clip frames and volume slices (for retrieval, clustering, probes).

:func:`embed_frames` pools the ViT encoder's tokens the way the classifier does
(:meth:`~usfmae_core.networks.classifier.USFMAEClassifier.forward_features`): the final LayerNorm applied to the
cls token (``pool="cls"``) or to the mean of the patch tokens (``pool="avg"``). So an MAE's embedding is exactly what a
classifier fine-tuned from it starts from, and a classifier's embedding is what its head sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfmae_core.errors import UsfmaeError
from usfmae_core.workflows.predict import (
    _device,
    _model_input_size,
    _weights_dtype,
    collect_inputs,
    inference_context,
    inference_dtype,
    model_spatial_dims,
    preprocessing_from_config,
    to_inference_model,
    volume_model_input,
)

__all__ = ["EMBED_ARCHS", "embed", "embed_bag", "embed_frames", "embed_volume"]

EMBED_ARCHS = ("mae", "classifier", "mil")
POOLS = ("avg", "cls")


def _encoder(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", None)
    if enc is None or not hasattr(enc, "norm"):
        raise UsfmaeError("embeddings need a USF-MAE ViT (an MAE or a ViT classifier), not a CNN baseline",
                          "pass a checkpoint from usfmae pretrain or usfmae finetune")
    return enc


def _features(enc: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    return enc.pooled_features(x, pool).float()


def embed_frames(model: nn.Module, frames: np.ndarray, prep, pool: str = "avg", device: torch.device | str = "cpu",
                 batch_size: int = 32, precision: str = "auto",
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed 2D frames with a 2D MAE (its encoder) or ViT classifier.

    Args:
        model: :class:`~usfmae_core.networks.mae.USFMAE` or
            :class:`~usfmae_core.networks.classifier.USFMAEClassifier`; moved to ``device``.
        frames: ``(N, H, W)`` or ``(H, W)`` float grey intensity, unscaled.
        prep: the checkpoint's :class:`~usfmae_core.data.transforms.Preprocessing`.
        pool: ``avg`` (mean patch token) or ``cls``.
        device, batch_size, precision, progress: as in :func:`~usfmae_core.workflows.predict.classify_frames`.

    Returns:
        embeddings ``(N, D)`` float32 (``D`` = encoder width).
    """
    from usfmae_core.data.transforms import frames_to_tensor

    if pool not in POOLS:
        raise UsfmaeError(f"unknown pooling '{pool}'", "use --pool avg or --pool cls")
    enc = _encoder(model)
    if enc.spatial_dims != 2:
        raise UsfmaeError("embed_frames needs a 2D model; this one is 3D", "use embed_volume for volumes")
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    dev = _device(device)
    enc = enc.to(dev).eval()
    wdtype = _weights_dtype(enc)  # bf16 weights (to_inference_model) run as they are, without autocast
    out: list[np.ndarray] = []
    amp = inference_dtype(dev, precision, enc, batch_size, prep) if wdtype == torch.float32 else None
    with inference_context(dev, amp):
        for i in range(0, len(frames), max(1, int(batch_size))):
            x = frames_to_tensor(frames[i:i + batch_size], prep).to(dev, wdtype)
            out.append(_features(enc, x, pool).cpu().numpy())
            if progress is not None:
                progress(len(x))
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, enc.hidden_size), np.float32)


def embed_volume(model: nn.Module, volume: np.ndarray, prep, pool: str = "avg", device: torch.device | str = "cpu",
                 precision: str = "auto", spacing: Sequence[float] | None = None, grid_spacing: float | None = None,
                 kind: str = "volume") -> np.ndarray:
    """Embed a volume ``(D, H, W)`` (or clip) with a 3D model -> ``(1, D_emb)`` float32. The volume is put on the
    model's isotropic grid exactly as in fine-tuning and prediction
    (:func:`~usfmae_core.workflows.predict.volume_model_input`)."""
    if pool not in POOLS:
        raise UsfmaeError(f"unknown pooling '{pool}'", "use --pool avg or --pool cls")
    enc = _encoder(model)
    dev = _device(device)
    enc = enc.to(dev).eval()
    wdtype = _weights_dtype(enc)
    x = volume_model_input(volume, prep, _model_input_size(model, prep, 3), spacing, grid_spacing, kind)
    x = x.to(dev, wdtype)
    with inference_context(dev, inference_dtype(dev, precision, enc, 1, prep) if wdtype == torch.float32 else None):
        return _features(enc, x, pool).cpu().numpy().astype(np.float32)


def embed_bag(model: nn.Module, frames: np.ndarray, prep, device: torch.device | str = "cpu", batch_size: int = 32,
              precision: str = "auto") -> np.ndarray:
    """The volume feature of an attention-MIL classifier: its slices ``(N, H, W)`` encoded and pooled by its gated
    attention, i.e. what its head sees -> ``(1, D)`` float32."""
    from usfmae_core.data.transforms import frames_to_tensor

    dev = _device(device)
    model = model.to(dev).eval()
    wdtype = _weights_dtype(model)
    feats = []
    amp = inference_dtype(dev, precision, model, batch_size, prep) if wdtype == torch.float32 else None
    with inference_context(dev, amp):
        for i in range(0, len(frames), max(1, int(batch_size))):
            feats.append(model.encode(frames_to_tensor(frames[i:i + batch_size], prep).to(dev, wdtype)))
        pooled, _ = model.attention(torch.cat(feats)[None])
    return pooled.float().cpu().numpy().astype(np.float32)


def embed(model_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
          pool: str = "avg", axis: int = 0, device: str = "auto", batch_size: int = 32, precision: str = "auto",
          run_config: dict[str, Any] | None = None, quiet: bool = False, overwrite: bool = False) -> Path:
    """Embed every frame / slice of the inputs (a volume model: every volume / clip, a 3D model on its grid, an
    attention-MIL model as its attention-pooled slices) and write to ``out_dir``:

    ``embeddings.npy`` ``(N, D)`` float32, ``embeddings_index.csv`` (``row, source, index, kind``: which file and
    frame each row is), ``embed.json`` (model, pool, shape, skipped inputs with reasons) and ``config.json``.
    ``out_dir`` is locked while the run writes it; earlier results there are refused unless ``overwrite``.

    Returns:
        ``out_dir``.
    """
    from usfmae_core.checkpoints import load_model
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.transforms import image_to_frames, informative_frames
    from usfmae_core.data.volumes import volume_from_config
    from usfmae_core.fileio import atomic_write
    from usfmae_core.runs import RunFolder, check_run
    from usfmae_core.workflows.common import Progress, write_csv, write_json

    if pool not in POOLS:
        raise UsfmaeError(f"unknown pooling '{pool}'", "use --pool avg or --pool cls")
    check_run(out_dir, "embed", overwrite=overwrite)
    files, skipped = collect_inputs(inputs)
    dev = _device(device)
    model, ckpt = load_model(model_path, expect=EMBED_ARCHS, device=dev)
    model = to_inference_model(model, dev, precision, copy=False)
    prep = preprocessing_from_config(ckpt["config"])
    dims = model_spatial_dims(model, ckpt["config"])
    volume = volume_from_config(ckpt["config"])
    config_used = run_config if run_config is not None else {
        "model": str(model_path), "inputs": [str(i) for i in inputs], "pool": pool, "axis": axis, "device": device,
        "batch_size": batch_size}
    with RunFolder(out_dir, "embed", overwrite=overwrite, config=config_used) as run:
        out = run.path
        chunks: list[np.ndarray] = []
        rows: list[list[Any]] = []
        with Progress(len(files), "embed", disable=quiet) as bar:
            for path in files:
                try:
                    img = read_ultrasound(path)
                    if dims == 3:
                        if img.kind == "image":
                            raise UsfmaeError(f"{path} is a 2D image but the model is 3D",
                                              "embed volumes or clips with it")
                        emb = embed_volume(model, img.array, prep, pool, dev, precision, img.spacing,
                                           None if volume is None else volume.spacing, img.kind)
                    elif ckpt["arch"] == "mil":
                        frames = image_to_frames(img, axis=volume.axis)
                        keep = np.ones(1, bool) if img.kind == "image" else informative_frames(frames)
                        if not keep.any():
                            raise UsfmaeError(f"{path} has no informative slice: all {len(frames)} are empty or "
                                              "constant", "check the file or leave it out")
                        emb = embed_bag(model, frames[keep], prep, dev, batch_size, precision)
                    else:
                        emb = embed_frames(model, image_to_frames(img, axis=axis), prep, pool, dev, batch_size,
                                           precision)
                except UsfmaeError as err:
                    skipped.append({"source": str(path), "reason": str(err)})
                    bar.write(f"skipped {path}: {err}")
                    bar.update(1)
                    continue
                for i in range(len(emb)):
                    rows.append([len(rows), str(path), i, img.kind])
                chunks.append(emb)
                bar.update(1)
        if not chunks:
            first = skipped[0] if skipped else {"reason": "nothing to embed"}
            raise UsfmaeError(f"no input could be embedded ({first['reason']})", "check the files named above")
        emb_all = np.concatenate(chunks).astype(np.float32)
        atomic_write(out / "embeddings.npy", lambda f: np.save(f, emb_all))
        write_csv(out / "embeddings_index.csv", ["row", "source", "index", "kind"], rows)
        write_json(out / "embed.json", {"model": str(model_path), "arch": ckpt["arch"], "pool": pool,
                                        "shape": list(emb_all.shape), "spatial_dims": dims, "axis": axis,
                                        "scope": "volume" if dims == 3 or ckpt["arch"] == "mil" else "frame",
                                        "skipped": skipped})
        run.finish()
    return out
