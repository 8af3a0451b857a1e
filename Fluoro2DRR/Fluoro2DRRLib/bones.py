"""Bone models: a density volume cropped to one bone, in the bone's own frame (RAS, mm).

Two sources:
* a closed surface mesh (STL, VTK, VTP, PLY, OBJ), voxelised in mm with VTK's
  polydata-to-image-stencil (voxel centres inside the surface);
* a CT volume with a label map / segmentation: density from HU, masked per bone; or a label map
  alone, which gets a synthetic bone density (cancellous core plus a denser cortical shell).

The density unit is "relative linear attenuation" (water = 1 for CT; mesh/label bones use
``CANCELLOUS_DENSITY`` and ``CORTICAL_DENSITY``). DRR line integrals are then in mm.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import RAS_FROM_LPS, apply_transform, rigid_inverse

MESH_SUFFIXES = (".stl", ".vtk", ".vtp", ".ply", ".obj")
CANCELLOUS_DENSITY = 0.35
CORTICAL_DENSITY = 1.0
CORTICAL_THICKNESS_MM = 1.5
DEFAULT_VOXEL_MM = 0.75


@dataclass
class BoneModel:
    name: str
    density: np.ndarray  # float32, indexed [i, j, k]
    bone_from_ijk: np.ndarray  # 4x4: voxel index -> bone frame (mm)
    surface_points_mm: np.ndarray | None = None  # (M, 3) in the bone frame
    surface_triangles: np.ndarray | None = None  # (T, 3) vertex indices
    file_from_bone: np.ndarray = field(default_factory=lambda: np.eye(4))
    source_path: str | None = None

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.linalg.norm(self.bone_from_ijk[:3, :3], axis=0)

    @property
    def centroid_mm(self) -> np.ndarray:
        """Density-weighted centre in the bone frame: the rotation centre and the evaluated point."""
        w = self.density
        total = float(w.sum())
        idx = [np.tensordot(w.sum(axis=tuple(a for a in range(3) if a != d)), np.arange(w.shape[d]), 1) / total
               for d in range(3)]
        return apply_transform(self.bone_from_ijk, np.array([idx]))[0]

    def corners_mm(self) -> np.ndarray:
        """The 8 corners of the voxel box in the bone frame."""
        n = np.array(self.density.shape) - 1
        c = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
        return apply_transform(self.bone_from_ijk, c)

    def resampled(self, voxel_mm: float) -> "BoneModel":
        """A coarser copy (box-averaged) for the coarse levels of the registration."""
        factor = voxel_mm / float(self.voxel_mm.min())
        if factor <= 1.01:
            return self
        f = int(round(factor))
        if f < 2:
            return self
        d = self.density
        pad = [(0, (-s) % f) for s in d.shape]
        d = np.pad(d, pad)
        d = d.reshape(d.shape[0] // f, f, d.shape[1] // f, f, d.shape[2] // f, f).mean(axis=(1, 3, 5))
        scale = np.diag([f, f, f, 1.0])
        # voxel centre of coarse index 0 is the mean of fine indices 0..f-1
        shift = np.eye(4)
        shift[:3, 3] = (f - 1) / 2.0
        return replace(self, density=d.astype(np.float32), bone_from_ijk=self.bone_from_ijk @ shift @ scale)

    def save_npz(self, path: str | Path) -> None:
        np.savez_compressed(path, density=self.density, bone_from_ijk=self.bone_from_ijk,
                            file_from_bone=self.file_from_bone, name=self.name)

    def summary(self) -> dict:
        return {"name": self.name, "centroid_mm": self.centroid_mm.tolist(),
                "file_from_bone": np.asarray(self.file_from_bone).tolist(),
                "voxel_mm": self.voxel_mm.tolist(), "shape": list(self.density.shape),
                "source_path": self.source_path}


# ---- meshes -------------------------------------------------------------------------------------
def _vtk():
    import vtk  # noqa: F401  (vtk is a pinned dependency; imported lazily to keep import time low)

    return vtk


def _mesh_header_space(path: Path) -> str | None:
    """Slicer writes ``SPACE=LPS`` / ``SPACE=RAS`` in STL/OBJ headers and comments."""
    try:
        head = path.open("rb").read(512).decode("latin-1", errors="ignore").upper()
    except OSError:
        return None
    for space in ("LPS", "RAS"):
        if f"SPACE={space}" in head:
            return space
    return None


def read_mesh(path: str | Path, coordinate_system: str = "auto", units: str = "mm"):
    """Read a closed surface mesh into RAS millimetres.

    Returns ``(polydata_in_ras_mm, file_from_bone)``, where ``file_from_bone`` maps our RAS mm
    coordinates back to the file's own coordinates (rigid; units are handled separately so that
    pose files stay rigid and in mm).
    """
    vtk = _vtk()
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    readers = {".stl": vtk.vtkSTLReader, ".vtk": vtk.vtkPolyDataReader, ".vtp": vtk.vtkXMLPolyDataReader,
               ".ply": vtk.vtkPLYReader, ".obj": vtk.vtkOBJReader}
    if suffix not in readers:
        raise InputError(path, f"unsupported mesh format '{suffix}' (use one of {', '.join(MESH_SUFFIXES)})")
    reader = readers[suffix]()
    reader.SetFileName(str(path))
    reader.Update()
    poly = reader.GetOutput()
    if poly is None or poly.GetNumberOfPoints() < 4 or poly.GetNumberOfPolys() < 4:
        raise InputError(path, "unreadable or empty surface mesh")

    space = coordinate_system.upper()
    if space == "AUTO":
        space = _mesh_header_space(path) or "RAS"
    if space not in ("RAS", "LPS"):
        raise InputError(path, f"coordinate system must be RAS or LPS, not {coordinate_system!r}")
    scale = {"mm": 1.0, "m": 1000.0}.get(units)
    if scale is None:
        raise InputError(path, f"units must be 'mm' or 'm', not {units!r}")

    ras_from_file = RAS_FROM_LPS if space == "LPS" else np.eye(4)
    matrix = ras_from_file @ np.diag([scale, scale, scale, 1.0])
    poly = transform_polydata(poly, matrix)
    check_mesh(poly, path)
    return poly, rigid_inverse(ras_from_file)


def transform_polydata(poly, matrix: np.ndarray):
    vtk = _vtk()
    t = vtk.vtkTransform()
    t.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    f = vtk.vtkTransformPolyDataFilter()
    f.SetInputData(poly)
    f.SetTransform(t)
    f.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(f.GetOutput())
    return out


def check_mesh(poly, what) -> None:
    """Closed surface, plausible millimetre size."""
    vtk = _vtk()
    clean = vtk.vtkCleanPolyData()
    clean.SetInputData(poly)
    tri = vtk.vtkTriangleFilter()
    tri.SetInputConnection(clean.GetOutputPort())
    edges = vtk.vtkFeatureEdges()
    edges.SetInputConnection(tri.GetOutputPort())
    edges.BoundaryEdgesOn()
    edges.NonManifoldEdgesOff()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.Update()
    n_open = edges.GetOutput().GetNumberOfCells()
    if n_open > 0:
        raise InputError(what, f"the surface mesh is open ({n_open} boundary edges): close its holes first")
    b = np.array(poly.GetBounds()).reshape(3, 2)
    diag = float(np.linalg.norm(b[:, 1] - b[:, 0]))
    if diag < 5.0:
        raise InputError(what, f"the mesh is only {diag:.3g} units across: it looks like metres, "
                               "state units='m' (--units m) or convert it to millimetres")
    if diag > 2000.0:
        raise InputError(what, f"the mesh is {diag:.0f} mm across: too large for a knee bone "
                               "(is it in micrometres, or not a bone?)")


def polydata_arrays(poly) -> tuple[np.ndarray, np.ndarray]:
    vtk = _vtk()
    from vtk.util.numpy_support import vtk_to_numpy

    tri = vtk.vtkTriangleFilter()
    tri.SetInputData(poly)
    tri.Update()
    out = tri.GetOutput()
    points = vtk_to_numpy(out.GetPoints().GetData()).astype(float)
    cells = vtk_to_numpy(out.GetPolys().GetConnectivityArray()).reshape(-1, 3).astype(np.int64)
    return points, cells


def polydata_from_arrays(points: np.ndarray, triangles: np.ndarray):
    vtk = _vtk()
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray

    poly = vtk.vtkPolyData()
    pts = vtk.vtkPoints()
    pts.SetData(numpy_to_vtk(np.ascontiguousarray(points, dtype=float), deep=True))
    poly.SetPoints(pts)
    cells = vtk.vtkCellArray()
    tri = np.ascontiguousarray(triangles, dtype=np.int64)
    offsets = np.arange(0, tri.size + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True), numpy_to_vtkIdTypeArray(tri.ravel(), deep=True))
    poly.SetPolys(cells)
    return poly


def mesh_volume_mm3(poly) -> float:
    vtk = _vtk()
    tri = vtk.vtkTriangleFilter()
    tri.SetInputData(poly)
    mp = vtk.vtkMassProperties()
    mp.SetInputConnection(tri.GetOutputPort())
    mp.Update()
    return float(mp.GetVolume())


def voxelise_polydata(poly, voxel_mm: float, margin_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Inside-mask (bool [i, j, k]) and ijk->mm matrix of a closed surface (voxel centres inside)."""
    vtk = _vtk()
    from vtk.util.numpy_support import vtk_to_numpy

    b = np.array(poly.GetBounds()).reshape(3, 2)
    origin = b[:, 0] - margin_mm
    dims = np.ceil((b[:, 1] - b[:, 0] + 2 * margin_mm) / voxel_mm).astype(int) + 1
    image = vtk.vtkImageData()
    image.SetSpacing(voxel_mm, voxel_mm, voxel_mm)
    image.SetOrigin(*origin)
    image.SetDimensions(*dims.tolist())
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(1)
    stencil_src = vtk.vtkPolyDataToImageStencil()
    stencil_src.SetInputData(poly)
    stencil_src.SetOutputOrigin(*origin)
    stencil_src.SetOutputSpacing(voxel_mm, voxel_mm, voxel_mm)
    stencil_src.SetOutputWholeExtent(image.GetExtent())
    stencil_src.Update()
    stencil = vtk.vtkImageStencil()
    stencil.SetInputData(image)
    stencil.SetStencilConnection(stencil_src.GetOutputPort())
    stencil.ReverseStencilOff()
    stencil.SetBackgroundValue(0)
    stencil.Update()
    flat = vtk_to_numpy(stencil.GetOutput().GetPointData().GetScalars())
    mask = flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0).astype(bool)  # VTK is x-fastest
    ijk_to_mm = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    ijk_to_mm[:3, 3] = origin
    return mask, ijk_to_mm


