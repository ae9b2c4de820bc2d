"""PNG pictures for people: MAE reconstruction grids and training curves (shared by every workflow).

Reconstruction grids show one sample per row and three columns: the input, the masked input (hidden patches
black) and the reconstruction (predicted patches pasted into the visible input). Tensors are model input, i.e.
normalised with ``mean`` / ``std``; pass them to get the grey levels back, otherwise each row is min-max scaled
by its input. Volumes ``(N, C, D, H, W)`` show their middle slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_curve", "save_curves", "save_figure", "save_image_grid", "save_reconstruction_grid", "to_grey_uint8"]


def _middle_slice(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, H, W)`` (middle of D); 4D tensors are returned as they are."""
    if x.dim() == 5:
        return x[:, :, x.shape[2] // 2]
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (N, C, D, H, W), got {tuple(x.shape)}")
    return x


def to_grey_uint8(x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  ref: torch.Tensor | None = None) -> np.ndarray:
    """Model-input tensor ``(N, C, H, W)`` -> grey ``uint8 (N, H, W)``.

    With ``mean``/``std`` the normalisation is undone and ``[0, 1]`` mapped to ``[0, 255]``; otherwise each image is
    min-max scaled by the range of ``ref`` (default: itself), so the columns of one row share one grey scale.
    """
    x = _middle_slice(x.detach().float().cpu())
    c = x.shape[1]
    if mean is not None and std is not None:
        from usfmae_core.data.transforms import channel_stats

        m, s = channel_stats(mean, std, c)
        x = x * s + m
    else:
        r = _middle_slice((x if ref is None else ref).detach().float().cpu())
        lo = r.amin(dim=(1, 2, 3), keepdim=True)
        hi = r.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    grey = x.mean(dim=1).clamp(0, 1)
    return (grey * 255 + 0.5).to(torch.uint8).numpy()


def save_image_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, pad: int = 2, min_size: int = 128
                    ) -> Path:
    """Tile equally sized grey ``uint8 (H, W)`` images (a list of rows) into one PNG, written atomically.

    Images smaller than ``min_size`` are enlarged by an integer factor (nearest neighbour, so patches stay sharp).
    """
    from PIL import Image

    k = max(1, min_size // max(rows[0][0].shape))
    if k > 1:
        rows = [[np.kron(img, np.ones((k, k), np.uint8)) for img in row] for row in rows]
    h, w = rows[0][0].shape
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = img
    return _save_png(Image.fromarray(grid), Path(path))


def save_reconstruction_grid(masked: torch.Tensor, recon: torch.Tensor, original: torch.Tensor, path: str | Path,
                             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                             max_rows: int = 8) -> Path:
    """Write a PNG with one row per sample: input | masked input | reconstruction.

    Args:
        masked: masked input ``(N, C, H, W)`` or ``(N, C, D, H, W)`` (as from ``USFMAE.reconstruct``).
        recon: reconstruction, same shape.
        original: the input, same shape.
        path: PNG to write (folders are created).
        mean, std: the normalisation of the tensors, to show true grey levels (see :func:`to_grey_uint8`).
        max_rows: at most this many samples.

    Returns:
        ``path``.
    """
    if not (masked.shape == recon.shape == original.shape):
        raise ValueError(f"shapes differ: masked {tuple(masked.shape)}, recon {tuple(recon.shape)}, "
                         f"original {tuple(original.shape)}")
    n = min(max_rows, original.shape[0])
    ref = original[:n]
    cols = [to_grey_uint8(t[:n], mean, std, ref=ref) for t in (original, masked, recon)]
    # hidden patches are exactly 0 in every channel of the (normalised) tensor: show them black, not mean grey
    hidden = _middle_slice(masked[:n].detach().cpu()).abs().amax(dim=1).numpy() == 0
    cols[1] = np.where(hidden, 0, cols[1]).astype(np.uint8)
    return save_image_grid([[c[i] for c in cols] for i in range(n)], path)


def save_curve(xs: Sequence[float], ys: Sequence[float], path: str | Path, title: str = "",
               ylabel: str = "loss", xlabel: str = "step", logy: bool = False) -> Path:
    """Plot ``ys`` against ``xs`` (e.g. training loss per step) as a PNG, written atomically."""
    return save_curves({"": (xs, ys)}, path, title, ylabel, xlabel, logy)


def save_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "",
                ylabel: str = "loss", xlabel: str = "step", logy: bool = False) -> Path:
    """Plot several ``{label: (xs, ys)}`` curves on one axis (a legend when labelled) as a PNG, written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads and without a display

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    positive = True
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), lw=1.2, label=label or None)
        positive = positive and len(ys) > 0 and min(ys) > 0
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy and positive:
        ax.set_yscale("log")
    if any(series):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib ``Figure`` as PNG atomically and durably (:func:`usfmae_core.fileio.atomic_write`)."""
    from usfmae_core.fileio import atomic_write

    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _save_png(img, path: Path) -> Path:
    from usfmae_core.fileio import atomic_write

    return atomic_write(path, lambda f: img.save(f, format="PNG"))
