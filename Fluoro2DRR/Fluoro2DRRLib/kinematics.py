"""Knee kinematics: anatomical bone frames and the Grood & Suntay (1983) joint coordinate system.

Pure numpy; no Slicer.

Anatomical frame convention (both bones, both sides; right-handed, mm):

* ``x`` -- medio-lateral, pointing to the SUBJECT'S RIGHT (lateral for a right knee, medial for a
  left knee). Keeping x to the right for both sides keeps every frame right-handed with
* ``y`` -- anterior, and
* ``z`` -- superior / proximal (along the bone's long axis, towards the hip).

This is the RAS convention, so a bone standing in anatomical position in a RAS scene has an
identity rotation. The knee side only changes the *signs* of the clinical angles (see
:func:`grood_suntay`), never the handedness of a frame.

Origins: femur -- the centre of the distal (condylar) end; tibia -- the centre of the proximal
plateau. A frame is returned as ``bone_from_anatomical`` (4x4: columns are the axes and the origin
expressed in the bone-model coordinates); a pose ``world_from_bone`` gives
``world_from_anatomical = world_from_bone @ bone_from_anatomical``.

Grood & Suntay joint coordinate system (right knee; a left knee flips the signs marked *):

* ``e1`` = femoral medio-lateral axis (femur x), ``e3`` = tibial long axis (tibia z),
  ``e2 = e3 x e1`` the floating axis (anterior).
* ``flexion`` (deg, about e1): positive when the distal tibia moves posteriorly (knee flexion).
* ``adduction`` (deg, about e2) *: positive for adduction (varus: distal tibia moves medially),
  negative for abduction (valgus).
* ``internal_rotation`` (deg, about e3) *: positive when the tibia's anterior turns medially.
* Joint translations: ``H`` = vector from the femoral origin to the tibial origin, decomposed on the
  (non-orthogonal) JCS basis ``H = q1 e1 + q2 e2 + q3 e3`` as in Grood & Suntay:
  ``lateral_mm`` (= q1, * sign: positive = tibia shifted laterally), ``anterior_mm`` (= q2,
  anterior drawer of the tibia positive), ``proximal_mm`` (= q3, tibial origin along the tibial
  axis relative to the femoral origin; ``distraction_mm = -proximal_mm``).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

FEMUR_LANDMARKS = ("medial_epicondyle", "lateral_epicondyle", "hip_centre")
TIBIA_LANDMARKS = ("medial_plateau", "lateral_plateau", "ankle_centre")
# Accepted substitutes for the proximal / distal shaft point.
_FEMUR_SHAFT_KEYS = ("hip_centre", "hip_center", "femoral_head", "shaft")
_TIBIA_SHAFT_KEYS = ("ankle_centre", "ankle_center", "shaft")


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(n < 1e-12):
        raise InputError("anatomical frame", "degenerate axis (two landmarks coincide?)")
    return v / n


def _frame(x_hint: np.ndarray, z: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Right-handed frame keeping ``z`` exact and x as close as possible to ``x_hint``."""
    z = _unit(z)
    y = _unit(np.cross(z, x_hint))
    x = np.cross(y, z)
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = x, y, z, origin
    return out


def _check_bone(bone: str) -> str:
    bone = str(bone).lower()
    if bone not in ("femur", "tibia"):
        raise InputError("anatomical frame", f"bone must be 'femur' or 'tibia', got {bone!r}")
    return bone


def _check_side(side: str) -> float:
    side = str(side).lower()
    if side not in ("right", "left"):
        raise InputError("kinematics", f"side must be 'right' or 'left', got {side!r}")
    return 1.0 if side == "right" else -1.0


def anatomical_frame_from_points(points_mm, bone: str, hint_world_from_bone=None,
                                 end_fraction: float = 0.15) -> np.ndarray:
    """Automatic anatomical frame of a femur or tibia surface / point cloud (M, 3) in bone mm.

    * long axis (z) = principal axis of largest variance, oriented superiorly;
    * articular end = the slab of ``end_fraction`` of the length at the inferior end (femur) or
      superior end (tibia);
    * medio-lateral axis (x) = the widest principal direction of that slab perpendicular to z,
      oriented to the subject's right; y = z x x (anterior);
    * origin = centre of the slab's bounding box in the (x, y, z) frame.

    PCA fixes axes only up to sign; the signs come from ``hint_world_from_bone`` (4x4, default
    identity: the model coordinates are roughly RAS, as for a CT-derived model in Slicer): z is
    chosen to point along the hint's superior direction and x along the hint's right direction.
    """
    bone = _check_bone(bone)
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    if len(pts) < 10:
        raise InputError("anatomical frame", f"need at least 10 points, got {len(pts)}")
    hint = np.eye(4) if hint_world_from_bone is None else np.asarray(hint_world_from_bone, dtype=float)
    # Directions (in bone coordinates) that the hint maps onto world right / superior.
    hint_right = hint[:3, :3].T @ np.array([1.0, 0.0, 0.0])
    hint_sup = hint[:3, :3].T @ np.array([0.0, 0.0, 1.0])

    centre = pts.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov((pts - centre).T))
    z = evecs[:, np.argmax(evals)]
    if z @ hint_sup < 0:
        z = -z
    s = (pts - centre) @ z
    lo, hi = s.min(), s.max()
    cut = end_fraction * (hi - lo)
    slab = pts[s <= lo + cut] if bone == "femur" else pts[s >= hi - cut]
    if len(slab) < 3:
        slab = pts
    # Widest direction in the plane perpendicular to z.
    flat = slab - slab.mean(axis=0)
    flat = flat - np.outer(flat @ z, z)
    evals2, evecs2 = np.linalg.eigh(np.cov(flat.T))
    x = evecs2[:, np.argmax(evals2)]
    x = x - (x @ z) * z
    if x @ hint_right < 0:
        x = -x
    frame = _frame(x, z, np.zeros(3))
    rot = frame[:3, :3]
    local = slab @ rot  # coordinates in (x, y, z)
    mid = 0.5 * (local.min(axis=0) + local.max(axis=0))
    frame[:3, 3] = rot @ mid
    return frame


