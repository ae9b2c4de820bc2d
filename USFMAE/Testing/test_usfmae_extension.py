"""The extension's packaging, checked without Slicer: CMake files (configured against a stand-in Slicer), the Qt
Designer file against the widget code, the icon, the ExtensionsIndex entry, the Python requirements, and that the
module loads without importing torch."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1]
REPO = MODULE.parent
MODULE_PY = MODULE / "USFMAE.py"
UI = MODULE / "Resources" / "UI" / "USFMAE.ui"
ICON = MODULE / "Resources" / "Icons" / "USFMAE.png"
CATALOG = REPO / "ExtensionsIndex" / "USFMAE.json"


def _strip_cmake(text: str) -> str:
    """CMake code without comments and quoted strings (so parentheses inside them do not count)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _cmake_sets(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((\w+)\s+"([^"]*)"', text)}


@pytest.mark.parametrize("path", [REPO / "CMakeLists.txt", MODULE / "CMakeLists.txt"], ids=["top", "module"])
def test_cmake_files_are_balanced(path):
    code = _strip_cmake(path.read_text())
    depth = 0
    for ch in code:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0, f"unbalanced ')' in {path}"
    assert depth == 0, f"unbalanced '(' in {path}"


def test_top_level_cmake_has_the_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    sets = _cmake_sets(text)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert sets.get(key), f"{key} is not set"
    assert sets["EXTENSION_DEPENDS"] == "PyTorch"
    assert sets["EXTENSION_CATEGORY"] in ("Ultrasound", "Machine Learning")
    code = _strip_cmake(text)
    order = ["project(USFMAE)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
             "add_subdirectory(USFMAE)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [code.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_and_ships_the_engine(tmp_path):
    """Configure the extension against USFMAE/Testing/SlicerStub: every file the module needs (and the whole
    usfmae_core package) must land in the module folder."""
    run = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"),
                          f"-DSlicer_DIR={MODULE / 'Testing' / 'SlicerStub'}"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = (tmp_path / "build" / "usfmae_stub_manifest.txt").read_text().splitlines()
    shipped = {line.split("|", 1)[0] for line in lines}
    engine = {p.relative_to(REPO).as_posix() for p in (REPO / "usfmae_core").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert engine and engine <= shipped, f"engine files not shipped: {sorted(engine - shipped)[:5]}"
    module_files = {p.relative_to(MODULE).as_posix() for pattern in ("USFMAE.py", "USFMAELib/*.py", "Scripts/*.py")
                    for p in MODULE.glob(pattern)}
    assert module_files <= shipped, f"module files not in CMakeLists: {sorted(module_files - shipped)}"
    assert {"Resources/UI/USFMAE.ui", "Resources/Icons/USFMAE.png", "unittest", "generate-config",
            "cpack"} <= shipped
    assert "generate-config|PyTorch" in lines


def test_ui_file_matches_the_widget_code():
    tree = ET.parse(UI)
    root = tree.getroot()
    assert root.tag == "ui" and root.find("class").text == "USFMAE"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    assert len(widgets) == len(list(root.iter("widget"))), "widget names must be unique"

    source = MODULE_PY.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    tree_py = ast.parse(source)
    for node in ast.walk(tree_py):  # names used through getattr(self.ui, name) from the field tables
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("PATH_FIELDS", "COMBO_FIELDS"):
            used |= {elt.elts[0].value for elt in node.value.elts}
    missing = sorted(used - set(widgets))
    assert not missing, f"USFMAE.py uses widgets that USFMAE.ui lacks: {missing}"

    params = {}
    for node in ast.walk(tree_py):
        if isinstance(node, ast.ClassDef) and node.name == "USFMAEParameterNode":
            params = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    assert params
    bound = {w.get("name"): w.find("property[@name='SlicerParameterName']/string").text
             for w in root.iter("widget") if w.find("property[@name='SlicerParameterName']") is not None}
    assert set(bound.values()) <= params, f"unknown parameters bound in the .ui: {set(bound.values()) - params}"
    assert {"inputVolume", "outputTable"} <= set(bound.values())

    custom = {cw.find("class").text for cw in root.iter("customwidget")}
    used_custom = {c for c in widgets.values() if c.startswith(("ctk", "qMRML"))}
    assert used_custom <= custom, f"custom widgets not declared: {used_custom - custom}"
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    combos = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    assert combos and combos <= connected, f"node selectors without the scene: {combos - connected}"


def test_widget_and_test_call_only_existing_logic_methods():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from USFMAELib.logic import USFMAEEngineLogic

    source = MODULE_PY.read_text()
    called = set(re.findall(r"self\.logic\.(\w+)", source)) | set(re.findall(r"(?<![\w.])logic\.(\w+)", source))
    called |= set(re.findall(r"USFMAELogic\(\)\.(\w+)", source)) | set(re.findall(r"USFMAELogic\.(\w+)", source))
    own = {"getParameterNode", "job_environment"}  # defined on USFMAELogic in USFMAE.py
    missing = sorted(n for n in called - own if not hasattr(USFMAEEngineLogic, n))
    assert not missing, f"USFMAE.py calls logic methods that do not exist: {missing}"


def test_module_script_imports_nothing_heavy_at_load():
    tree = ast.parse(MODULE_PY.read_text())
    allowed = {"__future__", "logging", "os", "time", "traceback", "pathlib", "typing", "ctk", "qt", "vtk", "slicer",
               "USFMAELib"}
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Try):
            for sub in node.body:
                if isinstance(sub, ast.ImportFrom):
                    top_level.add((sub.module or "").split(".")[0])
    assert top_level <= allowed, f"heavy or unexpected top-level imports: {top_level - allowed}"
    compile(MODULE_PY.read_text(), str(MODULE_PY), "exec")


def test_logic_loads_without_torch():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import USFMAELib.logic, USFMAELib.jobs; "
            "print(sorted(m for m in ('torch', 'monai', 'usfmae_core.checkpoints') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_icon_is_a_128_px_png():
    from PIL import Image

    with Image.open(ICON) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        assert len(set(im.convert("L").getdata())) > 50  # a picture, not a flat square


def test_extensions_index_entry():
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads(CATALOG.read_text())
    # the rules of slicer-extension-catalog-entry-schema-v1.0.1 (required keys, no others, types, tier values)
    schema = {
        "type": "object", "required": ["$schema", "category", "scm_url"], "additionalProperties": False,
        "properties": {"$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
                       "scm_revision": {"type": "string"}, "scm_type": {"enum": ["git", "local"]},
                       "build_dependencies": {"type": "array", "items": {"type": "string"}},
                       "build_subdirectory": {"type": "string"}, "enabled": {"type": "boolean"},
                       "tier": {"enum": [1, 3, 5]}}}
    jsonschema.validate(entry, schema)
    assert re.search(r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json", entry["$schema"])
    sets = _cmake_sets((REPO / "CMakeLists.txt").read_text())
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"].split(";") == ["PyTorch"]
    assert entry["category"] == sets["EXTENSION_CATEGORY"]
    assert sets["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])
    assert entry["scm_revision"]


def test_requirements_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from USFMAELib import engine

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_deps = [d for d in deps if re.match(r"torch\b", d)]
    assert [engine.TORCH_REQUIREMENT] == torch_deps
    others = sorted(d for d in deps if d not in torch_deps)
    assert sorted(engine.REQUIREMENTS) == others, "update USFMAELib/engine.py REQUIREMENTS (the built extension's copy)"
    assert sorted(engine.requirements()) == others  # a source checkout reads pyproject.toml itself
    assert sorted(engine.requirements(Path("/nonexistent/module"))) == others  # the built extension's copy
    assert engine.missing_requirements() == []  # this test environment has them all
    assert engine.torch_installed()
