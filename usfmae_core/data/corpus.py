"""``usfmae prepare``: turn folders of ultrasound files into a sharded, memory-mappable uint8 frame cache.

Layout of a corpus folder::

    corpus.json        summary: version, image_size, n_frames, shards [{file, n}], options
    manifest.jsonl     one JSON per frame: shard, index, source, frame, axis, kind, spacing, crop, sha1
    shards/*.npy       uint8 (N, S, S), np.load(mmap_mode="r")
    done.jsonl         one JSON per finished source (written after its frames are safely on disk): resume state
    report.json        this run's counts, ``totals`` over all runs (resumes add up), skipped files {path, reason}
    volumes/*.npy      (--native-3d) uint8 (V, V, V) isotropic volumes; volumes.jsonl describes them

Per source: read (:func:`read_ultrasound`); volumes -> slices along each requested axis, made isotropic in plane
and letterboxed so anatomy keeps its physical aspect; 2D images and clip frames letterboxed too (``resize``, the
fine-tuning rule; ``squash`` stretches them as older versions did); cine -> every ``frame_stride``-th frame,
dropping frames that differ from the last kept one by less than 1 grey level on average; optional sector crop and
annotation inpainting (:mod:`usfmae_core.data.sector`); per-frame intensity scaling (:func:`scale_intensity`, the
same rule as fine-tuning), letterbox / squash to ``S x S``, uint8; empty and constant frames
(:func:`~usfmae_core.data.transforms.informative_frames`, the rule ``predict`` uses too) are skipped and exact
duplicates (SHA-1 of the uint8 frame) removed across the whole corpus.

Robustness: a source that cannot be read is listed in the report with the reason and the run goes on. Shards
are written atomically (temporary file + rename) and only then are the manifest and ``done.jsonl`` appended, so
an interrupted run loses at most the sources still in memory; re-running skips the finished sources. A source
counts as finished when its path and size match and either its modification time or its content (SHA-1 of the
file) does, so a data folder copied or re-synced without timestamps is not processed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_core.errors import UsfmaeError

__all__ = [
    "CORPUS_VERSION",
    "FrameCorpus",
    "MixedCorpus",
    "VolumeCorpus",
    "corpus_preprocessing",
    "corpus_start_summary",
    "datalist_sources",
    "iter_source_files",
    "open_corpora",
    "prepare_corpus",
    "split_labelled_for_corpus",
]

CORPUS_VERSION = 1
_COMPANIONS = (".raw", ".zraw", ".img")  # data files of .mhd / .hdr headers: read through their header
_NEAR_DUP_MAD = 1.0  # mean absolute difference (grey levels) under which consecutive cine frames are the same


@dataclass
class _Options:
    image_size: int = 224
    axes: tuple[int, ...] = (0, 1, 2)
    frame_stride: int = 1
    crop_sector: bool = False
    remove_text: bool = False
    native_3d: bool = False
    volume_size: int = 96
    resize: str = "letterbox"


# ------------------------------------------------------------------------------------------------ discovery
def _access_problem(path: Path, err: OSError) -> str:
    """Why ``path`` cannot be used, from the error of ``os.stat`` (which follows symbolic links)."""
    if err.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link (its target does not exist)"
    if err.errno == errno.ELOOP:
        return "symbolic-link loop"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "cannot be accessed (permission denied)"
    return f"cannot be accessed ({err.strerror or err})"


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def iter_source_files(sources: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, str | None]]:
    """Yield ``(path, None)`` for each readable candidate and ``(path, reason)`` for everything that is skipped.

    Folders are walked recursively (sorted, so the order is reproducible). Skipped and reported: files of an
    unsupported type, broken symbolic links, symbolic-link loops, FIFOs / sockets / devices (never opened: reading a
    FIFO would wait forever), folders that cannot be read, hidden files of a supported type (names starting with
    ``.``, such as ``..png`` or macOS ``._scan.png``), symbolic links to folders (not followed: they can loop;
    pass their target as a source) and sub-folders holding a usfmae run (its outputs are not data). Other hidden
    files and hidden folders (``.git``, ``.DS_Store``) are passed over silently, as are the data files of ``.mhd`` /
    ``.hdr`` headers.
    """
    from usfmae_core.data.readers import is_supported
    from usfmae_core.runs import RUN_FOLDER_SKIPPED, run_folder_command

    for src in sources:
        src = Path(src)
        try:
            st = os.stat(src)
        except OSError as err:
            yield src, ("does not exist" if err.errno == errno.ENOENT and not os.path.islink(src)
                        else _access_problem(src, err))
            continue
        if stat.S_ISREG(st.st_mode):
            yield (src, None) if is_supported(src) else (src, f"unsupported file type '{src.suffix}'")
            continue
        if not stat.S_ISDIR(st.st_mode):
            yield src, f"{_special_kind(st.st_mode)}, not a file"
            continue
        unreadable: list[OSError] = []
        for root, dirs, files in os.walk(src, onerror=unreadable.append):
            while unreadable:
                err = unreadable.pop(0)
                yield Path(err.filename or root), f"folder cannot be read ({err.strerror or err}): not searched"
            keep = []
            for d in sorted(dirs):
                if d.startswith("."):
                    continue
                if os.path.islink(os.path.join(root, d)):
                    yield Path(root) / d, "symbolic link to a folder: not followed (pass its target as a source)"
                    continue
                command = run_folder_command(os.path.join(root, d))
                if command is not None:
                    yield Path(root) / d, f"{RUN_FOLDER_SKIPPED.format(command=command)}: not searched"
                    continue
                keep.append(d)
            dirs[:] = keep
            for name in sorted(files):
                p = Path(root) / name
                try:
                    st = os.stat(p)
                except OSError as err:
                    yield p, _access_problem(p, err)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    if stat.S_ISDIR(st.st_mode):  # a symbolic link to a folder
                        yield p, "symbolic link to a folder: not followed (pass its target as a source)"
                    else:
                        yield p, f"{_special_kind(st.st_mode)}, not a file"
                    continue
                if name.startswith("."):
                    if is_supported(p):
                        yield p, "hidden file (its name starts with '.'): rename it to include it"
                    continue
                if is_supported(p):
                    yield p, None
                elif p.suffix.lower() in _COMPANIONS:
                    continue
                else:
                    yield p, f"unsupported file type '{p.suffix or name}'"
        while unreadable:
            err = unreadable.pop(0)
            yield Path(err.filename or src), f"folder cannot be read ({err.strerror or err}): not searched"


# --------------------------------------------------------------------------------------------- per source work
def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _letterbox_slices(stack: np.ndarray, spacing_hw: tuple[float, float], size: int) -> np.ndarray:
    """``(N, h, w)`` slices with physical spacing -> ``(N, S, S)`` float, isotropic in plane, centred, zero padded."""
    from usfmae_core.data.transforms import resize_to_square

    return resize_to_square(stack, size, "letterbox", spacing_hw).numpy()


def _native_volume(vol: np.ndarray, spacing: Sequence[float], size: int) -> tuple[np.ndarray, float]:
    """Resample a volume to an isotropic cube of side ``size`` (letterboxed); returns (uint8, new spacing mm).

    The rule volume classifiers see too (:func:`~usfmae_core.data.volumes.volume_to_cube`), so a ``--native-3d``
    MAE is fine-tuned on what it was pretrained on."""
    from usfmae_core.data.volumes import volume_to_cube

    cube, step = volume_to_cube(vol, spacing, size)
    return _to_uint8(cube[0].numpy()), step


def _finish_frames(frames: np.ndarray, size: int, resize: str = "letterbox",
                   spacing: Sequence[float] | None = None) -> np.ndarray:
    """Scale each frame (the fine-tuning rule), letterbox or squash it to S x S (the fine-tuning rule too,
    :func:`~usfmae_core.data.transforms.resize_to_square`), quantise to uint8."""
    from usfmae_core.data.transforms import resize_to_square, scale_intensity

    scaled = np.stack([scale_intensity(f) for f in frames]) if len(frames) else frames.astype(np.float32)
    return _to_uint8(resize_to_square(scaled, size, resize, spacing).numpy())


def _file_sha1(path: str | Path) -> str | None:
    """SHA-1 of a file's bytes (None when it cannot be read): recognises a finished source whose timestamp changed."""
    h = hashlib.sha1()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO / device: it could block forever
            return None
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _process_source(path: str, opts: _Options) -> dict[str, Any]:
    """Read one source and return its finished frames (uint8 ``(N, S, S)``), per-frame records, optional volume,
    and ``file_sha1`` for resuming."""
    return {**_frames_of_source(path, opts), "file_sha1": _file_sha1(path)}