def density_from_mask(mask: np.ndarray, voxel_mm, open_beyond: np.ndarray | None = None) -> np.ndarray:
    """Synthetic bone density: cancellous core and a cortical shell, smoothed by half a voxel.

    ``open_beyond`` (bool, same shape): voxels that count as bone when measuring the depth below the
    surface, so faces against them get no cortical shell. Used for the faces where a scan's field of view
    cut the bone: there the real bone goes on, and its cut section is cancellous, not cortex.
    """
    voxel_mm = np.broadcast_to(np.asarray(voxel_mm, float), (3,))
    inside = mask if open_beyond is None else (mask | open_beyond)
    depth_mm = ndimage.distance_transform_edt(inside, sampling=voxel_mm)
    shell = (mask & (depth_mm <= CORTICAL_THICKNESS_MM)).astype(np.float32)
    density = CANCELLOUS_DENSITY * mask.astype(np.float32) + (CORTICAL_DENSITY - CANCELLOUS_DENSITY) * shell
    return ndimage.gaussian_filter(density, 0.5).astype(np.float32)


def find_cut_faces(points: np.ndarray, triangles: np.ndarray, min_area_mm2: float = 40.0,
                   max_angle_deg: float = 5.0, tolerance_mm: float = 0.6,
                   min_width_mm: float = 8.0, max_rim_ratio: float = 2.0) -> list[tuple[np.ndarray, float]]:
    """Flat caps where a segmentation was cut by its scan's field of view: ``[(outward normal, offset_mm)]``.

    A cap is a set of triangles facing one direction (within ``max_angle_deg``) and lying on the bone's
    extreme supporting plane in that direction (within ``tolerance_mm``), ``min_area_mm2`` in all, and
    about ``min_width_mm`` wide both ways (the flat strip along a shaft's side is not a cap), ending at a
    sharp rim: slanted faces (normal 5-60 deg off) within 3 mm of the plane cover at most
    ``max_rim_ratio`` times the cap's area (measured: cuts 0.1-1.1, condyle plateaus 3.8 and more).
    Directions tried: the scan axes (a cut by a volume's edge is axis-aligned in the file's frame) and
    both ends of the point cloud's long axis. Natural bone ends are curved and are not found.
    """
    p = np.asarray(points, float)
    t = np.asarray(triangles, np.int64)
    a, b, c = p[t[:, 0]], p[t[:, 1]], p[t[:, 2]]
    cross = np.cross(b - a, c - a)
    area = 0.5 * np.linalg.norm(cross, axis=1)
    normal = cross / np.maximum(2.0 * area[:, None], 1e-12)
    centre = (a + b + c) / 3.0
    # a closed mesh's orientation: make normals point outwards (signed volume > 0)
    if np.einsum("ij,ij->", a, np.cross(b, c)) < 0:
        normal = -normal
    q = p - p.mean(0)
    long_axis = np.linalg.svd(q, full_matrices=False)[2][0]
    candidates = [s * e for e in np.eye(3) for s in (1.0, -1.0)] + [long_axis, -long_axis]
    found: list[tuple[np.ndarray, float]] = []
    cos_max = np.cos(np.radians(max_angle_deg))
    for d in candidates:
        extreme = float((p @ d).max())
        on_cap = (normal @ d > cos_max) & (centre @ d > extreme - tolerance_mm)
        cap_area = area[on_cap].sum()
        if cap_area < min_area_mm2:
            continue
        # a cut ends at a sharp rim (the shaft's wall drops away at ~90 deg); the flat plateau that a
        # voxelised surface has at a condyle's extreme blends into a wide band of slanted faces
        slanted = (normal @ d > 0.5) & (normal @ d <= cos_max) & (centre @ d > extreme - 3.0)
        if area[slanted].sum() > max_rim_ratio * cap_area:
            continue
        # a cap is a disc, not the flat strip along a shaft's side: it spreads both ways in its plane
        spread = centre[on_cap] - centre[on_cap].mean(0)
        spread -= np.outer(spread @ d, d)
        if np.linalg.svd(spread, compute_uv=False)[1] / np.sqrt(on_cap.sum()) < min_width_mm / 4.0:
            continue
        n = (normal[on_cap] * area[on_cap, None]).sum(0)
        n /= np.linalg.norm(n)
        if any(float(n @ m) > cos_max for m, _ in found):
            continue
        found.append((n, float(np.average(centre[on_cap] @ n, weights=area[on_cap]))))
    return found


