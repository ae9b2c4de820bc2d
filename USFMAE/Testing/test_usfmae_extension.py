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
import textwrap
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
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions, strict=True))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_and_ships_the_engine(tmp_path):
    """Configure the extension against USFMAE/Testing/SlicerStub: every file the module needs (and the whole
    usfmae_core package) must land in the module folder."""
    run = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"),
                          f"-DSlicer_DIR={MODULE / 'Testing' / 'SlicerStub'}"], capture_output=True, text=True,
                         timeout=300, check=False)
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
    from USFMAELib import paths

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
    for node in ast.walk(tree_py):  # names used through getattr(self.ui, name) from the tables
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        name = getattr(target, "id", "")
        if name == "COMBO_FIELDS":
            used |= {elt.elts[0].value for elt in node.value.elts}
        elif name == "ACTION_BUTTONS":
            used |= {v.value for v in node.value.values}
    missing = sorted(used - set(widgets))
    assert not missing, f"USFMAE.py uses widgets that USFMAE.ui lacks: {missing}"
    for field in paths.PATH_FIELDS:  # the path editors and their file buttons
        assert widgets.get(field.widget) == "ctkPathLineEdit", field.widget
        if field.file_button:
            assert widgets.get(field.file_button) == "QToolButton", field.file_button

    params = {}
    for node in ast.walk(tree_py):
        if isinstance(node, ast.ClassDef) and node.name == "USFMAEParameterNode":
            params = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    assert params and {f.parameter for f in paths.PATH_FIELDS if f.parameter} <= params
    bound = {w.get("name"): w.find("property[@name='SlicerParameterName']/string").text
             for w in root.iter("widget") if w.find("property[@name='SlicerParameterName']") is not None}
    assert set(bound.values()) <= params, f"unknown parameters bound in the .ui: {set(bound.values()) - params}"
    assert {"inputVolume", "outputTable"} <= set(bound.values())
    selector = next(w for w in root.iter("widget") if w.get("name") == "inputVolumeSelector")
    hidden = [s.text for s in selector.findall("property[@name='hideChildNodeTypes']/stringlist/string")]
    assert hidden == ["vtkMRMLLabelMapVolumeNode"], "label maps must not be offered as inputs"

    custom = {cw.find("class").text for cw in root.iter("customwidget")}
    used_custom = {c for c in widgets.values() if c.startswith(("ctk", "qMRML"))}
    assert used_custom <= custom, f"custom widgets not declared: {used_custom - custom}"
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    combos = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    assert combos and combos <= connected, f"node selectors without the scene: {combos - connected}"


def test_path_fields_follow_ctk_rules():
    """Filters CTK understands (``*.ext`` patterns only: ctk::nameFilterToExtensions), folder pickers for folder
    inputs (``Dirs`` alone opens a folder dialog), the text as typed (cleared = ""), history for the fields an action
    used."""
    from USFMAELib import paths

    ext_pattern = re.compile(r"^[^()]*\((\*\.\w+)( \*\.\w+)*\)$")
    for field in paths.PATH_FIELDS:
        assert all(ext_pattern.match(f) for f in field.name_filters), field.name_filters
        if field.picks == "file":
            assert field.ctk_filters == ("Files", "Readable") and field.name_filters and not field.file_button
        else:
            assert field.ctk_filters == ("Dirs",)
            assert bool(field.file_button) == (field.picks == "file-or-dir")
        assert field.setting_key.startswith("USFMAE/")
    assert len({f.setting_key for f in paths.PATH_FIELDS}) == len(paths.PATH_FIELDS)
    assert paths.field_for("finetuneOutput").picks == "dir" and paths.field_for("pretrainSource").picks == "dir"
    assert paths.parameter_value("") == "" and paths.parameter_value("  /data/x \n") == "/data/x"
    assert paths.parameter_value(None) == ""
    used = paths.history_fields("finetune", {"finetuneData": "/d", "finetuneInit": "", "finetuneOutput": "/o"})
    assert [f.parameter for f in used] == ["finetuneData", "finetuneOutput"]  # empty fields are not remembered
    assert [f.widget for f in paths.history_fields("import", {"importPathLineEdit": "/w.pth"})] == [
        "importPathLineEdit"]
    assert set(paths.USED_BY) <= {"classify", "reconstruct", "import", "finetune", "pretrain"}
    # the widget follows the editors' text, not currentPathChanged (never emitted for a cleared field)
    source = MODULE_PY.read_text()
    assert "editTextChanged(QString)" in source and '"currentPathChanged' not in source
    assert "addCurrentPathToHistory()" in source


