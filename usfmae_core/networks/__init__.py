"""Networks: the USF-MAE masked autoencoder, its 2D / native-3D classifier, the attention-MIL volume classifier
and model presets.

Attributes are imported on first use (PEP 562), so that ``usfmae_core.networks.presets`` (read by the command-line
parser) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "USFMAE": "mae", "MAEDecoder": "mae", "ViTEncoder": "mae", "patchify": "mae", "unpatchify": "mae",
    "USFMAEClassifier": "classifier", "cnn_baseline": "classifier",
    "AttentionMILClassifier": "volume", "GatedAttentionPooling": "volume",
    "PRESETS": "presets", "build_model": "presets", "mae_config": "presets",
}
__all__ = sorted(_WHERE)  # noqa: PLE0605 - the names __getattr__ resolves lazily


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
