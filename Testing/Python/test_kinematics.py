"""Grood & Suntay angles and anatomical frames on hand-computed cases."""
import numpy as np
import pytest

from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.kinematics import (anatomical_frame_from_landmarks, anatomical_frame_from_points,
                                      grood_suntay, knee_kinematics)
from Fluoro2DRRLib.phantom import rotation_matrix as rot


def trans(x, y, z):
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def gs(femur, tibia, side="right"):
    out = grood_suntay(np.asarray(femur)[None], np.asarray(tibia)[None], side=side)
    return {k: float(v[0]) for k, v in out.items()}


def assert_gs(out, **expected):
    full = dict(flexion=0, adduction=0, internal_rotation=0, lateral_mm=0, anterior_mm=0, proximal_mm=0)
    full.update(expected)
    for k, v in full.items():
        assert out[k] == pytest.approx(v, abs=1e-9), (k, out[k], v)


def test_identity_reads_zero():
    assert_gs(gs(np.eye(4), np.eye(4)))


def test_pure_flexion_30():
    # Knee flexion: the distal tibia moves posteriorly = negative rotation about the right-pointing x.
    femur = trans(10, -5, 800) @ rot("z", 25)  # arbitrary femur placement in the world
    tibia = femur @ rot("x", -30)
    assert_gs(gs(femur, tibia), flexion=30)


def test_pure_internal_rotation_10_right_and_left():
    tibia = rot("z", 10)
    assert_gs(gs(np.eye(4), tibia, "right"), internal_rotation=10)
    assert_gs(gs(np.eye(4), tibia, "left"), internal_rotation=-10)


def test_pure_adduction():
    # Rotation about anterior y by +5 deg moves the distal tibia to the subject's left: medial for a right knee.
    assert_gs(gs(np.eye(4), rot("y", 5), "right"), adduction=5)
    assert_gs(gs(np.eye(4), rot("y", 5), "left"), adduction=-5)


def test_combined_sequence_jcs_order():
    # JCS = flexion about femoral x, then ad/abduction about the floating axis, then rotation about
    # the tibial z: R = Rx(-flex) Ry(add) Rz(int) reads back exactly for a right knee.
    flex = np.linspace(0, 90, 7)
    add = np.linspace(-4, 6, 7)
    intr = np.linspace(12, -8, 7)
    femur = np.stack([trans(1, 2, 3) @ rot("z", 40) for _ in flex])
    tibia = np.stack([f @ rot("x", -a) @ rot("y", b) @ rot("z", c) for f, a, b, c in zip(femur, flex, add, intr)])
    out = grood_suntay(femur, tibia, side="right")
    np.testing.assert_allclose(out["flexion"], flex, atol=1e-9)
    np.testing.assert_allclose(out["adduction"], add, atol=1e-9)
    np.testing.assert_allclose(out["internal_rotation"], intr, atol=1e-9)
    np.testing.assert_allclose(out["lateral_mm"], 0, atol=1e-9)


def test_known_translation():
    # Tibia origin 3 mm right (lateral for a right knee), 4 mm anterior, 40 mm below the femoral origin.
    tibia = trans(3, 4, -40)
    assert_gs(gs(np.eye(4), tibia, "right"), lateral_mm=3, anterior_mm=4, proximal_mm=-40)
    assert_gs(gs(np.eye(4), tibia, "left"), lateral_mm=-3, anterior_mm=4, proximal_mm=-40)
    # Under flexion the translation is read in the JCS axes (anterior drawer along e2).
    femur = rot("z", 30)
    tibia = femur @ rot("x", -45) @ trans(0, 5, -30)
    out = gs(femur, tibia)
    assert out["flexion"] == pytest.approx(45)
    assert out["anterior_mm"] == pytest.approx(5)
    assert out["proximal_mm"] == pytest.approx(-30)
    assert out["lateral_mm"] == pytest.approx(0, abs=1e-9)


