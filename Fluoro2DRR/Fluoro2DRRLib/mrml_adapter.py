"""MRML <-> Fluoro2DRR core: the ONE place where scene nodes and numpy data are converted.

World = Slicer RAS (mm). Poses are numpy ``(N, 4, 4)`` ``world_from_bone``. Frames are numpy
``(N, H, W)`` with pixel ``[r, c]`` centred at index coordinates ``(c, r)`` (see ``geometry.py``).

Needs ``slicer`` (the real 3D Slicer, or PyPI ``slicer-core`` without Qt); no other Fluoro2DRRLib
module imports this one. Works with ``slicer-core 5.12.4.0`` (vtk 9.6.0), measured here:

* ``slicer.vtkMRMLScene()`` + ``AddNewNodeByClass`` work for volume, model, linear transform,
  sequence, sequence browser, table, plot series/chart, text, scripted-module, camera, markups and
  segmentation nodes.
* Sequence browsing needs ``vtkSlicerApplicationLogic`` with the Sequences logic registered (and
  Python references kept alive): then ``browser.SetSelectedItemNumber(i)`` updates every proxy.
  :func:`setup_scene_logic` does this (also Transforms, Markups, Texts, Segmentations logics: the
  Markups logic registers the markups JSON storage node, without it markups are not saved; the
  Segmentations logic registers the closed-surface <-> labelmap conversion rules).
* ``scene.WriteToMRB(path)`` writes a complete bundle; ``scene.ReadFromMRB(path)`` FAILS ("cannot
  retrieve remote cache directory from DataIOManager") unless the scene has a ``vtkCacheManager``
  (with a remote cache directory) and a ``vtkDataIOManager``: :func:`load_scene_mrb` sets them.
* Linear-transform sequences saved with their default storage (``.seq.mha``) come back renamed
  (``<name>-<name>-Seq``) and lose per-item attributes, so transform sequences are given the generic
  ``vtkMRMLSequenceStorageNode`` (``.seq.mrb``): names and the ``Fluoro2DRR.failed`` item
  attributes survive. Volume sequences keep ``vtkMRMLVolumeSequenceStorageNode`` (``.seq.nrrd``).
* ``slicer.util`` helpers mostly default to ``slicer.mrmlScene`` (absent in slicer-core), so this
  module converts arrays itself with ``vtk.util.numpy_support``.
* Rendering-only features (the textured frame plane) are set on display nodes and do nothing visible
  without views; textures are not saved in scenes: call :func:`attach_frame_texture` after loading.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .geometry import CArmGeometry

ROLE = "Fluoro2DRR.role"
FAILED = "Fluoro2DRR.failed"
FAILED_FRAMES = "Fluoro2DRR.failedFrames"
BONE_NAME = "Fluoro2DRR.bone"

_SCENE_LOGICS: dict[str, "SceneLogic"] = {}


def _slicer():
    import slicer  # noqa: PLC0415 (lazy: only this module needs Slicer)

    return slicer


def _vtk():
    import vtk  # noqa: PLC0415

    return vtk


def _ns():
    from vtk.util import numpy_support  # noqa: PLC0415

    return numpy_support


# ---- scene logic ------------------------------------------------------------------------------

class SceneLogic:
    """Keeps the application and module logics of a scene alive (browsers stop updating otherwise)."""

    def __init__(self, scene):
        slicer = _slicer()
        self.scene = scene
        self.logics = {}
        self.app_logic = None
        existing_app = getattr(slicer, "app", None)
        if existing_app is not None and getattr(slicer, "mrmlScene", None) is scene:
            # Inside the real Slicer application the module logics already exist.
            self.app_logic = existing_app.applicationLogic()
            return
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(scene)
        for name, cls in (("Sequences", "vtkSlicerSequencesLogic"), ("Transforms", "vtkSlicerTransformLogic"),
                          ("Markups", "vtkSlicerMarkupsLogic"), ("Texts", "vtkSlicerTextsLogic"),
                          ("Segmentations", "vtkSlicerSegmentationsModuleLogic")):
            if not hasattr(slicer, cls):
                continue
            logic = getattr(slicer, cls)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.cache_dir = None

    @property
    def sequences(self):
        if "Sequences" in self.logics:
            return self.logics["Sequences"]
        return self.app_logic.GetModuleLogic("Sequences") if self.app_logic is not None else None

    def update_browser(self, browser):
        seq_logic = self.sequences
        if seq_logic is not None:
            seq_logic.UpdateProxyNodesFromSequences(browser)


def setup_scene_logic(scene) -> SceneLogic:
    """Attach (once) vtkSlicerApplicationLogic + Sequences/Transforms/... logics to ``scene``."""
    key = scene.GetAddressAsString("")
    if key not in _SCENE_LOGICS:
        _SCENE_LOGICS[key] = SceneLogic(scene)
    return _SCENE_LOGICS[key]


def release_scene_logic(scene) -> None:
    _SCENE_LOGICS.pop(scene.GetAddressAsString(""), None)


def new_scene():
    """A fresh vtkMRMLScene with its logics attached."""
    scene = _slicer().vtkMRMLScene()
    setup_scene_logic(scene)
    return scene


# ---- small converters -------------------------------------------------------------------------

def vtk_matrix(matrix):
    m = _vtk().vtkMatrix4x4()
    a = np.asarray(matrix, dtype=float)
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


def numpy_matrix(vtk_matrix4x4) -> np.ndarray:
    return np.array([[vtk_matrix4x4.GetElement(i, j) for j in range(4)] for i in range(4)])


def ijk_to_ras_from_geometry(geometry: CArmGeometry) -> np.ndarray:
    """IJKToRAS of a frame volume: voxel (i=c, j=r, k=0) -> geometry.pixel_to_world((c, r))."""
    p0, pc, pr = geometry.pixel_to_world(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    u, v = pc - p0, pr - p0
    w = np.cross(u, v)
    w /= np.linalg.norm(w)  # one slice, 1 mm thick, along the beam
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = u, v, w, p0
    return m


def array_from_volume(volume_node) -> np.ndarray:
    """Voxel array indexed [k, j, i] (as slicer.util.arrayFromVolume), a copy."""
    img = volume_node.GetImageData()
    dims = img.GetDimensions()
    arr = _ns().vtk_to_numpy(img.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) if arr.ndim == 1 else (dims[2], dims[1], dims[0], arr.shape[1])
    return arr.reshape(shape).copy()


def _image_from_array(array_kji: np.ndarray):
    vtk = _vtk()
    a = np.ascontiguousarray(array_kji)
    img = vtk.vtkImageData()
    img.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    img.GetPointData().SetScalars(_ns().numpy_to_vtk(a.ravel(), deep=True))
    return img


def _set_volume_geometry(volume_node, ijk_to_ras: np.ndarray) -> None:
    volume_node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    m = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return numpy_matrix(m)


def _index_values(n: int) -> list[str]:
    return [str(i) for i in range(n)]


# ---- frames -----------------------------------------------------------------------------------

def frames_to_volume_sequence(scene, frames, geometry: CArmGeometry, name: str = "Fluoroscopy",
                              frame_times=None):
    """Frames (N, H, W) -> (sequence node, browser node, proxy volume) placed on the detector in RAS.

    Each item is a one-slice scalar volume whose IJKToRAS maps voxel (c, r, 0) to
    ``geometry.pixel_to_world((c, r))``. Index values are the frame numbers "0".."N-1"; ``frame_times``
    (seconds), when given, is stored as the ``Fluoro2DRR.frameTimes`` attribute (JSON).
    """
    slicer = _slicer()
    logic = setup_scene_logic(scene)
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got {frames.shape}")
    n, h, w = frames.shape
    if (w, h) != tuple(geometry.image_size):
        geometry = geometry.resized(w, h)
    if frames.dtype not in (np.float32, np.float64, np.uint8, np.uint16, np.int16):
        frames = frames.astype(np.float32)
    ijk_to_ras = ijk_to_ras_from_geometry(geometry)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    seq.SetIndexName("frame")
    seq.SetIndexUnit("")
    seq.SetIndexType(seq.NumericIndex)
    seq.SetAttribute(ROLE, "frames")
    seq.SetAttribute("Fluoro2DRR.geometry", json.dumps(geometry.to_dict()))
    if frame_times is not None:
        seq.SetAttribute("Fluoro2DRR.frameTimes", json.dumps([float(t) for t in frame_times]))
    item = slicer.vtkMRMLScalarVolumeNode()
    for value, frame in zip(_index_values(n), frames):
        item.SetAndObserveImageData(_image_from_array(frame[None]))
        _set_volume_geometry(item, ijk_to_ras)
        seq.SetDataNodeAtValue(item, value)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", scene.GenerateUniqueName(name + " browser"))
    browser.SetAttribute(ROLE, "browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    browser.SetPlaybackRateFps(10.0)
    browser.SetPlaybackLooped(True)
    browser.SetPlaybackActive(False)
    browser.SetSelectedItemNumber(0)
    logic.update_browser(browser)
    proxy = browser.GetProxyNode(seq)
    if proxy is not None:
        proxy.SetName(name)
        try:
            proxy.CreateDefaultDisplayNodes()
            display = proxy.GetDisplayNode()
            if display is not None:
                lo, hi = float(np.percentile(frames, 1)), float(np.percentile(frames, 99))
                display.AutoWindowLevelOff()
                display.SetWindowLevelMinMax(lo, hi if hi > lo else lo + 1.0)
        except Exception:  # noqa: BLE001 (display nodes need the Colors logic; optional)
            pass
    return seq, browser, proxy


def volume_sequence_to_frames(sequence_node) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`frames_to_volume_sequence`: (frames (N, H, W), IJKToRAS of the first item)."""
    n = sequence_node.GetNumberOfDataNodes()
    if n == 0:
        raise ValueError(f"sequence {sequence_node.GetName()!r} is empty")
    frames = [array_from_volume(sequence_node.GetNthDataNode(i))[0] for i in range(n)]
    return np.stack(frames), volume_ijk_to_ras(sequence_node.GetNthDataNode(0))


