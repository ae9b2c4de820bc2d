"""What to install into Slicer's Python for the engine, decided without Qt and without importing any package.

Rules (after the TotalSegmentator extension's ``pipInstallSelective``, and Slicer 5.12's ``slicer.packaging``):

* **Slicer-bundled packages are never installed or upgraded.** Slicer ships numpy, pydicom, pillow, scipy,
  SimpleITK, requests ... and its own modules (DICOM, Sequences) are built against those exact versions. Every
  bundled package that is installed is pinned to its installed version in a pip constraints file, so that not even
  a transitive requirement can replace it; one whose version is outside the engine's range is reported, not touched.
* **torch comes only through the PyTorch extension** (``PyTorchUtils``, which picks the CUDA build for the user's
  driver or the backend the user chose), with the engine's minimum version; pip never installs or upgrades it
  (it is pinned in the constraints too).
* **Everything else is installed one requirement per pip call**, so one package that cannot be installed does not
  stop the others, and each failure is named.
* A restart is recommended when a package that was already imported changed, or when torch was installed or
  upgraded (PyTorchUtils imports torch into the application; the module otherwise imports it only in child jobs).

The versions each Slicer release bundles were read from ``SuperBuild/External_python-*.cmake`` of the Slicer/Slicer
tags v5.10.0 and v5.12.3 (:data:`SLICER_BUNDLED`); CI installs the engine a second time under
``requirements/slicer-5.10.txt`` (a subset of the 5.10 list, kept equal by a test) and runs the tests again.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata

# name -> version, per Slicer release (External_python-*.cmake; SimpleITK 5.10: Slicer's own build, tag
# slicer-v2.5.2; 5.12: the simpleitk wheel). Python is 3.12.10 in both.
SLICER_BUNDLED: dict[str, dict[str, str]] = {
    "5.10": {
        "numpy": "2.0.2", "scipy": "1.13.1", "pydicom": "2.4.4", "pillow": "11.2.1", "SimpleITK": "2.5.2",
        "six": "1.17.0", "retrying": "1.3.4", "dicomweb-client": "0.60.0", "requests": "2.32.3",
        "certifi": "2025.4.26", "idna": "3.10", "charset-normalizer": "3.4.2", "urllib3": "2.4.0",
        "packaging": "25.0", "pyparsing": "3.2.3", "pip": "25.1.1", "setuptools": "80.9.0", "wheel": "0.45.1",
        "chardet": "5.2.0", "couchdb": "1.2", "gitdb": "4.0.12", "smmap": "5.0.2", "GitPython": "3.1.44",
        "cryptography": "45.0.3", "PyJWT": "2.10.1", "wrapt": "1.17.2", "Deprecated": "1.2.18",
        "pycparser": "2.22", "cffi": "1.17.1", "PyNaCl": "1.5.0", "python-dateutil": "2.9.0.post0",
        "typing_extensions": "4.14.0", "PyGithub": "2.6.1",
    },
    "5.12": {
        "numpy": "2.4.6", "scipy": "1.17.1", "pydicom": "3.0.2", "pillow": "12.2.0", "SimpleITK": "2.5.5",
        "six": "1.17.0", "retrying": "1.4.2", "dicomweb-client": "0.61.0", "dcmqi": "0.4.0", "highdicom": "0.27.0",
        "pyjpegls": "1.5.1", "typing_extensions": "4.15.0", "requests": "2.34.2", "certifi": "2026.5.20",
        "idna": "3.16", "charset-normalizer": "3.4.7", "urllib3": "2.7.0", "packaging": "26.2",
        "pyparsing": "3.3.2", "pip": "26.1.1", "setuptools": "82.0.1", "wheel": "0.47.0", "chardet": "7.4.3",
        "couchdb": "1.2", "gitdb": "4.0.12", "smmap": "5.0.3", "GitPython": "3.1.50", "cryptography": "48.0.0",
        "PyJWT": "2.13.0", "wrapt": "2.2.1", "Deprecated": "1.3.1", "pycparser": "3.0", "cffi": "2.0.0",
        "PyNaCl": "1.6.2", "python-dateutil": "2.9.0.post0", "PyGithub": "2.9.1",
    },
}

# Never installed with pip by this module: installed through extensions that know how (PyTorch extension).
VIA_EXTENSIONS = ("torch", "torchvision", "torchaudio")


def canonical(name: str) -> str:
    """PEP 503 name: ``Pillow`` / ``typing_extensions`` -> ``pillow`` / ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