def _bone_cloud(rng, bone):
    """Femur / tibia-like cloud in RAS: a 250 mm shaft (r 12 mm) + an 80 x 50 x 40 mm articular block."""
    n = 4000
    z = rng.uniform(0, 250, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    shaft = np.stack([12 * np.cos(ang), 12 * np.sin(ang), z], -1)
    block = rng.uniform([-40, -25, 0], [40, 25, 40], (n, 3))
    if bone == "femur":  # articular end at the bottom
        pts = np.concatenate([shaft + [0, 0, 40], block])
        origin_z = 20.0
    else:  # tibia: plateau at the top
        pts = np.concatenate([shaft - [0, 0, 250], block - [0, 0, 40]])
        origin_z = -20.0
    return pts, origin_z


@pytest.mark.parametrize("bone", ["femur", "tibia"])
def test_anatomical_frame_from_points_long_axis(bone):
    rng = np.random.default_rng(0)
    pts, origin_z = _bone_cloud(rng, bone)
    # Place the bone model in arbitrary file coordinates; the hint is the model's rough RAS placement.
    file_from_ras = trans(100, -50, 20) @ rot("z", 30) @ rot("x", 10)
    pts_file = pts @ file_from_ras[:3, :3].T + file_from_ras[:3, 3]
    frame = anatomical_frame_from_points(pts_file, bone, hint_world_from_bone=np.linalg.inv(file_from_ras))
    ras_from_anat = np.linalg.inv(file_from_ras) @ frame
    np.testing.assert_allclose(ras_from_anat[:3, 2], [0, 0, 1], atol=0.02)  # long axis = generating axis
    np.testing.assert_allclose(ras_from_anat[:3, 0], [1, 0, 0], atol=0.02)  # widest = medio-lateral, right
    np.testing.assert_allclose(ras_from_anat[:3, 3], [0, 0, origin_z], atol=3.0)  # articular-end centre
    r = frame[:3, :3]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_anatomical_frame_from_landmarks_and_kinematics():
    femur_lm = {"medial_epicondyle": [-40, 0, 0], "lateral_epicondyle": [40, 0, 0], "hip_centre": [0, 0, 420]}
    tibia_lm = {"medial_plateau": [-25, 0, -10], "lateral_plateau": [25, 0, -10], "ankle_centre": [0, 0, -400]}
    # Right knee: lateral is the subject's right (+x).
    fa = anatomical_frame_from_landmarks(femur_lm, "femur", side="right")
    ta = anatomical_frame_from_landmarks(tibia_lm, "tibia", side="right")
    np.testing.assert_allclose(fa[:3, 0], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(fa[:3, 3], [0, 0, 0])
    np.testing.assert_allclose(ta[:3, 2], [0, 0, 1])
    np.testing.assert_allclose(ta[:3, 3], [0, 0, -10])
    # Left knee: lateral is the subject's left; x still points right.
    fl = anatomical_frame_from_landmarks({"medial_epicondyle": [40, 0, 0], "lateral_epicondyle": [-40, 0, 0],
                                          "shaft": [0, 0, 200]}, "femur", side="left")
    np.testing.assert_allclose(fl[:3, 0], [1, 0, 0], atol=1e-12)
    # Poses of bones -> knee kinematics.
    poses = {"femur": np.stack([np.eye(4)] * 2), "tibia": np.stack([np.eye(4), rot("x", -20)])}
    out = knee_kinematics(poses, fa, ta, side="right")
    np.testing.assert_allclose(out["flexion"], [0, 20], atol=1e-9)
    np.testing.assert_allclose(out["proximal_mm"][0], -10)


def test_bad_inputs():
    with pytest.raises(InputError):
        grood_suntay(np.eye(4), np.eye(4), side="up")
    with pytest.raises(InputError):
        anatomical_frame_from_points(np.zeros((3, 3)), "femur")
    with pytest.raises(InputError):
        anatomical_frame_from_landmarks({"medial_epicondyle": [0, 0, 0]}, "femur")
