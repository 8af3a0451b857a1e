"""C-arm calibration readers and writers; every reader returns a :class:`geometry.CArmGeometry`.

Formats: JointTrack ``JT_INTCALIB``, Autoscoper/XMALab ``mayaCam`` text, XA/RF DICOM headers and our
JSON (``CArmGeometry.save_json``). :func:`load_calibration` picks the reader from the file content.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, read_json_object
from .geometry import SOURCE_FROM_OPENCV, CArmGeometry, rigid_inverse

DEFAULT_MAYA_PIXEL_SPACING_MM = 0.25
OPENCV_FROM_SOURCE = SOURCE_FROM_OPENCV  # diag(1, -1, -1, 1) is its own inverse


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    return path


def _read_text(path) -> str:
    path = _existing_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read as text ({exc.__class__.__name__})") from None
    if not text.strip():
        raise InputError(path, "empty file")
    return text


def _image_size(image_size, what) -> tuple[int, int]:
    if image_size is None:
        raise InputError(what, "a JointTrack calibration does not store the image size: pass the frame size "
                               "(width, height)")
    if np.isscalar(image_size):
        return int(image_size), int(image_size)
    w, h = image_size
    return int(w), int(h)


# ---------------------------------------------------------------------------------------------
# JointTrack JT_INTCALIB
# ---------------------------------------------------------------------------------------------
def read_jt_intcalib(path, image_size=None) -> CArmGeometry:
    """JointTrack ``JT_INTCALIB``: principal distance, x offset, y offset, pixel size (mm), one per line.

    The world is JointTrack's source frame (``world_from_source`` = identity). ``image_size`` (W, H) or
    an int must come from the frames: the file does not store it.
    """
    lines = _read_text(path).splitlines()
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    if numbered[0][1].split()[0].upper() != "JT_INTCALIB":
        raise InputError(path, f"line {numbered[0][0]}: expected 'JT_INTCALIB', found {numbered[0][1][:40]!r}")
    values: list[float] = []
    for lineno, ln in numbered[1:]:
        if len(values) == 4:
            break
        token = ln.replace(",", " ").split()[0]
        try:
            values.append(float(token))
        except ValueError:
            raise InputError(path, f"line {lineno}: expected a number, found {ln[:40]!r}") from None
    if len(values) < 4:
        raise InputError(path, f"expected 4 numbers (principal distance, x offset, y offset, pixel size), "
                               f"found {len(values)}")
    pd, xo, yo, px = values
    if not (pd > 0 and px > 0):
        raise InputError(path, f"principal distance and pixel size must be positive (got {pd}, {px})")
    w, h = _image_size(image_size, path)
    return CArmGeometry(source_to_detector_mm=pd, pixel_spacing_mm=(px, px), image_size=(w, h),
                        principal_offset_mm=(xo, yo), world_from_source=np.eye(4))


def write_jt_intcalib(path, geometry: CArmGeometry) -> None:
    """Write JointTrack ``JT_INTCALIB`` (square pixels only; the placement and image size are not stored)."""
    px, py = geometry.pixel_spacing_mm
    if not math.isclose(px, py, rel_tol=1e-9):
        raise InputError(path, f"JointTrack calibrations need square pixels (got {px} x {py} mm)")
    xo, yo = geometry.principal_offset_mm
    Path(path).write_text("JT_INTCALIB\n" + "".join(
        f"{v!r}\n" for v in (float(geometry.source_to_detector_mm), xo, yo, px)))


# ---------------------------------------------------------------------------------------------
# mayaCam (Autoscoper / XMALab), OpenCV pinhole
# ---------------------------------------------------------------------------------------------
def _maya_blocks(path, text) -> dict[str, list[tuple[int, list[float]]]]:
    blocks: dict[str, list[tuple[int, list[float]]]] = {}
    current = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        ln = raw.strip()
        if not ln:
            continue
        try:
            numbers = [float(v) for v in ln.replace(",", " ").split()]
        except ValueError:
            if not ln[0].isalpha():
                raise InputError(path, f"line {lineno}: not a number in {ln[:60]!r}") from None
            current = " ".join(ln.lower().split())
            blocks[current] = []
            continue
        if current is None:
            raise InputError(path, f"line {lineno}: numbers before any block name")
        blocks[current].append((lineno, numbers))
    return blocks


def _block(path, blocks, name, rows, cols) -> np.ndarray:
    if name not in blocks:
        raise InputError(path, f"no '{name}' block")
    data = blocks[name]
    flat = [v for _, r in data for v in r]
    if len(flat) != rows * cols:
        where = f"line {data[0][0]}: " if data else ""
        raise InputError(path, f"{where}'{name}' needs {rows * cols} numbers, found {len(flat)}")
    return np.array(flat).reshape(rows, cols)


def read_maya_cam(path, pixel_spacing_mm=None) -> CArmGeometry:
    """Autoscoper / XMALab mayaCam 2.0 text: OpenCV pinhole ``x_cam = R X_world + t``, ``pixel = K x_cam``.

    The file has no millimetres on the detector: ``pixel_spacing_mm`` (default 0.25) sets the scale, so
    ``sdd = fx * px`` and ``py = sdd / fy``. ``source_to_patient_mm`` is the depth of the world origin.
    """
    text = _read_text(path)
    blocks = _maya_blocks(path, text)
    size = _block(path, blocks, "image size", 1, 2)[0]
    k = _block(path, blocks, "camera matrix", 3, 3)
    r = _block(path, blocks, "rotation", 3, 3)
    t = _block(path, blocks, "translation", 3, 1)[:, 0]
    w, h = int(round(size[0])), int(round(size[1]))
    if not np.allclose(k[2], [0, 0, 1], atol=1e-9) or k[1, 0] != 0:
        raise InputError(path, "camera matrix: the last row must be 0, 0, 1 and the [1, 0] entry 0")
    fx, skew, cx, fy, cy = k[0, 0], k[0, 1], k[0, 2], k[1, 1], k[1, 2]
    if abs(skew) > 1e-6 * abs(fx):
        raise InputError(path, f"camera matrix: skewed pixels (k[0, 1] = {skew}) are not supported")
    if not (fx > 0 and fy > 0):
        raise InputError(path, f"camera matrix: focal lengths must be positive (got {fx}, {fy})")
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-5) or np.linalg.det(r) < 0:
        raise InputError(path, "rotation is not a proper rotation matrix")
    # Re-orthonormalise the printed rotation (SVD) so the rigid checks downstream are exact.
    u, _, vt = np.linalg.svd(r)
    r = u @ vt
    px = float(DEFAULT_MAYA_PIXEL_SPACING_MM if pixel_spacing_mm is None else pixel_spacing_mm)
    sdd = fx * px
    py = sdd / fy
    opencv_from_world = np.eye(4)
    opencv_from_world[:3, :3] = r
    opencv_from_world[:3, 3] = t
    world_from_source = rigid_inverse(opencv_from_world) @ SOURCE_FROM_OPENCV
    xo = (cx - (w / 2 - 0.5)) * px
    yo = -(cy - (h / 2 - 0.5)) * py
    return CArmGeometry(source_to_detector_mm=sdd, pixel_spacing_mm=(px, py), image_size=(w, h),
                        principal_offset_mm=(xo, yo), world_from_source=world_from_source,
                        source_to_patient_mm=float(t[2]) if t[2] > 0 else None)


def maya_cam_matrices(geometry: CArmGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K 3x3 pixels, R 3x3, t 3) of the OpenCV camera equivalent to ``geometry``."""
    fx, fy = geometry.focal_length_px
    cx, cy = geometry.principal_point_px
    k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    opencv_from_world = OPENCV_FROM_SOURCE @ geometry.source_from_world
    return k, opencv_from_world[:3, :3], opencv_from_world[:3, 3]


