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
import tempfile
from pathlib import Path
from typing import Any

from usfmae_core.errors import UsfmaeError
from usfmae_core.fileio import fsync_dir

__all__ = ["export_bundle", "is_bundle", "load_bundle", "template_dir"]

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
        # a bundle without the geometry / colour keys (exported before they existed) keeps the rules it was
        # trained with: Preprocessing.from_dict fills them with the legacy values
        prep = Preprocessing.from_dict({
            "image_size": int(parser.get_parsed_content("image_size")),
            "in_channels": int(parser.get_parsed_content("in_channels")),
            "mean": [float(v) for v in parser.get_parsed_content("intensity_mean")],
            "std": [float(v) for v in parser.get_parsed_content("intensity_std")],
            **{k: parser.get_parsed_content(k) for k in ("resize", "crop_sector", "colour") if k in parser}})
    except UsfmaeError:
        raise
    except Exception as err:  # noqa: BLE001 - a bundle of another layout: say which key, not MONAI's traceback
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


# ------------------------------------------------------------------------------------------------------ export
# what a fine-tuned classifier bundle holds (pretraining needs a corpus and an MAE, not this model)
_EXPORT_CONFIGS = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf")
_METRIC_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro", "precision_macro", "recall_macro")
_RUN_KEYS = ("init", "epochs", "batch_size", "blr", "warmup_epochs", "label_smoothing", "drop_path", "dropout",
             "linear_probe", "augment", "balanced_loss", "balanced_sampler", "label_fraction", "precision", "seed")
_URL_PLACEHOLDER = "https://REPLACE-WITH-THE-RELEASE-URL.invalid/{name}/{version}/{file}"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise UsfmaeError(f"cannot read {path} ({str(err).splitlines()[0][:100]})",
                          "pass the folder of a finished usfmae finetune run") from None


def _scalar(v: Any) -> int:
    return int(v[-1] if isinstance(v, (list, tuple)) else v)


