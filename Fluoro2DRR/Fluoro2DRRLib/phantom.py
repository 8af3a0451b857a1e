"""A procedural knee made in code: femur and tibia as smooth unions of simple solids.

Bone frames (RAS-like, mm): x medio-lateral, y anterior, z superior; the femur's origin is the
centre of its condyles, the tibia shares it at zero flexion (plateau just below the condyles).
Shapes vary with the seed (size, condyle radii, shaft angle; every part with ``shape_variety``) so
translation networks and the registration never see one fixed knee.
"""
from __future__ import annotations

import numpy as np

from .bones import BoneModel, density_from_mask, surface_from_mask

FLEXION_CENTRE_MM = np.array([0.0, -3.0, 0.0])  # femoral condyle centre, femur frame


def _ellipsoid(p, centre, radii):
    q = (p - centre) / radii
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / radii, axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)  # Inigo Quilez' ellipsoid distance bound


def _capsule(p, a, b, r):
    pa, ba = p - a, b - a
    h = np.clip((pa @ ba) / (ba @ ba), 0.0, 1.0)
    return np.linalg.norm(pa - h[..., None] * ba, axis=-1) - r


def _smooth_union(d1, d2, k):
    h = np.clip(0.5 + 0.5 * (d2 - d1) / k, 0.0, 1.0)
    return d2 * (1 - h) + d1 * h - k * h * (1 - h)


def _grid(lo, hi, voxel_mm):
    axes = [np.arange(a, b + voxel_mm, voxel_mm) for a, b in zip(lo, hi)]
    p = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    ijk_to_mm = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    ijk_to_mm[:3, 3] = lo
    return p, ijk_to_mm


class _Jitter:
    """Random changes to each part of a bone (``shape_variety`` > 0): every ellipsoid's centre moves up to
    3 mm x variety per axis and its radii scale by up to +-15 % x variety, shaft radii +-15 % x variety. Drawn in
    the order the parts are made, from a generator of their own, so variety 0 leaves the shapes (and the
    phantom's other random draws) exactly as they were."""

    def __init__(self, rng: np.random.Generator | None = None, variety: float = 0.0):
        self.rng, self.variety = rng, float(variety)

    def part(self, centre, radii):
        if not self.variety:
            return centre, radii
        v = self.variety
        return (centre + self.rng.uniform(-3.0, 3.0, 3) * v,
                radii * (1.0 + self.rng.uniform(-0.15, 0.15, 3) * v))

    def radius(self, r):
        return r * (1.0 + self.rng.uniform(-0.15, 0.15) * self.variety) if self.variety else r


def _femur_sdf(p, s, rng_params, J=None):
    J = J or _Jitter()
    c_r = rng_params["condyle_radii"] * s
    # the lateral condyle sits more anterior, the medial one reaches further distally (real asymmetry)
    d = _ellipsoid(p, *J.part(np.array([19.0, -1.0, 0.0]) * s, c_r))
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([-19.0, -5.0, -1.5]) * s, c_r * np.array([1.05, 1.08, 1.0]))), 4.0)
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([0.0, 2.0, 20.0]) * s, np.array([30.0, 21.0, 26.0]) * s)), 8.0)
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([-27.0, -2.0, 22.0]) * s, np.array([6.0, 8.0, 9.0]) * s)), 4.0)  # epicondyle
    top = np.array([rng_params["shaft_tilt_mm"], 4.0, rng_params["femur_length"]])
    d = _smooth_union(d, _capsule(p, np.array([0.0, 3.0, 25.0]) * s, top, J.radius(12.5 * s)), 10.0)
    d = _smooth_union(d, _capsule(p, np.array([2.0, -10.0, 30.0]) * s, top + np.array([0, -9.0, 0]), 5.0 * s), 6.0)  # linea aspera
    # trochlear groove and intercondylar notch: carve
    notch = _ellipsoid(p, *J.part(np.array([0.0, -14.0, -10.0]) * s, np.array([6.5, 14.0, 12.0]) * s))
    groove = _ellipsoid(p, *J.part(np.array([2.0, 22.0, 10.0]) * s, np.array([6.0, 5.0, 16.0]) * s))
    return np.maximum(d, -np.minimum(notch, groove))


