"""The module's .ui matches Fluoro2DRR.py (no Slicer needed: XML + AST only)."""
import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "Fluoro2DRR" / "Fluoro2DRR.py"
UI = ROOT / "Fluoro2DRR" / "Resources" / "UI" / "Fluoro2DRR.ui"


def ui_widgets():
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}, tree


def test_module_parses():
    ast.parse(MODULE.read_text(), filename=str(MODULE))


def test_every_ui_name_used_in_code_exists():
    widgets, _ = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the widget uses no self.ui.<name>?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used in Fluoro2DRR.py but absent from the .ui: {missing}"


def test_parameter_names_match_parameter_node():
    widgets, tree = ui_widgets()
    module = ast.parse(MODULE.read_text())
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Fluoro2DRRParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for w in tree.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[w.get("name")] = p.find("string").text
    assert bound
    unknown = {w: f for w, f in bound.items() if f not in fields}
    assert not unknown, f"SlicerParameterName not in the parameter node: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


def test_node_selectors_get_the_scene_and_resources_exist():
    widgets, tree = ui_widgets()
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert combos and combos <= connected
    assert widgets["Fluoro2DRR"].get("class") == "qMRMLWidget"
    for name in ("runButton", "cancelButton", "progressBar"):
        assert name in widgets
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used_classes = {w.get("class") for w in widgets.values()}
    assert {c for c in used_classes if c.startswith(("ctk", "qMRML"))} <= declared
    assert (ROOT / "Fluoro2DRR" / "Resources" / "Icons" / "Fluoro2DRR.png").is_file()
    assert (ROOT / "Fluoro2DRR.png").is_file()


def test_cmake_lists_module_files():
    text = (ROOT / "Fluoro2DRR" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "GLOB_RECURSE" in text
    assert "slicer_add_python_unittest" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DEPENDS", "add_subdirectory(Fluoro2DRR)",
                "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in top


def test_module_logic_runs_with_stubbed_gui(monkeypatch, tmp_path):
    """Import Fluoro2DRR.py with stand-ins for qt/ctk/ScriptedLoadableModule and run its logic on MRML."""
    import sys
    import types

    import numpy as np
    import pytest

    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core not available")
    import vtk

    from Fluoro2DRRLib import mrml_adapter as ma
    from Fluoro2DRRLib.geometry import knee_default_geometry

    class _Base:
        def __init__(self, *a, **k):
            pass

        def getParameterNode(self):
            return None

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for n in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
              "ScriptedLoadableModuleWidget"):
        setattr(slm, n, type(n, (_Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda *a, **k: None
    pnw.WithinRange = lambda *a, **k: None
    for name, mod in (("qt", types.ModuleType("qt")), ("ctk", types.ModuleType("ctk")),
                      ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw)):
        monkeypatch.setitem(sys.modules, name, mod)
    scene = ma.new_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(MODULE.parent))
    sys.modules.pop("Fluoro2DRR", None)
    import Fluoro2DRR  # noqa: F401

    geometry = knee_default_geometry().resized(8)
    frames = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    seq, browser, _ = ma.frames_to_volume_sequence(scene, frames, geometry)
    calib = ma.calibration_to_nodes(scene, geometry)
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(6)
    sphere.Update()
    femur = ma.model_node_from_polydata(scene, sphere.GetOutput(), "femur")
    tibia = ma.model_node_from_polydata(scene, sphere.GetOutput(), "tibia")

    class Result:
        def __init__(self, n):
            pose = np.eye(4)
            pose[2, 3] = -800.0 + n
            self.poses = {"femur": pose[None], "tibia": pose[None]}
            self.quality = [dict(frame=0, similarity=1.0, iterations=1, converged=True, seconds=0.0)]

    calls = []

    def fake_register(fr, geo, bones, init_poses=None, **kw):
        calls.append(kw)
        return Result(len(calls))

    monkeypatch.setattr(ma.SequenceRegistrationJob, "_register_fn", lambda self: fake_register)
    logic = Fluoro2DRR.Fluoro2DRRLogic()
    femurSeq, tibiaSeq, quality = logic.run(seq, calib["text"], femur, tibia, translation="none", device="cpu")
    assert len(calls) == 3 and calls[0]["translation"] == "none" and calls[0]["device"] == "cpu"
    assert femurSeq.GetNumberOfDataNodes() == 3 and quality.GetNumberOfRows() == 3
    assert femur.GetTransformNodeID() == browser.GetProxyNode(femurSeq).GetID()
    results, table, chart = logic.computeKinematics(femurSeq, tibiaSeq, femur, tibia)
    assert table.GetNumberOfRows() == 3
    written = Fluoro2DRR.Fluoro2DRRLogic().exportPoses(femurSeq, tibiaSeq, str(tmp_path), geometry)
    assert len(written) == 5
    assert isinstance(logic.missingPackages(), list)
    sys.modules.pop("Fluoro2DRR", None)
