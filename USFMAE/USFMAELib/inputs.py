"""The module's inputs: which MRML nodes are images, their pixels, and the files a background job reads.

Accepted: scalar volumes, colour (vector) volumes, streaming volumes (compressed ultrasound streams and
recordings, decoded by their codec), and sequences of single-slice ones (cine), given as the sequence node or as a
sequence browser's proxy node. Refused with a one-line message: no selection, label maps, nodes that are not image
volumes, volumes without image data, streaming frames whose codec is missing, 2- or more than 4-component pixels.

Pixels are read straight from the node's ``vtkImageData`` because ``slicer.util.arrayFromVolume`` accepts only a
fixed list of class names (a streaming volume raises "Unsupported volume type") and fails with an AttributeError
when there is no image data. Array order is ``(K, J, I[, C])`` = (slices, rows, columns[, components]).

A job's input is written as NRRD with Slicer's own storage node, pixels unchanged (colour stays colour: the engine's
reader applies its documented colour rule), so the job folder can be opened in Slicer or passed to ``usfmae``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from USFMAELib.engine import UsfmaeError

KINDS = ("auto", "image", "cine", "volume")
INPUT_FILE = "input.nrrd"


def _name(node: Any) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


def check_volume(node: Any) -> None:
    """Raise :class:`UsfmaeError` unless ``node`` is an image volume whose pixels can be read now."""
    if node is None:
        raise UsfmaeError("no input is selected", "choose an ultrasound volume or sequence")
    name = _name(node)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise UsfmaeError(f"'{name}' is a label map (segment labels), not an ultrasound image",
                          "choose the image volume instead")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise UsfmaeError(f"'{name}' is a {node.GetClassName()}, not an image volume",
                          "choose a scalar, colour or streaming volume, or a sequence of them")
    if node.IsA("vtkMRMLStreamingVolumeNode") and node.GetFrame() is not None and not node.DecodeFrame():
        raise UsfmaeError(f"the current frame of streaming volume '{name}' cannot be decoded (codec "
                          f"'{node.GetCodecFourCC()}' is not available)",
                          "install the extension that provides the codec (SlicerIGSIO for video-compressed "
                          "recordings) and restart Slicer")
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None or image.GetNumberOfPoints() == 0:
        raise UsfmaeError(f"volume '{name}' has no image data", "load the image again or choose another volume")
    components = image.GetNumberOfScalarComponents()
    if components not in (1, 3, 4):
        raise UsfmaeError(f"volume '{name}' has {components}-component pixels, not grey or colour",
                          "choose a grey or colour ultrasound volume")


def volume_pixels(node: Any) -> np.ndarray:
    """A copy of the pixels of a scalar / vector / streaming volume: ``(K, J, I)`` or ``(K, J, I, C)``."""
    from vtk.util import numpy_support

    check_volume(node)
    image = node.GetImageData()
    components = image.GetNumberOfScalarComponents()
    shape = tuple(reversed(image.GetDimensions())) + ((components,) if components > 1 else ())
    return np.array(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape), copy=True)


def sequence_for(node: Any, scene: Any = None) -> Any:
    """The sequence behind ``node``: the node itself if it is a sequence, the sequence whose browser uses it as a
    proxy, or None."""
    if node is None:
        return None
    if node.IsA("vtkMRMLSequenceNode"):
        return node
    scene = node.GetScene() or scene
    if scene is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        seq = browsers.GetItemAsObject(i).GetSequenceNode(node)
        if seq is not None:
            return seq
    return None


def sequence_pixels(seq: Any) -> tuple[np.ndarray, Any]:
    """Every frame of a sequence of single-slice volumes stacked: ``(T, J, I[, C])``, and its first data node."""
    n = seq.GetNumberOfDataNodes()
    if n == 0:
        raise UsfmaeError(f"sequence '{_name(seq)}' is empty", "record or load frames first")
    frames, first = [], None
    for i in range(n):
        item = seq.GetNthDataNode(i)
        if item is None or not item.IsA("vtkMRMLScalarVolumeNode") or item.IsA("vtkMRMLLabelMapVolumeNode"):
            what = item.GetClassName() if item is not None else "nothing"
            raise UsfmaeError(f"sequence '{_name(seq)}' holds {what} at item {i}, not images",
                              "choose a sequence of ultrasound frames")
        try:
            arr = volume_pixels(item)
        except UsfmaeError as err:
            raise UsfmaeError(f"frame {i} of sequence '{_name(seq)}': {err.cause}", err.fix) from None
        if arr.shape[0] != 1:
            raise UsfmaeError(f"sequence '{_name(seq)}' holds 3D volumes ({arr.shape[0]} slices per item)",
                              "choose one time point (its proxy volume) and turn 'use the whole sequence' off")
        if frames and arr.shape[1:] != frames[0].shape:
            raise UsfmaeError(f"the frames of sequence '{_name(seq)}' differ in size ({frames[0].shape[:2]} at item "
                              f"0, {arr.shape[1:3]} at item {i})", "resample the frames to one size")
        frames.append(arr[0])
        first = first if first is not None else item
    return np.stack(frames), first


@dataclass
class ExportedInput:
    """What :func:`export_input` wrote.

    Attributes:
        path: the NRRD file.
        kind: ``image`` | ``cine`` | ``volume``: how the engine must read it.
        index_name: ``slice`` or ``frame`` (the results table's first column).
        shape: ``(K, J, I)`` of the reference node (where reconstructions go back).
        reference: the node whose geometry results copy (the input, or the proxy / first frame of a sequence).
        source: the node or sequence read.
        frames: slices or frames written (rows of per-slice / per-frame results of a 2D model).
        notes: what was changed on the way (said in the job log).
    """

    path: Path
    kind: str
    index_name: str
    shape: tuple[int, int, int]
    reference: Any
    source: Any
    frames: int
    notes: list[str] = field(default_factory=list)


def write_pixels(array: np.ndarray, path: Path, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Write ``(K, J, I[, C])`` pixels as NRRD with Slicer's volume storage node (spacing in I, J, K order)."""
    colour = array.ndim == 4
    node = slicer.vtkMRMLVectorVolumeNode() if colour else slicer.vtkMRMLScalarVolumeNode()
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*spacing)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # a short-lived job file: fast to write and read
    if not storage.WriteData(node):
        raise UsfmaeError(f"could not write the job input {path}", "check the free disk space and the temporary folder")
    return path


