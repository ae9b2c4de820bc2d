"""USF-MAE: an ultrasound foundation-model toolkit (masked autoencoder pretraining, fine-tuning, inference).

The engine is pure Python (PyTorch + MONAI) and is shared by the CLI (`usfmae`), the MONAI bundle
(`bundles/usf_mae`) and the 3D Slicer module (`USFMAE/`).
"""

import os

__version__ = "0.2.0"

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set (read once, at the first
# large allocation). Fresh batch-sized buffers then cost far fewer page faults: the CPU augmentation measured
# 2.4k -> 3.2k img/s per core (benchmarks/README.md, "Data"). The user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from usfmae_core.errors import UsfmaeError

__all__ = ["UsfmaeError", "__version__"]