def _frames_of_source(path: str, opts: _Options) -> dict[str, Any]:
    from usfmae_core.data.masks import label_like
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.sector import detect_imaged_region, remove_annotations
    from usfmae_core.data.transforms import informative_frames

    t0 = time.perf_counter()
    try:
        img = read_ultrasound(path)
    except UsfmaeError as err:
        return {"source": path, "error": err.cause}
    except Exception as err:  # noqa: BLE001 - a reader bug must not end the run either
        return {"source": path, "error": f"{type(err).__name__}: {err}"[:300]}
    S = opts.image_size
    records: list[dict] = []
    chunks: list[np.ndarray] = []
    stats = {"empty": 0, "near_duplicate": 0}
    try:
        a = img.array
        if img.kind == "volume":
            lo, hi = float(a.min()), float(a.max())
            for axis in opts.axes:
                if axis >= a.ndim:
                    continue
                stack = np.moveaxis(a, axis, 0)
                keep = informative_frames(stack, lo, hi)  # judged on the volume's range, not per slice
                stats["empty"] += int((~keep).sum())
                idx = np.nonzero(keep)[0]
                if idx.size == 0:
                    continue
                sp = [s for i, s in enumerate(img.spacing) if i != axis]
                boxed = _letterbox_slices(stack[idx], (sp[0], sp[1]), S)
                from usfmae_core.data.transforms import scale_intensity

                chunks.append(_to_uint8(np.stack([scale_intensity(f) for f in boxed])))
                iso = max(stack.shape[1] * sp[0], stack.shape[2] * sp[1]) / S
                records += [{"frame": int(i), "axis": int(axis), "kind": "volume", "spacing": [iso, iso],
                             "crop": None} for i in idx]
        else:
            if img.kind == "cine":
                idx = np.arange(0, a.shape[0], max(1, opts.frame_stride))
                frames = a[idx]
                spacing = list(img.spacing[1:])
            else:
                idx = np.array([0])
                frames = a[None]
                spacing = list(img.spacing)
            crop = None
            if opts.crop_sector:
                crop = detect_imaged_region(frames)
                if crop is not None:
                    y0, y1, x0, x1 = crop
                    frames = frames[:, y0:y1, x0:x1]
            if opts.remove_text:
                cm = img.meta.get("colour_mask")
                if cm is not None:
                    cm = cm[idx] if cm.ndim == 3 else cm
                    if crop is not None:
                        cm = cm[..., crop[0]:crop[1], crop[2]:crop[3]]
                frames, _ = remove_annotations(frames, cm)
            keep = informative_frames(frames)
            stats["empty"] += int((~keep).sum())
            frames, idx = frames[keep], idx[keep]
            out = (_finish_frames(frames, S, opts.resize, spacing[-2:]) if len(frames)
                   else np.zeros((0, S, S), np.uint8))
            if img.kind == "cine" and len(out) > 1:
                sel = [0]
                for i in range(1, len(out)):
                    if np.abs(out[i].astype(np.int16) - out[sel[-1]]).mean() >= _NEAR_DUP_MAD:
                        sel.append(i)
                stats["near_duplicate"] += len(out) - len(sel)
                out, idx = out[sel], idx[sel]
            sy, sx = spacing[-2], spacing[-1]
            if crop is not None:
                ch, cw = crop[1] - crop[0], crop[3] - crop[2]
            else:
                ch, cw = a.shape[-2], a.shape[-1]
            chunks.append(out)
            sp_out = [sy * ch / S, sx * cw / S]
            if opts.resize == "letterbox":  # one physical pixel size on both axes, set by the longer extent
                sp_out = [max(sy * ch, sx * cw) / S] * 2
            records += [{"frame": int(i), "axis": None, "kind": img.kind,
                         "spacing": sp_out, "crop": list(crop) if crop else None} for i in idx]
        frames_u8 = np.concatenate(chunks) if chunks else np.zeros((0, S, S), np.uint8)
        volume = None
        if opts.native_3d and img.kind == "volume":
            vol, iso = _native_volume(img.array, img.spacing, opts.volume_size)
            volume = {"array": vol, "spacing": [iso] * 3, "shape": list(img.array.shape),
                      "source_spacing": list(img.spacing)}
    except MemoryError:
        return {"source": path, "error": "out of memory while processing (file too large)"}
    except Exception as err:  # noqa: BLE001 - e.g. an absurd geometry; reported, never fatal
        return {"source": path, "error": f"{type(err).__name__}: {err}"[:300]}
    return {"source": path, "kind": img.kind, "frames": frames_u8, "records": records, "volume": volume,
            "stats": stats, "seconds": time.perf_counter() - t0, "source_spacing": list(img.spacing),
            "label_like": label_like(img.array) if img.kind != "cine" else None,
            "colour": float(img.meta.get("colour_fraction") or 0.0) > 0,
            "non_square": img.kind != "volume" and max(img.array.shape[-2:]) > 1.02 * min(img.array.shape[-2:])}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: intra-op threads would only fight each other


