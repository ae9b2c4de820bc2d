"""MONAI-engine pieces for the MONAI bundle (``bundles/usf_mae``) that the workflows do not expose as MONAI objects.

The bundle's configs only wire engine code together; whatever they need beyond the workflows' public API lives here,
so no logic hides in JSON:

- data: :class:`CorpusDataset` (a MONAI ``Dataset`` over a prepared pretraining corpus, ``data`` = the corpus folder),
  :func:`split_items` / :func:`evaluation_items` (labelled datalists -> MONAI items), :func:`inference_items`
  (files / folders / datalist JSON -> items), :class:`UltrasoundToFramesd` (every frame / slice of an image, cine or
  volume as model input ``(N, C, S, S)``), :func:`cache_rate`;
- inference: :class:`FrameAveragingInferer` (softmax per frame, mean over frames: what ``usfmae predict`` does),
  :func:`prepare_batch` (MetaTensor-free batches for the engines);
- models: :func:`training_settings` / :func:`read_model_config` (``models/model_config.json``, written by
  ``train.json`` and read by ``evaluate.json`` / ``inference.json``), :func:`classifier_from_settings`,
  :func:`load_weights` / :class:`WeightsLoader` (plain state dicts or our checkpoints, adapted across MONAI versions
  with :func:`~usfmae_core.checkpoints.adapt_state_dict`);
- training: :func:`macro_f1` (ignite metric), :func:`cosine_schedule` (per-step warm-up + cosine, keeping layer-wise
  lr scales), :func:`use_amp` / :func:`amp_kwargs`, :func:`is_not_rank0`;
- handlers: :class:`SaveUsfmaeCheckpoint` (our checkpoint format, for ``usfmae`` / Slicer), :class:`ProbabilityWriter`
  (per-image class probabilities as CSV + JSON; with labels, ``usfmae evaluate``'s metrics and files),
  :class:`ProgressHandler` (the engine's progress bar / ``USFMAE_PROGRESS`` lines).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, apply_transform

from usfmae_core.errors import UsfmaeError

__all__ = ["one_line_errors", "SkipUnreadabled", "read_weights", "CorpusDataset", "split_items", "evaluation_items",
           "inference_items", "cache_rate", "check_batches",
           "UltrasoundToFramesd", "FrameAveragingInferer", "prepare_batch", "training_settings", "read_model_config",
           "classifier_from_settings", "load_weights", "save_state_dict", "WeightsLoader", "macro_f1",
           "cosine_schedule", "use_amp", "amp_kwargs", "is_not_rank0", "prepare_process", "with_iteration_events",
           "SaveUsfmaeCheckpoint", "ProbabilityWriter", "ProgressHandler"]

logger = logging.getLogger("usfmae.bundle")


# ------------------------------------------------------------------------------------------------- errors
class _UserErrorLogFilter(logging.Filter):
    """Drops the traceback logs of user errors (MONAI's ``StatsHandler`` logs every exception of an engine run with
    its traceback before re-raising it); the error is then printed as one line by :func:`one_line_errors`."""

    def filter(self, record: logging.LogRecord) -> bool:
        from usfmae_core.errors import user_error_message

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and user_error_message(exc) is not None:
            return False
        # ignite's "Engine run is terminating due to exception: ..." repeats the error that follows
        return not (record.name.startswith("ignite.engine") and "terminating due to exception" in record.getMessage())


def one_line_errors() -> bool:
    """Make a bundle run end like the ``usfmae`` CLI on bad input: one line ``usfmae: error: <cause>; <fix>`` on
    stderr and exit code 2, instead of a traceback with the cause in the middle.

    Call it first in a config's ``initialize`` (``"$usfmae_core.bundle_support.one_line_errors()"``): it installs a
    ``sys.excepthook`` for errors caused by the input or the machine (:func:`usfmae_core.errors.user_error_message`:
    :class:`~usfmae_core.errors.UsfmaeError` also when MONAI wrapped it, OS errors such as a full disk, out of
    memory) and a logging filter that keeps their tracebacks out of the engine's log. Anything else (a bug) keeps
    its full traceback. Idempotent; returns True.
    """
    import sys

    if not getattr(sys.excepthook, "_usfmae_one_line", False):
        previous = sys.excepthook

        def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
            from usfmae_core.errors import user_error_message

            message = user_error_message(exc) if isinstance(exc, Exception) else None
            if message is None:
                previous(exc_type, exc, tb)
                return
            for h in logging.getLogger().handlers:
                try:
                    h.flush()
                except Exception:  # noqa: BLE001 - a broken log handler must not hide the message
                    pass
            sys.stdout.flush()
            sys.stderr.write(f"usfmae: error: {message}\n")
            sys.stderr.flush()
            os._exit(2)  # the CLI's exit code for bad input (an uncaught exception would give 1)

        hook._usfmae_one_line = True  # type: ignore[attr-defined]
        sys.excepthook = hook
    from monai.apps.utils import get_logger

    flt = _UserErrorLogFilter()
    # MONAI's StatsHandler logs to its own logger (created on first use, with its own handler, not propagating):
    # create it now exactly as MONAI does, so it can carry the filter
    stats = get_logger("monai.handlers.StatsHandler")
    for lg in (logging.getLogger(), stats):
        for h in lg.handlers:
            if not any(isinstance(f, _UserErrorLogFilter) for f in h.filters):
                h.addFilter(flt)
        if not any(isinstance(f, _UserErrorLogFilter) for f in lg.filters):
            lg.addFilter(flt)
    return True


# ------------------------------------------------------------------------------------------------------- data
class CorpusDataset(Dataset):
    """A prepared pretraining corpus (``usfmae prepare``) as a MONAI ``Dataset`` of uint8 frames ``(S, S)``.

    ``__getitems__`` reads a whole batch with one memory-mapped read per shard (as
    :class:`~usfmae_core.data.datasets.CorpusFrameDataset` does), so collate with
    :func:`~usfmae_core.data.datasets.collate_uint8` and augment on the device (``MAEBatchAugment``).

    Args:
        data: the corpus folder (the bundle's ``dataset_dir``), or an opened ``FrameCorpus`` / ``VolumeCorpus``.
        transform: optional transform per item (None keeps the fast batched read).
        spatial_dims: 2 for frames, 3 for the ``--native-3d`` volumes ``(V, V, V)``.
    """

    def __init__(self, data: str | os.PathLike | Any, transform: Callable | None = None, spatial_dims: int = 2
                 ) -> None:
        from usfmae_core.data.corpus import FrameCorpus, VolumeCorpus

        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            native = " --native-3d" if spatial_dims == 3 else ""
            if not path.exists():
                raise UsfmaeError(f"corpus {path} does not exist",
                                  f"prepare one with `usfmae prepare SRC...{native} --out {path}` and pass it as "
                                  "--dataset_dir")
            if not path.is_dir():
                raise UsfmaeError(f"corpus {path} is not a folder", "pass the folder written by usfmae prepare "
                                  "as --dataset_dir")
            data = VolumeCorpus(path) if spatial_dims == 3 else FrameCorpus(path)
        super().__init__(data=data, transform=transform)

    def _transform(self, index: int) -> Any:
        item = torch.from_numpy(np.array(self.data[index]))
        return apply_transform(self.transform, item) if self.transform is not None else item

    def __getitems__(self, indices: Sequence[int]) -> Any:
        if self.transform is None and hasattr(self.data, "get_batch"):
            return torch.from_numpy(self.data.get_batch(indices))
        return [self._transform(int(i)) for i in indices]


def _plain_item(it: Mapping[str, Any]) -> dict[str, Any]:
    # only what the transforms and the default collate handle (a None group would break collation)
    return {"image": str(it["image"]), "label": int(it["label"])}


def split_items(datalist: Mapping[str, Any], split: str = "training", source: str | os.PathLike | None = None
                ) -> list[dict[str, Any]]:
    """Items ``{"image": path, "label": int}`` of one split (``training|validation|test|all``) of a labelled datalist,
    chosen by :func:`usfmae_core.workflows.evaluate.select_items` (an empty split is refused)."""
    from usfmae_core.workflows.evaluate import select_items

    source = source if source is not None else datalist.get("source", "the labelled data")
    return [_plain_item(it) for it in select_items(dict(datalist), split, str(source))]


def evaluation_items(datalist: Mapping[str, Any], classes: Sequence[str], split: str = "test",
                     source: str | os.PathLike | None = None, model: str | os.PathLike = "the model"
                     ) -> list[dict[str, Any]]:
    """:func:`split_items` with labels re-indexed to the model's ``classes``, matched by name as ``usfmae evaluate``
    does (:func:`usfmae_core.workflows.evaluate.map_labels`: the data must have exactly the model's classes)."""
    from usfmae_core.workflows.evaluate import map_labels

    source = source if source is not None else datalist.get("source", "the labelled data")
    mapping = map_labels(datalist["classes"], classes, str(source), str(model))
    return [{**it, "label": int(mapping[it["label"]])} for it in split_items(datalist, split, source)]


def inference_items(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """Items ``{"image": path}`` for files, folders (recursively, supported files only) or a datalist JSON.

    Uses :func:`usfmae_core.workflows.predict.collect_inputs`; explicit files it cannot use are logged and skipped.
    """
    from usfmae_core.workflows.predict import collect_inputs

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files, skipped = collect_inputs(sources)
    for s in skipped:
        logger.warning("skipped %s: %s", s["source"], s["reason"])
    return [{"image": str(p)} for p in files]


def cache_rate(n_items: int, prep: Any) -> float:
    """Fraction of ``n_items`` preprocessed images to keep in memory (``CacheDataset``), within the fine-tuning
    workflow's memory budget (:data:`usfmae_core.workflows.finetune.CACHE_BYTES`)."""
    from usfmae_core.workflows.finetune import CACHE_BYTES

    per_item = int(prep.in_channels) * int(prep.image_size) ** 2 * 4
    return float(min(1.0, CACHE_BYTES / max(1, per_item * max(1, int(n_items)))))


def check_batches(loader: Any, source: str | os.PathLike) -> int:
    """The number of batches of ``loader``; refuses an empty one (MONAI's engines would silently skip the run).

    Raises:
        UsfmaeError: fewer items than one batch (with ``drop_last``) in this process's share of ``source``.
    """
    n = len(loader)
    if n == 0:
        items = len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
        raise UsfmaeError(f"{source} gives no complete batch: {items} item(s) for this process, batch size "
                          f"{loader.batch_size}", "use a smaller --batch_size (it is per process) or more data")
    return n


class SkipUnreadabled:
    """Apply ``transform`` to an item, but turn a file that cannot be read into a marked, empty item instead of
    ending the run: what ``usfmae predict`` does (skip and report). The item then holds ``image`` = an empty
    MetaTensor ``(0,)`` whose meta has ``filename_or_obj`` and ``unreadable`` (the one-line reason), and
    ``unreadable`` = the reason (``""`` for items read well, so batches collate). :class:`FrameAveragingInferer` gives
    such items no probabilities and :class:`ProbabilityWriter` lists them as skipped.

    Args:
        transform: the loading chain (e.g. ``Compose([LoadUltrasoundd, UltrasoundToFramesd])``).
        key: the key of the file path.
    """

    def __init__(self, transform: Callable, key: str = "image") -> None:
        self.transform, self.key = transform, key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from usfmae_core.errors import find_user_error

        try:
            out = dict(self.transform(data))
        except Exception as err:  # noqa: BLE001 - only bad files are skipped; anything else is re-raised
            user = find_user_error(err)
            if user is None:
                raise
            source = str(data[self.key]) if isinstance(data, Mapping) and self.key in data else "?"
            logger.warning("skipped %s: %s", source, user)
            reason = str(user)
            return {**dict(data), self.key: MetaTensor(torch.zeros(0), meta={
                "filename_or_obj": source, "kind": "unreadable", "unreadable": reason}), "unreadable": reason}
        out.setdefault("unreadable", "")
        return out


class UltrasoundToFramesd(MapTransform):
    """Every frame of a cine / slice of a volume (one frame for a 2D image) as 2D model input ``(N, C, S, S)``.

    Input: channel-first grey ``(1, H, W)`` or ``(1, T|D, H, W)`` from
    :class:`~usfmae_core.data.transforms.LoadUltrasoundd`. Frames come from
    :func:`~usfmae_core.data.transforms.image_to_frames` (volumes sliced along ``axis``, array order D, H, W) and are
    preprocessed by :func:`~usfmae_core.data.transforms.frames_to_tensor`, as ``usfmae predict`` does. The meta dict
    is kept and gains ``n_frames``.
    """

    def __init__(self, keys: KeysCollection, image_size: int = 224, in_channels: int = 3,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 axis: int = 0, allow_missing_keys: bool = False) -> None:
        from usfmae_core.data.transforms import Preprocessing

        super().__init__(keys, allow_missing_keys)
        self.prep = Preprocessing(int(image_size), int(in_channels), tuple(mean), tuple(std))
        self.axis = int(axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from usfmae_core.data.readers import UltrasoundImage
        from usfmae_core.data.transforms import frames_to_tensor, image_to_frames

        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = dict(getattr(x, "meta", {}) or {})
            arr = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float32)
            if arr.ndim in (3, 4) and arr.shape[0] == 1:
                arr = arr[0]  # channel-first grey -> (H, W) / (N, H, W)
            kind = str(meta.get("kind") or ("image" if arr.ndim == 2 else "volume"))
            if arr.ndim == 2:
                kind = "image"
            spacing = tuple(meta.get("spacing") or (1.0,) * arr.ndim)
            frames = image_to_frames(UltrasoundImage(arr, spacing, kind, str(meta.get("filename_or_obj", ""))),
                                     axis=self.axis)
            out = frames_to_tensor(frames, self.prep)
            meta.update(n_frames=int(out.shape[0]), kind=kind)
            d[key] = MetaTensor(out, meta=meta)
        return d


# -------------------------------------------------------------------------------------------------- inference
class FrameAveragingInferer(Inferer):
    """Class probabilities per image: softmax of the network's logits for every frame, averaged over the frames.

    This is :func:`usfmae_core.workflows.predict.classify_array`'s rule for 2D models (a 2D image is one frame).

    Args:
        frame_batch_size: frames per forward pass.

    Shapes: ``(B, N, C, S, S)`` (``N`` frames per image; ``B`` is usually 1 since ``N`` varies) or ``(B, C, S, S)``
    -> probabilities ``(B, K)`` float32.
    """

    def __init__(self, frame_batch_size: int = 32) -> None:
        self.frame_batch_size = max(1, int(frame_batch_size))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
                 ) -> torch.Tensor:
        x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, MetaTensor) else inputs
        if x.numel() == 0:  # unreadable files (SkipUnreadabled): no probabilities, the writer lists them as skipped
            return torch.zeros((x.shape[0], 0))
        if x.dim() == 4:
            x = x[:, None]
        if x.dim() != 5:
            raise ValueError(f"expected (B, N, C, H, W) or (B, C, H, W) input, got shape {tuple(inputs.shape)}")
        out = []
        for frames in x:
            probs = [torch.softmax(network(frames[i:i + self.frame_batch_size], *args, **kwargs).float(), dim=-1)
                     for i in range(0, frames.shape[0], self.frame_batch_size)]
            out.append(torch.cat(probs).mean(dim=0))
        return torch.stack(out)


def prepare_batch(batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prepare_batch`` for MONAI engines: ``(image, label)`` as plain tensors on ``device``.

    Plain tensors (not MetaTensors) keep the ViT's many small operations free of metadata handling; labels become
    ``long`` for the cross-entropy. The engine's ``state.batch`` still holds the MetaTensors (file names for the
    handlers).
    """
    image = batchdata["image"]
    if isinstance(image, MetaTensor):
        image = image.as_subclass(torch.Tensor)
    image = image.to(device=device, non_blocking=non_blocking, **kwargs)
    label = batchdata.get("label")
    if isinstance(label, torch.Tensor):
        label = label.as_subclass(torch.Tensor).long().to(device=device, non_blocking=non_blocking)
    else:
        label = None
    return image, label


# ---------------------------------------------------------------------------------------------------- models
def training_settings(config: Mapping[str, Any], classes: Sequence[str], arch: str = "vit") -> dict[str, Any]:
    """What ``models/model_config.json`` holds: the classifier's checkpoint config (model kwargs, ``preset``,
    ``preprocessing``) plus ``classes``, ``arch`` (``vit|resnet|densenet``) and the flat ``image_size`` /
    ``in_channels`` / ``patch_size`` / ``pool`` that evaluation and inference build the same network from."""
    prep = config["preprocessing"]
    out = dict(config)
    out.update(arch=str(arch), classes=[str(c) for c in classes], image_size=int(prep["image_size"]),
               in_channels=int(prep["in_channels"]))
    patch = config.get("patch_size")
    if patch is not None:
        out["patch_size"] = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)
    out.setdefault("pool", "avg")
    return out


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in ``path`` (``models/model_config.json``), or ``{}`` when there is none."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise UsfmaeError(f"cannot read {path} ({str(err).splitlines()[0][:100]})",
                          "delete it (the bundle then uses the configs' values) or re-run train.json") from None


_MATCH_KEYS = ("arch", "preset", "image_size", "in_channels", "classes")
_VIT_KEYS = ("patch_size", "pool")


def classifier_from_settings(trained: Mapping[str, Any], classes: Sequence[str], arch: str = "vit",
                             preset: str = "vit_base", image_size: int = 224, in_channels: int = 3,
                             patch_size: int = 16, pool: str = "avg") -> tuple[nn.Module, dict[str, Any]]:
    """The classifier for evaluation / inference and its settings (see :func:`training_settings`).

    When the requested settings are those of ``trained`` (``models/model_config.json``) the network is rebuilt from its
    exact stored config (this also covers MAE-initialised or imported shapes that no preset names); otherwise it is
    built fresh with :func:`usfmae_core.workflows.finetune.build_classifier` (weights are then adapted on loading,
    e.g. position embeddings for another image size).
    """
    from usfmae_core.networks.presets import build_model
    from usfmae_core.workflows.finetune import build_classifier

    requested = {"arch": str(arch), "preset": str(preset), "image_size": int(image_size),
                 "in_channels": int(in_channels), "classes": [str(c) for c in classes]}
    if str(arch) == "vit":
        requested.update(patch_size=int(patch_size), pool=str(pool))
    if trained and all(trained.get(k) == v for k, v in requested.items()):
        config = dict(trained)
        model = build_model("classifier" if config["arch"] == "vit" else config["arch"], config)
        return model, config
    model, config = build_classifier(len(requested["classes"]), arch=str(arch), preset=str(preset),
                                     image_size=int(image_size), in_channels=int(in_channels),
                                     patch_size=int(patch_size), pool=str(pool))
    return model, training_settings(config, requested["classes"], str(arch))


def _unwrap_state(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: a plain state dict, our checkpoint (``model``), MONAI / ignite
    ``{"model": ...}`` / ``state_dict`` wrappers; DDP ``module.`` prefixes removed."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "network"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {}
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain state dict, one of our checkpoints, MONAI / ignite wrappers), read with
    ``weights_only=True`` and checked: missing files, files that are not checkpoints, pickled code and NaN / infinite
    weights are refused with one line."""
    from usfmae_core.checkpoints import _torch_load, check_finite

    path = Path(path)
    if not path.exists():
        raise UsfmaeError(f"weights {path} do not exist",
                          "train first (configs/train.json writes models/model.pt), fetch released weights with "
                          "`python -m monai.bundle download_large_files --bundle_path .`, or pass --ckpt_path")
    state = _unwrap_state(_torch_load(path))
    if not state:
        raise UsfmaeError(f"{path} holds no state dict of tensors", "pass a PyTorch weights file (model.pt)")
    check_finite(state, path)
    return state


