"""Plain constants shared by the engine and the command line (no heavy imports: the CLI parser reads them)."""

from __future__ import annotations

# ImageNet statistics: the normalisation of facebook's MAE and of the USF-MAE checkpoints.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")
PRECISION_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
KIND_CHOICES: tuple[str, ...] = ("auto", "image", "cine", "volume")  # how an input's slices are read (predict --kind)