def export_input(node: Any, folder: str | Path, kind: str = "auto", use_sequence: bool = True) -> ExportedInput:
    """Write the pixels of ``node`` (or of every frame of the sequence behind it) to ``folder/input.nrrd``.

    ``kind`` ``auto``: a single-slice volume is an image, a multi-slice one a volume, a sequence a cine;
    ``image`` / ``cine`` / ``volume`` say how to read the slices instead.
    """
    kind = (kind or "auto").lower()
    if kind not in KINDS:
        raise UsfmaeError(f"unknown input kind '{kind}'", f"choose one of {', '.join(KINDS)}")
    if node is None:
        raise UsfmaeError("no input is selected", "choose an ultrasound volume or sequence")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seq = sequence_for(node) if use_sequence or node.IsA("vtkMRMLSequenceNode") else None
    notes: list[str] = []
    if seq is not None:
        pixels, first = sequence_pixels(seq)
        if kind == "image":
            raise UsfmaeError(f"sequence '{_name(seq)}' has {pixels.shape[0]} frames, not one",
                              "choose kind 'cine' or 'auto', or turn 'use the whole sequence' off")
        reference = node if node.IsA("vtkMRMLScalarVolumeNode") else first
        kind = "cine" if kind == "auto" else kind
        index_name = "frame" if kind == "cine" else "slice"
        shape = (1,) + tuple(int(s) for s in pixels.shape[1:3])
        spacing = tuple(reference.GetSpacing()[:2]) + (1.0,)
        frames = int(pixels.shape[0])
        notes.append(f"{frames} frames of sequence '{_name(seq)}'")
    else:
        pixels = volume_pixels(node)
        reference, first = node, node
        k = int(pixels.shape[0])
        if kind == "image" and k != 1:
            raise UsfmaeError(f"'{_name(node)}' has {k} slices, not one",
                              "choose kind 'volume' or 'cine', or a 2D image")
        if kind == "auto":
            kind = "image" if k == 1 else "volume"
        index_name = "frame" if kind == "cine" else "slice"
        shape = tuple(int(s) for s in pixels.shape[:3])
        spacing = tuple(node.GetSpacing())
        frames = k
    if pixels.ndim == 4 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
        notes.append("alpha channel ignored (RGBA -> RGB)")
    path = write_pixels(pixels, folder / INPUT_FILE, spacing)
    return ExportedInput(path, kind, index_name, shape, reference, seq if seq is not None else node, frames, notes)


def read_volume_file(path: str | Path) -> np.ndarray:
    """Pixels ``(K, J, I)`` of a volume file written by a job (read with Slicer's volume storage node)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not Path(path).is_file() or not storage.ReadData(node):
        raise UsfmaeError(f"the job's result {path} cannot be read", "run the job again; see its log")
    from vtk.util import numpy_support

    image = node.GetImageData()
    return np.array(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        tuple(reversed(image.GetDimensions()))), copy=True)
