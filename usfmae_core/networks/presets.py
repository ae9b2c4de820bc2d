"""Model sizes by name, and building models from the plain-typed config stored in checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from usfmae_core.errors import UsfmaeError

if TYPE_CHECKING:  # torch stays out of the CLI's start-up (preset names are read by `usfmae --help`)
    from torch import nn

# Encoder and decoder shapes. The paper's model is ``vit_base`` (ViT-B/16, decoder 512 wide, 8 blocks).
# ``vit_micro`` and ``vit_test`` are for CPU demos and tests; their widths divide by 4 and 6 (2D and 3D sin-cos).
PRESETS: dict[str, dict[str, Any]] = {
    "vit_test": {"hidden_size": 48, "num_layers": 2, "num_heads": 3,
                 "decoder_hidden_size": 48, "decoder_num_layers": 1, "decoder_num_heads": 3},
    "vit_micro": {"hidden_size": 96, "num_layers": 4, "num_heads": 3,
                  "decoder_hidden_size": 96, "decoder_num_layers": 2, "decoder_num_heads": 3},
    "vit_tiny": {"hidden_size": 192, "num_layers": 12, "num_heads": 3,
                 "decoder_hidden_size": 512, "decoder_num_layers": 8, "decoder_num_heads": 16},
    "vit_small": {"hidden_size": 384, "num_layers": 12, "num_heads": 6,
                  "decoder_hidden_size": 512, "decoder_num_layers": 8, "decoder_num_heads": 16},
    "vit_base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12,
                 "decoder_hidden_size": 512, "decoder_num_layers": 8, "decoder_num_heads": 16},
    "vit_large": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16,
                  "decoder_hidden_size": 512, "decoder_num_layers": 8, "decoder_num_heads": 16},
}

ENCODER_KEYS = ("in_channels", "img_size", "patch_size", "spatial_dims", "hidden_size", "num_layers", "num_heads",
                "mlp_ratio", "qkv_bias", "drop_path_rate")
DECODER_KEYS = ("decoder_hidden_size", "decoder_num_layers", "decoder_num_heads", "mask_ratio", "norm_pix_loss",
                "decoder_mlp_ratio")


def mae_config(preset: str = "vit_base", **overrides: Any) -> dict[str, Any]:
    """Plain-typed keyword arguments of :class:`~usfmae_core.networks.mae.USFMAE` for ``preset`` plus overrides."""
    if preset not in PRESETS:
        raise UsfmaeError(f"unknown model preset '{preset}'", f"choose one of {', '.join(PRESETS)}")
    cfg: dict[str, Any] = {"in_channels": 3, "img_size": 224, "patch_size": 16, "spatial_dims": 2, "mlp_ratio": 4.0,
                           "qkv_bias": True, "drop_path_rate": 0.0, "mask_ratio": 0.75, "norm_pix_loss": False}
    cfg.update(PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def encoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of a model config (what an MAE and a classifier share)."""
    return {k: config[k] for k in ENCODER_KEYS if k in config}


def _per_axis(value: Any, dims: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * dims
    return [int(v) for v in values]


def check_model_config(config: dict[str, Any], arch: str = "mae") -> None:
    """Refuse shapes that cannot build a model, with one line naming the values and the options that set them.

    The one place for cross-argument checks of the model (the CLI commands, the bundle and the Slicer module all
    build models through :func:`build_model`): image size a multiple of the patch size (and not smaller), encoder and
    decoder widths divisible by their head counts, positive sizes, and the normalisation
    (:func:`check_normalisation`) of ``config["preprocessing"]`` when present.

    Raises:
        UsfmaeError: the first problem found.
    """
    if arch in ("mae", "classifier", "mil"):
        dims = int(config.get("spatial_dims", 2))
        if dims not in (2, 3):
            raise UsfmaeError(f"spatial dims must be 2 or 3, got {dims}", "use --spatial-dims 2 or 3")
        try:
            size = _per_axis(config.get("img_size", 224), dims)
            patch = _per_axis(config.get("patch_size", 16), dims)
        except (TypeError, ValueError):
            raise UsfmaeError(f"image size {config.get('img_size')!r} / patch size {config.get('patch_size')!r} are "
                              "not whole numbers", "pass integers (--image-size, --patch-size)") from None
        if len(size) != dims or len(patch) != dims:
            raise UsfmaeError(f"image size {size} / patch size {patch} do not have {dims} entries for a {dims}D model",
                              "give one value per axis, or a single value")
        if min(size) < 1 or min(patch) < 1:
            raise UsfmaeError(f"image size {size} and patch size {patch} must be positive", "pass positive sizes")
        for s, p in zip(size, patch, strict=True):
            if s < p or s % p:
                raise UsfmaeError(f"image size {s} is not a multiple of the patch size {p}",
                                  f"choose an image size divisible by {p} (e.g. {max(p, s - s % p)} or "
                                  f"{s - s % p + p}; --image-size), or another --patch-size")
        for width_key, heads_key, what in (("hidden_size", "num_heads", "encoder"),
                                           ("decoder_hidden_size", "decoder_num_heads", "decoder")):
            if width_key not in config or heads_key not in config:
                continue
            width, heads = int(config[width_key]), int(config[heads_key])
            if width < 1 or heads < 1 or width % heads:
                flag = "--decoder-num-heads" if what == "decoder" else "--num-heads"
                raise UsfmaeError(f"the {what} width {width} is not divisible by its {heads} attention heads",
                                  f"choose a head count that divides {width} ({flag}), or another preset")
    for key in ("num_classes",):
        if key in config and int(config[key]) < 1:
            raise UsfmaeError(f"{key} must be at least 1, got {config[key]}", "give at least 2 classes")
    prep = config.get("preprocessing")
    if isinstance(prep, dict):
        check_normalisation(prep.get("mean", (0.0,)), prep.get("std", (1.0,)),
                            int(prep.get("in_channels", config.get("in_channels", 3))))


def check_normalisation(mean: Any, std: Any, in_channels: int) -> None:
    """``mean`` / ``std``: 1 value, one per input channel, or 3 for a grey model (the ImageNet defaults, averaged);
    finite; std > 0.

    Raises:
        UsfmaeError: naming the values and ``--mean`` / ``--std``.
    """
    import math

    for name, values in (("mean", mean), ("std", std)):
        try:
            vals = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
        except (TypeError, ValueError):
            raise UsfmaeError(f"--{name} {values!r} is not a list of numbers", f"pass numbers to --{name}") from None
        if len(vals) not in (1, in_channels) and not (in_channels == 1 and len(vals) == 3):
            raise UsfmaeError(f"--{name} has {len(vals)} values but the model has {in_channels} input channel(s)",
                              f"give 1 value or {in_channels} (one per channel) to --{name}")
        if not all(math.isfinite(v) for v in vals) or (name == "std" and min(vals) <= 0):
            raise UsfmaeError(f"--{name} {' '.join(f'{v:g}' for v in vals)} is invalid",
                              f"--{name} values must be finite{' and > 0' if name == 'std' else ''}")


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Build ``arch`` (``mae`` | ``classifier`` | ``mil`` | ``resnet`` | ``densenet``) from a stored config.

    ``classifier`` is 2D or native 3D by ``spatial_dims``; ``mil`` is the slice-attention volume classifier
    (:class:`~usfmae_core.networks.volume.AttentionMILClassifier`); CNNs are 2D or 3D by ``spatial_dims``.
    The config is checked first by :func:`check_model_config`."""
    from usfmae_core.networks.classifier import USFMAEClassifier, cnn_baseline
    from usfmae_core.networks.mae import USFMAE

    check_model_config(config, arch)
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