def geometry_from_sequence(sequence_node) -> CArmGeometry | None:
    text = sequence_node.GetAttribute("Fluoro2DRR.geometry")
    return CArmGeometry.from_dict(json.loads(text)) if text else None


# ---- calibration ------------------------------------------------------------------------------

def calibration_to_nodes(scene, geometry: CArmGeometry, name: str = "C-arm") -> dict:
    """Text node with ``geometry.to_dict()`` JSON + markups: source point and detector outline."""
    setup_scene_logic(scene)
    vtk = _vtk()
    text = scene.AddNewNodeByClass("vtkMRMLTextNode", scene.GenerateUniqueName(name + " calibration"))
    text.SetText(json.dumps(geometry.to_dict(), indent=1))
    text.SetAttribute(ROLE, "calibration")
    source = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name + " source"))
    source.AddControlPoint(vtk.vtkVector3d(*geometry.source_position_world), "X-ray source")
    source.SetAttribute(ROLE, "source")
    source.SetLocked(True)
    detector = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", scene.GenerateUniqueName(name + " detector"))
    for label, p in zip(("top-left", "top-right", "bottom-right", "bottom-left"), geometry.detector_corners_world()):
        detector.AddControlPoint(vtk.vtkVector3d(*p), label)
    detector.SetCurveTypeToLinear()
    detector.SetAttribute(ROLE, "detector")
    detector.SetLocked(True)
    for node in (source, detector):
        try:
            node.CreateDefaultDisplayNodes()
        except Exception:  # noqa: BLE001
            pass
    return {"text": text, "source": source, "detector": detector}


def geometry_from_node(node) -> CArmGeometry:
    """CArmGeometry from a calibration text node (or any node with the JSON in its text/attribute)."""
    text = node.GetText() if hasattr(node, "GetText") else node.GetAttribute("Fluoro2DRR.geometry")
    return CArmGeometry.from_dict(json.loads(text), origin=node.GetName())


def markups_points(markups_node) -> np.ndarray:
    n = markups_node.GetNumberOfControlPoints()
    out = np.zeros((n, 3))
    for i in range(n):
        markups_node.GetNthControlPointPositionWorld(i, out[i])
    return out


def landmarks_from_markups(markups_node) -> dict:
    """{control point label: RAS position} (for kinematics.anatomical_frame_from_landmarks)."""
    pts = markups_points(markups_node)
    return {markups_node.GetNthControlPointLabel(i): pts[i] for i in range(len(pts))}


