"""``usfmae reconstruct``: show what a pretrained MAE makes of an image, clip or volume with patches hidden.

* :func:`reconstruct_frames` - 2D MAE on frames ``(N, H, W)``: input, masked input, reconstruction and mask at the
  frames' own size, intensities in ``[0, 1]``;
* :func:`reconstruct_volume` - the same for a 3D MAE on a volume ``(D, H, W)``;
* :func:`reconstruct_file` - a file: PNG grids (input | masked | reconstruction) for images and clips; for volumes
  also the masked input, the reconstruction and the mask as volumes with the input's geometry (spacing, origin,
  direction), so the Slicer module can overlay them on the input.

The reconstruction shows the input's own pixels where patches were visible and the MAE's prediction where they
were hidden (as facebook's MAE pictures do). The prediction is resampled to the input size and the mask is
resampled with nearest neighbours, so visible pixels stay exact at full resolution.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usfmae_core.errors import UsfmaeError
from usfmae_core.workflows.predict import (
    _device,
    _model_input_size,
    _weights_dtype,
    inference_context,
    inference_dtype,
    preprocessing_from_config,
    volume_to_tensor,
)

__all__ = ["MAX_PICTURES", "reconstruct_file", "reconstruct_frames", "reconstruct_volume"]

MAX_PICTURES = 16  # PNG grids per file: enough to see the model's behaviour, few enough to look at
_VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _noise(n: int, length: int, seed: int) -> torch.Tensor:
    """Masking noise ``(n, length)`` from a CPU generator, so a seed gives the same mask on every device."""
    return torch.rand(n, length, generator=torch.Generator().manual_seed(int(seed)))


def _to_unit(x: torch.Tensor, prep) -> torch.Tensor:
    """Normalised model input ``(B, C, *S)`` -> grey ``(B, *S)`` in ``[0, 1]`` (mean / std undone, channels
    averaged)."""
    from usfmae_core.data.transforms import channel_stats

    c = x.shape[1]
    mean, std = channel_stats(prep.mean, prep.std, c)
    shape = (1, c) + (1,) * (x.dim() - 2)
    x = x.float() * std.view(shape).to(x.device) + mean.view(shape).to(x.device)
    return x.mean(dim=1).clamp_(0.0, 1.0)


def _check_mae(mae: nn.Module, dims: int) -> None:
    enc = getattr(mae, "encoder", None)
    if not hasattr(mae, "reconstruct") or enc is None:
        raise UsfmaeError("reconstruction needs a pretrained MAE, not a classifier",
                          "pass a checkpoint from usfmae pretrain (arch 'mae')")
    if enc.spatial_dims != dims:
        raise UsfmaeError(f"this is a {enc.spatial_dims}D MAE but {dims}D input was given",
                          "use reconstruct_volume for a 3D MAE and reconstruct_frames for a 2D one")


def _loss(x: torch.Tensor, recon: torch.Tensor, mask_img: torch.Tensor) -> tuple[float, float]:
    """Sum of squared error over hidden pixels and their count (model-input space)."""
    m = mask_img.float()
    return float((((recon.float() - x.float()) ** 2) * m).sum()), float(m.sum())


def _finish(scaled: np.ndarray, pred: np.ndarray, mask: np.ndarray, sse: float, count: float) -> dict[str, Any]:
    masked = scaled * (1.0 - mask)
    return {"input": scaled, "masked": masked.astype(np.float32),
            "reconstruction": (masked + pred * mask).astype(np.float32), "mask": mask.astype(np.float32),
            "loss": sse / max(count, 1.0)}


def reconstruct_frames(mae: nn.Module, frames: np.ndarray, prep, mask_ratio: float = 0.75, seed: int = 0,
                       device: torch.device | str = "cpu", batch_size: int = 16, precision: str = "auto",
                       progress=None) -> dict[str, Any]:
    """Mask and reconstruct 2D frames with a 2D MAE.

    Args:
        mae: :class:`~usfmae_core.networks.mae.USFMAE` (2D); moved to ``device``.
        frames: ``(N, H, W)`` or ``(H, W)`` float grey intensity, unscaled.
        prep: the checkpoint's :class:`~usfmae_core.data.transforms.Preprocessing`.
        mask_ratio: fraction of patches hidden.
        seed: seeds the mask (the same seed gives the same mask on any device).
        device, batch_size, precision: as in :func:`~usfmae_core.workflows.predict.classify_frames`.
        progress: called with the number of frames done after each batch.

    Returns:
        ``input`` (the intensity-scaled frames), ``masked``, ``reconstruction``, ``mask`` (1 = hidden): each
        ``(N, H, W)`` float32 in ``[0, 1]`` at the frames' own size; ``loss``: mean squared error over hidden
        pixels in model-input space (the MAE's training loss when ``norm_pix_loss`` is off).
    """
    from usfmae_core.data.transforms import frames_to_tensor, from_square, scale_intensity

    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W) or (H, W), got shape {frames.shape}")
    if not 0.0 < mask_ratio < 1.0:
        raise UsfmaeError(f"mask ratio {mask_ratio} is out of range", "use a value between 0 and 1, e.g. 0.75")
    _check_mae(mae, 2)
    dev = _device(device)
    mae = mae.to(dev).eval()
    n, h, w = frames.shape
    scaled = np.stack([scale_intensity(f) for f in frames]).astype(np.float32)
    pred = np.empty_like(scaled)
    mask = np.empty_like(scaled)
    noise = _noise(n, mae.encoder.num_patches, seed)
    sse = count = 0.0
    bs = max(1, int(batch_size))
    wdtype = _weights_dtype(mae)
    amp = inference_dtype(dev, precision, mae, bs, prep) if wdtype == torch.float32 else None
    with inference_context(dev, amp):
        for i in range(0, n, bs):
            # the whole frame (no sector crop), letterboxed or squashed as the MAE's preprocessing says, and back
            x = frames_to_tensor(frames[i:i + bs], prep, crop=(0, h, 0, w)).to(dev, wdtype)
            _, recon, mask_img = mae.reconstruct(x, mask_ratio, noise[i:i + bs].to(dev))
            s, c = _loss(x, recon, mask_img)
            sse, count = sse + s, count + c
            pred[i:i + bs] = from_square(_to_unit(recon, prep).cpu(), (h, w), prep).clamp_(0, 1).numpy()
            mask[i:i + bs] = from_square(mask_img[:, 0].float().cpu(), (h, w), prep, mode="nearest").numpy()
            if progress is not None:
                progress(len(x))
    return _finish(scaled, pred, mask, sse, count)


def reconstruct_volume(mae: nn.Module, volume: np.ndarray, prep, mask_ratio: float = 0.75, seed: int = 0,
                       device: torch.device | str = "cpu", precision: str = "auto") -> dict[str, Any]:
    """Mask and reconstruct a volume ``(D, H, W)`` with a 3D MAE (the volume is resized to the model's cube and the
    results back to ``(D, H, W)``). Returns the same keys as :func:`reconstruct_frames`, shaped ``(D, H, W)``."""
    from monai.transforms import Resize

    from usfmae_core.data.transforms import scale_intensity

    if not 0.0 < mask_ratio < 1.0:
        raise UsfmaeError(f"mask ratio {mask_ratio} is out of range", "use a value between 0 and 1, e.g. 0.75")
    _check_mae(mae, 3)
    dev = _device(device)
    mae = mae.to(dev).eval()
    vol = np.asarray(volume, dtype=np.float32)
    scaled = scale_intensity(vol)
    wdtype = _weights_dtype(mae)
    x = volume_to_tensor(vol, prep, _model_input_size(mae, prep, 3)).to(dev, wdtype)
    with inference_context(dev, inference_dtype(dev, precision, mae, 1, prep) if wdtype == torch.float32 else None):
        _, recon, mask_img = mae.reconstruct(x, mask_ratio, _noise(1, mae.encoder.num_patches, seed).to(dev))
        sse, count = _loss(x, recon, mask_img)
    unit = _to_unit(recon, prep).cpu()  # (1, S, S, S)
    if tuple(unit.shape[1:]) != vol.shape:
        unit = torch.as_tensor(Resize(vol.shape, mode="trilinear", anti_aliasing=False)(unit)).as_subclass(
            torch.Tensor)
    mask = F.interpolate(mask_img[:, :1].float().cpu(), size=vol.shape, mode="nearest")[0, 0].numpy()
    return _finish(scaled, unit[0].clamp(0, 1).numpy(), mask, sse, count)


# --------------------------------------------------------------------------------------------------- files
def _volume_suffix(path: Path) -> str:
    """The input's volume extension when SimpleITK writes it (``.seq.nrrd`` / ``.nhdr`` / DICOM -> ``.nrrd``)."""
    name = path.name.lower()
    if name.endswith(".seq.nrrd"):
        return ".nrrd"
    for ext in _VOLUME_EXTS:
        if name.endswith(ext):
            return ext
    return ".nrrd"


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".seq.nrrd", ".igs.mha", ".nii.gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _write_with_geometry(array: np.ndarray, img, path: Path) -> Path:
    """Write ``array`` with the geometry of the input ``img`` (an :class:`UltrasoundImage`): spacing, origin and
    direction as SimpleITK read them, so the output overlays the input in Slicer. ``array`` is ``(D, H, W)`` for a
    volume or cine, ``(H, W)`` (or ``(1, H, W)``) for an image, written 2D with the in-plane part of the geometry."""
    import SimpleITK as sitk

    if img.kind == "image":
        array = array.reshape(array.shape[-2:])
    dims = array.ndim
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ref = sitk.Image([int(s) for s in reversed(array.shape)], out.GetPixelID())
    ref.SetSpacing([float(s) for s in reversed(img.spacing[-dims:])])
    origin, direction = img.meta.get("origin"), img.meta.get("direction")
    if origin is not None and len(origin) >= dims:
        ref.SetOrigin([float(o) for o in origin[:dims]])
    if direction is not None:
        n = round(len(direction) ** 0.5)
        if n >= dims:
            ref.SetDirection([float(d) for d in np.asarray(direction, float).reshape(n, n)[:dims, :dims].ravel()])
    out.CopyInformation(ref)
    # SimpleITK writes by name: a temporary name with the real extension (it picks the format from it), then the
    # same durable rename as every other result file
    from usfmae_core.fileio import fsync_dir, fsync_file

    tmp = path.with_name(f".tmp.{path.name}")
    try:
        sitk.WriteImage(out, str(tmp), True)
        fsync_file(tmp)
        os.replace(tmp, path)
    except RuntimeError as err:  # SimpleITK reports write failures (full disk, permissions) as RuntimeError
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"SimpleITK could not write it: {str(err).strip().splitlines()[-1][:120]}",
                      str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _pictures(res: dict[str, Any], out: Path, stem: str, label: str, cap: int = MAX_PICTURES) -> list[Path]:
    from usfmae_core.workflows.pictures import save_image_grid

    n = res["input"].shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, cap)).round().astype(int))
    written = []
    for i in idx:
        row = [(np.clip(res[k][i], 0, 1) * 255 + 0.5).astype(np.uint8) for k in ("input", "masked", "reconstruction")]
        name = f"{stem}.png" if n == 1 else f"{stem}_{label}{int(i):04d}.png"
        written.append(save_image_grid([row], out / name))
    return written


