"""MONAI-engine pieces for the MONAI bundle (``bundles/usf_mae``) that the workflows do not expose as MONAI objects.

The bundle's configs only wire engine code together; whatever they need beyond the workflows' public API lives here,
so no logic hides in JSON:

- data: :class:`CorpusDataset` (a MONAI ``Dataset`` over a prepared pretraining corpus, ``data`` = the corpus folder,
  or several mixed by weight) with :func:`corpus_sampler`,
  :func:`split_items` / :func:`evaluation_items` (labelled datalists -> MONAI items), :func:`inference_items`
  (files / folders / datalist JSON -> items), :class:`UltrasoundToFramesd` (every frame / slice of an image, cine or
  volume as model input ``(N, C, S, S)``), :func:`cache_rate`;
- inference: :class:`FrameAveragingInferer` (softmax per frame, mean over frames: what ``usfmae predict`` does),
  :func:`prepare_batch` (MetaTensor-free batches for the engines);
- metadata and models: ``network_data_format`` of ``configs/metadata.json`` is the one place of the classifier's
  classes, image size and channels (:func:`metadata_classes`, :func:`training_classes`, :func:`write_network_format`);
  :func:`check_weights` (one-line refusals before MONAI's strict ``CheckpointLoader``), :func:`load_weights` /
  :func:`save_state_dict` (``resave_weights``: weights of older MONAI versions), :func:`start_from_mae` /
  :func:`init_mae` (start from an MAE), :func:`classifier_config` / :func:`mae_checkpoint_config` (our checkpoint
  format, read from the modules);
- training: :func:`macro_f1` (ignite metric), :func:`cosine_schedule` (per-step warm-up + cosine, keeping layer-wise
  lr scales), :func:`use_amp` / :func:`amp_kwargs`, :func:`is_not_rank0`;
- handlers: :class:`SaveUsfmaeCheckpoint` (our checkpoint format, for ``usfmae`` / Slicer), :class:`ProbabilityWriter`
  (per-image class probabilities as CSV + JSON; with labels, ``usfmae evaluate``'s metrics and files),
  :class:`ProgressHandler` (the engine's progress bar / ``USFMAE_PROGRESS`` lines).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, apply_transform
from torch import nn

from usfmae_core.errors import UsfmaeError

__all__ = [
    "CorpusDataset",
    "FrameAveragingInferer",
    "ProbabilityWriter",
    "ProgressHandler",
    "SaveUsfmaeCheckpoint",
    "SkipUnreadabled",
    "UltrasoundToFramesd",
    "amp_kwargs",
    "cache_rate",
    "check_batches",
    "check_output_dir",
    "check_weights",
    "classifier_config",
    "collate_for",
    "corpus_sampler",
    "cosine_schedule",
    "evaluation_items",
    "inference_items",
    "init_mae",
    "is_not_rank0",
    "labelled_data",
    "load_weights",
    "log_data_summary",
    "macro_f1",
    "mae_checkpoint_config",
    "metadata_classes",
    "one_line_errors",
    "prepare_batch",
    "prepare_process",
    "read_weights",
    "save_state_dict",
    "split_items",
    "start_from_mae",
    "training_classes",
    "use_amp",
    "with_iteration_events",
    "write_json_file",
    "write_network_format",
]

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
                except Exception:  # noqa: BLE001, S110 - a broken log handler must not hide the message
                    pass
            sys.stdout.flush()
            # a progress bar (tqdm) may have left its line open: the message starts a line of its own
            bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
            sys.stderr.write("\n" if getattr(bars, "_instances", None) else "")
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


def check_output_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (a config's ``output_dir``) and check that files can be written in it, at ``initialize``:
    a file in the way or a read-only folder ends the run in one line before any work, not after it (as the CLI
    checks ``--out``). Returns the folder."""
    import tempfile

    from usfmae_core.errors import UsfmaeError

    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UsfmaeError(f"output_dir {path} is a file, not a folder", "choose a folder path for --output_dir")
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):  # PermissionError / OSError naming the folder: one line
        pass
    return path


