"""pytest set-up for the Slicer module's Qt-free parts: make ``USFMAELib`` importable (as Slicer does by putting the
module's folder on ``sys.path``), and quiet plotting / small thread use as in the engine's tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

MODULE_DIR = Path(__file__).resolve().parents[1]
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