def camera_at_source(camera_node, geometry: CArmGeometry) -> None:
    """Place a 3D view's camera at the X-ray source looking through the beam (image up = view up)."""
    src = geometry.source_position_world
    cx, cy = geometry.principal_point_px
    focal = geometry.pixel_to_world(np.array([cx, cy]))
    up = geometry.world_from_source[:3, 1]
    height_mm = geometry.height * geometry.pixel_spacing_mm[1]
    camera_node.SetPosition(*src)
    camera_node.SetFocalPoint(*focal)
    camera_node.SetViewUp(*up)
    camera_node.SetViewAngle(float(np.degrees(2 * np.arctan(0.5 * height_mm / geometry.source_to_detector_mm))))
    if hasattr(camera_node, "ResetClippingRange"):
        camera_node.ResetClippingRange()


# ---- models and bones -------------------------------------------------------------------------

def model_node_from_polydata(scene, polydata, name: str, color=(0.95, 0.9, 0.75), parent_transform=None):
    vtk = _vtk()
    copy = vtk.vtkPolyData()
    copy.DeepCopy(polydata)
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", scene.GenerateUniqueName(name))
    node.SetAndObservePolyData(copy)
    try:
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetColor(*color)
    except Exception:  # noqa: BLE001
        pass
    if parent_transform is not None:
        node.SetAndObserveTransformNodeID(parent_transform.GetID())
    return node


def polydata_from_model_node(model_node, world: bool = False):
    """A copy of the model's polydata in its own RAS coordinates (``world=True``: parent transforms applied)."""
    vtk = _vtk()
    out = vtk.vtkPolyData()
    out.DeepCopy(model_node.GetPolyData())
    if world and model_node.GetParentTransformNode() is not None:
        xf = vtk.vtkGeneralTransform()
        model_node.GetParentTransformNode().GetTransformToWorld(xf)
        flt = vtk.vtkTransformPolyDataFilter()
        flt.SetTransform(xf)
        flt.SetInputData(out)
        flt.Update()
        out = flt.GetOutput()
    return out


def labelmap_from_segmentation(segmentation_node, segment_names=None, reference_volume=None):
    """Segments -> (label array indexed [i, j, k], ijk_to_ras 4x4, {segment name: label value})."""
    slicer = _slicer()
    vtk = _vtk()
    scene = segmentation_node.GetScene()
    setup_scene_logic(scene)
    seg = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    names = {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        nm = seg.GetSegment(sid).GetName()
        if segment_names is None or nm in segment_names:
            ids.InsertNextValue(sid)
            names[nm] = ids.GetNumberOfValues()  # label values follow the export order (1, 2, ...)
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, label_node, reference_volume)
        if not ok or label_node.GetImageData() is None:
            raise ValueError(f"could not export segments of {segmentation_node.GetName()!r} to a labelmap")
        labels = array_from_volume(label_node).transpose(2, 1, 0).copy()
        return labels, volume_ijk_to_ras(label_node), names
    finally:
        scene.RemoveNode(label_node)


def bone_inputs_from_nodes(nodes: dict, ct_node=None) -> dict:
    """What the core's bone builders need, per bone name, from model / segmentation / labelmap nodes.

    Returns ``{name: {"kind": "polydata", "polydata": vtkPolyData (RAS mm)}}`` for model nodes (and for
    segmentation nodes without a CT), or ``{"kind": "labelmap", "label_array": [i, j, k] array,
    "ijk_to_ras": 4x4, "label": int, "ct_array": [i, j, k] array or None}`` for labelmap nodes and for
    segmentation nodes when ``ct_node`` is given (exported on the CT grid). Arrays are indexed
    [i, j, k] (the transpose of slicer.util.arrayFromVolume), matching ``bone_from_ijk``.
    """
    out = {}
    ct_array = array_from_volume(ct_node).transpose(2, 1, 0).copy() if ct_node is not None else None
    for name, node in nodes.items():
        if node is None:
            continue
        if node.IsA("vtkMRMLModelNode"):
            out[name] = {"kind": "polydata", "polydata": polydata_from_model_node(node)}
        elif node.IsA("vtkMRMLSegmentationNode"):
            seg = node.GetSegmentation()
            segment_names = [seg.GetSegment(seg.GetNthSegmentID(i)).GetName()
                             for i in range(seg.GetNumberOfSegments())]
            pick = [s for s in segment_names if s.lower().startswith(name.lower())] or segment_names[:1]
            if ct_node is not None:
                labels, ijk_to_ras, label_values = labelmap_from_segmentation(node, pick[:1], ct_node)
                out[name] = {"kind": "labelmap", "label_array": labels, "ijk_to_ras": ijk_to_ras,
                             "label": label_values[pick[0]], "ct_array": ct_array}
            else:
                vtk = _vtk()
                node.CreateClosedSurfaceRepresentation()
                sid = seg.GetSegmentIdBySegmentName(pick[0])
                poly = vtk.vtkPolyData()
                node.GetClosedSurfaceRepresentation(sid, poly)
                out[name] = {"kind": "polydata", "polydata": poly}
        elif node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLScalarVolumeNode"):
            labels = array_from_volume(node).transpose(2, 1, 0).copy()
            values = np.unique(labels[labels > 0])
            out[name] = {"kind": "labelmap", "label_array": labels, "ijk_to_ras": volume_ijk_to_ras(node),
                         "label": int(values[0]) if len(values) == 1 else None, "ct_array": ct_array}
        else:
            raise ValueError(f"{node.GetName()}: unsupported bone node type {node.GetClassName()}")
    return out


def bones_from_nodes(nodes: dict, ct_node=None, voxel_mm: float | None = None) -> dict:
    """Build core ``BoneModel`` objects (``Fluoro2DRRLib.bones``) from scene nodes, per bone name."""
    from . import bones as bones_mod  # noqa: PLC0415 (lead's module, may still be in progress)

    out = {}
    for name, spec in bone_inputs_from_nodes(nodes, ct_node).items():
        if spec["kind"] == "polydata":
            kwargs = {} if voxel_mm is None else {"voxel_mm": voxel_mm}
            out[name] = bones_mod.bone_from_polydata(spec["polydata"], name, **kwargs)
        else:
            label = spec["label"] if spec["label"] is not None else 1
            built = bones_mod.bones_from_label_volume(spec["label_array"], spec["ijk_to_ras"], {name: label},
                                                      ct_array=spec["ct_array"])
            out[name] = built[name]
    return out


# ---- poses <-> transform sequences -----------------------------------------------------------