# ------------------------------------------------------------------------------------------------------- data
class CorpusDataset(Dataset):
    """A prepared pretraining corpus (``usfmae prepare``) as a MONAI ``Dataset`` of uint8 frames ``(S, S)``.

    ``__getitems__`` reads a whole batch with one memory-mapped read per shard (as
    :class:`~usfmae_core.data.datasets.CorpusFrameDataset` does), so collate with
    :func:`~usfmae_core.data.datasets.collate_uint8` and augment on the device (``MAEBatchAugment``).

    Args:
        data: the corpus folder (the bundle's ``dataset_dir``); or several, a list of folders, ``"PATH:WEIGHT"``
            strings or ``[path, weight]`` pairs, read as one :class:`~usfmae_core.data.corpus.MixedCorpus` (draw
            them in their weights' shares with :func:`corpus_sampler`, as ``usfmae pretrain --corpus A:w B:w``
            does); or an opened ``FrameCorpus`` / ``VolumeCorpus`` / ``MixedCorpus``.
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
        elif isinstance(data, (list, tuple)):
            from usfmae_core.commands._args import corpus_spec
            from usfmae_core.data.corpus import open_corpora

            specs = []
            for item in data:
                if isinstance(item, (str, os.PathLike)):
                    try:
                        specs.append(corpus_spec(str(item)))
                    except argparse.ArgumentTypeError as err:
                        raise UsfmaeError(f"dataset_dir: {err}", "give each corpus as PATH or PATH:WEIGHT") from None
                else:
                    path, weight = item
                    specs.append((str(path), None if weight is None else float(weight)))
            data = open_corpora(specs, spatial_dims)
        super().__init__(data=data, transform=transform)

    def _transform(self, index: int) -> Any:
        item = torch.from_numpy(np.array(self.data[index]))
        return apply_transform(self.transform, item) if self.transform is not None else item

    def __getitems__(self, indices: Sequence[int]) -> Any:
        if self.transform is None and hasattr(self.data, "get_batch"):
            return torch.from_numpy(self.data.get_batch(indices))
        return [self._transform(int(i)) for i in indices]


def corpus_sampler(dataset: Any, seed: int = 0, distributed: bool = False) -> Any:
    """The sampler for a :class:`CorpusDataset`: corpora mixed by weight are drawn in their shares by
    :class:`~usfmae_core.workflows.pretrain.MixtureSampler` (a ``DistributedSampler``, so MONAI's engines advance its
    epoch; split over the ranks when ``distributed``); otherwise MONAI's ``DistributedSampler`` when ``distributed``,
    else None (let the DataLoader shuffle)."""
    from usfmae_core.workflows import distributed as D

    data = getattr(dataset, "data", dataset)
    world, rank = (D.get_world_size(), D.get_rank()) if distributed else (1, 0)
    if getattr(data, "weighted", False):
        from usfmae_core.workflows.pretrain import MixtureSampler

        return MixtureSampler(data.sizes, data.weights, num_replicas=world, rank=rank, seed=seed,
                              drop_last=len(data) >= world)
    if distributed:
        from monai.data import DistributedSampler

        return DistributedSampler(dataset, even_divisible=True, shuffle=True, seed=seed)
    return None


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

    Uses :func:`usfmae_core.workflows.predict.collect_inputs`; explicit files it cannot use are logged and skipped,
    segmentation masks / annotation files in folders are left out (counted in the log).
    """
    from usfmae_core.workflows.predict import collect_inputs

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files, skipped = collect_inputs(sources)
    for s in skipped:
        if not s.get("mask"):
            logger.warning("skipped %s: %s", s["source"], s["reason"])
    masks = [s["source"] for s in skipped if s.get("mask")]
    if masks:
        logger.warning("left out %d segmentation masks / annotation files (e.g. %s)", len(masks),
                       ", ".join(Path(m).name for m in masks[:3]))
    return [{"image": str(p)} for p in files]


def log_data_summary(datalist: Mapping[str, Any], source: str | os.PathLike | None = None,
                     preprocessing: Any = None, volume: Any = None) -> list[str]:
    """Log the console summary of a labelled datalist (files found, per-class counts per split, masks excluded,
    duplicates removed, near-duplicate groups, unreadable files: :func:`usfmae_core.data.labelled.datalist_summary`,
    what ``usfmae finetune`` / ``evaluate`` print) at the start of a bundle run; first process only. With the model's
    ``preprocessing`` (and ``volume`` settings) it also says what the preprocessing does to this data
    (:func:`~usfmae_core.data.labelled.preprocessing_notes`: geometry rule, non-square files, colour kept or made
    grey). Returns the lines."""
    from usfmae_core.data.labelled import datalist_summary, preprocessing_notes

    lines = datalist_summary(dict(datalist), None if source is None else str(source), colour=preprocessing is None)
    if preprocessing is not None:
        lines += preprocessing_notes(dict(datalist), preprocessing, volume)
    if not is_not_rank0():
        for line in lines:
            logger.info(line)
    return lines


def cache_rate(n_items: int, prep: Any, volume: Any = None) -> float:
    """Fraction of ``n_items`` preprocessed images (volumes / bags of slices with a ``volume`` model) to keep in
    memory (``CacheDataset``), within the fine-tuning workflow's memory budget
    (:data:`usfmae_core.workflows.finetune.CACHE_BYTES`)."""
    from usfmae_core.workflows.finetune import CACHE_BYTES, item_bytes

    per_item = item_bytes(prep, volume)
    return float(min(1.0, CACHE_BYTES / max(1, per_item * max(1, int(n_items)))))


