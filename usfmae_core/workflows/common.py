"""What every workflow shares: output folders, JSON files, seeding and progress reporting.

Progress goes to a tqdm bar in the terminal. When the environment variable ``USFMAE_PROGRESS_LINES=1`` is set
(the Slicer module sets it for its child processes) each update is also printed as one machine-readable line::

    USFMAE_PROGRESS {"stage": "pretrain", "step": 12, "total": 100, "elapsed_s": 3.1, "eta_s": 22.7, "loss": 0.41}

and :func:`parse_progress_line` reads it back.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import Self

from usfmae_core import fileio

PROGRESS_PREFIX = "USFMAE_PROGRESS "


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically and durably (:func:`usfmae_core.fileio.write_json`); NumPy / torch
    values and paths are converted, file names that are not UTF-8 escaped."""
    return fileio.write_json(path, obj, default=_plain)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file atomically and durably (:func:`usfmae_core.fileio.write_csv`); floats with up to 6
    significant digits, NaN empty, file names that are not UTF-8 escaped."""
    return fileio.write_csv(path, header, rows)


def _plain(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def prepare_output_dir(out: str | Path, run_config: dict[str, Any] | None = None) -> Path:
    """Create the run's output folder and record the configuration used (``config.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if run_config is not None:
        write_json(out / "config.json", {k: v for k, v in run_config.items() if k != "func"})
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_lines_enabled() -> bool:
    return os.environ.get("USFMAE_PROGRESS_LINES", "") == "1"


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The dict of a ``USFMAE_PROGRESS {...}`` line, or None for any other line."""
    line = line.strip()
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None


class Progress:
    """A tqdm bar that also emits machine-readable progress lines for the Slicer module.

    Args:
        total: number of steps.
        stage: name of the work (``prepare``, ``pretrain``, ``finetune``, ...).
        disable: no bar (lines are still emitted when enabled).
        initial: steps already done (on resume).
    """

    def __init__(self, total: int, stage: str, disable: bool = False, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.total, self.stage, self.step = total, stage, initial
        self.start = time.monotonic()
        self.start_step = initial
        self.lines = progress_lines_enabled()
        self.bar = tqdm(total=total, initial=initial, desc=stage, disable=disable or self.lines, dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, n: int = 1, **metrics: float) -> None:
        self.step += n
        self.bar.update(n)
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in metrics.items()},
                                 refresh=False)
        if self.lines:
            self.emit(**metrics)

    def emit(self, **fields: Any) -> None:
        elapsed = time.monotonic() - self.start
        done = self.step - self.start_step
        eta = elapsed / done * (self.total - self.step) if done > 0 else None
        record = {"stage": self.stage, "step": self.step, "total": self.total, "elapsed_s": round(elapsed, 2),
                  "eta_s": None if eta is None else round(eta, 1), **fields}
        print(PROGRESS_PREFIX + json.dumps(record, default=_plain), flush=True)

    def write(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self.lines:
            print(message, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
