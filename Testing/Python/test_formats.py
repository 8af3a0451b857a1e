"""Pose formats: Euler 3-1-2, JointTrack .jts, Autoscoper .tra, long CSV, pose-file conventions."""
import numpy as np
import pytest

from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import CArmGeometry, RAS_FROM_LPS
from Fluoro2DRRLib import pose_io


def rx(d):
    c, s = np.cos(np.radians(d)), np.sin(np.radians(d))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(d):
    c, s = np.cos(np.radians(d)), np.sin(np.radians(d))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rz(d):
    c, s = np.cos(np.radians(d)), np.sin(np.radians(d))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def random_poses(n, seed=0):
    rng = np.random.default_rng(seed)
    e = np.column_stack([rng.uniform(-50, 50, (n, 2)), rng.uniform(-900, -700, n),
                         rng.uniform(-180, 180, n), rng.uniform(-89, 89, n), rng.uniform(-180, 180, n)])
    return pose_io.euler312_to_matrix(*e.T), e


def test_euler312_matches_hand_built_product():
    m = pose_io.euler312_to_matrix(1.0, -2.0, 3.5, 30.0, -20.0, 75.0)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m[:3, :3], rz(30) @ rx(-20) @ ry(75), atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], [1.0, -2.0, 3.5])
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


def test_euler312_round_trip_vectorised_and_gimbal_lock():
    poses, e = random_poses(50)
    back = pose_io.matrix_to_euler312(poses)
    np.testing.assert_allclose(back, e, atol=1e-9)
    # at x_rot = +-90 only z_rot +- y_rot is defined: the matrix must still round-trip
    for b in (90.0, -90.0, 89.9999999):
        m = pose_io.euler312_to_matrix(0, 0, 0, 40.0, b, 25.0)
        again = pose_io.euler312_to_matrix(*pose_io.matrix_to_euler312(m))
        np.testing.assert_allclose(again, m, atol=1e-9)


def test_jts_round_trip_exact(tmp_path):
    poses, _ = random_poses(20, seed=1)
    path = tmp_path / "femur.jts"
    pose_io.write_jts(path, poses)
    lines = path.read_text().splitlines()
    assert lines[0] == "JT_EULER_312"
    assert [c.strip() for c in lines[1].split(",")] == list(pose_io.JTS_COLUMNS)
    np.testing.assert_allclose(pose_io.read_jts(path), poses, atol=1e-9, rtol=0)


def test_jts_reader_tolerant(tmp_path):
    path = tmp_path / "t.jts"
    path.write_text("  JT_EULER_312  \n x_tran, y_tran, z_tran, z_rot, x_rot, y_rot\n"
                    " 1.0 , 2.0, -800, 10, 20, 30 \n\n1,2,-801,0,0,0,\n\n\n")
    p = pose_io.read_jts(path)
    assert p.shape == (2, 4, 4)
    np.testing.assert_allclose(p[0][:3, :3], rz(10) @ rx(20) @ ry(30), atol=1e-12)
    np.testing.assert_allclose(p[1][:3, 3], [1, 2, -801])


def test_jts_bad_content_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jts"
    path.write_text("JT_EULER_312\nx_tran,y_tran,z_tran,z_rot,x_rot,y_rot\n1,2,3,4,5,6\n1,2,three,4,5,6\n")
    with pytest.raises(InputError, match=r"bad\.jts: line 4"):
        pose_io.read_jts(path)
    path.write_text("NOT_A_POSE\n1,2,3,4,5,6\n")
    with pytest.raises(InputError, match=r"bad\.jts: line 1"):
        pose_io.read_jts(path)
    path.write_text("JT_EULER_312\nx_tran,y_tran,z_tran,z_rot,x_rot,y_rot\n1,2,3,4,5\n")
    with pytest.raises(InputError, match=r"bad\.jts: line 3: expected 6 numbers"):
        pose_io.read_jts(path)


def test_tra_round_trip_with_nan_rows(tmp_path):
    poses, _ = random_poses(5, seed=2)
    poses[2] = np.nan
    path = tmp_path / "tibia.tra"
    pose_io.write_tra(path, poses)
    assert path.read_text().splitlines()[2] == ",".join(["NaN"] * 16)
    back = pose_io.read_tra(path)
    assert np.isnan(back[2]).all()
    ok = [0, 1, 3, 4]
    np.testing.assert_array_equal(back[ok], poses[ok])


def test_tra_column_major_and_garbage(tmp_path):
    poses, _ = random_poses(3, seed=3)
    path = tmp_path / "cm.tra"
    path.write_text("\n".join(",".join(repr(float(v)) for v in m.T.ravel()) for m in poses) + "\n")
    np.testing.assert_allclose(pose_io.read_tra(path), poses, atol=1e-12)
    path.write_text("1,2,3\n")
    with pytest.raises(InputError, match=r"cm\.tra: line 1: expected 16 numbers"):
        pose_io.read_tra(path)


def test_csv_round_trip_exact_with_quality(tmp_path):
    f, _ = random_poses(4, seed=4)
    t, _ = random_poses(4, seed=5)
    t[1] = np.nan
    quality = [{"frame": i, "similarity": 0.1 * i, "converged": True} for i in range(4)]
    path = tmp_path / "poses.csv"
    pose_io.write_poses_csv(path, {"femur": f, "tibia": t}, quality)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["frame", "bone", "m00", "m01"] and "similarity" in header
    back = pose_io.read_poses_csv(path)
    np.testing.assert_array_equal(back["femur"], f)
    assert np.isnan(back["tibia"][1]).all()
    np.testing.assert_array_equal(back["tibia"][[0, 2, 3]], t[[0, 2, 3]])
    np.testing.assert_array_equal(pose_io.load_pose_file(path, "femur"), f)
    with pytest.raises(InputError, match=r"poses\.csv: holds several bones"):
        pose_io.load_pose_file(path)


def test_file_pose_conventions():
    poses, _ = random_poses(6, seed=6)
    world_from_source = np.eye(4)
    world_from_source[:3, :3] = rz(30) @ rx(100)
    world_from_source[:3, 3] = [10, -700, 5]
    g = CArmGeometry(1000.0, (0.3, 0.3), (512, 512), world_from_source=world_from_source)
    ffb = RAS_FROM_LPS  # an LPS file read into RAS: file_from_bone = LPS_from_RAS = same diagonal
    jt = pose_io.file_pose_from_world_pose(poses, g, ffb)
    # the file pose moves a point stored in the file to the source frame
    p_bone = np.array([12.0, -3.0, 40.0, 1.0])
    p_file = ffb @ p_bone
    np.testing.assert_allclose(jt[0] @ p_file, g.source_from_world @ poses[0] @ p_bone, atol=1e-9)
    np.testing.assert_allclose(pose_io.world_pose_from_file_pose(jt, g, ffb), poses, atol=1e-9)
    tra = pose_io.file_pose_from_world_pose(poses, None, ffb)
    np.testing.assert_allclose(tra[2] @ p_file, poses[2] @ p_bone, atol=1e-9)
    np.testing.assert_allclose(pose_io.world_pose_from_file_pose(tra, None, ffb), poses, atol=1e-9)


def test_load_pose_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jts: file not found"):
        pose_io.load_pose_file(tmp_path / "nope.jts")
    bad = tmp_path / "poses.txt"
    bad.write_text("x")
    with pytest.raises(InputError, match=r"poses\.txt: unknown pose file type"):
        pose_io.load_pose_file(bad)
    garbage = tmp_path / "g.csv"
    garbage.write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(InputError, match=r"g\.csv"):
        pose_io.load_pose_file(garbage, "femur")