def collate_for(volume: Any = None) -> Callable[[Sequence[Any]], Any]:
    """The ``collate_fn`` of a model's batches: MONAI's ``list_data_collate``, or for an attention-MIL volume model
    :func:`~usfmae_core.data.volumes.collate_bags` (bags of different lengths padded, with a ``mask``)."""
    from monai.data import list_data_collate

    if volume is not None and volume.model == "mil":
        from usfmae_core.data.volumes import collate_bags

        return collate_bags
    return list_data_collate


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
        except Exception as err:
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

    Input: channel-first ``(1|3, H, W)`` or ``(1|3, T|D, H, W)`` from
    :class:`~usfmae_core.data.transforms.LoadUltrasoundd` (3 channels: a colour file loaded with ``colour=True``).
    The frames are those ``usfmae predict`` classifies (:func:`~usfmae_core.data.transforms.frames_for_model`:
    volumes sliced along ``axis``, array order D, H, W; empty and constant frames / slices left out, an input
    without any informative one refused; one sector box per clip) and are preprocessed by
    :func:`~usfmae_core.data.transforms.frames_to_tensor` with the model's preprocessing: ``resize`` (``letterbox`` |
    ``squash``), ``crop_sector`` and ``colour`` (``rgb``: colour reaches a 3-channel model as colour; ``luma``) as
    stored in its checkpoint (``preprocessing`` may give them all at once, as a dict). The meta dict is kept and gains
    ``n_frames`` (frames given to the model) and ``n_excluded``.

    With a volume model's settings (``volume``, a :class:`~usfmae_core.data.volumes.VolumeInput`) the item becomes
    that model's input instead, exactly as in its fine-tuning
    (:class:`~usfmae_core.data.volumes.VolumeToModelInputd`): a cube ``(C, S, S, S)`` for a 3D model, the informative
    slices along the model's axis ``(N, C, S, S)`` for attention MIL.
    """

    def __init__(self, keys: KeysCollection, image_size: int = 224, in_channels: int = 3,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 axis: int = 0, resize: str = "letterbox", crop_sector: bool = False, colour: str = "rgb",
                 preprocessing: Any = None, volume: Any = None,
                 allow_missing_keys: bool = False) -> None:
        from usfmae_core.data.transforms import Preprocessing

        super().__init__(keys, allow_missing_keys)
        if isinstance(preprocessing, Preprocessing):
            self.prep = preprocessing
        elif preprocessing is not None:
            self.prep = Preprocessing.from_dict(preprocessing)
        else:
            self.prep = Preprocessing(int(image_size), int(in_channels), tuple(mean), tuple(std), str(resize),
                                      bool(crop_sector), str(colour))
        self.axis = int(axis)
        self.volume = None
        if volume is not None:
            from usfmae_core.data.volumes import VolumeToModelInputd

            self.volume = VolumeToModelInputd(keys, self.prep, volume, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from usfmae_core.data.readers import luma
        from usfmae_core.data.transforms import frames_for_model, frames_to_tensor

        if self.volume is not None:
            d = self.volume(data)
            for key in self.key_iterator(d):
                meta = d[key].meta
                meta.update(n_frames=len(meta.get("slice_index") or [0]), n_excluded=int(meta.get("n_excluded", 0)))
            return d
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = dict(getattr(x, "meta", {}) or {})
            arr = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float32)
            rgb = None
            if arr.ndim in (3, 4) and arr.shape[0] == 3:  # colour, channel-first
                rgb = np.moveaxis(arr, 0, -1)
                arr = luma(rgb)
            elif arr.ndim in (3, 4) and arr.shape[0] == 1:
                arr = arr[0]  # channel-first grey -> (H, W) / (N, H, W)
            kind = str(meta.get("kind") or ("image" if arr.ndim == 2 else "volume"))
            if arr.ndim == 2:
                kind = "image"
            spacing = tuple(meta.get("spacing") or (1.0,) * arr.ndim)
            source = str(meta.get("filename_or_obj", ""))
            seen = frames_for_model(arr, kind, spacing, self.prep, self.axis, rgb, source or None)
            out = frames_to_tensor(seen.frames, self.prep, seen.spacing, seen.crop)
            meta.update(n_frames=int(out.shape[0]), n_excluded=int(seen.total - len(seen.index)), kind=kind)
            d[key] = MetaTensor(out, meta=meta)
        return d


# -------------------------------------------------------------------------------------------------- inference
class FrameAveragingInferer(Inferer):
    """Class probabilities per image: softmax of the network's logits for every frame, averaged over the frames.

    This is :func:`usfmae_core.workflows.predict.classify_array`'s rule for 2D models (a 2D image is one frame).
    With a volume model's settings (``volume``) it is that model's one result per volume instead, as ``usfmae
    predict`` computes it: a 3D model's softmax over its cube, or for attention MIL the informative slices encoded
    ``frame_batch_size`` at a time and pooled by the model's attention (memory of one batch, whatever the slices).

    Args:
        frame_batch_size: frames per forward pass.
        volume: None for 2D models, else a :class:`~usfmae_core.data.volumes.VolumeInput`.

    Shapes: ``(B, N, C, S, S)`` (``N`` frames per image; ``B`` is usually 1 since ``N`` varies) or ``(B, C, S, S)``
    -> probabilities ``(B, K)`` float32; a 3D model: ``(B, C, S, S, S)`` -> ``(B, K)``.
    """

    def __init__(self, frame_batch_size: int = 32, volume: Any = None) -> None:
        self.frame_batch_size = max(1, int(frame_batch_size))
        self.volume = volume

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
                 ) -> torch.Tensor:
        x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, MetaTensor) else inputs
        if x.numel() == 0:  # unreadable files (SkipUnreadabled): no probabilities, the writer lists them as skipped
            return torch.zeros((x.shape[0], 0))
        if self.volume is not None and self.volume.model == "3d":
            return torch.softmax(network(x, *args, **kwargs).float(), dim=-1)
        if self.volume is not None:  # attention MIL: chunked slice encoding, one pooling per bag
            from usfmae_core.workflows.distributed import unwrap_model

            model = unwrap_model(network)
            mask = kwargs.get("mask")
            out = []
            for b, bag in enumerate(x):
                if mask is not None:
                    bag = bag[torch.as_tensor(mask[b]).bool()]
                feats = torch.cat([model.encode(bag[i:i + self.frame_batch_size])
                                   for i in range(0, bag.shape[0], self.frame_batch_size)])
                logits, _ = model.aggregate(feats[None])
                out.append(torch.softmax(logits.float(), dim=-1)[0])
            return torch.stack(out)
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


class PrecisionInferer(Inferer):
    """Runs ``network`` under the autocast of ``precision`` on any device and returns float32 outputs.

    MONAI's engines autocast only on CUDA (their ``amp``); this inferer gives the bundle the engine's precision rule
    everywhere (:func:`usfmae_core.precision.resolve_precision`): ``auto`` is decided at the first call for this network
    and input shape, as training steps when the network is in training mode and as inference otherwise, and said in
    the log; under ``torchrun`` rank 0 decides for all processes.

    Args:
        precision: ``auto|bf16|fp16|fp32``.
        inner: the inferer to run inside the autocast (default: ``network(inputs)``), e.g.
            :class:`FrameAveragingInferer`.
    """

    def __init__(self, precision: str = "auto", inner: Inferer | None = None) -> None:
        from usfmae_core.precision import PRECISIONS

        if str(precision).lower() not in PRECISIONS:
            raise UsfmaeError(f"unknown precision '{precision}'", f"choose one of {', '.join(PRECISIONS)}")
        self.precision = str(precision).lower()
        self.inner = inner
        self.dtype: torch.dtype | None = None
        self._resolved = False

    def _resolve(self, x: torch.Tensor, network: Callable[..., Any]) -> None:
        from usfmae_core.precision import precision_name, resolve_precision
        from usfmae_core.workflows import distributed as D

        net = D.unwrap_model(network) if isinstance(network, nn.Module) else None
        device = x.device
        shape = tuple(x.shape)
        if isinstance(self.inner, FrameAveragingInferer) and self.inner.volume is None:
            # a 2D model sees frame batches (F, C, S, S); a volume model its cubes or bags whole
            shape = (min(self.inner.frame_batch_size, x.shape[1] if x.dim() == 5 else x.shape[0]), *x.shape[-3:])
        name = None
        if D.is_main():
            train = bool(net is not None and net.training)
            name = precision_name(resolve_precision(self.precision, device, net, shape, train=train,
                                                    log=logger.info))
        self.dtype = resolve_precision(D.broadcast_object(name), device, log=None)
        self._resolved = True

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, MetaTensor) else inputs
        if not self._resolved and x.numel() > 0:  # an unreadable file's empty item says nothing of the model
            self._resolve(x, network)
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.inner(x, network, *args, **kwargs) if self.inner is not None else network(x, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def prepare_batch(batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[Any, ...]:
    """``prepare_batch`` for MONAI engines: ``(image, label)`` as plain tensors on ``device``; for padded MIL bags
    (a ``mask`` in the batch, :func:`collate_for`) ``(image, label, (), {"mask": mask})``, which MONAI's engines
    hand to the inferer and so to the network as ``network(image, mask=mask)``.

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
    mask = batchdata.get("mask")
    if isinstance(mask, torch.Tensor):
        return image, label, (), {"mask": mask.to(device=device, non_blocking=non_blocking)}
    return image, label