def bone_from_polydata(poly, name: str, voxel_mm: float = DEFAULT_VOXEL_MM,
                       file_from_bone: np.ndarray | None = None, source_path: str | None = None) -> BoneModel:
    """A bone from a closed surface already in RAS millimetres."""
    check_mesh(poly, source_path or name)
    mask, ijk_to_mm = voxelise_polydata(poly, voxel_mm)
    if not mask.any():
        raise InputError(source_path or name, "the mesh encloses no voxel (is it closed and in mm?)")
    points, triangles = polydata_arrays(poly)
    cut_faces = find_cut_faces(points, triangles)
    open_beyond = None
    if cut_faces:
        i, j, k = np.ogrid[:mask.shape[0], :mask.shape[1], :mask.shape[2]]
        open_beyond = np.zeros(mask.shape, bool)
        for normal, offset in cut_faces:
            # normal . (ijk_to_mm @ ijk) is affine in i, j, k: no per-voxel coordinate array
            a = normal @ ijk_to_mm[:3, :3]
            open_beyond |= a[0] * i + a[1] * j + a[2] * k + normal @ ijk_to_mm[:3, 3] > offset - 0.5 * voxel_mm
    return BoneModel(name=name, density=density_from_mask(mask, voxel_mm, open_beyond), bone_from_ijk=ijk_to_mm,
                     surface_points_mm=points, surface_triangles=triangles,
                     file_from_bone=np.eye(4) if file_from_bone is None else file_from_bone,
                     source_path=source_path)


