"""``usfmae info``: versions, compute device and model cache location."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def model_cache_dir() -> Path:
    """Where downloaded or imported models are kept: ``$USFMAE_HOME`` or ``~/.usfmae/models``."""
    return Path(os.environ.get("USFMAE_HOME", Path.home() / ".usfmae")).expanduser() / "models"


def collect_info(device: str = "auto") -> dict:
    import monai
    import numpy
    import torch

    from usfmae_core import __version__
    from usfmae_core.device import describe_device, resolve_device

    return {
        "usfmae": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device": describe_device(resolve_device(device)),
        "model_cache": str(model_cache_dir()),
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info(args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    dev = info["device"]
    mem = f", {dev['memory_gb']} GB" if dev.get("memory_gb") else ""
    print(f"usfmae {info['usfmae']} (python {info['python']}, torch {info['torch']}, monai {info['monai']}, "
          f"numpy {info['numpy']})")
    print(f"device: {dev['device']} ({dev['name']}{mem}); CUDA available: {info['cuda_available']}")
    print(f"model cache: {info['model_cache']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, compute device and model cache location")
    p.add_argument("--device", default="auto", help="auto|cuda|mps|cpu (default: auto)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