def _fill_failed(poses: np.ndarray, failed: set[int]) -> tuple[np.ndarray, set[int]]:
    """Replace failed / non-finite frames by the last good pose (first good for leading ones)."""
    poses = np.array(poses, dtype=float)
    bad = set(int(i) for i in failed) | {i for i in range(len(poses)) if not np.all(np.isfinite(poses[i]))}
    good = [i for i in range(len(poses)) if i not in bad]
    if not good:
        poses[:] = np.eye(4)
        return poses, bad
    last = poses[good[0]].copy()
    for i in range(len(poses)):
        if i in bad:
            poses[i] = last
        else:
            last = poses[i].copy()
    return poses, bad


def _sequence_like_master(scene, name: str, browser_node, n_items: int, role: str):
    """A new sequence node indexed like ``browser_node``'s master (name, unit, type) -> (node, index values)."""
    master = browser_node.GetMasterSequenceNode()
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    seq.SetIndexName(master.GetIndexName() if master is not None else "frame")
    seq.SetIndexUnit(master.GetIndexUnit() if master is not None else "")
    seq.SetIndexType(master.GetIndexType() if master is not None else seq.NumericIndex)
    seq.SetAttribute(ROLE, role)
    values = ([master.GetNthIndexValue(i) for i in range(n_items)] if master is not None
              else _index_values(n_items))
    return seq, values


def poses_to_transform_sequences(scene, poses: dict, browser_node, failed_frames=(), name_prefix: str = "") -> dict:
    """One linear-transform sequence per bone, synchronised in ``browser_node``.

    Same item count and index values as the browser's master (frame) sequence. Failed frames (the
    given set, per bone via a dict, or any non-finite pose) keep the last good pose and get the item
    attribute ``Fluoro2DRR.failed = "1"``; the sequence lists them in ``Fluoro2DRR.failedFrames``.
    Returns ``{bone: (sequence node, proxy transform node)}``.
    """
    slicer = _slicer()
    logic = setup_scene_logic(scene)
    master = browser_node.GetMasterSequenceNode()
    n_master = master.GetNumberOfDataNodes() if master is not None else None
    out = {}
    for bone, bone_poses in poses.items():
        bone_poses = np.asarray(bone_poses, dtype=float)
        if n_master is not None and len(bone_poses) != n_master:
            raise ValueError(f"{bone}: {len(bone_poses)} poses for {n_master} frames")
        failed = failed_frames.get(bone, ()) if isinstance(failed_frames, dict) else failed_frames
        filled, bad = _fill_failed(bone_poses, set(failed))
        seq, values = _sequence_like_master(scene, f"{name_prefix}{bone} poses", browser_node, len(filled), "poses")
        seq.SetAttribute(BONE_NAME, bone)
        seq.SetAttribute(FAILED_FRAMES, ",".join(str(i) for i in sorted(bad)))
        for i, (value, pose) in enumerate(zip(values, filled)):
            item = slicer.vtkMRMLLinearTransformNode()
            item.SetMatrixTransformToParent(vtk_matrix(pose))
            if i in bad:
                item.SetAttribute(FAILED, "1")
            seq.SetDataNodeAtValue(item, value)
        storage = scene.AddNewNodeByClass("vtkMRMLSequenceStorageNode")
        seq.SetAndObserveStorageNodeID(storage.GetID())
        browser_node.AddSynchronizedSequenceNode(seq)
        logic.update_browser(browser_node)
        proxy = browser_node.GetProxyNode(seq)
        if proxy is not None:
            proxy.SetName(f"{name_prefix}{bone}")
            proxy.SetAttribute(BONE_NAME, bone)
        out[bone] = (seq, proxy)
    return out


def pose_files_to_transform_sequences(scene, pose_files: dict, browser_node, geometry: CArmGeometry | None = None,
                                      file_from_bone: dict | None = None, name_prefix: str = "imported ") -> dict:
    """JointTrack ``.jts`` / Autoscoper ``.tra`` / our ``poses.csv`` per bone -> transform sequences.

    ``pose_files``: ``{bone: path}``; ``geometry`` is needed for ``.jts``; ``file_from_bone`` (per bone)
    maps the bone frame (RAS) to the model file's coordinates when the poses refer to an LPS file. The
    sequences are synchronised in ``browser_node`` and must have one pose per frame.
    Returns ``{bone: (sequence node, proxy transform node)}``.
    """
    from .errors import InputError
    from .pose_io import load_world_poses

    master = browser_node.GetMasterSequenceNode()
    n_frames = master.GetNumberOfDataNodes() if master is not None else None
    poses = {}
    for bone, path in pose_files.items():
        if not path:
            continue
        world = load_world_poses(path, bone, geometry, (file_from_bone or {}).get(bone))
        if n_frames is not None and len(world) != n_frames:
            raise InputError(path, f"holds {len(world)} poses but the sequence has {n_frames} frames")
        poses[bone] = world
    return poses_to_transform_sequences(scene, poses, browser_node, name_prefix=name_prefix)


def bone_outline_sequence(scene, geometry: CArmGeometry, bones: dict, poses: dict, browser_node,
                          failed_frames=(), max_size: int = 384, name: str = "Bone outlines", progress=None):
    """The registered bones' silhouettes as a volume sequence over the frames, for a slice-view overlay.

    Each item is a one-slice volume on the detector (same RAS placement as the frames, at most
    ``max_size`` pixels wide): 1 on the femur's outline, 2 on the tibia's, 0 elsewhere (no outline on
    failed frames). Outlines are the borders of each bone's DRR footprint (line integral > 1 mm).
    Synchronised in ``browser_node``; returns ``(sequence node, proxy volume node)``.
    """
    import torch
    from scipy import ndimage

    from .render import TwoBoneRenderer

    slicer = _slicer()
    logic = setup_scene_logic(scene)
    names = [n for n in ("femur", "tibia") if n in bones and n in poses]
    w, h = geometry.image_size
    scale = min(1.0, max_size / max(w, h))
    g = geometry.resized(max(8, round(w * scale)), max(8, round(h * scale)))
    renderer = TwoBoneRenderer(g, [bones[n] for n in names])
    n = len(poses[names[0]])
    seq, values = _sequence_like_master(scene, name, browser_node, n, "outlines")
    ijk_to_ras = ijk_to_ras_from_geometry(g)
    item = slicer.vtkMRMLScalarVolumeNode()
    failed = set(failed_frames)
    for i, value in enumerate(values):
        outline = np.zeros((g.height, g.width), np.uint8)
        stacked = np.stack([poses[nm][i] for nm in names])
        if i not in failed and np.isfinite(stacked).all():
            with torch.inference_mode():
                li = renderer(torch.as_tensor(stacked[None], dtype=torch.float32))[0].numpy()
            for k, nm in enumerate(names):
                inside = li[k] > 1.0
                border = inside & ~ndimage.binary_erosion(inside)
                outline[border] = 1 + ("femur", "tibia").index(nm)
        item.SetAndObserveImageData(_image_from_array(outline[None]))
        _set_volume_geometry(item, ijk_to_ras)
        seq.SetDataNodeAtValue(item, value)
        if progress is not None:
            progress(i + 1, n)
    browser_node.AddSynchronizedSequenceNode(seq)
    logic.update_browser(browser_node)
    proxy = browser_node.GetProxyNode(seq)
    if proxy is not None:
        proxy.SetName(name)
    return seq, proxy