def bone_from_mesh_file(path, name: str, coordinate_system: str = "auto", units: str = "mm",
                        voxel_mm: float = DEFAULT_VOXEL_MM) -> BoneModel:
    poly, file_from_bone = read_mesh(path, coordinate_system, units)
    return bone_from_polydata(poly, name, voxel_mm, file_from_bone, str(path))


# ---- CT / label maps ----------------------------------------------------------------------------
def read_volume_ras(path) -> tuple[np.ndarray, np.ndarray]:
    """Any ITK-readable volume (NRRD, NIfTI, MHA, DICOM series dir) -> (array [i, j, k], ijk_to_ras)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise InputError(path, "no DICOM series in this folder")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"unreadable volume ({str(exc).strip().splitlines()[-1][:120]})") from None
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK arrays are [k, j, i]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return array, RAS_FROM_LPS @ ijk_to_lps


def bones_from_label_volume(label_array: np.ndarray, ijk_to_ras: np.ndarray, labels: dict[str, int],
                            ct_array: np.ndarray | None = None, margin_vox: int = 3,
                            what: str = "label map", mesh: bool = True) -> dict[str, BoneModel]:
    """One cropped BoneModel per named label; density from HU when a CT is given."""
    bones = {}
    voxel_mm = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if ct_array is not None and ct_array.shape != label_array.shape:
        raise InputError(what, f"CT shape {ct_array.shape} differs from label map shape {label_array.shape}")
    for name, value in labels.items():
        mask = label_array == value
        if not mask.any():
            present = sorted(int(v) for v in np.unique(label_array) if v != 0)[:20]
            raise InputError(what, f"label {value} ({name}) is empty (labels present: {present})")
        lo = np.maximum(np.argwhere(mask).min(0) - margin_vox, 0)
        hi = np.minimum(np.argwhere(mask).max(0) + margin_vox + 1, mask.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = mask[sl]
        if ct_array is not None:
            hu = ct_array[sl].astype(np.float32)
            density = np.clip((hu + 1000.0) / 1000.0, 0.0, None) * m  # linear attenuation relative to water
        else:
            density = density_from_mask(m, voxel_mm)
        shift = np.eye(4)
        shift[:3, 3] = lo
        bone_from_ijk = np.asarray(ijk_to_ras, float) @ shift
        points = triangles = None
        if mesh:
            points, triangles = surface_from_mask(m, bone_from_ijk)
        bones[name] = BoneModel(name=name, density=density.astype(np.float32), bone_from_ijk=bone_from_ijk,
                                surface_points_mm=points, surface_triangles=triangles, source_path=str(what))
    return bones


def surface_from_mask(mask: np.ndarray, ijk_to_mm: np.ndarray, smooth_iterations: int = 15):
    """Closed triangle surface (points in mm, triangles) of a binary mask, via VTK flying edges."""
    vtk = _vtk()
    from vtk.util.numpy_support import numpy_to_vtk

    padded = np.pad(mask.astype(np.uint8), 1)
    image = vtk.vtkImageData()
    image.SetDimensions(*padded.shape)
    image.GetPointData().SetScalars(numpy_to_vtk(padded.transpose(2, 1, 0).ravel(), deep=True))
    fe = vtk.vtkDiscreteFlyingEdges3D()
    fe.SetInputData(image)
    fe.SetValue(0, 1)
    smoother = vtk.vtkWindowedSincPolyDataFilter()
    smoother.SetInputConnection(fe.GetOutputPort())
    smoother.SetNumberOfIterations(smooth_iterations)
    smoother.SetPassBand(0.1)
    smoother.NonManifoldSmoothingOn()
    smoother.NormalizeCoordinatesOn()
    smoother.Update()
    shift = np.eye(4)
    shift[:3, 3] = -1.0  # undo the padding
    poly = transform_polydata(smoother.GetOutput(), np.asarray(ijk_to_mm) @ shift)
    return polydata_arrays(poly)


def bones_from_ct_files(ct_path, labels_path, labels: dict[str, int]) -> dict[str, BoneModel]:
    labels_array, ijk_to_ras = read_volume_ras(labels_path)
    ct = None
    if ct_path is not None:
        ct, ct_ijk_to_ras = read_volume_ras(ct_path)
        if not np.allclose(ct_ijk_to_ras, ijk_to_ras, atol=1e-3):
            raise InputError(labels_path, "the label map is not on the CT's voxel grid (resample it first)")
    return bones_from_label_volume(np.rint(labels_array).astype(np.int32), ijk_to_ras, labels, ct,
                                   what=str(labels_path))


# ---- writing ------------------------------------------------------------------------------------
def write_mesh(path, points_mm: np.ndarray, triangles: np.ndarray, coordinate_system: str = "RAS") -> None:
    """STL (binary, header ``SPACE=RAS``/``LPS`` like Slicer) or VTK/VTP/PLY/OBJ by suffix."""
    vtk = _vtk()
    path = Path(path)
    pts = np.asarray(points_mm, float)
    if coordinate_system.upper() == "LPS":
        pts = apply_transform(RAS_FROM_LPS, pts)
    poly = polydata_from_arrays(pts, triangles)
    suffix = path.suffix.lower()
    if suffix == ".stl":
        w = vtk.vtkSTLWriter()
        w.SetFileTypeToBinary()
        w.SetHeader(f"SPACE={coordinate_system.upper()} written by Fluoro2DRR")
    elif suffix == ".vtk":
        w = vtk.vtkPolyDataWriter()
    elif suffix == ".vtp":
        w = vtk.vtkXMLPolyDataWriter()
    elif suffix == ".ply":
        w = vtk.vtkPLYWriter()
    elif suffix == ".obj":
        w = vtk.vtkOBJWriter()
    else:
        raise InputError(path, f"unsupported mesh format '{suffix}'")
    w.SetFileName(str(path))
    w.SetInputData(poly)
    w.Write()


def write_bones_json(path, bones: dict[str, BoneModel]) -> None:
    Path(path).write_text(json.dumps({name: b.summary() for name, b in bones.items()}, indent=2))


@dataclass
class KneeJoint:
    """Where femur and tibia meet, as segmented: the point midway in the joint space, in each bone's frame.

    Femur and tibia segmented from one scan (a label map, a CT + segmentation, meshes exported together)
    share the scan's frame, so their surfaces there form the knee as scanned. At any pose the two copies of
    the point, ``world_from_femur @ centre_femur_mm`` and ``world_from_tibia @ centre_tibia_mm``, stay
    close: flexion moves them apart within the sagittal plane (the condyles roll and glide on the plateau,
    up to a few cm at deep flexion), while across it (mediolateral) they stay within a few mm. And the tibia
    turns relative to the femur as scanned mostly about the flexion axis: a knee's other two rotations
    (ab/adduction, internal-external rotation) stay within a few tens of degrees.
    """
    centre_femur_mm: np.ndarray  # (3,) femur frame
    scanned_gap_mm: float  # the bones' closest approach as scanned
    tibia_in_femur: np.ndarray  # 4x4 femur_from_tibia as scanned
    flexion_axis_femur: np.ndarray  # (3,) unit, femur frame: the medio-lateral axis of its distal end (sign free)

    @property
    def centre_tibia_mm(self) -> np.ndarray:
        """(3,) the same point in the tibia frame."""
        return apply_transform(rigid_inverse(self.tibia_in_femur), self.centre_femur_mm[None])[0]


def knee_frame(femur_points_mm: np.ndarray, femur_centroid_mm: np.ndarray,
               tibia_centroid_mm: np.ndarray) -> np.ndarray:
    """frame_from_knee (4x4) of a femur and a tibia given in one frame (a scan's): z from the tibia's centroid to
    the femur's (superior); x the widest direction of the femur's distal fifth across z (medio-lateral, the
    flexion axis; its sign is the SVD's); y = z x x; origin the centre of that distal end."""
    z = np.asarray(femur_centroid_mm, float) - np.asarray(tibia_centroid_mm, float)
    z /= np.linalg.norm(z)
    pts = np.asarray(femur_points_mm, float)
    along = (pts - femur_centroid_mm) @ z
    distal = pts[along <= np.percentile(along, 20)]
    centred = distal - distal.mean(0)
    centred -= np.outer(centred @ z, z)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    x = vt[0] - (vt[0] @ z) * z
    x /= np.linalg.norm(x)
    out = np.eye(4)
    out[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    out[:3, 3] = distal.mean(0)
    return out


def knee_joint(femur: BoneModel, tibia: BoneModel, band_mm: float = 6.0, max_gap_mm: float = 15.0,
               max_points: int = 20000) -> KneeJoint | None:
    """The :class:`KneeJoint` of two bone models, or None when their surfaces (in the frame they were loaded
    in) do not meet within ``max_gap_mm``: bones from different scans, or meshes centred each on its own
    origin, carry no joint. The centre is the mean of both surfaces' points within ``band_mm`` of their
    closest approach."""
    from scipy.spatial import cKDTree

    if femur.surface_points_mm is None or tibia.surface_points_mm is None:
        return None
    pts = []
    for bone in (femur, tibia):
        p = bone.surface_points_mm[::max(1, len(bone.surface_points_mm) // max_points)]
        pts.append(apply_transform(bone.file_from_bone, p))
    to_tibia, _ = cKDTree(pts[1]).query(pts[0])
    to_femur, _ = cKDTree(pts[0]).query(pts[1])
    gap = float(min(to_tibia.min(), to_femur.min()))
    if gap > max_gap_mm:
        return None
    centre_file = np.concatenate([pts[0][to_tibia < gap + band_mm], pts[1][to_femur < gap + band_mm]]).mean(0)
    femur_from_file = rigid_inverse(femur.file_from_bone)
    file_from_knee = knee_frame(pts[0], apply_transform(femur.file_from_bone, femur.centroid_mm[None])[0],
                                apply_transform(tibia.file_from_bone, tibia.centroid_mm[None])[0])
    return KneeJoint(apply_transform(femur_from_file, centre_file[None])[0], gap, femur_from_file @ tibia.file_from_bone,
                     femur_from_file[:3, :3] @ file_from_knee[:3, 0])