# ---------------------------------------------------------------------------------------- metadata and models
# The classifier's classes, input size and channels live in ONE place: ``network_data_format`` of
# configs/metadata.json. Every config reads them from there (``@_meta_#network_data_format#...``), so ``network_def``
# is a plain component whose arguments always agree with what ``verify_net_in_out`` checks; train.json writes them
# back after reading the labelled data (:func:`write_network_format`).
def metadata_classes(network_data_format: Mapping[str, Any]) -> list[str]:
    """Class names in output order, from ``outputs.pred`` (``channel_def`` ``{"0": name, ...}``, ``num_channels``)
    of a bundle's ``network_data_format``.

    Raises:
        UsfmaeError: ``channel_def`` does not name each of the ``num_channels`` outputs exactly once.
    """
    pred = dict(network_data_format.get("outputs", {}).get("pred", {}))
    k = int(pred.get("num_channels", 0))
    names = {str(i): str(v) for i, v in dict(pred.get("channel_def") or {}).items()}
    if k < 1 or sorted(names) != sorted(str(i) for i in range(k)):
        raise UsfmaeError(f"configs/metadata.json names classes {names or '-'} for {k} network outputs",
                          "give network_data_format#outputs#pred#channel_def one name per output, keys '0'..'K-1'")
    return [names[str(i)] for i in range(k)]


