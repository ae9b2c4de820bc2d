"""Ultrasound screen handling: find the imaged region (sector / fan / linear field) and remove burned-in annotations.

* :func:`detect_imaged_region` keeps the largest connected non-black region that survives a morphological
  opening (text, rulers and side panels are thin or separated by black; the speckle field is solid). For a cine,
  pixels that never change over time (static UI) are excluded first. Connected components and morphology come
  from ITK (SimpleITK).
* :func:`annotation_mask` marks coloured pixels (Doppler boxes, coloured markers: from the reader's colour mask),
  thin saturated strokes (text, calipers, rulers: a white top-hat on near-white pixels) and, for a cine, bright
  pixels that never change; :func:`inpaint` fills them by normalised convolution (an average of the valid
  neighbours at growing radius), which is enough for thin marks on speckle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["detect_imaged_region", "annotation_mask", "inpaint", "remove_annotations"]


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
    radius = max(1, min(h, w) // 100)
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m = sitk.BinaryMorphologicalClosing(m, [radius] * 2)  # dark speckle holes inside the fan
    m = sitk.BinaryMorphologicalOpening(m, [radius * 3] * 2)  # removes thin text, rulers, tick marks
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(m), sortByObjectSize=True)
    lab = sitk.GetArrayViewFromImage(cc)
    ys, xs = np.nonzero(lab == 1)
    if ys.size < min_fraction * h * w:
        return None
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    if box == (0, h, 0, w):
        return None
    return box


def annotation_mask(frame: np.ndarray, colour_mask: np.ndarray | None = None, static_bright: np.ndarray | None = None,
                    white: float = 0.85, tophat: float = 0.3) -> np.ndarray:
    """Boolean ``(H, W)`` mask of burned-in annotations in one frame (any range; scaled internally)."""
    x = torch.from_numpy(_norm(frame))[None, None]
    # grey opening (erosion then dilation) with a 5x5 window: thin strokes vanish, speckle texture mostly stays
    opened = F.max_pool2d(-F.max_pool2d(-x, 5, 1, 2), 5, 1, 2)
    mask = ((x > white) & ((x - opened) > tophat))[0, 0].numpy()
    if colour_mask is not None:
        mask |= colour_mask
    if static_bright is not None:
        mask |= static_bright
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.max_pool2d(t, 3, 1, 1)[0, 0] > 0).numpy()  # one pixel margin: JPEG ringing around the marks


def inpaint(frame: np.ndarray, mask: np.ndarray, max_iter: int = 6) -> np.ndarray:
    """Fill ``mask`` pixels of ``frame`` by normalised convolution at growing radius (float32 out)."""
    x = torch.from_numpy(np.asarray(frame, dtype=np.float32).copy())[None, None]
    m = torch.from_numpy(~np.asarray(mask, bool)).float()[None, None]
    if m.min() > 0:
        return x[0, 0].numpy()
    out = x.clone()
    filled = m.clone()
    for i in range(max_iter):
        k = 2 * (2**i) + 1
        num = F.avg_pool2d(out * filled, k, 1, k // 2, count_include_pad=False)
        den = F.avg_pool2d(filled, k, 1, k // 2, count_include_pad=False)
        new = (den > 1e-6) & (filled == 0)
        out = torch.where(new, num / den.clamp_min(1e-6), out)
        filled = torch.where(new, torch.ones_like(filled), filled)
        if filled.min() > 0:
            break
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
