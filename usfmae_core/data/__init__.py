"""Ultrasound data layer: readers, preprocessing transforms, corpus cache, training datasets, labelled splits, phantom.

Submodules are imported lazily by their users (``from usfmae_core.data.readers import read_ultrasound``) so that
``import usfmae_core.data`` stays cheap.
"""

from usfmae_core.data.readers import SUPPORTED_EXTENSIONS, UltrasoundImage, is_supported, read_ultrasound

__all__ = ["SUPPORTED_EXTENSIONS", "UltrasoundImage", "is_supported", "read_ultrasound"]
