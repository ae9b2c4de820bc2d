"""USF-MAE: an ultrasound foundation-model toolkit (masked autoencoder pretraining, fine-tuning, inference).

The engine is pure Python (PyTorch + MONAI) and is shared by the CLI (`usfmae`), the MONAI bundle
(`bundles/usf_mae`) and the 3D Slicer module (`USFMAE/`).
"""

__version__ = "0.1.0"

from usfmae_core.errors import UsfmaeError  # noqa: E402

__all__ = ["__version__", "UsfmaeError"]