BUNDLED_NAMES: frozenset[str] = frozenset(canonical(n) for versions in SLICER_BUNDLED.values() for n in versions)


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of every installed distribution (read from metadata, nothing imported)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def _parse(requirement: str):
    from packaging.requirements import (
        Requirement,  # packaging ships with Slicer (bundled) and with pip
    )

    return Requirement(requirement)


def _contains(specifier, version: str) -> bool:
    try:
        return specifier.contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - an unparsable local version (e.g. '2.5.2-slicer'): treat as satisfied
        return True


@dataclass
class InstallPlan:
    """What :func:`plan_install` decided.

    Attributes:
        torch: ``None`` (installed and recent enough), ``"install"`` or ``"upgrade"``: through PyTorchUtils.
        torch_requirement: the minimum, as PyTorchUtils takes it (e.g. ``">=2.4"``).
        torch_version: the installed torch version, or None.
        pip: requirements to install with pip, one call each.
        bundled_kept: Slicer-bundled packages the engine uses, left as they are: ``(name, version)``.
        bundled_conflicts: Slicer-bundled packages outside the engine's range (not touched): one line each.
        constraints: pip constraints ``name==version`` pinning every installed Slicer-bundled package and torch.
    """

    torch: str | None
    torch_requirement: str
    torch_version: str | None
    pip: list[str] = field(default_factory=list)
    bundled_kept: list[tuple[str, str]] = field(default_factory=list)
    bundled_conflicts: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)

    @property
    def nothing_to_install(self) -> bool:
        return self.torch is None and not self.pip

    def constraints_text(self) -> str:
        """The constraints file's content (pip ``-c``)."""
        return "# Slicer's own packages stay as they are (written by the USF-MAE module)\n" + "".join(
            f"{line}\n" for line in self.constraints)

    def summary(self) -> str:
        """Lines for the confirmation dialog."""
        lines = []
        if self.torch == "install":
            lines.append(f"PyTorch (torch{self.torch_requirement}) through the PyTorch extension")
        elif self.torch == "upgrade":
            lines.append(f"PyTorch upgrade {self.torch_version} -> torch{self.torch_requirement} through the PyTorch "
                         "extension (Slicer must be restarted afterwards)")
        lines += [f"{r} (pip)" for r in self.pip]
        return "\n".join(lines) if lines else "nothing: every package is installed"

    def details(self) -> str:
        """What is left alone and why (the dialog's details)."""
        lines = []
        if self.bundled_kept:
            lines.append("Kept as Slicer ships them: " + ", ".join(f"{n} {v}" for n, v in self.bundled_kept))
        lines += self.bundled_conflicts
        return "\n".join(lines)


