"""MONAI bundles as models: read a bundle folder as one of our checkpoints, and write a fine-tuned run as a bundle.

- :func:`load_bundle`: a bundle folder (``configs/inference.json`` + ``configs/metadata.json`` + ``models/model.pt``,
  e.g. one downloaded from the Model Zoo or written by :func:`export_bundle`) -> our checkpoint dict, so that
  ``usfmae predict / evaluate / embed``, the Slicer module and :func:`usfmae_core.checkpoints.load_model` take a
  bundle wherever they take a checkpoint. The network is built by MONAI's ``ConfigParser`` from the bundle's own
  ``network_def``, exactly as ``python -m monai.bundle run`` builds it.
- :func:`template_dir`: the bundle ``bundles/usf_mae`` (shipped inside the wheel as ``usfmae_core.bundle_template``).
- :func:`export_bundle`: a fine-tuned run folder (``usfmae finetune`` or the Slicer module) -> a complete, shareable
  bundle (``usfmae export-bundle``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from usfmae_core.errors import UsfmaeError

__all__ = ["template_dir", "is_bundle", "load_bundle"]

logger = logging.getLogger("usfmae.bundle")


def template_dir() -> Path:
    """The ``usf_mae`` bundle that exports start from: inside the installed wheel, else ``bundles/usf_mae`` of the
    source checkout this package runs from (editable installs, the Slicer module)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bundle_template", here.parent / "bundles" / "usf_mae"):
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate
    raise UsfmaeError("the usf_mae bundle template is missing from this installation",
                      "reinstall usfmae (pip install --force-reinstall usfmae) or run from a source checkout")


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a MONAI bundle folder (it has ``configs/metadata.json``)."""
    return (Path(path) / "configs" / "metadata.json").is_file()


def _inference_config(bundle: Path) -> Path:
    for ext in ("json", "yaml", "yml"):
        cfg = bundle / "configs" / f"inference.{ext}"
        if cfg.is_file():
            return cfg
    raise UsfmaeError(f"bundle {bundle} has no configs/inference.json", "pass a bundle with an inference config")


def load_bundle(path: str | os.PathLike, weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Our checkpoint dict (``model``, ``arch``, ``config`` with ``classes`` and ``preprocessing``, ``meta``) of the
    classifier in bundle folder ``path``.

    The network comes from the bundle's ``network_def`` (inference config + metadata, as MONAI builds it), the
    classes from ``network_data_format``, the preprocessing from the config's ``image_size`` / ``in_channels`` /
    ``intensity_mean`` / ``intensity_std``, the weights from ``weights`` (default ``models/model.pt``).

    Raises:
        UsfmaeError: no bundle, no weights, weights that do not fit, or a network that is not a USF-MAE ViT
            classifier.
    """
    import torch
    from monai.bundle import ConfigParser

    from usfmae_core.bundle_support import check_weights, classifier_config, metadata_classes
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.classifier import USFMAEClassifier

    bundle = Path(path).expanduser().resolve()
    if not is_bundle(bundle):
        raise UsfmaeError(f"{bundle} is not a MONAI bundle (no configs/metadata.json)",
                          "pass a bundle folder, e.g. one written by usfmae export-bundle")
    parser = ConfigParser()
    parser.read_config(str(_inference_config(bundle)))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    try:
        network = parser.get_parsed_content("network_def")
        classes = metadata_classes(parser.get_parsed_content("_meta_#network_data_format"))
        prep = Preprocessing(int(parser.get_parsed_content("image_size")),
                             int(parser.get_parsed_content("in_channels")),
                             tuple(float(v) for v in parser.get_parsed_content("intensity_mean")),
                             tuple(float(v) for v in parser.get_parsed_content("intensity_std")))
    except UsfmaeError:
        raise
    except Exception as err:  # a bundle of another layout: say which key, not MONAI's traceback
        raise UsfmaeError(f"cannot build the network of bundle {bundle} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''})",
                          "usfmae reads bundles with network_def, image_size, in_channels, intensity_mean and "
                          "intensity_std in configs/inference.json (as usfmae export-bundle writes them)") from None
    if not isinstance(network, USFMAEClassifier):
        raise UsfmaeError(f"bundle {bundle} holds a {type(network).__name__}, not a USF-MAE ViT classifier",
                          "run it with python -m monai.bundle run --config_file configs/inference.json")
    weights_path = check_weights(Path(weights) if weights else bundle / "models" / "model.pt", network)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    meta = parser.get("_meta_", {}) or {}
    return {"model": dict(state), "arch": "classifier", "config": classifier_config(network, classes, prep),
            "usfmae_version": str(meta.get("required_packages_version", {}).get("usfmae", "")),
            "meta": {"bundle": str(bundle), "bundle_name": str(meta.get("name", bundle.name)),
                     "bundle_version": str(meta.get("version", "")), "weights": str(weights_path)}}