@functools.lru_cache(maxsize=4)
def _labelled(source: str, mtime: float, seed: int, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    from usfmae_core.workflows.finetune import load_labelled

    return load_labelled(source, seed, val_fraction, test_fraction)


def labelled_data(source: str | os.PathLike, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
                  ) -> dict[str, Any]:
    """The labelled datalist of ``source`` (:func:`usfmae_core.workflows.finetune.load_labelled`: class folders, CSV or
    datalist JSON; deduplicated and split), read once per process for the same arguments (train.json asks for it
    twice: for the classes and for the splits)."""
    path = Path(source)
    mtime = path.stat().st_mtime if path.exists() else -1.0
    return copy.deepcopy(_labelled(str(path), mtime, int(seed), float(val_fraction), float(test_fraction)))


def training_classes(source: str | os.PathLike, network_data_format: Mapping[str, Any], seed: int = 0,
                     val_fraction: float = 0.15, test_fraction: float = 0.15) -> list[str]:
    """The classes train.json builds ``network_def`` for: those of the labelled data at ``source`` when it exists,
    else the bundle's own (:func:`metadata_classes`), so that ``monai.bundle.load`` and ``verify_net_in_out`` work
    without any data. (A missing ``source`` stops the training run itself at its first step, ``check_splits``.)"""
    if Path(source).exists():
        return [str(c) for c in labelled_data(source, seed, val_fraction, test_fraction)["classes"]]
    return metadata_classes(network_data_format)


def _image_format(channels: int, size: int, spatial_dims: int = 2) -> dict[str, Any]:
    names = ["B-mode intensity"] if channels == 1 else [
        f"B-mode intensity (normalised with the {c} mean/std)" for c in "RGB"][:channels]
    return {"num_channels": int(channels), "spatial_shape": [int(size)] * int(spatial_dims),
            "channel_def": {str(i): n for i, n in enumerate(names)}}


def write_network_format(metadata_file: str | os.PathLike, classes: Sequence[str], image_size: int,
                         in_channels: int, volume: Any = None) -> bool:
    """Record a training run's classes, image size and channels in ``network_data_format`` of ``metadata_file``
    (inputs ``image``; outputs and post-processed outputs ``pred``), so that evaluation, inference,
    ``verify_net_in_out``, ``ckpt_export`` and ``monai.bundle.load`` build the network that was trained. A native 3D
    volume model (``volume.model == "3d"``) takes a cube ``S x S x S``; an attention-MIL model takes bags of
    ``S x S`` slices (a ``(B, C, S, S)`` input is B bags of one slice each, which is what ``verify_net_in_out``
    feeds it).

    The file is rewritten (atomically, 4-space JSON as the Model Zoo's pre-commit formats it) only when something
    changes, and what changed is logged. Returns whether it was rewritten.
    """
    path = Path(metadata_file)
    meta = json.loads(path.read_text())
    fmt = meta.setdefault("network_data_format", {})
    before = json.dumps(fmt, sort_keys=True)
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    dims = 3 if volume is not None and volume.model == "3d" else 2
    image.update(_image_format(int(in_channels), int(image_size), dims))
    k = len(classes)
    for section in ("outputs", "post_processed_outputs"):
        pred = fmt.setdefault(section, {}).setdefault("pred", {})
        pred.update(num_channels=k, spatial_shape=[k], channel_def={str(i): str(c) for i, c in enumerate(classes)})
    if json.dumps(fmt, sort_keys=True) == before:
        return False
    write_json_file(path, meta)
    logger.info("recorded the trained network's inputs (%d channel(s), %s) and classes (%s) in %s",
                int(in_channels), " x ".join([str(int(image_size))] * dims), ", ".join(map(str, classes)), path)
    return True


def write_json_file(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as 4-space-indented JSON with a final newline (the Model Zoo's pretty-format-json style), atomically."""
    from usfmae_core.fileio import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=4) + "\n")


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


_NO_WEIGHTS_FIX = ("train first (configs/train.json writes models/model.pt), fetch released weights with "
                   "`python -m monai.bundle download_large_files --bundle_path .`, or pass --ckpt_path")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain state dict, one of our checkpoints, MONAI / ignite wrappers), read with
    ``weights_only=True`` (memory-mapped) and checked like every checkpoint of the engine
    (:func:`usfmae_core.checkpoints.load_checkpoint`): a missing file, a file that is not a checkpoint, pickled code
    and NaN / infinite weights are refused with one line."""
    from usfmae_core.checkpoints import _torch_load, check_finite

    path = Path(path)
    if not path.exists():
        raise UsfmaeError(f"weights {path} do not exist", _NO_WEIGHTS_FIX)
    state = _unwrap_state(_torch_load(path, mmap=True))
    if not state:
        raise UsfmaeError(f"{path} holds no state dict of tensors", "pass a PyTorch weights file (model.pt)")
    check_finite(state, path)
    return state


_read_state = read_weights


def check_weights(path: str | os.PathLike, network: nn.Module) -> Path:
    """Refuse, in one line, weights that MONAI's strict ``CheckpointLoader`` (and ``ckpt_export``) would reject with a
    long traceback: a missing or unreadable file, MONAI < 1.6 ``cross_attn`` keys (re-save them), or keys and shapes
    that do not fit ``network`` (another class count, image size or ``network_def``)."""
    from usfmae_core.workflows.distributed import unwrap_model

    path = Path(path)
    state = _read_state(path)
    target = unwrap_model(network).state_dict()
    if any(".cross_attn." in k for k in state):
        raise UsfmaeError(f"{path} was saved by MONAI < 1.6 (it holds TransformerBlock cross_attn weights that MONAI "
                          "1.6 no longer has)",
                          "re-save it once: python -m monai.bundle run resave_weights --config_file "
                          "configs/inference.json --load_pretrain False")
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                  if k in state and state[k].shape != v.shape]
    if unexpected or missing or mismatched:
        parts = [f"{what} {_few(keys)}" for what, keys in (("unexpected keys", unexpected), ("missing keys", missing),
                                                            ("mismatched shapes", mismatched)) if keys]
        raise UsfmaeError(f"weights {path} do not fit network_def: {'; '.join(parts)}",
                          "the classes / image size in configs/metadata.json or the network_def arguments differ "
                          "from the run that wrote them; use that run's bundle or override them to match")
    return path


def _few(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``network`` (unwrapping DDP), whatever MONAI version saved them.

    ``path`` may hold a plain state dict (Model Zoo's ``models/model.pt``, MONAI's ``CheckpointSaver``) or one of our
    checkpoints. The state is fitted with :func:`~usfmae_core.checkpoints.adapt_state_dict`: MONAI < 1.6
    ``cross_attn`` keys are dropped and ``norm_cross_attn`` filled, position embeddings of another image size are
    interpolated; anything else that does not fit is refused with the keys named. (The configs load ``model.pt``
    with MONAI's strict ``CheckpointLoader``; this is the lenient path behind ``resave_weights``.)
    """
    from usfmae_core.checkpoints import adapt_state_dict
    from usfmae_core.workflows.distributed import unwrap_model

    path = Path(path)
    state = {k: v.clone() for k, v in _read_state(path).items()}
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