def write_maya_cam(path, geometry: CArmGeometry) -> None:
    """Write mayaCam 2.0 text (the pixel spacing is lost: pass it again to :func:`read_maya_cam`)."""
    k, r, t = maya_cam_matrices(geometry)

    def rows(m):
        return "".join(",".join(repr(float(v)) for v in row) + "\n" for row in np.atleast_2d(m))

    Path(path).write_text(
        f"image size\n{geometry.width},{geometry.height}\n\ncamera matrix\n{rows(k)}\nrotation\n{rows(r)}\n"
        f"translation\n{rows(t[:, None])}")


# ---------------------------------------------------------------------------------------------
# DICOM (XA / RF)
# ---------------------------------------------------------------------------------------------
# Source frame at primary = secondary = 0 (AP view): beam posterior -> anterior (+y RAS), image up =
# superior (+z RAS), hence image right = +x RAS (patient's right) for a proper rotation.
_SOURCE_AXES_AP = np.array([[1.0, 0.0, 0.0],    # columns: x_source, y_source, z_source in RAS
                            [0.0, 0.0, -1.0],
                            [0.0, 1.0, 0.0]])


def _rot_x(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def dicom_world_from_source(primary_deg: float, secondary_deg: float, source_to_patient_mm: float) -> np.ndarray:
    """C-arm placement in world RAS for the DICOM positioner angles; see :func:`read_dicom_calibration`."""
    rot = _rot_z(primary_deg) @ _rot_x(secondary_deg) @ _SOURCE_AXES_AP
    out = np.eye(4)
    out[:3, :3] = rot
    beam = -rot[:, 2]
    out[:3, 3] = -source_to_patient_mm * beam
    return out


def _tag(ds, path, name, required=True):
    value = getattr(ds, name, None)
    if value is None or value == "":
        # Enhanced multi-frame objects keep some values in the shared functional groups.
        for seq_name in ("SharedFunctionalGroupsSequence",):
            for item in getattr(ds, seq_name, []) or []:
                for sub in item:
                    if getattr(sub, "VR", None) == "SQ":
                        for subitem in sub.value:
                            if name in subitem and subitem.get(name).value not in (None, ""):
                                return subitem.get(name).value
        if required:
            raise InputError(path, f"DICOM tag {name} is missing")
        return None
    return value


def read_dicom_calibration(path) -> CArmGeometry:
    """C-arm geometry from an XA/RF DICOM header, placed in world RAS (mm) with the isocentre at the origin.

    Tags: DistanceSourceToDetector (SID), ImagerPixelSpacing (else PixelSpacing), Rows, Columns,
    DistanceSourceToPatient (SOD; default 0.85 SID with a warning), PositionerPrimaryAngle (LAO +) and
    PositionerSecondaryAngle (cranial +) (each 0 with a warning when absent).

    Convention (patient supine, RAS):

    * 0 / 0 (AP): the source is posterior at ``(0, -SOD, 0)``, the beam runs posterior -> anterior (+y),
      image up = superior (+z) and, since the source frame must be a proper rotation, image right =
      +x = the patient's RIGHT (the image as seen from the source, i.e. looking at the patient's back).
      Frames stored as seen from the front must be mirrored left-right before use.
    * The detector direction (isocentre -> detector, = beam direction) for primary ``a`` and secondary
      ``b`` is ``(-sin a cos b, cos a cos b, sin b)``: LAO 90 puts the detector at the patient's left
      (beam right -> left, source at ``(+SOD, 0, 0)``); CRA 30 tilts the detector towards the head
      (beam ``(0, cos 30, sin 30)``). Rotation: ``Rz(a) @ Rx(b) @ R_AP`` (primary about the superior
      axis, applied after the secondary about the left-right axis).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        import pydicom
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise InputError(path, f"cannot read as DICOM ({exc.__class__.__name__})") from None
    try:
        sid = float(_tag(ds, path, "DistanceSourceToDetector"))
        spacing = _tag(ds, path, "ImagerPixelSpacing", required=False)
        if spacing is None:
            spacing = _tag(ds, path, "PixelSpacing", required=False)
        if spacing is None:
            raise InputError(path, "DICOM tag ImagerPixelSpacing (or PixelSpacing) is missing")
        row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
        rows = int(_tag(ds, path, "Rows"))
        cols = int(_tag(ds, path, "Columns"))
        sod = _tag(ds, path, "DistanceSourceToPatient", required=False)
        if sod is None:
            sod = 0.85 * sid
            warnings.warn(f"{path}: DistanceSourceToPatient is missing; assuming 0.85 x SID = {sod:.1f} mm",
                          stacklevel=2)
        sod = float(sod)
        angles = []
        for name in ("PositionerPrimaryAngle", "PositionerSecondaryAngle"):
            v = _tag(ds, path, name, required=False)
            if v is None:
                warnings.warn(f"{path}: {name} is missing; assuming 0 deg", stacklevel=2)
                v = 0.0
            angles.append(float(v))
    except (TypeError, ValueError, IndexError) as exc:
        raise InputError(path, f"bad C-arm geometry value in the DICOM header ({exc})") from None
    if not (sid > 0 and 0 < sod < sid):
        raise InputError(path, f"need 0 < DistanceSourceToPatient ({sod}) < DistanceSourceToDetector ({sid})")
    return CArmGeometry(source_to_detector_mm=sid, pixel_spacing_mm=(col_spacing, row_spacing),
                        image_size=(cols, rows), principal_offset_mm=(0.0, 0.0),
                        world_from_source=dicom_world_from_source(angles[0], angles[1], sod),
                        source_to_patient_mm=sod)


# ---------------------------------------------------------------------------------------------
# JSON and dispatch
# ---------------------------------------------------------------------------------------------
def read_json_calibration(path) -> CArmGeometry:
    _existing_file(path)
    return CArmGeometry.from_dict(read_json_object(path), origin=str(path))


def load_calibration(path, image_size=None, pixel_spacing_mm=None) -> CArmGeometry:
    """Read any supported calibration, choosing the reader from the content (not the suffix)."""
    path = _existing_file(path)
    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.__class__.__name__})") from None
    if not head.strip():
        raise InputError(path, "empty file")
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return read_dicom_calibration(path)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = ""
    stripped = text.lstrip()
    first = stripped.splitlines()[0].strip().upper() if stripped else ""
    if first.startswith("JT_INTCALIB"):
        return read_jt_intcalib(path, image_size=image_size)
    if stripped.startswith("{"):
        return read_json_calibration(path)
    if "image size" in " ".join(text.lower().split()):
        return read_maya_cam(path, pixel_spacing_mm=pixel_spacing_mm)
    raise InputError(path, "unrecognised calibration format (expected JT_INTCALIB, mayaCam text, JSON or DICOM)")


__all__ = ["read_jt_intcalib", "write_jt_intcalib", "read_maya_cam", "write_maya_cam", "maya_cam_matrices",
           "read_dicom_calibration", "dicom_world_from_source", "read_json_calibration", "load_calibration"]