def plan_install(requirements: Iterable[str], torch_requirement: str,
                 installed: Mapping[str, str] | None = None) -> InstallPlan:
    """Decide what to install for ``requirements`` (the engine's, without torch) and ``torch_requirement``.

    Args:
        requirements: requirement strings, e.g. ``["monai>=1.5,<1.7", "pydicom>=2.4", ...]``.
        torch_requirement: e.g. ``"torch>=2.4"``.
        installed: ``{canonical name: version}`` (default: :func:`installed_versions`).

    Returns:
        An :class:`InstallPlan`. Markers are evaluated for this Python; a requirement whose marker does not apply
        is dropped.
    """
    have = {canonical(k): v for k, v in (installed_versions() if installed is None else installed).items()}
    torch_req = _parse(torch_requirement)
    torch_version = have.get("torch")
    if torch_version is None:
        torch_action = "install"
    elif not _contains(torch_req.specifier, torch_version):
        torch_action = "upgrade"
    else:
        torch_action = None
    plan = InstallPlan(torch_action, str(torch_req.specifier), torch_version)
    for text in requirements:
        req = _parse(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonical(req.name)
        if name in VIA_EXTENSIONS:
            continue
        version = have.get(name)
        if name in BUNDLED_NAMES and version is not None:
            if _contains(req.specifier, version):
                plan.bundled_kept.append((req.name, version))
            else:
                plan.bundled_conflicts.append(
                    f"{req.name} {version} ships with this Slicer but the engine asks for {req.name}{req.specifier}: "
                    "it is left as it is (Slicer's modules need it); use the Slicer release this extension was built "
                    "for")
            continue
        if version is None or not _contains(req.specifier, version):
            plan.pip.append(str(req))
    pins = {name: v for name, v in have.items() if name in BUNDLED_NAMES}
    if torch_version is not None:
        pins["torch"] = torch_version  # pip must not replace the user's (CUDA) build; PyTorchUtils does upgrades
    plan.constraints = [f"{name}=={version}" for name, version in sorted(pins.items())
                        if re.fullmatch(r"[0-9][0-9A-Za-z.+!]*", version)]
    return plan


def pip_arguments(requirement: str, constraints_file: str) -> list[str]:
    """Arguments of one ``slicer.util.pip_install`` call (list form: no shell quoting; works on 5.10 and 5.12)."""
    return [requirement, "-c", str(constraints_file)]


def changed_imported(before: Mapping[str, str], after: Mapping[str, str],
                     imported: Iterable[str] | None = None) -> list[str]:
    """Distributions whose version changed (or that appeared) while one of their top-level modules was already
    imported: those need a restart. ``imported`` defaults to ``sys.modules``."""
    modules = set(sys.modules if imported is None else imported)
    top = {m.split(".")[0] for m in modules}
    providers: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            providers.setdefault(canonical(dist), set()).add(module)
    changed = []
    for name, version in after.items():
        if before.get(name) != version and providers.get(name, {name.replace("-", "_")}) & top:
            changed.append(f"{name} {before.get(name) or '(new)'} -> {version}")
    return changed


def bundled_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Slicer-bundled packages whose version changed between two :func:`installed_versions` (one line each).

    The module's own pip steps pin them, but the PyTorch extension installs torch with light-the-torch, which pip
    runs without those pins (light-the-torch 0.8.1 itself requires ``pip<26.1``, below Slicer 5.12's 26.1.1); what
    changed is said, never left silent."""
    return [f"{name} {version} -> {after.get(name) or '(removed)'}" for name, version in sorted(before.items())
            if name in BUNDLED_NAMES and after.get(name) != version]


def restart_recommended(plan: InstallPlan, before: Mapping[str, str], after: Mapping[str, str],
                        imported: Iterable[str] | None = None) -> list[str]:
    """Reasons to restart Slicer after carrying out ``plan`` (empty: no restart needed)."""
    reasons = changed_imported(before, after, imported)
    if plan.torch is not None and after.get("torch") != before.get("torch"):
        reasons.insert(0, f"torch {before.get('torch') or '(new)'} -> {after.get('torch')} (loaded by the installer)")
    return reasons


def pip_blocked_by_torch(plan: InstallPlan) -> str | None:
    """Why the pip steps must not run (``plan`` read after the PyTorch extension's step), or None.

    While torch is missing or older than the engine's minimum, pip would satisfy MONAI's ``torch`` requirement itself
    with a PyPI build (gigabytes of CUDA wheels, not the user's choice); torch is pinned only once it is installed."""
    if plan.torch is None or not plan.pip:
        return None
    what = "is not installed" if plan.torch == "install" else f"{plan.torch_version} is too old"
    return (f"PyTorch {what} (the engine needs torch{plan.torch_requirement}), so the other packages were not "
            "installed (pip would fetch its own PyTorch build for them); install PyTorch from the PyTorch extension's "
            "module (or check the network and the Python console), restart Slicer and press 'Install Python "
            "packages...' again")


def torch_upgrade_blocked(plan: InstallPlan, imported: Iterable[str] | None = None) -> str | None:
    """Why torch cannot be upgraded now (it is loaded in this session: its files are in use), or None."""
    modules = set(sys.modules if imported is None else imported)
    if plan.torch == "upgrade" and "torch" in modules:
        return (f"torch {plan.torch_version} is loaded in this Slicer session, so it cannot be replaced now; restart "
                f"Slicer and press 'Install Python packages...' before using anything that loads torch "
                f"(the engine needs torch{plan.torch_requirement})")
    return None
