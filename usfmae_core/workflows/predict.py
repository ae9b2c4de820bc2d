"""``usfmae predict``: classify 2D images, cine clips and 3D volumes with a fine-tuned classifier.

In-memory API (used by the CLI, the MONAI bundle and the 3D Slicer module):

* :func:`classify_frames` - frames ``(N, H, W)`` -> softmax probabilities ``(N, K)``;
* :func:`classify_array` - an image ``(H, W)``, cine ``(T, H, W)`` or volume ``(D, H, W)`` -> per-frame and aggregate
  probabilities, label and the most telling frames;
* :func:`classify_file` - the same for a file (any format :func:`~usfmae_core.data.readers.read_ultrasound` reads);
* :func:`predict` - files / folders / a datalist JSON -> ``predictions.csv``, ``summary.csv``, ``predictions.json``.

A 2D model (``config["spatial_dims"] == 2``) classifies every informative frame of a cine and every informative
slice of a volume along ``axis``, and the aggregate is their mean probability (``--aggregate mean``), or, for "is
there a lesion anywhere?" questions, the most abnormal slice (``max``) or the mean of the ``k`` most abnormal ones
(``topk``), where abnormal means a low probability of the normal class (:func:`aggregate_frames`). Empty and
constant frames / slices (:func:`~usfmae_core.data.transforms.informative_frames`, e.g. the zero padding of a
resampled volume) are left out and counted (``n_excluded``), and an input without any informative frame is an error.
Volume models (``finetune --volume-model``) give one volume-level result: a native 3D model sees the whole volume on
its isotropic grid (:func:`volume_model_input`), an attention-MIL model pools its informative slices and reports
each slice's attention (:func:`classify_bag`).
Preprocessing is :func:`~usfmae_core.data.transforms.frames_to_tensor` with the checkpoint's
:class:`~usfmae_core.data.transforms.Preprocessing`, exactly as in fine-tuning.

Speed: batched, ``torch.inference_mode``, and bf16 where it was measured faster (``precision="auto"``:
:func:`usfmae_core.precision.resolve_precision` times this model on this machine once and caches the answer). On CPUs
with native bf16 (AVX512-BF16 / AMX) bf16 autocast needs 2.3-4x less time than fp32 for ViT-B, and a model cast to
bf16 (:func:`to_inference_model`, used by :func:`predict`) another ~20 % less; on CPUs without native bf16 it is
emulated and slower, so ``auto`` keeps fp32 there (benchmarks/README.md, "Predict").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfmae_core.constants import KIND_CHOICES
from usfmae_core.errors import UsfmaeError

__all__ = [
    "AGGREGATES",
    "CLASSIFIER_ARCHS",
    "aggregate_frames",
    "class_names",
    "classify_array",
    "classify_bag",
    "classify_file",
    "classify_frames",
    "collect_inputs",
    "inference_context",
    "inference_dtype",
    "model_spatial_dims",
    "normal_class_index",
    "predict",
    "preprocessing_from_config",
    "to_inference_model",
    "volume_model_input",
    "volume_to_tensor",
]

CLASSIFIER_ARCHS = ("classifier", "mil", "resnet", "densenet")
KINDS = KIND_CHOICES
AGGREGATES = ("mean", "max", "topk")
# class names that mean "nothing found", recognised for --aggregate max / topk (else --normal-class is needed)
NORMAL_CLASS_NAMES = ("normal", "none", "negative", "healthy", "no_lesion", "no-lesion", "nolesion", "no lesion",
                      "background", "regular", "control", "absent")


# ------------------------------------------------------------------------------------------------- helpers
def _device(device: torch.device | str) -> torch.device:
    from usfmae_core.device import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(str(device))


def preprocessing_from_config(config: dict[str, Any]):
    """The checkpoint's :class:`~usfmae_core.data.transforms.Preprocessing`; older configs without a
    ``preprocessing`` entry fall back to the model's image size and channels with ImageNet statistics."""
    from usfmae_core.data.transforms import Preprocessing

    if config.get("preprocessing"):
        return Preprocessing.from_dict(config["preprocessing"])
    size = config.get("img_size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    # (from_dict: the resize / colour rules such an old checkpoint was trained with)
    return Preprocessing.from_dict({"image_size": size, "in_channels": int(config.get("in_channels", 3))})


def class_names(config: dict[str, Any], num_classes: int | None = None) -> list[str]:
    """``config["classes"]``, or ``class_0 .. class_{K-1}`` when the checkpoint did not record names."""
    if config.get("classes"):
        return [str(c) for c in config["classes"]]
    k = num_classes if num_classes is not None else int(config.get("num_classes", 0))
    return [f"class_{i}" for i in range(k)]


def model_spatial_dims(model: nn.Module, config: dict[str, Any] | None = None) -> int:
    """2 or 3: the ViT encoder's ``spatial_dims``, else ``config["spatial_dims"]`` (CNN baselines), else 2."""
    enc = getattr(model, "encoder", None)
    if enc is not None and hasattr(enc, "spatial_dims"):
        return int(enc.spatial_dims)
    return int((config or {}).get("spatial_dims", 2))


def _model_input_size(model: nn.Module, prep, dims: int) -> tuple[int, ...]:
    enc = getattr(model, "encoder", None)
    size = getattr(enc, "img_size", None)
    return tuple(int(s) for s in size) if size is not None else (int(prep.image_size),) * dims


def volume_to_tensor(volume: np.ndarray, prep, size: Sequence[int] | None = None) -> torch.Tensor:
    """A volume ``(D, H, W)`` (unscaled grey) -> 3D model input ``(1, C, S, S, S)``.

    The intensity rule of :func:`~usfmae_core.data.transforms.scale_intensity` over the whole volume, MONAI
    ``Resize`` (trilinear, anti-aliased) to the model's cube, grey replicated to ``C`` channels, normalised with
    the checkpoint's mean / std.
    """
    from monai.transforms import Resize

    from usfmae_core.data.transforms import channel_stats, scale_intensity

    size = tuple(size) if size is not None else (int(prep.image_size),) * 3
    t = torch.from_numpy(scale_intensity(np.asarray(volume, dtype=np.float32)))[None]  # (1, D, H, W)
    if tuple(t.shape[1:]) != size:
        t = torch.as_tensor(Resize(size, mode="trilinear", anti_aliasing=True)(t)).as_subclass(torch.Tensor)
    t = t.clamp_(0.0, 1.0)
    mean, std = channel_stats(prep.mean, prep.std, prep.in_channels)
    c = prep.in_channels
    return ((t[None].expand(-1, c, -1, -1, -1) - mean.view(1, c, 1, 1, 1)) / std.view(1, c, 1, 1, 1)).contiguous()


def _input_shape(model: nn.Module, batch_size: int, prep: Any = None) -> tuple[int, ...]:
    """One forward pass's input shape ``(B, C, *S)`` for the precision probe (a 3D model sees one volume)."""
    enc = getattr(model, "encoder", model)  # a model with an encoder, or the encoder itself
    if hasattr(enc, "img_size") and hasattr(enc, "in_channels"):
        size = tuple(int(s) for s in enc.img_size)
        return (1 if len(size) == 3 else int(batch_size), int(enc.in_channels), *size)
    size = int(getattr(prep, "image_size", 224))
    channels = int(getattr(prep, "in_channels", 3))
    if any(p.dim() == 5 for p in model.parameters()):  # a 3D CNN: one cube per forward pass
        return (1, channels, size, size, size)
    return (int(batch_size), channels, size, size)


def volume_model_input(volume: np.ndarray, prep, size: int | Sequence[int], spacing: Sequence[float] | None = None,
                       grid_spacing: float | None = None, kind: str = "volume") -> torch.Tensor:
    """A volume ``(D, H, W)`` or clip ``(T, H, W)`` -> a native 3D classifier's input ``(1, C, S, S, S)``: exactly
    what fine-tuning gives it (:func:`~usfmae_core.data.volumes.volume_to_cube`: isotropic grid from ``spacing``,
    centred in the cube, then the checkpoint's channels and mean / std)."""
    from usfmae_core.data.volumes import _normalise, volume_to_cube

    cube, _ = volume_to_cube(volume, spacing, size, grid_spacing, kind)
    return _normalise(cube, prep)[None]


def normal_class_index(classes: Sequence[str], normal_class: str | None = None) -> int:
    """Index of the class that means "nothing found" (for ``--aggregate max|topk``): ``normal_class`` if given, else
    the one class whose name is ``normal``, ``none``, ``negative``, ``healthy``, ``no_lesion``, ``background``,
    ``regular`` or ``control`` (any case).

    Raises:
        UsfmaeError: ``normal_class`` is not a class, or no single class has such a name.
    """
    names = [str(c) for c in classes]
    if normal_class is not None:
        if normal_class not in names:
            raise UsfmaeError(f"--normal-class '{normal_class}' is not a class of the model ({', '.join(names)})",
                              "pass one of the model's class names")
        return names.index(normal_class)
    found = [i for i, c in enumerate(names) if c.strip().lower() in NORMAL_CLASS_NAMES]
    if len(found) != 1:
        raise UsfmaeError(f"--aggregate max / topk reads a volume from its most abnormal slices, but which of the "
                          f"classes {', '.join(names)} means 'nothing found' is not clear",
                          "pass --normal-class NAME (e.g. the class of slices without a lesion)")
    return found[0]


def aggregate_frames(per_frame: np.ndarray, method: str = "mean", k: int = 3, normal: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Volume-level probabilities from per-slice probabilities ``(N, K)``; returns ``(aggregate (K,), rows used)``.

    - ``mean``: the mean over all slices ("what does this volume look like overall"); a focal finding on a few slices
      is outvoted by the normal ones.
    - ``max``: the probabilities of the single most abnormal slice, the one with the lowest probability of the
      ``normal`` class ("is there a lesion anywhere?": a volume is abnormal when any slice is).
    - ``topk``: the mean over the ``k`` most abnormal slices: the same question, less sensitive to one noisy slice.
    """
    if method not in AGGREGATES:
        raise UsfmaeError(f"unknown --aggregate '{method}'", f"choose one of {', '.join(AGGREGATES)}")
    p = np.asarray(per_frame, dtype=np.float64)
    if method == "mean":
        return p.mean(0).astype(np.float32), np.arange(len(p))
    if normal is None:
        raise ValueError("aggregate max / topk need the index of the normal class")
    n = 1 if method == "max" else max(1, min(int(k), len(p)))
    rows = np.argsort(p[:, normal], kind="stable")[:n]  # lowest p(normal) first = most abnormal
    return p[rows].mean(0).astype(np.float32), rows


def inference_dtype(device: torch.device, precision: str = "auto", model: nn.Module | None = None,
                    batch_size: int = 32, prep: Any = None, log: Callable[[str], None] | None = None
                    ) -> torch.dtype | None:
    """Autocast dtype for inference (None = fp32): :func:`usfmae_core.precision.resolve_precision` for forward passes
    of ``model`` on batches of ``batch_size``. ``auto`` on a CPU means bf16 only where it was measured faster for this
    model (never on CPUs without native bf16, where it is emulated and slower)."""
    from usfmae_core.precision import resolve_precision

    if model is not None and hasattr(model, "encode") and hasattr(model, "aggregate"):
        model = model.encoder  # attention-MIL: the cost is encoding slices in batches (see classify_bag)
    shape = _input_shape(model, batch_size, prep) if model is not None else None
    return resolve_precision(str(precision), device, model, shape, train=False, log=log)


def inference_context(device: torch.device, dtype: torch.dtype | None) -> ExitStack:
    """``torch.inference_mode`` plus autocast to ``dtype`` (when not None) on ``device``."""
    stack = ExitStack()
    stack.enter_context(torch.inference_mode())
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack


def to_inference_model(model: nn.Module, device: torch.device | str = "cpu", precision: str = "auto",
                       copy: bool = True) -> nn.Module:
    """The model to keep for many inference calls: on a CPU where ``precision`` resolves to bf16, a ViT whose
    weights are bf16 (a copy unless ``copy`` is False), which :func:`classify_frames` then runs without autocast.

    Autocast keeps the residual stream and LayerNorms in fp32 and converts activations at every block; bf16 weights
    skip those conversions (ViT-B on CPU: ~20 % less CPU time than autocast, probabilities within ~0.005 of fp32,
    like autocast; benchmarks/README.md, "Predict"). Elsewhere the model is returned as it is.
    """
    dev = _device(device)
    if dev.type != "cpu" or not hasattr(model, "encoder") or _weights_dtype(model) != torch.float32 or \
            inference_dtype(dev, precision, model) != torch.bfloat16:
        return model
    if copy:
        import copy as _copy

        model = _copy.deepcopy(model)
    return model.to(device=dev, dtype=torch.bfloat16).eval()


def _weights_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    if not hasattr(model, "encoder") and device.type == "cpu":
        # CNN baselines: oneDNN convolutions are faster in channels_last (no effect on the ViT); a 3D CNN's 5D
        # weights take the 3D layout (channels_last needs rank 4)
        volumetric = any(p.dim() == 5 for p in model.parameters())
        model = model.to(memory_format=torch.channels_last_3d if volumetric else torch.channels_last)
    return model


def _to_input(x: torch.Tensor, model: nn.Module, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.dim() in (4, 5) and not hasattr(model, "encoder") and device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# ---------------------------------------------------------------------------------------------- in memory
def classify_frames(model: nn.Module, frames: np.ndarray, prep, device: torch.device | str = "cpu",
                    batch_size: int = 32, precision: str = "auto",
                    progress: Callable[[int], None] | None = None, spacing: Sequence[float] | None = None,
                    crop: Sequence[int] | None = None) -> np.ndarray:
    """Classify 2D frames with a 2D classifier.

    Args:
        model: a 2D classifier returning logits (USF-MAE classifier or CNN baseline); moved to ``device``.
        frames: ``(N, H, W)`` / ``(H, W)`` grey or ``(N, H, W, 3)`` colour intensity, unscaled.
        prep: the checkpoint's :class:`~usfmae_core.data.transforms.Preprocessing`.
        device: ``auto|cuda|mps|cpu`` or a ``torch.device``.
        batch_size: frames per forward pass.
        precision: ``auto|bf16|fp16|fp32`` (see :func:`inference_dtype`).
        progress: called with the number of frames done after each batch.
        spacing / crop: ``(row, column)`` pixel spacing and the sector box of the frames
            (:func:`~usfmae_core.data.transforms.frames_to_tensor`; one box for all the frames).

    Returns:
        softmax probabilities ``(N, K)`` float32.
    """
    from usfmae_core.data.transforms import frames_to_tensor

    frames = np.asarray(frames)
    if frames.ndim == 2 or (frames.ndim == 3 and frames.shape[-1] == 3 and frames.shape[-2] > 3):
        frames = frames[None]
    if frames.ndim != 3 and not (frames.ndim == 4 and frames.shape[-1] == 3):
        raise ValueError(f"frames must be (N, H, W), (H, W) or (N, H, W, 3), got shape {frames.shape}")
    if crop is None and prep.crop_sector and len(frames) > batch_size:  # one box for all, not one per batch
        from usfmae_core.data.transforms import imaged_region

        crop = imaged_region(frames) or (0, frames.shape[1], 0, frames.shape[2])
    dev = _device(device)
    model = _prepare_model(model, dev)
    wdtype = _weights_dtype(model)  # a model in bf16 (see to_inference_model) runs as it is, without autocast
    dtype = inference_dtype(dev, precision, model, batch_size, prep) if wdtype == torch.float32 else None
    out: list[np.ndarray] = []
    with inference_context(dev, dtype):
        for i in range(0, len(frames), max(1, int(batch_size))):
            x = _to_input(frames_to_tensor(frames[i:i + batch_size], prep, spacing, crop), model, dev).to(wdtype)
            out.append(torch.softmax(model(x).float(), dim=-1).cpu().numpy())
            if progress is not None:
                progress(len(x))
    k = out[0].shape[1] if out else 0
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, k), np.float32)


def _classify_volume_3d(model: nn.Module, volume: np.ndarray, prep, device: torch.device, precision: str,
                        spacing: Sequence[float] | None = None, grid_spacing: float | None = None,
                        kind: str = "volume") -> np.ndarray:
    dev = _device(device)
    model = _prepare_model(model, dev)
    wdtype = _weights_dtype(model)
    x = volume_model_input(volume, prep, _model_input_size(model, prep, 3), spacing, grid_spacing, kind)
    x = _to_input(x, model, dev).to(wdtype)
    amp = inference_dtype(dev, precision, model, 1, prep) if wdtype == torch.float32 else None
    with inference_context(dev, amp):
        return torch.softmax(model(x).float(), dim=-1).cpu().numpy().astype(np.float32)


def classify_bag(model: nn.Module, frames: np.ndarray, prep, device: torch.device | str = "cpu",
                 batch_size: int = 32, precision: str = "auto", progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Classify a bag of slices / frames ``(N, H, W)`` (unscaled) with an attention-MIL volume classifier.

    The slices are encoded ``batch_size`` at a time (memory stays that of one batch whatever ``N``), then pooled
    by the model's gated attention.

    Returns:
        volume-level softmax probabilities ``(K,)`` and the attention of every slice ``(N,)`` (sums to 1).
    """
    from usfmae_core.data.transforms import frames_to_tensor

    dev = _device(device)
    model = _prepare_model(model, dev)
    wdtype = _weights_dtype(model)
    dtype = inference_dtype(dev, precision, model, batch_size, prep) if wdtype == torch.float32 else None
    feats: list[torch.Tensor] = []
    with inference_context(dev, dtype):
        for i in range(0, len(frames), max(1, int(batch_size))):
            x = frames_to_tensor(frames[i:i + batch_size], prep).to(dev, wdtype)
            feats.append(model.encode(x))
            if progress is not None:
                progress(len(x))
        logits, attention = model.aggregate(torch.cat(feats)[None])
    probs = torch.softmax(logits.float(), dim=-1)[0].cpu().numpy().astype(np.float32)
    return probs, attention[0].float().cpu().numpy().astype(np.float32)


def classify_array(model: nn.Module, config: dict[str, Any], array: np.ndarray, kind: str = "auto",
                   spacing: Sequence[float] | None = None, axis: int = 0, device: torch.device | str = "cpu",
                   batch_size: int = 32, top_k: int = 3, precision: str = "auto",
                   progress: Callable[[int], None] | None = None, source: str | None = None,
                   aggregate: str = "mean", normal_class: str | None = None,
                   colour: np.ndarray | None = None) -> dict[str, Any]:
    """Classify an image ``(H, W)``, cine ``(T, H, W)`` or volume ``(D, H, W)`` (unscaled grey).

    A 2D classifier sees each frame as its checkpoint's preprocessing says
    (:class:`~usfmae_core.data.transforms.Preprocessing`: letterboxed or squashed with the frames' pixel spacing,
    cropped to the sector - one box found over the whole clip - and, for a model that keeps colour, ``colour``).

    Three kinds of model (see :func:`~usfmae_core.data.volumes.volume_from_config`):

    - a **2D classifier** classifies every informative frame / slice (along ``axis``) and aggregates them
      (``aggregate``: ``mean`` | ``max`` | ``topk``, :func:`aggregate_frames`; ``max`` / ``topk`` answer "any lesion?"
      questions and need the normal class, :func:`normal_class_index`);
    - a **native 3D classifier** (3D ViT or CNN) sees the whole volume on its isotropic grid: one row;
    - an **attention-MIL classifier** encodes every informative slice along its own training axis (every frame of a
      clip) and pools them: one row, plus the attention of every slice (``attention``, ``slice_index``).

    Empty and constant frames / slices (:func:`~usfmae_core.data.transforms.informative_frames`: the zero padding of
    a resampled volume, blank frames) are not classified and do not enter the result; they are counted in
    ``n_excluded``.

    Args:
        model: classifier from :func:`~usfmae_core.checkpoints.load_model`.
        config: its checkpoint config (``classes``, ``preprocessing``, ``spatial_dims``, ``volume``).
        array: the image.
        kind: ``image|cine|volume|auto`` (auto: 2D -> image, 3D -> volume).
        spacing: per-axis spacing in mm (a 3D model resamples to its grid with it; recorded in the result).
        axis: slicing axis of a volume for a 2D model.
        device, batch_size, precision, progress: see :func:`classify_frames`.
        top_k: how many frames to list in ``top_slices`` (and ``k`` of ``aggregate="topk"``).
        source: the file the array came from, named in errors.
        aggregate, normal_class: how a 2D model's slices make the volume result (ignored by volume models).
        colour: the RGB of ``array`` (``array.shape + (3,)``, from ``read_ultrasound(..., keep_colour=True)``), given
            to a 2D model whose preprocessing keeps colour; ignored otherwise.

    Returns:
        ``classes`` (names), ``per_frame`` ``(N, K)`` float32 (one row per classified frame / slice; a volume model
        gives one row for the volume), ``frame_index`` ``(N,)`` (the input frame / slice index of each row),
        ``aggregate`` ``(K,)`` volume-level probabilities, ``aggregate_method``, ``label`` (argmax of the aggregate),
        ``top_slices`` (2D model: the rows behind the result, as frame indices: the ``top_k`` with the highest
        probability of ``label`` for ``mean``, the slices used for ``max`` / ``topk``; MIL: the ``top_k`` slices with
        the most attention; 3D: empty), ``attention`` ``(M,)`` and ``slice_index`` ``(M,)`` (MIL only, else None),
        ``kind``, ``n_frames`` (rows), ``n_excluded`` (empty / constant frames left out), ``scope`` (``frame`` or
        ``volume``), ``model`` (``2d``, ``3d`` or ``mil``), ``axis`` and ``spacing``.

    Raises:
        UsfmaeError: bad kind / shape / axis, a model that does not fit the input, or no informative frame.
    """
    from usfmae_core.data.readers import UltrasoundImage
    from usfmae_core.data.transforms import image_to_frames, informative_frames
    from usfmae_core.data.volumes import volume_from_config

    arr = np.asarray(array, dtype=np.float32)
    if kind not in KINDS:
        raise UsfmaeError(f"unknown kind '{kind}'", f"choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "image" if arr.ndim == 2 else "volume"
    if arr.ndim != (2 if kind == "image" else 3):
        raise UsfmaeError(f"a {kind} must be {'2D (H, W)' if kind == 'image' else '3D (N, H, W)'}, "
                          f"got shape {tuple(arr.shape)}", "pass kind='auto' or an array of the right shape")
    if not -arr.ndim <= axis < arr.ndim:
        raise UsfmaeError(f"axis {axis} is out of range for a {arr.ndim}D array", "use --axis 0, 1 or 2")
    if aggregate not in AGGREGATES:
        raise UsfmaeError(f"unknown --aggregate '{aggregate}'", f"choose one of {', '.join(AGGREGATES)}")
    prep = preprocessing_from_config(config)
    volume = volume_from_config(config)
    mode = volume.model if volume is not None else ("3d" if model_spatial_dims(model, config) == 3 else "2d")
    if mode == "mil":
        axis = volume.axis  # the slices it was trained on
    sp = tuple(spacing) if spacing is not None else (1.0,) * arr.ndim
    frames = image_to_frames(UltrasoundImage(arr, sp, kind, source or ""), axis=axis)
    # a 2D image is its own single frame (the reader already refuses a constant file)
    keep = np.ones(len(frames), bool) if kind == "image" else informative_frames(frames)
    if not keep.any():
        unit = "frame" if kind == "cine" else "slice"
        raise UsfmaeError(f"{source or f'the {kind}'} has no informative {unit}: all {len(frames)} are empty or "
                          "constant", "check the file (a blank or padding-only export?) or leave it out")
    index = np.nonzero(keep)[0]
    n_excluded = int(len(frames) - len(index))
    attention: np.ndarray | None = None
    if mode == "3d":
        if kind == "image":
            raise UsfmaeError("a 2D image was given to a 3D (volume) classifier",
                              "classify volumes with this model, or use a 2D classifier for images")
        grid = volume.spacing if volume is not None else None
        per_frame = _classify_volume_3d(model, arr, prep, _device(device), precision, spacing, grid, kind)
        scope, rows, n_excluded = "volume", np.zeros(1, np.int64), 0  # the model sees the whole volume
    elif mode == "mil":
        probs, attention = classify_bag(model, frames[index] if n_excluded else frames, prep, device, batch_size,
                                        precision, progress)
        per_frame, scope, rows = probs[None], "volume", np.zeros(1, np.int64)
    else:
        from usfmae_core.data.transforms import frames_for_model

        seen = frames_for_model(arr, kind, sp, prep, axis, colour, source)  # the same frames as `index`
        per_frame = classify_frames(model, seen.frames, prep, device, batch_size, precision, progress,
                                    spacing=seen.spacing, crop=seen.crop)
        scope, rows = "frame", index
    names = class_names(config, per_frame.shape[1])
    if len(names) != per_frame.shape[1]:
        raise UsfmaeError(f"the checkpoint names {len(names)} classes but the model outputs {per_frame.shape[1]}",
                          "re-export the classifier with matching 'classes' in its config")
    method = aggregate if mode == "2d" else "volume model"
    if mode == "2d" and aggregate != "mean":
        agg, used = aggregate_frames(per_frame, aggregate, top_k, normal_class_index(names, normal_class))
    else:
        agg, used = per_frame.mean(axis=0).astype(np.float32), np.arange(len(per_frame))
    label_idx = int(agg.argmax())
    if mode == "mil":
        top = [int(index[i]) for i in np.argsort(-attention, kind="stable")[:top_k]]
    elif mode == "3d":
        top = []
    elif aggregate != "mean":
        top = [int(rows[i]) for i in used]
    else:
        top = [int(rows[i]) for i in np.argsort(-per_frame[:, label_idx], kind="stable")[:top_k]]
    return {"classes": names, "per_frame": per_frame, "frame_index": rows, "aggregate": agg,
            "aggregate_method": method, "label": names[label_idx], "top_slices": top,
            "attention": attention, "slice_index": index if mode == "mil" else None,
            "kind": kind, "n_frames": int(per_frame.shape[0]), "n_excluded": n_excluded, "scope": scope,
            "model": mode, "axis": int(axis) if kind == "volume" else None,
            "spacing": None if spacing is None else [float(s) for s in spacing]}


def classify_file(model: nn.Module, config: dict[str, Any], path: str | os.PathLike, axis: int = 0,
                  device: torch.device | str = "cpu", batch_size: int = 32, top_k: int = 3,
                  precision: str = "auto", progress: Callable[[int], None] | None = None,
                  aggregate: str = "mean", normal_class: str | None = None) -> dict[str, Any]:
    """:func:`classify_array` on a file read by :func:`~usfmae_core.data.readers.read_ultrasound`; adds ``source``."""
    from usfmae_core.data.readers import read_ultrasound

    img = read_ultrasound(path, keep_colour=preprocessing_from_config(config).keeps_colour)
    result = classify_array(model, config, img.array, img.kind, img.spacing, axis, device, batch_size, top_k,
                            precision, progress, source=str(path), aggregate=aggregate, normal_class=normal_class,
                            colour=img.rgb)
    result["source"] = str(path)
    result["colour"] = colour_status(img, preprocessing_from_config(config), result.get("model", "2d"))
    return result


def colour_status(img: Any, prep: Any, model: str = "2d") -> str | None:
    """What happened to a file's colour: None (no colour pixels), ``rgb`` (given to the model as colour) or
    ``grey`` (converted to grey: a 1-channel model, a checkpoint trained on grey, or a volume model)."""
    if not float(img.meta.get("colour_fraction") or 0.0) > 0:
        return None
    return "rgb" if model == "2d" and prep.keeps_colour and img.rgb is not None else "grey"


# ------------------------------------------------------------------------------------------------ inputs
def collect_inputs(inputs: Iterable[str | os.PathLike], include_masks: bool = False,
                   mask_patterns: Sequence[str] | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """Expand files, folders (recursively, supported files only) and datalist JSONs into a list of files; a folder of
    positioned DICOM slices (:mod:`usfmae_core.data.dicom_series`) is one volume.

    Segmentation masks / annotation files found by name in a folder (:mod:`usfmae_core.data.masks`: ``_mask``,
    ``masks/`` ...) are left out unless ``include_masks`` (files named explicitly and datalist entries never are).

    Returns:
        (files to read, skipped ``[{"source", "reason"}]``: datalist entries that do not exist, what a folder walk
        passed over (broken links, FIFOs, unreadable folders, usfmae run folders: not files of unsupported types),
        and the masks left out, which also carry ``"mask": True``).

    Raises:
        UsfmaeError: an input does not exist, or nothing to read was found.
    """
    from usfmae_core.data.corpus import iter_source_files
    from usfmae_core.data.dicom_series import group_dicom_series, is_dicom_series
    from usfmae_core.data.masks import MaskRules, split_masks

    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            files.append(p)

    for raw in inputs:
        src = Path(raw).expanduser()
        if not src.exists():
            raise UsfmaeError(f"input {src} does not exist", "check the path (files, folders or a datalist .json)")
        if src.is_file() and src.name.lower().endswith(".json"):
            from usfmae_core.data.labelled import datalist_images

            for p in datalist_images(src):
                if not p.exists():
                    skipped.append({"source": str(p), "reason": f"listed in {src.name} but does not exist"})
                else:
                    add(p)
        elif src.is_file():
            add(src)  # explicit files are tried even with an odd extension: the reader names the problem
        elif is_dicom_series(src):
            add(src)  # a folder of positioned DICOM slices is one volume
        else:
            found = []
            for p, reason in iter_source_files([src]):
                if reason is None:
                    found.append(p)
                elif not reason.startswith("unsupported file type"):  # links, FIFOs, run folders ...: said
                    skipped.append({"source": str(p), "reason": reason})
            _, masks = split_masks(found, MaskRules.with_patterns(mask_patterns), src)
            left_out = set() if include_masks else {m.path for m in masks}
            for it in group_dicom_series([{"image": p} for p in found if str(p) not in left_out]):
                add(Path(it["image"]))
            skipped += [{"source": m.path, "reason": f"segmentation mask / annotation file ({m.reason})",
                         "mask": True} for m in masks if m.path in left_out]
    if not files:
        if skipped:
            raise UsfmaeError(f"none of the inputs can be read ({skipped[0]['source']}: {skipped[0]['reason']})",
                              "check the paths")
        raise UsfmaeError(f"no supported ultrasound files found in {', '.join(str(i) for i in inputs)}",
                          "pass images (png/jpg/dcm...), cine clips (mp4/avi/dcm...) or volumes (nii/nrrd/mha)")
    return files, skipped


# --------------------------------------------------------------------------------------------------- files
def _fmt(p: float) -> str:
    return f"{float(p):.6f}"


def as_kind(img, kind: str):
    """``img`` (an :class:`~usfmae_core.data.readers.UltrasoundImage`) read as ``kind``: ``auto`` keeps the reader's
    choice; ``cine`` / ``volume`` take the slices of a 3D array as frames / slices (a 2D image becomes one of them);
    ``image`` needs a single 2D frame. The spacing keeps one entry per axis."""
    from usfmae_core.data.readers import UltrasoundImage

    if kind == "auto" or kind == img.kind:
        return img
    if kind not in KINDS:
        raise UsfmaeError(f"unknown kind '{kind}'", f"choose one of {', '.join(KINDS)}")
    arr, spacing, rgb = img.array, tuple(img.spacing), getattr(img, "rgb", None)
    if kind == "image":
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr, spacing, rgb = arr[0], spacing[1:], None if rgb is None else rgb[0]
        elif arr.ndim != 2:
            raise UsfmaeError(f"{img.path} has {arr.shape[0]} {img.kind} slices, not one image",
                              "use --kind auto, cine or volume")
    elif arr.ndim == 2:
        arr, spacing, rgb = arr[None], (1.0, *spacing), None if rgb is None else rgb[None]
    return UltrasoundImage(arr, spacing, kind, img.path, dict(img.meta), rgb=rgb)


def predict(model_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            device: str = "auto", axis: int = 0, batch_size: int = 32, precision: str = "auto", top_k: int = 3,
            run_config: dict[str, Any] | None = None, quiet: bool = False, aggregate: str = "mean",
            normal_class: str | None = None, include_masks: bool = False,
            mask_patterns: Sequence[str] | None = None, kind: str = "auto", overwrite: bool = False) -> Path:
    """Classify every input file and write the results to ``out_dir``.

    Writes ``predictions.csv`` (one row per classified frame / slice: ``source, index, kind, p_<class>..., pred``;
    ``index`` is the frame / slice number in the input; a volume model gives one row per input),
    ``summary.csv`` and ``predictions.json`` (one result per input: ``source, kind, n_frames, n_excluded, label,
    p_<class>..., top_slices``, where ``n_frames`` frames were classified and ``n_excluded`` empty / constant ones
    left out; the JSON also says how slices were aggregated and lists ``skipped`` inputs with the reason),
    ``attention.csv`` for an attention-MIL model (``source, index, attention``: every informative slice's weight in
    the volume's result, summing to 1 per input) and ``config.json``.
    Unreadable inputs are skipped and reported; the run fails only when none could be classified. ``aggregate`` /
    ``normal_class``: see :func:`classify_array` (2D models only). ``kind`` (default ``auto``: as the reader
    decides) forces how every input's slices are read (see :func:`as_kind`), e.g. ``cine`` for a 2D+t clip stored as
    a 3D NRRD. ``predictions.json`` also records the ``preprocessing`` used (from the checkpoint) and ``colour``: how
    many inputs carried colour pixels and whether the model received them as colour (``given_as``: ``rgb`` |
    ``grey``); such results carry ``colour`` too.
    ``out_dir`` is locked while the run writes it; a folder holding earlier results is refused unless ``overwrite``
    (:mod:`usfmae_core.runs`).

    Returns:
        ``out_dir``.
    """
    from usfmae_core.checkpoints import load_model
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.volumes import volume_from_config
    from usfmae_core.device import describe_device
    from usfmae_core.precision import precision_name
    from usfmae_core.runs import RunFolder, check_run
    from usfmae_core.workflows.common import Progress, write_csv, write_json

    check_run(out_dir, "predict", overwrite=overwrite)
    files, skipped = collect_inputs(inputs, include_masks, mask_patterns)  # a bad path fails before the model loads
    dev = _device(device)
    model, ckpt = load_model(model_path, expect=CLASSIFIER_ARCHS, device=dev)
    config = ckpt["config"]
    names = class_names(config, None)
    volume = volume_from_config(config)
    if volume is None and model_spatial_dims(model, config) == 2 and aggregate != "mean":
        normal_class = names[normal_class_index(names, normal_class)]  # refuse an unclear question up front
    elif aggregate != "mean" and not quiet:
        print(f"note: --aggregate {aggregate} applies to 2D slice classifiers; this {ckpt['arch']} model classifies "
              "each volume / clip whole")
    # decided (and said) once for the run; the classify_* calls then get the explicit choice
    amp = inference_dtype(dev, precision, model, batch_size, preprocessing_from_config(config),
                          log=None if quiet else print)
    chosen = precision_name(amp)
    model = to_inference_model(model, dev, chosen, copy=False)
    config_used = run_config if run_config is not None else {
        "model": str(model_path), "inputs": [str(i) for i in inputs], "device": device, "axis": axis,
        "batch_size": batch_size, "precision": precision, "aggregate": aggregate, "normal_class": normal_class}
    with RunFolder(out_dir, "predict", overwrite=overwrite, config=config_used) as run:
        out = run.path
        frame_rows: list[list[Any]] = []
        attention_rows: list[list[Any]] = []
        results: list[dict[str, Any]] = []
        prep = preprocessing_from_config(config)
        with Progress(len(files), "predict", disable=quiet) as bar:
            for path in files:
                try:
                    img = as_kind(read_ultrasound(path, keep_colour=prep.keeps_colour), kind)
                    inner = Progress(img.n_frames, "classify", disable=True) if img.n_frames > batch_size else None
                    try:
                        res = classify_array(model, config, img.array, img.kind, img.spacing, axis, dev, batch_size,
                                             top_k, chosen, None if inner is None else inner.update,
                                             source=str(path), aggregate=aggregate, normal_class=normal_class,
                                             colour=img.rgb)
                    finally:
                        if inner is not None:
                            inner.close()
                except UsfmaeError as err:
                    skipped.append({"source": str(path), "reason": str(err)})
                    bar.write(f"skipped {path}: {err}")
                    bar.update(1)
                    continue
                names = res["classes"]
                for i, row in zip(res["frame_index"], res["per_frame"], strict=True):
                    frame_rows.append([str(path), int(i), res["kind"], *map(_fmt, row), names[int(row.argmax())]])
                result = {"source": str(path), "kind": res["kind"], "n_frames": res["n_frames"],
                          "n_excluded": res["n_excluded"], "label": res["label"],
                          **{f"p_{c}": round(float(p), 6) for c, p in zip(names, res["aggregate"], strict=True)},
                          "top_slices": res["top_slices"]}
                colour = colour_status(img, prep, res["model"])
                if colour is not None:
                    result["colour"] = colour
                if res["attention"] is not None:
                    result["n_slices"] = len(res["attention"])
                    for i, a in zip(res["slice_index"], res["attention"], strict=True):
                        attention_rows.append([str(path), int(i), f"{float(a):.6f}"])
                results.append(result)
                bar.update(1, label=res["label"])
        if not results:
            first = skipped[0] if skipped else {"source": "?", "reason": "nothing to classify"}
            raise UsfmaeError(f"no input could be classified ({first['reason']})",
                              "check the files named above (format, corruption) and the model (2D/3D)")
        prob_cols = [f"p_{c}" for c in names]
        write_csv(out / "predictions.csv", ["source", "index", "kind", *prob_cols, "pred"], frame_rows)
        if attention_rows:
            write_csv(out / "attention.csv", ["source", "index", "attention"], attention_rows)
        write_csv(out / "summary.csv", ["source", "kind", "n_frames", "n_excluded", "label", *prob_cols, "top_slices"],
                  [[r["source"], r["kind"], r["n_frames"], r["n_excluded"], r["label"],
                    *(_fmt(r[c]) for c in prob_cols), " ".join(str(i) for i in r["top_slices"])] for r in results])
        write_json(out / "predictions.json", {
            "model": str(model_path), "arch": ckpt["arch"], "classes": names,
            "spatial_dims": model_spatial_dims(model, config), "axis": axis if volume is None else volume.axis,
            "volume_model": None if volume is None else volume.model,
            "aggregate": aggregate if volume is None else "volume model",
            "normal_class": normal_class if volume is None and aggregate != "mean" else None,
            "device": describe_device(dev), "weights_dtype": str(_weights_dtype(model)).replace("torch.", ""),
            "autocast": str(amp or "none").replace("torch.", "") if _weights_dtype(model) == torch.float32 else "none",
            "preprocessing": prep.to_dict(),
            "colour": {"files": sum(1 for r in results if r.get("colour")),
                       "given_as": "rgb" if prep.keeps_colour and volume is None else "grey"},
            "results": results, "skipped": skipped})
        run.finish()
    return out
