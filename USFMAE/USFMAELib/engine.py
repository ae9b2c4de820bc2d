"""Finding the engine (``usfmae_core``) and the Python packages it needs, without importing any of them.

The built extension ships ``usfmae_core`` beside ``USFMAE.py`` (CMake copies it into the scripted-modules folder);
a source checkout added as a module path has it one folder up (``/path/to/repo/USFMAE/../usfmae_core``).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent

# The engine's runtime requirements apart from torch (installed through the PyTorch extension, which picks the
# build for the user's GPU), for the built extension, which does not ship pyproject.toml. A source checkout reads
# pyproject.toml instead (see requirements()); a test keeps this copy equal to it.
TORCH_REQUIREMENT = "torch>=2.4.1"
REQUIREMENTS: tuple[str, ...] = (
    "monai>=1.5,<1.7",
    "pytorch-ignite>=0.4.11,<0.6",
    "einops>=0.7",
    "numpy>=1.24,<3",
    "itk>=5.3",
    "SimpleITK>=2.3",
    "nibabel>=5.0",
    "pydicom>=2.4,<4",
    "pylibjpeg>=2.0",
    "pylibjpeg-openjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.0",
    "pillow>=10",
    "imageio[ffmpeg]>=2.30",
    "av>=11",
    "tqdm>=4.60",
    "fire>=0.5",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
    "pyyaml>=6",
)


def engine_root(module_dir: Path = MODULE_DIR) -> Path | None:
    """The folder that holds the ``usfmae_core`` package: the module's own folder (built extension) or its parent
    (source checkout); None when neither has it."""
    for root in (module_dir, module_dir.parent):
        if (root / "usfmae_core" / "__init__.py").is_file():
            return root
    return None


def ensure_engine_on_path(module_dir: Path = MODULE_DIR) -> bool:
    """Make ``import usfmae_core`` work; True when it can be imported (already installed, or found and added)."""
    if importlib.util.find_spec("usfmae_core") is not None:
        return True
    root = engine_root(module_dir)
    if root is None:
        return False
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.util.find_spec("usfmae_core") is not None


def _satisfied(requirement: str) -> bool:
    """True when an installed distribution satisfies ``requirement`` (name and version; extras are not checked)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging ships with Slicer and pip; without it, check the name only
        name = requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            return False
    req = Requirement(requirement)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def torch_installed() -> bool:
    """True when a torch distribution satisfying :data:`TORCH_REQUIREMENT` is installed (torch is not imported)."""
    return _satisfied(TORCH_REQUIREMENT)


def requirements(module_dir: Path = MODULE_DIR) -> tuple[str, ...]:
    """The engine's requirements apart from torch: from the source checkout's ``pyproject.toml`` when there is one
    (always current), else :data:`REQUIREMENTS`."""
    root = engine_root(module_dir)
    pyproject = root / "pyproject.toml" if root is not None else None
    if pyproject is None or not pyproject.is_file():
        return REQUIREMENTS
    try:
        import tomllib

        deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (ImportError, KeyError, ValueError, OSError):
        return REQUIREMENTS
    return tuple(d for d in deps if not d.replace(" ", "").startswith(("torch>", "torch=", "torch<", "torch;"))
                 and d.strip() != "torch")


def missing_requirements(module_dir: Path = MODULE_DIR) -> list[str]:
    """Requirement strings of :func:`requirements` that the installed packages do not satisfy."""
    return [r for r in requirements(module_dir) if not _satisfied(r)]


def engine_missing_message(module_dir: Path = MODULE_DIR) -> str | None:
    """None when ``usfmae_core`` can be imported; else one line saying where it was looked for and what to do."""
    if ensure_engine_on_path(module_dir):
        return None
    return (f"the usfmae engine (usfmae_core) was found neither beside the module ({module_dir}) nor in the folder "
            f"above it ({module_dir.parent}); reinstall the USFMAE extension, or add the folder of a source checkout "
            "(the one holding USFMAE.py) to the additional module paths")


if ensure_engine_on_path():
    from usfmae_core.errors import UsfmaeError
else:  # the module still loads and says what is missing (same message format as the engine's)
    class UsfmaeError(Exception):  # type: ignore[no-redef]
        """One-line user error ``<cause>; <fix>`` (the engine's class, when the engine cannot be imported)."""

        exit_code = 2

        def __init__(self, cause: str, fix: str = "") -> None:
            self.cause, self.fix = cause, fix
            super().__init__(f"{cause}; {fix}" if fix else cause)