def test_action_states():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from USFMAELib.logic import action_states

    values = {"inputVolume": object(), "classifierPath": "/m.pt", "maePath": "", "finetuneData": "",
              "pretrainSource": "", "pretrainUseScene": True}
    states = action_states(values, busy=False)
    assert states["classify"] is None and states["pretrain"] is None and states["samples"] is None
    assert "MAE" in states["reconstruct"] and "labelled" in states["finetune"]
    assert all(reason and "job is running" in reason for reason in action_states(values, busy=True).values())
    assert all("engine" in reason for reason in action_states(values, False, engine_ready=False).values())


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
    allowed = {"__future__", "functools", "logging", "operator", "os", "sys", "tempfile", "time", "traceback",
               "pathlib", "typing", "ctk", "qt", "vtk", "slicer", "USFMAELib"}
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


def test_the_slicer_process_never_imports_torch(tmp_path, tiny_models):
    """What the module does in Slicer's process (build a classify job, start it, poll it, load its results into the
    scene, read the install plan) loads neither torch nor MONAI nor the engine's workflows: only the child does."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(MODULE)!r})
        import numpy as np, slicer
        from USFMAELib.logic import USFMAEEngineLogic
        scene = slicer.vtkMRMLScene(); slicer.mrmlScene = scene
        node = slicer.util.addVolumeFromArray((np.arange(3 * 32 * 32) % 251).reshape(3, 32, 32).astype(np.uint8))
        logic = USFMAEEngineLogic(scene)
        assert not logic.install_plan().pip
        job = logic.start_job(logic.classify_job(node, {str(tiny_models["classifier"])!r}, device="cpu"))
        while job.running:
            job.poll(); time.sleep(0.05)
        outcome = logic.finish_job(job)
        assert outcome.ok, outcome.message
        assert outcome.nodes["table"].GetNumberOfRows() == 4
        heavy = ("torch", "monai", "usfmae_core.checkpoints", "usfmae_core.workflows", "usfmae_core.data.phantom")
        print(sorted(m for m in sys.modules if m.startswith(heavy)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_module_loads_without_the_engine(tmp_path):
    """No usfmae_core anywhere (a copy of the module folder alone, site-packages without the editable install):
    the module's library still imports, says what is missing, and its errors keep the one-line format."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    shutil.copytree(MODULE, tmp_path / "USFMAE", ignore=shutil.ignore_patterns("Testing", "__pycache__"))
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / "USFMAE")!r}]
        sys.path += {site!r}
        import importlib.util
        assert importlib.util.find_spec("usfmae_core") is None
        from USFMAELib import engine, inputs, install, jobs, logic, models, paths, samples
        message = engine.engine_missing_message()
        assert message and "usfmae_core" in message and "module paths" in message, message
        err = engine.UsfmaeError("the cause", "the fix")
        assert str(err) == "the cause; the fix" and err.cause == "the cause"
        assert logic.action_states({{}}, False, engine_ready=False)["classify"].startswith("the usfmae engine")
        print("loaded")
    """)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                         check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "loaded"


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
    # the index lints description files with prettier + prettier-plugin-multiline-arrays (wrap threshold 0): its
    # output is 2-space JSON with every array on several lines, i.e. json.dumps(indent=2) plus a newline
    text = CATALOG.read_text()
    assert text == json.dumps(entry, indent=2) + "\n" and "\r" not in text


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_homepage_anchor_is_a_readme_heading():
    homepage = _cmake_sets((REPO / "CMakeLists.txt").read_text())["EXTENSION_HOMEPAGE"]
    anchor = homepage.split("#", 1)[1]
    headings = [line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines()
                if re.match(r"^#{1,6} ", line)]
    assert _github_anchor("3D Slicer extension (USFMAE)") == "3d-slicer-extension-usfmae"
    assert anchor in {_github_anchor(h) for h in headings}, f"README.md has no heading for #{anchor}"


def test_license_at_the_repository_root():
    """The Extensions Index's check_license_file looks for LICENSE (and a few other names) at the root."""
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


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