def transform_sequence_to_poses(sequence_node) -> np.ndarray:
    """(N, 4, 4) world_from_bone, one per item in item order."""
    vtk = _vtk()
    n = sequence_node.GetNumberOfDataNodes()
    out = np.zeros((n, 4, 4))
    m = vtk.vtkMatrix4x4()
    for i in range(n):
        sequence_node.GetNthDataNode(i).GetMatrixTransformToParent(m)
        out[i] = numpy_matrix(m)
    return out


def failed_frames_of_sequence(sequence_node) -> list[int]:
    text = sequence_node.GetAttribute(FAILED_FRAMES) or ""
    return [int(v) for v in text.split(",") if v.strip()]


def parent_models_to_transforms(models: dict, proxies: dict) -> None:
    """Parent each model node to the proxy transform of the same bone name."""
    for bone, model in models.items():
        proxy = proxies.get(bone)
        if isinstance(proxy, tuple):
            proxy = proxy[1]
        if model is not None and proxy is not None:
            model.SetAndObserveTransformNodeID(proxy.GetID())


# ---- tables and plots -------------------------------------------------------------------------

def _table_from_columns(scene, name: str, columns: dict, role: str):
    vtk = _vtk()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table.SetAttribute(ROLE, role)
    for col, values in columns.items():
        values = list(values)
        if values and all(isinstance(v, str) for v in values):
            arr = vtk.vtkStringArray()
            for v in values:
                arr.InsertNextValue(v)
        else:
            arr = vtk.vtkDoubleArray()
            for v in values:
                arr.InsertNextValue(float("nan") if v is None else float(v))
        arr.SetName(str(col))
        table.AddColumn(arr)
    return table


def table_to_columns(table_node) -> dict:
    """{column name: list of values} (numbers as float, text as str)."""
    t = table_node.GetTable()
    out = {}
    for c in range(t.GetNumberOfColumns()):
        col = t.GetColumn(c)
        if col.IsA("vtkStringArray"):
            out[col.GetName()] = [col.GetValue(i) for i in range(col.GetNumberOfValues())]
        else:
            out[col.GetName()] = [float(col.GetValue(i)) for i in range(col.GetNumberOfTuples())]
    return out


def quality_table_node(scene, quality: list, failed_frames=(), name: str = "Registration quality"):
    """Per-frame quality dicts (frame, similarity, iterations, converged, ...) -> table node.

    The ``failed`` column is 1 for frames in ``failed_frames`` or failed by their own quality
    (:func:`failed_frames_from_quality`).
    """
    keys = []
    for row in quality:
        for k in row:
            if k not in keys and k != "failed":
                keys.append(k)
    own_failures = failed_frames_from_quality(quality)
    failed = set(int(i) for i in failed_frames)
    cols = {k: [] for k in keys}
    cols["failed"] = []
    for idx, row in enumerate(quality):
        for k in keys:
            v = row.get(k)
            cols[k].append(int(v) if isinstance(v, (bool, np.bool_)) else v)
        frame = int(row.get("frame", idx))
        cols["failed"].append(1 if (frame in failed or frame in own_failures) else 0)
    table = _table_from_columns(scene, name, cols, "quality")
    table.SetAttribute(FAILED_FRAMES, ",".join(str(i) for i in sorted(failed)))
    return table


ANGLE_SERIES = (("flexion", "Flexion (+) / extension"), ("adduction", "Adduction (+) / abduction"),
                ("internal_rotation", "Internal (+) / external rotation"))


def kinematics_table_and_plot(scene, angles: dict, frame_times=None, name: str = "Knee kinematics"):
    """Grood & Suntay results (dict of (N,) arrays) -> (table node, plot chart node).

    Table columns: ``frame``, optional ``time_s``, then every key of ``angles``. The chart plots the
    three angles (deg) against the frame number (or time).
    """
    n = len(next(iter(angles.values())))
    cols = {"frame": list(range(n))}
    if frame_times is not None:
        cols["time_s"] = list(np.asarray(frame_times, dtype=float))
    for k, v in angles.items():
        cols[k] = list(np.asarray(v, dtype=float))
    table = _table_from_columns(scene, name, cols, "kinematics")
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name + " chart"))
    chart.SetTitle(name)
    chart.SetXAxisTitle("time (s)" if frame_times is not None else "frame")
    chart.SetYAxisTitle("angle (deg)")
    colors = {"flexion": (0.85, 0.2, 0.2), "adduction": (0.2, 0.6, 0.2), "internal_rotation": (0.2, 0.3, 0.85)}
    for key, title in ANGLE_SERIES:
        if key not in angles:
            continue
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(title))
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("time_s" if frame_times is not None else "frame")
        series.SetYColumnName(key)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetColor(*colors[key])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table, chart


# ---- frame in 3D ------------------------------------------------------------------------------

def frame_plane_model(scene, geometry: CArmGeometry, name: str = "Detector plane"):
    """A plane model covering the detector with texture coordinates (s along columns, t along rows).

    Texture coordinate (0, 0) is the top-left detector corner = voxel (0, 0) of the frame volume, so
    the frame image textures the plane the right way round.
    """
    vtk = _vtk()
    tl, tr, _br, bl = geometry.detector_corners_world()
    plane = vtk.vtkPlaneSource()
    plane.SetOrigin(*tl)
    plane.SetPoint1(*tr)
    plane.SetPoint2(*bl)
    plane.SetResolution(1, 1)
    plane.Update()
    node = model_node_from_polydata(scene, plane.GetOutput(), name, color=(1.0, 1.0, 1.0))
    node.SetAttribute(ROLE, "frame_plane")
    display = node.GetDisplayNode()
    if display is not None:
        display.SetBackfaceCulling(False)
        display.SetAmbient(1.0)
        display.SetDiffuse(0.0)
    return node