def start_from_mae(network: nn.Module, mae: str | os.PathLike, in_channels: int | None = None) -> nn.Module:
    """Start ``network`` (a :class:`~usfmae_core.networks.classifier.USFMAEClassifier`, 2D or native 3D, or an
    :class:`~usfmae_core.networks.volume.AttentionMILClassifier`) from the encoder of the MAE checkpoint ``mae``
    (``usfmae pretrain`` / ``configs/pretrain.json`` / ``usfmae import-weights``, or the name of a published model
    fetched with ``usfmae pull``).

    Position embeddings of another image size are interpolated (logged); another encoder shape is refused with the
    ``network_def`` arguments that would fit.
    """
    from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint
    from usfmae_core.workflows.distributed import unwrap_model

    path = _resolve_model(mae)
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != "mae":
        raise UsfmaeError(f"--pretrained_mae {mae} holds a '{ckpt['arch']}' model, not a pretrained MAE",
                          "pass an MAE checkpoint (configs/pretrain.json's models/mae.pt, usfmae pretrain, "
                          "usfmae import-weights or usfmae pull)")
    cfg = ckpt["config"]
    target = unwrap_model(network)
    enc = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    want = target.encoder.state_dict()
    if in_channels is not None and int(cfg.get("in_channels", 3)) != int(in_channels):
        raise UsfmaeError(f"the MAE {path} takes {cfg.get('in_channels')} channel(s) but the bundle {in_channels}",
                          "set network_data_format#inputs#image#num_channels in configs/metadata.json to the MAE's")
    shape_keys = ("hidden_size", "num_layers", "num_heads", "patch_size")
    patch_src = enc["patch_embed.patch_embeddings.weight"].shape[2:] if enc.get("cls_token") is not None else ()
    patch_dst = want["patch_embed.patch_embeddings.weight"].shape[2:]
    inflate = len(patch_src) == 2 and len(patch_dst) == 3  # a 2D MAE starting a native 3D ViT
    if inflate:  # 2D positions mean nothing in 3D: the 3D ViT keeps its own sin-cos (as USFMAEClassifier.from_mae)
        enc["patch_embed.position_embeddings"] = want["patch_embed.position_embeddings"]
    mismatch = (enc.get("cls_token") is None or enc["cls_token"].shape != want["cls_token"].shape
                or sum(k.endswith("attn.qkv.weight") for k in enc) != sum(k.endswith("attn.qkv.weight") for k in want)
                or tuple(patch_src[-2:]) != tuple(patch_dst[-2:])
                or (len(patch_src) == 3 and len(patch_dst) == 2))
    if mismatch:
        fits = " ".join(f"--network_def#{k} {_scalar(cfg.get(k))}" for k in shape_keys if cfg.get(k) is not None)
        raise UsfmaeError(f"the MAE {path} has another encoder shape than network_def "
                          f"(MAE: {', '.join(f'{k} {_scalar(cfg.get(k))}' for k in shape_keys)})",
                          f"pass {fits} (and the same to evaluate / inference)")
    size = _scalar(cfg.get("img_size", 224))
    if inflate:
        logger.info("the 2D MAE %s starts the 3D ViT: its patch projection is inflated over depth", path)
    elif size != target.encoder.img_size[-1]:
        logger.info("MAE %s was pretrained at %d px; its position embeddings are interpolated to %d px", path, size,
                    target.encoder.img_size[-1])
    target.encoder.load_state_dict(adapt_state_dict(enc, want, source=str(path)))
    logger.info("started the classifier's encoder from the MAE %s", path)
    return network


