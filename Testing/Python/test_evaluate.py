"""Accuracy metrics: hand-computed in-plane / out-of-plane / rotation errors, summaries, file evaluation."""
import json

import numpy as np
import pytest

from Fluoro2DRRLib import evaluate as ev
from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import CArmGeometry, RAS_FROM_LPS
from Fluoro2DRRLib.pose_io import euler312_to_matrix, file_pose_from_world_pose, write_jts, write_poses_csv


def axis_angle(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def geometry():
    wfs = np.eye(4)
    wfs[:3, :3] = axis_angle([1, 0, 0], 90)  # beam along +y world
    wfs[:3, 3] = [0, -800, 0]
    return CArmGeometry(1000.0, (0.3, 0.3), (500, 500), world_from_source=wfs)


def perturbed(truth, centroid, g, in_plane=0.5, along=2.0, rot_deg=3.0, axis=(1, 2, 3)):
    """truth, then rotated rot_deg about an axis through the centroid, then the centroid shifted."""
    c_world = truth[:3, :3] @ centroid + truth[:3, 3]
    ray = c_world - g.source_position_world
    ray /= np.linalg.norm(ray)
    perp = np.cross(ray, [0, 0, 1.0])
    perp /= np.linalg.norm(perp)
    rot = np.eye(4)
    rot[:3, :3] = axis_angle(axis, rot_deg)
    to_c, from_c = np.eye(4), np.eye(4)
    to_c[:3, 3], from_c[:3, 3] = c_world, -c_world
    shift = np.eye(4)
    shift[:3, 3] = in_plane * perp + along * ray
    return shift @ to_c @ rot @ from_c @ truth


def test_hand_computed_case():
    g = geometry()
    centroid = np.array([5.0, -10.0, 30.0])
    truth = np.stack([euler312_to_matrix(10 * i, 30, -5, 10 * i, 5, -20) for i in range(4)])
    est = np.stack([perturbed(t, centroid, g) for t in truth])
    est[3] = np.nan
    e = ev.pose_errors(est, truth, centroid, g)
    np.testing.assert_allclose(e["in_plane_mm"][:3], 0.5, atol=1e-9)
    np.testing.assert_allclose(e["out_of_plane_mm"][:3], 2.0, atol=1e-9)
    np.testing.assert_allclose(e["out_of_plane_signed_mm"][:3], 2.0, atol=1e-9)
    np.testing.assert_allclose(e["rotation_deg"][:3], 3.0, atol=1e-6)
    assert np.isinf(e["in_plane_mm"][3]) and e["failed"].tolist() == [False, False, False, True]
    s = ev.summarise(e)
    assert s["n_frames"] == 4 and s["n_failed"] == 1
    assert s["success_rate_pct"] == pytest.approx(75.0)
    assert s["in_plane_mm_median"] == pytest.approx(0.5)
    assert s["in_plane_mm_p95"] == np.inf
    assert s["rotation_deg_median"] == pytest.approx(3.0, abs=1e-6)


def test_summary_percentiles():
    e = {"in_plane_mm": np.arange(1, 21) / 10.0, "out_of_plane_mm": np.zeros(20), "rotation_deg": np.ones(20)}
    s = ev.summarise(e)
    assert s["in_plane_mm_median"] == pytest.approx(np.median(e["in_plane_mm"]))
    assert s["in_plane_mm_p95"] == pytest.approx(np.percentile(e["in_plane_mm"], 95))
    assert s["success_rate_pct"] == pytest.approx(45.0)  # 0.1 .. 0.9 below 1 mm


def test_evaluate_files_jts_truth_csv_estimate(tmp_path):
    g = geometry()
    truth_dir, out_dir = tmp_path / "truth", tmp_path / "out"
    truth_dir.mkdir(), out_dir.mkdir()
    g.save_json(truth_dir / "calibration.json")
    centroids = {"femur": np.array([0.0, 0, 40]), "tibia": np.array([0.0, 0, -40])}
    ffb = RAS_FROM_LPS
    truth = {b: np.stack([euler312_to_matrix(0, 30 * i, 0, 5 * i, 0, 0) for i in range(5)]) for b in centroids}
    for b, t in truth.items():
        write_jts(truth_dir / f"{b}.jts", file_pose_from_world_pose(t, g, ffb))
    (truth_dir / "bones.json").write_text(json.dumps(
        {b: {"centroid_mm": c.tolist(), "file_from_bone": ffb.tolist()} for b, c in centroids.items()}))
    est = {b: np.stack([perturbed(m, centroids[b], g, in_plane=0.5 if b == "femur" else 1.5) for m in t])
           for b, t in truth.items()}
    write_poses_csv(out_dir / "poses.csv", est)
    res = ev.evaluate_files(out_dir, truth_dir)
    assert set(res) == {"femur", "tibia"}
    assert res["femur"]["in_plane_mm_median"] == pytest.approx(0.5, abs=1e-6)
    assert res["femur"]["out_of_plane_mm_median"] == pytest.approx(2.0, abs=1e-6)
    assert res["femur"]["success_rate_pct"] == 100.0 and res["tibia"]["success_rate_pct"] == 0.0
    table = ev.format_table(res)
    assert "femur" in table and "tibia" in table and len({len(ln) for ln in table.splitlines()}) == 1
    # an estimate in .jts form (file-model poses) gives the same numbers
    jts_dir = tmp_path / "out_jts"
    jts_dir.mkdir()
    for b, e in est.items():
        write_jts(jts_dir / f"{b}.jts", file_pose_from_world_pose(e, g, ffb))
    res2 = ev.evaluate_files(jts_dir, truth_dir)
    assert res2["tibia"]["in_plane_mm_median"] == pytest.approx(1.5, abs=1e-6)


def test_evaluate_files_errors(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: truth folder not found"):
        ev.evaluate_files(tmp_path, tmp_path / "nowhere")
    (tmp_path / "t").mkdir()
    write_jts(tmp_path / "t" / "femur.jts", np.eye(4)[None])
    with pytest.raises(InputError, match=r"est\.csv: estimated poses not found"):
        ev.evaluate_files(tmp_path / "est.csv", tmp_path / "t")
    write_poses_csv(tmp_path / "est.csv", {"tibia": np.eye(4)[None]})
    with pytest.warns(UserWarning):
        with pytest.raises(InputError, match=r"est\.csv: no bone in common"):
            ev.evaluate_files(tmp_path / "est.csv", tmp_path / "t")