def test_ci_constraints_are_slicer_510s_bundled_versions():
    """requirements/slicer-5.10.txt (CI's second environment) pins what Slicer 5.10 bundles (USFMAELib.install, read
    from Slicer/Slicer v5.10.0 SuperBuild/External_python-*.cmake), and the engine's ranges admit them all."""
    from packaging.requirements import Requirement
    from USFMAELib import engine, install

    pins = {}
    for line in (REPO / "requirements" / "slicer-5.10.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[install.canonical(name)] = version.strip()
    bundled = {install.canonical(k): v for k, v in install.SLICER_BUNDLED["5.10"].items()}
    assert pins == {k: bundled[k] for k in ("numpy", "pydicom", "pillow", "scipy")}
    for release in ("5.10", "5.12"):
        versions = {install.canonical(k): v for k, v in install.SLICER_BUNDLED[release].items()}
        for text in engine.requirements():
            req = Requirement(text)
            if install.canonical(req.name) in versions:
                assert req.specifier.contains(versions[install.canonical(req.name)]), (release, text)


def _slicer_python(release: str, **extra: str) -> dict[str, str]:
    """The distributions of a Slicer release's Python (what it bundles), plus ``extra`` ones."""
    from USFMAELib import install

    return {**{install.canonical(k): v for k, v in install.SLICER_BUNDLED[release].items()}, **extra}


def test_install_plan_keeps_slicers_packages_and_leaves_torch_to_the_pytorch_extension():
    pytest.importorskip("packaging")
    from USFMAELib import engine, install

    reqs, torch_req = engine.requirements(), engine.TORCH_REQUIREMENT
    # a fresh Slicer 5.10: no torch, none of the engine's own packages
    plan = install.plan_install(reqs, torch_req, _slicer_python("5.10"))
    assert plan.torch == "install" and plan.torch_requirement == ">=2.4.1"
    from packaging.requirements import Requirement

    names = {install.canonical(Requirement(r).name) for r in plan.pip}
    assert {"monai", "itk", "nibabel", "pylibjpeg"} <= names
    assert not names & install.BUNDLED_NAMES and "torch" not in names  # never numpy, pydicom, pillow, SimpleITK
    kept = dict(plan.bundled_kept)
    assert kept["numpy"] == "2.0.2" and kept["pydicom"] == "2.4.4" and kept["pillow"] == "11.2.1"
    assert "numpy==2.0.2" in plan.constraints and "pydicom==2.4.4" in plan.constraints
    assert not plan.bundled_conflicts and "numpy==2.0.2" in plan.constraints_text()
    # Slicer 5.12 with a CUDA torch that is too old: upgrade through PyTorchUtils, and pip may not touch torch
    old = install.plan_install(reqs, torch_req, _slicer_python("5.12", torch="2.2.1+cu121", monai="1.5.2"))
    assert old.torch == "upgrade" and old.torch_version == "2.2.1+cu121"
    assert "torch==2.2.1+cu121" in old.constraints and "numpy==2.4.6" in old.constraints
    assert "upgrade 2.2.1+cu121" in old.summary() and all(not r.startswith("monai") for r in old.pip)
    assert install.torch_upgrade_blocked(old, imported=["torch", "os"]) and not install.torch_upgrade_blocked(
        old, imported=["os"])
    # the PyTorch extension's step failed (torch still missing / too old): pip must not run, or it would fetch torch
    assert "not installed" in install.pip_blocked_by_torch(plan) and "too old" in install.pip_blocked_by_torch(
        install.plan_install(reqs, torch_req, _slicer_python("5.12", torch="2.2.1")))
    # torch 2.4.0 is below every MONAI the engine admits (1.5.x needs 2.4.1): an upgrade, not a pip conflict later
    assert install.plan_install(reqs, torch_req, _slicer_python("5.10", torch="2.4.0+cu121")).torch == "upgrade"
    after = install.plan_install(reqs, torch_req, _slicer_python("5.10", torch="2.13.0+cu128"))
    assert install.pip_blocked_by_torch(after) is None and "torch==2.13.0+cu128" in after.constraints
    # an older Slicer whose numpy is outside the engine's range: said, never upgraded
    ancient = install.plan_install(["numpy>=2.0"], torch_req, _slicer_python("5.10", numpy="1.26.4", torch="2.5.0"))
    assert ancient.torch is None and not ancient.pip and "numpy 1.26.4" in ancient.bundled_conflicts[0]
    # everything there: nothing to do; this test environment has everything
    assert install.plan_install(reqs, torch_req).nothing_to_install
    assert install.pip_arguments("monai>=1.5,<1.7", "/tmp/c.txt") == ["monai>=1.5,<1.7", "-c", "/tmp/c.txt"]


def test_restart_is_recommended_when_loaded_packages_changed():
    from USFMAELib import install

    plan = install.plan_install([], "torch>=2.4", {"numpy": "2.0.2"})
    before = {"numpy": "2.0.2", "nibabel": "5.2.0"}
    after = {"numpy": "2.0.2", "nibabel": "5.3.0", "torch": "2.6.0", "monai": "1.5.2"}
    reasons = install.restart_recommended(plan, before, after, imported=["numpy", "nibabel.nifti1"])
    assert reasons[0].startswith("torch (new) -> 2.6.0") and "nibabel 5.2.0 -> 5.3.0" in reasons
    assert not any(r.startswith("monai") for r in reasons)  # installed but never imported: no restart for it
    # Slicer's own packages changed by someone else's installer (light-the-torch downgrading pip on 5.12): said
    slicer_512 = _slicer_python("5.12")
    assert install.bundled_changes(slicer_512, {**slicer_512, "pip": "26.0.1", "torch": "2.13.0"}) == [
        "pip 26.1.1 -> 26.0.1"]
    assert install.bundled_changes(slicer_512, slicer_512) == []
    nothing = install.plan_install([], "torch>=2.4", {"torch": "2.6.0"})
    assert install.restart_recommended(nothing, before, before, imported=["numpy"]) == []
