"""Pose accuracy as the field reports it: in-plane / out-of-plane centroid error and geodesic rotation error.

Out-of-plane = the component of the centroid error along the line from the X-ray source to the TRUE
centroid; in-plane = the norm of the rest. Frames whose estimate is NaN are failures (all errors inf).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, read_json_object
from .geometry import CArmGeometry, apply_transform
from .pose_io import read_jts, read_poses_csv, rotation_angle_deg, world_pose_from_file_pose


def pose_errors(est, truth, centroid_bone_mm, geometry: CArmGeometry | None) -> dict[str, np.ndarray]:
    """Per-frame errors of ``est`` against ``truth`` (both ``(N, 4, 4)`` ``world_from_bone``).

    Returns ``in_plane_mm``, ``out_of_plane_mm`` (absolute), ``out_of_plane_signed_mm`` (+ = further from
    the source), ``translation_mm`` (3-D centroid error), ``rotation_deg`` and ``failed`` (bool).
    ``geometry=None`` puts the source at the world origin (JointTrack world = source frame).
    """
    est = np.asarray(est, dtype=float).reshape(-1, 4, 4)
    truth = np.asarray(truth, dtype=float).reshape(-1, 4, 4)
    if est.shape != truth.shape:
        raise InputError("poses", f"{len(est)} estimated frames but {len(truth)} true frames")
    c = np.asarray(centroid_bone_mm, dtype=float).reshape(1, 3)
    source = np.zeros(3) if geometry is None else geometry.source_position_world
    failed = np.isnan(est).any(axis=(1, 2)) | np.isinf(est).any(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        c_est = apply_transform(est, c)[:, 0]
        c_true = apply_transform(truth, c)[:, 0]
        d = c_est - c_true
        ray = c_true - source
        ray /= np.linalg.norm(ray, axis=1, keepdims=True)
        along = np.einsum("ni,ni->n", d, ray)
        in_plane = np.linalg.norm(d - along[:, None] * ray, axis=1)
        rot = rotation_angle_deg(est, truth)
    out = {
        "in_plane_mm": in_plane,
        "out_of_plane_mm": np.abs(along),
        "out_of_plane_signed_mm": along,
        "translation_mm": np.linalg.norm(d, axis=1),
        "rotation_deg": rot,
    }
    for v in out.values():
        v[failed] = np.inf
    out["failed"] = failed
    return out


def _percentile(values: np.ndarray, q: float) -> float:
    """Linear-interpolated percentile that keeps inf (numpy gives NaN for inf - inf)."""
    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        return math.nan
    pos = q / 100.0 * (v.size - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    frac = pos - lo
    if v[lo] == v[hi] or frac == 0.0:
        return float(v[lo])
    return float(v[lo] + frac * (v[hi] - v[lo]))


def summarise(errors: dict, success_mm: float = 1.0) -> dict:
    """Median and 95th percentile of each error, success rate (% of frames with in-plane < success_mm)."""
    n = int(len(errors["in_plane_mm"]))
    out: dict = {"n_frames": n}
    for key in ("in_plane_mm", "out_of_plane_mm", "rotation_deg"):
        out[f"{key}_median"] = _percentile(errors[key], 50)
        out[f"{key}_p95"] = _percentile(errors[key], 95)
    out["success_rate_pct"] = float(100.0 * np.mean(np.asarray(errors["in_plane_mm"]) < success_mm)) if n else math.nan
    out["n_failed"] = int(np.sum(errors.get("failed", np.zeros(n, bool))))
    return out


def _load_json(path: Path) -> dict:
    return read_json_object(path)


def _bone_info(truth_dir: Path) -> dict:
    path = truth_dir / "bones.json"
    if not path.is_file():
        return {}
    d = _load_json(path)
    d = d.get("bones", d)
    return {k: v for k, v in d.items() if isinstance(v, dict)}


def _load_side(where: Path, geometry, info: dict, label: str) -> dict[str, np.ndarray]:
    """{bone: world_from_bone} from ``poses.csv`` (world_from_bone) or ``{bone}.jts`` (file-model poses)."""
    csv_path = where if where.is_file() else where / "poses.csv"
    if csv_path.is_file():
        if csv_path.suffix.lower() != ".csv":
            raise InputError(csv_path, f"{label}: expected a folder or a poses .csv file")
        return read_poses_csv(csv_path)
    if not where.is_dir():
        raise InputError(where, f"{label}: folder not found")
    out = {}
    for jts in sorted(where.glob("*.jts")):
        bone = jts.stem
        ffb = info.get(bone, {}).get("file_from_bone")
        out[bone] = world_pose_from_file_pose(read_jts(jts), geometry,
                                              None if ffb is None else np.asarray(ffb, dtype=float))
    if not out:
        raise InputError(where, f"{label}: no poses.csv and no .jts pose files")
    return out


def evaluate_files(poses_dir_or_csv, truth_dir, centroids: dict | None = None,
                   geometry: CArmGeometry | None = None) -> dict[str, dict]:
    """Compare estimated poses with the truth folder, bone by bone -> ``{bone: summary}``.

    Truth folder: ``femur.jts``, ``tibia.jts`` (JointTrack ``source_from_file_model``), optionally
    ``poses.csv`` (``world_from_bone``, preferred), ``calibration.json`` and ``bones.json``
    (``{bone: {"centroid_mm": [...], "file_from_bone": 4x4}}``). The estimate is ``poses.csv``
    (preferred) or ``{bone}.jts`` in a folder, or a CSV path.
    """
    truth_dir = Path(truth_dir)
    est_path = Path(poses_dir_or_csv)
    if not truth_dir.is_dir():
        raise InputError(truth_dir, "truth folder not found")
    if not est_path.exists():
        raise InputError(est_path, "estimated poses not found")
    if geometry is None:
        for cand in (truth_dir / "calibration.json",
                     (est_path if est_path.is_dir() else est_path.parent) / "calibration.json"):
            if cand.is_file():
                geometry = CArmGeometry.from_dict(_load_json(cand), origin=str(cand))
                break
        else:
            warnings.warn(f"{truth_dir}: no calibration.json; assuming world = JointTrack source frame",
                          stacklevel=2)
    info = _bone_info(truth_dir)
    truth = _load_side(truth_dir, geometry, info, "truth")
    est = _load_side(est_path, geometry, info, "estimate")
    common = [b for b in truth if b in est]
    if not common:
        raise InputError(est_path, f"no bone in common with the truth ({', '.join(truth)})")
    for b in truth:
        if b not in est:
            warnings.warn(f"{est_path}: no estimate for {b}; skipped", stacklevel=2)
    results = {}
    for bone in common:
        t, e = truth[bone], est[bone]
        if len(e) < len(t):
            e = np.concatenate([e, np.full((len(t) - len(e), 4, 4), np.nan)])
        elif len(e) > len(t):
            warnings.warn(f"{est_path}: {bone} has {len(e)} frames, the truth {len(t)}; extra frames ignored",
                          stacklevel=2)
            e = e[:len(t)]
        if centroids is not None and bone in centroids:
            c = np.asarray(centroids[bone], dtype=float)
        elif "centroid_mm" in info.get(bone, {}):
            c = np.asarray(info[bone]["centroid_mm"], dtype=float)
        else:
            warnings.warn(f"{truth_dir}: no centroid for {bone}; measuring at the bone-frame origin", stacklevel=2)
            c = np.zeros(3)
        results[bone] = summarise(pose_errors(e, t, c, geometry))
    return results


def format_table(summary_by_bone: dict[str, dict]) -> str:
    """Aligned plain-text table, one row per bone."""
    cols = [("bone", None), ("frames", "n_frames"), ("in-plane mm med", "in_plane_mm_median"),
            ("p95", "in_plane_mm_p95"), ("out-of-plane mm med", "out_of_plane_mm_median"),
            ("p95", "out_of_plane_mm_p95"), ("rotation deg med", "rotation_deg_median"),
            ("p95", "rotation_deg_p95"), ("success %", "success_rate_pct")]
    rows = [[c for c, _ in cols]]
    for bone, s in summary_by_bone.items():
        row = [str(bone)]
        for _, key in cols[1:]:
            v = s.get(key, math.nan)
            row.append(str(int(v)) if key == "n_frames" else f"{v:.1f}" if key == "success_rate_pct" else f"{v:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(cols)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


__all__ = ["pose_errors", "summarise", "evaluate_files", "format_table"]
