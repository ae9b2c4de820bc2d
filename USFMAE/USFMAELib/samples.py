"""Sample ultrasound for a first run without any data: made by the engine's phantom generator, offline.

Two samples, registered with Slicer's Sample Data module (category :data:`CATEGORY`) and loadable from the
module's *Get started* section:

* ``USFMAEPhantomVolume``: a 3D B-mode sweep with an irregular hypoechoic mass (NRRD, 0.3 x 0.3 x 0.5 mm);
* ``USFMAEPhantomCine``: a 2D+t sector clip with an anechoic cyst, 32 frames (Slicer sequence, ``.seq.nrrd``).

The files are written once by a background job (:func:`write_samples` runs in the child process, where the
generator may import torch) into ``$USFMAE_HOME/samples`` (default ``~/.usfmae/samples``), then loaded like any
sample data set: Sample Data's ``downloadFromSource`` takes ``file://`` URIs. They are synthetic: good for trying
every button, not for judging a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CATEGORY = "Ultrasound (USF-MAE)"


@dataclass(frozen=True)
class Sample:
    """One sample data set: what Sample Data registers (``sampleName``, ``fileNames``, ``nodeNames``,
    ``loadFileTypes``) and how the phantom makes it."""

    name: str
    file_name: str
    node_name: str
    load_file_type: str  # Slicer's IO file type: VolumeFile / SequenceFile
    description: str


SAMPLES: tuple[Sample, ...] = (
    Sample("USFMAEPhantomVolume", "USFMAE-phantom-volume.nrrd", "USFMAEPhantomVolume", "VolumeFile",
           "3D ultrasound phantom (mass)"),
    Sample("USFMAEPhantomCine", "USFMAE-phantom-cine.seq.nrrd", "USFMAEPhantomCine", "SequenceFile",
           "2D+t ultrasound cine phantom (cyst)"),
)


def samples_dir() -> Path:
    """``$USFMAE_HOME/samples`` (default ``~/.usfmae/samples``), beside the model cache."""
    return Path(os.environ.get("USFMAE_HOME", Path.home() / ".usfmae")).expanduser() / "samples"


def sample_path(sample: Sample, folder: str | os.PathLike | None = None) -> Path:
    return Path(folder or samples_dir()) / sample.file_name


def missing_samples(folder: str | os.PathLike | None = None) -> list[Sample]:
    """Samples whose file is not written yet."""
    return [s for s in SAMPLES if not sample_path(s, folder).is_file()]


def write_samples(folder: str) -> dict[str, str]:
    """Write every sample into ``folder`` (runs in a job's child process); returns ``{sample name: path}``.

    Deterministic (fixed seeds), written atomically (a half-written file is never taken for a sample).
    """
    from usfmae_core.data import phantom

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for sample in SAMPLES:
        path = sample_path(sample, out)
        tmp = path.with_name(f".tmp-{path.name}")
        if sample.name == "USFMAEPhantomVolume":
            volume = phantom.make_volume(2, (64, 128, 128), rng=7)  # (D, H, W): slices, depth, lateral
            phantom.write_volume(tmp, volume, spacing=(0.5, 0.3, 0.3))
        else:
            clip = phantom.make_cine(1, frames=32, size=160, rng=11)
            phantom.write_cine(tmp, clip, spacing=(0.04, 0.3, 0.3))
        os.replace(tmp, path)
        written[sample.name] = str(path)
    return written