def attach_frame_texture(model_node, volume_node) -> bool:
    """Texture ``model_node`` with the (window/levelled) image of ``volume_node``; True if attached.

    Textures are not saved with scenes: call again after loading. Uses the volume display node's
    window/level output when present (real Slicer), else the raw image. Without rendering
    (slicer-core) this only sets the pipeline connection on the display node.
    """
    try:
        display = model_node.GetDisplayNode()
        if display is None:
            model_node.CreateDefaultDisplayNodes()
            display = model_node.GetDisplayNode()
        connection = None
        vdisplay = volume_node.GetDisplayNode()
        if vdisplay is not None and hasattr(vdisplay, "GetOutputImageDataConnection"):
            connection = vdisplay.GetOutputImageDataConnection()
        if connection is None:
            connection = volume_node.GetImageDataConnection()
        display.SetTextureImageDataConnection(connection)
        display.SetScalarVisibility(False)
        if hasattr(display, "SetInterpolateTexture"):
            display.SetInterpolateTexture(True)
        return True
    except Exception:  # noqa: BLE001 (no display pipeline here)
        return False


# ---- scene files ------------------------------------------------------------------------------

def _storable_nodes(scene):
    n = scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")
    return [scene.GetNthNodeByClass(i, "vtkMRMLStorableNode") for i in range(n)]


def prepare_storage_nodes(scene) -> None:
    """Give every storable node a storage node (transform sequences get the generic .seq.mrb one)."""
    setup_scene_logic(scene)
    for node in _storable_nodes(scene):
        if node.GetStorageNode() is not None:
            continue
        if node.IsA("vtkMRMLSequenceNode") and node.GetNumberOfDataNodes() > 0 and \
                node.GetNthDataNode(0).IsA("vtkMRMLTransformNode"):
            storage = scene.AddNewNodeByClass("vtkMRMLSequenceStorageNode")
            node.SetAndObserveStorageNodeID(storage.GetID())
            continue
        if node.IsA("vtkMRMLTextNode"):
            continue  # short texts are stored inside the .mrml file
        try:
            node.AddDefaultStorageNode()
        except Exception:  # noqa: BLE001
            pass


def save_scene_mrb(scene, path) -> Path:
    """Write the whole scene (data + browser) to a Slicer data bundle ``.mrb``."""
    path = Path(path).resolve()  # MRML's bundle writer refuses relative directories
    if path.suffix.lower() != ".mrb":
        path = path.with_suffix(".mrb")
    path.parent.mkdir(parents=True, exist_ok=True)
    prepare_storage_nodes(scene)
    if path.exists():
        path.unlink()
    if not scene.WriteToMRB(str(path)):
        raise OSError(f"{path}: could not write the scene bundle")
    return path


def load_scene_mrb(path, scene=None, cache_dir=None):
    """Read a ``.mrb`` into a new scene (or ``scene``) with its logics attached; returns the scene.

    ``cache_dir`` is where the bundle is unpacked (a temporary folder by default, removed afterwards).
    """
    slicer = _slicer()
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scene bundle")
    scene = scene if scene is not None else slicer.vtkMRMLScene()
    logic = setup_scene_logic(scene)
    own_tmp = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="fluoro2drr-mrb-")) if own_tmp else Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        if scene.GetCacheManager() is None:
            cm = slicer.vtkCacheManager()
            cm.SetRemoteCacheDirectory(str(cache))
            dio = slicer.vtkDataIOManager()
            dio.SetCacheManager(cm)
            scene.SetCacheManager(cm)
            scene.SetDataIOManager(dio)
            logic.cache_manager, logic.data_io_manager = cm, dio
        if not scene.ReadFromMRB(str(path)):
            raise OSError(f"{path}: could not read the scene bundle")
    finally:
        if own_tmp:
            shutil.rmtree(cache, ignore_errors=True)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        logic.update_browser(scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode"))
    return scene


def nodes_by_role(scene, role: str) -> list:
    out = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE) == role:
            out.append(node)
    return out


# ---- registration and kinematics glue (used by the Slicer module's logic) ----------------------

def geometry_from_any(calibration, image_size=None) -> CArmGeometry:
    """CArmGeometry from a CArmGeometry, a calibration node (text) or a calibration file path."""
    if isinstance(calibration, CArmGeometry):
        return calibration
    if hasattr(calibration, "GetText") or hasattr(calibration, "GetAttribute"):
        return geometry_from_node(calibration)
    from . import calibration_io  # noqa: PLC0415

    return calibration_io.load_calibration(str(calibration), image_size=image_size)


def frames_from_any(frames_input):
    """(frames (N, H, W) float32, geometry stored with the sequence or None) from a sequence node,
    a volume node, a numpy array or a frames file / folder path."""
    if hasattr(frames_input, "GetNumberOfDataNodes"):
        frames, _ = volume_sequence_to_frames(frames_input)
        return frames.astype(np.float32), geometry_from_sequence(frames_input)
    if hasattr(frames_input, "GetImageData"):
        return array_from_volume(frames_input).astype(np.float32)[:1], None
    if isinstance(frames_input, np.ndarray):
        return frames_input.astype(np.float32), None
    from . import frames_io  # noqa: PLC0415

    return frames_io.load_frames(str(frames_input)).frames.astype(np.float32), None


def failed_frames_from_quality(quality: list) -> set:
    """The engine's ``failed`` flag; quality without it (other tools) falls back on ``converged``."""
    return {int(q.get("frame", i)) for i, q in enumerate(quality)
            if (q["failed"] if "failed" in q else q.get("converged", True) is False)}