def _network_args(config: dict[str, Any]) -> dict[str, Any]:
    """``network_def`` arguments (besides classes / size / channels, which come from the metadata)."""
    return {"patch_size": _scalar(config["patch_size"]), "hidden_size": int(config["hidden_size"]),
            "num_layers": int(config["num_layers"]), "num_heads": int(config["num_heads"]),
            "mlp_ratio": float(config.get("mlp_ratio", 4.0)), "qkv_bias": bool(config.get("qkv_bias", True)),
            "pool": str(config.get("pool", "avg"))}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _model_card(meta: dict[str, Any], run: Path, config: dict[str, Any], result: dict[str, Any],
                run_args: dict[str, Any], name: str, image_size: int, has_ts: bool) -> str:
    """The bundle's docs/README.md, generated from the run."""
    from usfmae_core.data.transforms import Preprocessing

    classes = [str(c) for c in config["classes"]]
    test = result["test"]
    hp = result.get("hyperparameters", {})
    prep = config["preprocessing"]
    net = _network_args(config)
    n_img = result.get("num_images", {})
    init = run_args.get("init")
    start = f"the MAE `{Path(str(init)).name}`" if init else "scratch (no pretrained MAE)"
    rows = "\n".join(f"| {k} | {_fmt(test[k])} |" for k in _METRIC_KEYS if k in test)
    per_class = "\n".join(f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | "
                          f"{_fmt(v['auc'])} | {v['support']} |" for c, v in test.get("per_class", {}).items())
    cm = test.get("confusion_matrix") or []
    cm_rows = "\n".join(f"| **{classes[i]}** | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(cm))
    settings = {**{k: v for k, v in run_args.items() if k in _RUN_KEYS and v not in (None, False)}, **hp}
    if "init" in settings:  # the file's name (or published name), not a path on the author's machine
        settings["init"] = Path(str(settings["init"])).name
    hp_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in settings.items() if not isinstance(v, (dict, list)))
    version = meta["version"]
    return f"""# {meta["name"]}

A MONAI bundle exported by `usfmae export-bundle` (usfmae {meta["required_packages_version"].get("usfmae", "")}) from
the fine-tuning run `{run.name}`. Bundle version {version}.

## Model Overview
{meta["description"]}

Classes (network output order): {", ".join(f"{i}: {c}" for i, c in enumerate(classes))}.

## Data
{meta["data_source"]}

Images used by the run: {", ".join(f"{s} {n}" for s, n in n_img.items())} (split by class and group, duplicates
removed; the split is in the run's `datalist.json`). See `docs/data_license.txt` for the data's licence.

## Training
Fine-tuned with `usfmae finetune` from {start}: ViT encoder {net["hidden_size"]} wide, {net["num_layers"]} blocks,
{net["num_heads"]} heads, patch {net["patch_size"]}, {image_size} x {image_size} px input, `{net["pool"]}` pooling,
linear head; best validation macro-F1 at epoch {result.get("best_epoch")} of {result.get("epochs_run")}.

| hyperparameter | value |
| --- | --- |
{hp_rows}

## Input and output
- Input `image`: `(B, {prep["in_channels"]}, {image_size}, {image_size})` float32. Each frame is scaled to [0, 1]
  (robust min-max); {Preprocessing.from_dict(prep).describe()}; normalised with mean {prep["mean"]} and std
  {prep["std"]} (`usfmae_core.data.transforms`, rules stored as `resize`, `crop_sector`, `colour` in
  `configs/inference.json`).
  `configs/inference.json` takes 2D images, cine clips and 3D volumes (DICOM, NIfTI, NRRD, MHA, PNG, JPEG, TIFF,
  video): every frame / slice is classified and the probabilities are averaged per file.
- Output `pred`: `(B, {len(classes)})` logits; inference writes softmax probabilities per file to
  `eval/predictions.csv` and `eval/predictions.json`.

## Performance
On the run's held-out test split ({test.get("n")} images, never used for training or model selection):

| metric | value |
| --- | --- |
{rows}

| class | precision | recall | F1 | AUC | images |
| --- | --- | --- | --- | --- | --- |
{per_class}

Confusion matrix (rows: true class, columns: predicted, in class order):

| | {" | ".join(classes)} |
| --- | {" | ".join("---" for _ in classes)} |
{cm_rows}

These figures come from one split of one dataset. Validate on your own data, split by patient, before relying on
the model.

## How to use
```bash
pip install usfmae            # the engine these configs call (PyTorch, MONAI, readers); GPU users: torch first
python -m monai.bundle download_large_files --bundle_path {name}   # the weights (large_files.yml; sha256-checked)
cd {name}
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/scans      # classify
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" \\
    --dataset_dir /data/labelled                                                               # evaluate
python -m monai.bundle run --config_file configs/train.json --dataset_dir /data/labelled      # fine-tune further
usfmae predict {name} scan.dcm volume.nii.gz --out predictions     # the usfmae CLI takes the bundle folder
```
The 3D Slicer module (USFMAE) imports the bundle folder as a model. `models/model.ts` is the TorchScript export
({"included" if has_ts else "not included"}; `python -m monai.bundle ckpt_export` rewrites it).

TensorRT: not supported and not tested (the ViT's attention has not been converted or validated with TensorRT).

## Limitations
Research software, not a medical device; not validated for clinical use. The model inherits the biases of its
training data (scanner, probe, site, population); performance on other data can be much lower.

## References
{chr(10).join(f"- {r}" for r in meta.get("references", []))}

## License
The configs and code of this bundle: Apache License 2.0 (`LICENSE`). The weights were trained on the data named
above, under its licence (`docs/data_license.txt`); the USF-MAE pretrained weights, when used as the starting point,
are published by their authors under the MIT licence.
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_into_place(staged: Path, final: Path) -> None:
    """Rename the complete bundle ``staged`` to ``final``; an earlier bundle there is moved aside first and deleted
    only once the new one is in place."""
    import shutil

    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name[:40]}.", suffix=".old", dir=final.parent))
        os.replace(final, old / "bundle")
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, data_source: str,
                  intended_use: str | None = None, name: str | None = None, version: str = "1.0.0",
                  title: str | None = None, authors: str | None = None, data_license: str | None = None,
                  changelog: str | None = None, torchscript: bool = True, force: bool = False,
                  log: Any = print) -> Path:
    """Write the fine-tuned classifier of ``run`` (a ``usfmae finetune`` folder: ``model.pt``, ``metrics.json``,
    ``config.json``) as a complete MONAI bundle in ``out``.

    The bundle is the ``usf_mae`` template with the run filled in: ``network_def`` arguments and preprocessing in
    the configs, classes / image size / channels in ``network_data_format``, the run's test metrics as
    ``eval_metrics``, ``data_source`` / ``intended_use`` from the arguments, ``version`` / ``changelog``,
    ``models/model.pt`` (plain state dict) and ``models/model.ts`` (``monai.bundle.ckpt_export``), a generated model
    card (``docs/README.md``) and ``large_files.yml`` with each weight file's sha256 and a URL to fill in at upload.

    Raises:
        UsfmaeError: not a finished run of a 2D ViT classifier with test metrics, an empty ``data_source``, or an
            ``out`` that exists and is not empty (without ``force``).
    """
    import datetime
    import hashlib
    import shutil

    import monai
    import torch
    import yaml

    from usfmae_core import __version__
    from usfmae_core.bundle_support import check_weights, save_state_dict, write_json_file, write_network_format
    from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.presets import build_model

    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not (run / "model.pt").is_file():
        raise UsfmaeError(f"{run} has no model.pt", "pass the folder of a finished usfmae finetune run")
    from usfmae_core.runs import lock_holder, read_run

    record = read_run(run)
    if lock_holder(run) is not None or (record is not None and record.get("status") not in (None, "finished")):
        raise UsfmaeError(f"{run} holds an unfinished {record.get('command', 'usfmae') if record else 'usfmae'} run "
                          "(its model.pt is the best so far, its metrics.json missing or older)",
                          "finish it first (usfmae finetune ... --resume), then export it")
    if not data_source or not data_source.strip():
        raise UsfmaeError("no data source given", "say which data trained the model with --data-source "
                          "(name, citation, licence)")
    ckpt = load_checkpoint(run / "model.pt")
    config = ckpt["config"]
    if ckpt["arch"] != "classifier" or int(config.get("spatial_dims", 2)) != 2:
        raise UsfmaeError(f"{run}/model.pt is a '{ckpt['arch']}' model ({config.get('spatial_dims', 2)}D)",
                          "export-bundle writes 2D ViT classifiers (usfmae finetune without --arch / --volume-model)")
    result = _read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    if "test" not in result:
        raise UsfmaeError(f"{run}/metrics.json has no test metrics",
                          "fine-tune with a test split (--test-fraction > 0) so the bundle can report them")
    run_args = _read_json(run / "config.json") if (run / "config.json").is_file() else {}
    if out.is_file():
        raise UsfmaeError(f"--out {out} is a file", "choose a folder path for the bundle")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not force:
        raise UsfmaeError(f"{out} exists and is not empty", "choose a new --out folder or pass --force")
    if replace and not (out / "configs" / "metadata.json").is_file():
        # --force replaces an earlier bundle, never a folder of other files (it would delete them all)
        raise UsfmaeError(f"{out} is not empty and holds no MONAI bundle (no configs/metadata.json), so --force "
                          "would delete other files", "choose a new or empty --out folder")
    classes = [str(c) for c in config["classes"]]
    prep = config["preprocessing"]
    image_size, in_channels = int(prep["image_size"]), int(prep["in_channels"])
    name = name or out.name
    # written into a hidden folder beside --out, renamed into place once complete: a failure (full disk, kill) leaves
    # neither a half bundle in --out nor, with --force, the loss of the previous bundle
    out.parent.mkdir(parents=True, exist_ok=True)
    final = out
    try:
        out = Path(tempfile.mkdtemp(prefix=f".{final.name[:40]}.", suffix=".partial", dir=final.parent))
    except OSError as err:  # name the folder the user asked for, not the temporary one
        raise OSError(err.errno, err.strerror, str(final)) from None
    try:
        os.chmod(out, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        template = template_dir()
        (out / "configs").mkdir()
        (out / "models").mkdir()
        (out / "docs").mkdir()
        shutil.copy(template / "LICENSE", out / "LICENSE")
        for cfg in _EXPORT_CONFIGS:
            shutil.copy(template / "configs" / cfg, out / "configs" / cfg)
        net_args = _network_args(config)
        for cfg in ("train.json", "inference.json"):
            path = out / "configs" / cfg
            doc = _read_json(path)
            doc["network_def"].update(net_args)
            if cfg == "train.json":
                doc["network_def"]["dropout"] = float(config.get("dropout", 0.0))
            doc["intensity_mean"] = [float(v) for v in prep["mean"]]
            doc["intensity_std"] = [float(v) for v in prep["std"]]
            rules = Preprocessing.from_dict(prep)  # the run's geometry / colour rules (legacy ones for old runs)
            doc["resize"], doc["crop_sector"], doc["colour"] = rules.resize, rules.crop_sector, rules.colour
            write_json_file(path, doc)

        meta = _read_json(template / "configs" / "metadata.json")
        meta.pop("mae_data_format", None)
        test = result["test"]
        today = datetime.date.today().isoformat()
        meta["version"] = str(version)
        meta["changelog"] = {str(version): changelog or f"exported by usfmae export-bundle from the fine-tuning run "
                             f"'{run.name}' on {today}"}
        meta["monai_version"] = monai.__version__
        meta["pytorch_version"] = torch.__version__.split("+")[0]
        meta["required_packages_version"] = {**meta.get("required_packages_version", {}), "usfmae": __version__}
        meta["name"] = title or f"USF-MAE ultrasound classifier ({', '.join(classes)})"
        meta["task"] = f"Ultrasound image classification into {len(classes)} classes: {', '.join(classes)}"
        init = run_args.get("init")
        meta["description"] = (
            f"A ViT classifier (width {net_args['hidden_size']}, {net_args['num_layers']} blocks, patch "
            f"{net_args['patch_size']}, {image_size} px) fine-tuned with the usfmae toolkit "
            f"{'from the masked autoencoder ' + Path(str(init)).name if init else 'from scratch'} "
            f"on {data_source.strip()}. "
            "configs/inference.json classifies 2D images, cine clips and 3D volumes (frame / slice probabilities "
            "averaged per file); configs/train.json and configs/evaluate.json fine-tune and evaluate it on new data.")
        meta["data_source"] = data_source.strip()
        meta["label_classes"] = ", ".join(f"{i}: {c}" for i, c in enumerate(classes))
        meta["image_classes"] = (f"B-mode intensity: each frame scaled to [0, 1] (robust min-max); "
                                 f"{Preprocessing.from_dict(prep).describe()}; normalised with "
                                 f"mean {list(prep['mean'])} and std {list(prep['std'])}")
        meta["eval_metrics"] = {f"test_{k}": round(float(test[k]), 4) for k in _METRIC_KEYS
                                if k in test and test[k] == test[k]}
        meta["eval_metrics"]["test_images"] = int(test.get("n", 0))
        meta["intended_use"] = (intended_use or "Research only: classification of ultrasound images of the kind it "
                                "was trained on. Not a medical device; not validated for clinical use.").strip()
        if authors:
            meta["authors"] = authors
            meta["copyright"] = f"Copyright (c) {datetime.date.today().year} {authors}"
        # put eval_metrics before intended_use, as the Model Zoo's bundles order them
        ordered = {k: meta[k] for k in meta if k not in ("eval_metrics", "intended_use")}
        meta = {**{k: v for k, v in ordered.items() if k != "references" and k != "network_data_format"},
                "eval_metrics": meta["eval_metrics"], "intended_use": meta["intended_use"],
                "references": meta.get("references", []), "network_data_format": meta["network_data_format"]}
        meta_path = write_json_file(out / "configs" / "metadata.json", meta)
        write_network_format(meta_path, classes, image_size, in_channels)

        # weights: a plain state dict that MONAI's strict CheckpointLoader and ckpt_export take
        model = build_model("classifier", config)
        model.load_state_dict(adapt_state_dict(ckpt["model"], model.state_dict(), source=str(run / "model.pt")))
        save_state_dict(model, out / "models" / "model.pt")
        loaded = load_bundle(out)  # the bundle's own network_def must take the weights
        check_weights(out / "models" / "model.pt", build_model("classifier", loaded["config"]))
        files = ["models/model.pt"]
        if torchscript:
            from monai.bundle import ckpt_export

            ckpt_export(net_id="network_def", filepath=str(out / "models" / "model.ts"),
                        ckpt_file=str(out / "models" / "model.pt"), meta_file=str(meta_path),
                        config_file=str(out / "configs" / "inference.json"), bundle_root=str(out))
            files.append("models/model.ts")

        def sha256(path: Path) -> str:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()

        large = {"large_files": [{"path": f, "url": _URL_PLACEHOLDER.format(name=name, version=version,
                                                                              file=Path(f).name),
                                  "hash_val": sha256(out / f), "hash_type": "sha256"} for f in files]}
        (out / "large_files.yml").write_text(
            "# The weights of this bundle. Before sharing: upload each file (a GitHub release asset or another stable\n"
            "# public URL) and replace its url; keep hash_val (sha256 of the file written by usfmae export-bundle).\n"
            "# Fetch with: python -m monai.bundle download_large_files --bundle_path .\n"
            + yaml.safe_dump(large, sort_keys=False))
        (out / "docs" / "README.md").write_text(
            _model_card(meta, run, config, result, run_args, name, image_size, torchscript))
        (out / "docs" / "data_license.txt").write_text(
            "Third Party Licenses\n" + "-" * 71 + "\n\n" + "Data that trained the weights of this bundle:\n"
            + f"{data_source.strip()}\n\nLicence of that data: "
            + f"{(data_license or 'see the data source above').strip()}\n")
        if (run / "curves.png").is_file():
            shutil.copy(run / "curves.png", out / "docs" / "curves.png")
    except BaseException as err:
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):  # name the file as the user will look for it: in --out, not the hidden folder
            names = [str(n).replace(str(out), str(final)) if n is not None else None
                     for n in (err.filename, err.filename2)]
            if names != [err.filename, err.filename2]:
                raise OSError(err.errno, err.strerror, names[0], None, names[1]) from err
        raise
    _swap_into_place(out, final)

    out = final
    log(f"exported {run} -> {out}: {len(classes)} classes ({', '.join(classes)}), {image_size} px, "
        f"test macro-F1 {test.get('f1_macro', float('nan')):.3f}; fill in the URLs in {out / 'large_files.yml'} "
        "when you upload the weights")
    return out
