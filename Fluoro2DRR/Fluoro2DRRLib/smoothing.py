"""Temporal smoothing of a registered pose sequence: a local polynomial in time, bone-centred.

Single-plane registration errors are partly independent from frame to frame (image noise, wires, a
translation that fails on one frame); a knee filmed at fluoroscopy frame rates moves smoothly. Each frame's
pose is replaced by a weighted least-squares polynomial (``order``, default 2: constant acceleration) fitted
over the ``window_frames`` frames around it -- the bone's centroid position in world mm, and its rotation as
a rotation vector relative to the frame's own rotation (small angles: the fit is linear there). The bone
turns about its own centre, so smoothing a rotation does not swing the bone about the world origin.

Frames with weight 0 (failed frames) do not pull on their neighbours; they receive the fit of their
neighbours (their own pose is ignored). The order drops where a window has too few usable frames to smooth
with it (3 frames: a line; 2: the line through them, so a sequence's end frame is left as it is); a frame with
no usable neighbour keeps its pose.

A quadratic motion is reproduced exactly (up to the small-angle linearisation of the rotation). Measured on
the translated 20-frame benchmark (``Testing/benchmarks/bench_registration.py``): see the README.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import InputError


def smooth_pose_sequence(world_from_bone: np.ndarray, centroid_bone, window_frames: int = 7, order: int = 2,
                         weights=None) -> np.ndarray:
    """(N, 4, 4) world_from_bone -> (N, 4, 4) smoothed. ``weights``: (N,) >= 0 (0: ignore that frame's pose)."""
    poses = np.asarray(world_from_bone, dtype=float)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise InputError("poses", f"expected (N, 4, 4) poses, got shape {poses.shape}")
    if int(window_frames) < 1 or int(window_frames) % 2 == 0:
        raise InputError("--smooth-window", f"must be an odd number of frames >= 1, not {window_frames}")
    if int(order) < 0:
        raise InputError("--smooth-order", f"must be >= 0, not {order}")
    n = len(poses)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float).copy()
    if w.shape != (n,) or np.any(w < 0):
        raise InputError("weights", f"expected {n} non-negative weights")
    usable = np.isfinite(poses).all(axis=(1, 2)) & (w > 0)
    w[~usable] = 0.0
    c = np.asarray(centroid_bone, dtype=float)
    centres = np.full((n, 3), np.nan)
    rotations = [None] * n
    for k in np.flatnonzero(usable):
        centres[k] = poses[k, :3, :3] @ c + poses[k, :3, 3]
        rotations[k] = Rotation.from_matrix(poses[k, :3, :3])
    half = int(window_frames) // 2
    out = poses.copy()
    for k in range(n):
        idx = np.array([j for j in range(max(0, k - half), min(n, k + half + 1)) if usable[j]])
        if idx.size == 0 or (half == 0 and usable[k]):
            continue
        # reference rotation: the frame's own, or (a failed frame) its nearest usable neighbour's
        ref = rotations[k] if usable[k] else rotations[int(idx[np.argmin(np.abs(idx - k))])]
        rotvecs = np.stack([(ref.inv() * rotations[j]).as_rotvec() for j in idx])
        t = (idx - k).astype(float)
        deg = min(int(order), idx.size - 1)  # a polynomial the points determine ...
        if idx.size >= 3:  # ... leaving at least one degree of freedom to smooth with (3 frames: a line, not
            deg = min(deg, idx.size - 2)  # a parabola through them, which would change nothing)
        design = np.vander(t, deg + 1, increasing=True) * np.sqrt(w[idx])[:, None]
        rhs = np.concatenate([centres[idx], rotvecs], axis=1) * np.sqrt(w[idx])[:, None]
        coef = np.linalg.lstsq(design, rhs, rcond=None)[0][0]  # the polynomial at t = 0
        rot = (ref * Rotation.from_rotvec(coef[3:])).as_matrix()
        out[k, :3, :3] = rot
        out[k, :3, 3] = coef[:3] - rot @ c
        out[k, 3] = (0.0, 0.0, 0.0, 1.0)
    return out


def smooth_poses(poses: dict, centroids_bone: dict, window_frames: int, order: int = 2,
                 failed_frames=()) -> dict:
    """Every bone of a registration (name -> (N, 4, 4)) smoothed; ``failed_frames`` weigh 0 (and get their
    neighbours' fit). The one place the CLI (``register --smooth-window``) and the Slicer module smooth."""
    failed = {int(i) for i in failed_frames}
    out = {}
    for name, bone_poses in poses.items():
        n = len(bone_poses)
        weights = np.array([0.0 if k in failed else 1.0 for k in range(n)])
        out[name] = smooth_pose_sequence(bone_poses, centroids_bone[name], window_frames, order, weights)
    return out