class SequenceRegistrationJob:
    """Frame-by-frame registration that a GUI timer can drive in short slices.

    ``step()`` registers the next frame with the engine (``registration.register_sequence``) on top of
    ONE ``registration.Registrar`` built lazily at the first step (renderers of every level are made
    once): each call starts at the next frame (``start_frame``), passes the poses done so far
    (``previous``) and stops after one frame (``should_stop``), so the engine's tracking (velocity
    extrapolation from the two previous frames, lost-track detection and recovery) runs as in a
    one-shot registration. ``cancel()`` stops before the next frame and keeps finished frames.
    ``poses`` / ``quality`` hold what is done; unfinished frames are NaN (and count as failed).

    After the last frame, further steps run the engine's second pass over weak frames
    (``registration.iter_revisit_weak_frames``: a frame explained clearly worse than the others is registered
    again from its good neighbours) one frame per step; ``revisiting`` is True meanwhile.

    ``init_poses``: name -> (1, 4, 4) (first frame) or (N, 4, 4) (every frame); without it the first
    frame gets the engine's automatic start. ``register_fn``: a stand-in (tests) with the older
    one-frame contract ``register_fn(frames[i:i+1], geometry, bones, init_poses=..., translation=...,
    device=..., settings=...)`` returning an object with ``poses`` (name -> (1, 4, 4)) and ``quality``.
    ``polarity``: "xray", "drr" or "auto" (decided once for the whole sequence at the first step).
    """

    def __init__(self, frames, geometry: CArmGeometry, bones: dict, translation: str = "none",
                 device: str = "auto", settings=None, init_poses: dict | None = None, register_fn=None,
                 polarity: str = "auto"):
        self.frames = np.asarray(frames, dtype=np.float32)
        if self.frames.ndim == 2:
            self.frames = self.frames[None]
        self.geometry = geometry
        self.bones = bones
        from .registration import translating  # noqa: PLC0415

        if translating(translation):  # a wrong model folder fails here, before the first frame
            from .translation.inference import translation_model_dir  # noqa: PLC0415

            translation_model_dir(translation)
        self.translation = translation
        self.device = device
        self.settings = settings
        self.init_poses = init_poses
        self._register = register_fn
        self._polarity = None if polarity == "auto" else polarity
        self._registrar = None
        self._translator = None
        self._translated = None
        self._translated_done: set = set()
        n = len(self.frames)
        self.poses = {name: np.full((n, 4, 4), np.nan) for name in bones}
        self.quality: list = []
        self.frame_results: list = []  # the engine's FrameResult per finished frame
        self.next_frame = 0
        self.cancelled = False
        self._revisit = None  # the engine's second pass over weak frames, one frame per step
        self.revisiting = False
        self._revisit_finished = False

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def _wants_revisit(self) -> bool:
        return (self.n_frames > 1 and self._uses_engine(self._register_fn())
                and getattr(self.registrar.settings, "revisit_weak_frames", False))

    @property
    def done(self) -> bool:
        if self.cancelled:
            return True
        if self.next_frame < self.n_frames:
            return False
        return self._revisit_finished or not self._wants_revisit()

    def cancel(self) -> None:
        self.cancelled = True

    def _register_fn(self):
        if self._register is None:
            from .registration import register_sequence  # noqa: PLC0415 (heavy: torch, diffdrr)

            self._register = register_sequence
        return self._register

    def _uses_engine(self, fn) -> bool:
        from . import registration  # noqa: PLC0415

        return fn is registration.register_sequence

    @property
    def registrar(self):
        """The engine's ``Registrar`` (renderers of every level), built at the first use."""
        if self._registrar is None:
            from .registration import Registrar, RegistrationSettings  # noqa: PLC0415

            self.settings = self.settings or RegistrationSettings()
            self._registrar = Registrar(self.geometry, self.bones, self.settings, self.device)
        return self._registrar

    @property
    def polarity(self) -> str:
        """The frames' polarity, decided once for the whole sequence (``polarity.detect_sequence_polarity``)."""
        if self._polarity is None:
            from .registration import sequence_polarity  # noqa: PLC0415

            self._polarity = sequence_polarity(self.frames, "auto")
        return self._polarity

    def _translated_up_to(self, i: int):
        """Frames translated by the chosen networks, each translated once (frame ``i`` at step ``i``)."""
        from .registration import translating  # noqa: PLC0415

        if not translating(self.translation):
            return None
        if self._translator is None:
            from .translation.inference import Translator  # noqa: PLC0415

            self._translator = Translator.for_option(self.translation, self.device)
            self._translated = np.zeros_like(self.frames)
            self._translated_done = set()
        if i not in self._translated_done:
            self._translated[i] = self._translator.translate(self.frames[i:i + 1])[0]
            self._translated_done.add(i)
        return self._translated

    def _step_engine(self, fn, i: int) -> None:
        """One engine call that registers exactly frame ``i``, continuing the engine's own tracking (poses and
        quality of the frames before, so velocity prediction and the lost-track test work as in one run)."""
        collected = []
        fn(self.frames, self.geometry, self.bones, init_poses=self.init_poses, translation=self.translation,
           device=self.device, settings=self.settings, polarity=self.polarity, start_frame=i,
           previous=self.poses if i > 0 else None, previous_quality=self.quality,
           translated_frames=self._translated_up_to(i), registrar=self.registrar,
           should_stop=lambda: len(collected) >= 1, on_frame=collected.append)
        if not collected:
            raise RuntimeError(f"the registration returned no result for frame {i}")
        fr = collected[0]
        for name in self.poses:
            self.poses[name][i] = np.asarray(fr.poses[name], dtype=float)
        self.quality.append(fr.quality())
        self.frame_results.append(fr)

    def _step_stand_in(self, fn, i: int) -> None:
        init = None
        if i > 0 and all(np.all(np.isfinite(p[i - 1])) for p in self.poses.values()):
            init = {name: p[i - 1:i].copy() for name, p in self.poses.items()}
        elif self.init_poses is not None:
            init = {name: np.asarray(p).reshape(-1, 4, 4)[min(i, len(np.asarray(p).reshape(-1, 4, 4)) - 1)][None]
                    for name, p in self.init_poses.items()}
        result = fn(self.frames[i:i + 1], self.geometry, self.bones, init_poses=init,
                    translation=self.translation, device=self.device, settings=self.settings)
        for name in self.poses:
            self.poses[name][i] = np.asarray(result.poses[name])[0]
        q = dict(result.quality[0]) if result.quality else {}
        q["frame"] = i
        self.quality.append(q)

    def step(self) -> bool:
        """Register one frame; returns False when there is nothing left to do."""
        if self.done:
            return False
        i = self.next_frame
        if i >= self.n_frames:  # every frame done: the second pass over weak frames, one frame per step
            if self._revisit is None:
                from .registration import iter_revisit_weak_frames, translating  # noqa: PLC0415

                self.revisiting = True
                self._revisit = iter_revisit_weak_frames(self.frames, self.poses, self.quality, self.registrar,
                                                         self._translated if translating(self.translation) else None,
                                                         self.polarity)
            try:
                next(self._revisit)
            except StopIteration:
                self._revisit_finished, self.revisiting = True, False
            return not self.done
        fn = self._register_fn()
        if self._uses_engine(fn):
            self._step_engine(fn, i)
        else:
            self._step_stand_in(fn, i)
        self.next_frame += 1
        return not self.done

    def run(self, progress=None) -> None:
        """Blocking: all remaining frames; ``progress(done, total)`` after each."""
        while self.step():
            if progress is not None:
                progress(self.next_frame, self.n_frames)
        if progress is not None:
            progress(self.next_frame, self.n_frames)

    def failed_frames(self) -> set:
        unfinished = set(range(self.next_frame, self.n_frames))
        return unfinished | failed_frames_from_quality(self.quality)


