"""Temporal smoothing of pose sequences: exact on smooth motion, removes frame-to-frame noise, ignores
failed frames, and the pipeline writes the smoothed copy beside the measured poses."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.pose_io import read_poses_csv, rotation_angle_deg
from Fluoro2DRRLib.smoothing import smooth_pose_sequence

CENTROID = np.array([10.0, -40.0, 120.0])  # bone frame mm: far from the origin, as a real femur's centroid


def quadratic_motion(n=15):
    """A bone turning about its centroid (flexion-like, quadratic in time) while the centroid accelerates."""
    t = np.arange(n, dtype=float)
    poses = np.zeros((n, 4, 4))
    for k in range(n):
        rot = Rotation.from_rotvec(np.radians([2.0 * t[k] + 0.1 * t[k] ** 2, 0.5 * t[k], -0.3 * t[k]])).as_matrix()
        centre = np.array([100.0, 20.0, 700.0]) + np.array([1.5, -0.8, 0.3]) * t[k] + np.array([0.05, 0.02, 0]) * t[k] ** 2
        poses[k, :3, :3] = rot
        poses[k, :3, 3] = centre - rot @ CENTROID
        poses[k, 3, 3] = 1.0
    return poses


def centre_errors(a, b):
    ca = np.einsum("nij,j->ni", a[:, :3, :3], CENTROID) + a[:, :3, 3]
    cb = np.einsum("nij,j->ni", b[:, :3, :3], CENTROID) + b[:, :3, 3]
    return np.linalg.norm(ca - cb, axis=1)


def noisy(truth, rng, mm=0.8, deg=1.5):
    out = truth.copy()
    for k in range(len(out)):
        d = Rotation.from_rotvec(np.radians(deg) * rng.normal(size=3) / np.sqrt(3)).as_matrix()
        centre = out[k, :3, :3] @ CENTROID + out[k, :3, 3] + mm * rng.normal(size=3) / np.sqrt(3)
        out[k, :3, :3] = d @ out[k, :3, :3]
        out[k, :3, 3] = centre - out[k, :3, :3] @ CENTROID
    return out


def test_smooth_motion_is_kept():
    truth = quadratic_motion()
    smoothed = smooth_pose_sequence(truth, CENTROID, window_frames=7, order=2)
    assert centre_errors(smoothed, truth).max() < 1e-6
    # rotations are fitted as rotation vectors relative to each frame: exact up to the small-angle linearisation
    assert rotation_angle_deg(smoothed, truth).max() < 0.05
    np.testing.assert_array_equal(smooth_pose_sequence(truth, CENTROID, window_frames=1), truth)
    # 3 frames cannot hold a parabola that still smooths: a line, which does smooth noise
    measured = noisy(truth, np.random.default_rng(2))
    three = smooth_pose_sequence(measured, CENTROID, window_frames=3, order=2)
    assert not np.allclose(three[1:-1], measured[1:-1])
    np.testing.assert_allclose(three[[0, -1]], measured[[0, -1]], atol=1e-9)  # the ends: the line through 2


def test_frame_to_frame_noise_is_reduced():
    truth = quadratic_motion(30)
    measured = noisy(truth, np.random.default_rng(4))
    smoothed = smooth_pose_sequence(measured, CENTROID, window_frames=7, order=2)
    before_mm, after_mm = np.median(centre_errors(measured, truth)), np.median(centre_errors(smoothed, truth))
    before_deg, after_deg = np.median(rotation_angle_deg(measured, truth)), np.median(rotation_angle_deg(smoothed, truth))
    # measured 0.42x (mm) and 0.72x (deg) with this seed
    assert after_mm < 0.6 * before_mm and after_deg < 0.85 * before_deg, (before_mm, after_mm, before_deg, after_deg)


def test_a_failed_frame_neither_pulls_nor_stays():
    truth = quadratic_motion()
    measured = truth.copy()
    measured[7, :3, 3] += [25.0, 0.0, 0.0]  # a lost frame, 25 mm off
    measured[9] = np.nan  # a frame without a pose
    weights = np.ones(len(truth))
    weights[[7, 9]] = 0.0
    smoothed = smooth_pose_sequence(measured, CENTROID, window_frames=7, order=2, weights=weights)
    err = centre_errors(smoothed, truth)
    assert err.max() < 1e-6, err  # the lost frame gets its neighbours' fit; its neighbours are not pulled
    unweighted = smooth_pose_sequence(measured[:9], CENTROID, window_frames=5, order=2)
    assert centre_errors(unweighted, truth[:9])[6] > 3.0  # without the weight it would pull frame 6


def test_bad_arguments():
    truth = quadratic_motion(5)
    for window in (0, 4):
        with pytest.raises(InputError, match="odd"):
            smooth_pose_sequence(truth, CENTROID, window_frames=window)
    with pytest.raises(InputError, match="shape"):
        smooth_pose_sequence(truth[:, :3], CENTROID)
    with pytest.raises(InputError, match="weights"):
        smooth_pose_sequence(truth, CENTROID, weights=[1, 1])


def test_pipeline_writes_the_smoothed_copy_beside_the_measured_poses(tmp_path):
    from Fluoro2DRRLib.geometry import CArmGeometry
    from Fluoro2DRRLib.pipeline import write_smoothed
    from Fluoro2DRRLib.registration import SequenceResult

    class Bone:  # what write_smoothed uses of a BoneModel
        centroid_mm = CENTROID
        file_from_bone = np.eye(4)

    truth = quadratic_motion(12)
    measured = noisy(truth, np.random.default_rng(9))
    quality = [{"frame": k, "similarity": 0.9, "converged": True, "reinitialised": False, "seconds": 1.0,
                "failed": k == 4} for k in range(12)]
    result = SequenceResult(poses={"femur": measured, "tibia": measured.copy()}, quality=quality)
    geometry = CArmGeometry(1000.0, (0.3, 0.3), (256, 256))
    target = write_smoothed(tmp_path, result, geometry, {"femur": Bone(), "tibia": Bone()}, 7)
    assert target == tmp_path / "smoothed"
    back = read_poses_csv(target / "poses.csv")
    expected = smooth_pose_sequence(measured, CENTROID, 7, 2, weights=[0.0 if k == 4 else 1.0 for k in range(12)])
    np.testing.assert_allclose(back["femur"], expected, atol=1e-5)
    assert (target / "femur.jts").is_file() and (target / "tibia.tra").is_file()
    assert np.median(centre_errors(back["femur"], truth)) < np.median(centre_errors(measured, truth))


def test_a_finished_registration_is_resumed_without_registering_again(tmp_path, monkeypatch):
    """``register --resume --smooth-window N`` on a complete registration: no renderer is built and the second
    pass is not run again (it ran when the registration completed), even with a weak frame in it."""
    from Fluoro2DRRLib import registration
    from Fluoro2DRRLib.geometry import CArmGeometry
    from Fluoro2DRRLib.pipeline import ResultWriter, _fingerprint, run_registration

    class Bone:
        centroid_mm = CENTROID
        file_from_bone = np.eye(4)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished registration was registered again")

    geometry = CArmGeometry(1000.0, (0.3, 0.3), (64, 64))
    frames = np.random.default_rng(0).uniform(0, 1, (6, 64, 64)).astype(np.float32)
    bones = {"femur": Bone(), "tibia": Bone()}
    poses = {"femur": quadratic_motion(6), "tibia": quadratic_motion(6)}
    quality = [{"frame": k, "similarity": 0.5 if k == 3 else 0.95, "converged": True, "reinitialised": False,
                "seconds": 1.0, "failed": False, "note": ""} for k in range(6)]  # frame 3 is weak
    ResultWriter(tmp_path / "reg", geometry, bones, 6, {"fingerprint": _fingerprint(frames, geometry)}).write(
        poses, quality, "complete")
    monkeypatch.setattr(registration, "Registrar", must_not_run)
    monkeypatch.setattr(registration, "iter_revisit_weak_frames", must_not_run)
    result = run_registration(frames, geometry, bones, tmp_path / "reg", resume=True, progress=False)
    for name in bones:
        np.testing.assert_allclose(result.poses[name], poses[name], atol=1e-6)
    assert [q["similarity"] for q in result.quality] == [q["similarity"] for q in quality]