def _scalar(v: Any) -> Any:
    return v[-1] if isinstance(v, (list, tuple)) else v


def _resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model file, or the cached file of a published model named like ``usf-mae-100ep`` (:mod:`usfmae_core.hub`)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        from usfmae_core.hub import resolve_init
    except ImportError:  # the hub module is optional for the bundle
        return path
    return Path(resolve_init(str(name_or_path)))


def _encoder_config(encoder: nn.Module) -> dict[str, Any]:
    block = encoder.blocks[0]
    return {"in_channels": int(encoder.in_channels), "img_size": [int(s) for s in encoder.img_size],
            "patch_size": [int(p) for p in encoder.patch_size], "spatial_dims": int(encoder.spatial_dims),
            "hidden_size": int(encoder.hidden_size), "num_layers": len(encoder.blocks),
            "num_heads": int(block.attn.num_heads),
            "mlp_ratio": float(block.mlp.linear1.out_features / encoder.hidden_size),
            "qkv_bias": block.attn.qkv.bias is not None, "drop_path_rate": 0.0}


def mae_checkpoint_config(network: nn.Module, preprocessing: Any, preset: str = "bundle", corpus: Any = None
                          ) -> dict[str, Any]:
    """Our checkpoint config of a :class:`~usfmae_core.networks.mae.USFMAE` (model kwargs + ``preprocessing``), read
    from the module: what ``usfmae finetune --init`` / ``--pretrained_mae`` / ``reconstruct`` rebuild it from. With
    the frame ``corpus`` (a :class:`CorpusDataset` or an opened corpus) the geometry / colour rules its frames were
    stored with go into ``preprocessing``, as ``usfmae pretrain`` records them
    (:func:`~usfmae_core.data.corpus.corpus_preprocessing`)."""
    from usfmae_core.data.corpus import VolumeCorpus, corpus_preprocessing
    from usfmae_core.workflows.distributed import unwrap_model

    model = unwrap_model(network)
    dec = model.decoder
    cfg = _encoder_config(model.encoder)
    dec_hidden = int(dec.decoder_embed.out_features)
    cfg.update(decoder_hidden_size=dec_hidden, decoder_num_layers=len(dec.decoder_blocks),
               decoder_num_heads=int(dec.decoder_blocks[0].attn.num_heads), mask_ratio=float(model.mask_ratio),
               norm_pix_loss=bool(model.norm_pix_loss), preset=str(preset),
               preprocessing=preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing))
    corpus = getattr(corpus, "data", corpus)
    if corpus is not None and not isinstance(corpus, VolumeCorpus):
        cfg["preprocessing"].update(corpus_preprocessing(corpus))
    dec_ratio = dec.decoder_blocks[0].mlp.linear1.out_features / dec_hidden
    if dec_ratio != cfg["mlp_ratio"]:
        cfg["decoder_mlp_ratio"] = float(dec_ratio)
    return cfg