def load_weights(network: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None
                 ) -> nn.Module:
    """Load the weights in ``path`` (:func:`read_weights`, or ``state`` already read from it) into ``network``
    (unwrapping DDP), whatever MONAI version saved them.

    ``path`` may hold a plain state dict (Model Zoo's ``models/model.pt``, MONAI's ``CheckpointSaver``) or one of our
    checkpoints. The state is fitted with :func:`~usfmae_core.checkpoints.adapt_state_dict`: MONAI < 1.6
    ``cross_attn`` keys are dropped and ``norm_cross_attn`` filled, position embeddings of another image size are
    interpolated; anything else that does not fit is refused with the keys named.
    """
    from usfmae_core.checkpoints import adapt_state_dict
    from usfmae_core.workflows.distributed import unwrap_model

    state = read_weights(path) if state is None else state
    target = unwrap_model(network)
    target.load_state_dict(adapt_state_dict(state, target.state_dict(), source=str(path)))
    logger.info("loaded weights from %s", path)
    return network


def save_state_dict(network: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``network``'s weights (DDP unwrapped, on the CPU) as a plain state dict, atomically: the Model Zoo's
    ``models/model.pt`` layout, loadable strictly by MONAI's ``CheckpointLoader`` and ``ckpt_export``."""
    from usfmae_core.workflows.distributed import unwrap_model

    state = {k: v.detach().cpu() for k, v in unwrap_model(network).state_dict().items()}
    from usfmae_core.fileio import atomic_write

    path = atomic_write(path, lambda f: torch.save(state, f))
    logger.info("wrote %d tensors to %s", len(state), path)
    return path


class WeightsLoader:
    """Handler / callable loading ``load_path`` into ``network`` with :func:`load_weights`.

    Use it like MONAI's ``CheckpointLoader``: in an engine's handlers (loads when the engine starts) or called
    directly (``"$@checkpointloader(@evaluator)"`` in a config's ``initialize``).
    """

    def __init__(self, load_path: str | os.PathLike, network: nn.Module) -> None:
        self.load_path, self.network = load_path, network

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        load_weights(self.network, self.load_path)


# -------------------------------------------------------------------------------------------------- training
def macro_f1(output_transform: Callable = lambda x: x) -> Any:
    """Macro-averaged F1 as an ignite metric (the fine-tuning workflow's model-selection metric).

    ``output_transform`` must give ``(logits or probabilities (B, K), labels (B,))``. Per-class precision and recall
    are accumulated over the epoch (all-reduced across processes) and F1 is averaged over the K classes; a class never
    predicted has precision 0, as in :mod:`usfmae_core.workflows.metrics`.
    """
    from ignite.metrics import Precision, Recall

    precision = Precision(average=False, output_transform=output_transform)
    recall = Recall(average=False, output_transform=output_transform)
    return (precision * recall * 2 / (precision + recall + 1e-20)).mean()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                    base_lr: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay (:func:`~usfmae_core.workflows.optim.cosine_lr`) as a ``LambdaLR``.

    Each parameter group keeps its own initial lr (``base_lr * lr_scale`` from ``param_groups``, i.e. layer-wise
    decay); ``min_lr`` is the floor for ``base_lr`` (default: the largest group lr). Step it every iteration
    (``LrScheduleHandler(epoch_level=False)``).
    """
    from usfmae_core.workflows.optim import cosine_lr

    total = max(1, int(total_steps))
    warmup = min(max(0, int(warmup_steps)), max(total - 1, 0))
    base = float(base_lr) if base_lr else max(float(g["lr"]) for g in optimizer.param_groups)
    floor = min(float(min_lr), base) / base if base > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total, warmup, 1.0, floor))


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(str(device))


def use_amp(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether MONAI's engines should autocast (their ``amp`` runs on CUDA only): CUDA and not ``fp32``."""
    from usfmae_core.device import autocast_dtype

    dev = _device(device)
    return dev.type == "cuda" and autocast_dtype(dev, precision) is not None


def amp_kwargs(device: torch.device | str, precision: str = "auto") -> dict[str, Any]:
    """``amp_kwargs`` for MONAI's engines: the autocast dtype of :func:`usfmae_core.device.autocast_dtype`."""
    from usfmae_core.device import autocast_dtype

    return {"dtype": autocast_dtype(_device(device), precision) or torch.float32}


def prepare_process(ctx: Any, local_rank: int | None = None) -> str:
    """Ready one process of a ``torchrun`` job for MONAI's engines; logs and returns where it stands (rank, world
    size, ``LOCAL_RANK``, device, backend of a :class:`usfmae_core.workflows.distributed.DistContext`).

    It also syncs ignite's ``idist`` with the process group on every process: ignite does that lazily, with a
    collective (``new_group``), the first time any ignite object asks for the rank; handlers built on the first
    process only (``CheckpointSaver``) would otherwise make it wait there for processes that never come.

    Raises:
        UsfmaeError: ``local_rank`` (torchrun's ``LOCAL_RANK``) disagrees with the context's.
    """
    import ignite.distributed as idist

    if local_rank is not None and int(local_rank) != ctx.local_rank:
        raise UsfmaeError(f"LOCAL_RANK {local_rank} but the process group reports local rank {ctx.local_rank}",
                          "launch with torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK)")
    idist.sync()
    line = (f"process {ctx.rank} of {ctx.world_size} (LOCAL_RANK {ctx.local_rank}) on {ctx.device}, "
            f"backend {ctx.backend}")
    logger.info(line)
    return line


def with_iteration_events(update: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``update`` (an ``iteration_update(engine, batchdata) -> output``, e.g. the pretraining workflow's
    :class:`~usfmae_core.workflows.pretrain.MAEIterationUpdate`) firing MONAI's iteration events after it, as
    ``SupervisedTrainer``'s own iteration does.

    MONAI decollates the output and runs postprocessing on ``IterationEvents.MODEL_COMPLETED``; without it the
    handlers' ``from_engine(["loss"], first=True)`` (StatsHandler, TensorBoard, MLflow) would see a dict, not the loss.
    """
    from monai.engines.utils import IterationEvents

    def iteration(engine: Any, batchdata: Any) -> Any:
        engine.state.output = update(engine, batchdata)
        for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                      IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
            engine.fire_event(event)
        return engine.state.output

    return iteration


def is_not_rank0() -> bool:
    """True in every process but the first of a distributed run (handlers that write files are disabled there)."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() > 0)


# -------------------------------------------------------------------------------------------------- handlers
def _jsonable(obj: Any) -> Any:
    from usfmae_core.workflows.finetune import jsonable

    return jsonable(obj)


class SaveUsfmaeCheckpoint:
    """Handler writing ``network`` as one of our checkpoints (``usfmae`` CLI / Slicer / ``usfmae finetune --init``).

    Args:
        save_path: the checkpoint file (written atomically, by the first process only).
        network: the model (DDP / compiled wrappers are removed).
        arch: ``mae`` | ``classifier`` | ``resnet`` | ``densenet`` (``vit`` means ``classifier``).
        config: its config (model kwargs, ``preset``, ``preprocessing``, ...); bundle-only keys are dropped.
        weights_from: take the weights from this state-dict file instead of the network (e.g. the best model that
            ``CheckpointSaver`` kept), when it exists.
        interval: also save every ``interval`` epochs (0: only when training completes).
        meta: extra plain-typed information for the checkpoint's ``meta``.
    """

    def __init__(self, save_path: str | os.PathLike, network: nn.Module, arch: str, config: Mapping[str, Any],
                 weights_from: str | os.PathLike | None = None, interval: int = 0,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.save_path, self.network = Path(save_path), network
        self.arch = "classifier" if arch == "vit" else str(arch)
        self.config = {k: v for k, v in dict(config).items() if k not in ("arch", "image_size")}
        self.weights_from, self.interval, self.meta = weights_from, int(interval), dict(meta or {})

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Any = None) -> Path | None:
        from usfmae_core.checkpoints import make_checkpoint, save_checkpoint

        if is_not_rank0():
            return None
        ckpt = make_checkpoint(self.network, self.arch, self.config)
        if self.weights_from is not None and Path(self.weights_from).exists():
            state = _unwrap_state(torch.load(self.weights_from, map_location="cpu", weights_only=True))
            if state:
                ckpt["model"] = state
        meta = {"kind": "monai_bundle", **self.meta}
        if engine is not None:
            meta.update(epoch=int(engine.state.epoch), iteration=int(engine.state.iteration))
        ckpt["meta"] = _jsonable(meta)
        path = save_checkpoint(self.save_path, ckpt)
        logger.info("wrote %s checkpoint %s", self.arch, path)
        return path


class ProbabilityWriter:
    """Handler writing per-image class probabilities when an evaluation ends (results of all processes gathered; the
    first process writes).

    Without labels (inference), into ``output_dir``:

    - ``<filename>.csv``: ``source, kind, n_frames, label, p_<class>...``, one row per file (the columns of
      ``usfmae predict``'s ``summary.csv``);
    - ``<filename>.json``: ``{"classes", "results": [{source, kind, n_frames, label, p_<class>...}]}``.

    With a label for every image (evaluation): what ``usfmae evaluate`` writes
    (:func:`usfmae_core.workflows.evaluate.write_evaluation`): ``predictions.csv`` (image, true, predicted, correct,
    ``prob_<class>``), ``metrics.json`` (:func:`~usfmae_core.workflows.evaluate.evaluate_predictions`: metrics with
    ``bootstrap`` percentile-bootstrap 95% intervals), ``metrics.csv``, ``confusion_matrix.png`` and ``roc.png``.

    Args:
        output_dir: where to write.
        classes: class names, in the network's output order.
        filename: base name of the CSV / JSON files without labels.
        activation: ``softmax`` when the engine's ``pred`` holds logits, None when it holds probabilities (as
            :class:`FrameAveragingInferer` gives).
        bootstrap: resamples for the intervals of the evaluation metrics (0: none).
        seed: seed of the bootstrap.
        pred_key: key of the predictions in the engine's output.
    """

    def __init__(self, output_dir: str | os.PathLike, classes: Sequence[str], filename: str = "predictions",
                 activation: str | None = None, bootstrap: int = 1000, seed: int = 0, pred_key: str = "pred") -> None:
        if activation not in (None, "softmax"):
            raise ValueError(f"activation must be None or 'softmax', got {activation!r}")
        self.output_dir, self.classes = Path(output_dir), [str(c) for c in classes]
        self.filename, self.activation = filename, activation
        self.bootstrap, self.seed, self.pred_key = int(bootstrap), int(seed), pred_key
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Any = None) -> None:
        self.rows = []
        self.skipped = []

    @staticmethod
    def _items(batch: Any) -> list[dict[str, Any]]:
        """The batch as a list of per-image dicts (the engines keep it collated, or decollate it)."""
        if isinstance(batch, Mapping):
            image = batch.get("image")
            n = len(image) if image is not None else 0
            names = list(getattr(image, "meta", {}).get("filename_or_obj", []) or [])
            kinds = list(getattr(image, "meta", {}).get("kind", []) or [])
            label = batch.get("label")
            unreadable = list(batch.get("unreadable") or [])
            items = []
            for i in range(n):
                items.append({"source": names[i] if i < len(names) else None,
                              "kind": kinds[i] if i < len(kinds) else None,
                              "n_frames": int(image[i].shape[0]) if image[i].dim() == 4 else 1,
                              "label": None if label is None else int(torch.as_tensor(label[i]).reshape(-1)[0]),
                              "unreadable": str(unreadable[i]) if i < len(unreadable) and unreadable[i] else ""})
            return items
        items = []
        for item in batch or []:
            image = item.get("image")
            meta = getattr(image, "meta", {}) or {}
            label = item.get("label")
            items.append({"source": meta.get("filename_or_obj"), "kind": meta.get("kind"),
                          "n_frames": int(image.shape[0]) if image is not None and image.dim() == 4 else 1,
                          "label": None if label is None else int(torch.as_tensor(label).reshape(-1)[0]),
                          "unreadable": str(item.get("unreadable") or "")})
        return items

    def collect(self, engine: Any) -> None:
        output = engine.state.output
        if isinstance(output, Mapping):
            pred = output[self.pred_key]
        else:
            pred = torch.stack([torch.as_tensor(o[self.pred_key]) for o in output])
        pred = torch.as_tensor(pred).detach().float().cpu()
        if pred.dim() == 1:
            pred = pred[None]
        items = self._items(engine.state.batch)
        read = [it for it in items if not it["unreadable"]]
        for it in items:
            if it["unreadable"]:
                self.skipped.append({"source": str(it["source"]), "reason": it["unreadable"]})
        if not read:
            return
        probs = torch.softmax(pred, dim=-1) if self.activation == "softmax" else pred
        if len(read) != len(items):  # a mixed batch: keep the rows of the files that were read
            probs = probs[[i for i, it in enumerate(items) if not it["unreadable"]]]
        if probs.shape[-1] != len(self.classes):
            raise UsfmaeError(f"the network gives {probs.shape[-1]} class scores but {len(self.classes)} class names "
                              f"are set ({', '.join(self.classes)})", "pass --classes matching the model")
        for item, p in zip(read, probs.numpy(), strict=True):
            self.rows.append({**item, "probs": [float(v) for v in p]})

    def _gathered(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]] | None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.rows, self.skipped
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (self.rows, self.skipped))
        if is_not_rank0():
            return None
        return [r for rows, _ in parts for r in rows], [s for _, skipped in parts for s in skipped]

    def write(self, engine: Any = None) -> None:
        gathered = self._gathered()
        if gathered is None:
            return
        rows, skipped = gathered
        if skipped:
            logger.warning("skipped %d unreadable file(s): %s", len(skipped),
                           "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:5]))
        if not rows:
            first = skipped[0]["reason"] if skipped else "nothing to classify"
            raise UsfmaeError(f"no input could be classified ({first})",
                              "check the files named above (format, corruption)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        sources = [str(r["source"]) if r["source"] is not None else f"item_{i}" for i, r in enumerate(rows)]
        if rows and all(r["label"] is not None for r in rows):
            self._write_evaluation(rows, sources)
        else:
            self._write_predictions(rows, sources, skipped)

    def _write_evaluation(self, rows: list[dict[str, Any]], sources: list[str]) -> None:
        from usfmae_core.workflows.evaluate import evaluate_predictions, write_evaluation

        y = np.array([r["label"] for r in rows], dtype=np.int64)
        p = np.array([r["probs"] for r in rows], dtype=np.float64)
        result = evaluate_predictions(y, p, self.classes, self.bootstrap, self.seed)
        files = write_evaluation(self.output_dir, sources, y, p, self.classes, result)
        auc = result["auc_macro"]
        logger.info("accuracy %.4f, macro-F1 %.4f, macro AUC %s on %d image(s) -> %s", result["accuracy"],
                    result["f1_macro"], f"{auc:.4f}" if math.isfinite(auc) else "n/a", len(rows), files["metrics"])

    def _write_predictions(self, rows: list[dict[str, Any]], sources: list[str],
                           skipped: list[dict[str, str]] | None = None) -> None:
        from usfmae_core.workflows.common import write_csv, write_json

        cols = [f"p_{c}" for c in self.classes]
        results = []
        for source, r in zip(sources, rows):
            res = {"source": source, "kind": r["kind"] or "image", "n_frames": r["n_frames"],
                   "label": self.classes[int(np.argmax(r["probs"]))]}
            res.update({c: round(p, 6) for c, p in zip(cols, r["probs"])})
            results.append(res)
        header = ["source", "kind", "n_frames", "label", *cols]
        csv_path = write_csv(self.output_dir / f"{self.filename}.csv", header,
                             [[f"{res[h]:.6f}" if h.startswith("p_") else res[h] for h in header] for res in results])
        write_json(self.output_dir / f"{self.filename}.json",
                   {"classes": self.classes, "results": results, "skipped": list(skipped or [])})
        logger.info("wrote the class probabilities of %d file(s) to %s", len(results), csv_path)


class ProgressHandler:
    """The engine's progress bar (:class:`usfmae_core.workflows.common.Progress`): a tqdm bar, or
    ``USFMAE_PROGRESS`` lines with ``USFMAE_PROGRESS_LINES=1``, over all iterations of the run (first process only).

    Args:
        stage: the name shown (``pretrain``, ``finetune``, ``evaluate``, ``inference``).
        output_transform: maps the engine's output to the loss shown (None: no loss).
    """

    def __init__(self, stage: str, output_transform: Callable[[Any], Any] | None = None) -> None:
        self.stage, self.output_transform = stage, output_transform
        self.progress: Any = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.close)  # (no EXCEPTION_RAISED handler: ignite would
        # then stop re-raising the exception)

    def start(self, engine: Any) -> None:
        from usfmae_core.workflows.common import Progress

        length = engine.state.epoch_length or 0
        total = int(length * (engine.state.max_epochs or 1))
        self.progress = Progress(total, self.stage, disable=is_not_rank0(), initial=int(engine.state.iteration))

    def update(self, engine: Any) -> None:
        if self.progress is None:
            return
        shown: dict[str, float] = {"epoch": int(engine.state.epoch)}
        if self.output_transform is not None:
            value = self.output_transform(engine.state.output)
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                shown["loss"] = float(value)
        self.progress.update(1, **shown)

    def close(self, engine: Any = None, *args: Any) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
