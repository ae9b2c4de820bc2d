"""Networks: the USF-MAE masked autoencoder, its classifier and model presets."""

from usfmae_core.networks.classifier import USFMAEClassifier, cnn_baseline
from usfmae_core.networks.mae import USFMAE, MAEDecoder, ViTEncoder, patchify, unpatchify
from usfmae_core.networks.presets import PRESETS, build_model, mae_config

__all__ = ["USFMAE", "USFMAEClassifier", "ViTEncoder", "MAEDecoder", "PRESETS", "build_model", "cnn_baseline",
           "mae_config", "patchify", "unpatchify"]