def init_mae(network: nn.Module, init: str | os.PathLike) -> nn.Module:
    """Continue pretraining ``network`` (an MAE) from the MAE checkpoint ``init`` (ours, ``usfmae import-weights`` of
    facebook / USF-MAE weights, or a published model's name fetched with ``usfmae pull``).

    The weights are fitted with :func:`~usfmae_core.checkpoints.adapt_state_dict` (position embeddings interpolated,
    channels summed, 2D patches inflated to 3D); the pixel-prediction head restarts from its initialisation when the
    patch shape changes (logged). Another encoder width / depth is refused with the keys named.
    """
    from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint
    from usfmae_core.workflows.distributed import unwrap_model

    path = _resolve_model(init)
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != "mae":
        raise UsfmaeError(f"--init_mae {init} holds a '{ckpt['arch']}' model, not an MAE (encoder + decoder)",
                          "pass an MAE checkpoint (usfmae pretrain, configs/pretrain.json, usfmae import-weights or "
                          "usfmae pull), or leave out --init_mae to start from scratch")
    model = unwrap_model(network)
    src, target = dict(ckpt["model"]), model.state_dict()
    fresh = [k for k in src
             if k.startswith("decoder.decoder_pred.") and k in target and src[k].shape != target[k].shape]
    src.update({k: target[k] for k in fresh})
    model.load_state_dict(adapt_state_dict(src, target, source=str(path)))
    if fresh:
        logger.info("the MAE's pixel-prediction head was re-initialised (patch shape changed)")
    logger.info("continuing pretraining from %s", path)
    return network


def classifier_config(network: nn.Module, classes: Sequence[str], preprocessing: Any,
                      preset: str = "bundle") -> dict[str, Any]:
    """Our checkpoint config (model kwargs, ``classes``, ``preprocessing``) of a
    :class:`~usfmae_core.networks.classifier.USFMAEClassifier`, read from the module itself: what
    :func:`usfmae_core.networks.presets.build_model` rebuilds it from (``usfmae predict`` / ``evaluate`` / Slicer)."""
    from usfmae_core.workflows.distributed import unwrap_model

    model = unwrap_model(network)
    prep = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing)
    return {**_encoder_config(model.encoder), "num_classes": int(model.head.out_features), "pool": str(model.pool),
            "dropout": float(model.dropout.p), "preset": str(preset), "classes": [str(c) for c in classes],
            "preprocessing": prep}


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
    """Whether MONAI's engines should use their ``amp`` (autocast and, for fp16, a GradScaler; CUDA only): CUDA and not
    ``fp32``. On other devices :class:`PrecisionInferer` applies the precision."""
    from usfmae_core.precision import resolve_precision

    dev = _device(device)
    return dev.type == "cuda" and resolve_precision(precision, dev, log=None) is not None


def amp_kwargs(device: torch.device | str, precision: str = "auto") -> dict[str, Any]:
    """``amp_kwargs`` for MONAI's engines (CUDA): the autocast dtype of
    :func:`usfmae_core.precision.resolve_precision`."""
    from usfmae_core.precision import resolve_precision

    return {"dtype": resolve_precision(precision, _device(device), log=None) or torch.float32}


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

    - ``<filename>.csv``: ``source, kind, n_frames, n_excluded, label, p_<class>...``, one row per file (the columns
      of ``usfmae predict``'s ``summary.csv``: frames classified, empty / constant frames left out);
    - ``<filename>.json``: ``{"classes", "results": [{source, kind, n_frames, n_excluded, label, p_<class>...}]}``.

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
            excluded = getattr(image, "meta", {}).get("n_excluded")
            excluded = [] if excluded is None else [int(e) for e in torch.as_tensor(excluded).reshape(-1)]
            frames = getattr(image, "meta", {}).get("n_frames")  # the real slices of padded bags, 1 for a cube
            frames = [] if frames is None else [int(f) for f in torch.as_tensor(frames).reshape(-1)]
            label = batch.get("label")
            unreadable = list(batch.get("unreadable") or [])
            items = []
            for i in range(n):
                items.append({"source": names[i] if i < len(names) else None,
                              "kind": kinds[i] if i < len(kinds) else None,
                              "n_frames": frames[i] if i < len(frames) else
                              (int(image[i].shape[0]) if image[i].dim() == 4 else 1),
                              "n_excluded": excluded[i] if i < len(excluded) else 0,
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
                          "n_excluded": int(meta.get("n_excluded") or 0),
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
                   "n_excluded": int(r.get("n_excluded") or 0), "label": self.classes[int(np.argmax(r["probs"]))]}
            res.update({c: round(p, 6) for c, p in zip(cols, r["probs"])})
            results.append(res)
        header = ["source", "kind", "n_frames", "n_excluded", "label", *cols]
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
