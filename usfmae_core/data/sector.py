"""Ultrasound screen handling: find the imaged region (sector / fan / linear field) and remove burned-in annotations.

* :func:`detect_imaged_region` keeps the largest connected non-black region that survives a morphological
  opening (text, rulers and side panels are thin or separated by black; the speckle field is solid). For a cine,
  pixels that never change over time (static UI) are excluded first. Morphology is max-pooling in torch (much
  faster than ITK's ball-shaped kernels here); connected components come from ITK (SimpleITK).
* :func:`annotation_mask` marks coloured pixels (Doppler boxes, coloured markers: from the reader's colour mask),
  thin saturated strokes (text, calipers, rulers: a white top-hat on near-white pixels) and, for a cine, bright
  pixels that never change; :func:`inpaint` fills them by normalised convolution (an average of the valid
  neighbours at growing radius), which is enough for thin marks on speckle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["annotation_mask", "detect_imaged_region", "inpaint", "remove_annotations"]


def _norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def detect_imaged_region(frames: np.ndarray, threshold: float = 0.04, min_fraction: float = 0.1
                         ) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` (end-exclusive) of the imaged region of ``(H, W)`` or ``(T, H, W)`` frames.

    Returns None when nothing convincing is found (the region would be below ``min_fraction`` of the frame) or
    when the region is the whole frame (nothing to crop).
    """
    import SimpleITK as sitk

    f = _norm(frames)
    if f.ndim == 3 and f.shape[0] > 1:
        mean = f.mean(0)
        moving = f.std(0) > 0.004  # static pixels (UI, text, black border) never change between frames
        mask = (mean > threshold) & moving if moving.mean() > min_fraction else mean > threshold
    else:
        mask = (f[0] if f.ndim == 3 else f) > threshold
    h, w = mask.shape
    # work on a <= 128 px version: the box needs ~1 % precision, and this is 10-20x cheaper than full size
    f = max(1, int(np.ceil(max(h, w) / 128)))
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    if f > 1:
        t = (F.avg_pool2d(t, f, f, ceil_mode=True) > 0.5).float()
    radius = max(1, min(t.shape[-2:]) // 100)

    def dil(a: torch.Tensor, r: int) -> torch.Tensor:  # separable square structuring element: O(r) not O(r^2)
        return F.max_pool2d(F.max_pool2d(a, (1, 2 * r + 1), 1, (0, r)), (2 * r + 1, 1), 1, (r, 0))

    t = -dil(-dil(t, radius), radius)  # closing: dark speckle holes inside the fan
    t = dil(-dil(-t, 3 * radius), 3 * radius)  # opening: removes thin text, rulers, tick marks
    cc_filter = sitk.ConnectedComponentImageFilter()
    cc_filter.SetNumberOfThreads(1)  # tiny image: ITK's thread start-up costs more than the work
    cc = sitk.RelabelComponent(cc_filter.Execute(sitk.GetImageFromArray(t[0, 0].numpy().astype(np.uint8))),
                               sortByObjectSize=True)
    lab = sitk.GetArrayViewFromImage(cc)
    ys, xs = np.nonzero(lab == 1)
    if ys.size * f * f < min_fraction * h * w:
        return None
    box = (int(ys.min()) * f, min(h, (int(ys.max()) + 1) * f), int(xs.min()) * f, min(w, (int(xs.max()) + 1) * f))
    if box == (0, h, 0, w):
        return None
    return box


def annotation_mask(frame: np.ndarray, colour_mask: np.ndarray | None = None, static_bright: np.ndarray | None = None,
                    white: float = 0.95, tophat: float = 0.12) -> np.ndarray:
    """Boolean ``(H, W)`` mask of burned-in annotations in one frame (any range; scaled internally)."""
    x = torch.from_numpy(_norm(frame))[None, None]
    # grey opening (erosion then dilation) with a 5x5 window: thin strokes vanish, speckle texture mostly stays
    def mx(a: torch.Tensor) -> torch.Tensor:  # separable 5x5 max filter
        return F.max_pool2d(F.max_pool2d(a, (1, 5), 1, (0, 2)), (5, 1), 1, (2, 0))

    opened = mx(-mx(-x))
    mask = ((x > white) & ((x - opened) > tophat))[0, 0].numpy()
    if colour_mask is not None:
        mask |= colour_mask
    if static_bright is not None:
        mask |= static_bright
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.max_pool2d(t, 3, 1, 1)[0, 0] > 0).numpy()  # one pixel margin: JPEG ringing around the marks


def inpaint(frame: np.ndarray, mask: np.ndarray, max_iter: int = 64) -> np.ndarray:
    """Fill ``mask`` pixels of ``frame`` by iterated 3x3 normalised convolution (onion-peeling from the edges).

    Each pass fills the masked pixels that touch valid ones with the mean of their valid neighbours, so thin marks
    close in a few passes; ``max_iter`` bounds the cost for large masks (what is left is filled with the mean).
    """
    x = torch.from_numpy(np.asarray(frame, dtype=np.float32).copy())[None, None]
    valid = torch.from_numpy(~np.asarray(mask, bool)).float()[None, None]
    if valid.min() > 0:
        return x[0, 0].numpy()
    if valid.max() == 0:
        return x[0, 0].numpy()
    out = x * valid
    for _ in range(max_iter):
        num = F.avg_pool2d(out * valid, 3, 1, 1, count_include_pad=False)
        den = F.avg_pool2d(valid, 3, 1, 1, count_include_pad=False)
        new = (den > 0) & (valid == 0)
        if not bool(new.any()):
            break
        out = torch.where(new, num / den.clamp_min(1e-6), out)
        valid = torch.where(new, torch.ones_like(valid), valid)
    if valid.min() == 0:
        out = torch.where(valid > 0, out, (out * valid).sum() / valid.sum())
    return out[0, 0].numpy()


def remove_annotations(frames: np.ndarray, colour_mask: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Detect and inpaint annotations in ``(T, H, W)`` frames; returns (frames, fraction of pixels inpainted)."""
    f = np.asarray(frames, dtype=np.float32)
    static = None
    if f.shape[0] > 2:
        n = _norm(f)
        static = (n.std(0) < 0.004) & (n.min(0) > 0.5)
    out = np.empty_like(f)
    total = 0.0
    for i in range(f.shape[0]):
        cm = None
        if colour_mask is not None:
            cm = colour_mask[i] if colour_mask.ndim == 3 else colour_mask
        m = annotation_mask(f[i], cm, static)
        total += float(m.mean())
        out[i] = inpaint(f[i], m) if m.any() else f[i]
    return out, total / max(1, f.shape[0])