def reconstruct_file(model_path: str | os.PathLike, path: str | os.PathLike, out_dir: str | os.PathLike,
                     mask_ratio: float = 0.75, seed: int = 0, axis: int = 0, device: str = "auto",
                     batch_size: int = 16, precision: str = "auto", run_config: dict[str, Any] | None = None,
                     quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Reconstruct one file with the MAE in ``model_path`` and write the results to ``out_dir`` (locked while it is
    written; earlier results there are refused unless ``overwrite``, see :mod:`usfmae_core.runs`).

    2D image / cine: PNG grids (input | masked | reconstruction), one per frame (at most :data:`MAX_PICTURES`,
    evenly spaced). 3D volume, and any input in a volume format (NRRD, NIfTI, MetaImage: e.g. a one-slice image
    or a clip saved from Slicer): ``<name>_masked``, ``<name>_reconstruction`` (float ``[0, 1]``) and
    ``<name>_mask`` (uint8, 1 = hidden) in the input's format when SimpleITK writes it (else ``.nrrd``) with the
    input's spacing, origin and direction, plus PNG grids of slices. Also ``reconstruct.json`` (loss, paths) and
    ``config.json``.

    Returns:
        ``{"pictures": [paths], "volumes": {"masked", "reconstruction", "mask"} (volumes only), "loss", "summary"}``.
    """
    from usfmae_core.checkpoints import load_model
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.runs import RunFolder, check_run

    path = Path(path)
    if not path.exists():
        raise UsfmaeError(f"input {path} does not exist", "check the path")
    check_run(out_dir, "reconstruct", overwrite=overwrite)
    dev = _device(device)
    img = read_ultrasound(path)
    mae, ckpt = load_model(model_path, expect="mae", device=dev)
    prep = preprocessing_from_config(ckpt["config"])
    config_used = run_config if run_config is not None else {
        "model": str(model_path), "input": str(path), "mask_ratio": mask_ratio, "seed": seed, "axis": axis,
        "device": device}
    with RunFolder(out_dir, "reconstruct", overwrite=overwrite, config=config_used) as run:
        written = _reconstruct_into(run.path, mae, ckpt, img, path, prep, model_path, mask_ratio, seed, axis, dev,
                                    batch_size, precision, quiet)
        run.finish()
    return written


def _reconstruct_into(out: Path, mae: nn.Module, ckpt: dict[str, Any], img: Any, path: Path, prep: Any,
                      model_path: str | os.PathLike, mask_ratio: float, seed: int, axis: int, dev: torch.device,
                      batch_size: int, precision: str, quiet: bool) -> dict[str, Any]:
    from usfmae_core.data.readers import file_format
    from usfmae_core.data.transforms import image_to_frames
    from usfmae_core.workflows.common import Progress, write_json

    stem = _stem(path)
    dims = mae.encoder.spatial_dims
    if dims == 3 and img.kind != "volume":
        raise UsfmaeError(f"{path} is a 2D {img.kind} but {model_path} is a 3D MAE",
                          "reconstruct volumes with a 3D MAE, or use a 2D MAE for images and clips")
    if dims == 3:
        res = reconstruct_volume(mae, img.array, prep, mask_ratio, seed, dev, precision)
        pic_res, label = res, "slice"
    else:
        frames = image_to_frames(img, axis=axis)
        with Progress(len(frames), "reconstruct", disable=quiet or len(frames) <= batch_size) as bar:
            res = reconstruct_frames(mae, frames, prep, mask_ratio, seed, dev, batch_size, precision, bar.update)
        pic_res, label = res, "slice" if img.kind == "volume" else "frame"
        if img.kind == "volume" and axis % 3 != 0:  # back to the input's (D, H, W) order
            res = {k: (np.moveaxis(v, 0, axis) if isinstance(v, np.ndarray) else v) for k, v in res.items()}
    written: dict[str, Any] = {"pictures": [str(p) for p in _pictures(pic_res, out, stem, label)],
                               "loss": res["loss"]}
    # volumes, and any input read from a volume format (NRRD, NIfTI, MetaImage), get volume files back
    if img.kind == "volume" or file_format(path) == "itk":
        ext = _volume_suffix(path)
        written["volumes"] = {
            "masked": str(_write_with_geometry(res["masked"], img, out / f"{stem}_masked{ext}")),
            "reconstruction": str(_write_with_geometry(res["reconstruction"], img,
                                                       out / f"{stem}_reconstruction{ext}")),
            "mask": str(_write_with_geometry(res["mask"].astype(np.uint8), img, out / f"{stem}_mask{ext}")),
        }
    written["summary"] = str(write_json(out / "reconstruct.json", {
        "model": str(model_path), "input": str(path), "kind": img.kind, "shape": list(img.array.shape),
        "spatial_dims": dims, "axis": axis if dims == 2 and img.kind == "volume" else None,
        "mask_ratio": mask_ratio, "seed": seed, "loss": res["loss"], **written}))
    return written
