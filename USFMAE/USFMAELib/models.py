"""The module's model cache: where models are kept, and the two functions that read checkpoints.

:func:`model_info` and :func:`import_model` load checkpoints, hence torch: they run in a job's child process
(``Scripts/usfmae_job.py`` function steps), never in the Slicer process. The cache is ``$USFMAE_HOME/models`` or
``~/.usfmae/models``, outside the Slicer installation, the same folder ``usfmae info`` names and ``usfmae pull``
downloads into.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from USFMAELib.engine import UsfmaeError

MODEL_SUFFIXES = (".pt", ".pth")


def model_cache_dir() -> Path:
    """``$USFMAE_HOME/models`` or ``~/.usfmae/models`` (as ``usfmae_core.commands.info.model_cache_dir``; a test
    compares, since importing the engine's copy is not needed to list files)."""
    return Path(os.environ.get("USFMAE_HOME", Path.home() / ".usfmae")).expanduser() / "models"


def cached_models(folder: str | os.PathLike | None = None) -> list[Path]:
    """Model files in the cache, newest first (its sub-folders, e.g. ``usfmae pull``'s raw downloads, are not
    models yet)."""
    root = Path(folder) if folder is not None else model_cache_dir()
    if not root.is_dir():
        return []
    files = [p for p in root.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def model_info(path: str) -> dict[str, Any]:
    """What a checkpoint holds (child process): arch, classes, preset, input size, spatial dims, version."""
    from usfmae_core.checkpoints import load_checkpoint

    ckpt = load_checkpoint(Path(path).expanduser())
    cfg = ckpt.get("config", {})
    prep = cfg.get("preprocessing") or {}
    return {"path": str(path), "arch": ckpt.get("arch"), "classes": [str(c) for c in cfg.get("classes") or []],
            "preset": cfg.get("preset"), "image_size": prep.get("image_size", cfg.get("img_size")),
            "spatial_dims": cfg.get("spatial_dims", 2), "version": ckpt.get("usfmae_version")}


def import_model(source: str, cache_dir: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Put a model into the cache (child process) and return :func:`model_info` of the cached copy.

    ``source``: one of our checkpoints (copied as it is), foreign weights that ``usfmae import-weights`` converts
    (USF-MAE / facebook MAE, MONAI, timm ViT), or a MONAI bundle folder (its ``models/model.pt``). Works offline.
    """
    from usfmae_core.checkpoints import import_weights, load_checkpoint

    src = Path(source).expanduser()
    if src.is_dir():
        candidates = [src / "models" / n for n in ("model.pt", "model.pth")]
        candidates += sorted((src / "models").glob("*.pt")) if (src / "models").is_dir() else []
        candidates += sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise UsfmaeError(f"{src} holds no model file (looked for models/model.pt, *.pt, *.pth)",
                              "choose a checkpoint file or a MONAI bundle folder with models/model.pt")
        stem = name or src.name
        src = found[0]
    else:
        stem = name or src.stem
    if not src.is_file():
        raise UsfmaeError(f"model file {src} does not exist", "check the path")
    folder = Path(cache_dir) if cache_dir else model_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{safe_name(stem)}.pt"
    n = 1
    while dest.exists():
        dest = folder / f"{safe_name(stem)}_{n}.pt"
        n += 1
    try:
        load_checkpoint(src)  # ours: keep the file as it is
    except UsfmaeError:
        import_weights(src, dest)  # foreign: convert (a one-line error if it cannot)
    else:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return model_info(str(dest))