def store_registration_result(scene, poses: dict, quality: list, browser_node, models: dict | None = None,
                              failed_frames=None, name_prefix: str = "") -> dict:
    """Poses + quality -> transform sequences in ``browser_node`` + quality table; parents ``models``.

    Returns ``{"sequences": {bone: (seq, proxy)}, "quality": table node, "failed": set}``.
    """
    failed = set(failed_frames_from_quality(quality) if failed_frames is None else failed_frames)
    seqs = poses_to_transform_sequences(scene, poses, browser_node, failed_frames=failed, name_prefix=name_prefix)
    failed_all = set()
    for seq, _ in seqs.values():
        failed_all |= set(failed_frames_of_sequence(seq))
    table = quality_table_node(scene, quality, failed_frames=failed_all)
    if models:
        parent_models_to_transforms(models, seqs)
    return {"sequences": seqs, "quality": table, "failed": failed_all}


def store_smoothed_poses(scene, poses: dict, bones: dict, browser_node, window_frames: int, failed_frames=(),
                         name_prefix: str = "Smoothed ") -> dict:
    """The registration's poses smoothed in time (``smoothing.smooth_poses``; failed frames weigh 0 and get
    their neighbours' fit) -> transform sequences ``"Smoothed femur poses"`` etc. in ``browser_node``."""
    from .smoothing import smooth_poses  # noqa: PLC0415

    smoothed = smooth_poses(poses, {name: bones[name].centroid_mm for name in poses}, window_frames,
                            failed_frames=failed_frames)
    return poses_to_transform_sequences(scene, smoothed, browser_node, name_prefix=name_prefix)


def anatomical_frames_for_models(femur_source, tibia_source, side: str = "right") -> dict:
    """bone_from_anatomical per bone, from landmark markups nodes, model nodes or point arrays."""
    from .kinematics import anatomical_frame_from_landmarks, anatomical_frame_from_points  # noqa: PLC0415

    out = {}
    for bone, src in (("femur", femur_source), ("tibia", tibia_source)):
        if src is None:
            out[bone] = np.eye(4)
        elif hasattr(src, "GetNumberOfControlPoints"):
            out[bone] = anatomical_frame_from_landmarks(landmarks_from_markups(src), bone, side=side)
        elif hasattr(src, "GetPolyData"):
            poly = src.GetPolyData()
            pts = _ns().vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
            out[bone] = anatomical_frame_from_points(pts, bone)
        else:
            out[bone] = anatomical_frame_from_points(np.asarray(src, dtype=float), bone)
    return out


def kinematics_from_sequences(scene, femur_sequence, tibia_sequence, femur_source=None, tibia_source=None,
                              side: str = "right", frame_times=None, name: str = "Knee kinematics"):
    """Transform sequences -> Grood & Suntay -> (results dict, table node, chart node)."""
    from .kinematics import knee_kinematics  # noqa: PLC0415

    frames = anatomical_frames_for_models(femur_source, tibia_source, side)
    poses = {"femur": transform_sequence_to_poses(femur_sequence), "tibia": transform_sequence_to_poses(tibia_sequence)}
    results = knee_kinematics(poses, frames["femur"], frames["tibia"], side=side)
    failed = set(failed_frames_of_sequence(femur_sequence)) | set(failed_frames_of_sequence(tibia_sequence))
    for k in results:
        results[k] = np.where([i in failed for i in range(len(results[k]))], np.nan, results[k])
    table, chart = kinematics_table_and_plot(scene, results, frame_times=frame_times, name=name)
    return results, table, chart


def export_pose_files(sequences: dict, directory, geometry: CArmGeometry | None = None,
                      formats=("csv", "jts", "tra"), file_from_bone: dict | None = None) -> list:
    """Write pose files per bone from transform sequences (failed frames written as NaN).

    ``.jts`` holds JointTrack's source-frame poses (needs ``geometry``), ``.tra`` world poses,
    ``.csv`` world_from_bone for all bones in one file.
    """
    from . import pose_io  # noqa: PLC0415

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    poses = {}
    for bone, seq in sequences.items():
        seq = seq[0] if isinstance(seq, tuple) else seq
        p = transform_sequence_to_poses(seq)
        for i in failed_frames_of_sequence(seq):
            p[i] = np.nan
        poses[bone] = p
    written = []
    for bone, p in poses.items():
        ffb = (file_from_bone or {}).get(bone)
        if "jts" in formats and geometry is not None:
            path = directory / f"{bone}.jts"
            pose_io.write_jts(path, pose_io.file_pose_from_world_pose(p, geometry, ffb))
            written.append(path)
        if "tra" in formats:
            path = directory / f"{bone}.tra"
            pose_io.write_tra(path, pose_io.file_pose_from_world_pose(p, None, ffb))
            written.append(path)
    if "csv" in formats:
        path = directory / "poses.csv"
        pose_io.write_poses_csv(path, poses)
        written.append(path)
    return written


def browser_for_sequence(scene, sequence_node, create: bool = True):
    """The browser whose master is ``sequence_node`` (or that synchronises it); a new one if none."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.GetMasterSequenceNode() is sequence_node or browser.IsSynchronizedSequenceNode(sequence_node, True):
            return browser
    if not create:
        return None
    logic = setup_scene_logic(scene)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                      scene.GenerateUniqueName(sequence_node.GetName() + " browser"))
    browser.SetAndObserveMasterSequenceNodeID(sequence_node.GetID())
    browser.SetSelectedItemNumber(0)
    logic.update_browser(browser)
    return browser