def _tibia_sdf(p, s, rng_params, J=None):
    J = J or _Jitter()
    # medial plateau larger and lower than the lateral one; both slope posteriorly
    d = _ellipsoid(p, *J.part(np.array([-16.0, -5.0, -29.5]) * s, np.array([21.0, 26.0, 8.0]) * s))
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([17.0, -2.0, -28.5]) * s, np.array([19.0, 22.0, 8.0]) * s)), 6.0)
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([0.0, -3.0, -45.0]) * s, np.array([29.0, 21.0, 20.0]) * s)), 8.0)
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([7.0, 17.0, -52.0]) * s, np.array([10.0, 9.0, 16.0]) * s)), 5.0)  # tuberosity
    d = _smooth_union(d, _ellipsoid(p, *J.part(np.array([28.0, -14.0, -44.0]) * s, np.array([8.0, 8.0, 9.0]) * s)), 4.0)  # fibular facet
    bottom = np.array([-rng_params["shaft_tilt_mm"] * 0.5, -3.0, -rng_params["tibia_length"]])
    d = _smooth_union(d, _capsule(p, np.array([0.0, -3.0, -55.0]) * s, bottom, J.radius(11.0 * s)), 10.0)
    d = _smooth_union(d, _capsule(p, np.array([2.0, 9.0, -62.0]) * s, bottom + np.array([0, 7.0, 20.0]), 4.5 * s), 5.0)  # crest
    # intercondylar eminence between the two plateaus
    return _smooth_union(d, _ellipsoid(p, *J.part(np.array([0.0, -5.0, -21.5]) * s, np.array([5.0, 8.0, 3.0]) * s)), 2.0)


def make_knee_phantom(seed: int = 0, voxel_mm: float = 0.6, mesh: bool = True,
                      shape_variety: float = 0.0) -> dict[str, BoneModel]:
    """Femur and tibia BoneModels (density + closed surface), in their own frames.

    ``shape_variety`` (0 = the shapes every test and benchmark so far used): each part of each bone moved and
    resized at random (:class:`_Jitter`) and each bone stretched by up to +-8 % x variety per axis -- more
    shapes for training the translation networks than 30 seeds of one template give."""
    rng = np.random.default_rng(seed)
    jitter_rng = np.random.default_rng([seed, 7919])  # its own stream: variety 0 draws nothing from it
    if shape_variety < 0:
        raise ValueError(f"shape_variety must be >= 0, not {shape_variety}")
    s = float(rng.uniform(0.9, 1.1))
    params = {
        "condyle_radii": np.array([12.5, 23.0, 19.5]) * rng.uniform(0.93, 1.07, 3),
        "shaft_tilt_mm": float(rng.uniform(-6, 6)),
        "femur_length": float(rng.uniform(100, 125)),
        "tibia_length": float(rng.uniform(115, 140)),
    }
    bones = {}
    for name, sdf, lo, hi in (
        ("femur", _femur_sdf, (-40, -32, -24), (38, 32, params["femur_length"] + 16)),
        ("tibia", _tibia_sdf, (-45, -33, -params["tibia_length"] - 14), (45, 34, -16)),
    ):
        stretch = 1.0 + jitter_rng.uniform(-0.08, 0.08, 3) * shape_variety if shape_variety else np.ones(3)
        # jittered parts reach further than the template's box, except at the shaft's end, which the box cuts
        # as a scan's field of view does (the femur's top, the tibia's bottom)
        margin_lo = np.array([6.0, 6.0, 6.0 if name == "femur" else 0.0]) * shape_variety
        margin_hi = np.array([6.0, 6.0, 0.0 if name == "femur" else 6.0]) * shape_variety
        lo = (np.array(lo, float) * max(s, 1.0) - margin_lo) * stretch
        hi = (np.array(hi, float) * max(s, 1.0) + margin_hi) * stretch
        p, ijk_to_mm = _grid(lo, hi, voxel_mm)
        mask = sdf(p / stretch, s, params, _Jitter(jitter_rng, shape_variety)) <= 0.0
        points = triangles = None
        if mesh:
            points, triangles = surface_from_mask(mask, ijk_to_mm)
        bones[name] = BoneModel(name=name, density=density_from_mask(mask, voxel_mm), bone_from_ijk=ijk_to_mm,
                                surface_points_mm=points, surface_triangles=triangles,
                                source_path=f"procedural knee phantom (seed {seed}"
                                            + (f", shape variety {shape_variety:g})" if shape_variety else ")"))
    return bones


