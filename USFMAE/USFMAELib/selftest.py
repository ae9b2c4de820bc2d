"""Support of the in-Slicer self-test (``USFMAETest``): tiny random models, made in a job's child process."""

from __future__ import annotations

from pathlib import Path


def write_tiny_models(folder: str) -> dict[str, str]:
    """A 3-class ViT classifier and an MAE of the ``vit_test`` preset (32 px), random weights; ``{"classifier",
    "mae"}`` paths. Runs in a child process (imports torch)."""
    import torch

    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.data.phantom import CLASSES
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.presets import build_model, mae_config

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    prep = Preprocessing(image_size=32, in_channels=3).to_dict()
    mae_cfg = {**mae_config("vit_test", img_size=32, patch_size=8), "preset": "vit_test", "preprocessing": prep}
    encoder = ("in_channels", "img_size", "patch_size", "spatial_dims", "hidden_size", "num_layers", "num_heads",
               "mlp_ratio", "qkv_bias", "drop_path_rate")
    clf_cfg = {**{k: mae_cfg[k] for k in encoder}, "num_classes": len(CLASSES), "pool": "avg", "dropout": 0.0,
               "preset": "vit_test", "classes": list(CLASSES), "preprocessing": prep}
    mae = save_checkpoint(out / "mae.pt", make_checkpoint(build_model("mae", mae_cfg), "mae", mae_cfg))
    clf = save_checkpoint(out / "classifier.pt",
                          make_checkpoint(build_model("classifier", clf_cfg), "classifier", clf_cfg))
    return {"classifier": str(clf), "mae": str(mae)}