# ---------------------------------------------------------------------------------------------- the cache
def _atomic_write_text(path: Path, text: str) -> None:
    from usfmae_core.fileio import atomic_write_text

    atomic_write_text(path, text)


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append JSON lines and ``fsync`` them before anything that refers to them is written."""
    from usfmae_core.fileio import printable

    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(printable(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file, dropping a torn last line from an interrupted write (and rewriting the file)."""
    if not path.exists():
        return []
    rows, bad = [], False
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad = True
    if bad:
        _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _source_key(p: Path) -> dict:
    st = p.stat()
    return {"source": str(p.resolve()), "size": st.st_size, "mtime": round(st.st_mtime, 3)}


class _Writer:
    """Buffers finished sources and writes them as one shard + manifest lines + done lines."""

    def __init__(self, out: Path, opts: _Options, shard_frames: int, flush_seconds: float = 30.0) -> None:
        self.out, self.opts, self.shard_frames, self.flush_seconds = out, opts, shard_frames, flush_seconds
        self.last_flush = time.monotonic()
        (out / "shards").mkdir(parents=True, exist_ok=True)
        for tmp in [*(out / "shards").glob(".*.tmp"), *out.glob("volumes/.*.tmp")]:  # writes cut by a kill
            tmp.unlink(missing_ok=True)
        self.summary = self._load_summary()
        manifest = _read_jsonl(out / "manifest.jsonl")
        referenced = {s["file"] for s in self.summary["shards"]}
        # a shard written just before a crash (manifest not yet appended) is unreferenced: drop it
        for f in (out / "shards").glob("*.npy*"):
            if f"shards/{f.name}" not in referenced:
                f.unlink()
        n_ref = sum(s["n"] for s in self.summary["shards"])
        if len(manifest) != n_ref:  # manifest appended partially before a crash: keep what the shards hold
            manifest = manifest[:n_ref]
            _atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in manifest))
        self.seen = {r["sha1"] for r in manifest}
        self.done = {d["source"]: d for d in _read_jsonl(out / "done.jsonl")}
        self.volumes = _read_jsonl(out / "volumes.jsonl")
        self.vol_seen = {v["sha1"] for v in self.volumes}
        self.buffer: list[dict] = []
        self.buffered = 0
        self.counts = {"frames_written": 0, "duplicates_removed": 0, "empty_frames_skipped": 0,
                       "near_duplicates_removed": 0, "volumes_written": 0, "colour_sources": 0,
                       "non_square_sources": 0}  # this run
        self.earlier_counts = dict(self.summary.get("counts", {}))  # earlier (interrupted or resumed) runs

    def total_counts(self) -> dict[str, int]:
        """Counts over every run that built this corpus."""
        return {k: int(self.earlier_counts.get(k, 0)) + v for k, v in self.counts.items()}

    def _load_summary(self) -> dict:
        path = self.out / "corpus.json"
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.opts).items()}
        if path.exists():
            s = json.loads(path.read_text())
            if s.get("image_size") != self.opts.image_size:
                raise UsfmaeError(f"{self.out} was prepared with image size {s.get('image_size')}, "
                                  f"not {self.opts.image_size}", "use the same --image-size or a new --out folder")
            before = (s.get("options") or {}).get("resize", "squash")  # corpora older than the option squashed
            if s.get("n_frames") and before != self.opts.resize:
                raise UsfmaeError(f"{self.out} was prepared with --resize {before}, not {self.opts.resize}",
                                  f"pass --resize {before} to add to it, or use a new --out folder")
            s["options"] = opts
            return s
        return {"version": CORPUS_VERSION, "image_size": self.opts.image_size, "n_frames": 0, "shards": [],
                "options": opts}

    def is_done(self, key: dict) -> bool:
        d = self.done.get(key["source"])
        if d is None or d.get("size") != key["size"]:
            return False
        # same timestamp, or (copied / re-synced folder) same content
        return d.get("mtime") == key["mtime"] or (d.get("sha1") is not None and d["sha1"] == _file_sha1(key["source"]))

    def add_mask(self, key: dict, result: dict, scan: str, reason: str) -> None:
        """A source found to be a mask by its content: nothing written, remembered as done (resume skips it)."""
        self.buffer.append({"done": {**key, "sha1": result.get("file_sha1"), "status": "mask", "scan": scan,
                                     "reason": reason}})
        self.flush_if_due()

    def add(self, key: dict, result: dict) -> None:
        if "error" in result:
            self.buffer.append({"done": {**key, "sha1": result.get("file_sha1"), "status": "skipped",
                                         "reason": result["error"]}})
            self.flush_if_due()
            return
        frames, recs = result["frames"], result["records"]
        keep, hashes = [], []
        for i in range(len(frames)):
            h = hashlib.sha1(frames[i].tobytes()).hexdigest()
            if h in self.seen:
                self.counts["duplicates_removed"] += 1
                continue
            self.seen.add(h)
            keep.append(i)
            hashes.append(h)
        st = result["stats"]
        self.counts["colour_sources"] += int(bool(result.get("colour")))
        self.counts["non_square_sources"] += int(bool(result.get("non_square")))
        self.counts["empty_frames_skipped"] += st["empty"]
        self.counts["near_duplicates_removed"] += st["near_duplicate"]
        if len(frames) == 0 and st["empty"] and result.get("volume") is None:  # a file that gave nothing: named
            self.buffer.append({"done": {**key, "sha1": result.get("file_sha1"), "status": "skipped",
                                         "reason": f"every frame ({st['empty']}) is empty: blank, nearly black or "
                                                   "one extreme pixel value"}})
            self.flush_if_due()
            return
        entry = {"frames": frames[keep], "records": [{**recs[i], "sha1": h} for i, h in zip(keep, hashes)],
                 "volume": result.get("volume"), "kind": result["kind"],
                 "done": {**key, "sha1": result.get("file_sha1"), "status": "ok", "kind": result["kind"],
                          "n_frames": len(keep)}}
        self.buffer.append(entry)
        self.buffered += len(keep)
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Write what is buffered once a shard is full or ``flush_seconds`` have passed since the last write, so an
        interrupted run loses at most that much work."""
        if self.buffer and (self.buffered >= self.shard_frames
                            or time.monotonic() - self.last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        out = self.out
        frames = [e["frames"] for e in self.buffer if "frames" in e and len(e["frames"])]
        manifest_lines, vol_lines = [], []
        if frames:
            arr = np.concatenate(frames)
            k = len(self.summary["shards"])
            name = f"shards/shard_{k:05d}.npy"
            from usfmae_core.fileio import atomic_write

            atomic_write(out / name, lambda f: np.save(f, arr))
            pos = 0
            for e in self.buffer:
                for r in e.get("records", []):
                    manifest_lines.append(json.dumps({"shard": k, "index": pos, "source": e["done"]["source"], **r}))
                    pos += 1
            self.summary["shards"].append({"file": name, "n": len(arr)})
            self.summary["n_frames"] += len(arr)
            self.counts["frames_written"] += len(arr)
        for e in self.buffer:  # native volumes are one file each, written before their source is marked done
            v = e.get("volume")
            if v is None:
                continue
            h = hashlib.sha1(v["array"].tobytes()).hexdigest()
            if h in self.vol_seen:
                continue
            self.vol_seen.add(h)
            (out / "volumes").mkdir(exist_ok=True)
            name = f"volumes/volume_{len(self.volumes):05d}.npy"
            from usfmae_core.fileio import atomic_write

            atomic_write(out / name, lambda f, a=v["array"]: np.save(f, a))
            row = {"file": name, "source": e["done"]["source"], "spacing": v["spacing"], "shape": v["shape"],
                   "source_spacing": v["source_spacing"], "sha1": h}
            self.volumes.append(row)
            vol_lines.append(json.dumps(row))
            self.counts["volumes_written"] += 1
        if manifest_lines:
            _append_lines(out / "manifest.jsonl", manifest_lines)
        if vol_lines:
            _append_lines(out / "volumes.jsonl", vol_lines)
        self.summary["n_volumes"] = len(self.volumes)
        self.summary["volume_size"] = self.opts.volume_size
        self.summary["counts"] = self.total_counts()  # saved with the sources they count, so resume can add to them
        _atomic_write_text(out / "corpus.json", json.dumps(self.summary, indent=1))
        for e in self.buffer:
            self.done[e["done"]["source"]] = e["done"]
        _append_lines(out / "done.jsonl", [json.dumps(e["done"]) for e in self.buffer])
        self.buffer, self.buffered = [], 0


def corpus_start_summary(files: Sequence[Path], masks: Sequence[dict], skipped: Sequence[dict], resumed: int = 0,
                         include_masks: bool = False) -> list[str]:
    """The lines ``usfmae prepare`` prints before it reads anything: files found per format family, masks found by
    name (count and examples), unsupported files, sources already done."""
    from usfmae_core.data.readers import file_format

    fams = Counter(file_format(p) or "dicom" for p in files)
    order = ("image", "video", "dicom", "itk")
    names = {"image": "images", "video": "videos", "dicom": "DICOM", "itk": "NIfTI/NRRD/MetaImage"}
    lines = [f"found {len(files)} ultrasound files (" + ", ".join(f"{fams[f]} {names[f]}" for f in order if fams[f])
             + ")" + (f", {resumed} already in the corpus" if resumed else "")]
    if masks:
        ex = ", ".join(Path(m["path"]).name for m in list(masks)[:3]) + (", ..." if len(masks) > 3 else "")
        lines.append(f"masks / annotation files by name: {len(masks)} "
                     + ("kept as images (--include-masks)" if include_masks else "left out") + f" (e.g. {ex})")
    if skipped:
        lines.append(f"not ultrasound files (unsupported type or missing): {len(skipped)}")
    return lines


def prepare_corpus(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    image_size: int = 224,
    axes: Sequence[int] = (0, 1, 2),
    frame_stride: int = 1,
    crop_sector: bool = False,
    remove_text: bool = False,
    native_3d: bool = False,
    workers: int = 1,
    progress: bool = True,
    volume_size: int = 96,
    shard_frames: int = 4096,
    exclude: Iterable[str | os.PathLike] = (),
    exclude_reason: str = "held out",
    include_masks: bool = False,
    mask_patterns: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    resize: str = "letterbox",
    overwrite: bool = False,
    flush_seconds: float = 30.0,
) -> dict[str, Any]:
    """Build (or resume) a frame corpus from files / folders; returns the report (also ``out/report.json``).

    Segmentation masks and annotation files among the sources (:mod:`usfmae_core.data.masks`: by name - ``_mask``,
    ``masks/`` ... - before anything is read, by content - few grey levels beside a scan - once read) are not put
    into the corpus unless ``include_masks``; the report lists them under ``masks`` (path, scan, reason).

    Args:
        sources: files or folders (walked recursively, see :func:`iter_source_files` for what is skipped).
        out: corpus folder (locked while it is written; a folder holding another command's run is refused).
        image_size: side ``S`` of the stored ``(S, S)`` uint8 frames.
        axes: array axes along which volumes are sliced.
        frame_stride: keep every n-th cine frame.
        crop_sector: crop to the detected imaged region (drops black borders and side panels).
        resize: how 2D images and clip frames become ``S x S``: ``letterbox`` (aspect ratio kept, black padding;
            physical aspect with the file's pixel spacing) or ``squash``, the rule fine-tuning applies
            (:func:`~usfmae_core.data.transforms.resize_to_square`); volume slices are always letterboxed. A corpus
            keeps one rule: resuming with another is refused.
        remove_text: detect and inpaint burned-in text, calipers, markers and colour overlays.
        native_3d: also write isotropic volumes ``(V, V, V)`` for 3D pretraining.
        workers: processes (1 = in this process).
        progress: show a tqdm progress bar.
        volume_size: side ``V`` of native 3D volumes.
        shard_frames: frames per shard (a shard holds whole sources, so it can be a little larger).
        exclude: files that must never enter the corpus (e.g. the validation / test images of a labelled set, see
            :func:`datalist_sources`): a source is left out when its resolved path is one of them, or when its bytes
            equal one of them (a copy under another name). Left-out sources are counted and listed in the report
            (``excluded``), with ``exclude_reason``.
        include_masks: keep mask / annotation files as sources (still listed, ``kept``).
        mask_patterns: extra globs naming mask files (``--mask-pattern``).
        log: where to print the start summary (files found per format, masks set aside); None: silent.
        overwrite: delete the corpus in ``out`` first (default: resume it, adding new sources).
        flush_seconds: also write a shard after this many seconds of work, so a kill loses at most about that much.

    Raises:
        UsfmaeError: a source does not exist, nothing readable was found, or no frame could be prepared (the skip
            report is written first).
    """
    from tqdm.auto import tqdm

    from usfmae_core.data.masks import MaskRules, split_masks
    from usfmae_core.runs import RunFolder, check_run

    t0 = time.perf_counter()
    out = Path(out)
    sources = [Path(s) for s in sources]
    if not sources:
        raise UsfmaeError("no source was given", "pass files or folders of ultrasound to prepare")
    for src in sources:
        if not os.path.lexists(src):
            raise UsfmaeError(f"source {src} does not exist", "check the path (files or folders of ultrasound)")
    from usfmae_core.data.transforms import RESIZE_MODES

    if resize not in RESIZE_MODES:
        raise UsfmaeError(f"unknown --resize '{resize}'", f"choose one of {', '.join(RESIZE_MODES)}")
    opts = _Options(int(image_size), tuple(int(a) for a in axes), int(frame_stride), bool(crop_sector),
                    bool(remove_text), bool(native_3d), int(volume_size), str(resize))
    if opts.image_size < 16:
        raise UsfmaeError(f"--image-size {opts.image_size} is too small", "use at least 16 (224 is the default)")
    if not opts.axes or any(a not in (0, 1, 2) for a in opts.axes):
        raise UsfmaeError(f"--axes {' '.join(map(str, opts.axes))} is invalid", "choose among 0, 1 and 2")
    if opts.frame_stride < 1 or opts.volume_size < 8:
        raise UsfmaeError("--frame-stride must be >= 1 and --volume-size >= 8", "pass valid values")
    check_run(out, "prepare", overwrite=overwrite)
    # walked before anything is written: masks by name, judged below each source folder (a 'labels/' above it says
    # nothing)
    rules = MaskRules.with_patterns(mask_patterns)
    found: list[Path] = []
    skipped_now: list[dict] = []
    masks: list[dict] = []
    for src in sources:
        files = []
        for p, reason in iter_source_files([src]):
            if reason is not None:
                skipped_now.append({"path": str(p), "reason": reason})
            else:
                files.append(p)
        root = src if src.is_dir() else None
        _, named = split_masks(files, rules, root)
        masks += [{**m.to_dict(), **({"kept": True} if include_masks else {})} for m in named]
        skip = set() if include_masks else {m.path for m in named}
        found += [p for p in files if str(p) not in skip]
    if not found and not (out / "corpus.json").exists():
        what = ", ".join(str(s) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        first = skipped_now[0] if skipped_now else None
        detail = (f" ({len(skipped_now)} skipped, first: {first['path']}: {first['reason']})" if first else
                  f" ({len(masks)} mask / annotation file(s) set aside)" if masks else " (no files at all)")
        raise UsfmaeError(f"no ultrasound files to prepare in {what}{detail}",
                          "pass folders holding PNG/JPG/TIFF, DICOM, NIfTI, NRRD, MetaImage or video files")
    with RunFolder(out, "prepare", resume=True, overwrite=overwrite) as run:
        report = _prepare(found, skipped_now, masks, rules, out, opts, workers, progress, shard_frames,
                          flush_seconds, exclude, exclude_reason, include_masks, log, t0, tqdm)
        if report["n_frames"] == 0 and report["n_volumes"] == 0:
            first = report["skipped"][0] if report["skipped"] else {"path": "-", "reason": "no usable frame"}
            raise UsfmaeError(f"no frame could be prepared from {len(found)} file(s): every one was skipped or "
                              f"empty (first: {first['path']}: {first['reason']})",
                              f"see {out / 'report.json'} for every file and reason")
        run.finish(n_frames=report["n_frames"])
    return report


def _prepare(found: list[Path], skipped_now: list[dict], masks: list[dict], rules: Any, out: Path, opts: _Options,
             workers: int, progress: bool, shard_frames: int, flush_seconds: float,
             exclude: Iterable[str | os.PathLike], exclude_reason: str, include_masks: bool,
             log: Callable[[str], None] | None, t0: float, tqdm: Any) -> dict[str, Any]:
    """The work of :func:`prepare_corpus` once its folder is locked."""
    from usfmae_core.data.masks import ScanIndex, companion_scan

    writer = _Writer(out, opts, int(shard_frames), float(flush_seconds))
    held_out = {str(Path(e).resolve()) for e in exclude}
    held_out_sha1 = {h for h in (_file_sha1(e) for e in held_out) if h is not None}
    held_out_sizes = {Path(e).stat().st_size for e in held_out if Path(e).is_file()}
    for d in writer.done.values():  # an earlier run (without the exclusion) may have let them in already
        if held_out and d.get("status") == "ok" and d.get("n_frames") and (
                d["source"] in held_out or d.get("sha1") in held_out_sha1):
            raise UsfmaeError(f"corpus {out} already holds frames of {d['source']}, which is {exclude_reason}",
                              "prepare the corpus into a new --out folder")
    excluded: list[dict] = []
    queued: set[str] = set()
    index = ScanIndex(found)  # companion scans of masks found by content
    todo: list[tuple[Path, dict]] = []
    n_resumed = 0
    for p in found:
        try:
            key = _source_key(p)
        except OSError as err:  # removed or changed since the walk
            skipped_now.append({"path": str(p), "reason": _access_problem(p, err)})
            continue
        if key["source"] in queued:  # the same file listed twice (e.g. a folder and a datalist naming it)
            continue
        queued.add(key["source"])
        if held_out and (key["source"] in held_out or (key["size"] in held_out_sizes
                                                        and _file_sha1(p) in held_out_sha1)):
            why = exclude_reason if key["source"] in held_out else f"a copy of a file that is {exclude_reason}"
            excluded.append({"path": str(p), "reason": why})
            continue
        if writer.is_done(key):
            n_resumed += 1
        else:
            todo.append((p, key))
    if log is not None:
        for line in corpus_start_summary(found, masks, skipped_now, n_resumed, include_masks):
            log(line)
    n_sources_read = 0
    frames_before = writer.summary["n_frames"]
    work_seconds = 0.0
    bar = tqdm(total=len(todo), desc="prepare", unit="file", disable=not progress, dynamic_ncols=True)
    pool = None
    failed = False
    try:
        if workers > 1 and len(todo) > 1:
            pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=get_context("spawn"),
                                       initializer=_worker_init)
            results: Iterable = pool.map(_process_source, [str(p) for p, _ in todo], [opts] * len(todo),
                                         chunksize=max(1, min(16, len(todo) // (8 * workers))))
        else:
            results = (_process_source(str(p), opts) for p, _ in todo)
        for (p, key), res in zip(todo, results):
            scan = companion_scan(p, index, prefix=True) if res.get("label_like") else None
            if scan is not None and rules.content:
                reason = f"content: {res['label_like']}, beside a scan"
                if include_masks:
                    masks.append({"path": str(p), "scan": scan, "reason": reason, "kept": True})
                else:
                    writer.add_mask(key, res, scan, reason)
                    bar.update(1)
                    continue
            writer.add(key, res)
            if "error" not in res:
                n_sources_read += 1
                work_seconds += res["seconds"]
            bar.update(1)
            bar.set_postfix(frames=writer.summary["n_frames"] + writer.buffered, refresh=False)
    except BaseException:
        failed = True
        raise
    finally:
        try:
            writer.flush()  # whatever finished before an interruption is kept
        except OSError:
            if not failed:  # a failed write already on its way out is the error to report
                raise
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    skipped = skipped_now + [{"path": d["source"], "reason": d["reason"]} for d in writer.done.values()
                             if d.get("status") == "skipped"]
    masks += [{"path": d["source"], "scan": d.get("scan"), "reason": d["reason"]} for d in writer.done.values()
              if d.get("status") == "mask"]
    elapsed = time.perf_counter() - t0
    report = {
        "corpus": str(out),
        "n_frames": writer.summary["n_frames"],
        "n_volumes": len(writer.volumes),
        "sources_found": len(todo) + n_resumed,
        "sources_processed": len(todo),
        "sources_read": n_sources_read,
        "sources_resumed": n_resumed,
        "sources_skipped": len(skipped),
        "masks_excluded": sum(1 for m in masks if not m.get("kept")),
        "frames_added": writer.summary["n_frames"] - frames_before,
        "sources_excluded": len(excluded),
        **writer.counts,
        "totals": writer.total_counts(),
        "elapsed_s": round(elapsed, 3),
        "worker_seconds": round(work_seconds, 3),
        "skipped": skipped,
        "masks": sorted(masks, key=lambda m: m["path"]),
        "excluded": excluded,
    }
    _atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report


def split_labelled_for_corpus(labelled: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """The datalist JSON to draw a corpus from: ``labelled`` itself when it is one, else the split of a class-folder
    tree / CSV that ``usfmae finetune --seed SEED`` would make (deduplicated, group-aware, 15 % validation, 15 % test),
    written once to ``OUT/datalist.json`` (reused while its source and seed match). Fine-tune on that file, so the
    images held out here stay held out there."""
    from usfmae_core.data.labelled import labelled_source_to_datalist

    labelled = Path(labelled)
    if not labelled.exists():
        raise UsfmaeError(f"labelled data {labelled} does not exist",
                          "pass a datalist JSON, a class-per-folder tree or a CSV manifest")
    if labelled.suffix.lower() == ".json":
        return labelled
    path = Path(out) / "datalist.json"
    if path.exists():
        d = json.loads(path.read_text())
        if d.get("source") == str(labelled) and d.get("split_seed") == int(seed):
            return path
    d = labelled_source_to_datalist(labelled, seed=int(seed), val_fraction=0.15, test_fraction=0.15)
    d["split_seed"] = int(seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(d, indent=1))
    return path


def datalist_sources(datalist: str | os.PathLike, splits: Sequence[str] = ("training",)
                     ) -> tuple[list[str], list[str], dict[str, int]]:
    """The images of ``splits`` of a labelled datalist JSON (labels ignored), and the images of its other splits.

    For building a pretraining corpus from the unlabelled part of a labelled set without leaking held-out images:
    pass the first list as sources and the second as ``exclude`` of :func:`prepare_corpus`.

    Returns:
        (images to use, held-out images (every other split), images per split) with absolute paths; an image
        listed in both a used and a held-out split is held out.
    """
    from usfmae_core.data.labelled import load_datalist

    d = load_datalist(datalist)
    names = ("training", "validation", "test")
    unknown = [s for s in splits if s not in names]
    if unknown:
        raise UsfmaeError(f"unknown datalist split(s) {unknown}", f"choose from {', '.join(names)}")
    per = {s: [str(Path(it["image"]).resolve()) for it in d.get(s) or []] for s in names}
    held = {p for s in names if s not in splits for p in per[s]}
    use = list(dict.fromkeys(p for s in splits for p in per[s] if p not in held))
    if not use:
        raise UsfmaeError(f"datalist {datalist} has no images in {'/'.join(splits)} (outside its other splits)",
                          "check the datalist, or choose other --datalist-splits")
    return use, sorted(held), {s: len(v) for s, v in per.items()}


# ---------------------------------------------------------------------------------------------- readers
def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsfmaeError(f"{path} cannot be read ({str(err).splitlines()[0][:100]})",
                          f"prepare the corpus again: usfmae prepare SRC... --out {path.parent} --overwrite") from None
    if not isinstance(summary, dict):
        raise UsfmaeError(f"{path} is not a corpus summary", f"prepare the corpus again into {path.parent}")
    return summary


def _open_array(corpus: Path, name: str, shape: tuple[int, ...] | None, listed_in: Path) -> np.ndarray:
    """Memory-map ``corpus/name`` (a shard or volume), refusing a path outside the corpus folder, a missing, truncated
    or corrupt file, and an unexpected shape or type, with one line naming the file."""
    fix = f"prepare the corpus again: usfmae prepare SRC... --out {corpus} --overwrite"
    rel = Path(name)
    root = corpus.resolve()
    target = (corpus / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(root):
        raise UsfmaeError(f"{listed_in} names a file outside the corpus folder ({name})", fix)
    try:
        arr = np.load(corpus / rel, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UsfmaeError(f"corpus file {corpus / rel} listed in {listed_in.name} is missing", fix) from None
    except (OSError, ValueError, EOFError) as err:  # truncated (mmap longer than the file), bad header, pickled
        raise UsfmaeError(f"corpus file {corpus / rel} is corrupt ({str(err).splitlines()[0][:100]})", fix) from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or (shape is not None and arr.shape != shape):
        got = f"{getattr(arr, 'dtype', type(arr).__name__)} {tuple(getattr(arr, 'shape', ()))}"
        want = f"uint8 {shape}" if shape is not None else "uint8"
        raise UsfmaeError(f"corpus file {corpus / rel} holds {got}, not the {want} that {listed_in.name} says",
                          fix)
    return arr


class FrameCorpus:
    """Read-only view of a prepared corpus: ``len()``, ``corpus[i] -> uint8 (S, S)`` memory-mapped.

    Shards are opened lazily, so the object is cheap to pickle into DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        summary = self.path / "corpus.json"
        if not summary.exists():
            raise UsfmaeError(f"no frames in corpus {self.path} (corpus.json missing)",
                              f"run usfmae prepare SRC... --out {self.path}")
        self.summary = _read_summary(summary)
        try:
            self.image_size = int(self.summary["image_size"])
            self.shards = [{"file": str(s["file"]), "n": int(s["n"])} for s in self.summary.get("shards", [])
                           if int(s["n"]) > 0]
        except (KeyError, TypeError, ValueError):
            raise UsfmaeError(f"{summary} is damaged (image_size / shards entries are missing or not numbers)",
                              f"prepare the corpus again: usfmae prepare SRC... --out {self.path} --overwrite"
                              ) from None
        if not self.shards:
            raise UsfmaeError(f"no frames in corpus {self.path}", f"run usfmae prepare SRC... --out {self.path}")
        self._maps: dict[int, np.ndarray] = {}
        for k, s in enumerate(self.shards):  # refuse a damaged corpus now, not in a DataLoader worker mid-training
            self._maps[k] = _open_array(self.path, s["file"], (s["n"], self.image_size, self.image_size), summary)
        self.offsets = np.cumsum([0] + [s["n"] for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def frames_for_shard(self, k: int) -> np.ndarray:
        """The memory-mapped uint8 ``(N, S, S)`` array of shard ``k``."""
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = _open_array(self.path, self.shards[k]["file"],
                                            (self.shards[k]["n"], self.image_size, self.image_size),
                                            self.path / "corpus.json")
        return m

    def locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, int(i - self.offsets[k])

    def __getitem__(self, i: int) -> np.ndarray:
        k, j = self.locate(int(i))
        return self.frames_for_shard(k)[j]

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """``(B, S, S)`` uint8 for many indices with one fancy-indexed read per shard (order preserved)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), self.image_size, self.image_size), np.uint8)
        ks = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(ks):
            sel = np.nonzero(ks == k)[0]
            local = idx[sel] - self.offsets[k]
            order = np.argsort(local)  # sorted reads are sequential on disk
            out[sel[order]] = self.frames_for_shard(int(k))[local[order]]
        return out

    def manifest(self) -> list[dict]:
        return _read_jsonl(self.path / "manifest.jsonl")

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_maps"] = {}  # memory maps are reopened in the receiving process
        return d


class VolumeCorpus:
    """Read-only view of ``--native-3d`` volumes: ``corpus[i] -> uint8 (V, V, V)`` memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries = _read_jsonl(self.path / "volumes.jsonl")
        if not self.entries:
            raise UsfmaeError(f"no volumes in corpus {self.path}",
                              f"run usfmae prepare SRC... --native-3d --out {self.path}")
        listed = self.path / "volumes.jsonl"
        first = _open_array(self.path, str(self.entries[0].get("file", "")), None, listed)
        if first.ndim != 3 or len(set(first.shape)) != 1:
            raise UsfmaeError(f"corpus volume {self.path / self.entries[0]['file']} has shape {first.shape}, not a "
                              "cube", f"prepare the corpus again into {self.path} with --overwrite")
        self.volume_size = int(first.shape[0])
        for e in self.entries[1:]:  # refuse a damaged corpus now, not in a DataLoader worker mid-training
            _open_array(self.path, str(e.get("file", "")), (self.volume_size,) * 3, listed)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> np.ndarray:
        return _open_array(self.path, str(self.entries[int(i)]["file"]), (self.volume_size,) * 3,
                           self.path / "volumes.jsonl")


class MixedCorpus:
    """Several prepared corpora read as one: index ``i`` of the concatenation, with a mixing weight per corpus.

    The corpora must hold items of one shape (same ``--image-size`` for frames, same ``--volume-size`` for native
    volumes). The weights (summing to 1) are the shares of the training samples drawn from each corpus by
    :class:`usfmae_core.workflows.pretrain.MixtureSampler`; without weights each corpus counts by its size (plain
    concatenation).
    """

    def __init__(self, parts: Sequence[FrameCorpus | VolumeCorpus], weights: Sequence[float] | None = None) -> None:
        if not parts:
            raise ValueError("no corpora")
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.cumsum([0] + self.sizes)
        self.frames = isinstance(self.parts[0], FrameCorpus)
        attr = "image_size" if self.frames else "volume_size"
        sizes = {int(getattr(p, attr)) for p in self.parts}
        if len(sizes) > 1 or any(isinstance(p, FrameCorpus) != self.frames for p in self.parts):
            desc = ", ".join(f"{p.path} ({getattr(p, attr, '?')} px)" for p in self.parts)
            raise UsfmaeError(f"the corpora to mix hold items of different sizes: {desc}",
                              f"prepare them with the same --{attr.replace('_', '-')} (usfmae prepare ... "
                              f"--{attr.replace('_', '-')} N)")
        setattr(self, attr, sizes.pop())
        total = float(sum(self.sizes))
        raw = [float(w) for w in weights] if weights is not None else [n / total for n in self.sizes]
        if len(raw) != len(self.parts) or not all(np.isfinite(w) and w > 0 for w in raw):
            raise UsfmaeError(f"mixing weights {raw} do not match the {len(self.parts)} corpora",
                              "give one weight > 0 per corpus (PATH:WEIGHT) or none")
        self.weights = [w / sum(raw) for w in raw]
        self.weighted = weights is not None
        self.path = self.parts[0].path

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(corpus number, index inside it) of item ``i`` of the concatenation."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, int(i - self.offsets[k])

    def __getitem__(self, i: int) -> np.ndarray:
        k, j = self.locate(int(i))
        return self.parts[k][j]

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """``(B, S, S)`` uint8 frames for many indices (frame corpora only), order preserved."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), self.image_size, self.image_size), np.uint8)
        ks = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(ks):
            sel = np.nonzero(ks == k)[0]
            out[sel] = self.parts[int(k)].get_batch(idx[sel] - self.offsets[k])
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One ``{path, items, weight}`` per corpus (weight: share of the drawn samples)."""
        return [{"path": str(p.path), "items": n, "weight": round(w, 6)}
                for p, n, w in zip(self.parts, self.sizes, self.weights, strict=True)]


def corpus_preprocessing(corpus: Any) -> dict[str, Any]:
    """The geometry / colour rules frames of ``corpus`` (a :class:`FrameCorpus` or :class:`MixedCorpus`) were stored
    with, as :class:`~usfmae_core.data.transforms.Preprocessing` fields: ``resize`` (``squash`` for corpora prepared
    before the option existed; ``letterbox`` only when every part was letterboxed), ``crop_sector`` and ``colour``
    (``luma``: corpora are grey). For an MAE's checkpoint, so reconstructions and embeddings of new files match."""
    parts = list(getattr(corpus, "parts", [corpus]))
    opts = [dict((getattr(p, "summary", None) or {}).get("options") or {}) for p in parts]
    resize = {o.get("resize", "squash") for o in opts}
    return {"resize": "letterbox" if resize == {"letterbox"} else "squash",
            "crop_sector": all(bool(o.get("crop_sector")) for o in opts), "colour": "luma"}


def open_corpora(specs: Sequence[tuple[str | os.PathLike, float | None]], spatial_dims: int = 2
                 ) -> FrameCorpus | VolumeCorpus | MixedCorpus:
    """Open the corpora of ``specs`` (``(path, weight or None)``): one corpus without a weight is returned as it is,
    several as a :class:`MixedCorpus` (weighted when every corpus has a weight).

    Raises:
        UsfmaeError: a corpus is missing, not a folder or empty; weights given for some corpora but not all; a
            corpus listed twice; the corpora hold items of different sizes.
    """
    if not specs:
        raise UsfmaeError("no corpus given", "pass --corpus PATH[:WEIGHT] (one or more)")
    opened = []
    seen: set[str] = set()
    for path, _ in specs:
        path = Path(path)
        if not path.exists():
            raise UsfmaeError(f"corpus {path} does not exist", f"prepare one first: usfmae prepare SRC... --out {path}")
        if not path.is_dir():
            raise UsfmaeError(f"corpus {path} is not a folder", "pass the folder written by usfmae prepare")
        if str(path.resolve()) in seen:
            raise UsfmaeError(f"corpus {path} is given twice", "list each corpus once, with its weight")
        seen.add(str(path.resolve()))
        corpus = VolumeCorpus(path) if spatial_dims == 3 else FrameCorpus(path)
        if len(corpus) == 0:
            raise UsfmaeError(f"no {'volumes' if spatial_dims == 3 else 'frames'} in corpus {path}",
                              f"run usfmae prepare SRC...{' --native-3d' if spatial_dims == 3 else ''} --out {path}")
        opened.append(corpus)
    weights = [w for _, w in specs]
    given = [w is not None for w in weights]
    if len(specs) == 1:
        return opened[0]
    if any(given) and not all(given):
        missing = [str(p) for (p, w) in specs if w is None]
        raise UsfmaeError(f"mixing weights are given for some corpora but not for {', '.join(missing)}",
                          "give every corpus a weight (--corpus A:0.5 B:0.5) or none (plain concatenation)")
    return MixedCorpus(opened, weights if all(given) else None)