# ---- kinematics of the simulated knee -----------------------------------------------------------
def rotation_matrix(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    out = np.eye(4)
    out[:3, :3] = m
    return out


def translation_matrix(t) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = t
    return out


# Lateral view: the bone's medio-lateral axis along the beam, long axis up the image, anterior to the right.
SOURCE_FROM_LATERAL_VIEW = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                                     [0.0, 0.0, 0.0, 1.0]])


def knee_motion(n_frames: int, world_from_source: np.ndarray, source_to_knee_mm: float,
                knee_from_femur: np.ndarray, knee_from_tibia: np.ndarray, flexion_centre_knee=FLEXION_CENTRE_MM,
                seed: int = 0, max_flexion_deg: float = 60.0) -> dict[str, np.ndarray]:
    """Smooth squat-like motion, world_from_bone (N, 4, 4) per bone, in a lateral view of the knee.

    The knee frame is x medio-lateral, y anterior, z superior. The tibia flexes about the condyle axis
    through ``flexion_centre_knee`` (swinging posterior), with some internal rotation, ab/adduction and
    femoral rollback; the thigh tilts as the knee flexes and the whole knee drifts, so both bones move.
    """
    rng = np.random.default_rng(seed + 1000)
    t = np.linspace(0.0, 1.0, max(n_frames, 1))
    start = rng.uniform(5, 15)
    flexion = start + (max_flexion_deg - start) * (0.5 - 0.5 * np.cos(np.pi * t))
    phase = rng.uniform(0, 2 * np.pi, 8)
    oblique = rng.uniform(-6, 6, 2)
    c = np.asarray(flexion_centre_knee, float)
    femur, tibia = [], []
    for k, tk in enumerate(t):
        def wobble(i, amp):
            return amp * np.sin(2 * np.pi * tk + phase[i])

        knee_in_source = np.array([wobble(0, 6.0), wobble(1, 6.0), -source_to_knee_mm + wobble(2, 8.0)])
        world_from_knee = (world_from_source @ translation_matrix(knee_in_source) @ SOURCE_FROM_LATERAL_VIEW
                           @ rotation_matrix("z", oblique[0] + wobble(3, 2.0))
                           @ rotation_matrix("y", oblique[1] + wobble(4, 2.0))
                           @ rotation_matrix("x", 0.5 * flexion[k] - 15.0) @ translation_matrix(-c))
        femur_from_tibia = (translation_matrix(c) @ rotation_matrix("x", -flexion[k]) @ translation_matrix(-c)
                            @ translation_matrix([0.0, -0.05 * flexion[k], 0.0])
                            @ rotation_matrix("z", 0.15 * flexion[k] + wobble(6, 2.0))
                            @ rotation_matrix("y", wobble(5, 2.0)))
        femur.append(world_from_knee @ knee_from_femur)
        tibia.append(world_from_knee @ femur_from_tibia @ knee_from_tibia)
    return {"femur": np.array(femur), "tibia": np.array(tibia)}


def knee_flexion_sequence(n_frames: int, world_from_source: np.ndarray, source_to_knee_mm: float,
                          seed: int = 0, max_flexion_deg: float = 60.0) -> dict[str, np.ndarray]:
    """Motion of the procedural phantom (its bone frames are the knee frame)."""
    return knee_motion(n_frames, world_from_source, source_to_knee_mm, np.eye(4), np.eye(4),
                       FLEXION_CENTRE_MM, seed, max_flexion_deg)