def _get(landmarks: dict, keys, bone: str):
    for k in keys:
        if k in landmarks:
            return np.asarray(landmarks[k], dtype=float).reshape(3)
    raise InputError("anatomical landmarks", f"{bone}: missing one of {list(keys)}")


def anatomical_frame_from_landmarks(landmarks: dict, bone: str, side: str = "right") -> np.ndarray:
    """Anatomical frame (4x4 bone_from_anatomical) from named landmarks in bone mm.

    femur: ``medial_epicondyle``, ``lateral_epicondyle`` and ``hip_centre`` (or ``shaft``: any point
    on the proximal shaft axis). Origin = epicondyle midpoint, z = towards the hip.
    tibia: ``medial_plateau``, ``lateral_plateau`` and ``ankle_centre`` (or ``shaft``, or both
    ``medial_malleolus`` + ``lateral_malleolus``). Origin = plateau midpoint, z = from the ankle up.
    x is the medial->lateral line made to point to the subject's right (hence ``side``),
    orthogonalised against z.
    """
    bone = _check_bone(bone)
    sign = _check_side(side)
    if bone == "femur":
        med = _get(landmarks, ("medial_epicondyle",), bone)
        lat = _get(landmarks, ("lateral_epicondyle",), bone)
        origin = 0.5 * (med + lat)
        z = _get(landmarks, _FEMUR_SHAFT_KEYS, bone) - origin
    else:
        med = _get(landmarks, ("medial_plateau", "medial_condyle"), bone)
        lat = _get(landmarks, ("lateral_plateau", "lateral_condyle"), bone)
        origin = 0.5 * (med + lat)
        if "medial_malleolus" in landmarks and "lateral_malleolus" in landmarks:
            distal = 0.5 * (np.asarray(landmarks["medial_malleolus"], float).reshape(3)
                            + np.asarray(landmarks["lateral_malleolus"], float).reshape(3))
        else:
            distal = _get(landmarks, _TIBIA_SHAFT_KEYS, bone)
        z = origin - distal
    x_hint = sign * (lat - med)
    if np.linalg.norm(np.cross(_unit(z), _unit(x_hint))) < 1e-6:
        raise InputError("anatomical landmarks", f"{bone}: medio-lateral line is parallel to the long axis")
    return _frame(x_hint, z, origin)


def grood_suntay(world_from_femur_anat, world_from_tibia_anat, side: str = "right") -> dict:
    """Grood & Suntay angles (deg) and translations (mm) per frame; see the module docstring.

    Inputs are (N, 4, 4) (or a single 4x4) poses of the femoral and tibial anatomical frames.
    Returns a dict of (N,) arrays: ``flexion``, ``adduction``, ``internal_rotation``,
    ``lateral_mm``, ``anterior_mm``, ``proximal_mm``.
    """
    sign = _check_side(side)
    f = np.asarray(world_from_femur_anat, dtype=float)
    t = np.asarray(world_from_tibia_anat, dtype=float)
    if f.shape == (4, 4):
        f = f[None]
    if t.shape == (4, 4):
        t = t[None]
    if f.shape != t.shape or f.shape[1:] != (4, 4):
        raise InputError("kinematics", f"femur and tibia poses must both be (N, 4, 4); got {f.shape} and {t.shape}")
    xf, yf, zf = f[:, :3, 0], f[:, :3, 1], f[:, :3, 2]
    xt, yt, zt = t[:, :3, 0], t[:, :3, 1], t[:, :3, 2]
    e1 = _unit(xf)
    e3 = _unit(zt)
    e2 = _unit(np.cross(e3, e1))
    dot = lambda a, b: np.sum(a * b, axis=-1)  # noqa: E731
    flexion = np.degrees(np.arctan2(-dot(e2, zf), dot(e2, yf)))
    adduction = sign * np.degrees(np.arcsin(np.clip(dot(e1, e3), -1.0, 1.0)))
    internal = sign * np.degrees(np.arctan2(dot(e2, xt), dot(e2, yt)))
    h = t[:, :3, 3] - f[:, :3, 3]
    basis = np.stack([e1, e2, e3], axis=-1)  # (N, 3, 3) columns e1, e2, e3
    q = np.linalg.solve(basis, h[..., None])[..., 0]
    return {
        "flexion": flexion,
        "adduction": adduction,
        "internal_rotation": internal,
        "lateral_mm": sign * q[:, 0],
        "anterior_mm": q[:, 1],
        "proximal_mm": q[:, 2],
    }


def knee_kinematics(poses: dict, femur_from_anat: np.ndarray, tibia_from_anat: np.ndarray,
                    side: str = "right") -> dict:
    """Grood & Suntay from bone poses ``{"femur": (N,4,4), "tibia": (N,4,4)}`` (world_from_bone)."""
    wf = np.asarray(poses["femur"], float) @ np.asarray(femur_from_anat, float)
    wt = np.asarray(poses["tibia"], float) @ np.asarray(tibia_from_anat, float)
    return grood_suntay(wf, wt, side=side)
