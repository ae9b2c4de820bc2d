"""Model sizes by name, and building models from the plain-typed config stored in checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from usfmae_core.errors import UsfmaeError

if TYPE_CHECKING:  # torch stays out of the CLI's start-up (preset names are read by `usfmae --help`)
    import torch.nn as nn

# Encoder and decoder shapes. The paper's model is ``vit_base`` (ViT-B/16, decoder 512 wide, 8 blocks).
# ``vit_micro`` and ``vit_test`` are for CPU demos and tests; their widths divide by 4 and 6 (2D and 3D sin-cos).
PRESETS: dict[str, dict[str, Any]] = {
    "vit_test": dict(hidden_size=48, num_layers=2, num_heads=3, decoder_hidden_size=48, decoder_num_layers=1,
                     decoder_num_heads=3),
    "vit_micro": dict(hidden_size=96, num_layers=4, num_heads=3, decoder_hidden_size=96, decoder_num_layers=2,
                      decoder_num_heads=3),
    "vit_tiny": dict(hidden_size=192, num_layers=12, num_heads=3, decoder_hidden_size=512, decoder_num_layers=8,
                     decoder_num_heads=16),
    "vit_small": dict(hidden_size=384, num_layers=12, num_heads=6, decoder_hidden_size=512, decoder_num_layers=8,
                      decoder_num_heads=16),
    "vit_base": dict(hidden_size=768, num_layers=12, num_heads=12, decoder_hidden_size=512, decoder_num_layers=8,
                     decoder_num_heads=16),
    "vit_large": dict(hidden_size=1024, num_layers=24, num_heads=16, decoder_hidden_size=512, decoder_num_layers=8,
                      decoder_num_heads=16),
}

ENCODER_KEYS = ("in_channels", "img_size", "patch_size", "spatial_dims", "hidden_size", "num_layers", "num_heads",
                "mlp_ratio", "qkv_bias", "drop_path_rate")
DECODER_KEYS = ("decoder_hidden_size", "decoder_num_layers", "decoder_num_heads", "mask_ratio", "norm_pix_loss",
                "decoder_mlp_ratio")


def mae_config(preset: str = "vit_base", **overrides: Any) -> dict[str, Any]:
    """Plain-typed keyword arguments of :class:`~usfmae_core.networks.mae.USFMAE` for ``preset`` plus overrides."""
    if preset not in PRESETS:
        raise UsfmaeError(f"unknown model preset '{preset}'", f"choose one of {', '.join(PRESETS)}")
    cfg: dict[str, Any] = dict(in_channels=3, img_size=224, patch_size=16, spatial_dims=2, mlp_ratio=4.0,
                               qkv_bias=True, drop_path_rate=0.0, mask_ratio=0.75, norm_pix_loss=False)
    cfg.update(PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def encoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of a model config (what an MAE and a classifier share)."""
    return {k: config[k] for k in ENCODER_KEYS if k in config}


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Build ``arch`` (``mae`` | ``classifier`` | ``mil`` | ``resnet`` | ``densenet``) from a stored config.

    ``classifier`` is 2D or native 3D by ``spatial_dims``; ``mil`` is the slice-attention volume classifier
    (:class:`~usfmae_core.networks.volume.AttentionMILClassifier`); CNNs are 2D or 3D by ``spatial_dims``."""
    from usfmae_core.networks.classifier import USFMAEClassifier, cnn_baseline
    from usfmae_core.networks.mae import USFMAE

    if arch == "mae":
        return USFMAE(**{k: config[k] for k in ENCODER_KEYS + DECODER_KEYS if k in config})
    if arch == "classifier":
        return USFMAEClassifier(num_classes=config["num_classes"], pool=config.get("pool", "avg"),
                                dropout=config.get("dropout", 0.0), **encoder_config(config))
    if arch == "mil":
        from usfmae_core.networks.volume import AttentionMILClassifier

        return AttentionMILClassifier(num_classes=config["num_classes"], pool=config.get("pool", "avg"),
                                      dropout=config.get("dropout", 0.0),
                                      attention_hidden=config.get("attention_hidden", 128),
                                      attention_dropout=config.get("attention_dropout", 0.0), **encoder_config(config))
    if arch in ("resnet", "densenet"):
        return cnn_baseline(arch, config["num_classes"], config.get("in_channels", 3), config.get("spatial_dims", 2),
                            config.get("depth"))
    raise UsfmaeError(f"unknown model architecture '{arch}'", "expected mae, classifier, mil, resnet or densenet")
